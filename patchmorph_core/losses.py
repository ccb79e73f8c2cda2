"""Similarity and the patch-wise coordinate-field regularizer (world units, the same at every scale).

* :func:`local_ncc_loss`: ``-mean`` of VoxelMorph's squared local NCC, window in patch voxels.
* :func:`mse_loss`: mean squared intensity difference.
* :func:`smoothness_loss`: mean squared Frobenius norm of ``∂u/∂x`` (world derivative of the world
  displacement, dimensionless, so a patch of 200 mm and one of 2 mm are penalised alike). With
  ``affine_free`` the patch-mean gradient is subtracted first, so a global affine costs nothing and
  the coarse stage can undo large rotations and scalings.
* :func:`fold_loss`: mean of ``relu(eps - det(I + ∂u/∂x))``: penalises non-positive (and nearly
  singular) Jacobian determinants of the coordinate field ``φ(x) = x + u(x)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchmorph_core.config import LossConfig
from patchmorph_core.transforms import jacobian_determinant, world_gradient


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a centred cube of ``window`` voxels, truncated at the border: ``(B, C, Z, Y, X)`` → same.

    Separable (one 1-D average per axis, 3·window instead of window³ operations per voxel); border
    windows average only the voxels inside. A window larger than an axis shrinks to the axis' largest
    odd size.
    """
    for axis in range(3):
        size = min(window, x.shape[2 + axis])
        size -= 1 - size % 2  # odd, so the window stays centred
        kernel = [1, 1, 1]
        kernel[axis] = size
        padding = [0, 0, 0]
        padding[axis] = size // 2
        x = F.avg_pool3d(x, tuple(kernel), stride=1, padding=tuple(padding), count_include_pad=False)
    return x


def local_ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """``-mean(cc)`` with ``cc = cov² / (var_f var_m + eps)`` over cubic windows of ``window`` voxels.

    Args:
        fixed: ``(B, 1, P, P, P)``.
        warped: ``(B, 1, P, P, P)`` moving patch warped by the current estimate.
        window: window edge in patch voxels (odd); windows are truncated at the patch border.

    Returns:
        Scalar in ``[-1, 0]`` (``-1`` = locally linearly related everywhere).
    """
    f, m = fixed.float(), warped.float()
    stats = box_mean(torch.cat([f, m, f * f, m * m, f * m], dim=1), window)
    mu_f, mu_m, ff, mm, fm = stats.split(1, dim=1)
    cov = fm - mu_f * mu_m
    var_f = (ff - mu_f**2).clamp_min(0.0)
    var_m = (mm - mu_m**2).clamp_min(0.0)
    return -(cov * cov / (var_f * var_m + eps)).mean()


def mse_loss(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two ``(B, 1, P, P, P)`` patches."""
    return (fixed.float() - warped.float()).square().mean()


def smoothness_loss(disp_world: torch.Tensor, linear: torch.Tensor, affine_free: bool = True) -> torch.Tensor:
    """Mean squared ``‖∂u/∂x‖_F²`` of a world displacement on a patch (dimensionless).

    Args:
        disp_world: ``(B, 3, P, P, P)`` world displacement at the patch voxels.
        linear: ``(B, 3, 3)`` patch index→world linear part.
        affine_free: subtract each patch's mean gradient (its best affine) before squaring.
    """
    grad = world_gradient(disp_world.float(), linear.float())  # (B, 3, 3, P, P, P)
    if affine_free:
        grad = grad - grad.mean(dim=(3, 4, 5), keepdim=True)
    return grad.square().sum(dim=(1, 2)).mean()


def fold_loss(disp_world: torch.Tensor, linear: torch.Tensor, eps: float = 0.05) -> torch.Tensor:
    """Mean of ``relu(eps - det J)`` with ``J = I + ∂u/∂x`` on a patch (0 for fold-free fields)."""
    det = jacobian_determinant(disp_world.float(), linear.float())
    return F.relu(eps - det).mean()


def stage_loss(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    disp_world: torch.Tensor,
    linear: torch.Tensor,
    config: LossConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one cascade stage: similarity + smoothness + fold penalty.

    Args:
        fixed: ``(B, 1, P, P, P)`` fixed patch.
        warped: ``(B, 1, P, P, P)`` moving image sampled at ``x + u(x)``.
        disp_world: ``(B, 3, P, P, P)`` total world displacement ``u`` on the patch.
        linear: ``(B, 3, 3)`` patch index→world linear part.
        config: weights and options.

    Returns:
        The scalar loss and its parts as floats (``sim``, ``smooth``, ``fold``).
    """
    if config.similarity == "ncc":
        sim = local_ncc_loss(fixed, warped, config.ncc_window)
    else:
        sim = mse_loss(fixed, warped)
    smooth = smoothness_loss(disp_world, linear, config.affine_free_smoothness)
    fold = fold_loss(disp_world, linear, config.fold_eps)
    total = sim + config.smooth_weight * smooth + config.fold_weight * fold
    parts = {"sim": float(sim.detach()), "smooth": float(smooth.detach()), "fold": float(fold.detach())}
    return total, parts
