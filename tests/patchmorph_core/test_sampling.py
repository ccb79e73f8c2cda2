"""World-space patch sampling against scipy on rotated anisotropic grids; normalisation; initial alignment."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from patchmorph_core.displacement import FieldDisplacement, TranslationDisplacement
from patchmorph_core.sampling import (
    affine_indices,
    displacement_at,
    initial_translation,
    intensity_range,
    is_separable,
    mapped_indices,
    normalize,
    sample_affine,
    sample_grid,
    sample_indices,
    sample_patch,
    sample_points,
    sample_separable,
    tissue_bounds,
    tissue_center,
)
from patchmorph_core.source import Level, MultiscaleImage
from patchmorph_core.spatial import Grid, integer_offset, patch_grid, random_rotation


class RecordingArray:
    """An array-like that records the boxes read from it."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.reads: list[tuple[slice, ...]] = []

    def __getitem__(self, box: tuple[slice, ...]) -> np.ndarray:
        self.reads.append(box)
        return self.array[box]


def _image_grid() -> Grid:
    rotation = random_rotation(np.random.default_rng(5), 40.0)
    return Grid.from_spacing(
        (30, 40, 50), (2.0, 1.0, 0.5), origin=(3.0, -7.0, 11.0), unit="millimeter", direction=rotation
    )


def _blob_volume(shape: tuple[int, int, int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    return ndimage.gaussian_filter(rng.random(shape).astype(np.float32), 2.0)


def test_sample_patch_matches_scipy_on_rotated_anisotropic_grid() -> None:
    grid = _image_grid()
    volume = _blob_volume(grid.shape)
    recorder = RecordingArray(volume)
    image = MultiscaleImage.from_array(volume, grid, n_levels=1)
    image = MultiscaleImage((type(image.levels[0])(recorder, grid),))
    patch = patch_grid(
        grid.center + 1.0, 12.0, 8, random_rotation(np.random.default_rng(1), 70.0), unit="millimeter"
    )

    def shift(points: np.ndarray) -> np.ndarray:
        return points + np.array([0.7, -1.1, 0.4])

    for transform in (None, shift):
        got = sample_patch(image, patch, transform)
        points = patch.points().reshape(-1, 3)
        points = points if transform is None else shift(points)
        index = grid.world_to_index(points).T
        expected = ndimage.map_coordinates(volume, index, order=1, mode="constant", prefilter=False)
        assert got.shape == (8, 8, 8) and got.dtype == np.float32
        np.testing.assert_allclose(got.ravel(), expected, atol=1e-5)
    # only a bounding box of the points was read, never the whole array
    for box in recorder.reads:
        assert np.prod([s.stop - s.start for s in box]) < volume.size / 4


def test_sample_patch_uses_the_level_matching_the_patch_spacing() -> None:
    grid = Grid.from_spacing((32, 32, 32), (1.0, 1.0, 1.0), unit="millimeter")
    image = MultiscaleImage.from_array(_blob_volume(grid.shape), grid, n_levels=3)
    coarse = image.levels[2]
    patch = patch_grid(grid.center, 32.0, 8)  # spacing 4 mm: the 4 mm level
    expected = ndimage.map_coordinates(
        coarse.array, coarse.grid.world_to_index(patch.points().reshape(-1, 3)).T, order=1, prefilter=False
    )
    np.testing.assert_allclose(sample_patch(image, patch).ravel(), expected, atol=1e-5)


def test_intensity_range_and_normalize() -> None:
    grid = Grid.from_spacing((20, 20, 20), (1.0, 1.0, 1.0))
    volume = np.zeros(grid.shape, np.float32)
    volume[5:15, 5:15, 5:15] = 100.0
    volume[0, 0, 0] = np.nan
    lo, hi = intensity_range(MultiscaleImage.from_array(volume, grid, n_levels=1))
    assert lo == 0.0 and hi == 100.0
    out = normalize(np.array([-5.0, 50.0, 200.0, np.nan]), lo, hi)
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 0.0])


