"""End-to-end tests of ``patchmorph evaluate`` on real NIfTI and OME-Zarr files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from patchmorph.cli import app
from patchmorph_core.spatial import Grid
from pipeline.ngff import write_field, write_image

RUNNER = CliRunner()


def _grid() -> Grid:
    return Grid.from_spacing((6, 8, 10), (2.0, 1.0, 1.5), origin=(1.0, 2.0, 3.0), unit="millimeter")


def _labels() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((6, 8, 10), dtype=np.int16)
    a[1:5, 2:6, 2:8] = 17
    b = np.zeros_like(a)
    b[1:5, 2:6, 4:8] = 17  # 64 of a's 96 voxels overlap: Dice 2*64/(96+64) = 0.8
    return a, b


def test_evaluate_dice_from_zarr_and_nifti_and_folding(tmp_path: Path) -> None:
    grid = _grid()
    a, b = _labels()
    write_image(tmp_path / "a.ome.zarr", a, grid, labels=True)
    # the same grid as NIfTI: file axes (i, j, k) = our (x, y, z), RAS = our (S, A, R) reversed
    ras = np.eye(4)
    ras[:3, :3] = np.diag([1.5, 1.0, 2.0])
    ras[:3, 3] = [3.0, 2.0, 1.0]
    nib.save(nib.Nifti1Image(b.transpose(2, 1, 0), ras), str(tmp_path / "b.nii.gz"))
    field = np.zeros((3, *grid.shape), dtype=np.float32)
    z = grid.points()[..., 0]
    field[0, :3] = -1.5 * (z[:3] - z[0, 0, 0])  # phi_z = -0.5 z on the first 3 slices: folded
    write_field(tmp_path / "field.ome.zarr", field, grid)
    out = tmp_path / "metrics.json"
    result = RUNNER.invoke(
        app,
        [
            "evaluate",
            "--labels-a", str(tmp_path / "a.ome.zarr"),
            "--labels-b", str(tmp_path / "b.nii.gz"),
            "--label-set", "17,3",
            "--field", str(tmp_path / "field.ome.zarr"),
            "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["dice"]["17"] == 0.8 and np.isnan(metrics["dice"]["3"])
    assert metrics["mean_dice"] == 0.8
    # u_z = 0, -3, -6, 0, 0, 0 mm on z = 0, 2, 4, ... mm: central differences give det J = 1 + du/dz =
    # -0.5, -0.5, 1.75, 2.5, 1, 1 per slice, so 2 of 6 slices fold
    assert metrics["folding_percent"] == pytest.approx(100.0 * 2 / 6)
    assert "mean_dice" in result.output


def test_evaluate_counts_folds_inside_the_fixed_tissue(tmp_path: Path) -> None:
    """Without --mask the folds are counted in the tissue of the field's fixed image (rotated, anisotropic
    grid): a fold in the background is reported only in the whole-grid figure."""
    grid = Grid.from_orientation((12, 10, 14), (2.0, 1.0, 1.5), "pli", unit="millimeter")
    image = np.zeros(grid.shape, dtype=np.float32)
    image[:, :, 7:] = 1.0 + np.random.default_rng(3).random((12, 10, 7)).astype(np.float32)  # tissue: k >= 7
    fixed = write_image(tmp_path / "fixed.ome.zarr", image, grid)
    field = np.zeros((3, *grid.shape), dtype=np.float32)
    k = np.arange(grid.shape[2], dtype=np.float32) * 1.5
    field[2, :, :, :3] = -1.5 * (k[:3] - k[0])  # along the third grid axis: folds in the background (k < 3)
    field_zyx = np.einsum("ij,j...->i...", grid.direction, field * 1.0)  # grid-axis components to world
    write_field(tmp_path / "field.ome.zarr", field_zyx.astype(np.float32), grid, metadata={"fixed": str(fixed)})
    result = RUNNER.invoke(app, ["evaluate", "--field", str(tmp_path / "field.ome.zarr")])
    assert result.exit_code == 0, result.output
    assert "tissue of the fixed image" in result.output
    values = dict(line.rsplit(None, 1) for line in result.output.splitlines() if line.startswith("folding"))
    assert float(values["folding_percent"]) == 0.0
    assert float(values["folding_percent_whole_grid"]) > 5.0


def test_evaluate_ncc_and_bad_inputs(tmp_path: Path) -> None:
    grid = _grid()
    image = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    write_image(tmp_path / "i.ome.zarr", image, grid)
    write_image(tmp_path / "j.ome.zarr", 2 * image + 1, grid)
    ok = RUNNER.invoke(
        app,
        ["evaluate", "--image-a", str(tmp_path / "i.ome.zarr"), "--image-b", str(tmp_path / "j.ome.zarr")],
    )
    assert ok.exit_code == 0, ok.output
    assert "ncc" in ok.output
    other = Grid.from_spacing((6, 8, 11), (2.0, 1.0, 1.5), unit="millimeter")
    write_image(tmp_path / "k.ome.zarr", np.zeros(other.shape, np.float32), other)
    bad = RUNNER.invoke(
        app,
        ["evaluate", "--image-a", str(tmp_path / "i.ome.zarr"), "--image-b", str(tmp_path / "k.ome.zarr")],
    )
    assert bad.exit_code == 2 and "different grids" in bad.output
    assert RUNNER.invoke(app, ["evaluate"]).exit_code == 2
    assert RUNNER.invoke(app, ["evaluate", "--labels-a", str(tmp_path / "i.ome.zarr")]).exit_code == 2


def test_label_maps_of_one_shape_on_shifted_grids_name_the_shift(tmp_path: Path) -> None:
    """Two label maps of one shape whose headers differ (a NIfTI moved by 0.2 mm, as another tool may write it):
    the refusal says the shapes agree and how far apart the voxels lie, not "(6, 8, 10) vs (6, 8, 10)"."""
    grid = Grid.from_spacing((6, 8, 10), (0.5, 0.4, 0.3), unit="millimeter")
    labels = (np.arange(np.prod(grid.shape)).reshape(grid.shape) % 3).astype(np.uint16)
    write_image(tmp_path / "a.ome.zarr", labels, grid, labels=True)
    shifted = grid.translated(np.array([0.0, 0.2, 0.0]))
    write_image(tmp_path / "b.ome.zarr", labels, shifted, labels=True)
    bad = RUNNER.invoke(
        app, ["evaluate", "--labels-a", str(tmp_path / "a.ome.zarr"), "--labels-b", str(tmp_path / "b.ome.zarr")]
    )
    assert bad.exit_code == 2
    assert "the same shape (6, 8, 10), but their headers place the voxels up to 0.2 millimeter apart" in bad.output
