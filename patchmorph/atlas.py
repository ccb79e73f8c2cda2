"""``patchmorph atlas``: a BrainGlobe atlas registered to one brain, with every output (:mod:`pipeline.atlas_job`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchmorph.cli import command


@command
def atlas(
    brain: Annotated[
        Path,
        typer.Argument(metavar="BRAIN", help="The brain: TIFF stack or plane folder, NIfTI, NRRD or OME-Zarr."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created; a rerun resumes).")],
    atlas_name: Annotated[
        str,
        typer.Option(
            "--atlas",
            help="BrainGlobe atlas name (e.g. allen_mouse_25um, found in $BRAINGLOBE_DIR or ~/.brainglobe) "
            "or the path of a BrainGlobe atlas folder.",
        ),
    ],
    voxel_size: Annotated[
        tuple[float, float, float] | None,
        typer.Option(
            "--voxel-size",
            metavar="Z Y X",
            help="Voxel size of the brain per array axis (z = slowest, the plane axis of a TIFF stack); "
            "required for TIFF.",
        ),
    ] = None,
    orientation: Annotated[
        str | None,
        typer.Option(
            help="Orientation code of the brain's array axes (z, y, x), each letter naming the side where index "
            "0 lies, e.g. 'psl' (find it with 'patchmorph convert --preview'). Replaces any header orientation."
        ),
    ] = None,
    unit: Annotated[
        str | None, typer.Option(help="Unit of --voxel-size: micrometer (TIFF default), millimeter, ...")
    ] = None,
    channel: Annotated[
        list[Path] | None,
        typer.Option(
            "--channel",
            metavar="PATH",
            help="An extra channel imaged with the brain (same shape and geometry), written in atlas space too; "
            "repeat for more.",
        ),
    ] = None,
    field_spacing: Annotated[
        str | None,
        typer.Option(
            metavar="<length>",
            help="Field spacing with its unit, e.g. 50um (default: the atlas's voxel size, never finer than the "
            "brain's); overrides the config.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="Job settings YAML (pipeline.atlas_job.AtlasJobConfig: inference, fine_tune, ...)."),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="Dask scheduler address (tcp://host:8786) or cluster YAML for every chunked step."),
    ] = None,
) -> None:
    """Register a BrainGlobe atlas to a brain: atlas labels, hemispheres and boundaries on the brain, the brain
    in atlas space, forward and inverse fields, volumes.csv, QC images and a summary."""
    from patchmorph_core.config import load_yaml
    from patchmorph_core.spatial import parse_length
    from pipeline.atlas_job import AtlasJobConfig, run_atlas_job

    settings = AtlasJobConfig() if config is None else load_yaml(config, AtlasJobConfig)
    if field_spacing is not None:
        parse_length(field_spacing, "--field-spacing")  # the option's own error message, before any work
        inference = settings.inference.model_copy(update={"field_spacing": field_spacing})
        settings = settings.model_copy(update={"inference": inference})
    result = run_atlas_job(
        brain, out, atlas_name, voxel_size=voxel_size, orientation=orientation, unit=unit,
        channels=channel or (), config=settings, scheduler=scheduler,
    )  # fmt: skip
    s = result.summary
    typer.echo(
        f"atlas {s['atlas']} on the brain in {s['seconds']:.0f} s: NCC in atlas space {s['ncc_in_atlas_space']:.3f}, "
        f"folded voxels inside the brain {s['folded_percent_inside_brain']:.4f} %, {int(s['n_structures'])} structures"
    )
    for role, path in result.paths.items():
        typer.echo(f"wrote {role}: {path}")
    typer.echo(f"wrote the job record {result.record}")
