"""``patchmorph register``, ``warp`` and ``cluster-script``: the chunked Dask commands.

Both long commands print the Dask dashboard address, show a progress bar per stage (chunks done / total,
rate, ETA) and print what they wrote where. Rerunning an interrupted command resumes it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Annotated

import typer

from patchmorph.app import command
from patchmorph_core.errors import InputError, QualityError

ChunkOption = Annotated[
    int | None,
    typer.Option(
        "--chunk-size",
        help="Output voxels per chunk edge; one task per chunk (default 64; register stores a field of at most "
        "128^3 voxels as its two halves).",
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(help="Run on a local Dask cluster of N worker processes (default: threads of this process)."),
]
SchedulerOption = Annotated[
    str | None,
    typer.Option(
        help="Dask scheduler address (tcp://host:8786) or cluster YAML (configs/cluster/slurm.yaml) "
        "(default: threads of this process)."
    ),
]
OverwriteOption = Annotated[bool, typer.Option(help="Replace a finished output and discard its run records.")]
AcceptOrientationOption = Annotated[
    bool,
    typer.Option(help="Register as given even when another orientation code fits clearly better (scores recorded)."),
]
AllowSizeMismatchOption = Annotated[
    bool,
    typer.Option(help="Register even when the tissue extents differ more than 3x on an axis (e.g. a thin section)."),
]
AcceptQualityOption = Annotated[
    bool,
    typer.Option(help="Keep a field that fails its quality thresholds as complete (recorded in its quality block)."),
]
KeepRunOption = Annotated[
    bool,
    typer.Option(
        "--keep-run",
        help="Keep the run folder OUT.run after the run finishes (per-chunk records and timings). Without it the "
        "folder exists only while the command runs, so that an interrupted command resumes when run again.",
    ),
]


def quiet_dask() -> None:
    """Keep Dask's own INFO chatter off the terminal (warnings still show)."""
    import distributed  # noqa: F401  (creates its loggers, whose levels are set below)

    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("distributed", "dask_jobqueue"):
            logging.getLogger(name).setLevel(logging.WARNING)


