"""The polish: its smoothing against scipy, a known shift recovered on rotated anisotropic grids, and the
velocity's integration (a diffeomorphism whose inverse is exp(-v); a box grown by |v| + N is exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

import patchmorph_core.displacement as displacement_module
import patchmorph_core.similarity as similarity_module
from patchmorph_core.displacement import FieldDisplacement, exp_reach, exp_velocity, exp_velocity_inside
from patchmorph_core.metrics import jacobian_determinant
from patchmorph_core.polish import (
    SQUARINGS,
    PolishSettings,
    coarsening_for,
    exp_on_nodes,
    gauss_radius,
    gaussian,
    polish_result,
)
from patchmorph_core.sampling import displacement_after, sample_separable
from patchmorph_core.similarity import box_mean
from patchmorph_core.source import Level, MultiscaleImage
from patchmorph_core.spatial import Grid, lattice_start

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


def test_gaussian_equals_scipy_with_nearest_border() -> None:
    rng = np.random.default_rng(0)
    volume = rng.random((2, 13, 11, 9)).astype(np.float32)
    tensor = torch.as_tensor(volume)[None]
    for sigma in (0.5, 1.5):
        expected = np.stack(
            [ndimage.gaussian_filter(v, sigma, mode="nearest", radius=gauss_radius(sigma)) for v in volume]
        )
        assert np.allclose(gaussian(tensor, sigma)[0].numpy(), expected, atol=1e-6)


def test_slabs_give_the_whole_box_values_bit_for_bit(shifted_pair: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Gaussian, the local means and the polish's sampling map work through a box a few z-slices at a time
    (to stay in the cache); every voxel gets the same arithmetic as in one pass over the whole box: equal bit for
    bit, also when the slab does not divide the z-axis."""
    fixed, moving, grid, _ = shifted_pair
    volume = torch.as_tensor(np.random.default_rng(1).random((1, 3, 23, 17, 29)), dtype=torch.float32)
    settings = PolishSettings(iterations=3)
    field = np.random.default_rng(2).normal(0.0, 0.3, (3, *grid.shape)).astype(np.float32)
    ranges = ((0.0, 2.0), (0.0, 2.0))

    monkeypatch.setattr(similarity_module, "SLAB_FROM_BYTES", 0)
    monkeypatch.setattr(similarity_module, "SLAB", 10**6)  # one slab: the whole box
    whole = [gaussian(volume, sigma) for sigma in (0.5, 1.5, 3.0)] + [box_mean(volume, w) for w in (3, 5, 9)]
    polished = polish_result(fixed, moving, ranges, field, grid, settings)
    for size in (1, 4, 5):
        monkeypatch.setattr(similarity_module, "SLAB", size)
        again = [gaussian(volume, sigma) for sigma in (0.5, 1.5, 3.0)] + [box_mean(volume, w) for w in (3, 5, 9)]
        assert all(torch.equal(a, b) for a, b in zip(again, whole, strict=True))
        result = polish_result(fixed, moving, ranges, field, grid, settings)
        assert np.array_equal(result.velocity, polished.velocity) and np.array_equal(result.residual, polished.residual)


@pytest.mark.parametrize("similarity", ["ncc", "mind"])
def test_polish_recovers_a_known_shift_in_world(shifted_pair: tuple, similarity: str) -> None:
    """From a zero field, the polish's velocity points along +shift (world, mm) where the image has structure:
    sign, axis order and the grids' rotations all show; from the answer it barely moves. Either similarity
    drives it (its force is the similarity object's)."""
    fixed, moving, grid, shift = shifted_pair
    settings = PolishSettings(iterations=10, similarity=similarity)
    ranges = ((0.0, 2.0), (0.0, 2.0))
    velocity, _ = polish_result(fixed, moving, ranges, np.zeros((3, *grid.shape), np.float32), grid, settings).on(grid)
    structure = _blobs(grid.points()) > 0.3
    mean = velocity[:, structure].mean(axis=1)
    assert np.dot(mean, shift) / (np.linalg.norm(mean) * np.linalg.norm(shift)) > 0.95
    if similarity == "ncc":
        assert np.linalg.norm(mean - shift) < 0.5 * np.linalg.norm(shift)  # more than halfway in 10 steps
    steps = np.linalg.norm(np.linalg.inv(grid.linear) @ velocity.reshape(3, -1), axis=0)
    assert steps.max() <= settings.max_velocity + 1e-4  # |v| <= iterations x max_step field voxels
    start = np.broadcast_to(shift[:, None, None, None], (3, *grid.shape)).astype(np.float32)
    stay, _ = polish_result(fixed, moving, ranges, start, grid, settings).on(grid)
    assert np.abs(stay[:, structure]).mean() < 0.15 * np.abs(velocity[:, structure]).mean()


