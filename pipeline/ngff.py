"""OME-Zarr (NGFF) images, label images and displacement fields: read 0.4 / 0.5, write 0.5 (Zarr v3).

Layout written (DESIGN.md "Contracts"):

* A multiscale group with axes ``z, y, x`` (``c, z, y, x`` for fields), levels ``"0"``, ``"1"``, ...
  built by :func:`~patchmorph_core.source.pyramid_factors` (isotropic in world: fine axes are halved
  first; ome-zarr-py's integer factors would never halve z).
* Per-level ``scale``/``translation`` describe the image in its own axis-aligned frame: ``scale`` is
  the voxel size and ``translation = Dᵀ·origin`` where ``D`` is the grid's direction matrix, so the
  levels of the pyramid line up in any NGFF 0.5 viewer. The full index→world map (rotation, axis
  permutation or flip from an orientation code) is kept per level as an NGFF-0.6-style ``affine``
  transform (3×4 rows, ``(z, y, x)`` index → ``(z, y, x)`` world) in ``attrs["patchmorph"]``; our
  reader prefers it. With an identity direction both descriptions agree.
* **Chunks and shards.** One Dask task always writes whole *write units* (:func:`write_block`: the
  shard when the array is sharded, else the chunk) and no two tasks share one, so parallel writers
  never read-modify-write a chunk. Default chunks are 64³ (channel axis whole); arrays larger than
  :data:`SHARD_THRESHOLD_BYTES` are sharded 4×4×4 chunks per shard.
* **Completion.** :func:`write_image` / :func:`write_field` write to a hidden temporary sibling and
  rename it into place; :func:`create_image_array` (chunked writers) writes in place with
  ``attrs["patchmorph"]["complete"] = False`` until :func:`finish_image` builds the pyramid and sets
  it to True. :func:`read_image` refuses an incomplete output.
* **Fields** (:func:`write_field`): ``(3, Z, Y, X)`` float32, components ``(z, y, x)`` in the fixed
  image's world unit, mapping a fixed world point ``x`` to the moving world point ``x + u(x)``; the
  optional uncertainty image is the child image ``uncertainty`` inside the field group.

Reading defaults to zarr-python arrays (lazy: indexing reads only the touched chunks); pass
``backend="tensorstore"`` for TensorStore arrays. Both work with :func:`patchmorph_core.spatial.read_box`.
"""

from __future__ import annotations

import glob
import itertools
import logging
import math
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from ome_zarr_models.v05.axes import Axis
from ome_zarr_models.v05.image import ImageAttrs
from ome_zarr_models.v05.image_label import ImageLabelAttrs
from ome_zarr_models.v05.image_label_types import Label
from ome_zarr_models.v05.multiscales import Dataset, Multiscale
from tqdm import tqdm

from patchmorph_core.errors import InputError
from patchmorph_core.source import Level, MultiscaleImage, downsample, downsampled_grid, pyramid_factors
from patchmorph_core.spatial import (
    AXES,
    Grid,
    check_spacing,
    length_unit,
    orientation_code,
    orientation_matrix,
    read_box,
    unit_scale,
)
from pipeline.integrity import ARRAY_OPTIONS, EVERY_CHUNK_WRITTEN, VerifiedStore, writable
from pipeline.resume import WRITE_ID, StageRecords, check_replaceable, stored_attribute, temporary_sibling

logger = logging.getLogger(__name__)

NGFF_VERSION = "0.5"
"""NGFF version written."""

WORLD_FRAME = (
    "index->world affine; world components (z, y, x); for anatomical images RAS+ in (z, y, x) order: "
    "0=superior, 1=anterior, 2=right"
)
"""Description of the world frame stored in ``attrs["patchmorph"]["world_frame"]``."""

FIELD_DIRECTION = "fixed->moving: a fixed-space world point x maps to the moving-space world point x + u(x)"
"""Description of a displacement field's direction stored in its metadata."""

DEFAULT_CHUNK = 64
"""Default chunk edge (voxels) along each spatial axis."""

SHARD_THRESHOLD_BYTES = 1 << 30
"""Arrays larger than this are sharded (4×4×4 chunks per shard) to keep the file count low."""

COARSEST_MAX_SIZE = 64
"""The automatic pyramid stops at the first level whose largest axis is at most this many voxels."""

MAX_LEVELS = 10
"""Upper bound on the number of pyramid levels."""

Backend = Literal["zarr", "tensorstore"]

RFC4_VALUES: dict[str, str] = {
    "l": "left-to-right",
    "r": "right-to-left",
    "a": "anterior-to-posterior",
    "p": "posterior-to-anterior",
    "s": "superior-to-inferior",
    "i": "inferior-to-superior",
}
"""RFC-4 anatomical orientation of an axis by the letter of its origin side (orientation codes, see
:mod:`patchmorph_core.spatial`): the axis runs from that side to the opposite one."""

_RFC4_ORIGIN: dict[str, str] = {
    "left": "l",
    "right": "r",
    "anterior": "a",
    "rostral": "a",
    "posterior": "p",
    "caudal": "p",
    "superior": "s",
    "dorsal": "s",
    "inferior": "i",
    "ventral": "i",
}
"""Origin word of an RFC-4 value (``"<origin>-to-<end>"``) → orientation-code letter (dorsal/ventral and
rostral/caudal are the superior/inferior and anterior/posterior of the project's world frame)."""

ASSUMED = "assumed"
"""``attrs["patchmorph"]["orientation_source"]`` of an image whose anatomical orientation nobody gave: its
axes were taken as the world axes, and no RFC-4 orientation is written for it."""


