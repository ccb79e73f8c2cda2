"""Stochastic patch inference: a global jittered patch lattice per stage, patch estimates, and their
windowed average (Σw·v / Σw) composed with the coarser field, coarse to fine.

The pieces, each usable on its own: the registration driver (:mod:`pipeline.driver`) runs them block by
block and chunk by chunk, for a field on disk and in memory alike (``pipeline.register.register_arrays`` is
its one-chunk case):

1. :func:`stage_lattice` — a **global** lattice over an axis-aligned world box of the fixed image (in a
   registration: its tissue box from :func:`~patchmorph_core.sampling.tissue_bounds`, clipped to the grid,
   so no patch is spent on empty background; voxels no patch reaches keep the coarser field). Cell
   ``(i, j, k)`` holds exactly one patch; its centre is the cell centre jittered uniformly within the cell
   and its rotation is random up to ``max_rotation_deg``, both drawn from
   ``np.random.default_rng([seed, stage, i, j, k])``, so no patch depends on how cells are grouped into
   blocks or chunks. The lattice step is ``extent / overlap``. A lattice *snapped* to the stage's field
   grid (``InferenceConfig.patch_layout: field_grid``, the default) draws the same jitter, rounds the
   centre so that the patch's voxel centres are field-grid voxel centres, and lays the patch axes along
   the field grid's axes, ordered and signed nearest the world axes (no rotation;
   :func:`~patchmorph_core.spatial.grid_block_patch`): each patch is then a ``P³`` block of the field grid.
2. :func:`estimate_patches` — per patch: fixed patch ``F(x)``, moving patch ``M(φ(x))`` through the current
   transform ``φ(x) = x + prior(x)``, and the network's update ``v = model.stage_update(...)`` (world units, in
   fixed space).
3. :func:`accumulate` — each patch's ``v`` is interpolated (trilinear, in patch index coordinates) at the
   target grid's voxel centres inside the patch (for a patch that is a block of the target grid, these are
   its own voxels and the sum is a slice addition) and summed with the separable window
   ``w(i) = ∏ sin²(π i_k / (P − 1))`` over continuous patch indices ``i`` in ``[0, P−1]`` (a Hann window: 1
   at the patch centre, 0 at the outermost voxel centres and beyond). :class:`FieldSums` holds Σw·v, Σw and
   Σw·|v|²; sums of disjoint patch sets add up (``+``), and can be cut to any sub-grid (:meth:`FieldSums.crop`).
4. :func:`finalize` — the averaged update ``v̄ = Σw·v / Σw`` (0 where ``Σw <= eps``) is composed with the
   prior once per field voxel: ``u(x) = v̄(x) + prior(x + v̄(x))`` (the update is applied first, in fixed
   space, then the coarser transform: the network aligned ``F`` to the already-warped moving patch ``M∘φ``,
   so ``M(φ(x + v(x)))`` is what matches ``F(x)``; voxels no patch reaches keep the prior). Uncertainty =
   weighted standard deviation of the updates, ``sqrt(Σw|v|²/Σw − |v̄|²)`` (world units; the norm over the
   three components). The sums and the composition are float32, the network's own precision: the field
   differs from float64 sums by about 1e-6 of the update, and the spread is resolved down to about 4e-4
   of ``|v̄|`` (the cancellation in ``Σw|v|²/Σw − |v̄|²``), far below the spreads it is read for.

   *Choice:* the estimates are averaged before the composition, not after. Composing each patch's update
   (``v_k(x) + prior(x + v_k(x))``, then averaging) differs only by the prior's curvature times the spread
   of the updates (second order; the prior is the smooth coarser field), but costs one prior interpolation
   per patch voxel — about 3.4 per field voxel at overlap 1.5 — instead of one per field voxel. The
   uncertainty is the spread of the network's estimates themselves; the spread of composed estimates
   would differ from it by the prior's Jacobian (first order).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from patchmorph_core.alignment import fit_affine, translation_matrix
from patchmorph_core.config import InferenceConfig, resolve_device
from patchmorph_core.displacement import (
    AffineDisplacement,
    Displacement,
    FieldDisplacement,
    exp_reach,
    exp_velocity,
    exp_velocity_inside,
)
from patchmorph_core.errors import InputError
from patchmorph_core.model import place_model
from patchmorph_core.sampling import (
    displacement_after,
    displacement_at,
    initial_translation,
    intensity_range,
    mapped_indices,
    normalize,
    sample_affine,
    sample_indices,
    sample_patch,
    sample_points,
    tissue_bounds,
)
from patchmorph_core.source import Level, MultiscaleImage, cache_box
from patchmorph_core.spatial import (
    Grid,
    box_corners,
    box_within,
    grid_block_patch,
    grid_block_start,
    grid_block_view,
    index_box,
    parse_length,
    patch_grid,
    random_rotation,
    unit_scale,
    world_box,
)
from patchmorph_core.stage_check import StageCheck, StageScorer

logger = logging.getLogger(__name__)

WEIGHT_EPS: float = 1e-6
"""Σw below which a field voxel counts as not covered by any patch (it gets the prior)."""

WEIGHT_FLOOR: float = 0.02
"""Σw (in units of one patch's window peak) below which the averaged update is scaled down by Σw / floor:
``v̄ = Σw·v / max(Σw, floor)``. Where the lattice's coverage ends, Σw falls to 0 while Σw·v / Σw stays one
patch's full estimate, so the plain average jumps to 0 there and folds the field; the floor makes the update
fade out continuously (``docs/method.md``, *Coverage edge*)."""


# -- the patch lattice -------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PatchSpec:
    """One inference patch.

    Attributes:
        stage: cascade stage.
        cell: lattice cell ``(i, j, k)`` the patch belongs to.
        center: ``(3,)`` world centre ``(z, y, x)``.
        rotation: ``(3, 3)`` rotation whose columns are the patch axes in world.
        extent: world size of the patch edge (spacing ``extent / size``).
        size: voxels per patch edge ``P``.
        unit: unit of ``center`` and ``extent``.
    """

    stage: int
    cell: tuple[int, int, int]
    center: np.ndarray
    rotation: np.ndarray
    extent: float
    size: int
    unit: str

    @functools.cached_property
    def grid(self) -> Grid:
        """The patch's ``P³`` sampling grid (built once)."""
        return patch_grid(self.center, self.extent, self.size, self.rotation, self.unit)


@dataclass(frozen=True, eq=False)
class PatchLattice:
    """A stage's global patch lattice: ``counts`` cells of edge ``step`` (world, axis-aligned).

    Cell ``(i, j, k)`` is centred at ``origin + (i, j, k) * step``; see the module docstring for how its
    patch is drawn. ``repeat`` numbers the passes of one stage (0: its first; ``k > 0``: the ``k``-th
    refinement pass, see ``InferenceConfig.refine_passes``), whose cells draw other jitters and rotations.
    ``snap``: the stage's field grid (isotropic, spacing ``extent / size``) when every patch is a block of
    it (see the module docstring; ``max_rotation_deg`` is then 0), else None.
    """

    stage: int
    seed: int
    origin: np.ndarray
    step: float
    counts: tuple[int, int, int]
    extent: float
    size: int
    unit: str
    max_rotation_deg: float
    repeat: int = 0
    snap: Grid | None = None

    @property
    def name(self) -> str:
        """``"stage<s>"`` for a stage's first pass, ``"stage<s>.<k>"`` for its ``k``-th refinement pass (run
        records and intermediate fields are kept under this name)."""
        return f"stage{self.stage}" if self.repeat == 0 else f"stage{self.stage}.{self.repeat}"

    def __len__(self) -> int:
        return int(np.prod(self.counts))

    def cells(self, start: Sequence[int] = (0, 0, 0), stop: Sequence[int] | None = None) -> np.ndarray:
        """``(N, 3)`` int64 cell indices with ``start <= cell < stop`` (clipped to the lattice), C order."""
        stop = self.counts if stop is None else stop
        lo = np.clip(np.asarray(start, dtype=np.int64), 0, self.counts)
        hi = np.clip(np.asarray(stop, dtype=np.int64), 0, self.counts)
        axes = [np.arange(a, b) for a, b in zip(lo, hi, strict=True)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)

    def spec(self, cell: Sequence[int]) -> PatchSpec:
        """The patch of one cell (depends only on ``seed``, ``stage``, ``repeat`` and the cell)."""
        i, j, k = (int(c) for c in cell)
        rng = np.random.default_rng([self.seed, self.stage, i, j, k, *([self.repeat] if self.repeat else [])])
        jitter = rng.uniform(-0.5, 0.5, size=3) * self.step
        center = self.origin + np.array([i, j, k], dtype=np.float64) * self.step + jitter
        if self.snap is not None:
            center, rotation = grid_block_patch(self.snap, center, self.size)
        else:
            rotation = random_rotation(rng, self.max_rotation_deg)
        return PatchSpec(self.stage, (i, j, k), center, rotation, self.extent, self.size, self.unit)

    def specs(self, cells: np.ndarray | None = None) -> list[PatchSpec]:
        """Patches of ``cells`` (``(N, 3)``; default: every cell)."""
        cells = self.cells() if cells is None else np.asarray(cells).reshape(-1, 3)
        return [self.spec(c) for c in cells]


def is_patch_grid(grid: Grid, extent: float, patch_size: int) -> bool:
    """Whether ``grid``'s spacing is the patch spacing ``extent / patch_size`` on every axis (so a lattice
    can be snapped to it, :func:`stage_lattice`)."""
    return bool(np.allclose(grid.spacing, float(extent) / patch_size, rtol=1e-6))


def stage_lattice(
    domain: Grid,
    extent: float,
    overlap: float,
    seed: int,
    stage: int,
    max_rotation_deg: float,
    patch_size: int,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
    snap: Grid | None = None,
) -> PatchLattice:
    """The global patch lattice of one stage over a world box of the fixed domain.

    Args:
        domain: the fixed image's grid (its unit is the lattice's unit).
        extent: world size of a patch edge at this stage (``E_s``), in ``domain.unit``.
        overlap: lattice step is ``extent / overlap`` (2: every point lies in about 2³ patches).
        seed: the run's seed.
        stage: cascade stage (part of every cell's seed).
        max_rotation_deg: largest random patch rotation.
        patch_size: ``P``.
        bounds: world box ``(low, high)`` the patch centres cover (default: ``domain``'s axis-aligned
            world box of voxel centres; :func:`plan_registration` passes the fixed tissue box).
        snap: the stage's field grid, to make every patch a block of it (``max_rotation_deg`` is then
            ignored); its spacing must be ``extent / patch_size`` on every axis.

    Returns:
        A :class:`PatchLattice` of ``ceil(box / step)`` cells per axis (at least 1), centred on the box.

    Raises:
        ValueError: ``snap``'s spacing is not the patch spacing.
    """
    if snap is not None:
        if not is_patch_grid(snap, extent, patch_size):
            raise ValueError(
                f"a lattice snapped to a grid needs its spacing {snap.spacing} to equal the patch spacing "
                f"{float(extent) / patch_size}"
            )
        max_rotation_deg = 0.0
    step = float(extent) / float(overlap)
    low, high = domain.world_bounds() if bounds is None else (np.asarray(b, dtype=np.float64) for b in bounds)
    counts = np.maximum(1, np.ceil((high - low) / step - 1e-9)).astype(int)
    origin = (low + high) / 2.0 - (counts - 1) / 2.0 * step
    return PatchLattice(
        stage=int(stage),
        seed=int(seed),
        origin=origin,
        step=step,
        counts=tuple(int(c) for c in counts),  # type: ignore[arg-type]
        extent=float(extent),
        size=int(patch_size),
        unit=domain.unit,
        max_rotation_deg=float(max_rotation_deg),
        snap=snap,
    )


def cell_blocks(
    lattice: PatchLattice, block: int | Sequence[int]
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Partition the lattice into blocks of at most ``block³`` cells (or ``block[0] × block[1] × block[2]``, per
    lattice axis): a list of ``(start, stop)`` ranges."""
    edges = [int(block)] * 3 if isinstance(block, int) else [int(b) for b in block]
    ranges = [range(0, n, edge) for n, edge in zip(lattice.counts, edges, strict=True)]
    out = []
    for i in ranges[0]:
        for j in ranges[1]:
            for k in ranges[2]:
                start = (i, j, k)
                stop = tuple(min(s + e, n) for s, e, n in zip(start, edges, lattice.counts, strict=True))
                out.append((start, stop))
    return out


def specs_in_box(lattice: PatchLattice, start: Sequence[int], stop: Sequence[int]) -> list[PatchSpec]:
    """The patches of cells ``start <= cell < stop`` (one block of a partition of the lattice)."""
    return lattice.specs(lattice.cells(start, stop))


# -- the window and the sums ----------------------------------------------------------------------------------
def window(index: np.ndarray, size: int) -> np.ndarray:
    """Separable Hann window at continuous patch indices.

    Args:
        index: ``(..., 3)`` continuous indices ``(z, y, x)`` of a ``size³`` patch.
        size: ``P``.

    Returns:
        ``(...)`` weights ``∏_k sin²(π i_k / (P − 1))`` inside ``(0, P−1)³``, exactly 0 elsewhere: 1 at the
        centre, 0 at the border voxel centres and beyond.
    """
    index = np.asarray(index, dtype=np.float64)
    inside = np.all((index > 0.0) & (index < size - 1.0), axis=-1)
    weights = np.prod(np.sin(np.pi * index / (size - 1.0)) ** 2, axis=-1)
    return np.where(inside, weights, 0.0)


def patch_window(size: int) -> np.ndarray:
    """``(P, P, P)`` window at the patch's own voxel centres (float64)."""
    index = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), axis=-1)
    return window(index, size)


