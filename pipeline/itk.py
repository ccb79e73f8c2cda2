"""Displacement fields for other tools: ITK / ANTs / SimpleITK displacement fields in NIfTI, both ways.

ITK's convention (what ANTs writes as ``*Warp.nii.gz`` and SimpleITK's ``DisplacementFieldTransform``
reads): a vector image on the fixed image's grid whose vector at a point ``x`` of the fixed image is the
displacement ``d(x)`` to the moving image's point ``x + d(x)``, in ITK's physical space — LPS (+x left,
+y posterior, +z superior), millimetres — while the NIfTI header holds the grid as usual (index → RAS+
``sform``/``qform``). The file is 5-D, ``(X, Y, Z, 1, 3)``, with intent ``vector``.

A PatchMorph field maps a fixed world point ``x`` to the moving world point ``x + u(x)`` too, with ``u``
in the world frame RAS+ written in ``(z, y, x)`` order (:mod:`patchmorph_core.spatial`), so the export only
changes the frame and unit: ``d = world_to_lps(u)`` in millimetres, the array transposed to NIfTI's
``(i, j, k) = (x, y, z)`` order. The exported grid is the field grid grown by one voxel on every side
(edge values, as our sampler extends the field outside its grid), so ITK's sampler, which treats points
outside the field as not displaced, covers every fixed voxel the field covers.

The world frames must agree: the images the other tool reads must carry the same index → world maps as
the OME-Zarr images PatchMorph read (e.g. NIfTI files converted with ``patchmorph convert``, or exported
with :func:`nifti_image`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from patchmorph_core.errors import InputError
from patchmorph_core.spatial import (
    ITK_MAX_SHEAR_DEG,
    Grid,
    grid_affine_from_ras,
    lps_to_world,
    nifti_affine,
    swap_file_axes,
    swap_file_sizes,
    unit_scale,
    world_to_lps,
)

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _check_nifti_path(path: Path) -> Path:
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise InputError(f"output {path} is not a NIfTI file name: give a path ending in .nii or .nii.gz.")
    if not path.parent.is_dir():
        raise InputError(f"the folder {path.parent} of the output {path} does not exist: create it first.")
    return path


def field_on_grid(field: str | Path, inverse: bool = False) -> tuple[np.ndarray, Grid]:
    """A registration field in memory: ``(3, Z, Y, X)`` float32 world displacements and their grid.

    With ``inverse``, the inverse displacement (moving world point → fixed world point) on the moving
    image's grid at the field's mean spacing, by fixed-point iteration.
    """
    from patchmorph_core.displacement import FieldDisplacement, InverseDisplacement, displacement_on_grid
    from pipeline.ngff import read_field, read_image

    array, grid, meta = read_field(field)
    if not inverse:
        return np.asarray(array[...], dtype=np.float32), grid
    moving = meta.get("moving")
    if not moving and meta.get("imported_from"):
        raise InputError(
            f"field {field} was imported from {meta['imported_from']} without --moving, and its inverse lives on the "
            "moving image's grid: import it again with --moving (the OME-Zarr image it registers)."
        )
    if not moving or not Path(moving).exists():
        raise InputError(
            f"field {field} names no readable moving image ({moving}): the inverse lives on the moving image's "
            "grid, so keep that image where the field's metadata says."
        )
    target = read_image(moving).grid.with_unit(grid.unit).resampled(float(np.mean(grid.spacing)))
    values = displacement_on_grid(InverseDisplacement(FieldDisplacement(array, grid)), target)
    return values, target


def _padded(values: np.ndarray, grid: Grid) -> tuple[np.ndarray, Grid]:
    """The field grown by one voxel on every side, edge values repeated (our constant extension)."""
    padded = np.pad(values, ((0, 0), (1, 1), (1, 1), (1, 1)), mode="edge")
    start = grid.index_to_world(np.array([-1.0, -1.0, -1.0]))
    affine = grid.affine.copy()
    affine[:3, 3] = start
    return padded, Grid(tuple(s + 2 for s in grid.shape), affine, grid.unit)


def export_field(
    field: str | Path, out: str | Path, *, inverse: bool = False, overwrite: bool = False
) -> Path:
    """Write a registration field as an ITK / ANTs displacement field (NIfTI, LPS, mm, intent vector).

    Args:
        field: a field written by ``register`` (fixed → moving).
        out: ``.nii`` or ``.nii.gz`` file.
        inverse: export the inverse (moving → fixed, on the moving image's grid; ANTs' ``InverseWarp``).
        overwrite: replace an existing file.
    """
    import nibabel as nib

    out = _check_nifti_path(Path(out))
    if out.exists() and not overwrite:
        raise InputError(f"output {out} already exists: pass --overwrite or choose another path.")
    values, grid = _padded(*field_on_grid(field, inverse))
    if grid.shear_deg > ITK_MAX_SHEAR_DEG:
        raise InputError(
            f"the field {field} lies on a sheared grid (its axes {grid.shear_deg:.2g}° from right angles, from its "
            "image's header), which ITK and ANTs cannot read: resample that image onto a grid with axes at right "
            "angles (e.g. nibabel's resample_to_output), convert and register it again."
        )
    scale = unit_scale(grid.unit, "millimeter")
    lps = world_to_lps(np.moveaxis(values, 0, -1)) * scale  # (Z, Y, X, 3)
    data = np.ascontiguousarray(
        swap_file_axes(lps)[:, :, :, None, :], dtype=np.float32
    )  # (X, Y, Z, 1, 3)
    affine = nifti_affine(grid.with_unit("millimeter"))
    image = nib.Nifti1Image(data, affine)
    image.header.set_intent("vector")
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    tmp = out.with_name(f".{out.name}.partial{''.join(out.suffixes)}")
    nib.save(image, tmp)
    tmp.replace(out)
    logger.info("wrote the ITK displacement field %s (grid %s, LPS mm)", out, grid.shape)
    return out


def read_itk_field(path: str | Path) -> tuple[np.ndarray, Grid]:
    """An ITK / ANTs displacement field (NIfTI, LPS, mm) as ``(3, Z, Y, X)`` world displacements (RAS+ in
    ``(z, y, x)`` order, millimetres) and its grid.

    Raises:
        InputError: not a 5-D vector NIfTI, a grid in another unit, or a qform and sform that disagree.
    """
    import nibabel as nib

    from pipeline.importers import check_nifti_forms

    path = Path(path)
    if not path.is_file():
        raise InputError(f"displacement field {path} does not exist: check the path.")
    try:
        image: Any = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises several types for a bad file
        raise InputError(
            f"{path} is not a readable NIfTI file ({err}): give an ITK/ANTs displacement field."
        ) from err
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] != 3:
        raise InputError(
            f"{path} has shape {data.shape}: an ITK/ANTs 3-D displacement field is (X, Y, Z, 1, 3) with intent vector."
        )
    check_nifti_forms(image.header, data.shape[:3], path, "")
    unit = image.header.get_xyzt_units()[0]
    if unit not in ("mm", "unknown", None):
        raise InputError(f"{path} stores its grid in {unit}: ITK displacement fields are in millimetres.")
    grid = Grid(
        swap_file_sizes(data.shape), grid_affine_from_ras(np.asarray(image.affine, dtype=np.float64)), "millimeter"
    )
    vectors = lps_to_world(swap_file_axes(data[:, :, :, 0, :]))
    return np.ascontiguousarray(np.moveaxis(vectors, -1, 0), dtype=np.float32), grid


FIELD_MIN_COVER = 0.5
"""Smallest share of the fixed image's voxels an imported field must cover: ITK and ANTs write a registration's field
on the fixed image's grid, so a field that misses most of it belongs to another image or frame."""