# -- layout ---------------------------------------------------------------------------------------------
def choose_layout(
    shape: Sequence[int], dtype: np.dtype | type, chunks: Sequence[int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Chunk and shard shapes for an array of ``shape`` (``(Z, Y, X)`` or ``(C, Z, Y, X)``).

    Args:
        shape: array shape; a leading channel axis (4-D) is kept whole in every chunk.
        dtype: array dtype (for the sharding size threshold).
        chunks: spatial chunk shape ``(z, y, x)``; default :data:`DEFAULT_CHUNK` per axis.

    Returns:
        ``(chunks, shards)``; chunks are clipped to the shape; ``shards`` is None or a multiple of chunks.
    """
    spatial = tuple(int(s) for s in shape[-3:])
    wanted = (DEFAULT_CHUNK,) * 3 if chunks is None else tuple(int(c) for c in chunks)
    if len(wanted) != 3 or any(c < 1 for c in wanted):
        raise InputError(f"chunk shape {chunks} is invalid: give three positive sizes (z, y, x).")
    spatial_chunks = tuple(min(c, s) for c, s in zip(wanted, spatial, strict=True))
    lead = tuple(int(s) for s in shape[:-3])
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    shards = None
    if nbytes > SHARD_THRESHOLD_BYTES:
        spatial_shards = tuple(
            min(4 * c, -(-s // c) * c) for c, s in zip(spatial_chunks, spatial, strict=True)
        )
        shards = lead + spatial_shards
    return lead + spatial_chunks, shards


def layout_block(shape: Sequence[int], dtype: np.dtype | type, chunks: Sequence[int] | None = None) -> tuple[int, ...]:
    """The unit one writer must write whole in an array of ``shape`` laid out by :func:`choose_layout` with
    ``chunks``: its shard shape when sharded, else its chunk shape (:func:`write_block` of the array written)."""
    layout_chunks, shards = choose_layout(shape, dtype, chunks)
    return shards or layout_chunks


def write_block(array: zarr.Array) -> tuple[int, ...]:
    """The unit one writer must write whole: the shard shape of a sharded array, else its chunk shape."""
    return tuple(array.shards) if array.shards is not None else tuple(array.chunks)


# -- metadata -------------------------------------------------------------------------------------------
def _axes_meta(unit: str, channels: bool, orientation: str | None) -> list[Axis]:
    """NGFF axes; spatial axes carry their RFC-4 ``orientation`` when the image's orientation is known."""
    axes = [Axis(name="c", type="channel")] if channels else []
    for k, name in enumerate(AXES):
        extra = {} if orientation is None else {"orientation": {"type": "anatomical", "value": RFC4_VALUES[orientation[k]]}}
        axes.append(Axis(name=name, type="space", unit=unit, **extra))
    return axes


def rfc4_orientation(axes: Sequence[Any]) -> str | None:
    """The orientation code given by the RFC-4 ``orientation`` of NGFF ``axes`` ending in z, y, x.

    Returns:
        Three letters (e.g. ``"asr"``), or None unless every spatial axis names a known anatomical direction.
    """
    letters = ""
    for axis in list(axes)[-3:]:
        value = axis.get("orientation", {}).get("value") if isinstance(axis, Mapping) else None
        origin = _RFC4_ORIGIN.get(str(value).split("-to-")[0].lower()) if isinstance(value, str) else None
        if origin is None:
            return None
        letters += origin
    try:
        orientation_matrix(letters)
    except InputError:
        return None
    return letters


def image_orientation(path: str | Path) -> str | None:
    """The anatomical orientation code of an OME-Zarr image (from its RFC-4 axes), or None when unknown."""
    attrs = dict(_open_group(path).attrs)
    return rfc4_orientation(_multiscale(attrs, str(path)).get("axes", ()))


def set_attribute(path: str | Path, key: str, value: Any) -> None:
    """Set ``attrs["patchmorph"][key]`` of the OME-Zarr group at ``path`` (its other attributes kept)."""
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["patchmorph"] = {**dict(group.attrs.get("patchmorph", {})), key: value}


def regrid_image(path: str | Path, grid: Grid, extra_attrs: Mapping[str, Any]) -> None:
    """Give the single-image group at ``path`` another level-0 ``grid`` over the same voxels (another voxel size,
    unit or orientation read for the same data): its coarser levels get the grids their block sizes give
    (:func:`~patchmorph_core.source.downsampled_grid`), ``extra_attrs`` are merged into ``attrs["patchmorph"]``
    and a new ``write_id`` is drawn (a new identity, as for any new write); no voxel is read or written.

    Raises:
        ValueError: ``grid``'s shape is not level 0's, or the group holds more than its levels (labels).
    """
    group = zarr.open_group(str(path), mode="r+")
    old = _level_grids(group)
    if tuple(grid.shape) != tuple(old[0].shape) or "labels" in group:
        raise ValueError(f"{path}: cannot regrid a {old[0].shape} image with labels to {grid.shape}")
    grids = [grid]
    for level in old[1:]:
        grids.append(downsampled_grid(grid, np.rint(level.spacing / old[0].spacing).astype(int), level.shape))
    attrs = dict(group.attrs)
    meta = {**attrs["patchmorph"], **extra_attrs, WRITE_ID: uuid.uuid4().hex}
    group.attrs.update(
        _build_attrs(
            grids,
            name=attrs["ome"]["multiscales"][0].get("name", "image"),
            labels=bool(meta["labels"]),
            channels=False,
            complete=bool(meta["complete"]),
            extra_attrs=meta,
        )
    )


def is_label_image(path: str | Path) -> bool:
    """Whether an OME-Zarr image is a label image (NGFF ``image-label`` metadata, 0.4 or 0.5)."""
    attrs = dict(_open_group(path).attrs)
    return "image-label" in attrs.get("ome", attrs) or _own_labels(attrs)


def has_label_pyramid(path: str | Path) -> bool:
    """Whether an OME-Zarr image's coarser levels keep its label ids (a label image PatchMorph wrote: every other
    voxel). Another tool's pyramid may average or interpolate them (ome-zarr-py's default ``resize`` does) into
    values that are no label, so only the finest level of such an image is a label map."""
    return _own_labels(dict(_open_group(path).attrs))


def _own_labels(attrs: Mapping[str, Any]) -> bool:
    """Whether an image's attributes ``attrs`` hold PatchMorph's mark of a label image."""
    return bool(attrs.get("patchmorph", {}).get("labels", False))


def warn_without_orientation(path: str | Path, role: str) -> bool:
    """Log a warning when an OME-Zarr image carries no anatomical orientation (no RFC-4 axes, and no
    orientation PatchMorph was given when it converted it). Returns True when it warned."""
    meta = dict(_open_group(path).attrs).get("patchmorph", {})
    if image_orientation(path) is not None or meta.get("orientation_source") not in (None, ASSUMED):
        return False
    logger.warning(
        "the %s image %s carries no anatomical orientation: its axes are taken as z -> superior, y -> anterior, "
        "x -> right; if that is wrong the result comes out rotated: convert it with --orientation (find the code "
        "with 'patchmorph convert --preview')",
        role,
        path,
    )
    return True


def written_by_patchmorph(path: str | Path) -> bool:
    """Whether an OME-Zarr image was written by PatchMorph (its ``patchmorph`` attributes): its pyramid then holds
    PatchMorph's block means (a label image's: every other voxel), which the registration and ``warp`` expect."""
    return "patchmorph" in dict(_open_group(path).attrs)


def converted_pyramid(
    image: MultiscaleImage, path: str | Path, role: str, max_bytes: int, target: Grid | None = None
) -> MultiscaleImage:
    """``image`` (read from ``path``, an image another tool wrote) with the pyramid ``convert`` writes for it, in
    memory: its level 0 read whole, its coarser levels the block means :func:`finish_image` computes from it (the
    same levels and factors, :func:`_downsample_block` rounding each back to :func:`level_dtype`), so it samples the
    same values as its converted copy. Another tool's own pyramid is left out: it is smoothed otherwise
    (ome-zarr-py's anti-aliased resize halving y and x only) or missing, and the registration's coarse stages read
    the pyramid (measured: docs/formats.md, *Other tools' OME-Zarr*).

    Args:
        image: the image as :func:`read_image` opened it (levels ``(Z, Y, X)``, finest first).
        path, role: how a refusal names it (``"fixed image"``, ``"moving image"``, ``"image"``).
        max_bytes: the most the pyramid may take in memory.
        target: the grid the image is sampled onto (a warp's), if only one: the pyramid stops at the level
            :meth:`~patchmorph_core.source.MultiscaleImage.level_for_grid` reads for it, and when that is level 0 the
            image is returned with its level 0 alone, unread (any size).

    Raises:
        InputError: the pyramid would take more than ``max_bytes``: nothing is read, the sentence names ``convert``.
    """
    level = image.levels[0]
    steps = pyramid_factors(level.grid.spacing, level.grid.shape, _auto_levels(level.grid))[1:]
    grids = [level.grid]
    for f in steps:
        grids.append(downsampled_grid(grids[-1], f, [-(-n // k) for n, k in zip(grids[-1].shape, f, strict=True)]))
    if target is not None:  # the converted copy's level for target: the grids alone pick it
        chosen = MultiscaleImage(tuple(Level(level.array, g) for g in grids)).level_for_grid(target)
        steps = steps[: [g.shape for g in grids].index(chosen.grid.shape)]  # each level has its own shape
    if not steps:
        return MultiscaleImage(image.levels[:1], image.name)
    dtype = level_dtype(level.array.dtype, labels=False)
    nbytes = int(np.prod(level.grid.shape)) * np.dtype(level.array.dtype).itemsize
    nbytes += sum(int(np.prod(g.shape)) for g in grids[1 : len(steps) + 1]) * dtype.itemsize
    if nbytes > max_bytes:
        raise InputError(
            f"the {role} {path} was written by another tool, whose pyramid PatchMorph cannot use, and is too "
            f"large ({nbytes / 2**20:.0f} MiB) to build PatchMorph's in memory (at most {max_bytes / 2**20:.0f} MiB): "
            f"convert it first ('patchmorph convert {path} OUT.ome.zarr', which keeps its geometry) and give the "
            "converted image."
        )
    levels = [Level(read_box(level.array, (slice(None),) * 3), level.grid)]
    for f, grid in zip(steps, grids[1 : len(steps) + 1], strict=True):
        levels.append(Level(_downsample_block(levels[-1].array, f, False, dtype), grid))
    logger.info("the %s %s was written by another tool: its level 0 and PatchMorph's pyramid of it are read", role, path)
    return MultiscaleImage(tuple(levels), image.name)


def _affine_rows(grid: Grid) -> list[list[float]]:
    """NGFF-0.6-style affine: the 3×4 top rows of the index→world matrix, as nested lists."""
    return [[float(v) for v in row] for row in grid.affine[:3]]


def _dataset_meta(path: str, grid: Grid, channels: bool) -> Dataset:
    """NGFF 0.5 dataset entry: scale/translation in the grid's axis-aligned frame (see module doc)."""
    scale = [float(s) for s in grid.spacing]
    translation = [float(t) for t in grid.direction.T @ grid.origin]
    if channels:
        scale, translation = [1.0, *scale], [0.0, *translation]
    return Dataset.build(path=path, scale=scale, translation=translation)


def _build_attrs(
    grids: Sequence[Grid],
    *,
    name: str,
    labels: bool,
    channels: bool,
    complete: bool,
    extra_attrs: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Group attributes: the ``ome`` block (NGFF 0.5) and the project's ``patchmorph`` block."""
    unit = grids[0].unit
    assumed = (extra_attrs or {}).get("orientation_source") == ASSUMED
    orientation = None if assumed else orientation_code(grids[0].direction)
    multiscale = Multiscale(
        name=name,
        axes=_axes_meta(unit, channels, orientation),
        datasets=tuple(_dataset_meta(str(i), g, channels) for i, g in enumerate(grids)),
    )
    model: ImageAttrs | ImageLabelAttrs = (
        ImageLabelAttrs(version=NGFF_VERSION, multiscales=[multiscale], image_label=Label(version=NGFF_VERSION))
        if labels
        else ImageAttrs(version=NGFF_VERSION, multiscales=[multiscale])
    )
    ome = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    patchmorph: dict[str, Any] = dict(extra_attrs or {})
    patchmorph.update(
        {
            "complete": complete,
            "unit": unit,
            "world_frame": WORLD_FRAME,
            "labels": labels,
            EVERY_CHUNK_WRITTEN: True,
            "coordinateTransformations": [
                {"type": "affine", "affine": _affine_rows(g), "input": str(i), "output": "world"}
                for i, g in enumerate(grids)
            ],
        }
    )
    return {"ome": ome, "patchmorph": patchmorph}


# -- displacement components in the field grid's frame ------------------------------------------------------
FIELD_FRAME = "grid"
"""``attrs["patchmorph"]["displacement_frame"]`` of a field whose stored component ``k`` is the displacement
along the field grid's array axis ``k`` (in its unit) — the frame of the image's own NGFF scale and
translation, so a reader of the standard metadata alone (scale, translation, and each axis's RFC-4
orientation to place it in the anatomy) reads points and displacements in one frame. PatchMorph's readers
turn them into world components (``world = D · stored``, ``D`` the grid's direction cosines); fields
without the key store world components."""


def _is_field(extra_attrs: Mapping[str, Any] | None) -> bool:
    return (extra_attrs or {}).get("kind") == "displacement_field"


@dataclass(frozen=True)
class GridFrameField:
    """A ``(3, Z, Y, X)`` field array stored in its grid's frame (:data:`FIELD_FRAME`), seen in world
    components: indexing returns world displacements, assignment (all three components) stores them.

    Attributes:
        array: the stored array (zarr or TensorStore), components along the grid's axes.
        direction: ``(3, 3)`` direction cosines of the grid (columns: world vectors of its axes).
    """

    array: Any
    direction: np.ndarray

    @property
    def ndim(self) -> int:
        return len(self.array.shape)

    def __getattr__(self, name: str) -> Any:  # shape, dtype, chunks, shards, ... of the stored array
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.array, name)

    def _spatial(self, key: Any) -> tuple[Any, tuple[Any, ...]]:
        """Component key and spatial key of an index into ``(c, z, y, x)``."""
        parts = list(key) if isinstance(key, tuple) else [key]
        if any(p is Ellipsis for p in parts):
            at = parts.index(Ellipsis)
            parts[at : at + 1] = [slice(None)] * (self.ndim - len(parts) + 1)
        parts += [slice(None)] * (self.ndim - len(parts))
        return parts[0], tuple(parts[1:])

    def __getitem__(self, key: Any) -> np.ndarray:
        component, spatial = self._spatial(key)
        stored = read_box(self.array, (slice(None), *spatial)).astype(np.float32, copy=False)
        world = np.tensordot(self.direction.astype(np.float32), stored, axes=(1, 0))
        return world[component]

    def __setitem__(self, key: Any, value: Any) -> None:
        component, spatial = self._spatial(key)
        if range(3)[component] != range(3):
            raise ValueError("a field in its grid's frame is written all three components at a time")
        stored = np.tensordot(self.direction.T, np.asarray(value, dtype=np.float64), axes=(1, 0))
        self.array[(slice(None), *spatial)] = stored.astype(self.array.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self[...]
        return values if dtype is None else values.astype(dtype)


def field_view(array: Any, grid: Grid, meta: Mapping[str, Any]) -> Any:
    """``array`` seen in world components (a :class:`GridFrameField` when it is stored in its grid's frame
    and that frame is not the world's)."""
    if meta.get("displacement_frame") != FIELD_FRAME or np.allclose(grid.direction, np.eye(3)):
        return array
    return GridFrameField(array, grid.direction)


# -- output paths ---------------------------------------------------------------------------------------
def check_output(path: str | Path, overwrite: bool) -> Path:
    """The output path; InputError if it exists and ``overwrite`` is False, or is not a Zarr store
    (:func:`~pipeline.resume.check_replaceable`)."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise InputError(
            f"output {str(out)!r} already exists: pass --overwrite (overwrite=True) or choose another path."
        )
    check_replaceable(out)
    if not out.parent.exists():
        raise InputError(f"output folder {str(out.parent)!r} does not exist: create it first.")
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place, removing an older ``out`` only after the new one is in place, and the
    older copies that a replacement killed half-way left hidden beside it (``.<name>.old-*``). An ``out`` that was a
    symbolic link is replaced as a link: the link goes, never what it points to."""
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
    tmp.rename(out)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.old-*"):
        shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()


# -- writing --------------------------------------------------------------------------------------------
def create_image_array(
    path: str | Path,
    shape: Sequence[int],
    grid: Grid,
    dtype: np.dtype | type,
    chunks: Sequence[int] | None = None,
    *,
    channels: int | None = None,
    name: str = "image",
    labels: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    extra_attrs: Mapping[str, Any] | None = None,
) -> zarr.Array:
    """Create an NGFF 0.5 group with an empty level-0 array, for write-once chunked output.

    Each Dask task writes whole :func:`write_block` units of the returned array, each exactly once;
    then call :func:`finish_image` to build the pyramid and mark the output complete.

    Args:
        path: output group (``.zarr`` folder).
        shape: ``(Z, Y, X)`` of level 0 (must equal ``grid.shape``).
        grid: level-0 grid.
        dtype: array dtype.
        chunks: spatial chunk shape ``(z, y, x)``; see :func:`choose_layout`.
        channels: number of leading channel components (3 for displacement fields), or None.
        name: multiscale name.
        labels: write NGFF ``image-label`` metadata.
        overwrite: replace an existing output.
        resume: reopen an existing *incomplete* output of the same shape and dtype instead of failing.
        extra_attrs: merged into ``attrs["patchmorph"]``.

    Returns:
        The level-0 ``zarr.Array`` (``(Z, Y, X)`` or ``(C, Z, Y, X)``), filled with zeros until written.
    """
    out = Path(path)
    if tuple(int(s) for s in shape) != grid.shape:
        raise InputError(f"array shape {tuple(shape)} does not match its grid shape {grid.shape}.")
    full_shape = ((channels,) if channels else ()) + grid.shape
    if resume and out.exists():
        group = zarr.open_group(str(out), mode="r+")
        meta = dict(group.attrs).get("patchmorph", {})
        array = writable(group["0"])
        if meta.get("complete") is False and array.shape == full_shape and array.dtype == np.dtype(dtype):
            logger.debug("reopened incomplete output %s (its chunks without a record are written again)", out)
            return field_view(array, grid, meta)
        raise InputError(
            f"cannot resume {str(out)!r}: it is complete or its shape/dtype differ; pass overwrite=True."
        )
    check_output(out, overwrite)
    if out.exists():
        shutil.rmtree(out)
    chunk_shape, shard_shape = choose_layout(full_shape, dtype, chunks)
    group = zarr.open_group(str(out), mode="w", zarr_format=3)
    if _is_field(extra_attrs):
        extra_attrs = {**(extra_attrs or {}), "displacement_frame": FIELD_FRAME}
    identity = {**dict(extra_attrs or {}), WRITE_ID: uuid.uuid4().hex}
    group.attrs.put(
        _build_attrs([grid], name=name, labels=labels, channels=bool(channels), complete=False, extra_attrs=identity)
    )
    array = group.create_array(
        "0",
        shape=full_shape,
        chunks=chunk_shape,
        shards=shard_shape,
        dtype=dtype,
        fill_value=0,
        dimension_names=(["c"] if channels else []) + list(AXES),
        **ARRAY_OPTIONS,
    )
    return field_view(array, grid, extra_attrs or {})


def _store(
    data: Any,
    target: zarr.Array,
    desc: str,
    client: Any = None,
    records: StageRecords | None = None,
    progress: bool = True,
) -> None:
    """Write a numpy or dask array into ``target`` whole write-block by write-block (no shared chunks).

    Works through one slab of write blocks along ``z`` at a time (blocks of a slab in parallel), so
    memory and the task graph computed at once are bounded by a slab, never by the volume. The blocks run
    on ``client`` (a ``distributed.Client``) when given, else on threads of this process: never on
    whatever client Dask's process-wide default happens to be (another thread's, perhaps closing). With
    ``records`` each slab ``i`` is recorded as chunk ``(i, 0, 0)`` once written whole, and a recorded slab is
    not written again (a resumed write). ``progress`` shows a tqdm bar of the slabs named ``desc`` (the switch the
    other long steps have, e.g. :func:`pipeline.chunked.run_chunked`'s).
    """
    import dask.array as da  # here, not at the top: reading and writing a field in place need no Dask

    block = write_block(target)
    darr = data if isinstance(data, da.Array) else da.from_array(data, chunks=block)
    darr = darr.astype(target.dtype).rechunk(block)
    z_axis = darr.ndim - 3
    depth = block[z_axis]
    starts = range(0, darr.shape[z_axis], depth)
    with tqdm(starts, desc=desc, unit="slab", leave=False, disable=not progress) as bar:  # cleared also when a slab fails
        for index, start in enumerate(bar):
            if records is not None and records.is_done((index, 0, 0)):
                continue
            stop = min(start + depth, darr.shape[z_axis])
            region = (slice(None),) * z_axis + (slice(start, stop),)
            da.store(darr[region], target, regions=region, lock=False, scheduler=client or "threads")
            if records is not None:
                records.mark_done((index, 0, 0), {"planes": [start, stop]})


DOWNSAMPLE_SLAB_PLANES = 8
"""Output planes computed at a time by :func:`_downsample_block`, so its float32 temporaries stay a small
slab of the block (a 512³ uint16 source block would otherwise need 0.5 GiB of float32)."""


def _downsample_block(
    block: np.ndarray, factors: tuple[int, int, int], labels: bool, dtype: np.dtype
) -> np.ndarray:
    """Downsample one ``(Z, Y, X)`` or ``(C, Z, Y, X)`` block; integers are rounded back to ``dtype``.

    Works through :data:`DOWNSAMPLE_SLAB_PLANES` output planes at a time into an output of ``dtype``.
    """
    if block.ndim == 4:
        return np.stack([_downsample_block(b, factors, labels, dtype) for b in block])
    fz = int(factors[0])
    shape = tuple(-(-n // int(f)) for n, f in zip(block.shape, factors, strict=True))
    out = np.empty(shape, dtype=dtype)
    step = DOWNSAMPLE_SLAB_PLANES
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        part = downsample(block[start * fz : stop * fz], factors, labels=labels)
        if np.issubdtype(dtype, np.integer) and not labels:
            info = np.iinfo(dtype)
            part = np.clip(np.rint(part), info.min, info.max)
        out[start:stop] = part
    return out


def _downsample_unit(
    unit: np.ndarray,
    source: Any,
    factors: tuple[int, int, int],
    labels: bool,
    chunks: tuple[int, ...],
    block_info: dict | None = None,
) -> np.ndarray:
    """One write unit of a new pyramid level, from ``source`` (the finer level), chunk by chunk.

    Args:
        unit: placeholder block whose shape and position (``block_info``) define the write unit.
        source: the finer level (array-like indexed like the new level, lead axes first).
        factors: downsampling factors of the three spatial axes.
        labels: strided pick (labels) or block mean (intensities).
        chunks: the new level's storage chunk shape (the step of the inner loop).
    """
    if block_info is None:
        raise ValueError("_downsample_unit needs dask's block_info (call it through map_blocks)")
    location = block_info[None]["array-location"]
    out = np.empty(unit.shape, dtype=unit.dtype)
    n_lead = unit.ndim - 3
    spatial = location[n_lead:]
    steps = chunks[n_lead:]
    starts = [range(lo, hi, step) for (lo, hi), step in zip(spatial, steps, strict=True)]
    for corner in itertools.product(*starts):
        stop = [min(c + s, hi) for c, s, (_, hi) in zip(corner, steps, spatial, strict=True)]
        src = tuple(slice(c * f, e * f) for c, e, f in zip(corner, stop, factors, strict=True))
        block = np.asarray(source[(slice(None),) * n_lead + src])
        dst = tuple(slice(c - lo, e - lo) for c, e, (lo, _) in zip(corner, stop, spatial, strict=True))
        out[(slice(None),) * n_lead + dst] = _downsample_block(block, factors, labels, unit.dtype)
    return out


def _auto_levels(grid: Grid) -> int:
    """Number of levels until the largest axis is at most :data:`COARSEST_MAX_SIZE` voxels."""
    shape = np.asarray(grid.shape)
    factors = pyramid_factors(grid.spacing, grid.shape, MAX_LEVELS)
    for count, f in enumerate(factors, start=1):
        shape = -(-shape // np.asarray(f))
        if shape.max() <= COARSEST_MAX_SIZE:
            return count
    return len(factors)


def _level_grids(group: zarr.Group) -> list[Grid]:
    meta = dict(group.attrs)["patchmorph"]
    unit = meta["unit"]
    grids = []
    for entry in meta["coordinateTransformations"]:
        affine = np.vstack([np.asarray(entry["affine"], dtype=np.float64), [0.0, 0.0, 0.0, 1.0]])
        grids.append(Grid(group[entry["input"]].shape[-3:], affine, unit))
    return grids


def pyramid_arrays(
    path: str | Path, n_levels: int | None = None, fresh: bool = True
) -> list[tuple[zarr.Array, tuple[int, int, int]]]:
    """The arrays of pyramid levels 1.. of a group made by :func:`create_image_array`, each with its
    downsampling factors ``(fz, fy, fx)`` relative to the level before.

    Args:
        path: the group.
        n_levels: total number of levels (default: until the largest axis is at most
            :data:`COARSEST_MAX_SIZE`).
        fresh: create every level anew (empty); else open the levels that exist with the right shape (e.g.
            made by an earlier, interrupted run of a writer that writes the first levels with level 0, as
            ``warp`` does per write unit: :func:`downsample_unit`) and create only the missing ones.
    """
    group = zarr.open_group(str(path), mode="r+")
    grid = _level_grids(group)[0]
    count = _auto_levels(grid) if n_levels is None else max(1, int(n_levels))
    previous = group["0"]
    dtype = level_dtype(previous.dtype, bool(dict(group.attrs).get("patchmorph", {}).get("labels", False)))
    unit = np.asarray(write_block(previous)[-3:], dtype=np.int64)
    scale = np.ones(3, dtype=np.int64)
    levels = []
    for index, factors in enumerate(pyramid_factors(grid.spacing, grid.shape, count)[1:], start=1):
        shape = tuple(-(-s // f) for s, f in zip(previous.shape[-3:], factors, strict=True))
        full = previous.shape[:-3] + shape
        scale = scale * np.asarray(factors, dtype=np.int64)
        existing = None if fresh else group.get(str(index))
        if isinstance(existing, zarr.Array) and tuple(existing.shape) == full and existing.dtype == dtype:
            target = writable(existing)
        else:
            chunk_shape, shard_shape = choose_layout(full, dtype, previous.chunks[-3:])
            shard_shape = _shards_under(shard_shape, chunk_shape, unit, scale)
            target = group.create_array(
                str(index),
                shape=full,
                chunks=chunk_shape,
                shards=shard_shape,
                dtype=dtype,
                fill_value=0,
                dimension_names=list(previous.metadata.dimension_names),
                overwrite=True,
                **ARRAY_OPTIONS,
            )
        levels.append((target, tuple(int(f) for f in factors)))
        previous = target
    return levels  # type: ignore[return-value]


def _shards_under(
    shards: tuple[int, ...] | None, chunks: tuple[int, ...], unit: np.ndarray, scale: np.ndarray
) -> tuple[int, ...] | None:
    """A sharded pyramid level's shard shape, made no larger along an axis than the part of a level-0 write
    unit it lies under (``unit // scale``, ``scale`` the level's factors from level 0) when that part is whole
    chunks: then the task that writes a unit of level 0 writes whole shards of the level too (``warp``'s
    :func:`~pipeline.warp.task_levels`), at any image size."""
    if shards is None:
        return None
    lead, spatial = tuple(shards[:-3]), list(shards[-3:])
    for k in range(3):
        part, chunk = int(unit[k] // scale[k]), int(chunks[-3 + k])
        if unit[k] % scale[k] == 0 and part % chunk == 0 and part < spatial[k]:
            spatial[k] = part
    return lead + tuple(spatial)


def downsample_unit(values: np.ndarray, factors: tuple[int, int, int], labels: bool) -> np.ndarray:
    """One level down from ``values`` (a ``(Z, Y, X)`` or ``(C, Z, Y, X)`` block of a level whose first voxel is a
    multiple of ``factors``, one integer per spatial axis ``(z, y, x)``): block mean rounded back to the dtype
    (intensities) or strided pick (labels), as :func:`finish_image` computes that level; ``ceil(n / f)`` voxels
    per spatial axis, ``values``' dtype."""
    return _downsample_block(values, factors, labels, values.dtype)


def finish_image(
    path: str | Path, n_levels: int | None = None, client: Any = None, written: int = 0, progress: bool = True
) -> Path:
    """Build the pyramid of a group made by :func:`create_image_array` and mark it complete.

    Level ``n`` is computed from level ``n-1`` in blocks aligned to level ``n``'s write units (one
    task per unit, block mean for intensities / strided pick for labels). The tasks run on ``client``
    (pass the run's client, as ``register`` and ``warp`` do, so that the pyramid of a large output is
    built on the workers), else on threads of the calling process.

    Args:
        path: the group.
        n_levels: total number of levels (default: until the largest axis is at most
            :data:`COARSEST_MAX_SIZE`).
        client: the ``distributed.Client`` to build the levels on, or None (threads).
        written: levels 1..``written`` were written already, whole, by the writer of level 0 (the arrays of
            :func:`pyramid_arrays` with ``fresh=False``); only the levels after them are built here.
        progress: show a progress bar per level built.

    Returns:
        ``path``.
    """
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs)
    meta = attrs["patchmorph"]
    labels = bool(meta.get("labels", False))
    grids = _level_grids(group)[:1]
    channels = group["0"].ndim == 4
    previous = group["0"]
    for index, (target, factors) in enumerate(pyramid_arrays(path, n_levels, fresh=written == 0), start=1):
        if index > written:
            import dask.array as da

            # one task per write unit of the new level; it reads the source one storage chunk of the new
            # level at a time (2x that region), so its memory is one write unit plus a chunk's worth
            units = da.empty(target.shape, chunks=write_block(target), dtype=target.dtype)
            down = units.map_blocks(
                _downsample_unit, previous, factors, labels, tuple(target.chunks), dtype=target.dtype
            )
            _store(down, target, desc=f"pyramid level {index}", client=client, progress=progress)
        grids.append(downsampled_grid(grids[-1], factors, target.shape[-3:]))
        previous = target
    level0 = group["0"]
    name = attrs["ome"]["multiscales"][0].get("name", "image")
    extra = {
        k: v for k, v in meta.items() if k not in ("complete", "unit", "world_frame", "labels", EVERY_CHUNK_WRITTEN)
    }
    extra.pop("coordinateTransformations", None)
    group.attrs.put(
        _build_attrs(grids, name=name, labels=labels, channels=channels, complete=True, extra_attrs=extra)
    )
    logger.info("finished %s: %d levels, level-0 shape %s", path, len(grids), level0.shape)
    return Path(path)


def _write_group(
    out: Path,
    data: Any,
    grid: Grid,
    *,
    channels: int | None,
    name: str,
    labels: bool,
    chunks: Sequence[int] | None,
    extra_attrs: Mapping[str, Any] | None,
    n_levels: int | None,
    progress: bool,
    client: Any = None,
) -> None:
    """Create, fill and finish one group at ``out`` (a temporary path; progress names ``name``), on ``client``'s
    workers when given."""
    array = create_image_array(
        out,
        grid.shape,
        grid,
        _storage_dtype(data.dtype),
        chunks,
        channels=channels,
        name=name,
        labels=labels,
        extra_attrs=extra_attrs,
    )
    _store(data, array, desc=f"writing {name}", client=client, progress=progress)
    finish_image(out, n_levels=n_levels, client=client, progress=progress)


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.uint8) if np.dtype(dtype) == np.bool_ else np.dtype(dtype)


def level_dtype(dtype: np.dtype | type, labels: bool) -> np.dtype:
    """The dtype of an image's pyramid levels after the first, and of a warp of it: float32 for an 8-bit or
    boolean intensity image, whose block means and interpolated values would otherwise round away (a mask
    covering 5 % of the tissue to nearly nothing, a probability map in steps of 1/255 to coarser ones); every
    other image keeps its dtype (label ids are picked, not averaged; a 16-bit or wider image's rounding moves
    a value by at most half a grey level, which matters only for values near 1: a mask or counts stored in 16
    bits are to be given as 8-bit or float32)."""
    dtype = np.dtype(dtype)
    small = dtype == np.bool_ or (np.issubdtype(dtype, np.integer) and dtype.itemsize == 1)
    return np.dtype(np.float32) if small and not labels else _storage_dtype(dtype)


def write_image(
    path: str | Path,
    data: Any,
    grid: Grid,
    *,
    name: str = "image",
    labels: bool = False,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    extra_attrs: Mapping[str, Any] | None = None,
    n_levels: int | None = None,
    fingerprint: dict[str, Any] | None = None,
    progress: bool = True,
    client: Any = None,
) -> Path:
    """Write a ``(Z, Y, X)`` numpy or dask array as an NGFF 0.5 multiscale image (or label image).

    Args:
        path: output group (``.zarr`` folder); written to a hidden sibling and renamed into place, so ``path``
            never holds a half-written image.
        data: ``(Z, Y, X)`` array on ``grid`` (dask arrays are streamed block by block).
        grid: level-0 grid (shape, index→world affine, unit).
        name: multiscale name.
        labels: label image (NGFF ``image-label``; pyramid by strided pick, dtype kept).
        chunks: spatial chunk shape; see :func:`choose_layout`.
        overwrite: replace an existing output (else InputError).
        extra_attrs: merged into ``attrs["patchmorph"]`` (e.g. provenance).
        n_levels: pyramid levels (default: automatic, see :func:`finish_image`).
        fingerprint: for a source that takes hours to read (a terabyte plane folder), what identifies this write
            (the source's identity and the settings): level 0 goes into the sibling ``.<name>.converting`` slab by
            slab, each slab recorded once whole (:func:`_write_resumable`), and a write killed part-way and started
            again with the same fingerprint keeps the recorded slabs. None: a sibling of this process only.
        progress: show a progress bar per level written.
        client: the ``distributed.Client`` whose workers compute and write the blocks (and the pyramid), or None
            (threads of this process).

    Returns:
        The output path.
    """
    out = check_output(path, overwrite)
    if tuple(data.shape) != grid.shape:
        raise InputError(f"image shape {tuple(data.shape)} does not match its grid shape {grid.shape}.")
    layout = {
        "name": name, "labels": labels, "chunks": chunks, "extra_attrs": extra_attrs, "n_levels": n_levels,
        "progress": progress, "client": client,
    }  # fmt: skip
    if fingerprint is not None:
        _write_resumable(out, data, grid, fingerprint, **layout)
    else:
        tmp = temporary_sibling(out)
        try:
            _write_group(tmp, data, grid, channels=None, **layout)
            _replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    logger.info("wrote %s %s (shape %s, %s)", "labels" if labels else "image", out, grid.shape, grid.unit)
    return out


RESUMABLE = ".converting"
"""Suffix of the hidden sibling ``.<name>.converting`` that :func:`_write_resumable` writes into (beside it its run
folder, ``.<name>.converting.run``)."""


def _write_resumable(
    out: Path,
    data: Any,
    grid: Grid,
    fingerprint: dict[str, Any],
    *,
    name: str,
    labels: bool,
    chunks: Sequence[int] | None,
    extra_attrs: Mapping[str, Any] | None,
    n_levels: int | None,
    progress: bool,
    client: Any = None,
) -> None:
    """:func:`write_image` with a ``fingerprint``: level 0 slab by slab into ``.<name>.converting``, the recorded
    slabs of an unfinished write with the same fingerprint kept, then the pyramid, then the rename into place.
    Another fingerprint starts the sibling anew."""
    from pipeline.resume import open_run, run_matches

    partial = out.with_name(f".{out.name}{RESUMABLE}")
    root = partial.with_name(partial.name + ".run")
    _warn_other_conversions(partial)
    same = run_matches(root, fingerprint) and partial.is_dir()
    stage = open_run(root, fingerprint, overwrite=not same).stage("level0")
    resume = same and stage.vouch_for([partial]) and bool(stage.completed())
    if resume and _finished(partial):  # killed after its pyramid, before (or while) it was moved into place
        logger.info("the write of %s was finished before it stopped: moving it into place", out)
    else:
        if resume:
            logger.info(
                "resuming the write of %s: %d slabs of level 0 were written before", out, len(stage.completed())
            )
        array = create_image_array(
            partial, grid.shape, grid, _storage_dtype(data.dtype), chunks, name=name, labels=labels,
            overwrite=not resume, resume=resume, extra_attrs=extra_attrs,
        )  # fmt: skip
        if not resume:
            stage.bind([partial])
        _store(data, array, desc=f"writing {name}", client=client, records=stage, progress=progress)
        finish_image(partial, n_levels=n_levels, client=client, progress=progress)
    _replace(partial, out)
    shutil.rmtree(root)


def _warn_other_conversions(partial: Path) -> None:
    """Warn about the unfinished conversions into other outputs that lie beside ``partial`` (hidden
    ``.<name>.converting`` folders): a conversion stopped and never run again keeps its slabs there, unseen, for a
    rerun to resume."""
    for other in sorted(partial.parent.glob(f".*{RESUMABLE}")):
        if other != partial and other.is_dir():
            logger.warning(
                "%s holds an unfinished conversion into %s (stopped %s): run that conversion again to finish it, or "
                "delete %s and %s.run to free its space",
                partial.parent, other.name[1 : -len(RESUMABLE)],
                time.strftime("%Y-%m-%d %H:%M", time.localtime(other.stat().st_mtime)), other, other,
            )  # fmt: skip


def _finished(path: Path) -> bool:
    """Whether the group at ``path`` was marked complete by :func:`finish_image` (its pyramid written whole)."""
    return stored_attribute(path, "complete") is True


def field_metadata(grid: Grid, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``attrs["patchmorph"]`` block of a displacement field (caller's ``metadata`` merged in).

    The caller supplies ``fixed`` and ``moving`` (image paths), ``model`` and ``config``; the
    component order, unit and direction are set here so that they cannot disagree with the data.
    """
    meta: dict[str, Any] = {"fixed": None, "moving": None, "model": None, "config": None}
    meta.update(dict(metadata or {}))
    meta.update(
        {
            "kind": "displacement_field",
            "components": list(AXES),
            "displacement_frame": FIELD_FRAME,
            "component_axis": "c",
            "displacement_unit": grid.unit,
            "direction": FIELD_DIRECTION,
        }
    )
    return meta


def write_field(
    path: str | Path,
    field: Any,
    grid: Grid,
    *,
    metadata: Mapping[str, Any] | None = None,
    uncertainty: Any | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    n_levels: int | None = 1,
    progress: bool = True,
) -> Path:
    """Write a displacement field (and optional uncertainty) as an NGFF 0.5 image with axes ``c, z, y, x``.

    Args:
        path: output group; written to a temporary sibling and renamed into place.
        field: ``(3, Z, Y, X)`` numpy or dask array, components ``(z, y, x)``, world units of ``grid``.
        grid: the field grid (on the fixed image's world frame and unit).
        metadata: ``fixed``, ``moving``, ``model``, ``config`` and anything else to record.
        uncertainty: optional ``(Z, Y, X)`` uncertainty map (the registration's residual, or a spread of
            patch estimates in world units), written as the child image ``uncertainty``.
        chunks: spatial chunk shape; see :func:`choose_layout`.
        overwrite: replace an existing output (else InputError).
        n_levels: pyramid levels of the field (default 1).
        progress: show a progress bar per level written.

    Returns:
        The output path.
    """
    out = check_output(path, overwrite)
    if tuple(field.shape) != (3, *grid.shape):
        raise InputError(f"field shape {tuple(field.shape)} must be (3, *grid.shape) = {(3, *grid.shape)}.")
    meta = field_metadata(grid, metadata)
    if uncertainty is not None:
        meta["uncertainty"] = "uncertainty"
    tmp = temporary_sibling(out)
    try:
        _write_group(
            tmp,
            field,
            grid,
            channels=3,
            name="displacement",
            labels=False,
            chunks=chunks,
            extra_attrs=meta,
            n_levels=n_levels,
            progress=progress,
        )
        if uncertainty is not None:
            _write_group(
                tmp / "uncertainty",
                uncertainty,
                grid,
                channels=None,
                name="uncertainty",
                labels=False,
                chunks=chunks,
                extra_attrs={"kind": "uncertainty"},
                n_levels=n_levels,
                progress=progress,
            )
        _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("wrote displacement field %s (grid %s, %s)", out, grid.shape, grid.unit)
    return out


# -- reading --------------------------------------------------------------------------------------------
def _open_group(path: str | Path) -> zarr.Group:
    """The image group, read-only; a local store is opened through a
    :class:`~pipeline.integrity.VerifiedStore`, so every chunk read is checked (checksum, no gaps)."""
    where = str(path)
    if "://" not in where:  # a local path: what is there decides the sentence
        local = Path(where)
        if not local.exists():
            raise InputError(f"OME-Zarr input {where!r} does not exist: check the path.")
        if local.is_file():
            raise InputError(
                f"{where!r} is a file, not an OME-Zarr folder: convert an image first with 'patchmorph convert' "
                "(an ITK/ANTs displacement field with 'patchmorph import-field')."
            )
    where = image_group(where)
    try:
        group = zarr.open_group(where, mode="r")
    except Exception as err:  # zarr raises several types for a non-group
        raise InputError(f"{where!r} is not a Zarr group ({err}); give an OME-Zarr image folder.") from err
    if "://" in where:
        return group
    written = bool(dict(group.attrs).get("patchmorph", {}).get(EVERY_CHUNK_WRITTEN, False))
    store = VerifiedStore(zarr.storage.LocalStore(where, read_only=True), where, every_chunk_written=written)
    return zarr.open_group(store=store, mode="r")


BIOFORMATS2RAW_LAYOUT = "bioformats2raw.layout"
"""The attribute of a bioformats2raw store's top group (its images are the series groups ``0``, ``1``, ...)."""


def _single_series(group: zarr.Group, where: str) -> str | None:
    """The name of the one image series (``"0"``) of a bioformats2raw store given as its top folder ``where``
    (``group``: its top group, whose attributes carry :data:`BIOFORMATS2RAW_LAYOUT`), or None for any other group.

    Raises:
        InputError: the store holds several series (which one is the brain cannot be told).
    """
    attrs = dict(group.attrs)
    if BIOFORMATS2RAW_LAYOUT not in attrs or "multiscales" in attrs.get("ome", attrs):
        return None
    listed = dict(group["OME"].attrs).get("series") if "OME" in group else None
    series = [str(s) for s in listed] if listed else sorted((k for k in group.group_keys() if k.isdigit()), key=int)
    if len(series) != 1:
        found = ", ".join(f"{where}/{s}" for s in series) or "none"
        raise InputError(
            f"bioformats2raw store {where!r} holds {len(series)} image series ({found}): give the folder of the "
            f"series to read, e.g. {where}/0 for the first."
        )
    return series[0]


def image_group(path: str | Path) -> str:
    """Where the image group of ``path`` is: ``path`` itself, or the single series of a bioformats2raw store given
    as its top folder (``brain.zarr`` → ``brain.zarr/0``, :func:`_single_series`). What is not a local Zarr group
    is returned as given (:func:`_open_group` names what is wrong with it)."""
    where = str(path)
    if "://" in where or not Path(where).is_dir():
        return where
    try:
        group = zarr.open_group(where, mode="r")
    except Exception:  # noqa: BLE001 - not a group: _open_group's sentence says so
        return where
    series = _single_series(group, where)
    return where if series is None else str(Path(where) / series)


def series_store(path: str | Path) -> Path:
    """The store folder of a bioformats2raw series given as ``x.zarr/0`` (a folder named by its series number inside
    a ``.zarr`` folder), whose name names the image; any other ``path`` as it is. Reads nothing."""
    path = Path(path)
    if path.name.isdigit() and path.parent.name.lower().endswith(".zarr"):
        return path.parent
    return path


def _multiscale(attrs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The first ``multiscales`` entry of NGFF 0.5 (``attrs["ome"]``) or 0.4 (top-level) attributes."""
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales") if isinstance(ome, Mapping) else None
    if not multiscales:
        raise InputError(
            f"{where!r} has no NGFF 'multiscales' metadata: give an OME-Zarr image group (e.g. 'x.zarr' or "
            "'x.zarr/0' for a bioformats2raw series)."
        )
    return multiscales[0]


def _axes(multiscale: Mapping[str, Any], where: str) -> tuple[list[str], str]:
    """Axis names and the spatial unit; InputError for unknown names or a non-(…, z, y, x) order.

    (The RFC-4 orientation of the spatial axes is read by :func:`rfc4_orientation`.)"""
    axes = multiscale.get("axes", ["t", "c", "z", "y", "x"])  # NGFF < 0.4 had none: 5-D tczyx
    names = [a["name"] if isinstance(a, Mapping) else str(a) for a in axes]
    unknown = [n for n in names if n not in ("t", "c", "z", "y", "x")]
    if unknown or names[-3:] != list(AXES):
        raise InputError(
            f"{where!r} has axes {names}: PatchMorph reads images whose axes end in z, y, x (after optional "
            "t and c); convert or re-save the image with those axis names."
        )
    given = {a.get("unit") for a in axes if isinstance(a, Mapping) and a.get("name") in AXES}
    given.discard(None)
    unknown_units = sorted(str(u) for u in given if length_unit(u) is None)
    if unknown_units:
        raise InputError(
            f"{where!r} gives its z, y, x axes the unit {unknown_units[0]!r}, which is no length unit: re-save the "
            "image with an NGFF unit (micrometer, millimeter, ...) on its spatial axes."
        )
    units = {length_unit(u) for u in given}  # other tools' spellings (µm, um) as NGFF's names
    if len(units) > 1:
        raise InputError(f"{where!r} mixes units {sorted(units)} on z, y, x: give one unit for all axes.")
    if not units:
        logger.warning("%s has no axis units; assuming micrometer", where)
        return names, "micrometer"
    unit = units.pop()
    unit_scale(unit, unit)  # an NGFF unit name
    return names, unit


def _scale_translation(transforms: Sequence[Mapping[str, Any]], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for t in transforms or ():
        if t.get("type") == "scale":
            scale = np.asarray(t["scale"], dtype=np.float64)
        elif t.get("type") == "translation":
            translation = np.asarray(t["translation"], dtype=np.float64)
    return scale, translation


def _grid_from_ngff(
    dataset: Mapping[str, Any],
    multiscale: Mapping[str, Any],
    shape: Sequence[int],
    unit: str,
    where: str,
    orientation: str | None,
) -> Grid:
    """Grid of one level from NGFF scale/translation (dataset level, then multiscale level).

    With an RFC-4 ``orientation`` the scale/translation frame is turned into the anatomical world frame by
    the orientation's direction matrix ``D`` (world = ``D · (scale · index + translation)``), the inverse of
    what :func:`_dataset_meta` writes.
    """
    ndim = len(shape)
    scale, translation = _scale_translation(dataset.get("coordinateTransformations", ()), ndim)
    gscale, gtranslation = _scale_translation(multiscale.get("coordinateTransformations", ()), ndim)
    spacing = check_spacing((scale * gscale)[-3:], what=f"voxel size (scale) of {where!r}")
    origin = (translation * gscale + gtranslation)[-3:]
    if orientation is None:
        return Grid.from_spacing(shape[-3:], spacing, origin=origin, unit=unit)
    direction = orientation_matrix(orientation)
    return Grid.from_spacing(shape[-3:], spacing, origin=direction @ origin, unit=unit, direction=direction)


def check_ngff_agrees(own: Grid, ngff: Grid, where: str) -> None:
    """Refuse an image whose NGFF voxel size (``scale`` with its axes' ``unit``) disagrees with the project's own
    index→world matrix of the same level (``own``; they are written together, so another tool edited one of them,
    e.g. to correct the voxel size): which one is right cannot be told, and reading the own one would ignore the
    edit silently. Compares the voxel sizes ``(z, y, x)`` in ``own.unit`` to a relative 1e-6.

    Raises:
        InputError: naming the image, both voxel sizes and what to do.
    """
    ngff_spacing = ngff.spacing * unit_scale(ngff.unit, own.unit)
    if np.allclose(ngff_spacing, own.spacing, rtol=1e-6, atol=0.0):
        return
    raise InputError(
        f"{where!r} has two voxel sizes that disagree: its NGFF scale says {np.round(ngff.spacing, 6).tolist()} "
        f"{ngff.unit}, its patchmorph affine {np.round(own.spacing, 6).tolist()} {own.unit} (one was edited after "
        "PatchMorph wrote it): convert the image again from its source with the right --voxel-size and --unit."
    )


def _open_tensorstore(where: str, level_path: str, zarr_format: int, every_chunk_written: bool) -> Any:
    """A TensorStore view of one level; a missing chunk of a store marked ``every_chunk_written`` is an
    error, not fill values (TensorStore checks the ``crc32c`` codec itself)."""
    import tensorstore as ts

    spec: dict[str, Any] = {
        "driver": "zarr3" if zarr_format == 3 else "zarr",
        "kvstore": {"driver": "file", "path": str(Path(where) / level_path)},
    }
    if every_chunk_written:
        spec["fill_missing_data_reads"] = False
    return ts.open(spec, read=True).result()


def _levels(
    path: str | Path, backend: Backend, keep_channels: bool
) -> tuple[list[Level], dict[str, Any], str]:
    """Open every level of an NGFF image; returns the levels, the ``patchmorph`` attrs and the name."""
    where = image_group(path)
    group = _open_group(path)
    attrs = dict(group.attrs)
    meta = attrs.get("patchmorph", {})
    if meta.get("status") == "failed_quality":
        reasons = "; ".join(meta.get("quality", {}).get("failures", ())) or "see its quality block"
        raise InputError(
            f"{where!r} failed its quality checks ({reasons}): rerun register with other settings, or rerun the "
            "same register command with --accept-quality to keep it."
        )
    if meta.get("complete") is False:
        run = Path(where).with_name(Path(where).name + ".run")
        how = (
            f"rerun the command that wrote it, which resumes from its run folder {run}"
            if "://" not in where and run.is_dir()
            else "write it again"
        )
        raise InputError(f"{where!r} is an incomplete output (its write was interrupted): {how}.")
    multiscale = _multiscale(attrs, where)
    names, ngff_unit = _axes(multiscale, where)
    orientation = rfc4_orientation(multiscale.get("axes", ()))
    affines = {e["input"]: e["affine"] for e in meta.get("coordinateTransformations", ())}
    unit = meta.get("unit", ngff_unit)
    levels = []
    for dataset in multiscale.get("datasets", ()):
        level_path = dataset["path"]
        try:
            zarray = group[level_path]
        except KeyError as err:
            raise InputError(
                f"{where!r} lists level {level_path!r} but has no such array: re-write it."
            ) from err
        except ValueError as err:  # the level's zarr.json is not JSON, or not array metadata
            raise InputError(
                f"{where!r} level {level_path!r} has unreadable metadata ({type(err).__name__}: {err}): the store is "
                "damaged; write it again (or restore it)."
            ) from err
        if zarray.ndim != len(names):
            raise InputError(f"{where!r} level {level_path!r} is {zarray.ndim}-D but has {len(names)} axes.")
        if level_path in affines:
            affine = np.vstack([np.asarray(affines[level_path], dtype=np.float64), [0, 0, 0, 1]])
            grid = Grid(zarray.shape[-3:], affine, unit)
            check_ngff_agrees(grid, _grid_from_ngff(dataset, multiscale, zarray.shape, ngff_unit, where, None), where)
        else:
            grid = _grid_from_ngff(dataset, multiscale, zarray.shape, unit, where, orientation)
        array: Any = (
            zarray if backend == "zarr" else _open_tensorstore(
                where, level_path, zarray.metadata.zarr_format, bool(meta.get(EVERY_CHUNK_WRITTEN))
            )
        )
        lead = names[:-3]
        squeeze = [i for i, n in enumerate(lead) if not (keep_channels and n == "c")]
        if any(zarray.shape[i] != 1 for i in squeeze):
            raise InputError(
                f"{where!r} has axes {names} with shape {zarray.shape}: only single time point, single channel "
                "images are registered: pick one channel with --channel-index N (N from 0; of 'patchmorph convert' or "
                "'patchmorph atlas', or a batch item's channel_index), or as an extra channel write it PATH:N."
            )
        if squeeze:
            import dask.array as da

            index = tuple(0 if i in squeeze else slice(None) for i in range(len(lead)))
            array = da.from_zarr(zarray)[index] if backend == "zarr" else array[index]
        levels.append(Level(array, grid))
    if not levels:
        raise InputError(f"{where!r} has 'multiscales' without datasets: re-write the image.")
    return levels, meta, str(multiscale.get("name") or Path(where).stem)


def read_image(path: str | Path, *, backend: Backend = "zarr", channel: int | None = None) -> MultiscaleImage:
    """Open an NGFF 0.4 or 0.5 multiscale image lazily.

    Args:
        path: the image group (local folder or URL for the zarr backend; a bioformats2raw store's top folder
            stands for its single series, :func:`image_group`).
        backend: ``"zarr"`` (zarr-python arrays, default) or ``"tensorstore"``.
        channel: of an image with axes ``c, z, y, x`` (after an optional single time point), the channel (0-based)
            to read (its levels are then lazy dask arrays; the backend is zarr).

    Returns:
        A :class:`MultiscaleImage` whose levels are ``(Z, Y, X)`` lazy array-likes with grids from
        the project's full affine (when written by PatchMorph) or NGFF scale/translation.

    Raises:
        InputError: the image is not one, or ``channel`` is given for an image without a ``c`` axis or is not
            one of its channels.
    """
    if channel is None:
        levels, _, name = _levels(path, backend, keep_channels=False)
        return MultiscaleImage(tuple(levels), name)
    import dask.array as da

    levels, _, name = _levels(path, "zarr", keep_channels=True)
    arrays = [level.array if isinstance(level.array, da.Array) else da.from_zarr(level.array) for level in levels]
    if arrays[0].ndim == 3:
        raise InputError(f"{str(path)!r} has no channel axis (c): leave out --channel-index.")
    check_channel_index(channel, arrays[0].shape[0], path)
    return MultiscaleImage(tuple(Level(a[channel], level.grid) for a, level in zip(arrays, levels, strict=True)), name)


def read_channel(path: str | Path, channel: int) -> Level:
    """Level 0 of channel ``channel`` of an OME-Zarr image (:func:`read_image` with ``channel``).

    Raises:
        InputError: the image has no ``c`` axis, or ``channel`` is not one of its channels.
    """
    return read_image(path, channel=channel).levels[0]


def check_channel_index(channel: int, count: int, path: str | Path) -> None:
    """Refuse a ``--channel-index`` that is not one of the ``count`` channels of the image at ``path``."""
    if not 0 <= channel < count:
        raise InputError(
            f"channel index {channel} is not a channel of {str(path)!r}, which holds {count}: give 0 to {count - 1}."
        )


def read_field(path: str | Path, *, backend: Backend = "zarr") -> tuple[Any, Grid, dict[str, Any]]:
    """Open a displacement field written by :func:`write_field` (or chunk by chunk by ``register``).

    Returns:
        ``(array, grid, metadata)``: the lazy level-0 ``(3, Z, Y, X)`` array of world displacement
        components ``(z, y, x)`` in ``grid.unit`` (a :class:`GridFrameField` view of a field stored in its
        grid's frame), its grid and the ``attrs["patchmorph"]`` metadata.
    """
    levels, meta, _ = _levels(path, backend, keep_channels=True)
    array = levels[0].array
    if meta.get("kind") != "displacement_field" or len(array.shape) != 4 or array.shape[0] != 3:
        raise InputError(
            f"{str(path)!r} is not a PatchMorph displacement field: give the output of 'register'."
        )
    return field_view(array, levels[0].grid, meta), levels[0].grid, dict(meta)