@dataclass(frozen=True, eq=False)
class FieldSums:
    """Windowed sums of the patches' network updates ``v`` on a field grid (float32: the network's own
    precision; a voxel sums a few dozen windowed estimates, so the relative rounding stays near 1e-6).

    Attributes:
        grid: the field grid (a whole field or one block of it).
        weighted: ``(3, Z, Y, X)`` Σ w·v (world units, components ``(z, y, x)``).
        weight: ``(Z, Y, X)`` Σ w.
        weighted_sq: ``(Z, Y, X)`` Σ w·|v|² (for the uncertainty), or None where the spread is not needed (a
            pass whose uncertainty nobody reads keeps a fifth less memory: ``spread=False``).
        patches: number of patch estimates that put weight on the grid.
    """

    grid: Grid
    weighted: np.ndarray = field(repr=False)
    weight: np.ndarray = field(repr=False)
    weighted_sq: np.ndarray | None = field(repr=False)
    patches: int = 0

    @classmethod
    def zeros(cls, grid: Grid, spread: bool = True) -> FieldSums:
        """Empty sums on ``grid`` (``spread``: with :attr:`weighted_sq`)."""
        return cls(
            grid,
            np.zeros((3, *grid.shape), dtype=np.float32),
            np.zeros(grid.shape, dtype=np.float32),
            np.zeros(grid.shape, dtype=np.float32) if spread else None,
        )

    @property
    def spread(self) -> bool:
        """Whether these sums hold :attr:`weighted_sq`."""
        return self.weighted_sq is not None

    def __add__(self, other: FieldSums) -> FieldSums:
        """Sums of two disjoint sets of patches on the same grid."""
        if not self.grid.same_voxels(other.grid):
            raise ValueError("FieldSums can only be added on the same grid; crop them to one grid first")
        if self.spread != other.spread:
            raise ValueError("FieldSums with and without the spread cannot be added")
        return FieldSums(
            self.grid,
            self.weighted + other.weighted,
            self.weight + other.weight,
            None if self.weighted_sq is None or other.weighted_sq is None else self.weighted_sq + other.weighted_sq,
            self.patches + other.patches,
        )

    def crop(self, start: Sequence[int], stop: Sequence[int]) -> FieldSums:
        """Sums on the sub-grid ``start <= index < stop`` (like :meth:`Grid.crop`); parts outside are 0.

        ``start``/``stop`` may reach beyond this grid (e.g. a chunk of a larger field grid given in this
        block's index frame), so partial sums of neighbouring blocks can be cut to one chunk and added.
        The whole grid is returned as it is (no copy).
        """
        if tuple(int(a) for a in start) == (0, 0, 0) and tuple(int(b) for b in stop) == self.grid.shape:
            return self
        box = self.grid.crop(np.asarray(start, dtype=np.int64), np.asarray(stop, dtype=np.int64))
        out = FieldSums.zeros(box, self.spread)
        touched = out.add_from(self, start)
        return FieldSums(out.grid, out.weighted, out.weight, out.weighted_sq, self.patches if touched else 0)

    def add_from(self, other: FieldSums, start: Sequence[int]) -> bool:
        """Add, in place, the part of ``other`` that overlaps this grid, whose voxel 0 is ``other``'s voxel
        ``start`` (this grid's box in ``other``'s index frame; it may reach beyond ``other``). Returns
        whether they overlap. ``patches`` is left to the caller (this object is frozen). Both hold the spread,
        or neither."""
        if self.spread != other.spread:
            raise ValueError("FieldSums with and without the spread cannot be added")
        start_a = np.asarray(start, dtype=np.int64)
        lo = np.clip(start_a, 0, other.grid.shape)
        hi = np.clip(start_a + np.asarray(self.grid.shape, dtype=np.int64), 0, other.grid.shape)
        if np.any(hi <= lo):
            return False
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start_a, strict=True))
        self.weighted[(slice(None), *dst)] += other.weighted[(slice(None), *src)]
        self.weight[dst] += other.weight[src]
        if self.weighted_sq is not None and other.weighted_sq is not None:
            self.weighted_sq[dst] += other.weighted_sq[src]
        return True


