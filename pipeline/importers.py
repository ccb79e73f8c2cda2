"""Importers: NIfTI, NRRD, TIFF planes/stacks and OME-Zarr 0.4 → arrays with grids, and → OME-Zarr 0.5.

Header conventions (the algebra lives in :mod:`patchmorph_core.spatial`):

* **NIfTI**: the ``(i, j, k)`` file array is returned with its axes reversed, ``(z, y, x) = (k, j, i)``,
  and the sform/qform index→RAS+ affine is re-ordered to map ``(z, y, x)`` indices to world
  ``(S, A, R)`` (:func:`~patchmorph_core.spatial.grid_affine_from_ras`). Unit from ``xyzt_units``
  (``unknown`` → millimeter). Values scaled by the header (``scl_slope``, ``scl_inter``) are read scaled, as
  float (:func:`nifti_value_dtype`).
* **NRRD**: ``space directions`` / ``space origin`` in the header's ``space`` (RAS, LAS, LPS) are
  turned into RAS+ and then re-ordered the same way. Unit from ``space units``; without it, millimeter
  (the NRRD/Slicer convention) unless the largest voxel size is at least :data:`MICROMETER_THRESHOLD`,
  then micrometer: no real image has centimetre voxels, and the Allen CCF files store micrometres
  without a unit.
* ``unit`` arguments *re-interpret* the header's numbers (they say what unit the numbers are in; no
  conversion), ``voxel_size`` replaces the spacing and keeps the direction, ``orientation`` (e.g.
  ``"asr"``) replaces the header's direction and origin by that anatomical layout centred on the world
  origin (:meth:`~patchmorph_core.spatial.Grid.from_orientation`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from patchmorph_core.errors import InputError
from patchmorph_core.labels import check_whole_numbers
from patchmorph_core.spatial import (
    ITK_MAX_SHEAR_DEG,
    NIFTI_FORMS_TOLERANCE,
    NRRD_SPACE_TO_RAS,
    UNIT_IN_MILLIMETER,
    Grid,
    check_spacing,
    grid_affine_from_ras,
    length_unit,
    nearest_orientation_code,
    nifti_forms_gap,
    orientation_code,
    orientation_matrix,
    ras_affine_from_nrrd,
    read_box,
    swap_file_axes,
    swap_file_sizes,
    unit_scale,
)
from pipeline.cluster import scheduler_client
from pipeline.resume import ZARR_METADATA

logger = logging.getLogger(__name__)

MICROMETER_THRESHOLD: float = 10.0
"""An NRRD without ``space units`` whose largest voxel size is at least this is read as micrometer."""

def normalize_unit(unit: str, what: str = "unit") -> str:
    """NGFF unit name for ``unit`` (the spellings of :data:`patchmorph_core.spatial.LENGTH_UNITS`: ``mm``, ``um``,
    ``µm`` with the micro sign or the Greek mu, ``micron``, ``micrometre``, ...); InputError if unknown."""
    name = length_unit(unit)
    if name is None or name not in UNIT_IN_MILLIMETER:
        raise InputError(f"unknown {what} {unit!r}: use one of {', '.join(sorted(UNIT_IN_MILLIMETER))}.")
    return name


def apply_overrides(
    grid: Grid,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    orientation: str | None = None,
    stated_by: str | None = None,
) -> Grid:
    """Apply user overrides to a header-derived grid.

    Args:
        grid: grid read from the file.
        voxel_size: ``(z, y, x)`` spacing replacing the header's (direction and origin kept).
        unit: unit the numbers are in (re-interpretation, not conversion).
        orientation: anatomical orientation code replacing the header's direction; the grid is then
            centred on the world origin — unless the header states that code itself (``stated_by``), then the
            header's grid is kept (its origin included, so other tools still place the file where it lies).
        stated_by: the file, when its header states an orientation (a NIfTI, NRRD or RFC-4 OME-Zarr file): an
            ``orientation`` that contradicts it, or drops its rotation, gets a warning.

    Returns:
        The overridden grid.
    """
    spacing = grid.spacing if voxel_size is None else check_spacing(voxel_size)
    unit_name = grid.unit if unit is None else normalize_unit(unit)
    if orientation is not None:
        orientation_matrix(orientation)  # validates the code before any work
        header = orientation_code(grid.direction)
        if stated_by is not None and header != orientation.lower():
            logger.warning(
                "--orientation %s replaces what the header of %s says (%s): the header's sides and origin are "
                "dropped (the image is centred on the world origin, so give other tools its export-image, not "
                "this file); make sure the header is the wrong one",
                orientation, stated_by,
                f"orientation '{header}'" if header else f"oblique axes, nearest code '{nearest_orientation_code(grid.direction)}', whose rotation is dropped",
            )  # fmt: skip
        if stated_by is None or header != orientation.lower():
            return Grid.from_orientation(grid.shape, spacing, orientation, unit=unit_name)
    if voxel_size is None:
        return Grid(grid.shape, grid.affine, unit_name)
    return Grid.from_spacing(
        grid.shape, spacing, origin=grid.origin, unit=unit_name, direction=grid.direction
    )


def _existing_file(path: str | Path, kind: str) -> Path:
    """``path`` as a Path if it is an existing file, else an InputError naming it."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{kind} input {str(p)!r} does not exist: check the path.")
    if not p.is_file():
        raise InputError(f"{kind} input {str(p)!r} is not a file: give the path of a {kind} file.")
    return p


def nifti_states_orientation(header: Any) -> bool:
    """Whether a NIfTI header places its voxels in the scanner's anatomy: a qform or an sform code above 0. With
    both 0 (ANALYZE's layout) it holds voxel sizes only, and ITK and nibabel each invent another frame."""
    return int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0


def nrrd_states_orientation(header: Mapping[str, Any]) -> bool:
    """Whether an NRRD header names an anatomical ``space`` (RAS, LAS, LPS, ...): without one its axes are plain
    (``spacings``, or directions in a space of no anatomy) and ITK and PatchMorph each read another frame."""
    return str(header.get("space", "")).lower() in NRRD_SPACE_TO_RAS


ALLEN_CCF_NRRD_ORIENTATION: str = "rsa"
"""The true orientation code of the Allen CCFv3 NRRD files' arrays as :func:`load_nrrd` returns them, ``(LR, DV,
AP)``: z from the right, y from superior, x from anterior (BrainGlobe's ``asr`` with the axes reversed). Their
headers say ``left-posterior-superior`` (``iar`` read that way), which is wrong."""

ALLEN_CCF_EXTENT_UM: tuple[int, int, int] = (13200, 8000, 11400)
"""The Allen CCFv3 volume's extent along the NRRD files' axes (AP, DV, LR), in micrometres."""


def allen_ccf_nrrd(header: Mapping[str, Any]) -> bool:
    """Whether an NRRD header is that of an Allen CCFv3 volume (template or annotation at 10, 25, 50 or 100 µm:
    its sizes, its diagonal spacing and its ``left-posterior-superior`` space), whose stated orientation is wrong
    (:data:`ALLEN_CCF_NRRD_ORIENTATION`)."""
    if str(header.get("space", "")).lower() not in ("left-posterior-superior", "lps"):
        return False
    directions = np.asarray(header.get("space directions", np.zeros((3, 3))), dtype=np.float64)
    if directions.shape != (3, 3):
        return False
    step = float(directions[0, 0])
    sizes = [int(n) for n in header.get("sizes", ())]
    return (
        step in (10.0, 25.0, 50.0, 100.0)
        and np.array_equal(directions, np.diag([step] * 3))
        and sizes == [round(extent / step) for extent in ALLEN_CCF_EXTENT_UM]
    )


