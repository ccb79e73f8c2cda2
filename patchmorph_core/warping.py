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

from dataclasses import dataclass

import numpy as np

from patchmorph_core.displacement import Displacement, FieldDisplacement, invert_points
from patchmorph_core.source import Level, MultiscaleImage
from patchmorph_core.spatial import Grid, resample


def _level_for(moving: MultiscaleImage | Level, target: Grid) -> Level:
    """The moving level to read for ``target`` (matching its finest spacing), in ``target.unit``."""
    if isinstance(moving, MultiscaleImage):
        moving = moving.with_unit(target.unit).level_for_spacing(float(target.spacing.min()))
    elif moving.grid.unit != target.unit:
        moving = Level(moving.array, moving.grid.with_unit(target.unit))
    return moving


def warp_to_grid(
    moving: MultiscaleImage | Level,
    displacement: Displacement,
    target: Grid,
    order: int = 1,
    cval: float = 0.0,
    dtype: np.dtype | type | None = None,
    block: int = 262144,
) -> np.ndarray:
    """Resample ``moving`` at ``x + u(x)`` for every voxel centre ``x`` of ``target``.

    Args:
        moving: the image (a pyramid: the level matching ``target``'s spacing is read) or one level.
        displacement: ``u`` in ``target.unit`` (world ``(z, y, x)`` components), e.g. a
            :class:`~patchmorph_core.displacement.FieldDisplacement`, or an
            :class:`~patchmorph_core.displacement.InverseDisplacement` for the inverse warp.
        target: the output grid (a whole fixed grid, or one chunk of it).
        order: 1 trilinear (images) or 0 nearest (label maps).
        cval: value where ``x + u(x)`` falls outside the moving image.
        dtype: output dtype (default float32 for ``order=1``, the moving array's dtype for ``order=0``).
        block: voxels processed per step (bounds temporary memory to a few hundred bytes per voxel).

    Returns:
        ``target.shape`` array ``(Z, Y, X)``.
    """
    level = _level_for(moving, target)
    if dtype is None:
        dtype = np.float32 if order > 0 else np.dtype(getattr(level.array, "dtype", np.float32))
    shape = target.shape
    n = int(np.prod(shape))
    out = np.empty(n, dtype=dtype)
    for start in range(0, n, block):
        flat = np.arange(start, min(start + block, n))
        world = target.index_to_world(np.stack(np.unravel_index(flat, shape), axis=-1))
        moved = world + displacement(world)
        out[start : start + len(flat)] = resample(
            level.array, level.grid, moved, order=order, cval=cval, dtype=dtype
        )
    return out.reshape(shape)


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
