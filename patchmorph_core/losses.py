"""Similarity and the patch-wise coordinate-field regularizer (world units, the same at every scale).

* :func:`local_ncc_loss`: ``-mean`` of VoxelMorph's squared local NCC, window in patch voxels.
* :class:`~patchmorph_core.similarity.MindSSC` (``similarity: mind``): MIND-SSC descriptors, for pairs whose
  contrasts differ (see :mod:`patchmorph_core.similarity`).
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
from patchmorph_core.similarity import LocalNCC, MindSSC
from patchmorph_core.transforms import jacobian_determinant, world_gradient


def local_ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """``-mean(cc)`` with ``cc = cov² / (var_f var_w + eps)`` over cubic windows of ``window`` voxels
    (:class:`~patchmorph_core.similarity.LocalNCC` of radius ``window // 2``).

    Args:
        fixed: ``(B, 1, P, P, P)``.
        warped: ``(B, 1, P, P, P)`` moving patch warped by the current estimate.
        window: window edge in patch voxels (odd); windows are truncated at the patch border.

    Returns:
        Scalar in ``[-1, 0]`` (``-1`` = locally linearly related everywhere).
    """
    return LocalNCC(window // 2, eps).loss(fixed, warped)


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
    """Mean of ``relu(eps - det J)`` with ``J = I + ∂u/∂x`` on a patch (0 for fold-free fields).

    Args:
        disp_world: ``(B, 3, P, P, P)`` world displacement ``u`` (components z, y, x, in the patch's world unit)
            at the patch's voxels.
        linear: ``(B, 3, 3)`` the patch's index→world linear part (world unit per voxel), which turns the
            voxel differences of ``u`` into ``∂u/∂x``.
        eps: the smallest det J that costs nothing (dimensionless).

    Returns:
        The scalar penalty (dimensionless).
    """
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
    elif config.similarity == "mind":
        sim = MindSSC(config.mind_radius, config.mind_dilation).loss(fixed, warped)
    else:
        sim = mse_loss(fixed, warped)
    smooth = smoothness_loss(disp_world, linear, config.affine_free_smoothness)
    fold = fold_loss(disp_world, linear, config.fold_eps)
    total = config.similarity_weight * sim + config.smooth_weight * smooth + config.fold_weight * fold
    parts = {"sim": float(sim.detach()), "smooth": float(smooth.detach()), "fold": float(fold.detach())}
    return total, parts