def nifti_value_dtype(raw: np.dtype, slope: float | None, inter: float | None) -> np.dtype:
    """The dtype of a NIfTI image's values: its stored ``raw`` dtype, or, when the header scales them (``scl_slope``
    other than 1 or ``scl_inter`` other than 0, as nibabel's array proxy holds them), float32 — float64 for 32- and
    64-bit integers and float64, whose scaled values float32 does not hold exactly."""
    if (slope is None or slope == 1.0) and (inter is None or inter == 0.0):
        return np.dtype(raw)
    if np.dtype(raw).itemsize > 4 or (np.dtype(raw).kind in "iu" and np.dtype(raw).itemsize == 4):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def check_nifti_forms(header: Any, shape: Sequence[int], path: str | Path, remedy: str) -> None:
    """Refuse a NIfTI header whose qform and sform both hold (codes above 0) and place the voxels apart.

    nibabel (so PatchMorph) and FSL read such a file by its sform; ITK, ANTs and ITK-SNAP read it by its qform
    unless the sform's code is 1, so the same file would lie elsewhere in those tools.

    Args:
        header: the file's ``nibabel.Nifti1Header`` (or Nifti2).
        shape: the file array's spatial shape ``(I, J, K)``.
        path: the file, for the message.
        remedy: the end of the message: what else the user can do.

    Raises:
        InputError: one sentence naming the file, the distance and the fix.
    """
    if int(header["qform_code"]) <= 0 or int(header["sform_code"]) <= 0:
        return
    gap = nifti_forms_gap(header.get_qform(), header.get_sform(), shape)
    if gap > NIFTI_FORMS_TOLERANCE:
        raise InputError(
            f"NIfTI {str(path)!r} has a qform and an sform that place its voxels up to {gap:.3g} voxels apart, and "
            "tools differ in which they read (nibabel and FSL the sform; ITK, ANTs and ITK-SNAP the qform unless "
            f"the sform code is 1): make the two agree (e.g. fslorient -copysform2qform){remedy}."
        )


def open_nifti(
    path: str | Path,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    orientation: str | None = None,
    slab_depth: int = 64,
) -> tuple[da.Array, Grid]:
    """Open a NIfTI image lazily as a dask ``(Z, Y, X)`` array and its grid (see :func:`load_nifti`).

    The dask array reads the file through nibabel's array proxy in slabs of ``slab_depth`` whole
    ``(j, i)`` planes along the file's slowest axis ``k`` (our ``z``): contiguous byte ranges, so a
    ``.nii.gz`` is decompressed about once, and memory holds a few slabs, never the volume.
    """
    import nibabel as nib

    p = _existing_file(path, "NIfTI")
    try:
        img = nib.load(str(p))
        proxy = img.dataobj
        shape = tuple(int(s) for s in proxy.shape)
    except Exception as err:  # nibabel raises many types for a bad file
        raise InputError(
            f"{str(p)!r} is not a readable NIfTI image ({err}); give a .nii or .nii.gz file."
        ) from err
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(f"{str(p)!r} holds a {len(shape)}-D image: give a single-channel 3-D image.")
    file_chunks = (shape[0], shape[1], slab_depth) + (1,) * (len(proxy.shape) - 3)
    lazy = da.from_array(proxy, chunks=file_chunks, asarray=True)  # dtype: the stored one
    dtype = nifti_value_dtype(proxy.dtype, getattr(proxy, "slope", None), getattr(proxy, "inter", None))
    if dtype != lazy.dtype:  # the proxy returns scaled (float) values: never cast them back to the stored type
        lazy = lazy.map_blocks(functools.partial(np.asarray, dtype=dtype), dtype=dtype)
    lazy = swap_file_axes(lazy.reshape(shape))
    space_unit = img.header.get_xyzt_units()[0]
    header_unit = (
        "millimeter" if space_unit in (None, "unknown") else normalize_unit(space_unit, "NIfTI unit")
    )
    if orientation is None:
        check_nifti_forms(img.header, shape, p, " or give --orientation, which replaces both")
    if nifti_states_orientation(img.header):
        header_grid = Grid(lazy.shape, grid_affine_from_ras(np.asarray(img.affine, dtype=np.float64)), header_unit)
    else:  # voxel sizes only: the plain frame of a file without orientation (TIFF's), not nibabel's guess
        header_grid = Grid.from_spacing(lazy.shape, np.asarray(swap_file_sizes(img.header.get_zooms()), dtype=np.float64), unit=header_unit)
    stated = str(p) if nifti_states_orientation(img.header) else None
    grid = apply_overrides(header_grid, voxel_size, unit, orientation, stated_by=stated)
    return lazy, grid


def load_nifti(
    path: str | Path,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    orientation: str | None = None,
) -> tuple[np.ndarray, Grid]:
    """Read a NIfTI image as a ``(Z, Y, X)`` array and its :class:`Grid` in our RAS+ ``(S, A, R)`` frame.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        voxel_size, unit, orientation: optional overrides, see :func:`apply_overrides`.

    Returns:
        ``(array, grid)``: the file's ``(i, j, k)`` array with axes reversed to ``(z, y, x)`` (data
        scaling applied, the file's dtype otherwise) and its grid (unit from ``xyzt_units``, default
        millimeter).
    """
    import nibabel as nib

    p = _existing_file(path, "NIfTI")
    lazy, grid = open_nifti(p, voxel_size, unit, orientation)
    try:
        data = np.asanyarray(nib.load(str(p)).dataobj)
    except Exception as err:  # a truncated file fails only when its data is read
        raise InputError(f"{str(p)!r} is a truncated or corrupt NIfTI file ({err}); re-export it.") from err
    array = swap_file_axes(np.asarray(data).reshape(swap_file_sizes(lazy.shape)))
    logger.info(
        "read NIfTI %s: shape %s, spacing %s %s", p, array.shape, np.round(grid.spacing, 6), grid.unit
    )
    return array, grid


def _nrrd_unit(header: dict, spacing: np.ndarray) -> str:
    """Unit of an NRRD header's ``space units``; if absent, millimeter or (large spacings) micrometer."""
    units = header.get("space units")
    if units:
        names = {normalize_unit(u, "NRRD space unit") for u in units}
        if len(names) != 1:
            raise InputError(f"NRRD 'space units' {list(units)} mix units: give one unit for all axes.")
        return names.pop()
    if float(np.max(spacing)) >= MICROMETER_THRESHOLD:
        logger.info(
            "NRRD has no 'space units' and voxel size %s >= %g: reading it as micrometer (override with --unit)",
            spacing,
            MICROMETER_THRESHOLD,
        )
        return "micrometer"
    return "millimeter"


