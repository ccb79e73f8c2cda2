"""Polish: greedy similarity steps on the finest field after the network, as a stationary velocity field
composed with the network's field (instance optimisation; diffeomorphic by construction).

The network's field ``u₀`` leaves a residual misalignment of about a voxel at fine structures. The polish takes
a few explicit steps of a similarity's ascent direction (:mod:`patchmorph_core.similarity`: local NCC by
default, ANTs SyN's CC update; MIND-SSC across contrasts), without autograd, on one box of the finest field
grid at a time:

    v = 0                                         (a velocity, in field voxels)
    for each step:
        W(x) = M(x + v(x) + u₀(x + v(x)))         (the moving image through the correction, then u₀)
        f    = similarity.force(F, W)             (per field-grid axis)
        δ    = gain · G_σ * f, clamped to max_step field voxels per voxel
        v    ← G_σc * (v + δ)                     (the velocity is smoothed; u₀ is not)

and the output of the box is ``v``. The registration's field is then ``u = c ∘ u₀``, i.e.
``u(x) = c(x) + u₀(x + c(x))`` with ``c = exp(v̄)`` the displacement of the flow of the (averaged) velocity
after unit time, by scaling and squaring (:func:`~patchmorph_core.displacement.exp_velocity`): ``c`` is
a diffeomorphism (its Jacobian determinant is positive), so composing it with a fold-free network field
cannot fold it, and its inverse is ``exp(−v̄)``. This is log-domain demons (Vercauteren et al., NeuroImage
2009) with a greedy CC force: the steps add up velocities (the first order of composing the small steps'
flows) and warp through ``x + v`` (the first order of ``exp(v)``); the output integrates exactly. The
step's gain, not a global maximum, sets its size, and every step moves a voxel by at most ``max_step``, so
``|v| ≤ iterations · max_step`` field voxels everywhere (:attr:`PolishSettings.max_velocity`).

After the last step the box also gives the registration's uncertainty map: the local MIND-SSC dissimilarity of
the fixed image and the moving image through the polished field, smoothed by a Gaussian of
:data:`RESIDUAL_SIGMA` field voxels (:func:`residual_map`). Unlike the spread of the network's overlapping
estimates it does not depend on the lattice's seed, and it follows the field's error more closely
(``docs/contrast.md``).

A box is polished on its own (the similarity's windows and the smoothing see only the box; the force is
computed with the box's border): the pipeline runs the polish on a global lattice of overlapping boxes and
blends their velocities with a partition of unity that gives each box's border no weight
(:mod:`pipeline.polish`), one pass over the data, like the network's patches. Settings (chosen on validation
pairs, ``docs/method.md``): 10 steps, window radius 2 (5³ voxels, as ANTs SyNCC's radius 2), update
smoothing σ 1.5, velocity smoothing σ 0.5, gain 1.5, at most 0.25 field voxels a step.

An option for two images of one contrast (:attr:`PolishSettings.coarse_iterations`, off by default): steps on a
grid :data:`COARSE_FACTOR` times coarser first, whose velocity the polish's own steps start from; across
contrasts they make the field worse (``docs/method.md``, *Coarse steps*).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from patchmorph_core.config import InferenceConfig
from patchmorph_core.displacement import exp_reach, exp_velocity_inside
from patchmorph_core.sampling import sample_affine, sample_separable
from patchmorph_core.similarity import MindSSC, Similarity, in_slabs, make_similarity, z_slabs
from patchmorph_core.source import Level, MultiscaleImage
from patchmorph_core.spatial import (
    ALIGN_CORNERS,
    Grid,
    box_within,
    grid_box,
    index_to_normalized,
    normalized_per_index,
    read_box,
    row_box,
)

SQUARINGS = 5
"""Scaling-and-squaring steps of :func:`~patchmorph_core.displacement.exp_velocity` for the polish's velocity
(at most ``iterations · max_step`` = 2.5 field voxels by default, so each of the 2⁵ = 32 sub-steps moves a
voxel by under a tenth of a voxel)."""


COARSE_FACTOR = 2
"""The coarse steps (:attr:`PolishSettings.coarse_iterations`) run on a grid this many times coarser than the
polish grid."""


RESIDUAL_SIGMA = 3.0
"""Gaussian smoothing (field voxels) of the local MIND-SSC dissimilarity left after the polish, the
registration's uncertainty map (:func:`residual_map`; chosen on validation pairs with a known field,
``docs/contrast.md``)."""


MAX_COARSENING = 4
"""Coarsest polish grid :func:`coarsening_for` picks, in field voxels."""


def coarsening_for(field_spacing: float, data_spacing: float) -> int:
    """The polish grid's coarsening by default: the largest integer ``f`` ≤ :data:`MAX_COARSENING` with ``f ·
    field_spacing`` at most ``data_spacing`` (the coarser of the two images' finest voxels, the field spacing's
    default). A field finer than the data gets the network's finer patches; the polish's similarity has no
    detail finer than the coarser image to follow, so it steps on the coarser grid (8× fewer voxels at 2×)."""
    ratio = float(data_spacing) / float(field_spacing)
    return int(min(MAX_COARSENING, max(1, math.floor(ratio * 1.01))))


def gauss_radius(sigma: float) -> int:
    """Half-width in voxels of the truncated Gaussian kernel of ``sigma`` voxels (0 for no smoothing)."""
    return int(math.ceil(3.0 * sigma)) if sigma > 0 else 0


@dataclass(frozen=True)
class PolishSettings:
    """The polish's settings, in field voxels (see the module doc).

    Attributes:
        iterations: steps (0: no polish).
        gain: update per unit of force (field voxels).
        max_step: largest update of one voxel in one step (field voxels).
        radius: half-width of the similarity's window (field voxels).
        sigma: Gaussian smoothing of each update (field voxels).
        correction_sigma: Gaussian smoothing of the velocity at every step (field voxels).
        similarity: the similarity whose force drives the steps (:func:`~patchmorph_core.similarity.make_similarity`).
        coarsening: the steps run on a grid this many times coarser than the field (:func:`polish_result`); the
            other settings are in voxels of that grid.
        coarse_iterations: steps taken first on a grid :data:`COARSE_FACTOR` times coarser still (0: none), with
            the window :meth:`coarse_settings` gives; the polish's own steps continue from their velocity.
    """

    iterations: int
    gain: float = 1.5
    max_step: float = 0.25
    radius: int = 2
    sigma: float = 1.5
    correction_sigma: float = 0.5
    similarity: str = "ncc"
    coarsening: int = 1
    coarse_iterations: int = 0

    @classmethod
    def from_config(cls, config: InferenceConfig, field_spacing: float = 1.0, data_spacing: float = 1.0) -> PolishSettings:
        """The settings of an :class:`InferenceConfig` (``polish_*`` fields); ``polish_coarsening`` None is
        :func:`coarsening_for` the field's and the data's spacings (same unit)."""
        coarsening = config.polish_coarsening
        return cls(
            iterations=config.polish_iterations,
            gain=config.polish_gain,
            max_step=config.polish_max_step,
            radius=config.polish_radius,
            sigma=config.polish_sigma,
            correction_sigma=config.polish_correction_sigma,
            similarity=config.polish_similarity,
            coarsening=coarsening_for(field_spacing, data_spacing) if coarsening is None else coarsening,
            coarse_iterations=config.polish_coarse_iterations,
        )

    def make_similarity(self) -> Similarity:
        """The similarity object of :attr:`similarity` with window half-width :attr:`radius`."""
        return make_similarity(self.similarity, self.radius)

    def coarse_settings(self) -> PolishSettings:
        """The settings of the coarse steps: :attr:`coarse_iterations` steps whose similarity window spans about
        the same field voxels as the polish's own (radius ``max(1, radius // COARSE_FACTOR)`` coarse voxels)."""
        return dataclasses.replace(
            self, iterations=self.coarse_iterations, coarse_iterations=0, radius=max(1, self.radius // COARSE_FACTOR)
        )

    @property
    def max_velocity(self) -> float:
        """The largest velocity any voxel can reach (field voxels): ``(iterations + COARSE_FACTOR ·
        coarse_iterations) · max_step · coarsening`` (0 without steps: the coarse steps run only before some)."""
        steps = self.iterations + COARSE_FACTOR * self.coarse_iterations if self.iterations else 0
        return steps * self.max_step * self.coarsening

    @property
    def exp_halo(self) -> int:
        """Field voxels beyond a chunk that the integration of the averaged velocity on it reads: it runs on
        every f-th field voxel (f = :attr:`coarsening`, :func:`exp_on_nodes`), so f times the
        :func:`~patchmorph_core.displacement.exp_reach` of ``max_velocity / f`` on those nodes beyond the nodes
        around the chunk, which lie within f − 1 voxels of it (at f = 1 the reach of :attr:`max_velocity`). A
        chunk integrated with this many voxels of the averaged velocity around it equals the whole grid's."""
        f = self.coarsening
        return f * exp_reach(self.max_velocity / f, SQUARINGS) + f - 1


def separable(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter ``(B, C, Z, Y, X)`` by the 1-D ``kernel`` (odd length) along z, y and x; replicate border.

    The volume is padded once (replicate padding commutes with filtering along the other axes), then each
    axis is a weighted sum of shifted views (on CPU about 4× faster than a grouped ``conv3d``, the same
    values to float rounding), slab by slab of output z-slices (:func:`~patchmorph_core.similarity.z_slabs`;
    each slab reads its slices and ``2 · radius`` more of the padded volume): every voxel gets the same sums in
    the same order as filtering the whole volume at once, bit for bit, in about half the time once the volume
    outgrows the cache.
    """
    radius = (kernel.numel() - 1) // 2
    if radius == 0:
        return x * kernel[0]
    taps = [float(k) for k in kernel]
    padded = F.pad(x, [radius] * 6, mode="replicate")
    out = torch.empty_like(x)
    for z in z_slabs(x.shape[2], whole=not in_slabs(padded)):
        slab = padded[:, :, z.start : z.stop + 2 * radius]
        for dim in (2, 3, 4):
            n = slab.shape[dim] - 2 * radius
            total = out[:, :, z] if dim == 4 else None  # the last axis sums into ``out``
            total = torch.mul(slab.narrow(dim, 0, n), taps[0], out=total)
            for shift in range(1, len(taps)):
                total.add_(slab.narrow(dim, shift, n), alpha=taps[shift])
            slab = total
    return out


def gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing (``sigma`` voxels, truncated at 3σ, replicate border) of ``(B, C, Z, Y, X)``."""
    radius = gauss_radius(sigma)
    if radius == 0:
        return x
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2.0 * sigma * sigma))
    return separable(x, kernel / kernel.sum())


