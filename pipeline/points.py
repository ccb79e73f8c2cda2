"""Points between a brain and its atlas through an atlas job's fields: detected cells (cellfinder's XML or a
CSV) to atlas coordinates, regions and hemispheres, and counts and densities per region.

An atlas job (:mod:`pipeline.atlas_job`) leaves in its folder the forward field ``u`` (a brain world point
``x`` ↦ the atlas world point ``x + u(x)``) and the inverse field ``w`` (an atlas world point ``y`` ↦ the
brain world point ``y + w(y)``). Points are voxel indices ``(axis 0, axis 1, axis 2)``, fractional allowed:

* in the brain: of the **brain file as the job was given it** (its array order, before ``brain_downsample``),
  the coordinates a cell detector reports;
* in the atlas: of the atlas's own arrays (BrainGlobe's ``coordinate_atlas_axis_*``).

:func:`map_points` maps brain points to the atlas through ``u`` or atlas points to the brain through ``w``;
each point's structure and hemisphere are the atlas's annotation and hemispheres at its nearest atlas voxel.
:func:`write_point_tables` writes what brainglobe's brainmapper writes: ``all_points.csv`` (one row a point)
and ``summary.csv`` (cells per structure and side, with the brain's volumes from the job's ``volumes.csv`` and
the densities per mm³). Fields and labels are read block by block around the points, never whole.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from patchmorph_core.displacement import FieldDisplacement
from patchmorph_core.errors import InputError
from patchmorph_core.source import source_grid
from patchmorph_core.spatial import Grid, atlas_coordinates_um, read_box, unit_scale
from pipeline.atlas import read_volume_table
from pipeline.brainglobe import LEFT, RIGHT, BrainGlobeAtlas, Structure, find_atlas
from pipeline.resume import ITEM_RECORD, atomic_write, atomic_write_csv, atomic_write_json

logger = logging.getLogger(__name__)

Space = Literal["brain", "atlas"]
"""Where points are given: ``brain`` (the brain file's voxels) or ``atlas`` (the atlas's voxels)."""

AXIS_COLUMNS: tuple[tuple[str, str, str], ...] = (("axis_0", "axis_1", "axis_2"), ("z", "y", "x"))
"""Column names a points CSV may give its voxel indices under, array axis 0 (the slowest, a stack's planes)
first; brainmapper's ``coordinate_raw_axis_*`` (brain) and ``coordinate_atlas_axis_*`` (atlas) are read too,
before these (:func:`axis_columns`)."""

POINT_COLUMNS: tuple[str, ...] = (
    "coordinate_raw_axis_0",
    "coordinate_raw_axis_1",
    "coordinate_raw_axis_2",
    "coordinate_atlas_axis_0",
    "coordinate_atlas_axis_1",
    "coordinate_atlas_axis_2",
    "structure_name",
    "hemisphere",
    "structure_id",
    "acronym",
)
"""Columns of ``all_points.csv``: brainmapper's eight (raw = the brain file's voxels, atlas = the atlas's
voxels), then the structure id and acronym."""

SUMMARY_COLUMNS: tuple[str, ...] = (
    "structure_name",
    "left_cell_count",
    "right_cell_count",
    "total_cells",
    "left_volume_mm3",
    "right_volume_mm3",
    "total_volume_mm3",
    "left_cells_per_mm3",
    "right_cells_per_mm3",
    "structure_id",
    "acronym",
)
"""Columns of ``summary.csv``: brainmapper's nine, then the structure id and acronym."""

CELLFINDER_CELL_TYPE = 2
"""cellfinder's marker type of a classified cell in its XML (1: not a cell; unclassified candidates: 1)."""

BLOCK = 64
"""Edge (voxels) of the blocks in which fields and labels are read around the points."""
ORDER_HINT = "columns in x, y, z order are the usual cause (for a NIfTI brain: nibabel's i, j, k, which are axes 2, 1, 0)"
"""The usual cause of points in the wrong place, as the refusals name it."""
ORDER_SHARE = 0.9
"""A column order that puts at least this share of the points inside the atlas's labels ..."""
ORDER_MARGIN = 0.1
"""... and this much more than the order given makes :func:`check_column_order` refuse the file."""
ORDER_MIN_POINTS = 20
"""Fewer points than this are not judged by their column order."""
ORDER_SAMPLE = 20_000
"""Points drawn (seeded) to judge the column order of a larger file."""
LENGTH_SPREAD = 0.1
"""Points divided by the voxel size must reach this share of the grid on every axis to be taken for lengths."""