def _nrrd_ras_affine(header: dict, path: Path) -> np.ndarray:
    """Index ``(i, j, k)`` → RAS+ affine of an NRRD header (``spacings`` only, or ``space directions`` without a
    ``space``: a plain, unrotated frame of the voxel sizes)."""
    if "space directions" in header:
        directions = np.asarray(header["space directions"], dtype=np.float64)
        if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
            raise InputError(
                f"{str(path)!r} has 'space directions' {directions.tolist()}: a 3-D image needs three finite vectors."
            )
        if "space" in header:
            origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
            return ras_affine_from_nrrd(header["space"], directions, origin)
        # vectors in a space of no anatomy ('space dimension' only): their lengths alone, in the plain frame of a
        # file without orientation, as a NIfTI without qform and sform
    spacings = np.linalg.norm(directions, axis=1) if "space directions" in header else header.get("spacings")
    if spacings is None:
        raise InputError(
            f"{str(path)!r} has neither 'space directions' nor 'spacings': pass --voxel-size Z Y X (in a batch, the "
            "manifest item's voxel_size)."
        )
    affine = np.eye(4)
    affine[:3, :3] = np.diag(np.asarray(spacings, dtype=np.float64))
    return affine


def _drop_single_channel_axis(data: np.ndarray, header: dict) -> tuple[np.ndarray, dict]:
    """A 4-D NRRD array (``index_order="C"``: file axes reversed) whose one non-spatial axis (``space directions``
    ``none``, a ``list``/``vector`` kind) has one value, as a 3-D array with that axis's header entries dropped: a
    single-channel image as Slicer and ITK write a one-component vector volume. Anything else is returned as it is."""
    directions = header.get("space directions")
    if data.ndim != 4 or directions is None or len(directions) != 4:
        return data, header
    rows = [np.asarray(row, dtype=np.float64) if row is not None else np.full(3, np.nan) for row in directions]
    empty = [k for k, row in enumerate(rows) if not np.all(np.isfinite(row))]  # file axis order
    if len(empty) != 1 or data.shape[::-1][empty[0]] != 1:
        return data, header
    k = empty[0]
    kept = dict(header, **{"space directions": np.stack([row for i, row in enumerate(rows) if i != k])})
    for key in ("kinds", "sizes", "spacings", "thicknesses", "centerings", "labels", "units"):
        if isinstance(header.get(key), list | tuple | np.ndarray) and len(header[key]) == 4:
            kept[key] = [v for i, v in enumerate(header[key]) if i != k]
    return data.reshape([n for i, n in enumerate(data.shape) if i != data.ndim - 1 - k]), kept


def load_nrrd(
    path: str | Path,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    orientation: str | None = None,
) -> tuple[np.ndarray, Grid]:
    """Read an NRRD image as a ``(Z, Y, X)`` array and its :class:`Grid` in our RAS+ ``(S, A, R)`` frame.

    Args:
        path: ``.nrrd`` file.
        voxel_size, unit, orientation: optional overrides, see :func:`apply_overrides`.

    Returns:
        ``(array, grid)``: the file's axes reversed (NRRD's first axis is fastest on disk, so it
        becomes ``x``) and the header's geometry in our frame (see module doc for units).
    """
    import nrrd

    p = _existing_file(path, "NRRD")
    try:
        data, header = nrrd.read(str(p), index_order="C")
    except Exception as err:  # pynrrd raises several types for a bad file
        raise InputError(f"{str(p)!r} is not a readable NRRD image ({err}); give a .nrrd file.") from err
    data, header = _drop_single_channel_axis(data, header)
    if data.ndim != 3:
        raise InputError(f"{str(p)!r} holds a {data.ndim}-D array: give a single-channel 3-D NRRD image.")
    if orientation is None and allen_ccf_nrrd(header):
        logger.warning(
            "%s is an Allen CCFv3 NRRD file, whose header's orientation is wrong: give --orientation %s (in a batch, the "
            "manifest item's orientation; its axes, "
            "reversed: left-right from the right, dorsal-ventral from superior, anterior-posterior from anterior)",
            p,
            ALLEN_CCF_NRRD_ORIENTATION,
        )
    ras = _nrrd_ras_affine(header, p)
    header_unit = _nrrd_unit(header, np.linalg.norm(ras[:3, :3], axis=0))
    stated = str(p) if nrrd_states_orientation(header) else None
    grid = apply_overrides(
        Grid(data.shape, grid_affine_from_ras(ras), header_unit), voxel_size, unit, orientation, stated_by=stated
    )
    logger.info("read NRRD %s: shape %s, spacing %s %s", p, data.shape, np.round(grid.spacing, 6), grid.unit)
    return data, grid


# -- TIFF -----------------------------------------------------------------------------------------------
TIFF_SUFFIXES: tuple[str, ...] = (".tif", ".tiff")

PLANE_BAND_BYTES: int = 512 << 20
"""Memory budget of one read task of a plane folder (its band, :func:`_band_shape`): a worker of 2 GiB holds a few."""


def _natural_key(path: Path) -> list[object]:
    """Sort key that orders ``plane_2`` before ``plane_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _plane_numbers(planes: Sequence[Path]) -> list[int] | None:
    """The section number in each plane's name: the one group of digits that varies between the names (None when
    the names do not all have the same groups, or no single group varies)."""
    groups = [re.findall(r"\d+", p.stem) for p in planes]
    if len(planes) < 3 or len({len(g) for g in groups}) != 1:
        return None
    varying = [k for k in range(len(groups[0])) if len({g[k] for g in groups}) > 1]
    return [int(g[varying[0]]) for g in groups] if len(varying) == 1 else None


def _digits(path: Path) -> list[str]:
    """The groups of digits in a file's name, in order."""
    return re.findall(r"\d+", path.name)


def _name_pattern(path: Path) -> str:
    """A plane's file name with every group of digits replaced by ``#`` (``Z001_C2.tif`` → ``Z#_C#.tif``)."""
    return re.sub(r"\d+", "#", path.name)


CHANNEL_MARKER = re.compile(r"(?:^|[^a-z])(?:c|ch|chan|channel)[_ -]?$", re.IGNORECASE)
"""The text before a number in a plane's name that makes it a channel number (``Z001_C2.tif``, ``ch1_z001.tif``)."""


def check_one_series(root: Path, planes: Sequence[Path]) -> None:
    """Refuse a plane folder whose files are not one numbered series of planes: files named unlike the others (a
    projection ``MAX_brain.tif`` beside ``z0001.tif`` ...) or names whose channel number (:data:`CHANNEL_MARKER`)
    takes several values (``Z001_C1.tif``, ``Z001_C2.tif``, ...: channels interleaved, or one after the other). Either
    would be stacked as planes of the brain, silently, when its planes have the same shape and type. Names with two
    plane numbers (``section_001_01.tif``, ``section_001_02.tif``: the physical and optical sections of STP
    microscopes' stitching software) are one series, taken in name order.

    Raises:
        InputError: naming the folder, the files and the fix.
    """
    patterns = Counter(_name_pattern(p) for p in planes)
    pattern, count = patterns.most_common(1)[0]
    if len(planes) < 2 or "#" not in pattern:
        return  # names without numbers: their order is the names'
    odd = [p.name for p in planes if _name_pattern(p) != pattern]
    if odd:
        raise InputError(
            f"plane folder {str(root)!r}: {len(odd)} of {len(planes)} files are named unlike the other {count} "
            f"({pattern.replace('#', 'N')}): {', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}; they would be stacked "
            "as planes of the brain: move them out of the folder."
        )
    before = re.split(r"\d+", planes[0].name)  # the text before each group of digits
    columns = list(zip(*(_digits(p) for p in planes), strict=True))
    channel = next((k for k, c in enumerate(columns) if CHANNEL_MARKER.search(before[k]) and len(set(c)) > 1), None)
    if channel is None:
        return
    first = planes[0]
    second = next(p for p in planes if _digits(p)[channel] != _digits(first)[channel])
    raise InputError(
        f"plane folder {str(root)!r} holds the planes of {len(set(columns[channel]))} channels (e.g. {first.name} and "
        f"{second.name}), which would be stacked together as planes of the brain: put each channel's planes in a "
        "folder of its own."
    )