def accumulate(
    specs: Sequence[PatchSpec], estimates: np.ndarray | Sequence[np.ndarray], target: Grid, spread: bool = True
) -> FieldSums:
    """Windowed sums of patch estimates on ``target`` (see the module docstring).

    Args:
        specs: the patches.
        estimates: ``(B, 3, P, P, P)`` network update ``v`` of each patch at its voxel centres (world units,
            ``(z, y, x)`` components), in ``specs`` order.
        target: the field grid (or block of it) to accumulate into; same unit as the patches.
        spread: also sum ``w·|v|²`` (:attr:`FieldSums.weighted_sq`, for the uncertainty).

    Returns:
        :class:`FieldSums` on ``target``.
    """
    sums = FieldSums.zeros(target, spread)
    touched = 0
    for spec, estimate in zip(specs, estimates, strict=True):
        touched += _add_patch(sums, spec, np.asarray(estimate, dtype=np.float32))
    return FieldSums(target, sums.weighted, sums.weight, sums.weighted_sq, touched)


def _add_patch(sums: FieldSums, spec: PatchSpec, estimate: np.ndarray) -> int:
    """Add one patch's windowed estimate into ``sums`` in place; returns 1 if it touched the grid."""
    target = sums.grid
    pgrid = spec.grid
    corners = pgrid.index_to_world(
        np.array(np.meshgrid(*[[0.0, spec.size - 1.0]] * 3, indexing="ij")).reshape(3, -1).T
    )
    box = index_box(target.world_to_index(corners), target.shape, margin=1)
    if box is None:
        return 0
    index = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij"), axis=-1)
    pindex = pgrid.world_to_index(target.index_to_world(index))
    weights = window(pindex, spec.size)
    mask = weights > 0.0
    if not mask.any():
        return 0
    coords = pindex[mask].T
    values = np.stack(
        [
            ndimage.map_coordinates(estimate[c], coords, order=1, mode="nearest", prefilter=False)
            for c in range(3)
        ]
    ).astype(np.float64)
    w = weights[mask]
    sub_weighted = sums.weighted[(slice(None), *box)]
    sub_weighted[:, mask] += w * values
    sums.weight[box][mask] += w
    if sums.weighted_sq is not None:
        sums.weighted_sq[box][mask] += w * np.sum(values**2, axis=0)
    return 1


def averaged_update(sums: FieldSums) -> tuple[np.ndarray, np.ndarray]:
    """The averaged update ``v̄ = Σw·v / max(Σw, WEIGHT_FLOOR)`` (0 where ``Σw <= WEIGHT_EPS``) and the weighted
    standard deviation of the updates: ``(3, Z, Y, X)`` and ``(Z, Y, X)`` float32, world units (the spread 0
    where no patch put weight, and everywhere for sums without it)."""
    covered = sums.weight > WEIGHT_EPS
    safe = np.where(covered, sums.weight, np.float32(1.0))
    mean = sums.weighted / safe
    mean *= covered
    if sums.weighted_sq is None:
        uncertainty = np.zeros(sums.weight.shape, np.float32)
    else:
        variance = sums.weighted_sq / safe - np.einsum("c...,c...->...", mean, mean)
        uncertainty = np.sqrt(np.maximum(variance, 0.0, out=variance), out=variance)
        uncertainty *= covered
    mean *= safe / np.maximum(safe, np.float32(WEIGHT_FLOOR))  # fade out where the coverage ends
    return mean, uncertainty


UPDATE_SQUARINGS = 6
"""Scaling-and-squaring steps of :func:`fold_free_update` (its velocity is at most a quarter of a patch, 6 voxels
for the default 24-voxel patch, so each of the 2⁶ = 64 sub-steps moves a voxel by under a tenth of a voxel; the
choice is measured in ``docs/method.md``, *Fold-free updates*)."""


def update_reach(max_length: float, grid: Grid) -> int:
    """Voxels of ``grid`` beyond a box that :func:`fold_free_update` of the update on the box reads: one for the
    gradient of its logarithm and the integration's reach (:func:`~patchmorph_core.displacement.exp_reach`) of a
    velocity as long as ``max_length`` (world units) can be. A chunk made fold-free with this many voxels of the
    update around it equals the whole grid's."""
    return 1 + exp_reach(max_length / float(np.min(grid.spacing)), UPDATE_SQUARINGS)


