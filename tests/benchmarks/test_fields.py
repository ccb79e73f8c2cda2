"""The benchmarks' field helpers: band decomposition, known deformations, ANTs fields in our frame, the
inverse's residual. Grids are anisotropic, non-cubic and rotated so that a transposition cannot hide."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fields import (
    LAMBDA_PER_SIGMA,
    band_errors,
    band_limited_field,
    band_parts,
    bands,
    field_on_grid,
    inverse_residual,
    length_stats,
    low_pass,
    read_itk_field,
    small_affine,
    warp_array,
)

from patchmorph_core.spatial import Grid
from pipeline.importers import load_nifti


def _rotation(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]])


def _grid() -> Grid:
    """(18, 27, 23) voxels of 50 x 40 x 30 µm, rotated 20° about world z."""
    return Grid.from_spacing(
        (18, 27, 23), (50.0, 40.0, 30.0), origin=(100.0, -40.0, 7.0), direction=_rotation(20)
    )


def test_bands_are_labelled_coarsest_first() -> None:
    labels = [b.label() for b in bands([800.0, 400.0, 200.0])]
    assert labels == ["> 800 µm", "400-800 µm", "200-400 µm", "< 200 µm"]
    with pytest.raises(ValueError, match="decreasing"):
        bands([200.0, 400.0])


def test_band_parts_sum_to_the_field() -> None:
    grid = _grid()
    field = np.random.default_rng(0).normal(size=(3, *grid.shape)).astype(np.float32)
    parts = list(band_parts(field, grid, [900.0, 300.0, 120.0]))
    assert len(parts) == 4
    np.testing.assert_allclose(sum(parts), field, atol=1e-5)


def test_low_pass_halves_a_sine_at_its_edge_wavelength() -> None:
    """A sine along a world direction that is no array axis keeps half its amplitude at the edge wavelength,
    whatever the anisotropic voxel size (the filter is isotropic in world units)."""
    grid = Grid.from_spacing((40, 90, 70), (20.0, 12.0, 15.0), direction=_rotation(30))
    wavelength = 240.0
    direction = np.array([0.0, 0.6, 0.8])
    phase = 2 * np.pi * (grid.points() @ direction) / wavelength
    smooth = low_pass(np.sin(phase), grid, wavelength)
    inner = (slice(15, -15), slice(25, -25), slice(20, -20))  # away from the extended edges
    gain = np.sum(smooth[inner] * np.sin(phase)[inner]) / np.sum(np.sin(phase)[inner] ** 2)
    assert gain == pytest.approx(0.5, abs=0.03)
    assert LAMBDA_PER_SIGMA == pytest.approx(5.336, abs=1e-3)


def test_a_sine_lands_mostly_in_its_band() -> None:
    grid = Grid.from_spacing((40, 90, 70), (20.0, 12.0, 15.0), direction=_rotation(30))
    phase = 2 * np.pi * (grid.points() @ np.array([0.0, 0.6, 0.8])) / 300.0
    field = np.stack([np.sin(phase), 0 * phase, 0 * phase]).astype(np.float32)
    inner = np.zeros(grid.shape, bool)
    inner[12:-12, 25:-25, 20:-20] = True
    rms = [
        length_stats(part, inner)["rms"]
        for part in band_parts(field, grid, [1600.0, 800.0, 400.0, 200.0, 100.0])
    ]
    assert int(np.argmax(rms)) == 3  # the 200-400 µm band
    assert rms[0] < 0.01 and rms[5] < 0.1


def test_band_limited_field_has_the_stated_amplitude_per_band() -> None:
    grid = _grid()
    edges = [1200.0, 400.0, 150.0]
    field = band_limited_field(grid, edges, [0.0, 20.0, 0.0, 0.0], np.random.default_rng(3))
    assert length_stats(field)["rms"] == pytest.approx(20.0, rel=1e-4)
    rms = [length_stats(part)["rms"] for part in band_parts(field, grid, edges)]
    assert int(np.argmax(rms)) == 1
    again = band_limited_field(grid, edges, [0.0, 20.0, 0.0, 0.0], np.random.default_rng(3))
    np.testing.assert_array_equal(field, again)


def test_band_errors_of_the_truth_itself_are_zero_and_of_zero_are_the_truth() -> None:
    grid = _grid()
    edges = [1200.0, 400.0]
    truth = band_limited_field(grid, edges, [10.0, 5.0, 2.0], np.random.default_rng(1))
    mask = np.ones(grid.shape, bool)
    perfect = band_errors(truth, truth, grid, edges, mask)
    assert [row["recovered"] for row in perfect] == pytest.approx([1.0, 1.0, 1.0])
    nothing = band_errors(np.zeros_like(truth), truth, grid, edges, mask)
    assert [row["recovered"] for row in nothing] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert [row["band"] for row in nothing] == ["> 1200 µm", "400-1200 µm", "< 400 µm"]


def test_warp_array_follows_the_displacement() -> None:
    """u = one voxel along array axis 1 (a world vector, since the grid is rotated): labels[x + u] shifts."""
    grid = _grid()
    labels = np.random.default_rng(2).integers(0, 5, size=grid.shape).astype(np.int32)
    step = grid.linear[:, 1]  # the world step of one voxel along axis 1
    field = np.broadcast_to(step[:, None, None, None], (3, *grid.shape)).astype(np.float32)
    warped = warp_array(labels, grid, grid, field, order=0)
    np.testing.assert_array_equal(warped[:, :-1], labels[:, 1:])
    assert (warped[:, -1] == 0).all()
    part = grid.crop((1, 2, 3), (15, 20, 18))  # another grid of the same world: the array is read through it
    same = warp_array(labels, grid, part, np.zeros((3, *part.shape), np.float32), order=0)
    np.testing.assert_array_equal(same, labels[1:15, 2:20, 3:18])


def test_field_on_grid_reproduces_a_linear_field_across_units() -> None:
    coarse = _grid()
    matrix = np.array([[0.01, 0.02, 0.0], [0.0, -0.03, 0.01], [0.02, 0.0, 0.01]])
    field = np.moveaxis(coarse.points() @ matrix.T, -1, 0).astype(np.float32)  # µm
    fine = coarse.crop((3, 4, 5), (14, 20, 17)).resampled((25.0, 20.0, 15.0)).with_unit("millimeter")
    sampled = field_on_grid(field, coarse, fine)
    expected = np.moveaxis((fine.points() * 1000.0) @ matrix.T / 1000.0, -1, 0)
    np.testing.assert_allclose(sampled, expected, atol=1e-6)


def test_read_itk_field_turns_lps_vectors_into_ours(tmp_path: Path) -> None:
    """A constant LPS displacement (1, 2, 3) mm is (S, A, R) = (3, -2, -1) in our frame, on the grid that
    load_nifti gives a scalar image with the same header."""
    affine = np.array([[-2.0, 0.0, 0.0, 10.0], [0.0, 0.0, 3.0, -5.0], [0.0, 4.0, 0.0, 2.0], [0, 0, 0, 1]])
    shape_xyz = (5, 7, 6)
    vectors = np.broadcast_to(np.array([1.0, 2.0, 3.0], np.float32), (*shape_xyz, 1, 3))
    image = nib.Nifti1Image(np.ascontiguousarray(vectors), affine)
    image.header.set_intent("vector")
    nib.save(image, str(tmp_path / "field.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(shape_xyz, np.float32), affine), str(tmp_path / "scalar.nii.gz"))
    field, grid = read_itk_field(tmp_path / "field.nii.gz")
    _, expected_grid = load_nifti(tmp_path / "scalar.nii.gz")
    assert field.shape == (3, 6, 7, 5)
    np.testing.assert_allclose(field.reshape(3, -1).T, np.broadcast_to([3.0, -2.0, -1.0], (6 * 7 * 5, 3)))
    assert grid.shape == expected_grid.shape and grid.unit == "millimeter"
    np.testing.assert_allclose(grid.affine, expected_grid.affine)


def test_inverse_residual_is_small_for_a_smooth_field_and_zero_for_a_shift() -> None:
    grid = _grid()
    mask = np.zeros(grid.shape, bool)
    mask[4:-4, 5:-5, 5:-5] = True
    shift = np.broadcast_to(np.array([7.0, -3.0, 2.0], np.float32)[:, None, None, None], (3, *grid.shape))
    assert inverse_residual(np.ascontiguousarray(shift), grid, mask, 20)["max"] == pytest.approx(
        0.0, abs=1e-4
    )
    smooth = band_limited_field(grid, [600.0], [15.0, 0.0], np.random.default_rng(4))
    residual = inverse_residual(smooth, grid, mask, 20)
    assert residual["p999"] < 0.05 and residual["p50"] <= residual["p99"] <= residual["max"]
    assert residual["max_vox"] == pytest.approx(residual["max"] / grid.spacing.mean())


def test_small_affine_stays_within_its_bounds() -> None:
    center = np.array([100.0, 200.0, 300.0])
    for seed in range(5):
        matrix = small_affine(np.random.default_rng(seed), center, 5.0, 50.0, 0.04)
        assert np.all(np.abs(matrix[:3, :3] @ center + matrix[:3, 3] - center) <= 50.0 + 1e-9)
        assert 0.96**3 - 1e-9 <= np.linalg.det(matrix[:3, :3]) <= 1.04**3 + 1e-9