def check_plane_folder(root: Path, planes: Sequence[Path]) -> tuple[tuple[int, ...], np.dtype]:
    """Refuse a plane folder whose planes differ in shape or type (naming the odd ones out, not the first plane),
    that are not one numbered series (:func:`check_one_series`) or whose section numbers skip a plane, which would
    move every later plane; only the files' headers are read.

    Returns:
        The planes' shape ``(Y, X)`` and type.
    """
    import tifffile

    headers = []
    for path in planes:
        try:
            with tifffile.TiffFile(path) as tif:
                headers.append((tuple(tif.pages[0].shape), tif.pages[0].dtype))
        except Exception as err:  # tifffile raises several types for a bad file
            raise InputError(f"{str(path)!r} is not a readable TIFF plane ({err}); check the folder.") from err
    (shape, dtype), count = Counter(headers).most_common(1)[0]
    odd = [f"{p.name} ({h[0]}, {h[1]})" for p, h in zip(planes, headers, strict=True) if h != (shape, dtype)]
    if odd:
        raise InputError(
            f"plane folder {str(root)!r}: {len(odd)} of {len(planes)} planes differ from the other {count} "
            f"(shape {shape}, {dtype}): {', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}; move them out of the folder."
        )
    if len(shape) != 2:
        raise InputError(f"{str(planes[0])!r} has shape {shape}: each plane must be a 2-D grey image.")
    check_one_series(root, planes)
    numbers = _plane_numbers(planes)
    if numbers is not None:
        steps = np.diff(numbers)
        step = Counter(steps.tolist()).most_common(1)[0][0]
        gaps = [k for k, d in enumerate(steps) if step > 0 and d != step]
        if gaps:
            k = gaps[0]
            raise InputError(
                f"plane folder {str(root)!r} skips section numbers between {planes[k].name} and {planes[k + 1].name} "
                f"(the others go in steps of {step}; {len(gaps)} such place(s)): a missing plane would move every later "
                "plane; put it back (a blank plane of the same size keeps its place), or rename the files if the numbers "
                "are not positions."
            )
    return shape, dtype


def _ome_voxel_size(xml: str) -> tuple[tuple[float, float, float], str] | None:
    """``(z, y, x)`` physical sizes and their unit from an OME-XML's first ``Pixels`` (None unless all three are
    stated in one length unit; OME's default unit is µm)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = [pixels.get(f"PhysicalSize{a}") for a in "ZYX"]
    units = {length_unit(pixels.get(f"PhysicalSize{a}Unit", "µm")) for a in "ZYX"}
    if None in sizes or len(units) != 1 or None in units:
        return None
    return (float(sizes[0]), float(sizes[1]), float(sizes[2])), str(units.pop())


def tiff_stated_voxel_size(path: str | Path) -> tuple[tuple[float, float, float], str, str] | None:
    """The voxel size that a TIFF stack's own metadata states, which PatchMorph does not take as the voxel size (a
    TIFF's metadata is often a default or stale): OME-XML's ``PhysicalSizeZ/Y/X``, or ImageJ's ``spacing`` and
    ``unit`` with the X/YResolution tags (pixels per unit). Only the file's header is read.

    Returns:
        ``((z, y, x), unit, "OME" or "ImageJ")`` in the metadata's unit (an NGFF unit name), or None when the file
        states no complete voxel size in a length unit (or cannot be read).
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome and tif.ome_metadata:
                found = _ome_voxel_size(tif.ome_metadata)
                return None if found is None else (*found, "OME")
            meta = tif.imagej_metadata if tif.is_imagej else None
            tags = tif.pages[0].tags
            if not meta or "spacing" not in meta or "XResolution" not in tags or "YResolution" not in tags:
                return None
            unit = length_unit(str(meta.get("unit", "")).replace("\\u00b5", "\u00b5"))
            per_unit = [tags[name].value for name in ("YResolution", "XResolution")]  # (numerator, denominator)
            if unit is None or any(num <= 0 or den <= 0 for num, den in per_unit):
                return None
            y, x = (den / num for num, den in per_unit)
            return (float(meta["spacing"]), float(y), float(x)), unit, "ImageJ"
    except Exception:  # noqa: BLE001 — an unreadable file is refused by its reader, with its own sentence
        return None


def _no_voxel_size(what: str, stated: tuple[tuple[float, float, float], str, str] | None = None) -> InputError:
    if stated is not None:
        (z, y, x), unit, source = stated
        return InputError(
            f"{what} carries no voxel size that PatchMorph reads (it takes none from a TIFF's metadata, often a "
            f"default or stale); its {source} metadata says {z:g} × {y:g} × {x:g} {unit} (Z Y X): if that is right, pass --voxel-size {z:g} {y:g} {x:g} "
            f"--unit {unit} (and --orientation; in a batch, the manifest item's voxel_size, unit and orientation)."
        )
    return InputError(
        f"{what} carries no voxel size: pass --voxel-size Z Y X (and --unit, --orientation; in a batch, the manifest "
        "item's voxel_size, unit and orientation)."
    )


def _plain_grid(
    shape: Sequence[int],
    voxel_size: Sequence[float] | None,
    unit: str | None,
    orientation: str | None,
    what: str,
) -> Grid:
    """Grid of a file without geometry (TIFF): needs ``voxel_size``; default unit micrometer."""
    if voxel_size is None:
        raise _no_voxel_size(what)
    spacing = check_spacing(voxel_size)
    unit_name = "micrometer" if unit is None else normalize_unit(unit)
    if orientation is not None:
        return Grid.from_orientation(shape, spacing, orientation, unit=unit_name)
    return Grid.from_spacing(shape, spacing, unit=unit_name)


