"""Polish: greedy local-NCC steps on the finest field after the network (instance optimisation).

The network's field leaves a residual misalignment of about a voxel at fine structures. The polish takes a
few explicit gradient-ascent steps of local normalised cross-correlation on the finest field grid, the
greedy update of one level of ANTs SyN with the CC metric (Avants et al., MedIA 2008), without autograd:

    for each iteration (fixed F and warped moving W = M(x + u₀(x) + c(x)) on the field grid, each scaled by
    its intensity range, not clipped):
        local means over a (2r+1)³ window:  F̄, W̄, s_FW, s_FF, s_WW   (box filter, replicate border)
        force  f = 2 s_FW / (s_FF s_WW) · ((F − F̄) − s_FW / s_WW · (W − W̄)) · ∇W     (∇ in field voxels)
        update v = gain · G_σ * f, clamped to max_step field voxels per voxel
        c ← G_σc * (c + v)      (in world units; the correction is smoothed, the network's field u₀ is not)

and the output field is ``u₀ + c``. The force is ANTs' form of the gradient of the local CC (invariant to affine
intensity changes, so ``gain`` is unitless in field voxels); its gain, not a global maximum, sets the step, so every
voxel depends only on the voxels within :attr:`PolishSettings.reach` per iteration: a box of the grid padded
by ``iterations × reach`` polishes its inside as the whole grid does (to float rounding), which is how the chunked
pipeline runs it (:func:`pipeline.polish.polish_tile`); the in-memory registration is the one-box case.

Settings (chosen on validation pairs of training subjects 01-06, ``benchmarks/validate.py``; ``docs/method.md``): 10
iterations, window radius 2 (5³ voxels, as ANTs SyNCC's radius 2), update smoothing σ 1.5, correction
smoothing σ 0.5, gain 1.5, at most 0.25 field voxels per iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from patchmorph_core.config import InferenceConfig
from patchmorph_core.sampling import row_box, sample_affine
from patchmorph_core.source import Level, MultiscaleImage
from patchmorph_core.spatial import Grid, read_box, sample_torch

EPS = 1e-5
"""Added to the local (co)variances of normalised intensities (0..1) before dividing."""


def gauss_radius(sigma: float) -> int:
    """Half-width in voxels of the truncated Gaussian kernel of ``sigma`` voxels (0 for no smoothing)."""
    return int(math.ceil(3.0 * sigma)) if sigma > 0 else 0


@dataclass(frozen=True)
class PolishSettings:
    """The polish's settings, in field voxels (see the module doc).

    Attributes:
        iterations: gradient steps (0: no polish).
        gain: update per unit of CC force (field voxels).
        max_step: largest update of one voxel in one iteration (field voxels).
        radius: half-width of the local CC window (field voxels).
        sigma: Gaussian smoothing of each update (field voxels).
        correction_sigma: Gaussian smoothing of the accumulated correction each iteration (field voxels).
    """

    iterations: int
    gain: float = 1.5
    max_step: float = 0.25
    radius: int = 2
    sigma: float = 1.5
    correction_sigma: float = 0.5

    @classmethod
    def from_config(cls, config: InferenceConfig) -> PolishSettings:
        """The settings of an :class:`InferenceConfig` (``polish_*`` fields)."""
        return cls(
            iterations=config.polish_iterations,
            gain=config.polish_gain,
            max_step=config.polish_max_step,
            radius=config.polish_radius,
            sigma=config.polish_sigma,
            correction_sigma=config.polish_correction_sigma,
        )

    @property
    def reach(self) -> int:
        """Field voxels one iteration's output at a voxel depends on, in each direction."""
        return max(self.radius, 1) + gauss_radius(self.sigma) + gauss_radius(self.correction_sigma)


