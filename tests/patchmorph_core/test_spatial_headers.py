"""NIfTI / NRRD header algebra: index (i, j, k) -> RAS becomes index (z, y, x) -> (S, A, R)."""

import numpy as np
import pytest

from patchmorph_core.spatial import (
    Grid,
    SpatialError,
    grid_affine_from_ras,
    nifti_affine,
    nifti_forms_gap,
    ras_affine_from_nrrd,
    swap_file_axes,
    swap_file_sizes,
)


def _rotated_ras_affine() -> np.ndarray:
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.5, 1.5, 2.5])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return affine


def test_grid_affine_reverses_index_and_world_components() -> None:
    ras = _rotated_ras_affine()
    ours = grid_affine_from_ras(ras)
    rng = np.random.default_rng(0)
    for ijk in rng.uniform(0, 20, size=(5, 3)):
        r, a, s = ras[:3, :3] @ ijk + ras[:3, 3]
        zyx = ijk[::-1]
        np.testing.assert_allclose(ours[:3, :3] @ zyx + ours[:3, 3], [s, a, r])
    np.testing.assert_allclose(ours[3], [0, 0, 0, 1])


def test_file_array_and_our_array_put_every_voxel_at_one_world_point() -> None:
    """A NIfTI-style (I, J, K, C) array on a rotated anisotropic affine, non-cubic: swap_file_axes gives our
    (Z, Y, X, C) array, whose voxel (z, y, x) holds file voxel (k, j, i) and lies where the file's affine puts it."""
    ras = _rotated_ras_affine()  # voxel 0.5 x 1.5 x 2.5 along i, j, k
    file_array = np.arange(4 * 5 * 7 * 3, dtype=np.float32).reshape(4, 5, 7, 3)
    ours = swap_file_axes(file_array)
    assert ours.shape == (7, 5, 4, 3)
    assert swap_file_sizes(file_array.shape) == (7, 5, 4)
    assert swap_file_sizes((0.5, 1.5, 2.5, 1.0)) == (2.5, 1.5, 0.5)  # pixdim of a 4-D file: its time step dropped
    affine = grid_affine_from_ras(ras)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), swap_file_sizes((0.5, 1.5, 2.5)))
    for i, j, k in [(0, 0, 0), (3, 1, 6), (2, 4, 5)]:
        np.testing.assert_array_equal(ours[k, j, i], file_array[i, j, k])
        r, a, s = ras[:3, :3] @ [i, j, k] + ras[:3, 3]
        np.testing.assert_allclose(affine[:3, :3] @ [k, j, i] + affine[:3, 3], [s, a, r])
    np.testing.assert_array_equal(swap_file_axes(ours), file_array)  # its own inverse, as nifti_affine is
    np.testing.assert_allclose(nifti_affine(Grid(ours.shape[:3], affine, "millimeter")), ras)


def test_swap_file_axes_keeps_a_dask_array_lazy() -> None:
    import dask.array as da

    file_array = np.arange(3 * 4 * 6, dtype=np.int16).reshape(3, 4, 6)
    lazy = swap_file_axes(da.from_array(file_array, chunks=(2, 3, 4)))
    assert isinstance(lazy, da.Array) and lazy.shape == (6, 4, 3)
    np.testing.assert_array_equal(lazy.compute(), file_array.transpose(2, 1, 0))


def test_lps_nrrd_becomes_ras() -> None:
    directions = np.array([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 4.0]])  # rows: step per file axis
    origin = np.array([1.0, 2.0, 3.0])
    ras = ras_affine_from_nrrd("left-posterior-superior", directions, origin)
    # index (1, 0, 0) moves +2 toward left, i.e. -2 in R; (0, 1, 0) moves +3 posterior, i.e. -3 in A
    np.testing.assert_allclose(ras[:3, :3] @ [1, 0, 0], [-2, 0, 0])
    np.testing.assert_allclose(ras[:3, :3] @ [0, 1, 0], [0, -3, 0])
    np.testing.assert_allclose(ras[:3, :3] @ [0, 0, 1], [0, 0, 4])
    np.testing.assert_allclose(ras[:3, 3], [-1, -2, 3])
    ours = grid_affine_from_ras(ras)
    # our axis 0 is file axis k (superior), world component 0 is S
    np.testing.assert_allclose(ours[:3, :3], [[4, 0, 0], [0, -3, 0], [0, 0, -2]])


def test_nrrd_space_directions_rows_are_the_file_axes_steps() -> None:
    """A header whose file axes are permuted against the space's (axial slices stored sagittally, anisotropic): row d
    of 'space directions' is the step of file axis d, so a transpose of the matrix would swap the axes' lengths."""
    directions = np.array([[0, 0, 2.0], [3.0, 0, 0], [0, 0.5, 0]])  # axis 0 -> +S 2 mm, 1 -> +L 3 mm, 2 -> +P 0.5 mm
    ras = ras_affine_from_nrrd("lps", directions, np.zeros(3))
    np.testing.assert_allclose(ras[:3, :3] @ [1, 0, 0], [0, 0, 2])
    np.testing.assert_allclose(ras[:3, :3] @ [0, 1, 0], [-3, 0, 0])
    np.testing.assert_allclose(ras[:3, :3] @ [0, 0, 1], [0, -0.5, 0])


def test_unknown_nrrd_space_is_rejected() -> None:
    with pytest.raises(SpatialError, match="unsupported NRRD space"):
        ras_affine_from_nrrd("scanner-xyz", np.eye(3), np.zeros(3))


def test_nifti_forms_gap_in_voxels() -> None:
    """The same matrix: 0; an origin 1.5 mm off with 0.5 mm voxels: 3 voxels; a shear: its reach at the far corner."""
    ras = _rotated_ras_affine()
    assert nifti_forms_gap(ras, ras, (7, 9, 11)) == pytest.approx(0.0)
    moved = ras.copy()
    moved[:3, 3] += [1.5, 0.0, 0.0]
    assert nifti_forms_gap(ras, moved, (7, 9, 11)) == pytest.approx(3.0)
    sheared = ras.copy()
    sheared[0, 1] += 0.1  # R moves 0.1 mm per j step: 0.8 mm at j = 8
    assert nifti_forms_gap(ras, sheared, (7, 9, 11)) == pytest.approx(0.8 / 0.5)
