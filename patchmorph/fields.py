"""``patchmorph export-field``, ``import-field`` and ``export-image``: displacement fields and images for ITK, ANTs and
SimpleITK (:mod:`pipeline.itk`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patchmorph.app import command


@command
def export_field(
    field: Annotated[
        Path, typer.Argument(metavar="FIELD", help="A field written by register or atlas (OME-Zarr).")
    ],
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="The ITK displacement field to write (.nii or .nii.gz).")
    ],
    inverse: Annotated[
        bool,
        typer.Option(
            help="Export the inverse (moving -> fixed, on the moving image's grid), in the role of ANTs' "
            "InverseWarp (whose grid is the fixed image's)."
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Write a field as an ITK/ANTs displacement field (NIfTI, LPS, millimetres, intent vector)."""
    from pipeline.itk import export_field as export

    written = export(field, out, inverse=inverse, overwrite=overwrite)
    typer.echo(f"wrote {'inverse ' if inverse else ''}displacement field {written} (ITK/ANTs: LPS, mm)")


@command
def import_field(
    warp: Annotated[
        Path, typer.Argument(metavar="WARP", help="An ITK/ANTs displacement field (e.g. ANTs' 1Warp.nii.gz).")
    ],
    out: Annotated[Path, typer.Argument(metavar="FIELD", help="The PatchMorph field to write (OME-Zarr).")],
    fixed: Annotated[
        Path | None,
        typer.Option(help="The fixed image (OME-Zarr) it was computed for; warp writes onto its grid."),
    ] = None,
    moving: Annotated[Path | None, typer.Option(help="The moving image (OME-Zarr) it maps to.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Read an ITK/ANTs displacement field into a field that warp accepts."""
    from pipeline.itk import import_field as load

    written = load(warp, out, fixed=fixed, moving=moving, overwrite=overwrite)
    typer.echo(f"wrote displacement field {written}")


@command
def export_image(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="An OME-Zarr image (an input or an output).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="The NIfTI file to write (.nii or .nii.gz).")],
    level: Annotated[
        int, typer.Option(help="The pyramid level to write (0 = full resolution; each further level is coarser).")
    ] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Write an image as NIfTI (RAS+, millimetres) in the frame export-field's fields use, so ITK, ANTs and
    SimpleITK can apply them to it."""
    from pipeline.itk import nifti_image

    written = nifti_image(image, out, level=level, overwrite=overwrite)
    typer.echo(f"wrote {written} (level {level} of {image}; NIfTI, RAS+, mm)")
