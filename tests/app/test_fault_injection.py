"""Fault injection: `patchmorph register` killed (SIGKILL, the whole process group) at random moments, again
and again, then run to the end; the resumed field and uncertainty are bit-identical to an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
import zarr
from scipy import ndimage

from patchmorph_core.config import InferenceConfig, ModelConfig
from patchmorph_core.model import PatchMorph, save_checkpoint
from patchmorph_core.spatial import Grid
from pipeline.checks import CheckOptions
from pipeline.ngff import read_field, read_image, write_image
from pipeline.register import register_files

THREADS = str(Path(__file__).resolve().parents[2] / "configs" / "flows" / "task_cluster.yaml")
KILLS = 4
"""Random kills before the run is let finish."""


def _inputs(root: Path) -> tuple[Path, Path, Path]:
    """A smooth textured volume on an anisotropic rotated grid, a shifted copy, and a config with a tiny model
    (two stages, a refinement pass and a polish: five passes of chunks to be killed in)."""
    rng = np.random.default_rng(0)
    shape = (30, 34, 26)
    volume = ndimage.gaussian_filter(rng.random(shape), 2.5)
    index = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), axis=-1)
    volume *= np.sqrt(((index / np.array([0.8, 0.7, 0.75])) ** 2).sum(-1)) < 1.0
    volume = (volume / volume.max()).astype(np.float32)
    grid = Grid.from_orientation(shape, (1.2, 1.0, 1.1), "lia", unit="millimeter")
    fixed = write_image(root / "fixed.zarr", volume, grid)
    moving = write_image(root / "moving.zarr", ndimage.shift(volume, (1.5, -1.0, 2.0), order=1), grid)
    torch.manual_seed(0)
    model = PatchMorph(ModelConfig(patch_size=16, n_stages=2, widths=(4, 8), affine_widths=(4, 8)))
    weights = save_checkpoint(root / "tiny.pt", model)
    config = InferenceConfig(
        weights=str(weights), device="cpu", batch_size=8, max_rotation_deg=10.0, refine_passes=1, polish_iterations=3
    )
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return fixed, moving, path


def test_register_killed_at_random_moments_resumes_bit_identical(tmp_path: Path) -> None:
    fixed, moving, config = _inputs(tmp_path)
    args = ["--fixed", str(fixed), "--moving", str(moving), "--config", str(config), "--chunk-size", "5",
            "--scheduler", THREADS, "--accept-quality"]  # fmt: skip
    tic = time.monotonic()
    reference = register_files(
        fixed, moving, tmp_path / "reference.zarr", config, chunk_size=5, scheduler=THREADS, progress=False,
        checks=CheckOptions(accept_quality=True),
    )  # fmt: skip
    duration = time.monotonic() - tic
    assert reference.chunks > 20

    out = tmp_path / "killed.zarr"
    run = out.with_name(out.name + ".run")
    command = [sys.executable, "-m", "patchmorph", "register", *args, "--out", str(out)]
    rng = np.random.default_rng(22)
    killed = []
    for attempt in range(KILLS):
        log = (tmp_path / f"attempt{attempt}.log").open("w")
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 600
        while not (run / "run.json").is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the run has started (inputs checked, records opened)
        time.sleep(float(rng.uniform(0.0, duration)))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the command and every thread or process it started
            killed.append(len(list(run.rglob("done/*.json"))))
        process.wait()
        log.close()
        assert process.returncode in (0, -signal.SIGKILL), (tmp_path / f"attempt{attempt}.log").read_text()
        finished = process.returncode == 0 or (out.is_dir() and not run.exists())  # killed after it finished
        if finished:
            break
    assert killed, "no run was killed: the command finished before every kill"

    if not finished:  # the last attempt was killed: the same command resumes and finishes it
        resumed = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        assert resumed.returncode == 0, resumed.stderr
    field, _, meta = read_field(out)
    expected, _, _ = read_field(reference.field)
    assert np.array_equal(np.asarray(field[:]), np.asarray(expected[:]))
    uncertainty = np.asarray(read_image(out / "uncertainty").levels[0].array[:])
    assert np.array_equal(uncertainty, np.asarray(read_image(reference.uncertainty).levels[0].array[:]))
    assert meta["complete"] and meta["quality"]["folding"] == reference.quality["folding"]
    stages = meta["quality"]["similarity"]["stages"]  # the driver's per-pass scores, before and after
    assert stages and all({"name", "before", "after", "accepted"} <= set(s) for s in stages)
    assert dict(zarr.open_group(str(out), mode="r").attrs["patchmorph"])["write_id"]
    print(f"killed {len(killed)} times with {killed} chunk records done; resumed bit-identical")