def test_coarse_polish_follows_the_shift_within_its_bound(shifted_pair: tuple) -> None:
    """On a grid twice as coarse (``coarsening`` 2) the velocity, sampled back onto the field box, still points
    along +shift inside the structure, is smooth enough to integrate without folding, and stays within
    ``iterations · max_step · coarsening`` field voxels; the default coarsening follows the data's voxel."""
    fixed, moving, grid, shift = shifted_pair
    settings = PolishSettings(iterations=10, coarsening=2)
    ranges = ((0.0, 2.0), (0.0, 2.0))
    velocity, residual = polish_result(fixed, moving, ranges, np.zeros((3, *grid.shape), np.float32), grid, settings).on(grid)
    assert velocity.shape == (3, *grid.shape) and residual.shape == grid.shape and residual.min() >= 0.0
    structure = _blobs(grid.points()) > 0.3
    mean = velocity[:, structure].mean(axis=1)
    assert np.dot(mean, shift) / (np.linalg.norm(mean) * np.linalg.norm(shift)) > 0.9
    steps = np.linalg.norm(np.linalg.inv(grid.linear) @ velocity.reshape(3, -1), axis=0)
    assert steps.max() <= settings.max_velocity + 1e-4 and settings.max_velocity == 5.0
    assert jacobian_determinant(exp_velocity(velocity, grid, 5), grid).min() > 0.0
    assert [coarsening_for(f, 100.0) for f in (100.0, 89.2, 44.6, 30.0, 10.0)] == [1, 1, 2, 3, 4]


def test_coarse_steps_go_further_than_the_fine_steps_alone(shifted_pair: tuple) -> None:
    """Steps on a grid twice as coarse first (``coarse_iterations``) bring the velocity closer to the known shift
    (world, mm, on the rotated anisotropic grids) than the same fine steps alone, whose bound (``iterations ·
    max_step`` field voxels) stops them short of it; the bound grows by the coarse steps' reach and holds; the
    coarse steps' window spans about the same field voxels as the fine steps'."""
    fixed, moving, grid, shift = shifted_pair
    ranges = ((0.0, 2.0), (0.0, 2.0))
    zero = np.zeros((3, *grid.shape), np.float32)
    structure = _blobs(grid.points()) > 0.3
    errors = {}
    for coarse in (0, 3):
        settings = PolishSettings(iterations=3, coarse_iterations=coarse)
        velocity, _ = polish_result(fixed, moving, ranges, zero, grid, settings).on(grid)
        errors[coarse] = np.linalg.norm(velocity[:, structure].mean(axis=1) - shift)
        steps = np.linalg.norm(np.linalg.inv(grid.linear) @ velocity.reshape(3, -1), axis=0)
        assert steps.max() <= settings.max_velocity + 1e-4
    assert PolishSettings(iterations=3).max_velocity == 0.75 and settings.max_velocity == 2.25
    assert settings.exp_halo == exp_reach(2.25, SQUARINGS) > PolishSettings(iterations=3).exp_halo  # integrated further out
    # at coarsening 2 the reach of half the velocity on every 2nd voxel, beyond the nodes around a chunk
    assert PolishSettings(iterations=10, coarsening=2).exp_halo == 2 * exp_reach(2.5, SQUARINGS) + 1
    assert errors[3] < 0.5 * errors[0]
    assert settings.coarse_settings().radius == 1 and PolishSettings(1, radius=4).coarse_settings().radius == 2