@command
def register(
    fixed: Annotated[Path, typer.Option(help="Fixed image (OME-Zarr); the field lives on its world grid.")],
    moving: Annotated[Path, typer.Option(help="Moving image (OME-Zarr; any spacing, unit, orientation).")],
    out: Annotated[Path, typer.Option(help="Output displacement field (OME-Zarr, e.g. field.zarr).")],
    config: Annotated[
        Path | None,
        typer.Option(help="Inference config YAML (default: configs/register_default.yaml values)."),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Model checkpoint (overrides the config's weights).")
    ] = None,
    field_spacing: Annotated[
        str | None,
        typer.Option(
            metavar="<length>",
            help="Field spacing with its unit, e.g. 50um or 0.5mm (overrides the config). The cascade's stages "
            "follow from it. Default: the coarser of the two images' voxel sizes (for an atlas onto a finer "
            "brain, the atlas's voxel); never finer than the fixed image's voxel."
        ),
    ] = None,
    chunk_size: ChunkOption = None,
    workers: WorkersOption = None,
    scheduler: SchedulerOption = None,
    overwrite: OverwriteOption = False,
    accept_orientation: AcceptOrientationOption = False,
    allow_size_mismatch: AllowSizeMismatchOption = False,
    accept_quality: AcceptQualityOption = False,
    keep_run: KeepRunOption = False,
) -> None:
    """Register MOVING to FIXED chunk by chunk; writes the field and its uncertainty image.

    Before heavy work the pair is checked (constant or empty images, tissue extents, orientation); after it
    the field's quality (similarity, folds inside the tissue, inverse residual) is measured, recorded in its
    metadata and printed. Exit code 2: refused input; 3: the field failed its quality thresholds.
    """
    from patchmorph_core.spatial import parse_length
    from pipeline.checks import CheckOptions
    from pipeline.ngff import warn_without_orientation
    from pipeline.quality import QualityReport
    from pipeline.register import register_files, resolve_config

    if workers is not None or scheduler is not None:  # threads of this process import no Dask cluster code
        quiet_dask()
    for image, role in ((fixed, "fixed"), (moving, "moving")):
        with contextlib.suppress(InputError):  # an unreadable input is register's to report
            warn_without_orientation(image, role)
    cfg = resolve_config(config)
    if weights is not None:
        cfg = cfg.model_copy(update={"weights": str(weights)})
    if field_spacing is not None:
        parse_length(field_spacing, "--field-spacing")  # the option's own error message, before any work
        cfg = cfg.model_copy(update={"field_spacing": field_spacing})
    checks = CheckOptions(
        accept_orientation=accept_orientation, allow_size_mismatch=allow_size_mismatch, accept_quality=accept_quality
    )
    try:
        record = register_files(
            fixed,
            moving,
            out,
            cfg,
            chunk_size=chunk_size,
            workers=workers,
            scheduler=scheduler,
            overwrite=overwrite,
            checks=checks,
            keep_run=keep_run,
        )
    except QualityError:
        for line in QualityReport(read_quality(out), ["failed"]).summary():
            typer.echo(line)
        raise
    if record.dashboard:
        typer.echo(f"dashboard was {record.dashboard}")
    typer.echo(
        f"wrote displacement field {record.field} (grid {record.grid_shape}, spacing "
        f"{', '.join(f'{s:.4g}' for s in record.spacing)} {record.unit}; {record.chunks} chunks; "
        f"{record.skipped} chunk tasks of its passes kept from an earlier run) in {record.seconds:.1f} s"
    )
    spacing = record.field_spacing
    passes = ", ".join(f"{name} {value:.4g}" for name, value in spacing["passes"].items())
    typer.echo(f"field spacing {spacing['value']:.4g} {spacing['unit']} ({spacing['note']}); patch spacing of the passes: {passes}")
    typer.echo(f"wrote uncertainty {record.uncertainty}")
    for line in QualityReport(record.quality, list(record.quality["failures"])).summary():
        typer.echo(line)
    if keep_run:
        typer.echo(f"run records kept in {record.run}")


def read_quality(field: Path) -> dict:
    """The quality block stored in a field's metadata."""
    import zarr

    return dict(zarr.open_group(str(field), mode="r").attrs["patchmorph"]["quality"])


@command
def warp(
    field: Annotated[Path, typer.Option(help="Displacement field written by `patchmorph register`.")],
    moving: Annotated[Path, typer.Option(help="Image or label map to warp (OME-Zarr).")],
    out: Annotated[Path, typer.Option(help="Output image (OME-Zarr).")],
    labels: Annotated[bool, typer.Option(help="Label map: label resampling (--label-interpolation).")] = False,
    label_interpolation: Annotated[
        str,
        typer.Option(
            metavar="vote|nearest",
            help="With --labels: 'vote' gives each voxel the label with the largest summed trilinear weight among "
            "its 8 neighbours (ANTs' GenericLabel); 'nearest' the nearest voxel's label.",
        ),
    ] = "vote",
    inverse: Annotated[
        bool,
        typer.Option(
            help="MOVING is in fixed space (e.g. atlas labels); warp it onto the moving image's grid."
        ),
    ] = False,
    target: Annotated[
        Path | None,
        typer.Option(help="Image whose grid the output takes (default: from the field's metadata)."),
    ] = None,
    chunk_size: ChunkOption = None,
    workers: WorkersOption = None,
    scheduler: SchedulerOption = None,
    overwrite: OverwriteOption = False,
    keep_run: KeepRunOption = False,
) -> None:
    """Warp an image or label map through a field into fixed space (or moving space with --inverse)."""
    from typing import get_args

    from patchmorph_core.warping import LabelInterpolation
    from pipeline.warp import warp_files

    if label_interpolation not in get_args(LabelInterpolation):
        raise InputError(f"--label-interpolation {label_interpolation!r} is unknown: give 'vote' or 'nearest'.")
    if workers is not None or scheduler is not None:  # threads of this process import no Dask cluster code
        quiet_dask()
    record = warp_files(
        field, moving, out, labels=labels, target=target, inverse=inverse, chunk_size=chunk_size,
        workers=workers, scheduler=scheduler, overwrite=overwrite, keep_run=keep_run,
        label_interpolation=label_interpolation,  # type: ignore[arg-type]
    )  # fmt: skip
    if record.dashboard:
        typer.echo(f"dashboard was {record.dashboard}")
    kind = "label map" if labels else "image"
    typer.echo(
        f"wrote {record.direction}-warped {kind} {record.out} (grid {record.grid_shape}, {record.unit}; "
        f"{record.chunks} chunks, {record.skipped} resumed) in {record.seconds:.1f} s"
    )
    if record.inverse_max_error is not None:
        typer.echo(
            f"inverse field residual: max {record.inverse_max_error:.3g}, mean {record.inverse_mean_error:.3g} "
            "(world units of the field)"
        )


@command
def cluster_script(
    config: Annotated[
        Path, typer.Argument(help="Cluster YAML with kind: slurm (e.g. configs/cluster/slurm.yaml).")
    ],
) -> None:
    """Print the SLURM job script one Dask worker job would run (no job is submitted)."""
    from pipeline.cluster import job_script, load_cluster_config

    quiet_dask()
    cluster = load_cluster_config(config)
    if cluster.kind != "slurm":
        raise InputError(
            f"cluster config {config} has kind {cluster.kind!r}: give a config with kind: slurm."
        )
    typer.echo(job_script(cluster))
