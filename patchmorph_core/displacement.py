"""Displacements as functions of world points: the one interface every transform is used through.

A :class:`Displacement` maps ``(N, 3)`` world points ``x`` (components ``(z, y, x)``, world units of the
fixed image) to ``(N, 3)`` displacements ``u(x)``; the transform it stands for is ``φ(x) = x + u(x)``
(fixed world point → moving world point, see :mod:`patchmorph_core.spatial`). Implementations:

* :class:`TranslationDisplacement` — a constant ``u``.
* :class:`AffineDisplacement` — ``u(x) = A x + t − x`` from a 4×4 world→world matrix.
* :class:`FieldDisplacement` — trilinear sampling of a ``(3, Z, Y, X)`` field on a :class:`Grid`,
  constant-extended outside it. The field may be any array-like (numpy, zarr, dask, TensorStore): each call
  reads only the box its points need, so the same class is the lazy, store-backed sampler for chunked runs.
* :class:`InverseDisplacement` — the inverse of another displacement by fixed-point iteration
  (:func:`invert_points`); point-wise, so it can be evaluated on any block independently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from scipy import ndimage

from patchmorph_core.spatial import Grid, read_box, row_box
from patchmorph_core.transforms import integrate_velocity


@runtime_checkable
class Displacement(Protocol):
    """A world-space displacement ``u``: ``(N, 3)`` world points → ``(N, 3)`` displacements (same unit)."""

    def __call__(self, points: np.ndarray) -> np.ndarray: ...


def _as_points(points: np.ndarray) -> np.ndarray:
    """``(..., 3)`` points as a float64 ``(N, 3)`` array."""
    return np.asarray(points, dtype=np.float64).reshape(-1, 3)


@dataclass(frozen=True)
class TranslationDisplacement:
    """Constant displacement ``u(x) = offset`` (``(3,)`` world vector, ``(z, y, x)``)."""

    offset: np.ndarray

    def __call__(self, points: np.ndarray) -> np.ndarray:
        pts = _as_points(points)
        return np.broadcast_to(np.asarray(self.offset, dtype=np.float64), pts.shape).copy()


@dataclass(frozen=True)
class AffineDisplacement:
    """Displacement of an affine world→world map: ``u(x) = M[:3, :3] x + M[:3, 3] − x`` (``M`` 4×4)."""

    matrix: np.ndarray

    def __call__(self, points: np.ndarray) -> np.ndarray:
        pts = _as_points(points)
        m = np.asarray(self.matrix, dtype=np.float64)
        return pts @ m[:3, :3].T + m[:3, 3] - pts


@dataclass(frozen=True)
class FieldDisplacement:
    """Trilinear sampler of a ``(3, Z, Y, X)`` displacement field on ``grid`` (constant-extended outside).

    ``field`` is any array-like indexed ``(c, z, y, x)`` with basic slicing; a call reads only the box of
    the field that its points need (plus one voxel), so a zarr- or TensorStore-backed field is sampled
    lazily. Values are in ``grid.unit``; component order ``(z, y, x)``.
    """

    field: Any = dataclasses.field(repr=False)
    grid: Grid

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """``(N, 3)`` float64 displacements at ``(..., 3)`` world points: component-major indices, one box read,
        scipy's trilinear per component (float32 values; a point's value does not depend on the other points)."""
        rows = self.grid.world_to_index_rows(_as_points(points))  # (3, N)
        np.clip(rows, 0.0, np.asarray(self.grid.shape, dtype=np.float64)[:, None] - 1.0, out=rows)
        out = np.zeros((3, rows.shape[1]), dtype=np.float32)
        box = row_box(rows, self.grid.shape) if rows.size else None  # clipped points always lie inside
        if box is not None:
            block = read_box(self.field, (slice(None), *box)).astype(np.float32, copy=False)
            rows -= np.array([[s.start] for s in box], dtype=np.float64)
            for k in range(3):
                ndimage.map_coordinates(block[k], rows, output=out[k], order=1, mode="nearest", prefilter=False)
        return out.T.astype(np.float64)


INVERSE_ITERATIONS = 30
"""Steps of :func:`invert_points` wherever an inverse is computed (``warp --inverse``, the atlas job's inverse
field, the quality block's residual): enough for the damped step to reach a small fraction of a field voxel
on registration fields."""

INVERSE_DAMPING = 0.5
"""Step size λ of the damped fixed-point inverse (:func:`invert_points`)."""

INVERSE_TOLERANCE = 1e-5
"""Residual (field voxels) at which a point of :func:`invert_points` stops stepping by default: far below what
trilinear interpolation resolves, and most points get there in half the steps (``docs/decisions.md``, *The
inverse is computed once*)."""


def invert_points(
    displacement: Displacement,
    points: np.ndarray,
    iterations: int = INVERSE_ITERATIONS,
    initial: np.ndarray | None = None,
    tolerance: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse displacement at ``points`` by damped fixed-point iteration ``v ← v − λ (v + u(y + v))``.

    For ``φ(x) = x + u(x)`` the inverse ``φ⁻¹(y) = y + v(y)`` satisfies ``v(y) = −u(y + v(y))``. The plain
    iteration ``v ← −u(y + v)`` (λ = 1) converges only where ``u`` is a contraction (displacement gradient
    below 1); where a registration expands the tissue strongly it oscillates between two points and stops
    several field voxels off. The damped step (λ = :data:`INVERSE_DAMPING`) converges wherever ``φ`` is
    invertible and moderately distorted (Jacobian eigenvalues in (0, 2/λ)), at the price of a few more
    steps. It is point-wise, so any block of points can be inverted on its own.

    Args:
        displacement: the forward displacement ``u``.
        points: ``(..., 3)`` world points ``y`` in the space ``φ`` maps into (the moving space).
        iterations: number of steps (≥ 1).
        initial: optional ``(..., 3)`` start value for ``v`` (default ``−u(y)``).
        tolerance: a point whose residual norm is at most this (world units) takes no more steps (0: every
            point takes every step); a check that only needs the inverse's error to a tolerance stops early.
            None: :data:`INVERSE_TOLERANCE` field voxels of a :class:`FieldDisplacement` (0 for another
            displacement). Points are independent, so any block of them gets the same values.

    Returns:
        ``(v, residual)``, both ``(..., 3)``: the inverse displacement and ``v(y) + u(y + v(y))`` after
        the point's last step (its norm is the inverse's error in world units).
    """
    if tolerance is None:
        field = isinstance(displacement, FieldDisplacement)
        tolerance = INVERSE_TOLERANCE * float(displacement.grid.spacing.min()) if field else 0.0
    shape = np.shape(points)
    pts = _as_points(points)
    v = -displacement(pts) if initial is None else _as_points(initial).copy()
    residual = v + displacement(pts + v)
    # the points still stepping, compacted as they stop (with tolerance 0 only a point whose residual is exactly 0
    # stops, and a step would not change it: every point gets the values of all its steps)
    index, p, w, r = np.arange(len(pts)), pts, v, residual
    for _ in range(max(int(iterations) - 1, 0)):
        going = np.einsum("ij,ij->i", r, r) > tolerance * tolerance
        if not going.all():
            v[index[~going]], residual[index[~going]] = w[~going], r[~going]
            index, p, w, r = index[going], p[going], w[going], r[going]
        if index.size == 0:
            break
        w = w - INVERSE_DAMPING * r
        r = w + displacement(p + w)
    v[index], residual[index] = w, r
    return v.reshape(shape), residual.reshape(shape)


@dataclass(frozen=True)
class InverseDisplacement:
    """The inverse of ``forward`` evaluated point-wise by :func:`invert_points` (``iterations`` steps)."""

    forward: Displacement
    iterations: int = INVERSE_ITERATIONS

    def __call__(self, points: np.ndarray) -> np.ndarray:
        v, _ = invert_points(self.forward, points, self.iterations)
        return _as_points(v)


def displacement_on_grid(displacement: Displacement, grid: Grid, block: int = 262144) -> np.ndarray:
    """Evaluate a displacement at every voxel centre of ``grid``.

    Args:
        displacement: any :class:`Displacement` in ``grid.unit``.
        grid: the target grid.
        block: points evaluated per call (bounds temporary memory).

    Returns:
        ``(3, Z, Y, X)`` float32 field.
    """
    shape = grid.shape
    n = int(np.prod(shape))
    out = np.empty((n, 3), dtype=np.float32)
    for start in range(0, n, block):
        flat = np.arange(start, min(start + block, n))
        index = np.stack(np.unravel_index(flat, shape), axis=-1)
        out[start : start + len(flat)] = displacement(grid.index_to_world(index))
    return np.ascontiguousarray(out.T.reshape(3, *shape))


def exp_velocity(velocity: np.ndarray, grid: Grid, squarings: int) -> np.ndarray:
    """Displacement of the flow of a stationary velocity field after unit time, by scaling and squaring.

    ``d₀ = v / 2^N``, ``d_{k+1}(q) = d_k(q) + d_k(q + d_k(q))`` (trilinear, border padding outside the grid),
    computed in the grid's voxels (``v → L⁻¹ v``). For a smooth ``v`` the map ``x → x + exp(v)(x)`` is a
    diffeomorphism (every sub-step is a small smooth displacement, and compositions of diffeomorphisms are
    diffeomorphisms) and ``exp(−v)`` is its inverse. A value depends only on the velocity within ``|v| + N``
    voxels (one voxel of interpolation per squaring), so a box grown by that much gives the whole grid's
    values inside it.

    Args:
        velocity: ``(3, Z, Y, X)`` velocity on ``grid`` (world units, components ``(z, y, x)``).
        grid: its grid.
        squarings: ``N`` (0 returns the velocity).

    Returns:
        ``(3, Z, Y, X)`` float32 displacement (world units).
    """
    return grid.world_vectors(integrate_steps(grid.index_steps(velocity), squarings))


def integrate_steps(
    steps: np.ndarray, squarings: int, boxes: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None
) -> np.ndarray:
    """:func:`exp_velocity` in the grid's voxels: ``(3, Z, Y, X)`` velocity steps along the index axes → the
    float32 displacement steps of its flow after unit time, on the whole grid or, with ``boxes``, on the last of
    the boxes the squarings compute (:func:`~patchmorph_core.transforms.integrate_velocity`)."""
    with torch.inference_mode():
        return integrate_velocity(torch.from_numpy(np.ascontiguousarray(steps))[None], squarings, boxes)[0].numpy()


def squaring_reaches(longest: float, squarings: int) -> list[int]:
    """Voxels along an index axis beyond the box it computes that each squaring of :func:`exp_velocity` reads,
    first to last, when no velocity's component along that axis is longer than ``longest`` voxels.

    The displacement starts at ``v / 2^N`` and each squaring at most doubles each component (a trilinear value is
    a convex combination), so squaring ``k`` (from 1) moves a point by at most ``2^(k−1) / 2^N · longest`` and
    reads the voxels around it: the ceiling of that."""
    return [math.ceil(longest * 2.0 ** (k - squarings)) for k in range(squarings)]


def exp_reach(longest: float, squarings: int) -> int:
    """Voxels along an index axis beyond a box that :func:`exp_velocity` of the velocity on the box reads, when
    no velocity's component along that axis is longer than ``longest`` voxels: the squarings' reaches
    (:func:`squaring_reaches`, at most ``ceil(longest) + N`` in all) and one voxel of margin. A box grown by this
    many voxels gives the whole grid's values inside it."""
    return sum(squaring_reaches(longest, squarings)) + 1


def exp_velocity_inside(
    velocity: np.ndarray, grid: Grid, squarings: int, inner: tuple[slice, slice, slice]
) -> np.ndarray:
    """:func:`exp_velocity` on the box ``inner`` of ``grid`` (slices in its index frame), integrated only as far
    around it as this velocity reaches: where ``grid`` is a chunk grown by the reach of the velocity's largest
    *possible* length, a shorter velocity needs fewer voxels around the chunk, and each squaring fewer than the
    one before (the same values inside, to float rounding).

    The first squaring computes ``inner`` grown by the :func:`exp_reach` of the velocity's own longest component
    along each index axis; each squaring's box is the next one's grown by that squaring's reach
    (:func:`squaring_reaches`) and one voxel, all clipped to ``grid`` (whose edges pad the border as the whole
    grid's do), so the last squaring computes ``inner`` and one voxel around it.

    Args:
        velocity: ``(3, Z, Y, X)`` velocity on ``grid`` (world units, components ``(z, y, x)``).
        grid: its grid; ``squarings``: as :func:`exp_velocity`.
        inner: the box of ``grid`` whose values are returned.

    Returns:
        ``(3, *inner shape)`` float32 displacement (world units).
    """
    steps = grid.index_steps(velocity)
    reaches = [squaring_reaches(float(n), squarings) for n in np.abs(steps).reshape(3, -1).max(axis=1)]

    def box(first: int) -> tuple[list[int], list[int]]:  # inner grown by squarings first.. and one voxel
        grow = [sum(r[first:]) + 1 for r in reaches]
        return (
            [max(s.start - g, 0) for s, g in zip(inner, grow, strict=True)],
            [min(s.stop + g, n) for s, g, n in zip(inner, grow, grid.shape, strict=True)],
        )

    lo, hi = box(0)
    boxes = [[[a - b for a, b in zip(corner, lo, strict=True)] for corner in box(k + 1)] for k in range(squarings)]
    part = integrate_steps(steps[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], squarings, boxes)
    last = box(squarings)[0]  # without squarings the first box itself
    return grid.world_vectors(part[(slice(None), *(slice(s.start - a, s.stop - a) for s, a in zip(inner, last, strict=True)))])