def test_initial_translation_recovers_a_shift_between_differently_gridded_images() -> None:
    shape = (30, 36, 40)
    z, y, x = np.indices(shape)
    blob = ((((z - 12) / 6.0) ** 2 + ((y - 20) / 8.0) ** 2 + ((x - 18) / 9.0) ** 2) < 1).astype(np.float32)
    fixed_grid = Grid.from_spacing(shape, (2.0, 1.0, 0.5), unit="millimeter")
    fixed = MultiscaleImage.from_array(blob, fixed_grid)
    shift = np.array([4.0, -3.0, 2.5])
    # the moving image: same content, other orientation and spacing, moved by `shift` in world
    rotation = random_rotation(np.random.default_rng(2), 90.0)
    moving_grid = Grid.from_spacing((40, 40, 40), (1.0, 1.0, 1.0), unit="millimeter", direction=rotation)
    moving_grid = moving_grid.translated(tissue_center(fixed) + shift - moving_grid.center)
    points = moving_grid.points().reshape(-1, 3) - shift
    content = ndimage.map_coordinates(blob, fixed_grid.world_to_index(points).T, order=1, prefilter=False)
    moving = MultiscaleImage.from_array(content.reshape(40, 40, 40).astype(np.float32), moving_grid)
    np.testing.assert_allclose(initial_translation(fixed, moving), shift, atol=0.5)
    low, high = tissue_bounds(fixed)
    np.testing.assert_allclose(high - low, [12 * 2.0, 16 * 1.0, 18 * 0.5], atol=2.5)


def test_empty_image_centre_is_grid_centre() -> None:
    grid = Grid.from_spacing((8, 8, 8), (1.0, 2.0, 3.0))
    image = MultiscaleImage.from_array(np.zeros(grid.shape, np.float32), grid, n_levels=1)
    np.testing.assert_allclose(tissue_center(image), grid.center)
    assert intensity_range(image) == pytest.approx((0.0, 1.0))


def test_grid_and_point_sampling_agree_with_scipy_at_the_image_border() -> None:
    grid = _image_grid()
    volume = _blob_volume(grid.shape)
    level = Level(volume, grid)
    # a rotated patch half outside the image: interior samples and the zeros beyond the border
    patch = patch_grid(
        grid.index_to_world([2.0, 3.0, 45.0]),
        16.0,
        10,
        random_rotation(np.random.default_rng(3), 60.0),
        unit="millimeter",
    )
    points = patch.points().reshape(-1, 3)
    expected = ndimage.map_coordinates(
        volume, grid.world_to_index(points).T, order=1, mode="constant", prefilter=False
    )
    np.testing.assert_allclose(sample_grid(level, patch).ravel(), expected, atol=1e-5)
    np.testing.assert_allclose(sample_points(level, points), expected, atol=1e-6)
    assert (expected == 0).any() and (expected > 0).any()


