"""Training: a seeded smoke run lowers the loss and raises Dice on a held-out pair; resume; the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from typer.testing import CliRunner

from patchmorph_core.config import DataConfig, LossConfig, ModelConfig, TrainConfig
from patchmorph_core.model import PatchMorph, load_model, read_checkpoint
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid, resample
from patchmorph_core.synth import random_smooth_field, synthesize_image
from patchmorph_core.training import TrainPair, centred_chain, chain_displacement, loss_csv_path, train
from pipeline.cli import app
from pipeline.train_cmd import SynthPairs, random_pose

SHAPE = (36, 40, 44)
N_LABELS = 12
MODEL = ModelConfig(patch_size=16, n_stages=2, widths=(8, 16, 16), affine_widths=(8, 16, 16))


def _labels(seed: int) -> tuple[np.ndarray, Grid]:
    """A toy 'brain' label map (2 mm): an ellipsoid cut into 12 Voronoi cells (labels 1-12).

    Every subject shares the cell layout (relative to its ellipsoid) up to a jitter; ``seed`` varies the
    ellipsoid's centre and radii and the jitter.
    """
    layout = np.random.default_rng(0).uniform(-0.7, 0.7, (N_LABELS, 3))
    rng = np.random.default_rng(seed)
    index = np.indices(SHAPE, dtype=np.float32).reshape(3, -1).T
    centre = np.array(SHAPE, dtype=np.float32) / 2 + rng.uniform(-1.5, 1.5, 3)
    radii = np.array([13.0, 15.0, 17.0]) * rng.uniform(0.9, 1.1, 3)
    inside = (((index - centre) / radii) ** 2).sum(axis=1) < 1
    seeds = centre + (layout + rng.uniform(-0.1, 0.1, layout.shape)) * radii
    nearest = np.argmin(((index[:, None, :] - seeds[None]) ** 2).sum(axis=2), axis=1)
    labels = np.where(inside, nearest + 1, 0).astype(np.int32).reshape(SHAPE)
    return labels, Grid.from_spacing(SHAPE, (2.0, 2.0, 2.0), unit="millimeter")


def _held_out_pair() -> tuple[TrainPair, MultiscaleImage, MultiscaleImage]:
    """A pair never seen in training: subject 7's labels deformed and moved; and both label images."""
    rng = np.random.default_rng(1234)
    labels, grid = _labels(7)
    disp = random_smooth_field(SHAPE, rng, 2.5, 8.0)
    moved = ndimage.map_coordinates(labels, np.indices(SHAPE, dtype=np.float32) + disp, order=0, mode="nearest")
    table = {0: 0.0, **{k: float(v) for k, v in enumerate(rng.uniform(0.1, 1.0, N_LABELS), start=1)}}
    pose = random_pose(rng, grid.center, DataConfig(max_rotation_deg=8.0, max_translation=6.0, max_scaling=0.05))
    fixed = MultiscaleImage.from_array(synthesize_image(labels, rng, table, noise_std=0.01), grid)
    moving = MultiscaleImage.from_array(synthesize_image(moved, rng, table, noise_std=0.01), grid).transformed(pose)
    fixed_labels = MultiscaleImage.from_array(labels, grid, n_levels=1, labels=True)
    moving_labels = MultiscaleImage.from_array(moved, grid, n_levels=1, labels=True).transformed(pose)
    return TrainPair.from_images(fixed, moving), fixed_labels, moving_labels


def _dice(model: PatchMorph, pair: TrainPair, fixed_labels: MultiscaleImage, moving_labels: MultiscaleImage) -> tuple[float, float]:
    """Mean Dice of the labels on the evaluation chain's finest patch, and the chain's loss."""
    chain = centred_chain(pair.fixed, model.config.patch_size, model.stage_extents(pair.fixed.tissue_extent))
    points, disp, loss = chain_displacement(model, pair, chain)
    f = resample(fixed_labels.levels[0].array, fixed_labels.grid, points, order=0, dtype=np.int32)
    m = resample(moving_labels.levels[0].array, moving_labels.grid, points + disp, order=0, dtype=np.int32)
    dice = [2 * np.sum((f == k) & (m == k)) / max(np.sum(f == k) + np.sum(m == k), 1) for k in range(1, N_LABELS + 1)]
    return float(np.mean(dice)), loss


def _config(tmp_path: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        model=MODEL,
        loss=LossConfig(),
        steps=steps,
        batch_size=2,
        lr=3e-3,
        seed=0,
        device="cpu",
        checkpoint=str(tmp_path / "run" / "model.pt"),
        checkpoint_every=20,
        max_patch_rotation_deg=10.0,
    )


def test_training_lowers_loss_and_raises_dice_on_held_out_pair(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = DataConfig(max_rotation_deg=8.0, max_translation=6.0, max_scaling=0.05, deform_disp_vox=2.5, refresh_every=2)
    source = SynthPairs([_labels(1), _labels(2)], data)
    pair, fixed_labels, moving_labels = _held_out_pair()
    config = _config(tmp_path, steps=60)
    before_dice, before_loss = _dice(PatchMorph(config.model), pair, fixed_labels, moving_labels)
    result = train(config, source, progress=False)
    model = load_model(result.checkpoint)
    after_dice, after_loss = _dice(model, pair, fixed_labels, moving_labels)
    print(f"held-out Dice {before_dice:.3f} -> {after_dice:.3f}, loss {before_loss:.3f} -> {after_loss:.3f}")
    assert after_loss < before_loss - 0.05
    assert after_dice > before_dice + 0.05
    assert after_dice > 0.7
    rows = list(csv.DictReader(loss_csv_path(result.checkpoint).open()))
    assert len(rows) == 60 and {"loss", "sim", "smooth", "fold", "stage0", "stage1"} <= set(rows[0])