def import_field(
    path: str | Path,
    out: str | Path,
    *,
    fixed: str | Path | None = None,
    moving: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """An ITK / ANTs displacement field (e.g. ANTs' ``*Warp.nii.gz``) as a PatchMorph field that ``warp`` takes.

    Args:
        path: the NIfTI displacement field (fixed → moving, LPS, mm).
        out: the OME-Zarr field to write.
        fixed, moving: the OME-Zarr images it registers (recorded so that ``warp`` finds the output grid;
            their world frames must be the NIfTI files' physical space); the field is written in the fixed
            image's unit, and must cover at least :data:`FIELD_MIN_COVER` of the fixed image.
        overwrite: replace an existing output.
    """
    from pipeline.ngff import read_image, write_field

    values, grid = read_itk_field(path)
    fixed_grid = read_image(fixed).grid if fixed is not None else None
    if fixed_grid is not None and (share := fixed_grid.share_within(grid)) < FIELD_MIN_COVER:
        raise InputError(
            f"the field {path} covers {share:.0%} of the fixed image {fixed} (their grids lie apart in the world): "
            "give the fixed image the field was computed for, as the other tool read it (converted with patchmorph "
            "convert, which keeps its header, without an --orientation that replaces it)."
        )
    unit = fixed_grid.unit if fixed_grid is not None else "millimeter"
    if unit != grid.unit:
        values = values * unit_scale(grid.unit, unit)
        grid = grid.with_unit(unit)
    metadata = {
        "fixed": None if fixed is None else str(fixed),
        "moving": None if moving is None else str(moving),
        "model": None,
        "config": None,
        "imported_from": str(path),
    }
    return write_field(out, values, grid, metadata=metadata, overwrite=overwrite)


NIFTI_MAX_BYTES = 8 * 1024**3
"""Largest pyramid level :func:`nifti_image` writes (it is held in memory): a larger one is refused, naming the
finest level that fits."""


def nifti_dtype(dtype: np.dtype) -> np.dtype:
    """The NIfTI data type an image of ``dtype`` is written as: its own (64-bit integers included, which nibabel
    writes only when asked), except a boolean mask as uint8 and float16, which NIfTI lacks, as float32."""
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype == np.float16:
        return np.dtype(np.float32)
    return dtype


def nifti_image(image: str | Path, out: str | Path, *, level: int = 0, overwrite: bool = False) -> Path:
    """Write pyramid level ``level`` of an OME-Zarr image as NIfTI with the same index → world map (RAS+, mm),
    for other tools (with :func:`export_field`'s fields: ITK, ANTs, SimpleITK).

    Raises:
        InputError: an existing output, no such level, or a level over :data:`NIFTI_MAX_BYTES`.
    """
    import nibabel as nib

    from pipeline.ngff import read_image

    out = _check_nifti_path(Path(out))
    if out.exists() and not overwrite:
        raise InputError(f"output {out} already exists: pass --overwrite or choose another path.")
    levels = read_image(image).levels
    if not 0 <= level < len(levels):
        raise InputError(f"image {image} has levels 0 to {len(levels) - 1}, not {level}: give one of them.")
    sizes = [int(np.prod(lv.grid.shape)) * np.dtype(lv.array.dtype).itemsize for lv in levels]
    if sizes[level] > NIFTI_MAX_BYTES:
        fits = next((k for k, n in enumerate(sizes) if n <= NIFTI_MAX_BYTES), len(levels) - 1)
        raise InputError(
            f"level {level} of {image} is {sizes[level] / 1024**3:.1f} GiB, more than a NIfTI file is written "
            f"from memory here ({NIFTI_MAX_BYTES / 1024**3:.0f} GiB): give --level {fits} or coarser."
        )
    level_ = levels[level]
    dtype = nifti_dtype(np.dtype(level_.array.dtype))
    array = np.asarray(level_.array[...]).astype(dtype, copy=False)
    grid = level_.grid.with_unit("millimeter")
    if grid.shear_deg > ITK_MAX_SHEAR_DEG:
        logger.warning(
            "%s lies on a sheared grid (its axes %.2g° from right angles): nibabel and FSL read %s as it lies, ITK and "
            "ANTs refuse it", image, grid.shear_deg, out,
        )  # fmt: skip
    result = nib.Nifti1Image(np.ascontiguousarray(swap_file_axes(array)), nifti_affine(grid), dtype=dtype)
    result.header.set_xyzt_units("mm")
    tmp = out.with_name(f".{out.name}.partial{''.join(out.suffixes)}")
    nib.save(result, tmp)
    tmp.replace(out)  # whole or not at all; a symbolic link at ``out`` is replaced, never the file it points to
    return out
