"""Training: a seeded smoke run lowers the loss and raises Dice on a held-out pair; resume; the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from patchmorph.cli import app
from patchmorph_core.config import DataConfig, LossConfig, ModelConfig, TrainConfig
from patchmorph_core.model import PatchMorph, load_model, read_checkpoint, save_checkpoint
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid, resample
from patchmorph_core.synth import random_smooth_field, synthesize_image
from patchmorph_core.training import (
    TrainPair,
    centred_chain,
    chain_displacement,
    learning_rate,
    loss_csv_path,
    train,
)
from pipeline.training_data import random_pose

SHAPE = (36, 40, 44)
N_LABELS = 12
STEPS = 100
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


def _label_pair() -> tuple[MultiscaleImage, MultiscaleImage]:
    """Fixed labels (subject 1) and moving labels (subject 2, deformed and moved by a random pose)."""
    rng = np.random.default_rng(1234)
    fixed, grid = _labels(1)
    other, _ = _labels(2)
    disp = random_smooth_field(SHAPE, rng, 2.5, 8.0)
    moved = ndimage.map_coordinates(other, np.indices(SHAPE, dtype=np.float32) + disp, order=0, mode="nearest")
    pose = random_pose(rng, grid.center, DataConfig(max_rotation_deg=8.0, max_translation=6.0, max_scaling=0.05))
    fixed_labels = MultiscaleImage.from_array(fixed, grid, n_levels=1, labels=True)
    moving_labels = MultiscaleImage.from_array(moved, grid, n_levels=1, labels=True).transformed(pose)
    return fixed_labels, moving_labels


def _synthetic_pair(labels: tuple[MultiscaleImage, MultiscaleImage], seed: int) -> TrainPair:
    """Images of the two label maps with one random intensity per label (shared), blur, bias and noise."""
    rng = np.random.default_rng(seed)
    table = {0: 0.0, **{k: float(v) for k, v in enumerate(rng.uniform(0.1, 1.0, N_LABELS), start=1)}}
    images = [
        MultiscaleImage.from_array(synthesize_image(np.asarray(lab.levels[0].array), rng, table), lab.grid)
        for lab in labels
    ]
    return TrainPair.from_images(images[0], images[1])


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
        threads=1,  # tiny convolutions: one thread is fastest, and far faster on a shared CPU
        checkpoint=str(tmp_path / "run" / "model.pt"),
        checkpoint_every=20,
        max_patch_rotation_deg=10.0,
    )


def test_training_lowers_loss_and_raises_dice_on_held_out_pair(tmp_path: Path) -> None:
    """Train on two label maps (a new random synthesis every step); test on a held-out synthesis.

    The held-out pair's intensities, bias and noise were never seen, so the model must have learnt to
    match structure rather than memorise one image pair.
    """
    torch.manual_seed(0)
    labels = _label_pair()
    held_out = _synthetic_pair(labels, seed=2)
    config = _config(tmp_path, steps=STEPS)
    before_dice, before_loss = _dice(PatchMorph(config.model), held_out, *labels)
    result = train(config, lambda rng: _synthetic_pair(labels, int(rng.integers(1 << 30))), progress=False)
    after_dice, after_loss = _dice(load_model(result.checkpoint), held_out, *labels)
    print(f"held-out Dice {before_dice:.3f} -> {after_dice:.3f}, loss {before_loss:.3f} -> {after_loss:.3f}")
    assert after_loss < before_loss - 0.05
    assert after_dice > before_dice + 0.03
    assert after_dice > 0.65
    rows = list(csv.DictReader(loss_csv_path(result.checkpoint).open()))
    assert len(rows) == STEPS and {"loss", "sim", "smooth", "fold", "stage0", "stage1"} <= set(rows[0])


def test_resume_continues_from_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = _label_pair()
    config = _config(tmp_path, steps=4).model_copy(
        update={"model": ModelConfig(patch_size=8, n_stages=2, widths=(4, 8), affine_widths=(4,)), "checkpoint_every": 2}
    )

    def source(rng: np.random.Generator) -> TrainPair:
        return _synthetic_pair(labels, int(rng.integers(1 << 30)))

    train(config, source, progress=False)
    first = read_checkpoint(config.checkpoint)
    assert first["step"] == 4 and first["optimizer"] is not None and "rng" in first["extra"]
    assert first["configs"]["train"]["steps"] == 4
    capsys.readouterr()
    resumed = train(config.model_copy(update={"steps": 6, "resume": True}), source, progress=True)
    bar = capsys.readouterr().err
    assert "train (steps 5-6)" in bar and "2/2" in bar and "/6" not in bar  # this run's steps, not the checkpoint's
    assert read_checkpoint(resumed.checkpoint)["step"] == 6
    steps = [int(r["step"]) for r in csv.DictReader(resumed.loss_csv.open())]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_without_a_checkpoint_says_it_starts_at_step_0(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run killed before its first checkpoint, or a checkpoint path mistyped: --resume starts from scratch, and
    says so (it was silent)."""
    labels = _label_pair()
    config = _config(tmp_path, steps=1).model_copy(
        update={"model": ModelConfig(patch_size=8, n_stages=2, widths=(4, 8), affine_widths=(4,)), "resume": True}
    )
    with caplog.at_level("WARNING", logger="patchmorph_core.training"):
        train(config, lambda rng: _synthetic_pair(labels, int(rng.integers(1 << 30))), progress=False)
    assert f"no checkpoint {config.checkpoint} yet" in caplog.text and "starts at step 0" in caplog.text