def fold_free_update(
    update: np.ndarray, grid: Grid, max_length: float, inner: tuple[slice, slice, slice] | None = None
) -> np.ndarray:
    """A diffeomorphic stand-in for an averaged update: ``exp(w)`` with ``w = v̄ − ½ (∇v̄) v̄``.

    ``w`` is the first-order logarithm of ``x → x + v̄(x)`` (``exp(w) = id + w + ½ (∇w) w + …``, so
    ``exp(w) − v̄`` is of order ``|∇v̄|² |v̄|``: where the averaged update is smooth the two agree closely),
    each vector's length capped at ``max_length``; ``exp`` is :func:`~patchmorph_core.displacement.exp_velocity`
    with :data:`UPDATE_SQUARINGS` squarings. Unlike the average of the patches' estimates, which folds where
    neighbouring patches disagree strongly (at the image's edge, on a short fine-tuning), ``exp(w)`` is a
    diffeomorphism for any smooth ``w``, and composing it with the coarser (fold-free) field keeps the
    field fold-free (``docs/method.md``, *Fold-free updates*).

    Args:
        update: ``(3, Z, Y, X)`` averaged update ``v̄`` on ``grid`` (world units, components ``(z, y, x)``).
        grid: its grid (a chunk grown by :func:`update_reach` voxels gives the whole grid's values inside).
        max_length: the longest velocity vector kept (world units; a quarter of the pass's patch extent).
        inner: the box of ``grid`` to return (None: all of it); the velocity is then integrated only as far
            around it as its own length reaches (:func:`~patchmorph_core.displacement.exp_velocity_inside`).

    Returns:
        ``(3, Z, Y, X)`` float32 displacement (world units), on ``inner`` when given.
    """
    update = np.asarray(update, np.float32)
    steps = grid.index_steps(update)  # v̄ in voxels along the grid's index axes
    advection = np.zeros_like(update)  # (∇v̄) v̄ = Σ_a ∂v̄/∂i_a · (v̄ in voxels)_a, world components
    for axis in range(3):
        if update.shape[1 + axis] > 1:  # an axis of one voxel has no gradient
            advection += np.gradient(update, axis=1 + axis) * steps[axis]
    velocity = update - 0.5 * advection
    length = np.sqrt(np.einsum("c...,c...->...", velocity, velocity))
    velocity *= np.minimum(1.0, max_length / np.maximum(length, 1e-30)).astype(np.float32)
    if inner is None:
        return exp_velocity(velocity, grid, UPDATE_SQUARINGS)
    return exp_velocity_inside(velocity, grid, UPDATE_SQUARINGS, inner)


def finalize(
    sums: FieldSums,
    prior: Displacement,
    block: int = 262144,
    max_update: float | None = None,
    inner: tuple[slice, slice, slice] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The stage's field (the averaged update composed with the prior) and its uncertainty, on ``sums.grid`` or
    the part ``inner`` of it.

    Args:
        sums: windowed sums of the updates on a grid.
        prior: the previous transform's displacement (initial alignment or the coarser stage's field), in
            ``sums.grid.unit``.
        block: field voxels composed per prior evaluation (bounds temporary memory).
        max_update: None composes the averaged update :func:`averaged_update` as it is; a length (world units)
            composes its :func:`fold_free_update` with that cap.
        inner: the voxels of ``sums.grid`` to return (a chunk whose sums cover it and the halo its fold-free
            update reads, :func:`update_reach`); None: all of them.

    Returns:
        ``(field, uncertainty)``: ``(3, Z, Y, X)`` float32 displacement ``v̄(x) + prior(x + v̄(x))`` (``v̄`` the
        update or its fold-free stand-in), and ``(Z, Y, X)`` float32 weighted standard deviation of the updates.
    """
    mean, uncertainty = averaged_update(sums)
    grid = sums.grid
    if inner is not None:
        grid = grid.crop([s.start for s in inner], [s.stop for s in inner])
        uncertainty = uncertainty[inner]
    if max_update is not None:
        mean = fold_free_update(mean, sums.grid, max_update, inner)
    elif inner is not None:
        mean = mean[(slice(None), *inner)]
    return compose_on_grid(np.ascontiguousarray(mean), grid, prior, block), uncertainty


def compose_on_grid(update: np.ndarray, grid: Grid, prior: Displacement, block: int = 262144) -> np.ndarray:
    """``u(x) = v(x) + prior(x + v(x))`` at every voxel centre ``x`` of ``grid``, in float32.

    Args:
        update: ``(3, Z, Y, X)`` update ``v`` on ``grid`` (world units, components ``(z, y, x)``).
        grid: its grid.
        prior: the displacement applied after ``v`` (a field prior is sampled by
            :func:`~patchmorph_core.sampling.displacement_after`: one box read and one float32
            ``grid_sample`` call per slab).
        block: voxels per prior evaluation (whole ``z`` slabs of at least one slice).

    Returns:
        ``(3, Z, Y, X)`` float32 composed displacement.
    """
    out = np.empty(update.shape, dtype=np.float32)
    rows, cols = grid.shape[1:]
    slab = max(1, block // max(1, rows * cols))
    for z0 in range(0, grid.shape[0], slab):
        z1 = min(z0 + slab, grid.shape[0])
        v = np.asarray(update[:, z0:z1], dtype=np.float32)
        np.add(v, displacement_after(prior, grid.crop((z0, 0, 0), (z1, rows, cols)), v), out=out[:, z0:z1])
    return out


# -- patch estimates ------------------------------------------------------------------------------------------
def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), on which oneDNN's bfloat16
    convolutions run about twice as fast as float32 ones; elsewhere bfloat16 is emulated, and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def network_precision(device: torch.device, precision: str) -> str:
    """The number format the network's forward passes compute in on ``device`` with the ``precision`` setting
    (:attr:`~patchmorph_core.config.InferenceConfig.precision`): ``"float16"`` (mixed, on CUDA),
    ``"bfloat16"`` (mixed, on a CPU that computes it: :func:`cpu_computes_bfloat16`) or ``"float32"``."""
    if precision == "float32":
        return "float32"
    if device.type == "cuda":
        return "float16"
    return "bfloat16" if device.type == "cpu" and cpu_computes_bfloat16() else "float32"


def _autocast(device: torch.device, precision: str) -> Any:
    """Mixed precision (:func:`network_precision`) for the network's forward passes: the convolutions (float32
    accumulation) and the U-Net's activations and upsampling in the reduced format, the patch velocity's
    integration (``grid_sample``, autocast's float32 list) in float32."""
    resolved = network_precision(device, precision)
    if resolved == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, resolved))


_PLACING = threading.Lock()
"""Held while a model is placed: the first tasks of a pass start on several threads at once."""


def _model_device(model: torch.nn.Module, config: InferenceConfig) -> torch.device:
    """Resolve ``config.device`` and put the model there in eval mode (:func:`~patchmorph_core.model.place_model`:
    channels-last on CPU), once: a model already placed is left alone, so that tasks on several threads
    share it without moving its weights under each other, and the first tasks wait while one of them places
    it (a forward pass beside the move would read some weights in each layout, whose convolutions round
    differently: the first run's field would not be bit-identical to the next)."""
    device = torch.device(resolve_device(config.device))
    if getattr(model, "_placed_on", None) != device or model.training:
        with _PLACING:
            if getattr(model, "_placed_on", None) != device:
                place_model(model, device)
                model._placed_on = device
            if model.training:
                model.eval()
    return device