@pytest.mark.parametrize("coarsening", [1, 2])
def test_a_result_restricted_to_a_part_gives_the_box_values_there(shifted_pair: tuple, coarsening: int) -> None:
    """What a chunk task takes from a tile (its part, from the result kept on the polish grid) equals the
    whole box's velocity and residual cropped to that part; the restricted result is small (views at f = 1)."""
    fixed, moving, grid, _ = shifted_pair
    settings = PolishSettings(iterations=4, coarsening=coarsening)
    ranges = ((0.0, 2.0), (0.0, 2.0))
    result = polish_result(fixed, moving, ranges, np.zeros((3, *grid.shape), np.float32), grid, settings)
    assert result.grid.shape == tuple(-(-n // coarsening) for n in grid.shape)
    velocity, residual = result.on(grid)
    for start, stop in (((0, 0, 0), (7, 9, 5)), ((5, 3, 11), (24, 17, 26)), ((23, 21, 25), (24, 22, 26))):
        part = grid.crop(start, stop)
        box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        piece = result.restricted(part)
        got_velocity, got_residual = piece.on(part)
        np.testing.assert_allclose(got_velocity, velocity[(slice(None), *box)], atol=1e-6)
        np.testing.assert_allclose(got_residual, residual[box], atol=1e-6)
        assert all(n <= -(-(b - a) // coarsening) + 2 for n, a, b in zip(piece.grid.shape, start, stop, strict=True))
        if coarsening == 1:
            assert np.shares_memory(piece.velocity, result.velocity)


def test_polish_residual_shows_where_the_images_disagree(shifted_pair: tuple) -> None:
    """The residual (the uncertainty map) after one small step: non-negative, and inside the structure far
    lower from the answer than from a field that leaves the known shift (about one voxel) uncorrected."""
    fixed, moving, grid, shift = shifted_pair
    settings = PolishSettings(iterations=1, max_step=0.05)
    ranges = ((0.0, 2.0), (0.0, 2.0))
    start = np.broadcast_to(shift[:, None, None, None], (3, *grid.shape)).astype(np.float32)
    _, off = polish_result(fixed, moving, ranges, np.zeros_like(start), grid, settings).on(grid)
    _, on = polish_result(fixed, moving, ranges, start, grid, settings).on(grid)
    structure = _blobs(grid.points()) > 0.3
    assert off.shape == grid.shape and off.min() >= 0.0 and on.min() >= 0.0
    assert on[structure].mean() < 0.5 * off[structure].mean()


def _squeeze(grid: Grid, strength: float) -> np.ndarray:
    """A smooth velocity pointing to the grid's centre (world units, ``-strength (x - c)`` there), fading
    with distance: as a displacement of ``strength`` > 1 it folds the centre."""
    points = grid.points() - grid.center
    envelope = np.exp(-np.sum(points**2, axis=-1) / (2.0 * 5.0**2))
    return (-np.moveaxis(points, -1, 0) * envelope * strength).astype(np.float32)


def test_exp_velocity_is_a_diffeomorphism_with_inverse_exp_minus_v() -> None:
    grid = _grid((26, 22, 24), (1.0, 1.1, 0.9), _rotation(1, 20.0))
    constant = np.broadcast_to(np.array([0.3, -0.2, 0.5], np.float32)[:, None, None, None], (3, *grid.shape))
    assert np.allclose(exp_velocity(np.ascontiguousarray(constant), grid, 5), constant, atol=1e-5)
    velocity = _squeeze(grid, 1.5)  # as a displacement it folds the centre; its flow shrinks it by e^-1.5
    assert jacobian_determinant(velocity, grid).min() < 0.0
    assert jacobian_determinant(exp_velocity(velocity, grid, 7), grid).min() > 0.0
    velocity = _squeeze(grid, 0.6)  # milder: exp(-v) after exp(v) is the identity, to interpolation error
    forward, backward = exp_velocity(velocity, grid, 7), exp_velocity(-velocity, grid, 7)
    residual = forward + displacement_after(FieldDisplacement(backward, grid), grid, forward)
    inner = (slice(None), *(slice(4, n - 4) for n in grid.shape))
    assert np.abs(residual[inner]).max() < 0.05 * np.abs(forward).max()


def test_exp_velocity_on_a_grown_box_equals_the_whole_grid() -> None:
    grid = _grid((26, 22, 24), (1.0, 1.0, 1.0), np.eye(3))
    velocity = _squeeze(grid, 0.5)
    squarings = 4
    halo = int(np.ceil(np.abs(velocity).max() * np.sqrt(3.0))) + squarings + 1
    whole = exp_velocity(velocity, grid, squarings)
    start, stop = (8, 3, 0), (16, 12, 24)  # a box of the grid, cut on four sides
    lo = [max(a - halo, 0) for a in start]
    hi = [min(b + halo, n) for b, n in zip(stop, grid.shape, strict=True)]
    part = exp_velocity(velocity[(slice(None), *(slice(a, b) for a, b in zip(lo, hi, strict=True)))], grid.crop(lo, hi), squarings)
    inner = (slice(None), *(slice(a - c, b - c) for a, b, c in zip(start, stop, lo, strict=True)))
    assert np.abs(part[inner] - whole[(slice(None), *(slice(a, b) for a, b in zip(start, stop, strict=True)))]).max() < 1e-5


def test_exp_velocity_inside_a_box_integrates_only_as_far_as_the_velocity_reaches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rotated, anisotropic, non-cubic grid, a velocity longer along one index axis than the others: the values
    on a box equal the whole grid's, integrated on the box grown by each axis's own reach only."""
    grid = _grid((40, 26, 34), (1.4, 1.0, 0.8), _rotation(0, 25.0))
    velocity = _squeeze(grid, 0.4)
    velocity[0] *= 4.0  # longer along world z, the first index axis here
    squarings = 5
    steps = np.abs(grid.index_steps(velocity)).reshape(3, -1).max(axis=1)
    reach = [exp_reach(float(n), squarings) for n in steps]
    assert reach[0] > reach[1]
    start, stop = (12, 8, 10), (24, 17, 22)  # grown by the reach, within the grid
    inner = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    calls: list[tuple[tuple[int, ...], list]] = []
    integrate = displacement_module.integrate_steps
    monkeypatch.setattr(
        displacement_module, "integrate_steps", lambda v, n, boxes=None: calls.append((v.shape[1:], boxes)) or integrate(v, n, boxes)
    )
    whole = exp_velocity(velocity, grid, squarings)
    calls.clear()
    part = exp_velocity_inside(velocity, grid, squarings, inner)
    np.testing.assert_allclose(part, whole[(slice(None), *inner)], atol=1e-5)
    [(shape, boxes)] = calls
    assert shape == tuple(b - a + 2 * r for a, b, r in zip(start, stop, reach, strict=True))
    assert all(n < m for n, m in zip(shape, grid.shape, strict=True))
    # each squaring computes a box inside the one before, the last one the box and one voxel around it
    outer = [([0, 0, 0], list(shape)), *boxes]
    for (lo, hi), (start_k, stop_k) in zip(outer, boxes, strict=False):
        assert all(a <= b for a, b in zip(lo, start_k, strict=True)) and all(b <= a for a, b in zip(hi, stop_k, strict=True))
    assert [b - a for a, b in zip(*boxes[-1], strict=True)] == [b - a + 2 for a, b in zip(start, stop, strict=True)]
    assert boxes[-1] != boxes[0]


def test_exp_on_nodes_is_the_same_in_every_box_and_close_to_the_fine_flow() -> None:
    """Rotated, anisotropic, non-cubic grid, a velocity trilinear from every 2nd voxel: integrated on the nodes
    of the larger grid's lattice, a box (its voxel 0 at an odd index) gives the whole grid's values to float
    rounding, and the flow is the fine grid's to a small fraction of its length."""
    grid = _grid((37, 30, 33), (1.4, 1.0, 0.8), _rotation(0, 25.0))
    nodes = grid.every(2)
    velocity = sample_separable(_squeeze(nodes, 0.4), nodes.index_map(grid), grid.shape, "border")
    whole = exp_on_nodes(velocity[:, ::2, ::2, ::2], grid, tuple(slice(0, n) for n in grid.shape), 2, (0, 0, 0))
    start, stop = (9, 5, 7), (26, 21, 24)  # a chunk ...
    lo, hi = (3, 0, 2), (34, 28, 30)  # ... in its reach box, whose voxel 0 is (3, 0, 2) of the grid
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    inner = tuple(slice(a - o, b - o) for a, b, o in zip(start, stop, lo, strict=True))
    first = lattice_start(lo, 2)
    assert first == (1, 0, 0)
    nodes = (slice(None), *(slice(a + f, b, 2) for a, b, f in zip(lo, hi, first, strict=True)))
    part = exp_on_nodes(velocity[nodes], grid.crop(lo, hi), inner, 2, first)
    np.testing.assert_allclose(part, whole[(slice(None), *box)], atol=1e-5)
    fine = exp_velocity(velocity, grid, SQUARINGS)
    assert np.abs(whole - fine).max() < 0.05 * np.abs(fine).max()