def scaled(values: np.ndarray, intensity_range: tuple[float, float]) -> np.ndarray:
    """``(values − lo) / (hi − lo)`` as float32 of ``values``' shape (any, e.g. ``(Z, Y, X)``), NaN → 0, not clipped
    (clipping bright tissue flattens its edges: validation Dice 0.710 clipped vs 0.713); ``intensity_range``
    ``(lo, hi)`` in the image's intensity units, the result dimensionless."""
    lo, hi = intensity_range
    return np.nan_to_num((np.asarray(values, np.float32) - lo) / max(hi - lo, 1e-12), nan=0.0).astype(np.float32)


def fixed_on_box(fixed: MultiscaleImage, grid: Grid, fixed_range: tuple[float, float]) -> np.ndarray:
    """``grid.shape`` float32: the fixed image (the level for ``grid``, trilinear) on ``grid``, :func:`scaled`
    — the same values on a box of the field grid as on the whole grid."""
    level = fixed.level_for_grid(grid)
    return scaled(sample_affine(level.array, level.grid.index_map(grid), tuple(grid.shape)), fixed_range)


def _moving_box(level: Level, world: np.ndarray, margin_world: float) -> Level | None:
    """The part of ``level`` that the ``(N, 3)`` world points can reach within ``margin_world``, read once
    (None: none of it)."""
    rows = level.grid.world_to_index_rows(world)
    margin = int(math.ceil(margin_world / float(level.grid.spacing.min()))) + 1
    box = row_box(rows, level.grid.shape, margin=margin)
    if box is None:
        return None
    block = read_box(level.array, box).astype(np.float32, copy=False)
    return Level(block, level.grid.crop([s.start for s in box], [s.stop for s in box]))


