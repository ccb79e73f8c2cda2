"""Resampling images and label maps through a displacement, and inverting displacement fields.

Forward warp (moving image into fixed space): for every voxel centre ``x`` of a target block of the fixed
grid, ``out(x) = M(x + u(x))`` where ``u`` is the registration field (fixed → moving, see
:mod:`patchmorph_core.spatial`). Intensities are trilinear (``order=1``), label maps nearest (``order=0``).

Inverse warp (fixed-space image or atlas labels onto the moving image's grid): the inverse displacement
``v`` with ``φ⁻¹(y) = y + v(y)`` is obtained by **fixed-point iteration** ``v ← −u(y + v)``
(:func:`patchmorph_core.displacement.invert_points`), evaluated point by point, so a block of the moving
grid needs only the part of ``u`` its points map through — no second registration. The iteration converges
for fold-free fields whose displacement gradient stays below 1; :func:`invert_field` reports the residual
``|v(y) + u(y + v(y))|`` (max and mean, world units) so every inverse carries its measured error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from patchmorph_core.displacement import Displacement, FieldDisplacement, invert_points
from patchmorph_core.sampling import row_box
from patchmorph_core.source import Level, MultiscaleImage, cache_box
from patchmorph_core.spatial import Grid, index_box, read_box


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


def _axis_matrix(coords: np.ndarray, start: int, size: int, n: int) -> np.ndarray:
    """``(len(coords), size)`` linear-interpolation matrix along one axis.

    Row ``i`` holds the two weights that interpolate samples ``start .. start + size - 1`` of an axis of
    ``n`` samples at the continuous index ``coords[i]``, clamped to ``[0, n - 1]`` (constant extension).
    """
    c = np.clip(coords, 0.0, n - 1.0)
    lo = np.clip(np.floor(c), 0, max(n - 2, 0)).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = c - lo
    rows = np.arange(len(c))
    matrix = np.zeros((len(c), size), dtype=np.float64)
    np.add.at(matrix, (rows, lo - start), 1.0 - frac)
    np.add.at(matrix, (rows, hi - start), frac)
    return matrix


def _axis_span(coords: np.ndarray, n: int) -> slice:
    """The samples of an axis of ``n`` that linear interpolation at ``coords`` (clamped) touches."""
    first = min(int(np.floor(np.clip(coords.min(), 0.0, n - 1.0))), max(n - 2, 0))
    last = min(int(np.floor(np.clip(coords.max(), 0.0, n - 1.0))) + 1, n - 1)
    return slice(first, last + 1)


def _separable_field(displacement: FieldDisplacement, target: Grid) -> np.ndarray | None:
    """``(3, Z, Y, X)`` float64 field on ``target`` by separable linear interpolation, or None.

    When ``target``'s axes are parallel to the field grid's axes (same direction and unit, e.g. the fixed
    grid or a chunk of it and the field made on it), target index → field index is a per-axis scale and
    shift, so trilinear interpolation factorises into three 1-D interpolations, each a small matrix
    product along one axis (``field[c, z, y, x] · Wz · Wy · Wx``) instead of a point-wise
    ``map_coordinates`` per component. Same values as :class:`FieldDisplacement` (trilinear,
    constant-extended outside the field grid) up to rounding. None when the axes are not parallel
    (rotated or permuted target) or the units differ: use the point-wise sampler then.
    """
    fgrid = displacement.grid
    if fgrid.unit != target.unit:
        return None
    matrix = fgrid.index_map(target)
    linear = matrix[:3, :3]
    if np.abs(linear - np.diag(np.diag(linear))).max() > 1e-9 * np.abs(np.diag(linear)).max():
        return None
    coords = [
        linear[k, k] * np.arange(n, dtype=np.float64) + matrix[k, 3] for k, n in enumerate(target.shape)
    ]
    box = tuple(_axis_span(c, n) for c, n in zip(coords, fgrid.shape, strict=True))
    values = (
        read_box(displacement.field, (slice(None), *box)).astype(np.float32, copy=False).astype(np.float64)
    )
    for axis, (c, part, n) in enumerate(zip(coords, box, fgrid.shape, strict=True)):
        weights = _axis_matrix(c, part.start, part.stop - part.start, n)
        values = np.moveaxis(np.tensordot(values, weights, axes=([axis + 1], [1])), -1, axis + 1)
    return values


def field_on_grid(displacement: Displacement, target: Grid) -> np.ndarray:
    """``(3, Z, Y, X)`` float64 displacement at every voxel centre of ``target`` (world units of ``target``).

    A :class:`FieldDisplacement` on a grid with axes parallel to ``target`` is interpolated separably
    (:func:`_separable_field`); any other displacement is evaluated point-wise.
    """
    if isinstance(displacement, FieldDisplacement):
        values = _separable_field(displacement, target)
        if values is not None:
            return values
    return np.moveaxis(displacement(grid_points(target)).reshape(*target.shape, 3), -1, 0)


def _moving_rows(moving: Grid, target: Grid, u: np.ndarray) -> np.ndarray:
    """``(3, Z, Y, X)`` continuous indices on ``moving`` of ``x + u(x)`` for the voxel centres ``x`` of
    ``target``: ``A i + b + R u`` with ``A, b`` target index → moving index and ``R`` the world → index part,
    built by broadcasting (no ``(N, 3)`` point arrays).
    """
    inverse = moving.inverse_affine
    matrix = inverse @ target.affine
    axes = [np.arange(n, dtype=np.float64) for n in target.shape]
    rows = np.tensordot(inverse[:3, :3], u, axes=1)
    for a in range(3):
        rows[a] += matrix[a, 3]
        rows[a] += (matrix[a, 0] * axes[0])[:, None, None]
        rows[a] += (matrix[a, 1] * axes[1])[None, :, None]
        rows[a] += (matrix[a, 2] * axes[2])[None, None, :]
    return rows


def sample_rows(
    level: Level, rows: np.ndarray, order: int, cval: float, dtype: np.dtype | type
) -> np.ndarray:
    """Samples of ``level`` at ``(3, ...)`` continuous indices, reading only the box they need.

    Same values as :func:`~patchmorph_core.spatial.resample` (``order`` 0 rounds ties up, ``cval``
    outside the array), taking indices component-major so the box is found by contiguous reductions.

    Returns:
        ``rows.shape[1:]`` array of ``dtype``.
    """
    flat = rows.reshape(3, -1)
    box = row_box(flat, level.grid.shape, margin=max(order, 1))
    if box is None:
        return np.full(rows.shape[1:], cval, dtype=dtype)
    block = read_box(level.array, box)
    local = flat - np.array([[s.start] for s in box], dtype=np.float64)
    if order == 0:
        local = np.floor(local + 0.5)
    values = ndimage.map_coordinates(
        block.astype(np.float32) if order > 0 else block, local, order=order, mode="constant", cval=cval,
        prefilter=False,
    )  # fmt: skip
    return values.reshape(rows.shape[1:]).astype(dtype, copy=False)


def cast_values(values: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """Interpolated values in ``dtype``: rounded and clipped to the integer range for integer dtypes."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) and values.dtype.kind == "f":
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return values.astype(dtype, copy=False)