def separable(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter ``(1, C, Z, Y, X)`` by the 1-D ``kernel`` (odd length) along z, y and x; replicate border.

    The volume is padded once (replicate padding commutes with filtering along the other axes), then each
    axis is one grouped valid convolution.
    """
    radius = (kernel.numel() - 1) // 2
    if radius == 0:
        return x * kernel[0]
    channels = x.shape[1]
    x = F.pad(x, [radius] * 6, mode="replicate")
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = kernel.numel()
        weight = kernel.view(shape).expand(channels, 1, *shape).contiguous()
        x = F.conv3d(x, weight, groups=channels)
    return x


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a ``(2 radius + 1)³`` window of ``(1, C, Z, Y, X)``, replicate border."""
    size = 2 * radius + 1
    return separable(x, torch.full((size,), 1.0 / size, dtype=x.dtype, device=x.device))


def gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing (``sigma`` voxels, truncated at 3σ, replicate border) of ``(1, C, Z, Y, X)``."""
    radius = gauss_radius(sigma)
    if radius == 0:
        return x
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(taps**2) / (2.0 * sigma * sigma))
    return separable(x, kernel / kernel.sum())


def cc_force(fixed: torch.Tensor, warped: torch.Tensor, radius: int, fixed_stats: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Gradient of the local CC with respect to the displacement, in field voxels.

    Args:
        fixed, warped: ``(1, 1, Z, Y, X)`` normalised intensities on the field grid.
        radius: window half-width (voxels).
        fixed_stats: ``(F̄, s_FF)`` of ``fixed`` (:func:`fixed_statistics`).

    Returns:
        ``(1, 3, Z, Y, X)`` force per index axis ``(z, y, x)``.
    """
    f_mean, s_ff = fixed_stats
    stats = box_mean(torch.cat([warped, warped * warped, fixed * warped], dim=1), radius)
    w_mean = stats[:, 0:1]
    s_ww = stats[:, 1:2] - w_mean * w_mean
    s_fw = stats[:, 2:3] - f_mean * w_mean
    coef = 2.0 * s_fw / (s_ff * s_ww + EPS) * ((fixed - f_mean) - s_fw / (s_ww + EPS) * (warped - w_mean))
    gradient = torch.stack(torch.gradient(warped[0, 0]), dim=0)[None]
    return coef * gradient


def fixed_statistics(fixed: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean ``F̄`` and variance ``s_FF`` of ``(1, 1, Z, Y, X)`` over the CC window."""
    stats = box_mean(torch.cat([fixed, fixed * fixed], dim=1), radius)
    mean = stats[:, 0:1]
    return mean, stats[:, 1:2] - mean * mean


def scaled(values: np.ndarray, intensity_range: tuple[float, float]) -> np.ndarray:
    """``(values − lo) / (hi − lo)`` as float32, NaN → 0, not clipped (clipping bright tissue flattens its
    edges: validation Dice 0.710 clipped vs 0.713)."""
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


def polish_correction(
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    ranges: tuple[tuple[float, float], tuple[float, float]],
    field: np.ndarray,
    correction: np.ndarray | None,
    grid: Grid,
    settings: PolishSettings,
    iterations: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Run ``iterations`` polish steps on one box of the field grid, on ``device`` (a GPU worker's polish
    runs on its GPU; the same code on CPU).

    Args:
        fixed, moving: image pyramids (their units converted to ``grid.unit``); the fixed image is sampled on
            ``grid`` once (:func:`fixed_on_box`), the moving one through the field at every step.
        ranges: fixed and moving intensity ranges (:func:`scaled`).
        field: ``(3, Z, Y, X)`` the network's displacement ``u₀`` on ``grid`` (``grid.unit``).
        correction: ``(3, Z, Y, X)`` the correction so far (None: zero).
        grid: the box of the field grid (world frame of ``field``).
        settings: the polish settings.
        iterations: steps to take now (a chunked pass takes some of ``settings.iterations``).
        device: torch device of the steps.

    Returns:
        ``(3, Z, Y, X)`` float32 correction ``c`` (world units): the polished field is ``field + c``.
        The same as on the whole grid, to float rounding, at more than ``iterations × settings.reach``
        voxels from each side of the box that is not a side of the whole grid.
    """
    shape = tuple(grid.shape)
    c = np.zeros((3, *shape), np.float32) if correction is None else np.asarray(correction, np.float32)
    if iterations == 0:
        return c
    fixed_range, moving_range = ranges
    level = moving.level_for_grid(grid)
    base = grid.points().reshape(-1, 3) + np.moveaxis(np.asarray(field, np.float32), 0, -1).reshape(-1, 3)
    margin = float(np.abs(c).max(initial=0.0)) + iterations * settings.max_step * float(grid.spacing.max())
    box = _moving_box(level, base, margin * math.sqrt(3.0))
    if box is None:
        return c
    volume = torch.tensor(scaled(box.array, moving_range), device=device)[None, None]
    to_index = torch.tensor(box.grid.inverse_affine, dtype=torch.float64, device=device)
    base_t = torch.tensor(base.reshape(1, *shape, 3), dtype=torch.float64, device=device)
    linear = torch.tensor(grid.linear, dtype=torch.float32, device=device)  # index → world, (3, 3)
    fixed_t = torch.tensor(fixed_on_box(fixed, grid, fixed_range), device=device)[None, None]
    stats = fixed_statistics(fixed_t, settings.radius)
    c_t = torch.tensor(c, device=device)[None]
    for _ in range(iterations):
        points = base_t + c_t[0].permute(1, 2, 3, 0)[None].to(torch.float64)
        warped = sample_torch(volume, to_index, points)
        force = cc_force(fixed_t, warped, settings.radius, stats)
        update = settings.gain * gaussian(force, settings.sigma)
        norm = (update * update).sum(dim=1, keepdim=True).sqrt()  # linalg.vector_norm over dim 1: 20× slower
        update = update * torch.clamp(settings.max_step / (norm + 1e-12), max=1.0)
        c_t = gaussian(c_t + torch.einsum("ij,bjzyx->bizyx", linear, update), settings.correction_sigma)
    return c_t[0].cpu().numpy().astype(np.float32, copy=False)
