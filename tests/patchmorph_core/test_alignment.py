"""The initial affine fit recovers a known rotation + scaling + translation across unlike grids."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from patchmorph_core.alignment import fit_affine
from patchmorph_core.sampling import initial_translation
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid, random_rotation

BLOBS = np.array([[4.0, -5.0, 2.0], [-6.0, 3.0, 5.0], [1.0, 7.0, -6.0], [-3.0, -2.0, -4.0]])
"""Asymmetric inner structures (mm): no rotation or flip maps the object onto itself."""


ONE_CONTRAST = (80.0, 40.0, 55.0, 70.0, 85.0)
"""Intensity of the ellipsoid and of each blob."""

OTHER_CONTRAST = (10.0, 5.0, 90.0, 10.0, 60.0)
"""Another contrast of the same object: no linear (nor monotone) map of :data:`ONE_CONTRAST`."""


def _object(points_mm: np.ndarray, contrast: tuple[float, ...] = ONE_CONTRAST) -> np.ndarray:
    """A brain-like object defined in world space: ellipsoid (mm semi-axes 12, 15, 10) with four blobs."""
    r = np.sqrt(((points_mm / np.array([12.0, 15.0, 10.0])) ** 2).sum(-1))
    value = np.clip(1.5 - 1.5 * r, 0.0, 1.0) * contrast[0]
    for k, centre in enumerate(BLOBS):
        value += contrast[1 + k] * np.exp(-(((points_mm - centre) / 2.5) ** 2).sum(-1))
    return value.astype(np.float32)


def _true_map() -> np.ndarray:
    """Fixed world (mm) → moving world (mm): 16° rotation, 6 % larger, shifted by (3, −4, 2) mm."""
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_rotvec(np.deg2rad(16.0) * np.array([0.6, 0.64, -0.48])).as_matrix() * 1.06
    matrix[:3, 3] = [3.0, -4.0, 2.0]
    return matrix


def _pair(moving_contrast: tuple[float, ...] = ONE_CONTRAST) -> tuple[MultiscaleImage, MultiscaleImage, np.ndarray]:
    # fixed: anisotropic, non-cubic, axis-aligned, millimetres
    fixed_grid = Grid.from_spacing((34, 40, 30), (1.1, 0.9, 1.2), origin=(-19, -18, -18), unit="millimeter")
    fixed = MultiscaleImage.from_array(_object(fixed_grid.points()), fixed_grid, n_levels=3)
    # moving: rotated anisotropic grid in micrometres; its content is the object moved by the true map
    true = _true_map()
    moving_grid = Grid.from_spacing(
        (44, 36, 40), (1000.0, 1300.0, 1100.0), unit="micrometer",
        direction=random_rotation(np.random.default_rng(11), 30.0),
    )  # fmt: skip
    moving_grid = moving_grid.translated(-moving_grid.center + 1000.0 * true[:3, 3])
    points_mm = moving_grid.with_unit("millimeter").points().reshape(-1, 3)
    inverse = np.linalg.inv(true)
    source = points_mm @ inverse[:3, :3].T + inverse[:3, 3]
    moving_values = _object(source, moving_contrast).reshape(moving_grid.shape)
    moving = MultiscaleImage.from_array(moving_values, moving_grid, n_levels=3)
    return fixed, moving.with_unit("millimeter"), true


def _map_error(matrix: np.ndarray, true: np.ndarray) -> float:
    """Largest distance (mm) between the two maps over the object's box."""
    corners = np.array(np.meshgrid(*[[-12.0, 12.0], [-15.0, 15.0], [-10.0, 10.0]], indexing="ij")).reshape(3, -1).T
    ours = corners @ matrix[:3, :3].T + matrix[:3, 3]
    truth = corners @ true[:3, :3].T + true[:3, 3]
    return float(np.linalg.norm(ours - truth, axis=1).max())


def test_fit_affine_recovers_a_known_affine_on_unlike_grids() -> None:
    fixed, moving, true = _pair()
    start = np.eye(4)
    start[:3, 3] = initial_translation(fixed, moving)
    fit = fit_affine(fixed, moving)
    assert fit.accepted and fit.ncc_fitted > fit.ncc_start
    assert _map_error(start, true) > 3.0  # the centre-of-mass start is off by several voxels
    assert _map_error(fit.matrix, true) < 1.0  # the fit is within about one fixed voxel everywhere


def test_fit_affine_keeps_the_start_when_nothing_improves() -> None:
    fixed, _, _ = _pair()
    fit = fit_affine(fixed, fixed)  # identical images: the start is already the optimum
    assert np.allclose(fit.matrix, np.eye(4), atol=0.02)


def test_fit_affine_recovers_a_known_affine_across_contrasts() -> None:
    fixed, moving, true = _pair(OTHER_CONTRAST)
    fit = fit_affine(fixed, moving)
    assert fit.accepted
    assert _map_error(fit.matrix, true) < 1.5  # within about one fixed voxel (the global NCC: 3.7 mm off)
