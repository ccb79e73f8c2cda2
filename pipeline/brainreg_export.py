"""``patchmorph export-brainreg``: a finished atlas job's results in brainreg's output layout, for BrainGlobe's
tools that read a brainreg folder (brainglobe-napari-io's brainreg reader, brainglobe-segmentation, brainmapper).

brainreg works in a *downsampled* space: the brain resampled to the atlas's voxel size in the atlas's
orientation (array axes permuted and flipped, never rotated), covering the brain's box edge to edge
(:meth:`~patchmorph_core.spatial.Grid.reoriented`; ``round(voxels × voxel size / atlas voxel size)`` voxels
along each atlas axis). The folder holds, as TIFF stacks in that space:

* ``downsampled.tiff`` — the brain (uint16; each extra channel as ``downsampled_<channel>.tiff``);
* ``registered_atlas.tiff`` (uint32), ``registered_hemispheres.tiff`` (uint8, 1 left, 2 right) and
  ``boundaries.tiff`` (uint8 0/1) — the job's atlas labels on the brain, at the nearest job voxel;
* ``deformation_field_0/1/2.tiff`` (float32) — each voxel's position in the atlas along the atlas's array axis
  0, 1, 2, in mm from the centre of the atlas's first voxel (brainmapper multiplies by ``1000 / resolution``
  to get atlas voxels), through the job's forward field;

and, in atlas space, ``downsampled_standard.tiff`` (``downsampled_standard_<channel>.tiff``): the job's brain
(channels) in atlas space, plus ``volumes.csv`` (the job's) and ``brainreg.json`` (``atlas``, the brain's
``orientation`` and ``voxel_sizes`` in µm per array axis of the brain file, ``brain_geometry``, as brainreg records
its arguments at the file's top level; an oblique brain gets the nearest orientation code; and ``atlas_range``, the
part of the atlas the job was registered to, direction → ``[from, to]`` µm as the job's summary records it, empty
for the whole atlas: brainreg has no such argument, so BrainGlobe's tools do not read it, but whoever opens the
folder can tell the atlas was cut).

Everything is computed and written slab by slab of planes (memory bounded by a slab, whatever the atlas's
resolution), into a temporary folder renamed into place when complete; what two files need (the labels for the
registered atlas and its boundaries, the atlas positions for the three deformation fields) is computed once into
memory-mapped arrays there and removed.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from patchmorph_core.displacement import FieldDisplacement
from patchmorph_core.errors import InputError
from patchmorph_core.spatial import Grid, atlas_coordinates_um, nearest_orientation_code, resample, unit_scale
from pipeline.atlas import _inner_boundaries, range_record, range_text
from pipeline.points import JobSpaces, open_job, values_at
from pipeline.resume import temporary_sibling

logger = logging.getLogger(__name__)

MARKER = "patchmorph"
"""Key of ``brainreg.json`` that says this product wrote the folder (only such a folder is replaced)."""
SLAB_VOXELS = 4_000_000
"""Voxels computed and written at a time: whole planes, at most 16 of them (one when a plane is larger)."""
BIGTIFF_BYTES = 2**32 - 2**25
"""TIFF files larger than this are written as BigTIFF."""

SlabFunction = Callable[[Grid], np.ndarray]
"""Values of one output on a slab of planes (its grid, in the brain's unit) → ``slab.shape`` array."""


def downsampled_grid(brain: Grid, atlas_resolution_um: np.ndarray, atlas_orientation: str) -> Grid:
    """brainreg's downsampled space of a brain on ``brain`` (the brain file's voxels), in ``brain.unit``: the
    brain's box in ``atlas_orientation`` axis order, with voxels of ``atlas_resolution_um`` (``(3,)`` micrometer,
    one per axis of that order), ``round(extent / resolution)`` of them per axis (at least 1)."""
    resolution = np.asarray(atlas_resolution_um, dtype=np.float64) * unit_scale("micrometer", brain.unit)
    extent = brain.box_extent_along(atlas_orientation)
    shape = tuple(max(1, int(round(float(e / r)))) for e, r in zip(extent, resolution, strict=True))
    return brain.reoriented(atlas_orientation, shape)


def _slab_grids(grid: Grid) -> Iterator[Grid]:
    """``grid`` in slabs of whole planes, about :data:`SLAB_VOXELS` each (at most 16 planes, at least one)."""
    planes = max(1, min(16, SLAB_VOXELS // (grid.shape[1] * grid.shape[2])))
    for z0 in range(0, grid.shape[0], planes):
        yield grid.crop((z0, 0, 0), (min(grid.shape[0], z0 + planes), *grid.shape[1:]))


def _slabs(grid: Grid, fn: SlabFunction) -> Iterator[np.ndarray]:
    """``fn``'s values over ``grid``, plane by plane, computed a slab at a time (:func:`_slab_grids`)."""
    for slab in _slab_grids(grid):
        yield from fn(slab)


def _write_tiff(path: Path, grid: Grid, dtype: np.dtype | type, fn: SlabFunction) -> None:
    """A ``grid.shape`` TIFF stack of ``dtype`` written plane by plane from ``fn``'s slabs."""
    nbytes = int(np.prod(grid.shape)) * np.dtype(dtype).itemsize
    planes = (np.ascontiguousarray(p, dtype=dtype) for p in _slabs(grid, fn))
    tifffile.imwrite(path, planes, shape=grid.shape, dtype=dtype, bigtiff=nbytes > BIGTIFF_BYTES)


def _labels(array: Any, grid: Grid) -> SlabFunction:
    """A label image (``array`` on ``grid``) at the nearest voxel of each slab voxel (0 outside it)."""

    def on(slab: Grid) -> np.ndarray:
        world = slab.points().reshape(-1, 3) * unit_scale(slab.unit, grid.unit)
        return values_at(array, grid.world_to_index(world)).reshape(slab.shape)

    return on


def _planes(grid: Grid, slab: Grid) -> tuple[int, int]:
    """The planes ``[z0, z1)`` of ``grid`` that ``slab`` (a :meth:`~patchmorph_core.spatial.Grid.crop` of it) holds."""
    z0 = int(round(float(grid.world_to_index(slab.index_to_world(np.zeros(3)))[0])))
    return z0, z0 + slab.shape[0]


def _stored(array: np.ndarray, grid: Grid) -> SlabFunction:
    """The planes of an array on ``grid`` (computed once by :func:`_computed`) that each slab holds."""

    def on(slab: Grid) -> np.ndarray:
        z0, z1 = _planes(grid, slab)
        return np.asarray(array[z0:z1])

    return on


def _boundaries(labels: np.ndarray, grid: Grid) -> SlabFunction:
    """brainreg's ``boundaries`` (``find_boundaries(mode="inner")`` over the whole image) of ``labels`` on
    ``grid``: each slab from its planes and one plane of each neighbouring slab (the same values)."""

    def on(slab: Grid) -> np.ndarray:
        z0, z1 = _planes(grid, slab)
        low, high = max(0, z0 - 1), min(grid.shape[0], z1 + 1)
        return _inner_boundaries(np.asarray(labels[low:high]))[z0 - low : z1 - low]

    return on


def _computed(path: Path, grid: Grid, dtype: np.dtype | type, fn: SlabFunction, components: int = 0) -> np.ndarray:
    """``fn``'s values over ``grid`` (``(components, *slab.shape)`` per slab when ``components``), computed once,
    slab by slab, into a memory-mapped ``.npy`` file at ``path`` (so that two outputs read them without a second
    computation and no more than a slab is held in memory)."""
    shape = grid.shape if not components else (components, *grid.shape)
    stored = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    for slab in _slab_grids(grid):
        z0, z1 = _planes(grid, slab)
        values = fn(slab)
        if components:
            stored[:, z0:z1] = values
        else:
            stored[z0:z1] = values
    stored.flush()
    return stored


def _intensity(array: Any, grid: Grid, mapping: tuple[float, float]) -> SlabFunction:
    """An image (``array`` on ``grid``) linearly interpolated at each slab voxel, mapped by ``(offset, scale)``
    (:func:`_uint16_map`), as uint16 (0 outside the image)."""
    offset, scale = mapping

    def on(slab: Grid) -> np.ndarray:
        world = slab.points() * unit_scale(slab.unit, grid.unit)
        values = (resample(array, grid, world, order=1, cval=offset) - offset) * scale
        return np.clip(np.rint(values), 0, 65535).astype(np.uint16)

    return on


def _atlas_positions_mm(job: JobSpaces) -> SlabFunction:
    """Each slab voxel's position in the atlas along its three array axes, ``(3, *slab.shape)``, in mm from the
    first voxel's centre (BrainGlobe's atlas coordinates, :func:`~patchmorph_core.spatial.atlas_coordinates_um`, in
    mm: brainreg's deformation fields), through the job's forward field."""
    from pipeline.ngff import read_field

    array, field_grid, _ = read_field(job.field)
    sampler = FieldDisplacement(array, field_grid)
    um_to_mm = unit_scale("micrometer", "millimeter")

    def on(slab: Grid) -> np.ndarray:
        world = slab.points().reshape(-1, 3) * unit_scale(slab.unit, field_grid.unit)
        moved = (world + sampler(world)) * unit_scale(field_grid.unit, job.atlas_grid.unit)
        index = job.atlas_grid.world_to_index(moved)
        position = atlas_coordinates_um(index, job.atlas.resolution_um) * um_to_mm
        return position.T.reshape(3, *slab.shape).astype(np.float32)

    return on


def _uint16_map(array: Any) -> tuple[float, float]:
    """``(offset, scale)`` with ``(value - offset) × scale`` in uint16: none for an image within 0..65535 (any
    8- or 16-bit image, or a block average of one), else its minimum to maximum onto 0..65535 (as brainreg's
    ``scale_and_convert_to_16_bits``); one pass over ``array``."""
    import dask.array as da

    values = array if isinstance(array, da.Array) else da.from_zarr(array)
    low, high = (float(v) for v in da.compute(values.min(), values.max()))
    if low >= 0 and high <= 65535:
        return 0.0, 1.0
    return low, (65535.0 / (high - low) if high > low else 1.0)


def _level_near(path: Path, spacing: float, unit: str) -> tuple[Any, Grid]:
    """The coarsest level of an image whose voxels are at most ``spacing`` (``unit``) on every axis (else level 0)."""
    from pipeline.ngff import read_image

    image = read_image(path).with_unit(unit)
    chosen = image.levels[0]
    for level in image.levels[1:]:
        if np.all(level.grid.spacing <= spacing * (1 + 1e-6)):
            chosen = level
    return chosen.array, chosen.grid


def _copy_standard(path: Path, target: Path, mapping: tuple[float, float]) -> None:
    """An atlas-space image (OME-Zarr level 0, on the atlas grid) as a uint16 TIFF stack, mapped by ``mapping``."""
    from pipeline.ngff import read_image

    level = read_image(path).levels[0]
    offset, scale = mapping

    def mapped(slab: Grid) -> np.ndarray:
        values = (_stored(level.array, level.grid)(slab).astype(np.float64) - offset) * scale
        return np.clip(np.rint(values), 0, 65535).astype(np.uint16)

    _write_tiff(target, level.grid, np.uint16, mapped)


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite`` and it is a folder this command wrote."""
    if not out.exists():
        if not out.parent.is_dir():
            raise InputError(f"the folder {out.parent} of the output {out} does not exist: create it first.")
        return
    ours = (out / "brainreg.json").is_file() and MARKER in json.loads((out / "brainreg.json").read_text())
    if not overwrite:
        raise InputError(f"output {out} already exists: give another -o, or --overwrite to replace it.")
    if not ours:
        raise InputError(
            f"output {out} is not a folder that export-brainreg wrote: it is not replaced; give another -o."
        )


def export_brainreg(job_folder: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the atlas job in ``job_folder`` as a brainreg output folder ``out`` (see the module docstring).

    Raises:
        InputError: ``job_folder`` is not a finished atlas job, or ``out`` exists (before anything is written).
    """
    job_folder, out = Path(job_folder), Path(out)
    job = open_job(job_folder)
    _check_output(out, overwrite)
    atlas = job.atlas
    resolution = np.asarray(atlas.resolution_um, dtype=np.float64)
    grid = downsampled_grid(job.brain_grid, resolution, atlas.orientation)
    tmp = temporary_sibling(out)
    tmp.mkdir()
    try:
        _write_folder(tmp, job_folder, job, grid)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("wrote brainreg folder %s (downsampled space %s at %s)", out, grid.shape, atlas.resolution_um)
    return out


def atlas_cut(folder: str | Path) -> str | None:
    """What part of the atlas the brainreg folder ``folder`` (written by :func:`export_brainreg`) was registered to,
    as a clause from its ``brainreg.json`` (e.g. ``"its left hemisphere (brain_geometry hemisphere_l), cut to
    ap=1000:12000 µm of its coordinates (atlas_range)"``), or None for the whole atlas."""
    meta = json.loads((Path(folder) / "brainreg.json").read_text())
    parts = []
    if meta.get("brain_geometry", "full") != "full":
        side = "left" if meta["brain_geometry"] == "hemisphere_l" else "right"
        parts.append(f"its {side} hemisphere (brain_geometry {meta['brain_geometry']})")
    if meta.get("atlas_range"):
        parts.append(f"cut to {range_text(meta['atlas_range'])} µm of its coordinates (atlas_range)")
    return ", ".join(parts) or None


def _write_folder(folder: Path, job_folder: Path, job: JobSpaces, grid: Grid) -> None:
    """Every file of the brainreg folder into ``folder``."""
    from pipeline.ngff import read_image

    work = folder / ".work"  # intermediate arrays computed once, read by two outputs; removed with the folder's rename
    work.mkdir()
    labels = _computed(work / "labels.npy", grid, np.uint32, _labels(job.labels_on_brain, job.labels_grid))
    _write_tiff(folder / "registered_atlas.tiff", grid, np.uint32, _stored(labels, grid))
    _write_tiff(folder / "boundaries.tiff", grid, np.uint8, _boundaries(labels, grid))
    hemispheres = read_image(job_folder / "brain.ome.zarr" / "labels" / "hemispheres").levels[0]
    _write_tiff(folder / "registered_hemispheres.tiff", grid, np.uint8, _labels(hemispheres.array, hemispheres.grid))
    positions = _computed(work / "positions.npy", grid, np.float32, _atlas_positions_mm(job), components=3)
    for axis in range(3):
        _write_tiff(folder / f"deformation_field_{axis}.tiff", grid, np.float32, _stored(positions[axis], grid))
    del labels, positions
    shutil.rmtree(work)
    spacing = float(grid.spacing.min())
    images = {"": job_folder / "brain.ome.zarr", **{f"_{name}": path for name, path in job.channels.items()}}
    for suffix, path in images.items():
        array, level_grid = _level_near(path, spacing, grid.unit)
        mapping = _uint16_map(array)
        _write_tiff(folder / f"downsampled{suffix}.tiff", grid, np.uint16, _intensity(array, level_grid, mapping))
        standard = job_folder / f"{path.name.split('.')[0]}_in_atlas_space.ome.zarr"
        if standard.is_dir():
            _copy_standard(standard, folder / f"downsampled_standard{suffix}.tiff", mapping)
    shutil.copyfile(job_folder / "volumes.csv", folder / "volumes.csv")
    voxel_sizes = job.brain_grid.spacing * unit_scale(job.brain_grid.unit, "micrometer")
    metadata = {
        "atlas": job.atlas.name,
        "orientation": nearest_orientation_code(job.brain_grid.direction),
        "voxel_sizes": [round(float(v), 6) for v in voxel_sizes],
        "brain_geometry": job.brain_geometry,
        "atlas_range": range_record(job.atlas_range),
        "atlas_orientation": job.atlas.orientation,
        MARKER: {"job": str(job_folder.resolve()), "downsampled_shape": list(grid.shape)},
    }
    (folder / "brainreg.json").write_text(json.dumps(metadata, indent=2) + "\n")