def _segment_shape(path: Path) -> tuple[int, int] | None:
    """Rows and columns ``(rows, cols)`` of the strips or tiles a TIFF plane is decoded in, or None for an
    uncompressed plane stored in one run of bytes (read through a memory map: only the region's bytes, nothing
    decoded)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return None if page.is_memmappable else (int(page.chunks[-2]), int(page.chunks[-1]))


def _band_shape(
    plane_shape: tuple[int, ...], itemsize: int, block: tuple[int, ...], segment: tuple[int, int] | None
) -> tuple[int, int]:
    """Rows and columns ``(H, W)`` of the band that one read task takes from each of its planes, so that each strip
    or tile is decoded about once: every column of a band of rows (a multiple of the write block's ``(Y, X)`` and
    at least a strip's height), in column groups narrowed to multiples of the block's width only as far as
    :data:`PLANE_BAND_BYTES` requires for ``block[0]`` planes.

    Args:
        plane_shape: ``(Y, X)`` of a plane (voxels).
        itemsize: bytes per voxel.
        block: the output's write block ``(z, y, x)`` (voxels).
        segment: :func:`_segment_shape` of the planes.

    Returns:
        ``(H, W)`` in voxels: multiples of ``block[1:]`` (a band's write blocks are cut from it whole).
    """
    bz, by, bx = block
    height, width = plane_shape
    seg_rows = 1 if segment is None else segment[0]
    rows = min(-(-seg_rows // by) * by, -(-height // by) * by)
    rows = max(by, min(rows, PLANE_BAND_BYTES // (bz * bx * itemsize) // by * by))
    cols = max(bx, PLANE_BAND_BYTES // (bz * rows * itemsize) // bx * bx)
    return rows, min(cols, -(-width // bx) * bx)


def _read_plane_region(path: Path, rows: slice, cols: slice, plane_shape: tuple[int, ...]) -> np.ndarray:
    """Rows/cols of one TIFF plane: through a memory map of an uncompressed plane (only their bytes read), else by
    decoding the strips/tiles they touch (tifffile's zarr view)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if tuple(page.shape) != plane_shape:
            raise InputError(
                f"plane {str(path)!r} has shape {page.shape}, not {plane_shape}: fix the folder."
            )
        if not page.is_memmappable:
            with tif.aszarr(key=0) as store:
                return np.asarray(zarr.open(store, mode="r")[rows, cols])
    return np.array(tifffile.memmap(path, page=0, mode="r")[rows, cols])


def _read_block(
    paths: Sequence[Path], rows: slice, cols: slice, plane_shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """A ``(len(paths), rows, cols)`` block of a plane folder."""
    block = np.empty((len(paths), rows.stop - rows.start, cols.stop - cols.start), dtype=dtype)
    for index, path in enumerate(paths):
        block[index] = _read_plane_region(path, rows, cols, plane_shape)
    return block


def plane_files(folder: Path) -> list[Path]:
    """The TIFF planes of a plane folder, one per ``z``, in natural name order (``plane_2`` before ``plane_10``).

    Raises:
        InputError: the folder holds no TIFF planes.
    """
    planes = sorted((p for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES), key=_natural_key)
    if not planes:
        raise InputError(
            f"{str(folder)!r} holds no TIFF planes and no OME-Zarr metadata: give a folder of .tif planes, "
            "a TIFF stack, NIfTI, NRRD or OME-Zarr image."
        )
    return planes


def open_tiff_planes(
    folder: str | Path,
    voxel_size: Sequence[float] | None,
    unit: str | None = None,
    orientation: str | None = None,
    chunks: Sequence[int] | None = None,
) -> tuple[da.Array, Grid]:
    """Open a folder of 2-D TIFF planes (one per ``z``, natural name order) as a lazy ``(Z, Y, X)`` array.

    The dask blocks are the output's write units (:func:`pipeline.ngff.layout_block` with ``chunks``), cut from
    read tasks that each take a band of rows and columns (:func:`_band_shape`) from a write block's depth of planes,
    so that a plane's strips or tiles are decoded about once, not once per write block they cross; memory is
    bounded by :data:`PLANE_BAND_BYTES` per task, never by the plane or stack size.
    """
    from pipeline.ngff import layout_block

    root = Path(folder)
    planes = plane_files(root)
    plane_shape, dtype = check_plane_folder(root, planes)
    shape = (len(planes), *plane_shape)
    grid = _plain_grid(shape, voxel_size, unit, orientation, f"TIFF plane folder {str(root)!r}")
    block = layout_block(shape, dtype, chunks)
    bz = block[0]
    height, width = _band_shape(plane_shape, dtype.itemsize, block, _segment_shape(planes[0]))
    rows_of = [slice(y, min(y + height, shape[1])) for y in range(0, shape[1], height)]
    cols_of = [slice(x, min(x + width, shape[2])) for x in range(0, shape[2], width)]
    bands = [
        [
            [
                da.from_delayed(
                    dask.delayed(_read_block)(planes[z : z + bz], rows, cols, plane_shape, dtype),
                    shape=(len(planes[z : z + bz]), rows.stop - rows.start, cols.stop - cols.start),
                    dtype=dtype,
                )
                for cols in cols_of
            ]
            for rows in rows_of
        ]
        for z in range(0, shape[0], bz)
    ]
    return da.block(bands).rechunk(block), grid


def check_stack_pages(path: Path) -> str:
    """Refuse a TIFF stack without shape metadata whose pages differ in shape or type before its last plane: tifffile
    reads such a file as a ``uniform`` series (every page taken to have the first page's shape: an odd page is read
    into wrong values) or as a ``generic`` one (the pages of one shape, wherever they lie: an odd page is left out and
    every later plane moves up). Pages after the last plane (a preview) are another image and are left alone. Only
    the pages' headers are read.

    Returns:
        The axes tifffile names the stack's first series by (e.g. ``ZCYX`` for a hyperstack).

    Raises:
        InputError: naming the file, the odd pages and the fix.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        axes = str(tif.series[0].axes)
        if tif.series[0].kind.lower() not in ("uniform", "generic"):
            return axes  # ImageJ, OME and shaped series are described by their metadata
        tif.pages.useframes = False  # each page's own header, not the first page's
        headers = [(tuple(tif.pages[k].shape), tif.pages[k].dtype) for k in range(len(tif.pages))]
    (shape, dtype), count = Counter(headers).most_common(1)[0]
    last = max(k for k, h in enumerate(headers) if h == (shape, dtype))
    odd = [f"page {k + 1} ({h[0]}, {h[1]})" for k, h in enumerate(headers[:last]) if h != (shape, dtype)]
    if odd:
        raise InputError(
            f"TIFF stack {str(path)!r}: {len(odd)} of {len(headers)} pages differ from the other {count} (shape {shape}, "
            f"{dtype}): {', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}; they would be read into wrong values or left "
            "out, moving every later plane: the file is damaged or holds pages of several images; export the stack again."
        )
    return axes


def _tiff_channel(lazy: da.Array, axes: str, channel: int, path: Path) -> da.Array:
    """Channel ``channel`` of a TIFF stack's array ``lazy`` whose axes tifffile names ``axes`` (``C``: channels)."""
    from pipeline.ngff import check_channel_index

    if "C" not in axes or len(axes) != lazy.ndim:
        raise InputError(f"{str(path)!r} has no channel axis (its axes are {axes}): leave out --channel-index.")
    check_channel_index(channel, lazy.shape[axes.index("C")], path)
    return lazy[tuple(channel if a == "C" else slice(None) for a in axes)]


def open_tiff_stack(
    path: str | Path,
    voxel_size: Sequence[float] | None,
    unit: str | None = None,
    orientation: str | None = None,
    channel_index: int | None = None,
) -> tuple[da.Array, Grid]:
    """Open a multi-page TIFF stack lazily (through tifffile's zarr view) as a ``(Z, Y, X)`` dask array; of a
    pyramidal (OME-)TIFF, its full-resolution level; of a multi-channel stack (an ImageJ hyperstack or OME-TIFF
    with a ``C`` axis), channel ``channel_index`` (0-based)."""
    import tifffile

    p = _existing_file(path, "TIFF")
    try:
        axes = check_stack_pages(p)  # e.g. 'ZCYX' for a hyperstack
        store = tifffile.imread(p, aszarr=True, level=0)  # a pyramid's store would be a group of levels
        lazy = da.from_zarr(zarr.open(store, mode="r"))
    except InputError:
        raise
    except Exception as err:  # tifffile / zarr raise several types for a bad file
        raise InputError(f"{str(p)!r} is not a readable TIFF stack ({err}); give a 3-D .tif file.") from err
    if channel_index is not None:
        lazy = _tiff_channel(lazy, axes, channel_index, p)
    shape = tuple(s for s in lazy.shape if s != 1) if lazy.ndim > 3 else lazy.shape
    if len(shape) != 3:
        channels = "; pick one channel with --channel-index N (N from 0)" if "C" in axes else ""
        raise InputError(f"{str(p)!r} has shape {lazy.shape} (axes {axes}): give a single-channel 3-D TIFF stack{channels}.")
    lazy = lazy.reshape(shape)
    what = f"TIFF stack {str(p)!r}"
    if voxel_size is None:
        raise _no_voxel_size(what, tiff_stated_voxel_size(p))
    return lazy, _plain_grid(lazy.shape, voxel_size, unit, orientation, what)


def warn_tiff_voxel_size(path: str | Path, grid: Grid) -> None:
    """Warn when the voxel size a TIFF stack was given (``grid``'s) differs by more than 1 % from the one its OME or
    ImageJ metadata states (:func:`tiff_stated_voxel_size`): a size typed from memory, or in another order."""
    stated = tiff_stated_voxel_size(path)
    if stated is None:
        return
    (z, y, x), stated_unit, source = stated
    in_grid_unit = np.asarray([z, y, x]) * unit_scale(stated_unit, grid.unit)
    if not np.allclose(in_grid_unit, grid.spacing, rtol=0.01, atol=0.0):
        logger.warning(
            "TIFF stack %s: --voxel-size %s %s differs from what its %s metadata says (%g %g %g %s, Z Y X): the "
            "option's is used; make sure it is the right one", path, " ".join(f"{v:g}" for v in grid.spacing),
            grid.unit, source, z, y, x, stated_unit,
        )  # fmt: skip


# -- any input ------------------------------------------------------------------------------------------
_CHANNEL_SUFFIX = re.compile(r"(.+):([0-9]+)")


def channel_option(channel_index: int | None) -> dict[str, int]:
    """``{"channel_index": N}`` for a channel of a multi-channel input, else empty: what records, identities and
    fingerprints of a conversion add for it (those of a single-channel input stay as they were)."""
    return {} if channel_index is None else {"channel_index": channel_index}


@dataclass(frozen=True)
class ImageChannel:
    """An input image, or one channel (``index``, 0-based) of a multi-channel OME-Zarr image or TIFF stack.

    Written ``PATH`` or ``PATH:N`` (:meth:`parse`), e.g. ``brain.zarr:1`` for channel 1 of ``brain.zarr``."""

    path: Path
    index: int | None = None

    @classmethod
    def parse(cls, text: str | Path, folder: Path | None = None) -> ImageChannel:
        """``PATH`` or ``PATH:N`` (channel N of PATH; a path that exists as typed is a path, even with a colon),
        a relative ``PATH`` taken from ``folder`` when given."""
        raw = str(text)
        whole = Path(raw) if folder is None else folder / raw
        match = _CHANNEL_SUFFIX.fullmatch(raw)
        if match is None or whole.exists():
            return cls(whole)
        path = Path(match[1]) if folder is None else folder / match[1]
        return cls(path, int(match[2]))

    def __str__(self) -> str:
        return str(self.path) if self.index is None else f"{self.path}:{self.index}"

    def name(self) -> str:
        """A file-system-safe name: the file's (of a bioformats2raw series ``x.zarr/0``, the store's) before its
        first dot, with ``_ch<N>`` for a channel: ``brain.zarr:1`` → ``brain_ch1``."""
        from pipeline.ngff import series_store

        stem = series_store(self.path).name.split(".")[0]
        base = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem) or "channel"
        return base if self.index is None else f"{base}_ch{self.index}"


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ZARR_METADATA)


def open_input(
    path: str | Path,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    orientation: str | None = None,
    chunks: Sequence[int] | None = None,
    channel_index: int | None = None,
) -> tuple[da.Array, Grid, str]:
    """Open any supported input lazily as ``(dask (Z, Y, X), Grid, kind)``.

    ``kind`` is one of ``"ome-zarr"``, ``"tiff-planes"``, ``"tiff-stack"``, ``"nifti"``, ``"nrrd"``.
    Overrides as in :func:`apply_overrides`; TIFF inputs need ``voxel_size``. ``chunks``: the output's
    spatial chunk shape (plane folders and OME-Zarr images are read in its write units). ``channel_index``: the channel (0-based) of a
    multi-channel OME-Zarr image (its ``c`` axis) or TIFF stack (its ``C`` axis); other inputs hold one channel.
    """
    from pipeline.ngff import image_orientation, layout_block, read_channel, read_image

    p = Path(path)
    if not p.exists():
        raise InputError(f"input {str(p)!r} does not exist: check the path.")
    name = p.name.lower()
    if channel_index is not None and not (_is_zarr(p) or (p.is_file() and name.endswith(TIFF_SUFFIXES))):
        raise InputError(
            f"--channel-index picks a channel of an OME-Zarr image or a TIFF stack; {str(p)!r} holds one: leave it out."
        )
    if _is_zarr(p):
        level = read_image(p).levels[0] if channel_index is None else read_channel(p, channel_index)
        # read in the output's write units: one task a unit, not one per stored chunk rechunked (on a cluster the
        # chunks of a unit were read on several workers and sent to one)
        block = layout_block(level.array.shape, level.array.dtype, chunks)
        array = level.array.rechunk(block) if isinstance(level.array, da.Array) else da.from_zarr(level.array, chunks=block)
        stated = str(p) if image_orientation(p) is not None else None
        return array, apply_overrides(level.grid, voxel_size, unit, orientation, stated), "ome-zarr"
    if p.is_dir():
        return (*open_tiff_planes(p, voxel_size, unit, orientation, chunks), "tiff-planes")
    if name.endswith((".nii", ".nii.gz")):
        return (*open_nifti(p, voxel_size, unit, orientation), "nifti")
    if name.endswith(".nrrd"):
        array, grid = load_nrrd(p, voxel_size, unit, orientation)  # pynrrd reads whole files
        return da.from_array(array, chunks=64), grid, "nrrd"
    if name.endswith(TIFF_SUFFIXES):
        return (*open_tiff_stack(p, voxel_size, unit, orientation, channel_index), "tiff-stack")
    raise InputError(
        f"{str(p)!r} is not a supported image: give a TIFF plane folder, a TIFF stack (.tif), NIfTI "
        "(.nii/.nii.gz), NRRD (.nrrd) or OME-Zarr (.zarr folder)."
    )


PREVIEW_SIZE = 512
"""Largest side (pixels) of a preview plane; larger planes are read with a stride."""


def preview(
    input: str | Path,
    png: str | Path,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    orientation: str | None = None,
) -> Path:
    """The three mid-planes of any supported input, labelled with the anatomical sides that ``orientation``
    (or the header's, else none) puts at their edges (:func:`pipeline.qc.orientation_preview`).

    Only the three planes are read (with a stride so that no side exceeds :data:`PREVIEW_SIZE`).
    """
    from patchmorph_core.spatial import orientation_code
    from pipeline.qc import orientation_preview

    png = Path(png)
    if not png.parent.is_dir():
        raise InputError(f"the folder {png.parent} of the preview {png} does not exist: create it first.")
    from pipeline.ngff import image_orientation

    default_voxels = (1.0, 1.0, 1.0) if kind_needs_voxels(input) else None  # a preview needs no voxel size
    array, grid, kind = open_input(input, voxel_size or default_voxels, unit, orientation)
    if orientation is not None:
        code: str | None = orientation.lower()
    elif kind in ("nifti", "nrrd"):
        code = orientation_code(grid.direction)
    elif kind == "ome-zarr":
        code = image_orientation(input)
    else:
        code = None
    planes, stride = input_mid_planes(input, array, kind)
    spacing = grid.spacing * np.asarray(stride)
    return orientation_preview(planes, spacing, png, code, Path(input).name, shape=tuple(array.shape))


def _mid_plane_strides(shape: Sequence[int]) -> tuple[list[int], list[int]]:
    """Strides per axis so that no side of a mid-plane of an array of ``shape`` exceeds :data:`PREVIEW_SIZE`, and the
    array's centre index per axis."""
    return [max(1, -(-int(n) // PREVIEW_SIZE)) for n in shape], [int(n) // 2 for n in shape]


def mid_planes(array: Any) -> tuple[list[np.ndarray], list[int]]:
    """The three mid-planes (across axes 0, 1, 2) of a ``(Z, Y, X)`` array, read with a stride per axis so that
    no side exceeds :data:`PREVIEW_SIZE`; returns the planes and the strides. Only the blocks of ``array`` these planes
    cross are read (a plane folder's mid planes: :func:`input_mid_planes`)."""
    stride, centre = _mid_plane_strides(array.shape)
    sz, sy, sx = (slice(None, None, st) for st in stride)
    planes = [array[centre[0], sy, sx], array[sz, centre[1], sx], array[sz, sy, centre[2]]]
    return [np.asarray(p.compute(scheduler="synchronous") if hasattr(p, "compute") else p) for p in planes], stride


def input_mid_planes(path: str | Path, array: Any, kind: str) -> tuple[list[np.ndarray], list[int]]:
    """:func:`mid_planes` of an input :func:`open_input` opened as ``(array, _, kind)``. A plane folder's are read
    from its files: the mid plane, and one row and one column of every ``stride``-th plane, not through the
    array, whose read tasks take bands of whole planes (the planes across ``y`` and ``x`` would read the stack)."""
    if kind != "tiff-planes":
        return mid_planes(array)
    files = plane_files(Path(path))
    stride, (cz, cy, cx) = _mid_plane_strides(array.shape)
    plane_shape = tuple(int(n) for n in array.shape[1:])
    sz, sy, sx = (slice(None, None, st) for st in stride)
    whole_rows, whole_cols = slice(0, plane_shape[0]), slice(0, plane_shape[1])
    across_z = _read_plane_region(files[cz], whole_rows, whole_cols, plane_shape)[sy, sx]
    across_y = np.stack([_read_plane_region(f, slice(cy, cy + 1), whole_cols, plane_shape)[0, sx] for f in files[sz]])
    across_x = np.stack([_read_plane_region(f, whole_rows, slice(cx, cx + 1), plane_shape)[sy, 0] for f in files[sz]])
    return [across_z, across_y, across_x], stride


def check_whole_labels(array: Any, path: str | Path, kind: str = "") -> None:
    """Refuse a label map of floating-point values that are not whole numbers on its mid-planes (an intensity image,
    or labels resampled by interpolation): their ids would be cut to integers that name no structure. ``kind``: how
    :func:`open_input` opened ``path`` as ``array`` (:func:`input_mid_planes` reads a plane folder's mid planes from
    its files); empty: read through ``array``.

    Raises:
        InputError: naming the file, a value and the fix.
    """
    if not np.issubdtype(np.dtype(array.dtype), np.floating):
        return
    check_whole_numbers(
        np.concatenate([plane.ravel() for plane in input_mid_planes(path, array, kind)[0]]),
        f"label map {path}",
        "give the label image itself (integer ids; resampled only by nearest neighbour), or convert an intensity "
        "image without --labels.",
        skip_nonfinite=True,
    )


@contextlib.contextmanager
def read_errors(path: str | Path) -> Iterator[None]:
    """Turn a reader's failure while the data is read (lazily opened inputs fail only then) into an InputError
    that names ``path`` as truncated or corrupt; an InputError passes as it is."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, RuntimeError, EOFError, IndexError, zlib.error) as err:
        raise InputError(
            f"{str(path)!r} cannot be read to its end ({type(err).__name__}: {err}); it is truncated or corrupt: "
            "export it again (nothing was written)."
        ) from err


def check_source_planes(
    path: str | Path, role: str, opened: tuple[da.Array, Grid, str] | None = None, **geometry: Any
) -> None:
    """Refuse an input whose three mid-planes (:func:`mid_planes`, a few MB read from any size) are constant or
    hold NaN or infinite values, before it is converted: an empty or wrong file of a terabyte brain is refused
    in seconds instead of after its conversion (:func:`pipeline.checks.check_image` checks the whole image,
    coarsely, after it). ``opened``: what :func:`open_input` gave for ``path`` and ``geometry`` already (else it is
    opened here); ``geometry``: :func:`open_input`'s options, ``channel_index`` too.

    Raises:
        InputError: naming the input and the fix.
    """
    array, _, kind = open_input(path, **geometry) if opened is None else opened
    with read_errors(path):
        planes, stride = input_mid_planes(path, array, kind)
        if kind == "ome-zarr":
            check_levels_agree(path, role, planes, stride, geometry.get("channel_index"))
        values = np.concatenate([p.ravel() for p in planes])
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        raise InputError(f"{role} {path} contains NaN or infinite values (in its mid-planes): replace them (e.g. by 0) first.")
    if values.size and values.min() == values.max():
        raise InputError(
            f"{role} {path} looks empty: its three mid-planes are constant (every voxel is {values.flat[0]:g}); "
            "give the image with the tissue (the right channel or file)."
        )


EMPTY_IN_TISSUE = 0.3
"""An OME-Zarr input is taken for incomplete when its level 0 reads as its fill value at more than this share of a
mid-plane's tissue (where its coarsest level holds tissue)."""


def check_levels_agree(
    path: str | Path, role: str, planes: Sequence[np.ndarray], stride: Sequence[int], channel: int | None = None
) -> None:
    """Refuse an OME-Zarr input whose level 0 reads as its fill value where its coarsest level holds tissue, on one
    of the three mid-planes (:func:`mid_planes`, read already, with ``stride``): a store that another tool is still
    writing, or that lost chunks, reads its missing chunks as the fill value (Zarr's rule), and the registration
    then squeezes the atlas into the part that is there. Tissue is where the coarsest level (read whole; small)
    exceeds a tenth of its 99.5th percentile, at the coarse voxel that holds each plane voxel's centre. ``channel``:
    of a multi-channel image, the channel the planes are of.

    Raises:
        InputError: naming the plane and the share.
    """
    from pipeline.ngff import read_image

    image = read_image(path, channel=channel)
    if len(image.levels) < 2:
        return
    fine, coarsest = image.levels[0], image.levels[-1]
    fill = getattr(fine.array, "fill_value", 0) or 0
    coarse = np.asarray(read_box(coarsest.array, tuple(slice(0, n) for n in coarsest.grid.shape)), dtype=np.float64)
    level = np.percentile(coarse, 99.5) / 10.0
    if level <= 0:
        return
    centre = [n // 2 for n in fine.grid.shape]
    for axis, plane in enumerate(planes):
        index = np.stack(np.meshgrid(*[
            [centre[axis]] if k == axis else np.arange(0, fine.grid.shape[k], stride[k]) for k in range(3)
        ], indexing="ij"), axis=-1).reshape(-1, 3)  # fmt: skip
        at = np.rint(coarsest.grid.world_to_index(fine.grid.index_to_world(index))).astype(int)
        at = np.clip(at, 0, np.asarray(coarsest.grid.shape) - 1)
        tissue = coarse[tuple(at.T)] > level
        if tissue.sum() < 100:
            continue
        share = float(np.mean(np.asarray(plane).ravel()[tissue] == fill))
        if share > EMPTY_IN_TISSUE:
            raise InputError(
                f"{role} {path} is incomplete: its full-resolution level reads as empty (the fill value, {fill:g}) on "
                f"{100 * share:.0f} % of the tissue that its coarsest level shows on the mid-plane across axis "
                f"{'zyx'[axis]}: chunks are missing (a store still being written, or damaged); wait until it is written "
                "whole, or write it again."
            )


def kind_needs_voxels(path: str | Path) -> bool:
    """True for inputs whose files carry no voxel size (TIFF stacks and plane folders)."""
    p = Path(path)
    return p.name.lower().endswith(TIFF_SUFFIXES) or (p.is_dir() and not _is_zarr(p))


def check_geometry_options(
    path: str | Path,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    orientation: str | None = None,
) -> None:
    """What the geometry options and the kind of an existing input alone decide, checked without reading the
    image (before a job creates anything): a TIFF input has a voxel size, and the voxel size, unit and
    orientation code are valid. :func:`open_input` checks the rest (the files themselves).

    Raises:
        InputError: one sentence naming the input and the option to give.
    """
    p = Path(path)
    if voxel_size is not None:
        check_spacing(voxel_size)
    elif kind_needs_voxels(p):
        stated = tiff_stated_voxel_size(p) if p.is_file() else None
        raise _no_voxel_size(f"TIFF {'plane folder' if p.is_dir() else 'stack'} {str(p)!r}", stated)
    if unit is not None:
        normalize_unit(unit)
    if orientation is not None:
        orientation_matrix(orientation)


def stated_orientation(path: str | Path, kind: str) -> str | None:
    """Where the file itself states its anatomical orientation: ``"header"`` (NIfTI/NRRD), ``"rfc4"`` (OME-Zarr
    axes) or what an earlier PatchMorph conversion recorded; None when it states none (TIFF, a plain OME-Zarr, a
    NIfTI whose qform and sform codes are 0, an NRRD without an anatomical ``space``)."""
    from pipeline.ngff import ASSUMED, image_orientation

    if kind == "nifti":
        import nibabel as nib

        return "header" if nifti_states_orientation(nib.load(str(path)).header) else None
    if kind == "nrrd":
        import nrrd

        return "header" if nrrd_states_orientation(nrrd.read_header(str(path))) else None
    if kind == "ome-zarr":
        if image_orientation(path) is not None:
            return "rfc4"
        earlier = dict(zarr.open_group(str(path), mode="r").attrs).get("patchmorph", {}).get("orientation_source")
        if earlier not in (None, ASSUMED):
            return str(earlier)  # a PatchMorph image with an oblique (non-RFC-4) orientation from a header
    return None


def orientation_source(path: str | Path, kind: str, orientation: str | None) -> str:
    """Where an input's anatomical orientation comes from: ``"option"`` (given), ``"header"`` (NIfTI/NRRD),
    ``"rfc4"`` (OME-Zarr axes), or :data:`pipeline.ngff.ASSUMED` — then a warning says how the axes are read.
    """
    from pipeline.ngff import ASSUMED

    if orientation is not None:
        return "option"
    found = stated_orientation(path, kind)
    if found is not None:
        return found
    logger.warning(
        "%s carries no anatomical orientation: its axes are read as z -> superior, y -> anterior, x -> right "
        "(code 'ipl'); if that is wrong the atlas will come out rotated: pass --orientation (find the code "
        "with 'patchmorph convert --preview')",
        path,
    )
    return ASSUMED


def convert(
    input: str | Path,
    output: str | Path,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    orientation: str | None = None,
    overwrite: bool = False,
    labels: bool = False,
    chunks: Sequence[int] | None = None,
    n_levels: int | None = None,
    channel_index: int | None = None,
    scheduler: str | None = None,
) -> Path:
    """Convert a TIFF plane folder, TIFF stack, NIfTI, NRRD or OME-Zarr 0.4 image to OME-Zarr 0.5.

    Streams chunk by chunk (bounded memory, except NRRD which pynrrd reads whole); keeps the full
    index→world matrix (see :mod:`pipeline.ngff`). A conversion killed part-way and started again with the same
    input and settings resumes: the slabs of planes it wrote are kept (``fingerprint`` of :func:`pipeline.ngff.write_image`).

    Args:
        input: the source image.
        output: the ``.zarr`` folder to write.
        voxel_size: ``(z, y, x)`` voxel size (required for TIFF; overrides headers otherwise).
        unit: the unit of the voxel size / header numbers (default: header, else micrometer for TIFF).
        orientation: anatomical orientation code of the array axes (e.g. ``"psl"``); overrides headers.
        overwrite: replace an existing output.
        labels: write a label image (nearest-neighbour pyramid).
        chunks: spatial chunk shape; default 64³.
        n_levels: pyramid levels; default automatic.
        channel_index: the channel (0-based) of a multi-channel OME-Zarr image or TIFF stack to convert.
        scheduler: the Dask cluster whose workers read and write the blocks and the pyramid (its address or a
            cluster YAML, :func:`pipeline.cluster.scheduler_client`), else None (threads of this process).

    Returns:
        The output path.
    """
    from pipeline.checks import check_outputs, check_writable
    from pipeline.ngff import check_output, series_store, write_image
    from pipeline.resume import code_identity, content_identity, output_lock

    check_outputs(inputs={"input": input}, outputs={"output": output})
    out = check_output(output, overwrite)  # fail fast, before reading anything
    array, grid, kind = open_input(input, voxel_size, unit, orientation, chunks, channel_index)
    if kind == "tiff-stack":
        warn_tiff_voxel_size(input, grid)
    if labels:
        check_whole_labels(array, input, kind)
    if grid.shear_deg > ITK_MAX_SHEAR_DEG:
        logger.warning(
            "%s lies on a sheared grid (its axes %.2g° from right angles): it is registered as it lies, but ITK and "
            "ANTs cannot read images or fields on its grid (export-field refuses them)", input, grid.shear_deg,
        )  # fmt: skip
    source = orientation_source(input, kind, orientation)
    logger.info(
        "converting %s %s: shape %s, voxel size %s %s, direction %s",
        kind,
        input,
        grid.shape,
        np.round(grid.spacing, 6).tolist(),
        grid.unit,
        np.round(grid.direction, 6).tolist(),
    )
    provenance = {
        "source": str(input),
        "source_kind": kind,
        "orientation": orientation,
        "orientation_source": source,
        **channel_option(channel_index),
    }
    check_writable(out.parent)
    settings = {  # a conversion of another channel into this output resumes none of its slabs
        "voxel_size": voxel_size, "unit": unit, "orientation": orientation, "labels": labels,
        **channel_option(channel_index),
    }  # fmt: skip
    fingerprint = {
        "input": content_identity(input), **settings, "chunks": chunks, "n_levels": n_levels, "code": code_identity()
    }
    with output_lock(out), read_errors(input), scheduler_client(scheduler) as client:
        write_image(
            out,
            array,
            grid,
            name=series_store(input).name.split(".")[0],
            labels=labels,
            chunks=chunks,
            overwrite=overwrite,
            extra_attrs=provenance,
            n_levels=n_levels,
            fingerprint=fingerprint,
            client=client,
        )
    logger.info("wrote %s (OME-Zarr 0.5)", out)
    return out