def _warp_box(level: Level, displacement: Displacement, target: Grid, order: int, cval: float) -> np.ndarray:
    """``target.shape`` samples of ``level`` at ``x + u(x)`` (float32 for ``order=1``, the array's dtype
    for ``order=0``); temporaries are about 100 bytes per voxel of ``target``.
    """
    rows = _moving_rows(level.grid, target, field_on_grid(displacement, target))
    dtype = np.float32 if order > 0 else np.dtype(getattr(level.array, "dtype", np.float32))
    return sample_rows(level, rows, order, cval, dtype)


FIELD_CACHE_BYTES = 256 * 1024**2
"""Largest box of a store-backed field that :func:`warp_to_grid` holds in memory for one target."""


def _field_cached(displacement: Displacement, target: Grid) -> Displacement:
    """A store-backed :class:`FieldDisplacement` with the box under ``target`` (plus 2 voxels) read once,
    so the cubes of one target do not each read the store; other displacements unchanged."""
    if not isinstance(displacement, FieldDisplacement):
        return displacement
    grid = displacement.grid
    corners = np.array(np.meshgrid(*[[0.0, n - 1.0] for n in target.shape], indexing="ij")).reshape(3, -1).T
    index = np.clip(grid.world_to_index(target.index_to_world(corners)), 0.0, np.asarray(grid.shape) - 1.0)
    box = index_box(index, grid.shape, margin=2)
    field_box = None if box is None else (slice(None), *box)
    return FieldDisplacement(cache_box(displacement.field, field_box, FIELD_CACHE_BYTES), grid)


def warp_to_grid(
    moving: MultiscaleImage | Level,
    displacement: Displacement,
    target: Grid,
    order: int = 1,
    cval: float = 0.0,
    dtype: np.dtype | type | None = None,
    block: int = 262144,
    cube: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample ``moving`` at ``x + u(x)`` for every voxel centre ``x`` of ``target``.

    The target is computed box by box (cubes of ``cube`` voxels, by default of about ``block`` voxels) into
    one preallocated output array, so temporaries depend on the cube size, not on ``target``; each cube
    reads only the part of the moving image (and of a field) that its points need.

    Args:
        moving: the image (a pyramid: the level matching ``target``'s spacing is read) or one level.
        displacement: ``u`` in ``target.unit`` (world ``(z, y, x)`` components), e.g. a
            :class:`~patchmorph_core.displacement.FieldDisplacement`, or an
            :class:`~patchmorph_core.displacement.InverseDisplacement` for the inverse warp.
        target: the output grid (a whole fixed grid, or one chunk or shard of it).
        order: 1 trilinear (images) or 0 nearest (label maps).
        cval: value where ``x + u(x)`` falls outside the moving image.
        dtype: output dtype (default float32 for ``order=1``, the moving array's dtype for ``order=0``);
            trilinear values are rounded and clipped into an integer dtype (:func:`cast_values`).
        block: voxels per cube when ``cube`` is not given (bounds temporary memory to ~100 bytes per voxel).
        cube: ``(z, y, x)`` edge of the cubes, e.g. the storage chunk shape of the output array.

    Returns:
        ``target.shape`` array ``(Z, Y, X)`` of ``dtype``.
    """
    level = _level_for(moving, target)
    if dtype is None:
        dtype = np.float32 if order > 0 else np.dtype(getattr(level.array, "dtype", np.float32))
    out = np.empty(target.shape, dtype=dtype)
    displacement = _field_cached(displacement, target)
    for box in sub_boxes(target.shape, cube_for(block) if cube is None else cube):
        sub = target.crop([s.start for s in box], [s.stop for s in box])
        out[box] = cast_values(_warp_box(level, displacement, sub, order, cval), dtype)
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
    field: np.ndarray, grid: Grid, iterations: int = 20, target: Grid | None = None, block: int = 262144
) -> InverseField:
    """Invert a displacement field by fixed-point iteration (see the module docstring).

    Args:
        field: ``(3, Z, Y, X)`` forward displacement ``u`` on ``grid`` (fixed → moving, world units).
        grid: the forward field's grid.
        iterations: fixed-point steps (10–30 suffice for smooth fields; the error is reported).
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