def estimate_patches(
    model: Any,
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    prior: Displacement,
    specs: Sequence[PatchSpec],
    config: InferenceConfig,
    *,
    fixed_range: tuple[float, float] | None = None,
    moving_range: tuple[float, float] | None = None,
    stats: dict[str, Any] | None = None,
    progress: Any = None,
) -> np.ndarray:
    """The network's update of each patch at its voxel centres (see the module docstring, step 2).

    Args:
        model: a :class:`~patchmorph_core.model.PatchMorph` (anything with ``stage_update``).
        fixed: fixed image pyramid (world unit of the registration).
        moving: moving image pyramid in the same unit.
        prior: the current transform's displacement (initial alignment or the coarser stage's field).
        specs: patches of one stage.
        config: batch size and device (``"auto"`` → CUDA when available; AMP on CUDA).
        fixed_range, moving_range: intensity ranges ``(lo, hi)`` for :func:`~patchmorph_core.sampling.normalize`,
            computed once per image (None: computed here with ``intensity_range``).
        stats: if given, ``"forward_seconds"`` and ``"sampling_seconds"`` are added to it, and ``"precision"``
            (:func:`network_precision`) set.
        progress: optional tqdm bar advanced by the number of patches done.

    Returns:
        ``(B, 3, P, P, P)`` float32 update ``v`` (world units, components ``(z, y, x)``), to be composed
        with ``prior`` after averaging (:func:`finalize`).
    """
    size = specs[0].size if specs else int(model.config.patch_size)
    out = np.empty((len(specs), 3, size, size, size), dtype=np.float32)
    if not specs:
        return out
    if len({s.stage for s in specs}) != 1:
        raise ValueError("estimate_patches takes patches of one stage at a time")
    f_lo, f_hi = intensity_range(fixed) if fixed_range is None else fixed_range
    m_lo, m_hi = intensity_range(moving) if moving_range is None else moving_range
    device = _model_device(model, config)
    if stats is not None:
        stats["precision"] = network_precision(device, config.precision)

    for start in range(0, len(specs), config.batch_size):
        batch = specs[start : start + config.batch_size]
        tic = time.perf_counter()
        grids = [s.grid for s in batch]
        points = _batch_points(grids)
        fixed_b = np.stack([normalize(sample_patch(fixed, g), f_lo, f_hi) for g in grids])
        moving_b = normalize(_moving_batch(moving, grids, points, prior), m_lo, m_hi)
        linear_b = np.stack([g.linear for g in grids]).astype(np.float32)
        toc = time.perf_counter()
        with torch.inference_mode(), _autocast(device, config.precision):
            update = model.stage_update(
                batch[0].stage,
                torch.from_numpy(fixed_b[:, None]).to(device),
                torch.from_numpy(moving_b[:, None]).to(device),
                torch.from_numpy(linear_b).to(device),
            )
        update_np = update.float().cpu().numpy()
        forward = time.perf_counter() - toc
        out[start : start + len(batch)] = update_np
        if stats is not None:
            stats["forward_seconds"] = stats.get("forward_seconds", 0.0) + forward
            stats["sampling_seconds"] = stats.get("sampling_seconds", 0.0) + (
                time.perf_counter() - tic - forward
            )
        if progress is not None:
            progress.update(len(batch))
    return out


def _batch_points(grids: Sequence[Grid]) -> np.ndarray:
    """``(B·P³, 3)`` world voxel centres of a batch of equally shaped patches, patch after patch
    (the values of each ``grid.points()``)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grids[0].shape], indexing="ij"), axis=-1)
    index = index.reshape(-1, 3).astype(np.float64)
    return np.concatenate([g.index_to_world(index) for g in grids])


def _moving_batch(
    moving: MultiscaleImage, grids: Sequence[Grid], points: np.ndarray, prior: Displacement
) -> np.ndarray:
    """The moving patches ``M(x + prior(x))`` of a batch: ``(B, P, P, P)`` float32.

    ``points`` are the batch's voxel centres (:func:`_batch_points`). Same samples as
    ``sample_patch(moving, grid, lambda x: x + prior(x))`` per patch, computed for the whole batch in
    one prior evaluation (:func:`~patchmorph_core.sampling.displacement_at`) and one interpolation.
    """
    level = moving.level_for_spacing(float(grids[0].spacing.max()))
    values = sample_points(level, points + displacement_at(prior, points))
    return values.reshape(len(grids), *grids[0].shape)


BLOCK_CACHE_BYTES = 256 * 1024**2
"""Largest box of one image (or of the prior field) a block task holds in memory (see :func:`block_inputs`)."""


def _specs_world_box(specs: Sequence[PatchSpec]) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` world corners of the axis-aligned box of all the patches' voxel centres."""
    bounds = np.array([s.grid.world_bounds() for s in specs])
    return bounds[:, 0].min(axis=0), bounds[:, 1].max(axis=0)


def _cached_prior(prior: Displacement, low: np.ndarray, high: np.ndarray) -> Displacement:
    """``prior`` with a store-backed field held in memory over the world box ``[low, high]`` (plus two
    voxels; not cached over :data:`BLOCK_CACHE_BYTES`); any other displacement as it is."""
    if not isinstance(prior, FieldDisplacement):
        return prior
    box = world_box(prior.grid, low, high, margin=2)
    field_box = None if box is None else (slice(None), *box)
    return FieldDisplacement(cache_box(prior.field, field_box, BLOCK_CACHE_BYTES), prior.grid)


def block_inputs(
    fixed: MultiscaleImage, moving: MultiscaleImage, prior: Displacement, specs: Sequence[PatchSpec]
) -> tuple[MultiscaleImage, MultiscaleImage, Displacement]:
    """The inputs of a set of neighbouring patches with the boxes they read held in memory.

    Every patch would otherwise read (and decompress) its own box of the stores; here each image's
    level is read once over the patches' joint box (the moving one over that box mapped through the
    prior, plus half a patch), and a store-backed prior field once over the box plus half a patch (every
    batch samples it). Samples are identical to uncached reads (reads outside a box
    still go to the store); boxes over :data:`BLOCK_CACHE_BYTES` are not cached.
    """
    if not specs:
        return fixed, moving, prior
    spacing = float(specs[0].grid.spacing.max())
    low, high = _specs_world_box(specs)
    margin = specs[0].extent / 2.0
    prior = _cached_prior(prior, low - margin, high + margin)
    samples = np.stack(np.meshgrid(*np.linspace(low, high, 5).T, indexing="ij"), axis=-1).reshape(-1, 3)
    mapped = samples + prior(samples)
    fixed = fixed.cached(low, high, spacing, BLOCK_CACHE_BYTES)
    moving = moving.cached(
        mapped.min(axis=0) - margin, mapped.max(axis=0) + margin, spacing, BLOCK_CACHE_BYTES
    )
    return fixed, moving, prior


