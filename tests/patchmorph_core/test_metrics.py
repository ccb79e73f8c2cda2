"""Tests of patchmorph_core.metrics against hand-computed overlaps and closed-form fields."""

from __future__ import annotations

import numpy as np
import pytest

from patchmorph_core.errors import InputError
from patchmorph_core.metrics import (
    dice_per_label,
    folding_percent,
    jacobian_determinant,
    local_ncc,
    mean_dice,
    ncc,
)
from patchmorph_core.spatial import Grid


def _rotated_anisotropic_grid() -> Grid:
    c, s = np.cos(np.radians(50.0)), np.sin(np.radians(50.0))
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array(
        [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]
    )
    return Grid.from_spacing((6, 7, 9), (0.5, 1.25, 2.0), origin=(3.0, -2.0, 1.0), direction=rotation)


def _field_from_map(grid: Grid, phi) -> np.ndarray:
    """``(3, Z, Y, X)`` displacement ``phi(x) - x`` at the grid's world points."""
    points = grid.points()
    return np.moveaxis(phi(points) - points, -1, 0).astype(np.float32)


def test_dice_hand_computed() -> None:
    a = np.array([[0, 1, 1, 2], [0, 0, 3, 3]])
    b = np.array([[0, 1, 2, 2], [0, 0, 3, 3]])
    dice = dice_per_label(a, b)
    assert dice == pytest.approx({1: 2 / 3, 2: 2 / 3, 3: 1.0})
    chosen = dice_per_label(a, b, labels=[1, 7])
    assert chosen[1] == pytest.approx(2 / 3) and np.isnan(chosen[7])
    assert mean_dice(a, b, labels=[1, 2, 7]) == pytest.approx(2 / 3)
    assert dice_per_label(a.astype(np.float32), b)[3] == 1.0
    with pytest.raises(InputError):
        dice_per_label(a, b[:, :3])


def test_jacobian_of_affine_map_on_rotated_anisotropic_grid() -> None:
    grid = _rotated_anisotropic_grid()
    matrix = np.array([[1.5, 0.4, -0.2], [0.05, 0.7, 0.3], [0.3, -0.1, 1.2]])
    field = _field_from_map(grid, lambda x: x @ matrix.T + np.array([1.0, -3.0, 0.5]))
    det = jacobian_determinant(field, grid)
    assert det.shape == grid.shape
    np.testing.assert_allclose(det, np.linalg.det(matrix), rtol=1e-4)
    # Treating the same field as if it lived on an axis-aligned grid gives a different (wrong) answer.
    plain = Grid.from_spacing(grid.shape, grid.spacing)
    assert not np.allclose(jacobian_determinant(field, plain), np.linalg.det(matrix), rtol=1e-2)


def test_jacobian_detects_a_known_fold() -> None:
    grid = Grid.from_spacing((4, 5, 200), (1.0, 1.0, 0.1), unit="millimeter")
    amplitude, k = 0.5, 4.0  # phi_x = x + a sin(k x): det = 1 + a k cos(k x) < 0 where cos(k x) < -1/2

    def phi(x: np.ndarray) -> np.ndarray:
        out = x.copy()
        out[..., 2] += amplitude * np.sin(k * x[..., 2])
        return out

    field = _field_from_map(grid, phi)
    det = jacobian_determinant(field, grid)
    x = grid.points()[..., 2]
    inner = (slice(None), slice(None), slice(1, -1))
    h = 0.1  # central differences of a sine: the analytic derivative times sin(k h) / (k h)
    central = 1 + amplitude * k * np.cos(k * x) * np.sin(k * h) / (k * h)
    np.testing.assert_allclose(det[inner], central[inner], atol=1e-4)
    expected = 100.0 * np.mean(1 + amplitude * k * np.cos(k * x) <= 0)
    assert 10.0 < expected < 60.0
    assert folding_percent(field, grid) == pytest.approx(expected, abs=2.0)
    mask = np.zeros(grid.shape, dtype=bool)
    mask[..., :5] = True  # x in [0, 0.4]: cos(k x) > -1/2, no fold
    assert folding_percent(field, grid, mask) == 0.0
    with pytest.raises(InputError):
        folding_percent(field, grid, np.zeros(grid.shape, dtype=bool))
    with pytest.raises(InputError):
        jacobian_determinant(field[:, :2], grid)


def test_global_and_local_ncc() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 12, 14))
    assert ncc(a, 2 * a + 3) == pytest.approx(1.0)
    assert ncc(a, -a) == pytest.approx(-1.0)
    assert abs(ncc(a, rng.normal(size=a.shape))) < 0.1
    assert ncc(a, np.ones_like(a)) == 0.0
    mask = np.zeros(a.shape, dtype=bool)
    mask[2:5] = True
    b = a.copy()
    b[~mask] = rng.normal(size=int((~mask).sum()))
    assert ncc(a, b, mask) == pytest.approx(1.0)
    assert local_ncc(a, 3 * a - 1, window_vox=5) == pytest.approx(1.0, abs=1e-3)
    assert local_ncc(a, rng.normal(size=a.shape), window_vox=5) < 0.2
    padded = np.pad(a, 6)  # a flat background does not dilute the score
    assert local_ncc(padded, padded, window_vox=5) == pytest.approx(1.0, abs=1e-6)
    assert local_ncc(np.zeros_like(a), a) == 0.0