def test_displacement_at_equals_the_field_sampler_inside_and_outside() -> None:
    grid = _image_grid().resampled(3.0)
    field = np.random.default_rng(2).normal(size=(3, *grid.shape)).astype(np.float32)
    sampler = FieldDisplacement(field, grid)
    low, high = grid.world_bounds()
    points = np.random.default_rng(4).uniform(low - 5.0, high + 5.0, (500, 3))  # some beyond the grid
    np.testing.assert_allclose(displacement_at(sampler, points), sampler(points), atol=1e-6)
    shift = TranslationDisplacement(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(displacement_at(shift, points), shift(points))


def test_affine_indices_are_the_grid_points_in_another_grid() -> None:
    source = _image_grid()
    target = patch_grid(source.center, 14.0, 7, random_rotation(np.random.default_rng(8), 50.0), unit="millimeter")
    target = Grid(target.shape[:2] + (5,), target.affine, target.unit)  # non-cubic
    index = affine_indices(source.inverse_affine @ target.affine, target.shape)
    assert index.shape == (3, 7, 7, 5) and index.dtype == np.float32
    np.testing.assert_allclose(np.moveaxis(index, 0, -1), source.world_to_index(target.points()), atol=1e-4)


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_sample_indices_matches_scipy_and_reads_one_box(padding: str) -> None:
    grid = _image_grid()
    volume = _blob_volume(grid.shape) + 1.0  # no zeros inside: the border is visible
    rng = np.random.default_rng(6)
    index = rng.uniform(-3.0, np.array(grid.shape) + 2.0, (400, 3)).T  # (3, N), some beyond every face
    index[:, :50] = rng.uniform(10.0, 14.0, (3, 50))  # and a cluster inside
    mode = "constant" if padding == "zeros" else "nearest"
    expected = ndimage.map_coordinates(volume, index, order=1, mode=mode, prefilter=False)
    recorder = RecordingArray(volume)
    got = sample_indices(recorder, index.reshape(3, 20, 20), padding=padding)
    assert got.shape == (20, 20) and len(recorder.reads) == 1
    np.testing.assert_allclose(got.ravel(), expected, atol=1e-5)
    assert (got == 0).any() == (padding == "zeros")
    # a cluster needs only its box; a (C, Z, Y, X) array gives (C, ...)
    recorder = RecordingArray(np.stack([volume, 2.0 * volume, -volume]))
    cluster = index[:, :50].astype(np.float32)
    got = sample_indices(recorder, cluster, padding=padding)
    assert got.shape == (3, 50) and recorder.reads[0][1:] == (slice(9, 16),) * 3
    np.testing.assert_array_equal(cluster, index[:, :50].astype(np.float32))  # the caller's indices stay as given
    np.testing.assert_allclose(got, np.array([[1.0], [2.0], [-1.0]]) * expected[None, :50], atol=1e-5)


def test_mapped_indices_follow_field_and_affine_priors_into_a_rotated_grid() -> None:
    source = _image_grid()
    target = source.resampled(1.7).crop((2, 1, 3), (11, 17, 13))
    coarse = _image_grid().resampled(4.0)
    field = np.random.default_rng(2).normal(0.0, 2.0, size=(3, *coarse.shape)).astype(np.float32)
    own = source.resampled(1.7)  # a field on the grid target is a box of (read, not interpolated)
    own_field = np.random.default_rng(3).normal(0.0, 2.0, size=(3, *own.shape)).astype(np.float32)
    points = target.points().reshape(-1, 3)
    priors = (
        FieldDisplacement(field, coarse),
        FieldDisplacement(own_field, own),
        TranslationDisplacement(np.array([1.5, -2.0, 0.5])),
    )
    for prior in priors:
        got = mapped_indices(prior, target, source)
        expected = source.world_to_index(points + prior(points)).T.reshape(3, *target.shape)
        assert got.shape == (3, *target.shape)
        np.testing.assert_allclose(got, expected, atol=2e-4)


@pytest.mark.parametrize("channels", [(), (3,)])
def test_sample_affine_reads_a_box_of_its_own_grid_without_interpolation(channels: tuple[int, ...]) -> None:
    grid = _image_grid()  # rotated, anisotropic, non-cubic
    volume = _blob_volume(grid.shape) + 1.0
    array = np.stack([volume, 2.0 * volume, -volume]) if channels else volume
    box = grid.crop((2, 3, 1), (9, 15, 12))
    matrix = grid.index_map(box)
    np.testing.assert_array_equal(integer_offset(matrix), [2, 3, 1])
    recorder = RecordingArray(array)
    got = sample_affine(recorder, matrix, box.shape)
    assert got.shape == (*channels, *box.shape) and got.dtype == np.float32
    assert recorder.reads == [(slice(None),) * len(channels) + (slice(2, 9), slice(3, 15), slice(1, 12))]
    np.testing.assert_array_equal(got, array[..., 2:9, 3:15, 1:12])
    got[...] = 0.0  # a copy: the source stays as it was
    assert (array[..., 2:9, 3:15, 1:12] != 0).all()
    # the same values as the interpolating path, which the next cases take
    np.testing.assert_allclose(
        sample_indices(array, affine_indices(matrix, box.shape)), array[..., 2:9, 3:15, 1:12], atol=1e-5
    )
    # a box reaching beyond the array (the in-array part is read, the rest padded), one beside it, and a
    # map that is not a whole-voxel translation: scipy's values at the exact (float64) indices
    shape = np.array(grid.shape)
    beyond = grid.crop((-2, 3, 1), (9, shape[1] + 3, 12))
    outside = grid.crop((1, shape[1] + 2, 1), (4, shape[1] + 5, 4))
    for other in (beyond, outside, grid.resampled(1.5).crop((2, 3, 1), (6, 9, 8))):
        matrix = grid.index_map(other)
        index = np.moveaxis(grid.world_to_index(other.points()), -1, 0)
        index = np.where(np.abs(index - np.rint(index)) < 1e-6, np.rint(index), index)  # voxel centres exact
        for padding, mode in (("zeros", "constant"), ("border", "nearest")):
            got = sample_affine(array, matrix, other.shape, padding)
            expected = np.stack(
                [
                    ndimage.map_coordinates(a, index, order=1, mode=mode, prefilter=False)
                    for a in array.reshape(-1, *grid.shape)
                ]
            ).reshape(got.shape)
            np.testing.assert_allclose(got, expected, atol=1e-4)
    recorder = RecordingArray(array)
    sample_affine(recorder, grid.index_map(beyond), beyond.shape, "border")
    assert recorder.reads == [(slice(None),) * len(channels) + (slice(0, 9), slice(3, shape[1]), slice(1, 12))]
    assert integer_offset(grid.index_map(grid.resampled(1.5))) is None
    shifted = grid.index_map(box).copy()
    shifted[0, 3] += 0.25
    assert integer_offset(shifted) is None


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("channels", [(), (3,)])
def test_sample_separable_is_trilinear_on_an_axis_aligned_map(padding: str, channels: tuple[int, ...]) -> None:
    rng = np.random.default_rng(11)
    array = rng.normal(size=(*channels, 9, 13, 7)).astype(np.float32)
    matrix = np.diag([0.31, 0.23, 0.4, 1.0])  # a finer grid (as a field upsampled to an image), anisotropic
    matrix[:3, 3] = (-1.2, 0.6, -0.7)  # reaching past both ends of every axis
    shape = (33, 61, 26)
    assert is_separable(matrix) and not is_separable(np.diag([1.0, 1.0, 1.0, 1.0])[[0, 2, 1, 3]])
    index = affine_indices(matrix, shape).reshape(3, -1).astype(np.float64)
    flat = array.reshape(-1, *array.shape[-3:])
    clamped = np.stack([np.clip(index[k], 0, array.shape[-3 + k] - 1) for k in range(3)])
    expected = np.stack([  # scipy at float64 indices: constant 0 outside, or the border value
        ndimage.map_coordinates(c, clamped if padding == "border" else index, order=1, mode="constant", cval=0.0)
        for c in flat
    ]).reshape(*channels, *shape)  # fmt: skip
    got = sample_separable(array, matrix, shape, padding)
    assert got.shape == (*channels, *shape) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got, sample_affine(array, matrix, shape, padding), atol=1e-5)
    beside = matrix.copy()
    beside[:3, 3] += 50.0  # every point beyond the array
    assert not sample_separable(array, beside, shape, "zeros").any()