def estimate_and_accumulate(
    model: Any,
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    prior: Displacement,
    specs: Sequence[PatchSpec],
    target: Grid,
    config: InferenceConfig,
    *,
    fixed_range: tuple[float, float] | None = None,
    moving_range: tuple[float, float] | None = None,
    fixed_on_grid: Level | None = None,
    stats: dict[str, Any] | None = None,
    progress: Any = None,
    spread: bool = True,
) -> FieldSums:
    """:func:`estimate_patches` then :func:`accumulate` into ``target``, one batch at a time (memory stays
    at one batch of estimates plus the boxes of :func:`block_inputs`). Arguments as in those two functions;
    ``stats`` also gets ``"accumulate_seconds"``.

    When every patch is a block of ``target``'s grid (:func:`~patchmorph_core.spatial.grid_block_start`; a lattice snapped to the
    field grid), :func:`_estimate_and_accumulate_on_grid` computes the same sums without per-patch
    interpolation, slicing the fixed patches from ``fixed_on_grid`` (:func:`fixed_on_field_grid` of the
    field grid ``target`` is part of) when given.
    """
    fixed_range = intensity_range(fixed) if fixed_range is None else fixed_range
    moving_range = intensity_range(moving) if moving_range is None else moving_range
    starts = [grid_block_start(spec.grid, target) for spec in specs]
    if specs and all(start is not None for start in starts):
        return _estimate_and_accumulate_on_grid(
            model, fixed, moving, prior, specs, np.array(starts), target, config,
            ranges=(fixed_range, moving_range), fixed_on_grid=fixed_on_grid, stats=stats, progress=progress,
            spread=spread,
        )  # fmt: skip
    fixed, moving, prior = block_inputs(fixed, moving, prior, specs)
    sums = FieldSums.zeros(target, spread)
    touched = 0
    for start in range(0, len(specs), config.batch_size):
        batch = specs[start : start + config.batch_size]
        estimates = estimate_patches(
            model,
            fixed,
            moving,
            prior,
            batch,
            config,
            fixed_range=fixed_range,
            moving_range=moving_range,
            stats=stats,
            progress=progress,
        )
        tic = time.perf_counter()
        touched += sum(_add_patch(sums, spec, est) for spec, est in zip(batch, estimates, strict=True))
        if stats is not None:
            stats["accumulate_seconds"] = stats.get("accumulate_seconds", 0.0) + time.perf_counter() - tic
    return FieldSums(target, sums.weighted, sums.weight, sums.weighted_sq, touched)


# -- patches that are blocks of the field grid ---------------------------------------------------------------
FIXED_ON_GRID_BYTES = 32 * 1024**2
"""Largest fixed image on a field grid (float32, with its margin) that :func:`fixed_on_field_grid` samples
once for all the blocks and passes of a stage; a larger one is sampled block by block."""


def lattice_box(lattice: PatchLattice) -> Grid:
    """The box of a snapped lattice's field grid (``lattice.snap``) that holds every voxel of every patch
    the lattice can draw (cell centres jittered up to half a step, snapped by up to half a voxel, plus
    half a patch). Passes with the same overlap share origin, step and counts, hence this box."""
    if lattice.snap is None:
        raise ValueError("lattice_box needs a lattice snapped to its field grid")
    low = lattice.origin - lattice.step / 2.0
    high = lattice.origin + (np.asarray(lattice.counts) - 1) * lattice.step + lattice.step / 2.0
    index = lattice.snap.world_to_index(box_corners(low, high))
    reach = lattice.size / 2.0 + 1.0
    start = np.floor(index.min(axis=0) - reach).astype(np.int64)
    return lattice.snap.crop(start, np.ceil(index.max(axis=0) + reach).astype(np.int64) + 1)


def fixed_on_field_grid(
    fixed: MultiscaleImage, box: Grid, fixed_range: tuple[float, float], max_bytes: int | None = None
) -> Level | None:
    """The normalised fixed image on a box of a stage's field grid (:func:`lattice_box`), sampled once: one
    box read of the pyramid level matching the grid spacing, trilinear; read-only.

    Every block of every pass on that field grid then slices its fixed patches from it
    (:func:`_estimate_and_accumulate_on_grid`) instead of reading and interpolating the fixed image again
    on its own box (benchmarks/scale.py, 1.06 GiB, default: worker patch sampling 1.57 → 1.01 s of 2.65 s
    outside the network; 8.66 → 4.33 s with four stages). The values equal sampling each block's box to
    float32 rounding, and the in-memory and the chunked path both take theirs from here
    (:class:`StageFixedImages`).

    Args:
        fixed: fixed image pyramid.
        box: the grid to sample on (a box of a field grid: isotropic, the patch spacing).
        fixed_range: intensity range for :func:`~patchmorph_core.sampling.normalize`.
        max_bytes: largest image to make (float32; default :data:`FIXED_ON_GRID_BYTES`); beyond it None
            (blocks sample their own boxes).
    """
    if 4 * int(np.prod(box.shape)) > (FIXED_ON_GRID_BYTES if max_bytes is None else max_bytes):
        return None
    level = fixed.level_for_spacing(float(box.spacing.max()))
    values = normalize(sample_affine(level.array, level.grid.index_map(box), box.shape), *fixed_range)
    values.setflags(write=False)  # shared by every block of the stage's passes
    return Level(values, box)


def _estimate_and_accumulate_on_grid(
    model: Any,
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    prior: Displacement,
    specs: Sequence[PatchSpec],
    starts: np.ndarray,
    target: Grid,
    config: InferenceConfig,
    *,
    ranges: tuple[tuple[float, float], tuple[float, float]],
    fixed_on_grid: Level | None,
    stats: dict[str, Any] | None,
    progress: Any,
    spread: bool,
) -> FieldSums:
    """:func:`estimate_and_accumulate` for patches that are blocks of ``target``'s grid.

    The fixed image, the prior and the moving image through the prior are sampled once on the box of
    grid voxels the patches span (the trilinear samples of the per-patch path at the same points, each
    one box read and one float32 ``grid_sample`` call, or the box itself where the grids line up:
    :func:`~patchmorph_core.sampling.sample_affine`, :func:`~patchmorph_core.sampling.mapped_indices`;
    the fixed box is a slice of ``fixed_on_grid`` when that holds it); each patch's inputs are then
    slices of those, and its windowed update is added to the sums by slice.

    Args:
        starts: ``(N, 9)`` :func:`~patchmorph_core.spatial.grid_block_start` of each patch on ``target``.
        ranges: fixed and moving intensity ranges.
        fixed_on_grid: the normalised fixed image on a box of the field grid (:func:`fixed_on_field_grid`),
            sliced where it holds the work box (:func:`~patchmorph_core.spatial.box_within`), else sampled.
            ``stats["fixed_from_grid"]`` counts the calls that sliced it.
        Others: as in :func:`estimate_and_accumulate`.
    """
    tic = time.perf_counter()
    size = specs[0].size
    low = starts[:, :3].min(axis=0)
    work = target.crop(low, starts[:, :3].max(axis=0) + size)
    starts = starts - np.concatenate([low, np.zeros(6, dtype=np.int64)])
    spacing = float(specs[0].grid.spacing.max())
    (f_lo, f_hi), (m_lo, m_hi) = ranges
    fixed_level, moving_level = fixed.level_for_spacing(spacing), moving.level_for_spacing(spacing)
    inside = None if fixed_on_grid is None else box_within(fixed_on_grid.grid, work)
    fixed_w = None if inside is None else fixed_on_grid.array[inside]
    if stats is not None:  # calls that sliced the fixed image instead of sampling it (a count)
        stats["fixed_from_grid"] = stats.get("fixed_from_grid", 0.0) + float(fixed_w is not None)
    if fixed_w is None:
        fixed_w = normalize(
            sample_affine(fixed_level.array, fixed_level.grid.index_map(work), work.shape), f_lo, f_hi
        )
    moving_index = mapped_indices(prior, work, moving_level.grid)
    moving_w = normalize(sample_indices(moving_level.array, moving_index), m_lo, m_hi)
    sums = FieldSums.zeros(work, spread)
    weights = patch_window(size).astype(np.float32)
    device = _model_device(model, config)
    if stats is not None:
        stats["precision"] = network_precision(device, config.precision)
    seconds = {"forward_seconds": 0.0, "sampling_seconds": time.perf_counter() - tic, "accumulate_seconds": 0.0}
    for first in range(0, len(specs), config.batch_size):
        batch = range(first, min(first + config.batch_size, len(specs)))
        tic = time.perf_counter()
        fixed_b = np.stack([grid_block_view(fixed_w, starts[n], size) for n in batch])
        moving_b = np.stack([grid_block_view(moving_w, starts[n], size) for n in batch])
        linear_b = np.stack([specs[n].grid.linear for n in batch]).astype(np.float32)
        toc = time.perf_counter()
        with torch.inference_mode(), _autocast(device, config.precision):
            update = model.stage_update(
                specs[first].stage,
                torch.from_numpy(fixed_b[:, None]).to(device),
                torch.from_numpy(moving_b[:, None]).to(device),
                torch.from_numpy(linear_b).to(device),
            )
        estimates = update.float().cpu().numpy()
        tuc = time.perf_counter()
        weighted = weights * estimates  # (B, 3, P, P, P) float32; the window is symmetric
        weighted_sq = np.sum(weighted * estimates, axis=1) if sums.weighted_sq is not None else None
        for k, n in enumerate(batch):  # grid_block_view of the sums is in patch order, like the estimates
            grid_block_view(sums.weighted, starts[n], size)[...] += weighted[k]
            grid_block_view(sums.weight, starts[n], size)[...] += weights
            if sums.weighted_sq is not None and weighted_sq is not None:
                grid_block_view(sums.weighted_sq, starts[n], size)[...] += weighted_sq[k]
        seconds["forward_seconds"] += tuc - toc
        seconds["sampling_seconds"] += toc - tic
        seconds["accumulate_seconds"] += time.perf_counter() - tuc
        if progress is not None:
            progress.update(len(batch))
    if stats is not None:
        for key, value in seconds.items():
            stats[key] = stats.get(key, 0.0) + value
    # patches whose window (non-zero on the block's inner voxels) reaches the target
    inner_low, inner_high = starts[:, :3] + low + 1, starts[:, :3] + low + size - 1
    touched = int(np.sum(np.all((inner_high > 0) & (inner_low < np.asarray(target.shape)), axis=1)))
    cropped = sums.crop(-low, -low + np.asarray(target.shape))  # no copy when the box is the target
    return FieldSums(target, cropped.weighted, cropped.weight, cropped.weighted_sq, touched)


