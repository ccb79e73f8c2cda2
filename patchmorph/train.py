"""``patchmorph train``: :func:`pipeline.training_data.run_training` on a training YAML."""

from __future__ import annotations

from pathlib import Path

import typer

from patchmorph.app import command


@command
def train(
    config: Path = typer.Option(
        ..., "--config", "-c", help="Training YAML (see configs/train_default.yaml)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the config's checkpoint if it exists."
    ),
    steps: int | None = typer.Option(None, "--steps", help="Override the number of steps."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start again and replace an existing checkpoint (default: refuse)."
    ),
) -> None:
    """Train a PatchMorph model (unsupervised) and write a checkpoint with its loss curve."""
    from pipeline.training_data import run_training

    result = run_training(config, resume=resume, steps=steps, overwrite=overwrite)
    typer.echo(
        f"trained {result.steps} steps in {result.seconds:.0f} s (loss {result.final_loss:.4f}); "
        f"wrote {result.checkpoint} and {result.loss_csv}"
    )
