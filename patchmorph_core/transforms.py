"""Displacements on a patch: affine and dense parts, their composition, scaling and squaring, world units.

Conventions (see :mod:`patchmorph_core.spatial`): a patch holds ``P³`` voxels; a *patch-voxel*
displacement ``d`` is ``(B, 3, P, P, P)`` with component ``k`` along patch axis ``k`` (index order
``z, y, x``) in voxels; the matching world displacement is ``u = L d`` where ``L`` is the patch grid's
``(3, 3)`` index→world linear part (rotation × spacing). Point ``q`` of the patch (continuous index)
is mapped to ``q + d(q)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from patchmorph_core.spatial import ALIGN_CORNERS, displaced_positions, index_to_normalized


def index_points(shape: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(Z, Y, X, 3)`` float32 voxel indices ``(z, y, x)`` of every voxel of a grid of ``shape``."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def warp_patch(image: torch.Tensor, disp_vox: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``image`` at ``q + d(q)`` for every voxel ``q`` (differentiable in both).

    Args:
        image: ``(B, C, P, P, P)`` values on the patch grid.
        disp_vox: ``(B, 3, P, P, P)`` displacement in patch voxels, components ``(z, y, x)``.
        padding_mode: ``grid_sample`` padding outside the patch (``"zeros"``, ``"border"``).

    Returns:
        ``(B, C, P, P, P)`` warped image.
    """
    shape = tuple(disp_vox.shape[-3:])
    index = index_points(shape, disp_vox.device).to(disp_vox.dtype) + disp_vox.permute(0, 2, 3, 4, 1)
    coords = index_to_normalized(index, shape)
    return F.grid_sample(
        image, coords.to(image.dtype), mode="bilinear", padding_mode=padding_mode, align_corners=ALIGN_CORNERS
    )


