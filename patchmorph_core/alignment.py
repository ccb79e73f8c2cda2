"""Initial global alignment: an affine map fitted to coarse copies of the two images.

Two brains in their native scanner or microscope spaces differ by a translation of centimetres, rotations of
tens of degrees and a few percent of scaling. The cascade's coarsest stage sees the whole brain in one patch
of ``P³`` voxels and was trained on residual poses of up to about 20°; the better it starts, the more of its
capacity goes into the anatomy. So registration starts from an affine fitted here (choice; the paper is silent
on the initialisation):

* start: the centres of tissue mass matched (:func:`patchmorph_core.sampling.initial_translation`);
* model: ``φ(x) = c_m + (I + B)(x − c_f) + E·t`` with ``c_f``, ``c_m`` the tissue centres, ``E`` the fixed
  tissue extent (so ``B`` and ``t`` are unit-free and one learning rate serves millimetres and micrometres);
* objective: between the fixed image on a grid over its tissue box and the moving image sampled at
  ``φ(x)``, both normalised to 0..1, at the spacings ``E / n`` for ``n`` in :data:`LEVELS` (coarse to
  fine), Adam, :data:`STEPS` steps per level: minus the mean squared difference of the two images' MIND-SSC
  descriptors on the fit grid (:func:`patchmorph_core.similarity.mind_ssc`, neighbours at 1 fit voxel), which
  does not assume the two contrasts are related, unlike the global NCC (Pearson) it replaced, which takes
  whatever intensity mapping correlates best (the comparison: ``docs/decisions.md``). Levels and steps:
  ``E/20, E/32`` with 60 + 30 steps by default; a third level ``E/48`` with 30 steps (the atlas job's
  default, :data:`FINE_LEVELS`) makes the fit depend far less on how the brain lies in its grid, at a cost
  in time that ``docs/decisions.md`` measures;
* only the pyramid level matching each spacing is read (a few hundred thousand voxels at most), so the cost
  does not grow with the image size;
* safeguard: if the fitted affine does not improve the objective over the start, or its determinant leaves
  ``[1/2, 2]``, the centre-of-mass translation is kept (and the record says so). The record also gives the
  global NCC of the start and of the fit (a familiar figure; across contrasts it can fall while the fit improves).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from patchmorph_core.sampling import intensity_range, normalize, tissue_bounds, tissue_center
from patchmorph_core.similarity import mind_ssc
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid, read_box, sample_torch

log = logging.getLogger(__name__)

LEVELS: tuple[int, ...] = (20, 32)
"""Grid spacings of the fit, as fractions ``E / n`` of the fixed tissue extent ``E`` (coarse to fine)."""

STEPS: tuple[int, ...] = (60, 30)
"""Adam steps at each level of :data:`LEVELS`."""

FINE_LEVELS: tuple[tuple[int, ...], tuple[int, ...]] = ((20, 32, 48), (60, 30, 30))
"""Levels and steps of the fit with a third, finer level (the atlas job's default)."""

LEARNING_RATE = 0.01
"""Adam step size for the unit-free parameters ``B`` and ``t``."""

MARGIN = 0.1
"""The fit grid covers the fixed tissue box grown by this fraction of ``E`` on every side."""


@dataclass(frozen=True)
class AffineFit:
    """An initial alignment.

    Attributes:
        matrix: ``(4, 4)`` world→world map, fixed world point → moving world point (``(z, y, x)``, the fixed
            image's unit).
        ncc_start, ncc_fitted: global NCC (−1..1, higher is better) at the finest fit level for the
            centre-of-mass start and for the fitted affine.
        accepted: False when the safeguard kept the start (then ``matrix`` is the start's translation).
        seconds: wall time of the fit.
    """

    matrix: np.ndarray
    ncc_start: float
    ncc_fitted: float
    accepted: bool
    seconds: float


def translation_matrix(offset: np.ndarray) -> np.ndarray:
    """``(4, 4)`` world→world map ``x ↦ x + offset``."""
    matrix = np.eye(4)
    matrix[:3, 3] = np.asarray(offset, dtype=np.float64)
    return matrix


def _fit_grid(fixed: MultiscaleImage, spacing: float) -> Grid:
    """Axis-aligned grid of ``spacing`` over the fixed tissue box grown by :data:`MARGIN` (world frame)."""
    low, high = tissue_bounds(fixed)
    extent = float(np.max(high - low))
    low, high = low - MARGIN * extent, high + MARGIN * extent
    shape = tuple(int(n) for n in np.maximum(np.ceil((high - low) / spacing), 4))
    affine = np.eye(4)
    affine[:3, :3] *= spacing
    affine[:3, 3] = low + spacing / 2.0
    return Grid(shape, affine, fixed.unit)


def _level_tensor(image: MultiscaleImage, spacing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The level matching ``spacing`` normalised to 0..1 as ``(1, 1, Z, Y, X)`` and its world→index matrix."""
    level = image.level_for_spacing(spacing)
    values = read_box(level.array, tuple(slice(0, n) for n in level.grid.shape))
    lo, hi = intensity_range(image)
    volume = torch.from_numpy(normalize(values, lo, hi))[None, None]
    return volume, torch.as_tensor(level.grid.inverse_affine, dtype=torch.float32)


def global_ncc(fixed: torch.Tensor, warped: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of two equally shaped tensors (scalar in ``[-1, 1]``)."""
    f = fixed - fixed.mean()
    m = warped - warped.mean()
    return (f * m).sum() / torch.sqrt((f * f).sum() * (m * m).sum() + eps)


def warp_points(
    points: torch.Tensor, centre_f: torch.Tensor, centre_m: torch.Tensor, extent: float,
    linear: torch.Tensor, shift: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """``c_m + (I + B)(x − c_f) + E·t`` for ``(..., 3)`` world points ``x``."""
    eye = torch.eye(3, dtype=points.dtype)
    return centre_m + (points - centre_f) @ (eye + linear).T + extent * shift


@dataclass(frozen=True)
class FitLevel:
    """One level of the fit: fixed values ``target`` ``(1, 1, D, H, W)`` at world ``points``
    ``(1, D, H, W, 3)``, the moving level ``volume`` ``(1, 1, Z, Y, X)`` and its world→index matrix."""

    target: torch.Tensor
    points: torch.Tensor
    volume: torch.Tensor
    world_to_index: torch.Tensor
    descriptor: torch.Tensor

    @classmethod
    def build(cls, fixed: MultiscaleImage, moving: MultiscaleImage, spacing: float) -> FitLevel:
        grid = _fit_grid(fixed, spacing)
        f_lo, f_hi = intensity_range(fixed)
        target = torch.from_numpy(normalize(fixed.sample(grid.points(), spacing), f_lo, f_hi))[None, None]
        volume, world_to_index = _level_tensor(moving, spacing)
        points = torch.as_tensor(grid.points(), dtype=torch.float32)[None]
        return cls(target, points, volume, world_to_index, mind_ssc(target, radius=1, dilation=1))

    def ncc(self, world: torch.Tensor) -> torch.Tensor:
        """Global NCC (a scalar tensor in [-1, 1]) between the fixed values and the moving image sampled at
        ``world``: ``(1, D, H, W, 3)`` world points (z, y, x, in the images' unit), like ``points``."""
        return global_ncc(self.target, sample_torch(self.volume, self.world_to_index, world))

    def similarity(self, world: torch.Tensor) -> torch.Tensor:
        """The fit's objective: ``−mean`` squared difference of the MIND-SSC descriptors of the fixed values and
        of the moving image sampled at ``world`` (``(1, D, H, W, 3)`` world points, like ``points``); a scalar
        tensor ``≤ 0``, higher is better."""
        warped = sample_torch(self.volume, self.world_to_index, world)
        return -(self.descriptor - mind_ssc(warped, radius=1, dilation=1)).square().mean()


class Adam:
    """Adam (Kingma & Ba; the update of ``torch.optim.Adam`` with its defaults) for a few leaf tensors.

    Written out because creating any ``torch.optim`` optimizer imports ``torch._dynamo`` on first use, which
    took 2.2 s of a 3.4 s registration on the benchmark machine (paid once per process: every Dask worker,
    every CLI call); the fit has 12 parameters.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:  # fmt: skip
        self.params, self.lr, self.betas, self.eps, self.steps = params, lr, betas, eps, 0
        self.mean = [torch.zeros_like(p) for p in params]
        self.square = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        """One update from the parameters' ``.grad``; the gradients are then cleared."""
        self.steps += 1
        beta1, beta2 = self.betas
        correction1 = 1.0 - beta1**self.steps
        correction2_sqrt = (1.0 - beta2**self.steps) ** 0.5
        for param, mean, square in zip(self.params, self.mean, self.square, strict=True):
            grad = param.grad
            mean.lerp_(grad, 1.0 - beta1)
            square.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = (square.sqrt() / correction2_sqrt).add_(self.eps)
            param.addcdiv_(mean, denom, value=-self.lr / correction1)
            param.grad = None


def fit_affine(
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    levels: tuple[int, ...] = LEVELS,
    steps: tuple[int, ...] = STEPS,
) -> AffineFit:
    """Fit the initial affine (see the module docstring); ``moving`` must be in the fixed image's unit;
    ``levels`` and ``steps`` as :data:`LEVELS` and :data:`STEPS`.

    Runs on one CPU thread: torch's parallel reductions round differently with other thread counts, and
    the same inputs must give the same start in every process (a resumed run, a worker, a test).

    Returns:
        :class:`AffineFit` whose ``matrix`` maps fixed world points to moving world points.
    """
    with one_torch_thread():
        return _fit_affine(fixed, moving, levels, steps)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block on one torch CPU thread (the thread count is restored after): the same inputs then give
    bit-identical results in every process, whatever its thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_affine(
    fixed: MultiscaleImage, moving: MultiscaleImage, levels: tuple[int, ...], level_steps: tuple[int, ...]
) -> AffineFit:
    """:func:`fit_affine` on the current thread settings."""
    tic = time.perf_counter()
    low, high = tissue_bounds(fixed)
    extent = float(np.max(high - low))
    centre_f = torch.as_tensor(tissue_center(fixed), dtype=torch.float32)
    centre_m = torch.as_tensor(tissue_center(moving), dtype=torch.float32)
    linear = torch.zeros(3, 3, requires_grad=True)
    shift = torch.zeros(3, requires_grad=True)
    optimizer = Adam([linear, shift], lr=LEARNING_RATE)
    for n, steps in zip(levels, level_steps, strict=True):
        level = FitLevel.build(fixed, moving, extent / n)
        for _ in range(steps):
            loss = -level.similarity(warp_points(level.points, centre_f, centre_m, extent, linear, shift))
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        start = warp_points(level.points, centre_f, centre_m, extent, torch.zeros(3, 3), torch.zeros(3))
        end = warp_points(level.points, centre_f, centre_m, extent, linear, shift)
        ncc_start, ncc_fitted = float(level.ncc(start)), float(level.ncc(end))
        improved = float(level.similarity(end)) > float(level.similarity(start))
    matrix_lin = np.eye(3) + linear.detach().double().numpy()
    c_f, c_m = centre_f.double().numpy(), centre_m.double().numpy()
    fitted = np.eye(4)
    fitted[:3, :3] = matrix_lin
    fitted[:3, 3] = c_m + extent * shift.detach().double().numpy() - matrix_lin @ c_f
    det = float(np.linalg.det(matrix_lin))
    accepted = improved and 0.5 <= det <= 2.0
    matrix = fitted if accepted else translation_matrix(c_m - c_f)
    seconds = time.perf_counter() - tic
    log.info(
        "initial affine: NCC %.4f -> %.4f, det %.3f, %s (%.1f s)",
        ncc_start, ncc_fitted, det, "accepted" if accepted else "rejected, centre of mass kept", seconds,
    )  # fmt: skip
    return AffineFit(matrix, ncc_start, ncc_fitted, accepted, seconds)
