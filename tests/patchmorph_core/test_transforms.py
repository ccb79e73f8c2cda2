"""Patch displacement algebra against closed forms: affine fields, folds, scaling and squaring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchmorph_core.spatial import patch_grid, random_rotation
from patchmorph_core.transforms import (
    affine_displacement,
    compose_affine_dense,
    index_points,
    integrate_velocity,
    jacobian_determinant,
    voxel_to_world,
    warp_patch,
    world_gradient,
)

P = 12


def _rotated_anisotropic_linear() -> torch.Tensor:
    """``(1, 3, 3)`` index→world linear part of a rotated patch with spacings (2.0, 0.5, 1.25)."""
    rotation = random_rotation(np.random.default_rng(3), 60.0)
    grid = patch_grid((1.0, -2.0, 3.0), (2.0 * P, 0.5 * P, 1.25 * P), P, rotation, unit="millimeter")
    return torch.as_tensor(np.array(grid.linear), dtype=torch.float64)[None]


def _world_points(linear: torch.Tensor) -> torch.Tensor:
    """``(1, 3, P, P, P)`` world points ``L q`` of the patch voxels (origin at index 0)."""
    q = index_points((P, P, P)).to(torch.float64)
    return torch.einsum("ij,zyxj->izyx", linear[0], q)[None]


def test_affine_world_field_has_constant_gradient_and_determinant() -> None:
    linear = _rotated_anisotropic_linear()
    matrix = torch.tensor([[1.1, 0.2, 0.07], [-0.1, 0.9, 0.05], [0.06, 0.1, 1.2]], dtype=torch.float64)  # no zero cofactor
    x = _world_points(linear)
    disp = torch.einsum("ij,bjzyx->bizyx", matrix - torch.eye(3, dtype=torch.float64), x) + 4.0
    grad = world_gradient(disp, linear)
    expected = (matrix - torch.eye(3, dtype=torch.float64)).view(1, 3, 3, 1, 1, 1).expand_as(grad)
    torch.testing.assert_close(grad, expected)
    det = jacobian_determinant(disp, linear)
    assert det.shape == (1, P - 1, P - 1, P - 1)
    torch.testing.assert_close(det, torch.full_like(det, float(torch.linalg.det(matrix))))


def test_folded_field_has_negative_determinant() -> None:
    linear = _rotated_anisotropic_linear()
    x = _world_points(linear)
    # x -> x + u with u = -2 x_0 e_0 mirrors world component 0: det J = -1 everywhere
    disp = torch.zeros_like(x)
    disp[:, 0] = -2.0 * x[:, 0]
    det = jacobian_determinant(disp, linear)
    torch.testing.assert_close(det, torch.full_like(det, -1.0))


def test_affine_displacement_and_voxel_to_world() -> None:
    theta = torch.zeros(1, 3, 4)
    theta[0, :, 3] = torch.tensor([1.0, -2.0, 0.5])
    theta[0, 0, 1] = 0.1
    disp = affine_displacement(theta, (P, P, P))
    c = (P - 1) / 2.0
    # at voxel (0, P-1, 0): d = A (q - c) + t with q - c = (-c, c, -c)
    assert disp[0, 0, 0, P - 1, 0].item() == pytest.approx(1.0 + 0.1 * c)
    assert disp[0, 1, 0, P - 1, 0].item() == pytest.approx(-2.0)
    linear = torch.diag(torch.tensor([2.0, 3.0, 4.0]))[None]
    world = voxel_to_world(disp, linear)
    torch.testing.assert_close(world[0, 2], 4.0 * disp[0, 2])
    # a rotated, anisotropic patch: u = L d, column k of L the world step of patch axis k (not its transpose)
    rotated = _rotated_anisotropic_linear()
    world = voxel_to_world(disp.to(torch.float64), rotated)
    torch.testing.assert_close(world[0, :, 0, P - 1, 0], rotated[0] @ disp[0, :, 0, P - 1, 0].to(torch.float64))
    assert not torch.allclose(rotated[0], rotated[0].T)


def test_warp_patch_integer_shift_matches_roll() -> None:
    image = torch.rand(1, 1, P, P, P)
    disp = torch.zeros(1, 3, P, P, P)
    disp[:, 2] = 2.0  # sample two voxels further along x
    warped = warp_patch(image, disp)
    torch.testing.assert_close(warped[..., : P - 2], image[..., 2:])
    assert torch.all(warped[..., P - 2 :] == 0)


def test_compose_affine_dense_equals_resampling() -> None:
    gen = torch.Generator().manual_seed(0)
    theta = 0.05 * torch.randn(1, 3, 4, generator=gen)
    dense = 0.5 * torch.randn(1, 3, P, P, P, generator=gen)
    composed = compose_affine_dense(theta, dense)
    # a(q + d(q)) + d(q), with the affine evaluated exactly at the displaced points
    q = index_points((P, P, P)) + dense[0].permute(1, 2, 3, 0)
    centre = (P - 1) / 2.0
    affine_at = torch.einsum("ij,zyxj->izyx", theta[0, :, :3], q - centre) + theta[0, :, 3].view(3, 1, 1, 1)
    torch.testing.assert_close(composed[0], affine_at + dense[0], atol=1e-5, rtol=1e-5)


def test_scaling_and_squaring() -> None:
    velocity = torch.zeros(1, 3, P, P, P)
    velocity[:, 1] = 1.5
    torch.testing.assert_close(integrate_velocity(velocity, 6), velocity)  # a constant flow is a translation
    torch.testing.assert_close(integrate_velocity(velocity, 0), velocity)
    # linear velocity v(q) = B (q - c): the flow is expm(B) - I; compare away from the border
    b = torch.tensor([[0.0, 0.1, 0.0], [-0.1, 0.0, 0.0], [0.0, 0.0, 0.05]])
    q = index_points((P, P, P)) - (P - 1) / 2.0
    velocity = torch.einsum("ij,zyxj->izyx", b, q)[None]
    disp = integrate_velocity(velocity, 7)
    expected = torch.einsum("ij,zyxj->izyx", torch.linalg.matrix_exp(b) - torch.eye(3), q)[None]
    inner = (slice(None), slice(None), *[slice(3, P - 3)] * 3)
    torch.testing.assert_close(disp[inner], expected[inner], atol=2e-3, rtol=0)
