"""Multiscale pyramids: world-isotropic factors, block means, level grids, level choice."""

from __future__ import annotations

import numpy as np

from patchmorph_core.source import (
    BoxCache,
    Level,
    MultiscaleImage,
    cache_box,
    downsample,
    downsampled_grid,
    pyramid_factors,
)
from patchmorph_core.spatial import Grid, random_rotation


def test_pyramid_factors_make_anisotropic_isotropic_first() -> None:
    # z is 4x coarser than y/x: y and x are halved twice before z is touched (z never shrinks in
    # ome-zarr-py's integer scale factors, which is why we do not use them)
    factors = pyramid_factors((2.0, 0.5, 0.5), (40, 200, 200), 5)
    assert factors == [(1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]


def test_pyramid_stops_when_too_small() -> None:
    assert len(pyramid_factors((1.0, 1.0, 1.0), (20, 20, 20), 6)) == 2


def test_block_mean_hand_computed() -> None:
    arr = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    out = downsample(arr, (1, 2, 2))
    assert out.shape == (2, 2, 2)
    # block (0, rows 0-1, cols 0-1): values 0, 1, 3, 4 -> 2.0; last column block is padded by edge
    assert out[0, 0, 0] == 2.0
    assert out[0, 0, 1] == np.mean([2, 2, 5, 5])
    labels = np.arange(27).reshape(3, 3, 3)
    assert downsample(labels, (2, 2, 2), labels=True).shape == (2, 2, 2)


def test_downsampled_grid_voxel_centres_on_rotated_grid() -> None:
    rot = random_rotation(np.random.default_rng(0), 40.0)
    grid = Grid.from_spacing((9, 14, 21), (3.0, 1.0, 0.5), origin=(1.0, 2.0, 3.0), direction=rot)
    coarse = downsampled_grid(grid, (1, 2, 4), (9, 7, 6))
    # coarse voxel (i, j, k) is the mean of fine voxels i, 2j..2j+1, 4k..4k+3: centre at fine index
    np.testing.assert_allclose(coarse.index_to_world([2, 3, 1]), grid.index_to_world([2, 6.5, 5.5]), atol=1e-12)
    np.testing.assert_allclose(coarse.spacing, [3.0, 2.0, 2.0])


def test_level_for_spacing_picks_coarsest_not_coarser_than_target() -> None:
    grid = Grid.from_spacing((32, 64, 64), (2.0, 0.5, 0.5))
    image = MultiscaleImage.from_array(np.zeros(grid.shape, np.float32), grid, n_levels=4)
    spacings = [float(lv.grid.spacing.max()) for lv in image.levels]
    assert spacings == [2.0, 2.0, 2.0, 4.0]
    assert image.level_for_spacing(3.0).grid.spacing.max() == 2.0
    assert image.level_for_spacing(4.5) is image.levels[3]
    assert image.level_for_spacing(0.1) is image.levels[0]
    # a linear ramp along world z survives every level: mean of each block = value at block centre
    ramp = np.broadcast_to(np.arange(32, dtype=np.float32)[:, None, None], grid.shape)
    pyramid = MultiscaleImage.from_array(np.ascontiguousarray(ramp), grid, n_levels=4)
    pts = np.array([[20.0, 16.0, 16.0]])
    for level in pyramid.levels:
        np.testing.assert_allclose(pyramid.sample(pts, float(level.grid.spacing.max())), [10.0], atol=1e-4)


class _CountingArray:
    """An array-like that counts the boxes read from it."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.reads = 0

    def __getitem__(self, box: tuple[slice, ...]) -> np.ndarray:
        self.reads += 1
        return self.array[box]


def test_box_cache_serves_inside_reads_from_memory_and_falls_back_outside() -> None:
    data = np.arange(3 * 10 * 12 * 8, dtype=np.float32).reshape(3, 10, 12, 8)
    store = _CountingArray(data)
    cached = BoxCache(store, (slice(None), slice(2, 7), slice(0, 6), slice(3, 8)))
    assert store.reads == 1 and cached.shape == data.shape and cached.dtype == data.dtype
    inside = (slice(None), slice(3, 5), slice(1, 6), slice(3, 8))
    np.testing.assert_array_equal(cached[inside], data[inside])
    assert store.reads == 1  # served from the box
    outside = (slice(None), slice(6, 9), slice(0, 2), slice(0, 4))
    np.testing.assert_array_equal(cached[outside], data[outside])
    assert store.reads == 2  # read from the store: same values either way
    assert cache_box(data, outside, 1 << 20) is data  # numpy is already in memory
    assert cache_box(store, outside, 10) is store  # over the byte limit: not cached


def test_cached_image_samples_identically_and_reads_once() -> None:
    grid = Grid.from_spacing((20, 24, 18), (1.5, 1.0, 1.0), unit="millimeter")
    volume = np.random.default_rng(0).random(grid.shape).astype(np.float32)
    store = _CountingArray(volume)
    image = MultiscaleImage((Level(store, grid),))
    low, high = grid.index_to_world([4, 5, 3]), grid.index_to_world([12, 15, 11])
    cached = image.cached(low, high, 1.5, 1 << 20)
    points = np.random.default_rng(1).uniform(low, high, (200, 3))
    reads = store.reads
    for chunk in np.array_split(points, 10):
        np.testing.assert_array_equal(cached.sample(chunk, 1.5), image.sample(chunk, 1.5))
    assert store.reads - reads == 10  # only the uncached image read; the cached one never did
