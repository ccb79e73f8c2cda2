"""Resampling images and label maps through a displacement, and inverting displacement fields.

Forward warp (moving image into fixed space): for every voxel centre ``x`` of a target block of the fixed
grid, ``out(x) = M(x + u(x))`` where ``u`` is the registration field (fixed → moving, see
:mod:`patchmorph_core.spatial`). Intensities are trilinear (``linear``); label maps take, at each point, the
label with the largest summed trilinear weight among its 8 neighbouring voxels (``vote``, :func:`vote_labels`:
label-wise linear interpolation, ANTs' ``GenericLabel``), or the nearest voxel's label (``nearest``).

Inverse warp (fixed-space image or atlas labels onto the moving image's grid): the inverse displacement
``v`` with ``φ⁻¹(y) = y + v(y)`` is obtained by **damped fixed-point iteration** ``v ← v − λ (v + u(y + v))``
(:func:`patchmorph_core.displacement.invert_points`), evaluated point by point, so a block of the moving
grid needs only the part of ``u`` its points map through — no second registration. The iteration converges
for fold-free, moderately distorted fields; :func:`invert_field` reports the residual
``|v(y) + u(y + v(y))|`` (max and mean, world units) so every inverse carries its measured error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from patchmorph_core.displacement import INVERSE_ITERATIONS, Displacement, FieldDisplacement, invert_points
from patchmorph_core.sampling import (
    is_separable,
    sample_affine,
    sample_indices,
    sample_separable,
    shifted_indices,
)
from patchmorph_core.source import Level, MultiscaleImage, cache_box
from patchmorph_core.spatial import (
    ALIGN_CORNERS,
    Grid,
    index_box,
    index_rows_to_normalized,
    integer_offset,
    read_box,
    row_box,
    world_box,
)


def _level_for(moving: MultiscaleImage | Level, target: Grid) -> Level:
    """The moving level to read for ``target`` (matching its finest spacing), in ``target.unit``."""
    if isinstance(moving, MultiscaleImage):
        moving = moving.level_for_grid(target)
    elif moving.grid.unit != target.unit:
        moving = Level(moving.array, moving.grid.with_unit(target.unit))
    return moving


def sub_boxes(shape: Sequence[int], cube: Sequence[int]) -> list[tuple[slice, slice, slice]]:
    """Boxes of edge ``cube`` (``(z, y, x)`` voxels, edge boxes clipped) tiling ``shape``, raster order."""
    edges = [max(1, int(c)) for c in cube]
    ranges = [range(0, int(n), c) for n, c in zip(shape, edges, strict=True)]
    return [
        tuple(slice(a, min(a + c, int(n))) for a, c, n in zip(start, edges, shape, strict=True))  # type: ignore[misc]
        for start in ((i, j, k) for i in ranges[0] for j in ranges[1] for k in ranges[2])
    ]


def cube_for(block: int) -> tuple[int, int, int]:
    """A cube of at most ``block`` voxels (edge ``⌊block^(1/3)⌋``, at least 1)."""
    edge = max(1, int(round(block ** (1.0 / 3.0))))
    while edge > 1 and edge**3 > block:
        edge -= 1
    return (edge, edge, edge)


def grid_points(target: Grid) -> np.ndarray:
    """``(Z, Y, X, 3)`` float64 world voxel centres of ``target``, built by broadcasting (no index array)."""
    affine = target.affine
    out = np.broadcast_to(affine[:3, 3], (*target.shape, 3)).copy()
    for axis, n in enumerate(target.shape):
        shape = [1, 1, 1, 3]
        shape[axis] = n
        out += (np.arange(n, dtype=np.float64)[:, None] * affine[:3, axis]).reshape(shape)
    return out


def field_on_grid(displacement: Displacement, target: Grid) -> np.ndarray:
    """``(3, Z, Y, X)`` float32 displacement at every voxel centre of ``target`` (world units of ``target``).

    A :class:`FieldDisplacement` in ``target``'s unit is interpolated from the box its voxels need, constant
    extension outside the field (as the field's own ``__call__``): by one linear interpolation per axis
    (:func:`~patchmorph_core.sampling.sample_separable`) when ``target``'s axes run along the field's (the
    usual case: a chunk of the fixed grid the field was made on), else by one float32 ``grid_sample``
    (:func:`~patchmorph_core.sampling.sample_affine`: target voxel → field voxel is affine). Any other
    displacement is evaluated point-wise.
    """
    if isinstance(displacement, FieldDisplacement) and displacement.grid.unit == target.unit:
        matrix = displacement.grid.index_map(target)
        if is_separable(matrix) and integer_offset(matrix) is None:
            return sample_separable(displacement.field, matrix, tuple(target.shape), padding="border")
        return sample_affine(displacement.field, matrix, tuple(target.shape), padding="border")
    return np.moveaxis(displacement(grid_points(target)).reshape(*target.shape, 3), -1, 0).astype(np.float32)


LabelInterpolation = Literal["vote", "nearest"]
"""How a label map is resampled: ``vote`` (:func:`vote_labels`) or ``nearest`` (the nearest voxel's label)."""

Interpolation = Literal["linear", "vote", "nearest"]
"""How :func:`warp_to_grid` resamples: ``linear`` (trilinear: images), or a :data:`LabelInterpolation` (label maps)."""


def vote_labels(block: np.ndarray, rows: np.ndarray, cval: float) -> np.ndarray:
    """Label-wise trilinear interpolation of the label map ``block`` at ``(3, N)`` continuous indices into it.

    Each point takes the label whose voxels among its 8 neighbours carry the largest summed trilinear weight
    (ANTs' ``GenericLabel`` interpolator with its linear kernel; ties go to the neighbour first in (z, y, x)
    order). Among neighbours of one label it is that label, as with nearest; at a boundary the label covering
    more of the point's neighbourhood wins, so warped boundaries follow the field to a fraction of a voxel
    instead of snapping to the moving grid. Neighbours outside ``block`` count as ``cval``.

    Returns:
        ``(N,)`` array of ``block.dtype``.
    """
    rows = np.asarray(rows, dtype=np.float64)
    shape = np.asarray(block.shape, dtype=np.int64)[:, None]
    base = np.floor(rows)
    frac = (rows - base).astype(np.float32)
    base = base.astype(np.int64)
    away = np.any((base < -1) | (base > shape - 1), axis=0)  # no neighbour in the block
    np.clip(base, -1, shape - 1, out=base)
    padded = np.pad(block, 1, constant_values=block.dtype.type(cval)).ravel()  # outside: cval
    strides = np.array([(block.shape[1] + 2) * (block.shape[2] + 2), block.shape[2] + 2, 1], dtype=np.int64)
    first = (base[0] + 1) * strides[0]  # flat index of each point's lower neighbour in ``padded``
    first += (base[1] + 1) * strides[1]
    first += base[2] + 1
    labels = np.empty((8, rows.shape[1]), dtype=block.dtype)
    disagree = np.zeros(rows.shape[1], dtype=bool)  # points whose neighbours disagree
    for k, corner in enumerate(np.ndindex(2, 2, 2)):
        padded.take(first + int(np.dot(corner, strides)), out=labels[k])
        if k:
            disagree |= labels[k] != labels[0]
    labels[:, away] = cval
    disagree[away] = False
    out = labels[0].copy()
    mixed = np.flatnonzero(disagree)
    if mixed.size:
        candidates, part = labels[:, mixed], frac[:, mixed]
        share = np.ones((8, mixed.size), dtype=np.float32)  # each neighbour's trilinear weight
        for k, corner in enumerate(np.ndindex(2, 2, 2)):
            for axis, upper in enumerate(corner):
                share[k] *= part[axis] if upper else 1.0 - part[axis]
        score = share.copy()  # each neighbour's own weight, plus that of every other of its label
        for a in range(8):
            for b in range(a + 1, 8):
                same = candidates[a] == candidates[b]
                score[a] += share[b] * same
                score[b] += share[a] * same
        out[mixed] = candidates[np.argmax(score, axis=0), np.arange(mixed.size)]
    return out


def sample_rows(
    level: Level, rows: np.ndarray, interpolation: Interpolation, cval: float, dtype: np.dtype | type
) -> np.ndarray:
    """Samples of ``level`` at ``(3, ...)`` continuous indices (component-major), reading only the box they need.

    ``linear``: one float32 ``grid_sample`` (:func:`~patchmorph_core.sampling.sample_indices`), 0 — or ``cval``
    — outside the array. Labels: ``vote``, the label of :func:`vote_labels`; ``nearest``, the nearest voxel's
    (indices rounded half up); ``cval`` outside. The same values as :func:`~patchmorph_core.spatial.resample`
    up to float32 rounding (trilinear and nearest).

    Returns:
        ``rows.shape[1:]`` array of ``dtype``.
    """
    shape = tuple(int(n) for n in level.grid.shape)
    if interpolation == "linear":
        values = sample_indices(level.array, rows)
        if cval != 0.0:
            inside = _inside(rows, shape)
            values = np.where(inside, values, np.float32(cval))
        return values.astype(dtype, copy=False)
    if interpolation == "vote":
        flat = np.asarray(rows, np.float64).reshape(3, -1)
        box = row_box(flat, shape, margin=1)  # both neighbours of every point that lie in the array
        if box is None:
            return np.full(rows.shape[1:], cval, dtype=dtype)
        local = flat - np.array([[s.start] for s in box], dtype=np.float64)
        return vote_labels(read_box(level.array, box), local, cval).astype(dtype, copy=False).reshape(rows.shape[1:])
    flat = np.floor(np.asarray(rows, np.float64).reshape(3, -1) + 0.5).astype(np.int64)
    inside = _inside(flat, shape)
    box = row_box(flat[:, inside], shape, margin=0) if inside.any() else None
    out = np.full(flat.shape[1], cval, dtype=dtype)
    if box is not None:
        block = read_box(level.array, box)
        local = flat[:, inside] - np.array([[s.start] for s in box], dtype=np.int64)
        out[inside] = block[local[0], local[1], local[2]]
    return out.reshape(rows.shape[1:])


def _inside(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Which of the ``(3, N)`` (or ``(3, ...)``) indices lie in ``[0, n − 1]`` on every axis."""
    flat = rows.reshape(3, -1)
    inside = (flat[0] >= 0) & (flat[0] <= shape[0] - 1)
    for k in (1, 2):
        inside &= (flat[k] >= 0) & (flat[k] <= shape[k] - 1)
    return inside.reshape(rows.shape[1:])


def cast_values(values: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """Interpolated ``values`` (any shape) in ``dtype``: rounded and clipped to the integer range for integer
    dtypes."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) and values.dtype.kind == "f":
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return values.astype(dtype, copy=False)


FIELD_CACHE_BYTES = 256 * 1024**2
"""Largest box of a store-backed field that :func:`warp_to_grid` holds in memory for one target."""


def _field_box(displacement: FieldDisplacement, target: Grid) -> tuple[slice, ...] | None:
    """The box of the field (plus 2 voxels) that ``target``'s voxel centres fall in (clamped to the field)."""
    grid = displacement.grid
    corners = np.array(np.meshgrid(*[[0.0, n - 1.0] for n in target.shape], indexing="ij")).reshape(3, -1).T
    index = np.clip(grid.world_to_index(target.index_to_world(corners)), 0.0, np.asarray(grid.shape) - 1.0)
    return index_box(index, grid.shape, margin=2)


def _field_cached(displacement: Displacement, target: Grid) -> Displacement:
    """A store-backed :class:`FieldDisplacement` with the box under ``target`` (:func:`_field_box`) read once,
    so the cubes of one target do not each read the store; other displacements unchanged."""
    if not isinstance(displacement, FieldDisplacement):
        return displacement
    box = _field_box(displacement, target)
    field_box = None if box is None else (slice(None), *box)
    return FieldDisplacement(cache_box(displacement.field, field_box, FIELD_CACHE_BYTES), displacement.grid)


MOVING_CACHE_BYTES = 512 * 1024**2
"""Largest box of the moving image (as float32 for images) that :func:`warp_to_grid` holds in memory for one
target."""


def _moving_box(level: Level, displacement: Displacement, target: Grid) -> tuple[slice, ...] | None:
    """The box of ``level`` every voxel of ``target`` maps into, for a (cached) :class:`FieldDisplacement`: the
    target's world box moved by the smallest and largest displacement of the field box under it (a superset of
    the points' box, plus one voxel). None for other displacements or when the points miss the level."""
    if not isinstance(displacement, FieldDisplacement):
        return None
    box = _field_box(displacement, target)
    if box is None:
        return None
    field = read_box(displacement.field, (slice(None), *box))
    low, high = field.reshape(3, -1).min(axis=1), field.reshape(3, -1).max(axis=1)
    t_low, t_high = target.world_bounds()
    return world_box(level.grid, t_low + np.minimum(low, 0.0), t_high + np.maximum(high, 0.0), margin=1)


@dataclass(frozen=True)
class MovingBox:
    """A box of a moving level in memory as float32, sampled trilinearly by ``grid_sample`` where it is: read,
    decoded and converted once per target instead of once per cube.

    Attributes:
        values: ``(1, 1, bz, by, bx)`` float32 tensor of the box.
        start: the box's first level index ``(z, y, x)``.
        shape: the whole level's shape ``(Z, Y, X)`` (samples outside it are 0, as :func:`sample_rows`).
    """

    values: torch.Tensor
    start: tuple[int, ...]
    shape: tuple[int, ...]

    @classmethod
    def read(cls, level: Level, box: tuple[slice, ...]) -> MovingBox:
        """The box ``box`` of ``level``."""
        data = np.ascontiguousarray(read_box(level.array, box), dtype=np.float32)
        return cls(torch.from_numpy(data)[None, None], tuple(s.start for s in box), tuple(level.grid.shape))

    def holds(self, rows: np.ndarray) -> bool:
        """Whether the interpolation support of every ``(3, ...)`` level index inside the level lies in the box."""
        size = self.values.shape[2:]
        for k in range(3):
            low, high = max(float(rows[k].min()), 0.0), min(float(rows[k].max()), self.shape[k] - 1.0)
            if low <= high and (np.floor(low) < self.start[k] or np.ceil(high) > self.start[k] + size[k] - 1):
                return False
        return True

    def sample(self, rows: np.ndarray, cval: float) -> np.ndarray:
        """Trilinear samples at ``(3, ...)`` float32 level indices that :meth:`holds`: ``rows.shape[1:]``
        float32, ``cval`` at indices outside the level (the values of :func:`sample_rows`)."""
        flat = rows.reshape(3, -1)
        coords = torch.from_numpy(index_rows_to_normalized(flat, self.values.shape[2:], self.start))
        values = F.grid_sample(
            self.values, coords.reshape(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border",
            align_corners=ALIGN_CORNERS,
        ).reshape(-1).numpy()  # fmt: skip
        inside = _inside(flat, self.shape)
        if cval == 0.0:
            values *= inside
        else:
            values = np.where(inside, values, np.float32(cval))
        return values.reshape(rows.shape[1:])


def warp_to_grid(
    moving: MultiscaleImage | Level,
    displacement: Displacement,
    target: Grid,
    interpolation: Interpolation = "linear",
    cval: float = 0.0,
    dtype: np.dtype | type | None = None,
    block: int = 262144,
    cube: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample ``moving`` at ``x + u(x)`` for every voxel centre ``x`` of ``target``.

    The target is computed box by box (cubes of ``cube`` voxels, by default of about ``block`` voxels) into
    one preallocated output array, so temporaries depend on the cube size, not on ``target``. Per cube, the
    field is upsampled (:func:`field_on_grid`) and the moving indices formed in float32
    (:func:`~patchmorph_core.sampling.shifted_indices`), about 40 bytes of temporaries per voxel. A field's
    box under the target and the moving image's box the target maps into are read once for all cubes (the
    moving box as float32 for images, :class:`MovingBox`, up to :data:`MOVING_CACHE_BYTES`); otherwise each
    cube reads what its points need.

    Args:
        moving: the image (a pyramid: the level matching ``target``'s spacing is read) or one level.
        displacement: ``u`` in ``target.unit`` (world ``(z, y, x)`` components), e.g. a
            :class:`~patchmorph_core.displacement.FieldDisplacement`, or an
            :class:`~patchmorph_core.displacement.InverseDisplacement` for the inverse warp.
        target: the output grid (a whole fixed grid, or one chunk or shard of it).
        interpolation: ``linear`` (trilinear: images), or for label maps ``vote`` (:func:`vote_labels`) or
            ``nearest``.
        cval: value where ``x + u(x)`` falls outside the moving image.
        dtype: output dtype (default float32 for ``linear``, else the moving array's dtype);
            trilinear values are rounded and clipped into an integer dtype (:func:`cast_values`).
        block: voxels per cube when ``cube`` is not given (bounds temporary memory to ~100 bytes per voxel).
        cube: ``(z, y, x)`` edge of the cubes, e.g. the storage chunk shape of the output array.

    Returns:
        ``target.shape`` array ``(Z, Y, X)`` of ``dtype``.
    """
    level = _level_for(moving, target)
    linear = interpolation == "linear"
    sampled = np.float32 if linear else np.dtype(getattr(level.array, "dtype", np.float32))
    out = np.empty(target.shape, dtype=sampled if dtype is None else dtype)
    displacement = _field_cached(displacement, target)
    box = _moving_box(level, displacement, target)
    held = None
    if box is not None:
        voxels = int(np.prod([s.stop - s.start for s in box]))
        if linear and voxels * 4 <= MOVING_CACHE_BYTES:
            held = MovingBox.read(level, box)
        else:
            level = Level(cache_box(level.array, box, MOVING_CACHE_BYTES), level.grid)
    for part in sub_boxes(target.shape, cube_for(block) if cube is None else cube):
        sub = target.crop([s.start for s in part], [s.stop for s in part])
        rows = shifted_indices(sub, level.grid, field_on_grid(displacement, sub))
        if held is not None and held.holds(rows):
            values = held.sample(rows, cval)
        else:
            values = sample_rows(level, rows, interpolation, cval, sampled)
        out[part] = cast_values(values, out.dtype)
    return out


@dataclass(frozen=True)
class InverseField:
    """An inverted displacement field and its measured error.

    Attributes:
        field: ``(3, Z, Y, X)`` float32 inverse displacement ``v`` on ``grid`` (maps moving world ``y`` to
            fixed world ``y + v(y)``).
        grid: the grid ``v`` lives on (usually the moving image's domain at the field's spacing).
        max_error: largest residual ``|v(y) + u(y + v(y))|`` over the grid, world units.
        mean_error: mean of that residual.
        iterations: fixed-point steps used.
    """

    field: np.ndarray
    grid: Grid
    max_error: float
    mean_error: float
    iterations: int


def invert_field(
    field: np.ndarray,
    grid: Grid,
    iterations: int = INVERSE_ITERATIONS,
    target: Grid | None = None,
    block: int = 262144,
) -> InverseField:
    """Invert a displacement field by fixed-point iteration (see the module docstring).

    Args:
        field: ``(3, Z, Y, X)`` forward displacement ``u`` on ``grid`` (fixed → moving, world units).
        grid: the forward field's grid.
        iterations: damped fixed-point steps (:func:`~patchmorph_core.displacement.invert_points`; the error is
            reported).
        target: grid of the inverse (the moving domain; default ``grid``).
        block: points inverted per step (bounds temporary memory).

    Returns:
        :class:`InverseField` with the inverse on ``target`` and its residual error.
    """
    target = grid if target is None else target
    forward = FieldDisplacement(field, grid)
    n = int(np.prod(target.shape))
    inverse = np.empty((n, 3), dtype=np.float32)
    worst, total = 0.0, 0.0
    for start in range(0, n, block):
        flat = np.arange(start, min(start + block, n))
        world = target.index_to_world(np.stack(np.unravel_index(flat, target.shape), axis=-1))
        v, residual = invert_points(forward, world, iterations)
        norm = np.linalg.norm(residual, axis=-1)
        worst, total = max(worst, float(norm.max())), total + float(norm.sum())
        inverse[start : start + len(flat)] = v
    field_out = np.ascontiguousarray(inverse.T.reshape(3, *target.shape))
    return InverseField(field_out, target, worst, total / n, int(iterations))