@dataclass(frozen=True)
class Points:
    """Points read from a file: ``(N, 3)`` float64 voxel indices ``(axis 0, axis 1, axis 2)`` and the file's other
    columns (a CSV's, by name, each ``N`` values passed through as text; none for XML)."""

    index: np.ndarray
    extra: Mapping[str, Sequence[str]]


def axis_columns(space: Space) -> tuple[tuple[str, str, str], ...]:
    """The voxel columns of a points CSV of ``space``, in the order they are looked for."""
    prefix = "coordinate_raw_axis" if space == "brain" else "coordinate_atlas_axis"
    return (tuple(f"{prefix}_{k}" for k in range(3)), *AXIS_COLUMNS)  # type: ignore[return-value]


def column_key(name: str) -> str:
    """A CSV header name as it is matched against the voxel columns' names: without the spaces around it, in lower
    case, ``-`` read as ``_`` (so ``Z``, `` y`` after ``z, `` and napari's ``axis-0`` are found)."""
    return name.strip().lower().replace("-", "_")


def _csv_points(path: Path, space: Space) -> Points:
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: the byte-order mark Excel writes first
        reader = csv.reader(handle)
        header = tuple(next(reader, ()))
        keys = tuple(column_key(name) for name in header)
        found = next((cols for cols in axis_columns(space) if set(cols) <= set(keys)), None)
        if found is None:
            one_column = len(header) == 1 and any(sep in header[0] for sep in "\t;")
            hint = " (its header is one column: separate the columns by commas)" if one_column else ""
            raise InputError(
                f"points file {path} has no voxel columns (it has {', '.join(header) or 'none'}){hint}: name them "
                "axis_0, axis_1, axis_2 (or z, y, x), array axis 0 first (the planes of a stack)."
            )
        rows = [row for row in reader if row]
    columns = [keys.index(c) for c in found]
    try:
        index = np.array([[row[k] for k in columns] for row in rows], dtype=np.float64).reshape(-1, 3)
    except (IndexError, ValueError) as err:
        raise InputError(f"points file {path} has a voxel value that is missing or not a number ({err}): fix that row.") from err
    others = [k for k, key in enumerate(keys) if key not in found and key not in POINT_COLUMNS]  # those are written anew
    extra = {header[k]: [row[k] if k < len(row) else "" for row in rows] for k in others}
    return Points(index, extra)


def _xml_points(path: Path, cells_only: bool) -> Points:
    """cellfinder's XML (``Marker_Type`` / ``Marker`` with ``MarkerX``, ``MarkerY``, ``MarkerZ``): X is the
    last array axis, Y the middle one, Z the planes."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as err:
        raise InputError(f"points file {path} is not readable XML ({err}): give cellfinder's cells XML or a CSV.") from err
    index = []
    for marker_type in root.iter("Marker_Type"):
        kind = int(marker_type.findtext("Type", default="0"))
        if cells_only and kind != CELLFINDER_CELL_TYPE:
            continue
        for marker in marker_type.iter("Marker"):
            index.append([float(marker.findtext(f"Marker{a}", default="nan")) for a in "ZYX"])
    points = np.array(index, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(points)):
        raise InputError(f"points file {path} has a marker without MarkerX, MarkerY or MarkerZ: fix that marker.")
    return Points(points, {})


def read_points(path: str | Path, space: Space = "brain", cells_only: bool = True) -> Points:
    """The points of a CSV (:func:`axis_columns` of ``space``) or of cellfinder's XML (its cells, or every
    marker when not ``cells_only``).

    Raises:
        InputError: a missing or unreadable file, or no voxel columns (a file without points gives none).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"points file {path} does not exist: check the path.")
    return _xml_points(path, cells_only) if path.suffix.lower() == ".xml" else _csv_points(path, space)


