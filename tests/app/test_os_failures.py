"""An operating-system failure in the middle of a run: one ``error:`` sentence, exit code 1, nothing marked
complete, and the same command after the cause is gone resumes to the right result.

The failure is real: the command runs in a process whose file-size limit (``RLIMIT_FSIZE``) is below the size
of one output chunk, so the kernel refuses the write (``EFBIG``, handled like a full disk: both are OSErrors
of a write)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

from patchmorph_core.displacement import FieldDisplacement
from patchmorph_core.spatial import Grid
from patchmorph_core.warping import warp_to_grid
from pipeline.ngff import read_field, read_image, write_field, write_image

LIMIT_BYTES = 60_000
"""Largest file the failing run may write: metadata and records fit, a 32³ float32 chunk of noise does not."""


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))


def test_write_refused_by_the_system_is_one_sentence_and_the_rerun_resumes(tmp_path: Path) -> None:
    grid = Grid.from_orientation((48, 40, 44), (1.0, 1.25, 1.1), "ras", unit="millimeter")
    noise = np.random.default_rng(4).random(grid.shape).astype(np.float32)  # compresses little
    fixed = write_image(tmp_path / "fixed.zarr", noise, grid)
    moving = write_image(tmp_path / "moving.zarr", noise, grid)
    field_grid = grid.resampled(4.0)
    shift = np.array([1.0, -0.5, 0.7], np.float32)[:, None, None, None]
    field = write_field(
        tmp_path / "field.zarr", np.ascontiguousarray(np.broadcast_to(shift, (3, *field_grid.shape))), field_grid,
        metadata={"fixed": str(fixed), "moving": str(moving)},
    )  # fmt: skip
    out = tmp_path / "warped.zarr"
    command = [sys.executable, "-m", "patchmorph", "warp", "--field", str(field), "--moving", str(moving),
               "--out", str(out), "--chunk-size", "32"]  # fmt: skip

    failed = subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False, preexec_fn=_limit_file_size
    )

    assert failed.returncode == 1, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "file too large" in errors[0] and "rerun the same command" in errors[0], errors[0]
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]["patchmorph"]
    assert attrs["complete"] is False  # the half-written output is not taken for a finished one

    again = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)

    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stdout
    values, fgrid, _ = read_field(field)
    expected = warp_to_grid(read_image(moving), FieldDisplacement(np.asarray(values[:]), fgrid), grid)
    np.testing.assert_allclose(np.asarray(read_image(out).levels[0].array[:]), expected, rtol=1e-5, atol=1e-5)  # float32 warp