def test_cosine_schedule_anneals_from_lr_to_zero_and_is_what_the_optimizer_used(tmp_path: Path) -> None:
    config = _config(tmp_path, steps=4).model_copy(
        update={
            "model": ModelConfig(patch_size=8, n_stages=2, widths=(4, 8), affine_widths=(4,)),
            "lr_schedule": "cosine",
            "lr": 1e-3,
        }
    )
    assert [learning_rate(config, s) for s in range(4)] == pytest.approx([1e-3, 8.5355e-4, 5e-4, 1.4645e-4], rel=1e-4)
    assert learning_rate(config.model_copy(update={"lr_schedule": "constant"}), 3) == 1e-3
    labels = _label_pair()
    train(config, lambda rng: _synthetic_pair(labels, int(rng.integers(1 << 30))), progress=False)
    saved = read_checkpoint(config.checkpoint)
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(learning_rate(config, 3))
    assert saved["configs"]["train"]["lr_schedule"] == "cosine"


def test_resume_to_no_more_steps_than_the_checkpoint_has_is_refused(tmp_path: Path) -> None:
    """`--resume --steps N` with N below the checkpoint's step trained nothing and printed "trained N steps
    (loss nan)": it is one sentence naming the checkpoint's step, exit 2; N equal to it (a finished run started
    again) has nothing to do and says the run's loss; the checkpoint is kept."""
    _write_nifti_pair(tmp_path)
    config = tmp_path / "train.yaml"
    config.write_text(
        "data:\n  kind: pairs\n  pairs: [[fixed.nii.gz, moving.nii.gz]]\n  spacing: null\n"
        "model:\n  patch_size: 8\n  n_stages: 2\n  widths: [4, 8]\n  affine_widths: [4]\n"
        f"steps: 3\nbatch_size: 1\ndevice: cpu\ncheckpoint: {tmp_path / 'out' / 'model.pt'}\n"
    )
    runner = CliRunner()
    assert runner.invoke(app, ["train", "--config", str(config)]).exit_code == 0
    before = (tmp_path / "out" / "model.pt").read_bytes()
    result = runner.invoke(app, ["train", "--config", str(config), "--resume", "--steps", "2"])
    assert result.exit_code == 2, result.output
    assert "has 3 steps already" in result.output and "--steps above 3" in result.output
    loss = read_checkpoint(tmp_path / "out" / "model.pt")["extra"]["loss"]
    result = runner.invoke(app, ["train", "--config", str(config), "--resume"])
    assert result.exit_code == 0 and f"trained 3 steps in 0 s (loss {loss:.4f})" in result.output, result.output
    assert (tmp_path / "out" / "model.pt").read_bytes() == before


def _write_nifti_pair(folder: Path) -> None:
    """``fixed.nii.gz`` and ``moving.nii.gz`` (2 mm, synthetic images of the test label pair) in ``folder``."""
    fixed_labels, moving_labels = _label_pair()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for name, lab in (("fixed", fixed_labels), ("moving", moving_labels)):
        image = synthesize_image(np.asarray(lab.levels[0].array), np.random.default_rng(0), None)
        nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), str(folder / f"{name}.nii.gz"))


def test_train_command_on_nifti_pairs(tmp_path: Path) -> None:
    _write_nifti_pair(tmp_path)
    config = tmp_path / "train.yaml"
    config.write_text(
        "data:\n  kind: pairs\n  pairs: [[fixed.nii.gz, moving.nii.gz]]\n  spacing: 4.0\n"
        "model:\n  patch_size: 8\n  n_stages: 2\n  widths: [4, 8]\n  affine_widths: [4]\n"
        f"steps: 2\nbatch_size: 1\ndevice: cpu\ncheckpoint: {tmp_path / 'out' / 'model.pt'}\n"
    )
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output and (tmp_path / "out" / "model.pt").is_file()
    assert load_model(tmp_path / "out" / "model.pt").config.patch_size == 8
    config.write_text("data:\n  kind: pairs\n  pairs: [[missing.nii.gz, moving.nii.gz]]\n")
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and "missing.nii.gz does not exist" in result.output


def test_train_command_fine_tunes_from_weights_with_affine_starts(tmp_path: Path) -> None:
    # step 2 of the default model's recipe (configs/train_affine.yaml): start from trained weights, every
    # pair starting from the fitted affine; the weights must move and the model config must be the source's
    _write_nifti_pair(tmp_path)
    source = PatchMorph(ModelConfig(patch_size=8, n_stages=2, widths=(4, 8), affine_widths=(4,)))
    save_checkpoint(tmp_path / "base.pt", source, step=7)
    config = tmp_path / "finetune.yaml"
    config.write_text(
        "data:\n  kind: pairs\n  pairs: [[fixed.nii.gz, moving.nii.gz]]\n  spacing: 4.0\n"
        "model:\n  patch_size: 16\n"  # ignored: the init_weights' model config wins
        f"steps: 2\nbatch_size: 1\ndevice: cpu\ncheckpoint: {tmp_path / 'out' / 'tuned.pt'}\n"
        "init_weights: base.pt\ninitial_alignment: affine\n"
    )
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, result.output
    tuned = load_model(tmp_path / "out" / "tuned.pt")
    assert tuned.config == source.config and read_checkpoint(tmp_path / "out" / "tuned.pt")["step"] == 2
    before, after = source.state_dict(), tuned.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    config.write_text(config.read_text().replace("base.pt", "absent.pt"))
    result = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and "absent.pt does not exist" in result.output