# -- the job's spaces -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSpaces:
    """What :func:`map_points` needs from an atlas job's folder.

    Attributes:
        brain_grid: the brain file's voxels (before the job's ``brain_downsample``), in the brain's unit.
        atlas_grid: the atlas's voxels (its own array order), in the atlas's unit.
        field / inverse_field: the job's forward and inverse fields.
        annotation / hemispheres: the atlas's label images (level-0 arrays, on ``atlas_grid``).
        labels_on_brain / labels_grid: the atlas's labels on the brain (level-0 array) and their grid (the
            job's brain grid, after ``brain_downsample``).
        structures: annotation value → structure.
        volumes: the job's ``volumes.csv``.
        atlas: the BrainGlobe atlas the job used; atlas_dir: the folder of its prepared images.
        brain_geometry: the part of the brain the job registered (``full``, ``hemisphere_l``, ``hemisphere_r``).
        channels: the job's extra channels' converted copies by name.
        atlas_range: the part of the atlas the job registered (``--atlas-range``: direction → ``[from, to]`` µm;
            empty: the whole atlas).
    """

    brain_grid: Grid
    atlas_grid: Grid
    field: Path
    inverse_field: Path
    annotation: Any
    hemispheres: Any
    labels_on_brain: Any
    labels_grid: Grid
    structures: Mapping[int, Structure]
    volumes: Path
    atlas: BrainGlobeAtlas
    atlas_dir: Path
    brain_geometry: str
    channels: Mapping[str, Path]
    atlas_range: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _recorded_outputs(folder: Path) -> dict[str, str]:
    """The outputs by role that a finished job's record lists: ``patchmorph atlas``'s ``atlas_job.json``, else a
    batch item's completion record."""
    from pipeline.atlas_job import JOB_RECORD

    if (folder / JOB_RECORD).is_file():
        return dict(json.loads((folder / JOB_RECORD).read_text()).get("outputs", {}))
    return dict(json.loads((folder / ITEM_RECORD).read_text()).get("result", {}).get("outputs", {}))


def _recorded_path(folder: Path, recorded: str) -> Path:
    """A path a job in ``folder`` recorded: a relative one (an atlas folder typed relative, recorded so before
    atlases were recorded with their absolute paths) is taken from the working folder of the run that made it."""
    from pipeline.atlas_job import JOB_RECORD

    path = Path(recorded)
    if path.is_absolute() or not (folder / JOB_RECORD).is_file():
        return path
    return Path(json.loads((folder / JOB_RECORD).read_text()).get("working_directory", ".")) / path


def open_job(folder: str | Path) -> JobSpaces:
    """The spaces of the finished atlas job in ``folder``: a ``patchmorph atlas`` output folder, or an item's folder
    of an ``atlas-to-section`` batch with a BrainGlobe atlas. The atlas's prepared images are the ones its inverse
    field was made on (``<job>/atlas``, or the batch's ``<out>/atlas``), and the atlas is the one they record.

    Raises:
        InputError: ``folder`` is not a finished atlas job, or the atlas it used is gone.
    """
    from pipeline.atlas import _attributes
    from pipeline.atlas_job import JOB_RECORD
    from pipeline.ngff import read_field, read_image

    folder = Path(folder)
    if not (folder / JOB_RECORD).is_file() and not (folder / ITEM_RECORD).is_file():
        raise InputError(
            f"{folder} is not the folder of a finished atlas job (no {JOB_RECORD}, nor a batch item's {ITEM_RECORD}): "
            "give the --out folder of a 'patchmorph atlas' run that finished, or a finished item's folder of a batch."
        )
    if not (folder / "inverse_field.ome.zarr").is_dir():
        raise InputError(
            f"{folder} holds no atlas outputs (no inverse_field.ome.zarr): give an item registered to a BrainGlobe atlas."
        )
    # a job's own atlas images, else those a batch item's inverse field was made on: where they were, or beside the
    # item in the batch's folder (a job or a batch moved elsewhere as a whole)
    atlas_dir = folder / "atlas"
    if not (atlas_dir / "atlas.json").is_file():
        recorded = Path(read_field(folder / "inverse_field.ome.zarr")[2]["fixed"]).parent
        atlas_dir = next((c for c in (recorded, folder.parent / recorded.name) if (c / "atlas.json").is_file()), recorded)
    if not (atlas_dir / "atlas.json").is_file():
        raise InputError(
            f"the atlas images that the job in {folder} was registered to ({atlas_dir}) are gone: put the batch's "
            "atlas folder back where it was."
        )
    described = json.loads((atlas_dir / "atlas.json").read_text())
    # each channel's converted copy where it was written, else in the job's folder (a job moved as a whole)
    channels = {
        role[len("channel_"):]: next((p for p in (Path(path), folder / Path(path).name) if p.exists()), Path(path))
        for role, path in _recorded_outputs(folder).items()
        if role.startswith("channel_")
    }
    brain_path = folder / "brain.ome.zarr"
    brain = read_image(brain_path).grid
    attrs = _attributes(brain_path)
    factor = int(attrs.get("downsample", 1))
    shape = attrs.get("source_shape", [n * factor for n in brain.shape])
    brain_grid = source_grid(brain, (factor,) * 3, shape) if factor > 1 else brain
    atlas_folder = _recorded_path(folder, described["folder"])
    if not Path(atlas_folder).is_dir():
        raise InputError(
            f"the atlas folder {atlas_folder} that the job in {folder} used is gone: put it back (its structure "
            "names are read from it)."
        )
    annotation = read_image(atlas_dir / "annotation.ome.zarr")
    hemispheres = read_image(atlas_dir / "hemispheres.ome.zarr")
    on_brain = read_image(brain_path / "labels" / "atlas")
    atlas = find_atlas(atlas_folder)
    return JobSpaces(
        brain_grid=brain_grid,
        atlas_grid=annotation.grid,
        field=folder / "field.ome.zarr",
        inverse_field=folder / "inverse_field.ome.zarr",
        annotation=annotation.levels[0].array,
        hemispheres=hemispheres.levels[0].array,
        labels_on_brain=on_brain.levels[0].array,
        labels_grid=on_brain.grid,
        structures=atlas.structures,
        volumes=folder / "volumes.csv",
        atlas=atlas,
        atlas_dir=atlas_dir,
        brain_geometry=described.get("brain_geometry", "full"),
        channels=channels,
        atlas_range=described.get("atlas_range", {}),
    )