def test_tissue_bounds_do_not_grow_on_a_rotated_grid() -> None:
    # one ellipsoid (world semi-axes 12, 16, 9 mm) on an axis-aligned grid and on a grid rotated 25° about an
    # oblique axis: the same world box (the index box's corners' world box grew by a quarter and more)
    def ellipsoid(grid: Grid) -> MultiscaleImage:
        w = grid.points() - np.array([1.0, -2.0, 0.5])
        inside = (w[..., 0] / 12.0) ** 2 + (w[..., 1] / 16.0) ** 2 + (w[..., 2] / 9.0) ** 2 < 1
        return MultiscaleImage.from_array(inside.astype(np.float32), grid, n_levels=1)

    plain = Grid.from_spacing((48, 48, 48), (1.0, 1.0, 1.0), unit="millimeter").translated(-np.full(3, 23.5))
    rotation = Rotation.from_rotvec(np.deg2rad(25.0) * np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8]))
    turned = Grid.from_spacing((48, 48, 48), (1.0, 1.0, 1.0), unit="millimeter", direction=rotation.as_matrix())
    turned = turned.translated(-turned.center)
    low, high = tissue_bounds(ellipsoid(plain))
    np.testing.assert_allclose(high - low, [24.0, 32.0, 18.0], atol=1.01)
    rlow, rhigh = tissue_bounds(ellipsoid(turned))
    np.testing.assert_allclose(rlow, low, atol=1.5)  # within a voxel diagonal
    np.testing.assert_allclose(rhigh, high, atol=1.5)