# -- the whole registration in memory -------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldSpacing:
    """The output field's spacing and where it came from.

    Attributes:
        value: spacing in the fixed image's unit.
        unit: that unit.
        source: ``"given"`` (``field_spacing`` set), ``"default"`` (the coarser voxel of the two images) or
            ``"stages"`` (``n_stages`` set without ``field_spacing``: the finest stage's patch spacing).
        note: one sentence a user reads (what was used and why).
    """

    value: float
    unit: str
    source: str
    note: str


@dataclass(frozen=True, eq=False)
class RegistrationPlan:
    """Everything a registration run derives from its inputs before the first patch is estimated.

    Made by :func:`plan_registration` before the driver (:mod:`pipeline.driver`) runs the passes.

    Attributes:
        moving: the moving image converted to the fixed image's unit.
        initial: ``(4, 4)`` initial world→world map, fixed → moving (the fitted affine or the
            centre-of-mass translation, see ``InferenceConfig.initial_alignment``).
        alignment: the initial alignment's record (NCC before/after, accepted, seconds).
        fixed_range, moving_range: intensity ranges used to normalise every patch.
        lattices: the patch lattice of each pass, coarse to fine (over the fixed tissue box): one per
            stage from the first stage run, then ``config.refine_passes`` more of the finest stage.
        grids: the field grid of each pass (coarse stages at their patch spacing; the finest stage and
            its refinement passes at the output field spacing).
        field_spacing: the output field spacing and where it came from (:func:`resolve_field_spacing`).
    """

    moving: MultiscaleImage
    initial: np.ndarray
    alignment: dict[str, Any]
    fixed_range: tuple[float, float]
    moving_range: tuple[float, float]
    lattices: list[PatchLattice]
    grids: list[Grid]
    field_spacing: FieldSpacing


def cascade_extents(whole: float, patch_size: int, spacing: float, n_stages: int | None = None) -> list[float]:
    """The patch extent ``E_s`` of each stage, coarse to fine, for an output field of ``spacing``.

    ``E_0 = whole`` (the whole-brain extent); each stage halves the extent while the patch spacing
    ``E_s / P`` is more than √2 times ``spacing``; the last stage's patches are then laid on the field
    itself, ``E = P · spacing``, so the field grid is the last stage's patch grid (the fast field-grid
    layout, :func:`stage_lattice`'s ``snap``) and a finer field costs one stage more per halving. The ratio
    of the last two patch spacings lies between √2 and 2√2. With ``n_stages`` the count is given instead:
    ``E_0 / 2^s`` for ``s < n_stages``, none finer than ``P · spacing``.

    Args:
        whole: the coarsest patch extent (world units).
        patch_size: ``P``.
        spacing: the output field spacing (same unit).
        n_stages: the number of stages, or None (follow ``spacing``).

    Returns:
        The stages' extents, coarse to fine, the last ``P · spacing`` unless ``n_stages`` ends coarser.
    """
    floor = float(patch_size) * float(spacing)
    if n_stages is not None:
        return [max(float(whole) / 2.0**s, floor) for s in range(n_stages)]
    extents = [float(whole)]
    while extents[-1] > math.sqrt(2.0) * floor:
        extents.append(extents[-1] / 2.0)
    extents[-1] = floor
    return extents


def resolve_field_spacing(fixed: MultiscaleImage, moving: MultiscaleImage, config: InferenceConfig) -> FieldSpacing:
    """The output field spacing of a registration, in the fixed image's unit (see
    ``InferenceConfig.field_spacing``): as given (a length with its unit, or a number in the fixed unit),
    else the coarser of the two images' finest voxel sizes; raised to the fixed image's finest voxel when
    finer (a finer field only interpolates the image)."""
    unit = fixed.unit
    voxel = float(fixed.grid.spacing.min())
    if config.field_spacing is None:
        moving_voxel = float(moving.with_unit(unit).grid.spacing.min())
        value = max(voxel, moving_voxel)
        which = "moving" if moving_voxel > voxel else "fixed"
        return FieldSpacing(
            value, unit, "default", f"default: the coarser voxel of the two images (the {which} image's, {value:.4g} {unit})"
        )
    if isinstance(config.field_spacing, str):
        number, given_unit = parse_length(config.field_spacing, "field_spacing")
        wanted = number * unit_scale(given_unit, unit)
    else:
        wanted = float(config.field_spacing)
    if wanted < voxel * (1.0 - 1e-9):
        return FieldSpacing(
            voxel, unit, "given",
            f"given {config.field_spacing}, raised to the fixed image's finest voxel {voxel:.4g} {unit} (a finer field only "
            "interpolates the image)",
        )  # fmt: skip
    return FieldSpacing(wanted, unit, "given", f"given: {config.field_spacing}")


def _first_stage(config: InferenceConfig, alignment: dict[str, Any], n_stages: int) -> int:
    """The first stage to run: ``config.first_stage``, or by default 1 after an accepted affine start."""
    if config.first_stage is not None:
        return config.first_stage
    return 1 if alignment.get("method") == "affine" and alignment.get("accepted") and n_stages > 1 else 0


def _pass_grid(fixed: MultiscaleImage, extents: Sequence[float], size: int, last: float, stage: int) -> Grid:
    """The field grid of cascade stage ``stage`` (patch extents ``extents``, ``size`` voxels a patch): its patch
    spacing, the output field spacing ``last`` for the finest stage; over the fixed image's box."""
    return fixed.grid.resampled(last if stage == len(extents) - 1 else extents[stage] / size)