def _blocks(index: np.ndarray) -> Iterator[np.ndarray]:
    """Row numbers of the points in each :data:`BLOCK`³ block of index space, block by block."""
    if len(index) == 0:
        return
    keys = np.floor(index / BLOCK).astype(np.int64)
    keys -= keys.min(axis=0)
    linear = np.ravel_multi_index(tuple(keys.T), tuple(keys.max(axis=0) + 1))
    order = np.argsort(linear, kind="stable")
    bounds = np.flatnonzero(np.diff(linear[order])) + 1
    yield from np.split(order, bounds)


def _displace(field: Path, world: np.ndarray, unit: str) -> np.ndarray:
    """``world + u(world)`` for ``(N, 3)`` points in ``unit``, through the field at ``field`` (read block by
    block around the points), in ``unit``."""
    from pipeline.ngff import read_field

    array, grid, _ = read_field(field)
    scale = unit_scale(unit, grid.unit)
    sampler = FieldDisplacement(array, grid)
    points = world * scale
    out = np.empty_like(points)
    for rows in _blocks(grid.world_to_index(points)):
        out[rows] = points[rows] + sampler(points[rows])
    return out / scale


def _outside_cause(index: np.ndarray, grid: Grid, what: str) -> str:
    """The likely cause of ``(N, 3)`` voxel indices of which some lie outside ``grid``'s voxels, as a refusal names
    it: columns in another order (another order puts every point inside); lengths in the grid's unit (most points
    outside; divided by the voxel size, every one inside and reaching :data:`LENGTH_SPREAD` of the grid on each
    axis, as positions in a brain do, where voxel indices divided so crowd into its first voxels); else points of
    another image."""
    if any(grid.holds_index(index[:, order]).all() for order in itertools.permutations(range(3)) if order != (0, 1, 2)):
        return ORDER_HINT
    scaled = index / grid.spacing
    spread = np.all(scaled.max(axis=0) >= LENGTH_SPREAD * np.asarray(grid.shape))
    if np.mean(~grid.holds_index(index)) >= 0.5 and grid.holds_index(scaled).all() and spread:
        spacing = ", ".join(f"{v:g}" for v in grid.spacing)
        return (
            f"they look like lengths in {grid.unit}s, not voxels: divided by the voxel size ({spacing}) every point "
            "lies inside"
        )
    return f"points of another image (a crop, or another downsampling, of the {what}) are the usual cause"