def _sampling_map(
    moving: Grid, grid: Grid, mapped: np.ndarray, field: np.ndarray, device: torch.device | str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Where a step samples the moving box, to first order in the velocity: ``grid_sample`` coordinates of
    ``x + v + u₀(x + v) ≈ x + u₀(x) + (R + ∂u₀/∂q) v`` for a velocity ``v`` in field voxels (``R`` the field
    grid's index → world part, ``∂u₀/∂q`` the network field's central differences along its index axes).

    Args:
        moving: the moving box's grid; ``grid``: the field box's grid.
        mapped: ``(Z, Y, X, 3)`` world points ``x + u₀(x)``.
        field: ``(3, Z, Y, X)`` ``u₀`` (world units).
        device: where the tensors go.

    Returns:
        ``(1, Z, Y, X, 3)`` normalised coordinates of ``x + u₀(x)`` and, per field axis ``k``, the
        ``(1, Z, Y, X, 3)`` change of those coordinates per field voxel of ``v_k`` (float32).
    """
    to_index = moving.inverse_affine
    shape = tuple(moving.shape)
    gradients = np.gradient(field, axis=(1, 2, 3)) if min(field.shape[1:]) > 1 else [np.zeros_like(field)] * 3
    # grid_sample units (x, y, z) per world unit: index_to_normalized is affine, so a step's change of the
    # coordinates is this matrix times the step (no difference of two nearly equal coordinates)
    per_world = (normalized_per_index(shape) @ to_index[:3, :3]).astype(np.float32)
    base = torch.empty((1, *mapped.shape), dtype=torch.float32)
    columns = [torch.empty_like(base) for _ in range(3)]
    for z in z_slabs(mapped.shape[0]):  # float64 temporaries of a slab stay in cache; voxel by voxel, the same
        index = torch.from_numpy(mapped[z] @ to_index[:3, :3].T + to_index[:3, 3])[None]  # float64
        base[:, z] = index_to_normalized(index, shape)
        for k in range(3):  # one field-voxel step along axis k: R[:, k] + ∂u₀/∂q_k, world units
            step = np.asarray(grid.linear[:, k], np.float32)[:, None, None, None] + gradients[k][:, z]
            columns[k][0, z] = torch.from_numpy(np.einsum("ij,jzyx->zyxi", per_world, step))
    return base.to(device), [column.to(device) for column in columns]


def residual_map(fixed: torch.Tensor, warped: torch.Tensor, sigma: float = RESIDUAL_SIGMA) -> torch.Tensor:
    """``(B, 1, Z, Y, X)`` the local dissimilarity left by a registration: minus the MIND-SSC similarity map
    (:class:`~patchmorph_core.similarity.MindSSC`, the mean squared difference of the two images' descriptors,
    0 where their local structure agrees, at most 1; dimensionless, any contrasts) smoothed by a Gaussian of
    ``sigma`` voxels. Inside the tissue it follows the field's error better than the spread of the network's
    overlapping estimates and does not depend on the lattice's seed (``docs/contrast.md``). At full
    resolution: on images averaged over 2³ voxels it followed the error half as well."""
    return gaussian(-MindSSC().voxel_map(fixed, warped), sigma)


@dataclass(frozen=True)
class PolishResult:
    """A box's polish on the grid its steps ran on (the box of the field grid, or with coarsening f > 1 the box
    f times coarser: f³ times fewer voxels to keep and pass on).

    Attributes:
        grid: the polish grid.
        velocity: ``(3, Z, Y, X)`` float32 velocity on ``grid`` (world units, components ``(z, y, x)``).
        residual: ``(Z, Y, X)`` float32 :func:`residual_map` on ``grid``.
    """

    grid: Grid
    velocity: np.ndarray
    residual: np.ndarray

    def restricted(self, target: Grid) -> PolishResult:
        """The part of this result that :meth:`on` ``target`` reads (views): ``target``'s own box of
        :attr:`grid` when it is one (:func:`~patchmorph_core.spatial.box_within`), else the box of :attr:`grid`
        holding ``target``'s voxel centres and their interpolation neighbours, clipped to the grid
        (:func:`~patchmorph_core.spatial.grid_box`)."""
        box = box_within(self.grid, target) or grid_box(self.grid, target, margin=0)
        assert box is not None  # target lies within the polished box
        start, stop = [s.start for s in box], [s.stop for s in box]
        return PolishResult(self.grid.crop(start, stop), self.velocity[(slice(None), *box)], self.residual[box])

    def on(self, target: Grid) -> tuple[np.ndarray, np.ndarray]:
        """Velocity ``(3, *target.shape)`` and residual ``target.shape`` on ``target`` (:meth:`velocity_on`,
        :meth:`residual_on`)."""
        return self.velocity_on(target), self.residual_on(target)

    def velocity_on(self, target: Grid) -> np.ndarray:
        """Velocity ``(3, *target.shape)`` on ``target``, a grid within the polished box (a box of the field grid,
        or of its lattice nodes): the same voxels when ``target`` is a box of :attr:`grid`, else sampled
        trilinearly (edge values beyond the polish grid's outer voxel centres; a trilinear velocity is
        Lipschitz, so its exponential stays a diffeomorphism)."""
        return _on(self.velocity, self.grid, target)

    def residual_on(self, target: Grid) -> np.ndarray:
        """Residual ``target.shape`` on ``target``, as :meth:`velocity_on`."""
        return _on(self.residual, self.grid, target)


def _on(values: np.ndarray, grid: Grid, target: Grid) -> np.ndarray:
    """``(..., Z, Y, X)`` ``values`` on ``grid`` at ``target``'s voxels: a view when ``target`` is a box of
    ``grid``, else trilinear (border values beyond ``grid``'s outer voxel centres)."""
    box = box_within(grid, target)
    if box is not None:
        return values[(..., *box)]
    return sample_separable(values, grid.index_map(target), target.shape, "border")


def exp_on_nodes(
    values: np.ndarray, grid: Grid, inner: tuple[slice, slice, slice], step: int, first: Sequence[int]
) -> np.ndarray:
    """``exp`` of a velocity given on the nodes of a coarser lattice, on the box ``inner`` of ``grid``: the
    polish's velocity at coarsening f > 1 is trilinear from f times coarser tiles, so its flow is integrated on
    every ``step``-th voxel (f³ times fewer voxels, a ``step`` times shorter reach) and its displacement sampled
    trilinearly onto ``inner``'s voxels (edge values beyond the outer nodes). At ``step`` 1 the nodes are the
    voxels: :func:`~patchmorph_core.displacement.exp_velocity_inside` itself.

    Args:
        values: ``(3, Z', Y', X')`` velocity on the nodes ``grid.every(step, first)`` (world units, components
            ``(z, y, x)``); with ``first`` from :func:`~patchmorph_core.spatial.lattice_start`, the nodes of the larger grid ``grid`` is a
            box of, so every box integrates the same nodes (only those around ``inner``).
        grid: the field grid's box; ``inner``: the box of it whose values are returned; ``step``: the lattice's
            step in voxels; ``first``: ``grid``'s index of its first node along each axis.

    Returns:
        ``(3, *inner shape)`` float32 displacement (world units).
    """
    nodes = grid.every(step, first)
    lo = [max((s.start - a) // step, 0) for s, a in zip(inner, first, strict=True)]
    hi = [min(-(-(s.stop - 1 - a) // step) + 1, n) for s, a, n in zip(inner, first, nodes.shape, strict=True)]
    around = exp_velocity_inside(values, nodes, SQUARINGS, tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)))
    if step == 1:
        return around
    target = grid.crop([s.start for s in inner], [s.stop for s in inner])
    return sample_separable(around, nodes.crop(lo, hi).index_map(target), target.shape, "border")


def polish_result(
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    ranges: tuple[tuple[float, float], tuple[float, float]],
    field: np.ndarray,
    grid: Grid,
    settings: PolishSettings,
    device: torch.device | str = "cpu",
) -> PolishResult:
    """The polish of one box of the field grid (see the module doc), on ``device``: :func:`polish_on_grid` on
    ``grid``, or with ``settings.coarsening`` f > 1 on ``grid`` resampled to f times its spacing (same centre;
    ``u₀`` sampled trilinearly onto it, i.e. averaged over 2³ field voxels at f = 2).

    Args: as :func:`polish_on_grid` (``field``: ``(3, Z, Y, X)`` world displacement on ``grid``, components
    ``(z, y, x)`` in ``grid.unit``). Returns: the :class:`PolishResult` on the grid the steps ran on; ``|v|``
    is at most :attr:`PolishSettings.max_velocity` field voxels.
    """
    if settings.iterations == 0:
        return PolishResult(grid, *polish_on_grid(fixed, moving, ranges, field, grid, settings, device))
    if settings.coarsening > 1:
        field, grid = _coarser(field, grid, settings.coarsening)
    initial = None
    if settings.coarse_iterations > 0:
        coarse_field, coarse = _coarser(field, grid, COARSE_FACTOR)
        steps = settings.coarse_settings()
        velocity, _ = polish_on_grid(fixed, moving, ranges, coarse_field, coarse, steps, device, residual=False)
        initial = sample_separable(velocity, coarse.index_map(grid), grid.shape, "border")
    return PolishResult(grid, *polish_on_grid(fixed, moving, ranges, field, grid, settings, device, initial))


def _coarser(field: np.ndarray, grid: Grid, factor: int) -> tuple[np.ndarray, Grid]:
    """``grid`` resampled to ``factor`` times its spacing (same centre) and the ``(3, Z, Y, X)`` ``field`` on it
    (trilinear, edge values beyond the outer voxel centres)."""
    coarse = grid.resampled(grid.spacing * factor)
    return sample_separable(np.asarray(field, np.float32), grid.index_map(coarse), coarse.shape, "border"), coarse


def polish_on_grid(
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    ranges: tuple[tuple[float, float], tuple[float, float]],
    field: np.ndarray,
    grid: Grid,
    settings: PolishSettings,
    device: torch.device | str = "cpu",
    initial: np.ndarray | None = None,
    residual: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The polish's steps (see the module doc) on ``grid``, on ``device``, and the :func:`residual_map`
    after them (``settings.coarsening`` and ``settings.coarse_iterations`` are :func:`polish_result`'s).

    Args:
        fixed, moving: image pyramids (their units converted to ``grid.unit``); the fixed image is sampled on
            ``grid`` once (:func:`fixed_on_box`), the moving one through the field at every step.
        ranges: fixed and moving intensity ranges (:func:`scaled`).
        field: ``(3, Z, Y, X)`` the network's displacement ``u₀`` on ``grid`` (world units).
        grid: the box of the field grid (isotropic: the steps smooth and clamp in field voxels).
        settings: the polish settings.
        device: torch device of the steps (a GPU worker polishes on its GPU).
        initial: ``(3, Z, Y, X)`` velocity the steps start from (world units; None: zero).
        residual: compute the residual map (False: zeros, for steps whose velocity is all that is used).

    Returns:
        ``(3, Z, Y, X)`` float32 velocity ``v`` in world units, components ``(z, y, x)``; ``|v|`` is at most
        :attr:`PolishSettings.max_velocity` field voxels. ``(Z, Y, X)`` float32 :func:`residual_map` of the
        fixed image and the moving image through the polished field (zeros without steps, where the box
        reaches no moving data, or with ``residual`` False).
    """
    shape = tuple(grid.shape)
    velocity = np.zeros((3, *shape), np.float32) if initial is None else np.asarray(initial, np.float32)
    zeros = np.zeros(shape, np.float32)
    if settings.iterations == 0:
        return velocity, zeros
    fixed_range, moving_range = ranges
    level = moving.level_for_grid(grid)
    field = np.asarray(field, np.float32)
    world = grid.points().reshape(-1, 3) + np.moveaxis(field, 0, -1).reshape(-1, 3)
    # x + v + u₀(x + v) stays within |v| (1 + |∇u₀|) of x + u₀(x): twice the largest velocity is ample
    box = _moving_box(level, world, 2.0 * settings.max_velocity * float(grid.spacing.max()))
    if box is None:
        return velocity, zeros
    similarity = settings.make_similarity()
    t = {"device": device}
    volume = torch.tensor(scaled(box.array, moving_range), **t)[None, None]
    fixed_t = torch.tensor(fixed_on_box(fixed, grid, fixed_range), **t)[None, None]
    base, linear = _sampling_map(box.grid, grid, world.reshape(*shape, 3), field, device)
    v = torch.tensor(grid.index_steps(velocity), device=device)[None]  # field voxels

    def warp() -> torch.Tensor:  # the moving box through x + v + u₀(x + v), to first order in v
        coords = base.clone()
        for k in range(3):
            coords.addcmul_(linear[k], v[:, k, ..., None])
        return F.grid_sample(volume, coords, mode="bilinear", padding_mode="zeros", align_corners=ALIGN_CORNERS)

    force = similarity.force_towards(fixed_t)  # the fixed box's part of the force, once
    for _ in range(settings.iterations):
        update = settings.gain * gaussian(force(warp()), settings.sigma)
        norm = (update * update).sum(dim=1, keepdim=True).sqrt()  # linalg.vector_norm over dim 1: 20× slower
        update = update * torch.clamp(settings.max_step / (norm + 1e-12), max=1.0)
        v = gaussian(v + update, settings.correction_sigma)
    velocity = grid.world_vectors(v[0].cpu().numpy())
    if not residual:
        return velocity, zeros
    return velocity, residual_map(fixed_t, warp())[0, 0].cpu().numpy().astype(np.float32, copy=False)