def checked_affine(
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    grid: Grid,
    start: np.ndarray,
    fitted: np.ndarray,
    ranges: tuple[tuple[float, float], tuple[float, float]],
) -> StageCheck:
    """The stage check's rule (:mod:`patchmorph_core.stage_check`) for the fitted initial affine: MIND-SSC
    inside the fixed tissue of ``grid``'s check sample (the first pass's field grid), from the centre-of-mass
    start ``start`` (before) to the fitted ``fitted`` (after), both ``(4, 4)`` fixed → moving maps. The affine's
    own acceptance compares the two on its coarse copies; at the first pass's resolution the fit can still be
    worse."""
    scorer = StageScorer.build(fixed, moving, ranges, grid)
    return StageCheck(scorer.score(AffineDisplacement(start)), scorer.score(AffineDisplacement(fitted)))


def plan_registration(
    model: Any,
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    config: InferenceConfig,
    initial: tuple[np.ndarray, dict[str, Any]] | None = None,
) -> RegistrationPlan:
    """Unit conversion, initial alignment, intensity ranges, stage extents, lattices and field grids.

    Args:
        model: the PatchMorph model (``config.patch_size``, ``stage_extents``).
        fixed: fixed image; its unit is the registration's unit.
        moving: moving image (any unit).
        config: inference settings.
        initial: a ``(4, 4)`` initial matrix and its record computed earlier for these inputs (a resumed
            run reuses the first run's, so that both use bit-identical starts); None computes it.
    """
    moving = moving.with_unit(fixed.unit)
    low, high = tissue_bounds(fixed)
    size = int(model.config.patch_size)
    field_spacing = resolve_field_spacing(fixed, moving, config)
    whole = model.stage_extents(float(np.max(high - low)), 1)[0]
    if config.n_stages is not None and config.field_spacing is None:  # a given count: the finest patches set it
        voxel = float(fixed.grid.spacing.min())
        extents = cascade_extents(whole, size, voxel, config.n_stages)
        finest = extents[-1] / size
        field_spacing = FieldSpacing(finest, fixed.unit, "stages", f"the finest patch spacing of {config.n_stages} stages")
    else:
        extents = cascade_extents(whole, size, field_spacing.value, config.n_stages)
    last = field_spacing.value
    grid_low, grid_high = fixed.grid.world_bounds()
    bounds = (np.maximum(low, grid_low), np.minimum(high, grid_high))
    if config.first_stage is not None and config.first_stage >= len(extents):
        raise InputError(
            f"first_stage {config.first_stage} leaves no stage to run (the field spacing gives {len(extents)}): "
            "give a smaller first_stage, a finer field_spacing or more n_stages."
        )
    ranges = (intensity_range(fixed), intensity_range(moving))
    if initial is not None:
        matrix, alignment = np.asarray(initial[0], dtype=np.float64), dict(initial[1])
    elif config.initial_alignment == "affine":
        fit = fit_affine(fixed, moving, config.affine_levels, config.affine_steps)
        matrix = fit.matrix
        alignment = {
            "method": "affine",
            "ncc_start": fit.ncc_start,
            "ncc_fitted": fit.ncc_fitted,
            "accepted": fit.accepted,
            "seconds": fit.seconds,
        }
        if fit.accepted and config.stage_check:
            first_grid = _pass_grid(fixed, extents, size, last, _first_stage(config, alignment, len(extents)))
            centre_of_mass = translation_matrix(initial_translation(fixed, moving))
            check = checked_affine(fixed, moving, first_grid, centre_of_mass, matrix, ranges)
            alignment.update({f"check_{k}": v for k, v in check.record().items()})
            if not check.accepted:
                logger.info(
                    "the initial affine lowered the similarity on the first pass's grid (MIND %.4f from the "
                    "centre of mass, %.4f fitted): centre of mass kept", check.before, check.after,
                )  # fmt: skip
                matrix = centre_of_mass
                alignment["accepted"] = False
    else:
        matrix = translation_matrix(initial_translation(fixed, moving))
        alignment = {"method": "center_of_mass"}
    first = _first_stage(config, alignment, len(extents))

    def lattice(stage: int, overlap: float, grid: Grid) -> PatchLattice:
        snap = grid if config.patch_layout == "field_grid" else None
        if snap is not None and not is_patch_grid(grid, extents[stage], size):
            logger.info(
                "stage %d: field spacing %.4g differs from the patch spacing %.4g; rotated patch layout",
                stage, float(grid.spacing.max()), extents[stage] / size,
            )  # fmt: skip
            snap = None
        return stage_lattice(
            fixed.grid, extents[stage], overlap, config.seed, stage, config.max_rotation_deg, size, bounds, snap
        )

    lattices, grids = [], []
    for stage in range(first, len(extents)):
        grids.append(_pass_grid(fixed, extents, size, last, stage))
        lattices.append(lattice(stage, config.overlap, grids[-1]))
    refine = lattice(len(extents) - 1, config.refine_overlap or config.overlap, grids[-1])
    for repeat in range(1, config.refine_passes + 1):
        lattices.append(dataclasses.replace(refine, repeat=repeat))
        grids.append(grids[-1])
    return RegistrationPlan(
        moving=moving,
        initial=matrix,
        alignment=alignment,
        fixed_range=ranges[0],
        moving_range=ranges[1],
        lattices=lattices,
        grids=grids,
        field_spacing=field_spacing,
    )


class StageFixedImages:
    """:func:`fixed_on_field_grid` for each pass of a registration, made once per lattice box and field grid
    (a stage's refinement passes share them unless ``refine_overlap`` differs from ``overlap``) and only
    for lattices snapped to their field grid; the in-memory and the chunked path both take their fixed
    images from here. Passes run one after another, so only the last image is kept.

    Args:
        fixed: fixed image pyramid.
        fixed_range: its intensity range for :func:`~patchmorph_core.sampling.normalize`.
        max_bytes: passed to :func:`fixed_on_field_grid`.
    """

    def __init__(
        self, fixed: MultiscaleImage, fixed_range: tuple[float, float], max_bytes: int | None = None
    ) -> None:
        self.fixed = fixed
        self.fixed_range = fixed_range
        self.max_bytes = max_bytes
        self._key: tuple[tuple[int, int, int], bytes] | None = None
        self._image: Level | None = None

    def get(self, lattice: PatchLattice) -> Level | None:
        """The fixed image for ``lattice``'s patches on its field grid (``lattice.snap``), or None (not
        snapped, or over ``max_bytes``)."""
        if lattice.snap is None:
            return None
        box = lattice_box(lattice)
        key = (box.shape, box.affine.tobytes())
        if key != self._key:
            self._image = fixed_on_field_grid(self.fixed, box, self.fixed_range, self.max_bytes)
            self._key = key
        return self._image


@dataclass(frozen=True, eq=False)
class RegistrationResult:
    """A registration's output.

    Attributes:
        field: ``(3, Z, Y, X)`` float32 displacement on ``grid`` (fixed world → moving world, components
            ``(z, y, x)``, in ``grid.unit`` = the fixed image's unit).
        grid: the field grid.
        uncertainty: ``(Z, Y, X)`` float32: after the polish its residual (local MIND-SSC dissimilarity, 0-1,
            :func:`~patchmorph_core.polish.residual_map`), else the weighted std of the finest stage's patch
            estimates (world units).
        info: per-stage figures (patches, field grid shape, coverage, seconds) and the settings used.
    """

    field: np.ndarray
    grid: Grid
    uncertainty: np.ndarray
    info: dict[str, Any]