def _check_inside(index: np.ndarray, grid: Grid, what: str, path: str | Path) -> None:
    """InputError naming the first point of ``index`` outside ``grid``'s voxels and the likely cause
    (:func:`_outside_cause`)."""
    outside = ~grid.holds_index(index)
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        raise InputError(
            f"points file {path}: point {row + 1} ({', '.join(f'{v:g}' for v in index[row])}) lies outside the "
            f"{what}'s {' × '.join(map(str, grid.shape))} voxels ({int(outside.sum())} of {len(index)} do): give "
            f"voxel indices of the {what} in its array order, axis 0 first (the planes of a stack); "
            f"{_outside_cause(index, grid, what)}."
        )


def _labelled_share(job: JobSpaces, index: np.ndarray, given_in: Space) -> float:
    """The share of ``(N, 3)`` voxel indices given in ``given_in`` where that space's atlas labels are a structure
    (the atlas's annotation, or its labels on the brain)."""
    if given_in == "atlas":
        return float(np.mean(values_at(job.annotation, index) > 0))
    at = job.labels_grid.world_to_index(job.brain_grid.index_to_world(index))
    return float(np.mean(values_at(job.labels_on_brain, at) > 0))


def check_column_order(job: JobSpaces, index: np.ndarray, given_in: Space, path: str | Path = "") -> None:
    """Refuse points whose columns fit the brain far better in another order: on a nearly cubic image, columns in
    x, y, z order stay inside the voxels but fall outside the tissue. Cells lie in the tissue; when another
    order of the columns puts at least :data:`ORDER_SHARE` of (up to :data:`ORDER_SAMPLE`) points inside the
    atlas's labels and :data:`ORDER_MARGIN` more than the order given, the order given is taken for a mistake.
    ``index``: ``(N, 3)`` voxel indices (fractional allowed) of the ``given_in`` space, columns as given.

    Raises:
        InputError: naming both shares and the better order.
    """
    grid = job.brain_grid if given_in == "brain" else job.atlas_grid
    if len(index) < ORDER_MIN_POINTS:
        return
    rng = np.random.default_rng(0)
    sample = index if len(index) <= ORDER_SAMPLE else index[rng.choice(len(index), ORDER_SAMPLE, replace=False)]
    given = _labelled_share(job, sample, given_in)
    shares = {
        order: _labelled_share(job, sample[:, order], given_in)
        for order in itertools.permutations(range(3))
        if order != (0, 1, 2) and grid.holds_index(sample[:, order]).all()
    }
    if not shares:
        return
    order, best = max(shares.items(), key=lambda item: item[1])
    if best >= ORDER_SHARE and best - given >= ORDER_MARGIN:
        columns = ", ".join(f"column {k + 1}" for k in order)
        raise InputError(
            f"points file {path}: {given:.0%} of its points fall inside the atlas's labels in the {given_in} as the "
            f"columns are given, {best:.0%} when read as axes 0, 1, 2 = {columns}: give voxel indices of the "
            f"{given_in} in its array order, axis 0 first ({ORDER_HINT})."
        )


def values_at(array: Any, index: np.ndarray) -> np.ndarray:
    """The values of a label array at the nearest voxels of ``(N, 3)`` fractional indices (0 outside it),
    read block by block."""
    nearest = np.rint(index).astype(np.int64)
    inside = np.all((nearest >= 0) & (nearest < np.asarray(array.shape)), axis=1)
    out = np.zeros(len(index), dtype=np.int64)
    rows_inside = np.flatnonzero(inside)
    for part in _blocks(nearest[rows_inside]):
        rows = rows_inside[part]
        low, high = nearest[rows].min(axis=0), nearest[rows].max(axis=0) + 1
        block = read_box(array, tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True)))
        out[rows] = block[tuple((nearest[rows] - low).T)]
    return out


@dataclass(frozen=True)
class MappedPoints:
    """Points in both spaces: ``brain`` and ``atlas`` voxel indices ``(N, 3)``, and the atlas's structure id
    and hemisphere (1 left, 2 right, 0 outside) at each."""

    brain: np.ndarray
    atlas: np.ndarray
    structure_ids: np.ndarray
    hemispheres: np.ndarray


