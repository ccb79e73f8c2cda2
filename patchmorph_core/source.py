"""Multiscale images as the algorithm sees them: array-likes with grids, no file formats.

A :class:`MultiscaleImage` is a tuple of :class:`Level` (finest first). Each level's ``array`` is any
array-like indexed ``(z, y, x)`` with basic slicing (numpy, zarr, dask, TensorStore); the pipeline's
OME-Zarr reader builds one from a store, :func:`MultiscaleImage.from_array` builds one in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchmorph_core.spatial import Grid, read_box, resample, world_box


@dataclass(frozen=True)
class Level:
    """One pyramid level: a ``(Z, Y, X)`` array-like and its :class:`Grid`."""

    array: Any
    grid: Grid


@dataclass(frozen=True)
class MultiscaleImage:
    """An image pyramid, finest level first; all levels share one unit and one world frame."""

    levels: tuple[Level, ...]
    name: str = "image"

    @property
    def grid(self) -> Grid:
        """Grid of the finest level."""
        return self.levels[0].grid

    @property
    def unit(self) -> str:
        """Physical unit of every level's world coordinates."""
        return self.levels[0].grid.unit

    def level_for_spacing(self, spacing: float) -> Level:
        """The coarsest level whose largest voxel size is at most ``spacing`` (world units).

        Sampling a patch of spacing ``h`` from that level never skips data (no aliasing) and never
        reads a finer level than needed. Falls back to the finest level.
        """
        chosen = self.levels[0]
        for level in self.levels:
            if float(level.grid.spacing.max()) <= spacing * 1.01:
                chosen = level
        return chosen

    def level_for_grid(self, grid: Grid) -> Level:
        """:meth:`level_for_spacing` of ``grid``'s finest spacing, in ``grid``'s unit: the level to read for
        values on ``grid`` (a warp's target, a field grid)."""
        return self.with_unit(grid.unit).level_for_spacing(float(grid.spacing.min()))

    def sample(self, world: np.ndarray, spacing: float, order: int = 1) -> np.ndarray:
        """Sample at ``(..., 3)`` world points from the level matching ``spacing`` (reads only that box)."""
        level = self.level_for_spacing(spacing)
        return resample(level.array, level.grid, world, order=order)

    def cached(self, low: np.ndarray, high: np.ndarray, spacing: float, max_bytes: int) -> MultiscaleImage:
        """The same image with the level matching ``spacing`` holding the world box ``[low, high]`` in memory.

        Samples stay identical (reads outside the box still go to the store, see :class:`BoxCache`); the
        box is read once instead of once per patch. Levels already in memory are left as they are.

        Args:
            low, high: ``(3,)`` world corners of an axis-aligned box (this image's unit).
            spacing: the sampling spacing that selects the level (as in :meth:`sample`).
            max_bytes: largest box to hold; a larger one is not cached.
        """
        chosen = self.level_for_spacing(spacing)
        box = world_box(chosen.grid, low, high, margin=2)
        levels = tuple(
            Level(cache_box(lv.array, box, max_bytes), lv.grid) if lv is chosen else lv for lv in self.levels
        )
        return MultiscaleImage(levels, self.name)

    @property
    def nbytes(self) -> int:
        """Bytes of every level's array at its stored dtype."""
        return sum(int(np.prod(lv.array.shape)) * np.dtype(lv.array.dtype).itemsize for lv in self.levels)

    def in_memory(self) -> MultiscaleImage:
        """The same image with every level read whole into a NumPy array (a store's chunks are checked as they
        are read; the samples stay the same)."""
        levels = tuple(Level(read_box(lv.array, (slice(None),) * len(lv.array.shape)), lv.grid) for lv in self.levels)
        return MultiscaleImage(levels, self.name)

    def with_unit(self, unit: str) -> MultiscaleImage:
        """The same image with every level's grid expressed in ``unit``."""
        levels = tuple(Level(lv.array, lv.grid.with_unit(unit)) for lv in self.levels)
        return MultiscaleImage(levels, self.name)

    def transformed(self, matrix: np.ndarray) -> MultiscaleImage:
        """The same image moved in world by a 4×4 world→world ``matrix`` (e.g. an initial alignment)."""
        levels = tuple(Level(lv.array, lv.grid.transformed(matrix)) for lv in self.levels)
        return MultiscaleImage(levels, self.name)

    @classmethod
    def from_array(
        cls, array: np.ndarray, grid: Grid, n_levels: int = 4, name: str = "image", labels: bool = False
    ) -> MultiscaleImage:
        """Build an in-memory pyramid by halving the finest spacing until it is isotropic, then all axes.

        Each level halves every axis whose spacing is below twice the current largest spacing, so an
        anisotropic image becomes isotropic in world before it shrinks further (see
        :func:`pyramid_factors`). Intensity images are averaged (anti-aliased); labels take every n-th voxel.

        Args:
            array: ``(Z, Y, X)`` level-0 values on ``grid`` (spacing and world in ``grid.unit``).
            n_levels: at most this many levels, level 0 included.
        """
        levels = [Level(np.asarray(array), grid)]
        for factors in pyramid_factors(grid.spacing, grid.shape, n_levels)[1:]:
            prev = levels[-1]
            down = downsample(prev.array, factors, labels=labels)
            levels.append(Level(down, downsampled_grid(prev.grid, factors, down.shape)))
        return cls(tuple(levels), name)


