"""Small inputs shared by the chunked-pipeline tests: an image pair on disk and a tiny model checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from patchmorph_core.config import InferenceConfig, ModelConfig
from patchmorph_core.model import PatchMorph, save_checkpoint
from patchmorph_core.spatial import Grid
from pipeline.ngff import write_image


def image_pair(folder: Path) -> tuple[Path, Path]:
    """A smooth random volume on an anisotropic, rotated grid and a shifted copy, as OME-Zarr."""
    rng = np.random.default_rng(0)
    volume = ndimage.gaussian_filter(rng.random((36, 40, 32)), 3.0)
    volume = ((volume - volume.min()) / np.ptp(volume)).astype(np.float32)
    angle = np.deg2rad(12.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    grid = Grid.from_spacing(volume.shape, (1.2, 1.0, 1.1), unit="millimeter", direction=rot)
    moving = ndimage.shift(volume, (1.5, -1.0, 2.0), order=1).astype(np.float32)
    fixed_path = write_image(folder / "fixed.zarr", volume, grid, overwrite=True)
    moving_path = write_image(folder / "moving.zarr", moving, grid, overwrite=True)
    return fixed_path, moving_path


def tiny_config(folder: Path) -> InferenceConfig:
    """Inference config with a tiny randomly initialised 2-stage model (P=16) saved in ``folder``; float32 forward
    passes, since the tests using it compare two drivers' fields to float rounding (bfloat16's coarser rounding
    of nearly equal inputs would blur that comparison; its own test is in ``test_inference.py``)."""
    torch.manual_seed(0)
    model = PatchMorph(ModelConfig(patch_size=16, n_stages=2, widths=(4, 8), affine_widths=(4, 8)))
    weights = save_checkpoint(folder / "tiny.pt", model)
    return InferenceConfig(
        weights=str(weights), device="cpu", batch_size=8, max_rotation_deg=10.0, n_stages=2, precision="float32"
    )