def map_points(job: JobSpaces, index: np.ndarray, given_in: Space, path: str | Path = "") -> MappedPoints:
    """Map ``(N, 3)`` voxel indices given in ``given_in`` to the other space and look up their structures.

    Raises:
        InputError: a point outside the voxels of the space it is given in (``path`` names the file).
    """
    source, target = (job.brain_grid, job.atlas_grid) if given_in == "brain" else (job.atlas_grid, job.brain_grid)
    _check_inside(index, source, given_in, path)
    field = job.field if given_in == "brain" else job.inverse_field
    world = source.index_to_world(index)
    mapped = _displace(field, world, source.unit) * unit_scale(source.unit, target.unit)
    other = target.world_to_index(mapped)
    brain, atlas = (index, other) if given_in == "brain" else (other, index)
    return MappedPoints(brain, atlas, values_at(job.annotation, atlas), values_at(job.hemispheres, atlas))


# -- tables -----------------------------------------------------------------------------------------------------
HEMISPHERE_NAMES = {LEFT: "left", RIGHT: "right"}


def _per_mm3(count: int, volume: float) -> str:
    return f"{count / volume:.6g}" if volume > 0 else "nan"


def summary_rows(mapped: MappedPoints, job: JobSpaces) -> list[list[Any]]:
    """``summary.csv``'s rows (:data:`SUMMARY_COLUMNS`): the points per structure and side, most first;
    points outside the atlas's brain (structure 0) are not a structure and are left out."""
    counts = Counter(zip(mapped.structure_ids.tolist(), mapped.hemispheres.tolist(), strict=True))
    volumes = read_volume_table(job.volumes)
    rows = []
    for sid in sorted({s for s, _ in counts if s != 0}):
        left, right = counts[(sid, LEFT)], counts[(sid, RIGHT)]
        total = sum(n for (s, _), n in counts.items() if s == sid)
        structure = job.structures.get(sid, Structure(sid, f"label {sid}", str(sid)))
        region = volumes.get(sid)
        vl, vr, vt = (region.left_mm3, region.right_mm3, region.total_mm3) if region else (0.0, 0.0, 0.0)
        rows.append([
            structure.name, left, right, total, f"{vl:.6f}", f"{vr:.6f}", f"{vt:.6f}",
            _per_mm3(left, vl), _per_mm3(right, vr), sid, structure.acronym,
        ])  # fmt: skip
    return sorted(rows, key=lambda row: -row[3])