class BoxCache:
    """An array-like holding one box of ``array`` in memory: reads inside the box are served from it.

    Reads that fall (even partly) outside the box go to ``array`` itself, so the values are always those
    of ``array``; the cache only saves repeated reads and decompression of the same store chunks (e.g. the
    overlapping patches of one block task). Memory: the box.

    Attributes:
        array: the full array-like (numpy, zarr, dask, TensorStore), any rank.
        start: first index of the box per axis.
        data: the box's values (numpy).
    """

    def __init__(self, array: Any, box: tuple[slice, ...]) -> None:
        box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, array.shape, strict=True))
        self.array = array
        self.start = tuple(s.start for s in box)
        self.data = read_box(array, box)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the full array."""
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        """dtype of the full array."""
        return np.dtype(self.array.dtype)

    def _local(self, key: Any) -> tuple[slice, ...] | None:
        """``key`` (a tuple of unit-step slices) in the box's own indices, or None if it leaves the box."""
        if not isinstance(key, tuple) or len(key) != len(self.start):
            return None
        local = []
        for part, first, size, n in zip(key, self.start, self.data.shape, self.shape, strict=True):
            if not isinstance(part, slice):
                return None
            lo, hi, step = part.indices(n)
            if step != 1 or lo < first or hi > first + size:
                return None
            local.append(slice(lo - first, hi - first))
        return tuple(local)

    def __getitem__(self, key: Any) -> Any:
        local = self._local(key)
        return self.data[local] if local is not None else read_box(self.array, key)


def float32_if_small(array: Any, max_bytes: int) -> Any:
    """``array`` read whole into a float32 NumPy array when that takes at most ``max_bytes`` (one decode of each
    stored chunk, shared by everything that reads it afterwards), else ``array`` itself."""
    if int(np.prod(array.shape)) * 4 > max_bytes:
        return array
    return np.ascontiguousarray(read_box(array, (slice(None),) * len(array.shape)), dtype=np.float32)


def cache_box(array: Any, box: tuple[slice, ...] | None, max_bytes: int) -> Any:
    """``array`` wrapped in a :class:`BoxCache` of ``box``, or ``array`` itself when it is already in memory
    (numpy), ``box`` is None or the box would take more than ``max_bytes``.
    """
    if box is None or isinstance(array, np.ndarray):
        return array
    box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, array.shape, strict=True))
    voxels = int(np.prod([s.stop - s.start for s in box]))
    if voxels * np.dtype(array.dtype).itemsize > max_bytes:
        return array
    return BoxCache(array, box)


def pyramid_factors(spacing: Sequence[float], shape: Sequence[int], n_levels: int) -> list[tuple[int, int, int]]:
    """Per-level integer downsampling factors (relative to the previous level) for a world-isotropic pyramid.

    Level 0 has factors ``(1, 1, 1)``. At each further level an axis is halved when its spacing is less
    than ~1.5× the current largest spacing and it still has more than 8 voxels, so fine axes catch up
    with coarse ones (ome-zarr-py's integer scale factors would never downsample z).

    Returns:
        ``n_levels`` tuples ``(fz, fy, fx)`` (fewer when the image becomes too small).
    """
    current = np.asarray(spacing, dtype=np.float64).copy()
    size = np.asarray(shape, dtype=np.int64).copy()
    out: list[tuple[int, int, int]] = [(1, 1, 1)]
    while len(out) < n_levels:
        factors = np.where(current < current.max() / 1.5, 2, 1)
        if np.all(factors == 1):
            factors = np.full(3, 2)
        factors = np.where(size // factors >= 8, factors, 1)
        if np.all(factors == 1):
            break
        current = current * factors
        size = -(-size // factors)
        out.append(tuple(int(f) for f in factors))  # type: ignore[arg-type]
    return out


def downsample(array: np.ndarray, factors: Sequence[int], labels: bool = False) -> np.ndarray:
    """Downsample a ``(Z, Y, X)`` array by integer ``factors``: block mean, or strided pick for labels.

    The output has ``ceil(n / f)`` voxels per axis; a partial edge block is padded by repeating its
    last voxel. Intensity output is float32.
    """
    arr = np.asarray(array)
    if labels:
        return arr[tuple(slice(None, None, f) for f in factors)]
    fz, fy, fx = (int(f) for f in factors)
    pad = [(0, (-n) % f) for n, f in zip(arr.shape, (fz, fy, fx), strict=True)]
    padded = np.pad(arr.astype(np.float32), pad, mode="edge")
    z, y, x = (n // f for n, f in zip(padded.shape, (fz, fy, fx), strict=True))
    return padded.reshape(z, fz, y, fy, x, fx).mean(axis=(1, 3, 5))


def downsampled_grid(grid: Grid, factors: Sequence[int], shape: Sequence[int]) -> Grid:
    """Grid of a level downsampled by ``factors`` whose voxel 0 covers source voxels ``0..f-1``.

    The new voxel centre lies at source index ``(f - 1) / 2``; spacing is multiplied by ``f``.
    """
    f = np.asarray(factors, dtype=np.float64)
    affine = grid.affine.copy()
    affine[:3, :3] = grid.linear * f[None, :]
    affine[:3, 3] = grid.index_to_world((f - 1.0) / 2.0)
    return Grid(tuple(shape), affine, grid.unit)


def source_grid(grid: Grid, factors: Sequence[int], shape: Sequence[int]) -> Grid:
    """The grid of the source a level was made from by :func:`downsampled_grid` (its inverse): ``grid``'s
    spacing divided by ``factors``, voxel 0 at ``(1 - f) / (2 f)`` of ``grid``'s voxels; ``shape`` is the
    source's."""
    f = np.asarray(factors, dtype=np.float64)
    affine = grid.affine.copy()
    affine[:3, :3] = grid.linear / f[None, :]
    affine[:3, 3] = grid.index_to_world((1.0 - f) / (2.0 * f))
    return Grid(tuple(shape), affine, grid.unit)
