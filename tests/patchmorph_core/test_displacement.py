"""Displacements: analytic transforms, lazy field sampling, composition and point-wise inversion."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from patchmorph_core.displacement import (
    AffineDisplacement,
    Displacement,
    FieldDisplacement,
    InverseDisplacement,
    TranslationDisplacement,
    displacement_on_grid,
    invert_points,
)
from patchmorph_core.spatial import Grid, random_rotation, sample_field


def _rotated_grid(shape=(7, 9, 11), spacing=(2.0, 1.0, 0.5)) -> Grid:
    rot = random_rotation(np.random.default_rng(3), 30.0)
    return Grid.from_spacing(shape, spacing, origin=(1.0, -2.0, 3.0), unit="millimeter", direction=rot)


def test_translation_and_affine_values() -> None:
    pts = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    assert np.allclose(TranslationDisplacement(np.array([1.0, -2.0, 0.5]))(pts), [[1, -2, 0.5]] * 2)
    matrix = np.eye(4)
    matrix[:3, :3] = [[2.0, 0, 0], [0, 1, 0], [0, 0, 1]]
    matrix[:3, 3] = [0.0, 1.0, 0.0]
    assert np.allclose(AffineDisplacement(matrix)(pts), [[0, 1, 0], [1, 1, 0]])
    assert isinstance(TranslationDisplacement(np.zeros(3)), Displacement)


def test_field_sampler_matches_sample_field_on_rotated_grid_and_zarr(tmp_path) -> None:
    grid = _rotated_grid()
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, *grid.shape)).astype(np.float32)
    low, high = grid.world_bounds()
    pts = rng.uniform(low - 3.0, high + 3.0, size=(500, 3))  # some outside: constant extension
    expected = sample_field(values, grid, pts)
    assert np.allclose(FieldDisplacement(values, grid)(pts), expected, atol=1e-5)
    store = zarr.open_array(
        tmp_path / "field.zarr", mode="w", shape=values.shape, chunks=(3, 4, 4, 4), dtype="f4"
    )
    store[:] = values
    assert np.allclose(FieldDisplacement(store, grid)(pts), expected, atol=1e-5)
    # on the voxel centres the sampler returns the stored values exactly
    assert np.allclose(
        displacement_on_grid(FieldDisplacement(values, grid), grid, block=100), values, atol=1e-5
    )


def test_field_sampler_extends_the_field_when_every_point_lies_outside() -> None:
    """A call whose points all lie beyond the field grid (a block of cells or a warp chunk past its edge) gets the
    edge voxels' displacement, as :func:`sample_field` gives it, not zero."""
    grid = _rotated_grid()
    values = np.random.default_rng(1).normal(size=(3, *grid.shape)).astype(np.float32)
    _, high = grid.world_bounds()
    pts = high + np.random.default_rng(2).uniform(5.0, 9.0, size=(20, 3))
    expected = sample_field(values, grid, pts)
    assert np.abs(expected).min() > 0
    assert np.allclose(FieldDisplacement(values, grid)(pts), expected, atol=1e-5)


def test_field_sampler_of_no_points_is_empty() -> None:
    """A call with no points (an empty block of cells) gives an empty ``(0, 3)`` array, not an error."""
    grid = _rotated_grid()
    values = np.ones((3, *grid.shape), dtype=np.float32)
    assert FieldDisplacement(values, grid)(np.zeros((0, 3))).shape == (0, 3)


@pytest.mark.parametrize("amplitude", [0.05, 0.3])
def test_invert_points_on_affine(amplitude: float) -> None:
    rng = np.random.default_rng(1)
    matrix = np.eye(4)
    matrix[:3, :3] += amplitude * rng.uniform(-1, 1, size=(3, 3))
    matrix[:3, 3] = rng.normal(size=3) * 5
    forward = AffineDisplacement(matrix)
    pts = rng.normal(size=(100, 3)) * 10
    v, residual = invert_points(forward, pts, iterations=60)
    exact = AffineDisplacement(np.linalg.inv(matrix))(pts)
    assert np.abs(v - exact).max() < 1e-6
    assert np.abs(residual).max() < 1e-6
    assert np.allclose(InverseDisplacement(forward, 60)(pts), exact, atol=1e-6)


def test_invert_points_converges_where_the_field_expands_more_than_twofold() -> None:
    """An expansion whose displacement gradient exceeds 1 along an oblique direction (det J 2.5, fold-free):
    the plain iteration v <- -u(y + v) diverges there; the damped one reaches the exact inverse."""
    rng = np.random.default_rng(5)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    matrix = np.eye(4)
    matrix[:3, :3] += 1.5 * np.outer(axis, axis)  # u(x) = 1.5 (a . x) a: stretch 2.5x along a
    forward = AffineDisplacement(matrix)
    pts = rng.normal(size=(200, 3)) * 10
    exact = AffineDisplacement(np.linalg.inv(matrix))(pts)
    v, residual = invert_points(forward, pts)
    assert np.abs(v - exact).max() < 1e-4 * np.abs(exact).max()
    assert np.linalg.norm(residual, axis=-1).max() < 1e-4 * np.abs(exact).max()
    plain = -forward(pts)
    for _ in range(30):
        plain = -forward(pts + plain)
    assert np.abs(plain - exact).max() > 1.0  # what the undamped step gives: far off


def test_invert_points_with_a_tolerance_stops_each_point_once_it_is_within_it() -> None:
    """With a tolerance every point's residual ends at most that (when the steps suffice), each point stops
    on its own (the mild part of the map after fewer steps than the strong part), far fewer evaluations are
    made, and the inverse is the full iteration's to about the tolerance; without one the result is the same
    as before, every point taking every step."""
    rng = np.random.default_rng(3)
    matrix = np.eye(4)
    matrix[:3, :3] += 0.3 * rng.uniform(-1, 1, size=(3, 3))
    strong = AffineDisplacement(matrix)
    pts = rng.normal(size=(400, 3)) * 10
    mild = pts[:, 0] < 0.0  # half the points see a map close to the identity

    class Counted:
        def __init__(self) -> None:
            self.points = 0

        def __call__(self, x: np.ndarray) -> np.ndarray:
            self.points += len(x)
            scale = 0.01 + 0.99 / (1.0 + np.exp(-x[:, :1]))  # the mild half: down to a hundredth of the map
            return scale * strong(x)

    full_count, tol_count = Counted(), Counted()
    full_v, full_r = invert_points(full_count, pts, iterations=40)
    v, residual = invert_points(tol_count, pts, iterations=40, tolerance=1e-3)
    norms = np.linalg.norm(residual, axis=-1)
    assert norms.max() <= 1e-3 and np.linalg.norm(full_r, axis=-1).max() < 1e-3
    assert np.abs(v - full_v).max() < 1e-2
    assert full_count.points == 41 * len(pts) and tol_count.points < 0.6 * full_count.points
    assert np.median(norms[mild]) < np.median(norms[~mild])  # the mild half stopped within its first steps
    again, _ = invert_points(full_count, pts, iterations=40, tolerance=0.0)
    assert np.array_equal(again, full_v)
