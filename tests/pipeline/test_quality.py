"""The quality block: similarity before/after, folds inside the fixed tissue (box by box = whole field), the
inverse's residual, the thresholds, and a failed field marked so that readers refuse it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from patchmorph_core.displacement import FieldDisplacement, displacement_on_grid
from patchmorph_core.errors import InputError, QualityError
from patchmorph_core.metrics import jacobian_determinant
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid
from pipeline import quality
from pipeline.ngff import read_field, write_field
from pipeline.quality import QualityThresholds, assess_field, conclude, judge, raise_if_failed


def _images(tmp_path: Path) -> tuple[MultiscaleImage, MultiscaleImage, Grid, np.ndarray]:
    """A textured ellipsoid on an anisotropic, rotated grid, and a copy of it shifted by ``shift`` (mm)."""
    rng = np.random.default_rng(3)
    shape = (34, 40, 30)
    grid = Grid.from_orientation(shape, (2.0, 1.5, 2.5), "lia", unit="millimeter")
    index = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), axis=-1)
    inside = np.sqrt(((index / np.array([0.8, 0.7, 0.75])) ** 2).sum(-1)) < 1.0
    from scipy import ndimage

    texture = ndimage.gaussian_filter(rng.random(shape), 1.5)
    fixed = (inside * (0.5 + texture)).astype(np.float32)
    shift = np.array([3.0, -2.0, 4.0])
    moving_grid = grid.translated(shift)  # the same anatomy, 3/-2/4 mm away: u = shift maps fixed to moving
    return (
        MultiscaleImage.from_array(fixed, grid),
        MultiscaleImage.from_array(fixed, moving_grid),
        grid,
        shift,
    )


def _field(grid: Grid, shift: np.ndarray, fold: float) -> np.ndarray:
    """``u = shift`` plus, with ``fold`` > 1, a compression ``-fold (x - c) w(x)`` that folds a ball at the centre."""
    points = grid.points()
    offset = points - grid.center
    weight = np.exp(-(np.linalg.norm(offset, axis=-1) / 10.0) ** 4)[..., None]
    u = shift - fold * offset * weight
    return np.moveaxis(u, -1, 0).astype(np.float32)


def test_translation_field_scores_well(tmp_path: Path) -> None:
    fixed, moving, grid, shift = _images(tmp_path)
    field_grid = grid.resampled(3.0)
    path = write_field(tmp_path / "f.zarr", _field(field_grid, shift, 0.0), field_grid)
    report = assess_field(path, fixed, moving, field_grid, np.eye(4), {"orientation": {"given": 1}})
    sim, fold, inv = report.block["similarity"], report.block["folding"], report.block["inverse"]
    assert report.passed and fold["folded_voxels"] == 0 and fold["tissue_voxels"] > 500
    assert sim["final"] > 0.9 and sim["final"] > sim["initial"] + 0.2 and sim["identity"] == sim["initial"]
    assert inv["max_voxels"] < 1e-6 and inv["samples"] > 50
    stored = dict(zarr.open_group(str(path), mode="r").attrs["patchmorph"])
    assert stored["quality"]["passed"] and stored["quality"]["preflight"] == {"orientation": {"given": 1}}
    assert stored["complete"] is True and stored["quality"]["similarity"]["stages"] == []


def test_a_field_worse_than_its_start_fails_on_a_coarser_quality_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quality, "QUALITY_GRID_VOXELS", 16**3)  # the field grid (13 824+ voxels) is coarsened
    fixed, moving, grid, shift = _images(tmp_path)
    field_grid = grid.resampled(1.7)
    start = np.eye(4)
    start[:3, 3] = shift  # the initial alignment found the answer ...
    zero = write_field(tmp_path / "zero.zarr", _field(field_grid, np.zeros(3), 0.0), field_grid)
    report = assess_field(zero, fixed, moving, field_grid, start)  # ... and the field threw it away
    sim = report.block["similarity"]
    assert 2 * np.prod(sim["grid_shape"]) < np.prod(field_grid.shape)
    assert sim["initial"] > sim["final"] + 0.2 and sim["final"] == pytest.approx(sim["identity"])
    assert not report.passed and any("local NCC fell" in f for f in report.failures)
    kept = write_field(tmp_path / "kept.zarr", _field(field_grid, shift, 0.0), field_grid)
    assert assess_field(kept, fixed, moving, field_grid, start).passed


def test_folds_inside_tissue_box_by_box_equal_the_whole_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quality, "BOX", 8)  # many boxes with halos, edges not aligned to the grid (a multiple of the stride)
    fixed, moving, grid, shift = _images(tmp_path)
    field_grid = grid.resampled(1.7)
    field = _field(field_grid, shift, 2.5)
    path = write_field(tmp_path / "f.zarr", field, field_grid, chunks=(9, 11, 8))
    report = assess_field(path, fixed, moving, field_grid, np.eye(4))
    det = jacobian_determinant(field, field_grid)
    tissue = quality._tissue(fixed, field_grid, quality.intensity_range(fixed))
    expected = int((det[tissue] <= 0).sum())
    assert expected > 20
    assert report.block["folding"]["folded_voxels"] == expected
    assert report.block["folding"]["tissue_voxels"] == int(tissue.sum())
    assert report.block["folding"]["min_jacobian"] == pytest.approx(float(det[tissue].min()), rel=1e-5, abs=1e-5)
    assert report.block["inverse"]["percentiles_voxels"]["99"] > 0.1  # the fixed-point inverse fails where it folds
    assert not report.passed and "is folded (limit 1 %)" in report.failures[0]  # the folding clause comes first


def test_failed_field_is_marked_refused_and_can_be_accepted(tmp_path: Path) -> None:
    fixed, moving, grid, shift = _images(tmp_path)
    field_grid = grid.resampled(1.7)
    path = write_field(tmp_path / "f.zarr", _field(field_grid, shift, 2.5), field_grid)
    report = assess_field(path, fixed, moving, field_grid, np.eye(4))
    meta = dict(zarr.open_group(str(path), mode="r").attrs["patchmorph"])
    assert meta["status"] == "failed_quality" and meta["complete"] is False and not meta["quality"]["passed"]
    with pytest.raises(InputError, match=r"failed its quality checks \(.* is folded .*\): rerun register"):
        read_field(path)
    with pytest.raises(QualityError, match=r"the registration failed its quality checks \(.*\): the field .* kept"):
        raise_if_failed(path, report, accept=False)
    assert conclude(path, report, accept=True)
    raise_if_failed(path, report, accept=True)
    meta = dict(zarr.open_group(str(path), mode="r").attrs["patchmorph"])
    assert "status" not in meta and meta["quality"]["accepted"]


def test_thresholds_name_every_failure() -> None:
    block = {
        "similarity": {"initial": 0.5, "final": 0.4},
        "folding": {"folded_percent": 2.0},
        "inverse": {"percentiles_voxels": {"99": 3.0}},
    }
    failures = judge(block, QualityThresholds())
    assert len(failures) == 3
    assert "fell from 0.500 at the start to 0.400" in failures[1] and "3 field voxels" in failures[2]
    assert judge(block, QualityThresholds(max_folded_percent=5, min_similarity_change=-0.2, max_inverse_p99_voxels=4)) == []


def test_the_field_on_the_quality_grid_is_its_trilinear_sample() -> None:
    grid = Grid.from_orientation((19, 24, 15), (2.0, 1.5, 2.5), "lia", unit="millimeter")
    field = np.random.default_rng(5).normal(size=(3, *grid.shape)).astype(np.float32)
    for quality_grid in (grid, grid.resampled(3.1), quality._quality_grid(grid.resampled(0.9))):
        expected = displacement_on_grid(FieldDisplacement(field, grid), quality_grid)
        np.testing.assert_allclose(quality._field_on(quality_grid, field, grid), expected, atol=2e-5)
    assert np.array_equal(quality._field_on(grid, field, grid), field)  # its own grid: the stored values


def test_a_fold_outside_the_tissue_is_not_reported(tmp_path: Path) -> None:
    """The folding figures (folded voxels and the smallest det J) are of the fixed tissue alone: a fold in the empty
    corner of the field grid changes neither."""
    fixed, moving, grid, shift = _images(tmp_path)
    field_grid = grid.resampled(1.7)
    field = _field(field_grid, shift, 0.0)
    low, _ = field_grid.world_bounds()
    offset = field_grid.points() - (low + 4.0)  # a ball around a corner, outside the ellipsoid
    weight = np.exp(-(np.linalg.norm(offset, axis=-1) / 4.0) ** 4)[..., None]
    field += np.moveaxis(-2.5 * offset * weight, -1, 0).astype(np.float32)
    det = jacobian_determinant(field, field_grid)
    tissue = quality._tissue(fixed, field_grid, quality.intensity_range(fixed))
    assert det.min() < 0 and det[tissue].min() > 0.5
    report = assess_field(write_field(tmp_path / "f.zarr", field, field_grid), fixed, moving, field_grid, np.eye(4))
    assert report.block["folding"]["folded_voxels"] == 0
    assert report.block["folding"]["min_jacobian"] == pytest.approx(float(det[tissue].min()), abs=1e-4)


def test_det_j_of_a_rough_field_box_by_box_is_the_whole_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each box reads a one-voxel halo on every side, so det J at its faces takes central differences as on the whole
    field: for a rough field (where one-sided differences differ) the folded count is the whole field's."""
    monkeypatch.setattr(quality, "BOX", 8)
    fixed, moving, grid, shift = _images(tmp_path)
    field_grid = grid.resampled(1.7)
    noise = np.random.default_rng(5).normal(0.0, 1.2, (3, *field_grid.shape)).astype(np.float32)
    field = _field(field_grid, shift, 0.0) + noise
    det = jacobian_determinant(field, field_grid)
    tissue = quality._tissue(fixed, field_grid, quality.intensity_range(fixed))
    expected = int((det[tissue] <= 0).sum())
    assert 100 < expected < tissue.sum() // 2
    report = assess_field(write_field(tmp_path / "f.zarr", field, field_grid), fixed, moving, field_grid, np.eye(4))
    assert report.block["folding"]["folded_voxels"] == expected