def affine_displacement(theta: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Dense patch-voxel displacement of an affine ``d(q) = A (q - c) + t``, ``c = (shape - 1) / 2``.

    Args:
        theta: ``(B, 3, 4)`` ``[A | t]`` in patch-voxel units.
        shape: patch shape ``(P, P, P)``.

    Returns:
        ``(B, 3, P, P, P)``.
    """
    index = index_points(shape, theta.device).to(theta.dtype)
    centre = (torch.tensor(shape, dtype=theta.dtype, device=theta.device) - 1.0) / 2.0
    q = (index - centre).reshape(-1, 3)  # (N, 3)
    disp = torch.einsum("bij,nj->bin", theta[:, :, :3], q) + theta[:, :, 3:]
    return disp.reshape(theta.shape[0], 3, *shape)


def compose_affine_dense(theta: torch.Tensor, dense_vox: torch.Tensor) -> torch.Tensor:
    """Displacement of "dense, then affine": ``u(q) = a(q + d(q)) + d(q) = a(q) + (I + A) d(q)``.

    This is the total displacement when the dense part ``d`` was predicted on the moving patch already
    warped by the affine ``a`` (exact, since ``a`` is affine; no resampling).

    Args:
        theta: ``(B, 3, 4)`` affine ``[A | t]`` in patch voxels.
        dense_vox: ``(B, 3, P, P, P)`` dense displacement in patch voxels.
    """
    affine = affine_displacement(theta, tuple(dense_vox.shape[-3:]))
    return affine + dense_vox + torch.einsum("bij,bjzyx->bizyx", theta[:, :, :3], dense_vox)


def integrate_velocity(
    velocity_vox: torch.Tensor, steps: int, boxes: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None
) -> torch.Tensor:
    """Scaling and squaring: displacement of the flow of a stationary velocity field after unit time.

    ``u_0 = v / 2**steps``; ``u_{k+1}(q) = u_k(q) + u_k(q + u_k(q))`` (trilinear, border padding outside the
    grid), in voxels (:func:`~patchmorph_core.spatial.displaced_positions` turns each ``q + u_k(q)`` into
    ``grid_sample`` coordinates).

    Args:
        velocity_vox: ``(B, 3, Z, Y, X)`` velocity in voxels, components along the index axes ``(z, y, x)``.
        steps: number of squarings (0 returns the velocity unchanged).
        boxes: the box each squaring computes, first to last, as ``(start, stop)`` indices ``(z, y, x)`` in the
            velocity's grid, each inside the one before (None: the whole grid every time). A squaring reads its
            input only as far around a voxel as the displacement reaches, so a caller that needs the flow on a
            small box lets the box shrink as the squarings go
            (:func:`~patchmorph_core.displacement.exp_velocity_inside`).

    Returns:
        ``(B, 3, ...)`` displacement in voxels on the last box (on the whole grid without ``boxes``).
    """
    if steps == 0:
        return velocity_vox
    disp = velocity_vox / 2.0**steps
    origin: Sequence[int] = (0, 0, 0)
    for k in range(steps):
        part, offset = disp, (0, 0, 0)
        if boxes is not None:  # the box of this squaring, within the last one (whose voxel 0 is at ``origin``)
            start, stop = boxes[k]
            offset = tuple(a - o for a, o in zip(start, origin, strict=True))
            part = disp[(..., *(slice(f, f + b - a) for f, a, b in zip(offset, start, stop, strict=True)))]
            origin = start
        coords = displaced_positions(part, offset, disp.shape[-3:])
        disp = part + F.grid_sample(disp, coords, mode="bilinear", padding_mode="border", align_corners=ALIGN_CORNERS)
    return disp


def voxel_to_world(disp_vox: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """World displacement ``u = L d`` of a patch-voxel displacement.

    Args:
        disp_vox: ``(B, 3, P, P, P)`` displacement in patch voxels (components along patch axes).
        linear: ``(B, 3, 3)`` patch index→world linear part (columns: world step per index step).

    Returns:
        ``(B, 3, P, P, P)`` displacement in world units, components ``(z, y, x)`` of the world frame.
    """
    return torch.einsum("bij,bjzyx->bizyx", linear.to(disp_vox.dtype), disp_vox)


def world_gradient(disp_world: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """Spatial gradient ``∂u_i/∂x_j`` of a world displacement on a patch (dimensionless).

    Forward differences along the patch axes give ``∂u/∂q`` on the ``(P-1)³`` cells (voxel ``q`` to
    ``q + 1`` along each axis); the chain rule ``∂u/∂x = ∂u/∂q L^{-1}`` turns them into world
    derivatives, so the result does not depend on the patch's spacing or rotation.

    Args:
        disp_world: ``(B, 3, P, P, P)`` world displacement.
        linear: ``(B, 3, 3)`` patch index→world linear part.

    Returns:
        ``(B, 3, 3, P-1, P-1, P-1)`` with ``[:, i, j]`` = ``∂u_i/∂x_j``.
    """
    base = disp_world[:, :, :-1, :-1, :-1]
    du_dq = torch.stack(
        [
            disp_world[:, :, 1:, :-1, :-1] - base,
            disp_world[:, :, :-1, 1:, :-1] - base,
            disp_world[:, :, :-1, :-1, 1:] - base,
        ],
        dim=2,
    )  # (B, 3[i], 3[k], ...)
    inv = torch.linalg.inv(linear.to(torch.float64)).to(disp_world.dtype)  # (B, 3[k], 3[j])
    return torch.einsum("bikzyx,bkj->bijzyx", du_dq, inv)


def jacobian_determinant(disp_world: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """``det(I + ∂u/∂x)`` of the map ``x → x + u(x)`` on a patch's cells: ``(B, P-1, P-1, P-1)``."""
    g = world_gradient(disp_world, linear)
    j = [[g[:, i, k] + (1.0 if i == k else 0.0) for k in range(3)] for i in range(3)]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )
