"""Stub models and small world-defined images shared by the inference and driver tests (importable as
``registration_stubs``: ``tests/`` is on the path through its conftest)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from patchmorph_core.config import ModelConfig
from patchmorph_core.model import stage_extents
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid, random_rotation


class ConstantUpdate(torch.nn.Module):
    """Model stub whose update is a known constant world vector (checks the arithmetic, not learning)."""

    def __init__(self, vector: tuple[float, float, float], patch_size: int = 8) -> None:
        super().__init__()
        self.config = ModelConfig(patch_size=patch_size, widths=(4, 4), n_stages=2)
        self.vector = torch.tensor(vector, dtype=torch.float32)
        self.calls: list[int] = []

    def stage_extents(self, extent: float, n_stages: int | None = None) -> list[float]:
        return stage_extents(extent, n_stages or self.config.n_stages, self.config.extent_margin)

    def stage_update(
        self, stage: int, fixed: torch.Tensor, moving: torch.Tensor, patch_linear: torch.Tensor
    ) -> torch.Tensor:
        self.calls.append(int(fixed.shape[0]))
        return self.vector.view(1, 3, 1, 1, 1).expand(fixed.shape[0], 3, *fixed.shape[2:]).to(fixed.device)


class FoldingUpdate(ConstantUpdate):
    """Model stub whose update folds every patch: ``-amplitude · tanh(q_x - centre)`` patch voxels along the
    patch's last axis, a compression of ``amplitude`` per voxel at its centre (folds where it exceeds 1)."""

    def __init__(self, amplitude: float = 3.0, patch_size: int = 8) -> None:
        super().__init__((0.0, 0.0, 0.0), patch_size)
        self.amplitude = amplitude

    def stage_update(
        self, stage: int, fixed: torch.Tensor, moving: torch.Tensor, patch_linear: torch.Tensor
    ) -> torch.Tensor:
        size = fixed.shape[-1]
        q = torch.arange(size, dtype=torch.float32, device=fixed.device) - (size - 1) / 2.0
        vox = torch.zeros(fixed.shape[0], 3, *fixed.shape[2:], device=fixed.device)
        vox[:, 2] = -self.amplitude * torch.tanh(q)
        return torch.einsum("bij,bjzyx->bizyx", patch_linear.to(vox.dtype), vox)


def blob_image(grid: Grid, center_shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Smooth ellipsoid with inner structure (world-defined, so any grid sees the same object)."""
    pts = grid.points() - np.asarray(center_shift)
    r = np.sqrt(((pts / np.array([9.0, 11.0, 8.0])) ** 2).sum(-1))
    inner = np.sqrt((((pts - np.array([2.0, -3.0, 1.0])) / 4.0) ** 2).sum(-1))
    return (np.clip(1.5 - r * 1.5, 0, 1) * 100 + (inner < 1) * 60).astype(np.float32)



def blob_pair() -> tuple[MultiscaleImage, MultiscaleImage]:
    fixed_grid = Grid.from_spacing((24, 28, 22), (1.2, 1.0, 1.4), origin=(-14, -14, -15), unit="millimeter")
    moving_grid = Grid.from_spacing(
        (20, 22, 26),
        (1500.0, 1400.0, 1000.0),
        unit="micrometer",
        direction=random_rotation(np.random.default_rng(9), 20.0),
    )
    moving_grid = moving_grid.translated(-moving_grid.center)
    shift_um = np.array([2000.0, -1500.0, 1000.0])
    fixed = MultiscaleImage.from_array(blob_image(fixed_grid), fixed_grid, n_levels=2)
    moving_arr = blob_image(moving_grid.with_unit("millimeter"), shift_um / 1000.0)
    moving = MultiscaleImage.from_array(ndimage.gaussian_filter(moving_arr, 0.5), moving_grid, n_levels=2)
    return fixed, moving