def write_point_tables(
    out: str | Path, points: Points, mapped: MappedPoints, job: JobSpaces
) -> dict[str, Path]:
    """``all_points.csv`` (:data:`POINT_COLUMNS`, then the points file's other columns) and ``summary.csv``
    (:func:`summary_rows`) in the folder ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    coordinates = np.round(np.concatenate([mapped.brain, mapped.atlas], axis=1), 3)
    ids, where = np.unique(mapped.structure_ids, return_inverse=True)
    known = [job.structures.get(int(i)) for i in ids]
    names = np.array([s.name if s else ("" if i == 0 else f"label {i}") for i, s in zip(ids, known, strict=True)])
    acronyms = np.array([s.acronym if s else "" for s in known])
    sides = np.array([HEMISPHERE_NAMES.get(int(h), "") for h in range(3)])[np.clip(mapped.hemispheres, 0, 2)]
    columns = [
        *coordinates.T.tolist(), names[where.ravel()].tolist(), sides.tolist(), mapped.structure_ids.tolist(),
        acronyms[where.ravel()].tolist(), *points.extra.values(),
    ]  # fmt: skip (Python values: the csv writer formats them fastest)
    rows = zip(*columns, strict=True)
    paths = {"all_points": out / "all_points.csv", "summary": out / "summary.csv", "brainrender": out / "points.npy"}
    atomic_write_csv(paths["all_points"], [*POINT_COLUMNS, *points.extra], rows)
    atomic_write_csv(paths["summary"], SUMMARY_COLUMNS, summary_rows(mapped, job))
    write_brainrender_points(paths["brainrender"], mapped.atlas, job.atlas_grid)
    return paths


def write_brainrender_points(path: Path, atlas_index: np.ndarray, atlas_grid: Grid) -> None:
    """``(N, 3)`` atlas voxel indices as brainmapper hands them to brainrender: a float64 ``.npy`` of the indices
    times the atlas's voxel size, in micrometres along the atlas's array axes (no origin), written atomically."""
    microns = atlas_coordinates_um(atlas_index, atlas_grid.spacing * unit_scale(atlas_grid.unit, "micrometer"))
    atomic_write(path, lambda handle: np.save(handle, microns.astype(np.float64)))


POINTS_RECORD = "points.json"
"""File in a ``points`` output folder naming the job, the points file and the space they were given in (read by
``patchmorph cohort --cells``)."""


def read_points_record(folder: str | Path) -> dict[str, Any]:
    """The :data:`POINTS_RECORD` of a ``points`` output folder.

    Raises:
        InputError: ``folder`` holds none (it is no ``points`` output).
    """
    record = Path(folder) / POINTS_RECORD
    if not record.is_file():
        raise InputError(
            f"{folder} is not the output folder of 'patchmorph points' (no {POINTS_RECORD}): give the -o folder of a "
            "points run (run it again if it was made by an earlier version)."
        )
    return dict(json.loads(record.read_text()))


def part_of_a_brain_spread(folder: Path) -> float | None:
    """The spread of the tissue extent ratios (brain against atlas, :func:`pipeline.checks.part_of_a_brain`) that
    the registration of the job in ``folder`` recorded in its field's quality block, when it says part of a brain;
    None for a whole brain (or one hemisphere registered to the atlas's), or a field without the record."""
    from pipeline.checks import part_of_a_brain, recorded_geometry
    from pipeline.ngff import read_field

    field = folder / "field.ome.zarr"
    if not field.is_dir():
        return None
    geometry = recorded_geometry(read_field(field)[2])
    return float(geometry["ratio_spread"]) if part_of_a_brain(geometry) else None


def transform_points(
    job_folder: str | Path, points_file: str | Path, out: str | Path, given_in: Space = "brain", cells_only: bool = True
) -> tuple[dict[str, Path], MappedPoints]:
    """Read ``points_file``, map it through the atlas job in ``job_folder`` and write the tables into ``out``, with
    :data:`POINTS_RECORD`.

    Raises:
        InputError: bad points, or a folder that is no finished job (before anything is written).
    """
    paths, mapped = _transform_points(job_folder, points_file, out, given_in, cells_only)
    record = {
        "job": str(Path(job_folder).resolve()), "points": str(Path(points_file).resolve()), "space": given_in,
        "cells_only": cells_only, "n_points": len(mapped.structure_ids),
    }  # fmt: skip
    atomic_write_json(Path(out) / POINTS_RECORD, record)
    return {**paths, "record": Path(out) / POINTS_RECORD}, mapped


def _transform_points(
    job_folder: str | Path, points_file: str | Path, out: str | Path, given_in: Space, cells_only: bool
) -> tuple[dict[str, Path], MappedPoints]:
    job = open_job(job_folder)
    read_volume_table(job.volumes)  # a job whose table was replaced is refused before anything is written
    points = read_points(points_file, given_in, cells_only)
    if len(points.index) == 0:  # an animal without cells: tables without rows, as a cohort's tables need them
        logger.warning("%s holds no points%s: the tables have no rows", points_file, " classified as cells" * cells_only)
        skipped = len(read_points(points_file, given_in, False).index) if cells_only else 0
        if skipped:
            logger.warning(
                "%s holds %d markers that are not classified as cells (not of type %d): cellfinder's cells.xml holds the "
                "unclassified candidates; give its cell_classification.xml, or --all-markers to take every marker",
                points_file, skipped, CELLFINDER_CELL_TYPE,
            )  # fmt: skip
        empty = np.zeros((0, 3))
        mapped = MappedPoints(empty, empty, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        return write_point_tables(out, points, mapped, job), mapped
    check_column_order(job, points.index, given_in, points_file)
    spread = part_of_a_brain_spread(Path(job_folder))
    if spread is not None:
        logger.warning(
            "the job in %s registered part of a brain (tissue extent ratios spread %.1fx: a slab or a few sections) to "
            "the whole atlas, which was squeezed into it: these points' atlas positions, structures and densities can "
            "be hundreds of micrometres off (the job's summary.md)", job_folder, spread,
        )  # fmt: skip
    mapped = map_points(job, points.index, given_in, points_file)
    outside = int(np.count_nonzero(mapped.structure_ids == 0))
    if outside:
        logger.warning(
            "%d of %d points fall outside the atlas's brain (no structure): they are in all_points.csv, not in "
            "summary.csv", outside, len(mapped.structure_ids),
        )  # fmt: skip
    return write_point_tables(out, points, mapped, job), mapped
