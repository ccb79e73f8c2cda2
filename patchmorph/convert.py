"""``patchmorph convert``: any supported input image → OME-Zarr 0.5 (:func:`pipeline.importers.convert`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from patchmorph.app import command
from patchmorph.register import SchedulerOption, quiet_dask


def voxel_edge(value: str) -> float:
    """One number of ``--voxel-size``; anything else is refused in one sentence that shows the expected form
    (``50,40,40`` or a missing third number, which takes the next option's name, are the usual slips)."""
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a number: give three numbers in the array's axis order Z Y X, separated by spaces "
            "(z = the slowest axis, the plane axis of a TIFF stack), e.g. --voxel-size 50 40 40."
        ) from None


def voxel_size_option(help_text: str) -> Any:
    """The ``--voxel-size Z Y X`` option with ``help_text`` (three numbers, each read by :func:`voxel_edge`)."""
    return typer.Option("--voxel-size", metavar="Z Y X", parser=voxel_edge, help=help_text)


VoxelSizeOption = Annotated[
    tuple[float, float, float] | None,
    voxel_size_option("Voxel size per array axis (z = slowest, e.g. the plane axis); required for TIFF."),
]
UnitOption = Annotated[
    str | None,
    typer.Option(
        help="Unit of the voxel size / header numbers: micrometer, millimeter, ... (TIFF default: micrometer)."
    ),
]
OrientationOption = Annotated[
    str | None,
    typer.Option(
        help="Anatomical orientation code of the array axes (z, y, x), brainglobe style: each letter names "
        "the side where index 0 lies, e.g. 'psl' or 'asr'. Replaces any header orientation."
    ),
]
"""The geometry options of an image read from a file (``convert``, ``make-atlas``)."""


@command
def convert(
    input: Annotated[
        Path, typer.Argument(help="TIFF plane folder, TIFF stack, NIfTI, NRRD or OME-Zarr 0.4/0.5.")
    ],
    output: Annotated[
        Path | None,
        typer.Argument(
            metavar="OUTPUT",
            help="Output OME-Zarr 0.5 folder (e.g. brain.ome.zarr); optional with --preview.",
        ),
    ] = None,
    voxel_size: VoxelSizeOption = None,
    unit: UnitOption = None,
    orientation: OrientationOption = None,
    labels: Annotated[bool, typer.Option(help="Write a label image (nearest-neighbour pyramid).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    channel_index: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Of a multi-channel OME-Zarr image (c axis) or TIFF stack (C axis), convert channel N (from 0).",
        ),
    ] = None,
    preview: Annotated[
        Path | None,
        typer.Option(
            metavar="PNG",
            help="Also (or, without OUTPUT, only) write the three mid-planes labelled with the anatomical sides "
            "the orientation code puts at their edges: to check a code, or find one.",
        ),
    ] = None,
    scheduler: SchedulerOption = None,
) -> None:
    """Convert an image to OME-Zarr 0.5, keeping voxel size, unit and the full index→world matrix."""
    from patchmorph_core.errors import InputError
    from pipeline.importers import convert as convert_image
    from pipeline.importers import preview as write_preview

    if preview is not None:
        png = write_preview(input, preview, voxel_size=voxel_size, unit=unit, orientation=orientation)
        typer.echo(f"wrote {png}")
    if scheduler is not None:
        quiet_dask()
    if output is None:
        if preview is None:
            raise InputError(
                "no OUTPUT given: name the OME-Zarr folder to write (or pass --preview PNG only)."
            )
        return
    out = convert_image(
        input,
        output,
        voxel_size=voxel_size,
        unit=unit,
        orientation=orientation,
        overwrite=overwrite,
        labels=labels,
        channel_index=channel_index,
        scheduler=scheduler,
    )
    typer.echo(f"wrote {out}")
