"""The polish: its filters against scipy, a known shift recovered on rotated anisotropic grids, the exactness
of a padded box, and the pipeline's pass schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from patchmorph_core.polish import (
    PolishSettings,
    box_mean,
    gauss_radius,
    gaussian,
    polish_correction,
)
from patchmorph_core.source import Level, MultiscaleImage
from patchmorph_core.spatial import Grid
from pipeline.polish import polish_passes

CENTRES = np.array([[-6.0, -5.0, 4.0], [5.0, 6.0, -3.0], [2.0, -7.0, -6.0], [-4.0, 5.0, 7.0], [0.0, 0.0, 0.0]])


def _blobs(world: np.ndarray) -> np.ndarray:
    """A smooth test image at ``(..., 3)`` world points (mm): Gaussian blobs of different sizes."""
    out = np.zeros(world.shape[:-1])
    for n, centre in enumerate(CENTRES):
        out += (1.0 + 0.3 * n) * np.exp(-np.sum((world - centre) ** 2, axis=-1) / (2.0 * (2.0 + 0.5 * n) ** 2))
    return out.astype(np.float32)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float], rot: np.ndarray) -> Grid:
    """A grid of ``shape`` centred on the world origin."""
    origin = -rot @ (np.diag(spacing) @ (np.array(shape) - 1) / 2.0)
    return Grid.from_spacing(shape, spacing, origin=tuple(origin), unit="millimeter", direction=rot)


@pytest.fixture(scope="module")
def shifted_pair() -> tuple[MultiscaleImage, MultiscaleImage, Grid, np.ndarray]:
    """Fixed on an anisotropic grid rotated about z, moving = the same blobs moved by ``shift`` (mm), on
    another anisotropic grid rotated about x; the field grid (anisotropic, rotated about y) differs from both."""
    shift = np.array([0.6, -0.5, 0.4])
    fixed_grid = _grid((30, 34, 26), (0.9, 0.8, 1.0), _rotation(0, 15.0))
    moving_grid = _grid((32, 30, 34), (0.85, 1.0, 0.8), _rotation(2, -10.0))
    fixed = MultiscaleImage((Level(_blobs(fixed_grid.points()), fixed_grid),), "fixed")
    # moving(y) = fixed(y - shift): the field (fixed -> moving) that aligns them is +shift everywhere
    moving = MultiscaleImage((Level(_blobs(moving_grid.points() - shift), moving_grid),), "moving")
    field_grid = _grid((24, 22, 26), (1.0, 1.1, 0.9), _rotation(1, 20.0))
    return fixed, moving, field_grid, shift


def test_box_mean_and_gaussian_equal_scipy_with_nearest_border() -> None:
    rng = np.random.default_rng(0)
    volume = rng.random((2, 13, 11, 9)).astype(np.float32)
    tensor = torch.as_tensor(volume)[None]
    for radius in (1, 2):
        expected = np.stack([ndimage.uniform_filter(v, 2 * radius + 1, mode="nearest") for v in volume])
        assert np.allclose(box_mean(tensor, radius)[0].numpy(), expected, atol=1e-6)
    for sigma in (0.5, 1.5):
        expected = np.stack(
            [ndimage.gaussian_filter(v, sigma, mode="nearest", radius=gauss_radius(sigma)) for v in volume]
        )
        assert np.allclose(gaussian(tensor, sigma)[0].numpy(), expected, atol=1e-6)


def test_polish_recovers_a_known_shift_in_world(shifted_pair: tuple) -> None:
    """From a zero field, the polish moves the field towards +shift (world, mm) where the image has
    structure: sign, axis order and the grids' rotations all show."""
    fixed, moving, grid, shift = shifted_pair
    settings = PolishSettings(iterations=10)
    correction = polish_correction(
        fixed, moving, ((0.0, 2.0), (0.0, 2.0)), np.zeros((3, *grid.shape), np.float32), None, grid, settings,
        settings.iterations,
    )  # fmt: skip
    structure = _blobs(grid.points()) > 0.3
    mean = correction[:, structure].mean(axis=1)
    assert np.dot(mean, shift) / (np.linalg.norm(mean) * np.linalg.norm(shift)) > 0.95
    assert np.linalg.norm(mean - shift) < 0.5 * np.linalg.norm(shift)  # more than halfway in 10 steps
    # and starting at the answer, it stays there
    start = np.broadcast_to(shift[:, None, None, None], (3, *grid.shape)).astype(np.float32)
    stay = polish_correction(
        fixed, moving, ((0.0, 2.0), (0.0, 2.0)), start, None, grid, settings, settings.iterations
    )
    assert np.abs(stay[:, structure]).mean() < 0.1 * np.abs(correction[:, structure]).mean()


def test_a_box_padded_by_steps_times_reach_polishes_its_inside_like_the_whole_grid(shifted_pair: tuple) -> None:
    fixed, moving, grid, _ = shifted_pair
    settings = PolishSettings(iterations=2, sigma=1.0, correction_sigma=0.5)
    assert settings.reach == 2 + 3 + 2  # CC window, update smoothing, correction smoothing radii
    pad = settings.iterations * settings.reach  # 14
    rng = np.random.default_rng(1)
    field = ndimage.gaussian_filter(rng.normal(size=(3, *grid.shape)), (0, 3, 3, 3)).astype(np.float32)

    def run(start: tuple[int, int, int], stop: tuple[int, int, int]) -> np.ndarray:
        box = grid.crop(start, stop)
        part = (slice(None), *(slice(a, b) for a, b in zip(start, stop, strict=True)))
        return polish_correction(
            fixed, moving, ((0.0, 2.0), (0.0, 2.0)), field[part], None, box, settings,
            settings.iterations,
        )  # fmt: skip

    whole = run((0, 0, 0), grid.shape)
    # a box of the (24, 22, 26) grid on its z = 0, y = 22 and both x sides, cut at z = 4 + pad and y = 2
    part = run((0, 2, 0), (4 + pad, 22, 26))
    scale = np.abs(whole).max()
    inside = part[:, :4, pad:, :]  # more than pad voxels from both cuts
    assert np.abs(inside - whole[:, :4, 2 + pad :, :]).max() < 1e-4 * scale
    near_cuts = np.abs(part - whole[:, : 4 + pad, 2:, :]).max()
    assert near_cuts > 1e-3 * scale  # the cuts do change the box's own margins


def test_pass_schedule_fits_the_budget_and_takes_every_step() -> None:
    settings = PolishSettings(iterations=10)  # reach 9
    assert polish_passes((80, 70, 64), (64, 64, 64), settings) == [(10, 2)]  # the whole field: one pass
    passes = polish_passes((600, 500, 400), (64, 64, 64), settings)
    assert sum(steps for steps, _ in passes) == 10
    for steps, tile in passes:
        assert min(tile * 64, 400) + 2 * steps * settings.reach <= 160 or (steps, tile) == (1, 1)
    assert polish_passes((600, 500, 400), (64, 64, 64), settings, max_voxels=50**3) == [(1, 1)] * 10
