"""Patches in world space from multiscale array-likes, intensity normalisation and the initial alignment.

A patch is a :class:`~patchmorph_core.spatial.Grid` (``P³`` voxels, any centre, spacing and rotation,
see :func:`~patchmorph_core.spatial.patch_grid`). The fixed patch samples the fixed image at the patch
points; the moving patch samples the moving image at ``transform(points)``. Each read takes only the
bounding box the points need, from the pyramid level that matches the patch spacing.

Initial alignment (choice): registration starts from matching the centres of intensity mass of the two
images' tissue (:func:`initial_translation`), which removes the large offsets between native spaces;
rotations and scaling are left to the affine head of the coarse stage.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from patchmorph_core.displacement import Displacement, FieldDisplacement
from patchmorph_core.source import Level, MultiscaleImage
from patchmorph_core.spatial import (
    ALIGN_CORNERS,
    Grid,
    index_rows_to_normalized,
    integer_offset,
    read_box,
    row_box,
)

PointMap = Callable[[np.ndarray], np.ndarray]
"""Maps ``(N, 3)`` world points ``(z, y, x)`` to ``(N, 3)`` world points."""

COARSE_VOXELS = 48**3
"""Statistics (intensity range, tissue mass) are computed on the coarsest level with at least this many voxels."""


def sample_patch(
    image: MultiscaleImage, patch: Grid, transform: PointMap | None = None, order: int = 1
) -> np.ndarray:
    """Sample ``image`` at ``transform(p)`` for every voxel centre ``p`` of ``patch``.

    Args:
        image: pyramid in the same unit and world frame as ``patch``.
        patch: the patch grid (usually from :func:`~patchmorph_core.spatial.patch_grid`).
        transform: world→world map applied to the patch points (None: identity, the fixed patch).
        order: 0 nearest (labels), 1 linear.

    Returns:
        ``patch.shape`` float32 samples (0 outside the image), read from the level whose spacing
        matches the patch spacing.
    """
    spacing = float(patch.spacing.max())
    if transform is None and order == 1:
        return sample_grid(image.level_for_spacing(spacing), patch)
    points = patch.points().reshape(-1, 3)
    if transform is not None:
        points = np.asarray(transform(points), dtype=np.float64)
    if order == 1:
        return sample_points(image.level_for_spacing(spacing), points).reshape(patch.shape)
    values = image.sample(points, spacing, order=order)
    return values.reshape(patch.shape).astype(np.float32, copy=False)


def sample_points(level: Level, points: np.ndarray) -> np.ndarray:
    """Trilinear samples (float32, 0 outside) of one level at ``(N, 3)`` world points, reading one box.

    Same values as :func:`~patchmorph_core.spatial.resample` with ``order=1``.
    """
    rows = level.grid.world_to_index_rows(points)
    box = row_box(rows, level.grid.shape)
    if box is None:
        return np.zeros(rows.shape[1], dtype=np.float32)
    block = read_box(level.array, box).astype(np.float32, copy=False)
    rows -= np.array([[s.start] for s in box], dtype=np.float64)
    return ndimage.map_coordinates(block, rows, order=1, mode="constant", cval=0.0, prefilter=False)


def sample_grid(level: Level, target: Grid) -> np.ndarray:
    """Trilinear samples (float32, 0 outside) of one level at every voxel centre of ``target``.

    Target index → level index is affine, so scipy's ``affine_transform`` interpolates without
    building coordinate arrays; the box read is the one the target's corners span. Same values as
    :func:`sample_points` at ``target.points()`` up to rounding.

    Returns:
        ``target.shape`` float32 array.
    """
    matrix = level.grid.index_map(target)
    corners = np.array(np.meshgrid(*[[0.0, n - 1.0] for n in target.shape], indexing="ij")).reshape(3, -1)
    box = row_box(matrix[:3, :3] @ corners + matrix[:3, 3:4], level.grid.shape)
    if box is None:
        return np.zeros(target.shape, dtype=np.float32)
    block = read_box(level.array, box).astype(np.float32, copy=False)
    offset = matrix[:3, 3] - np.array([s.start for s in box], dtype=np.float64)
    return ndimage.affine_transform(
        block, matrix[:3, :3], offset=offset, output_shape=target.shape, order=1,
        mode="constant", cval=0.0, prefilter=False,
    )  # fmt: skip


def _field_samples(block: np.ndarray, rows: np.ndarray, start: tuple[int, ...]) -> np.ndarray:
    """Trilinear samples of a ``(3, Z, Y, X)`` field box whose voxel 0 is index ``start`` at ``(3, N)``
    indices inside it: ``(N, 3)``.

    One float64 ``grid_sample`` call interpolates the three components together (the same values as
    three ``map_coordinates`` calls up to float64 rounding, about 3× faster); indices must already be
    clamped to the box (the field's constant extension).
    """
    volume = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float64))[None]
    coords = torch.from_numpy(index_rows_to_normalized(rows, block.shape[1:], start))
    out = F.grid_sample(
        volume, coords.reshape(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border",
        align_corners=ALIGN_CORNERS,
    )  # fmt: skip
    return out.reshape(3, -1).T.numpy()


def displacement_at(displacement: Displacement, points: np.ndarray) -> np.ndarray:
    """``(N, 3)`` displacement at ``(N, 3)`` world points.

    A :class:`~patchmorph_core.displacement.FieldDisplacement` is sampled here by one float64 ``grid_sample`` of
    all three components (the same trilinear, constant-extended values as its ``__call__`` up to float rounding,
    faster, but a point's last bits depend on the box read for the batch, so the samplers whose
    points must not depend on their neighbours, the inverse and the checks, call the field itself); any other
    displacement is called as it is.
    """
    if not isinstance(displacement, FieldDisplacement):
        return displacement(points)
    grid = displacement.grid
    rows = grid.world_to_index_rows(points)
    np.clip(rows, 0.0, np.asarray(grid.shape, dtype=np.float64)[:, None] - 1.0, out=rows)
    box = row_box(rows, grid.shape)
    if box is None:
        return np.zeros((rows.shape[1], 3), dtype=np.float64)
    block = read_box(displacement.field, (slice(None), *box)).astype(np.float32, copy=False)
    return _field_samples(block, rows, tuple(s.start for s in box))


# -- whole boxes of a grid at once (the block path of inference) -------------------------------------------
# Component-major ``(3, Z, Y, X)`` indices throughout: per-axis reductions and arithmetic run on contiguous
# arrays (an ``(N, 3)`` layout makes numpy's and torch's per-axis operations several times slower on CPU).
def affine_indices(matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``(3, Z, Y, X)`` float32 values of ``matrix @ (i, 1)`` at every index ``i`` of a grid of ``shape``.

    ``matrix`` is a ``(4, 4)`` index→index map (e.g. ``source.index_map(target)``: target voxel → source
    voxel); summed axis by axis, like :meth:`~patchmorph_core.spatial.Grid.points`.
    """
    out = np.empty((3, *shape), dtype=np.float32)
    for c in range(3):
        out[c] = matrix[c, 3]
        for axis, n in enumerate(shape):
            steps = (np.arange(n, dtype=np.float64) * matrix[c, axis]).astype(np.float32)
            out[c] += steps.reshape([n if a == axis else 1 for a in range(3)])
    return out


def sample_indices(array: object, index: np.ndarray, padding: str = "zeros") -> np.ndarray:
    """Trilinear samples of a ``(Z, Y, X)`` or ``(C, Z, Y, X)`` array-like at continuous indices.

    One box read (the box the indices need, plus one voxel) and one float32 ``grid_sample`` call. Indices
    are rounded to float32 (relative 6e-8: 6e-4 voxels at index 10,000), the same values as scipy's
    ``map_coordinates`` otherwise (tested).

    Args:
        array: numpy, zarr, dask or TensorStore array, indexed ``([c,] z, y, x)``.
        index: ``(3, ...)`` continuous ``(z, y, x)`` indices into ``array``'s last three axes, component-major.
        padding: ``"zeros"``: 0 at indices outside ``[0, n − 1]`` on any axis (as :func:`sample_points`,
            scipy's ``constant`` mode); ``"border"``: indices clamped to the array (constant extension, as
            :class:`~patchmorph_core.displacement.FieldDisplacement`).

    Returns:
        ``(...)`` float32 samples, or ``(C, ...)`` for a ``(C, Z, Y, X)`` array.
    """
    dims = np.shape(array)
    shape, lead = tuple(int(n) for n in dims[-3:]), index.shape[1:]
    rows = np.asarray(index, dtype=np.float32).reshape(3, -1)
    inside = None
    if padding == "border":
        rows = np.stack([np.clip(rows[k], 0.0, shape[k] - 1.0) for k in range(3)])
    else:
        inside = (rows[0] >= 0.0) & (rows[0] <= shape[0] - 1.0)
        for k in (1, 2):
            inside &= (rows[k] >= 0.0) & (rows[k] <= shape[k] - 1.0)
    box = row_box(rows, shape)
    channels = (int(dims[0]),) if len(dims) == 4 else ()
    if box is None:
        return np.zeros((*channels, *lead), dtype=np.float32)
    block = read_box(array, (slice(None),) * len(channels) + box).astype(np.float32, copy=False)
    coords = torch.from_numpy(index_rows_to_normalized(rows, block.shape[-3:], tuple(s.start for s in box)))
    volume = torch.from_numpy(np.ascontiguousarray(block)).reshape(1, -1, *block.shape[-3:])
    out = F.grid_sample(
        volume, coords.reshape(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border",
        align_corners=ALIGN_CORNERS,
    ).reshape(volume.shape[1], -1).numpy()  # fmt: skip
    if inside is not None:
        out *= inside
    return out.reshape(*channels, *lead)


def sample_affine(array: object, matrix: np.ndarray, shape: tuple[int, ...], padding: str = "zeros") -> np.ndarray:
    """Trilinear samples of a ``(Z, Y, X)`` or ``(C, Z, Y, X)`` array-like at ``matrix @ (i, 1)`` for every
    index ``i`` of a grid of ``shape``: ``sample_indices(array, affine_indices(matrix, shape), padding)``.

    When the map is a whole-voxel translation (:func:`~patchmorph_core.spatial.integer_offset`; e.g. a
    box of the grid the array lives on) every trilinear weight is 0 or 1: the samples are the box itself,
    read without interpolation (a float32 copy; the same values up to the float32 rounding of :func:`sample_indices`'
    indices). Parts of the box beyond the array are filled as ``padding`` says: 0, or the nearest edge
    value (``"border"``).

    Returns:
        ``shape`` float32 samples, or ``(C, *shape)``.
    """
    dims = np.shape(array)
    offset = integer_offset(matrix)
    if offset is not None:
        size = np.asarray(dims[-3:], dtype=np.int64)
        lo = np.clip(offset, 0, size)
        hi = np.clip(offset + np.asarray(shape, dtype=np.int64), 0, size)
        if np.all(hi > lo):  # else the box misses the array: interpolate (padding decides the values)
            lead = (slice(None),) * (len(dims) - 3)
            box = read_box(array, lead + tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)))
            pad = [(0, 0)] * len(lead) + [
                (int(a - o), int(o + n - b)) for a, b, o, n in zip(lo, hi, offset, shape, strict=True)
            ]
            if not any(width != (0, 0) for width in pad):
                return np.array(box, dtype=np.float32)  # always a copy: the caller may write into it
            mode = "edge" if padding == "border" else "constant"
            return np.pad(np.asarray(box, dtype=np.float32), pad, mode=mode)
    return sample_indices(array, affine_indices(matrix, shape), padding)


def axis_weights(scale: float, offset: float, n_out: int, n_in: int, padding: str) -> tuple[np.ndarray, slice] | None:
    """Linear-interpolation weights along one axis: the ``(n_out, k)`` float32 matrix that takes the ``k`` input
    samples ``box`` of an axis of ``n_in`` samples to its values at the positions ``scale · i + offset``
    (``i < n_out``), and ``box``; None when every position lies outside (``"zeros"``).

    ``padding`` as :func:`sample_indices`: ``"zeros"`` gives a zero row at positions outside ``[0, n_in − 1]``,
    ``"border"`` clamps them into it. Positions and weights are formed in float64.
    """
    position = scale * np.arange(n_out, dtype=np.float64) + offset
    if padding == "border":
        position = np.clip(position, 0.0, n_in - 1.0)
    inside = (position >= 0.0) & (position <= n_in - 1.0)
    if not inside.any():
        return None
    low = np.minimum(np.floor(position), n_in - 1.0).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    first, last = int(low[inside].min()), int(high[inside].max())
    rows = np.flatnonzero(inside)
    weight = (position - low)[inside]
    matrix = np.zeros((n_out, last - first + 1), dtype=np.float64)
    np.add.at(matrix, (rows, low[inside] - first), 1.0 - weight)
    np.add.at(matrix, (rows, high[inside] - first), weight)
    return matrix.astype(np.float32), slice(first, last + 1)


def sample_separable(array: object, matrix: np.ndarray, shape: tuple[int, ...], padding: str = "zeros") -> np.ndarray:
    """:func:`sample_affine` for a map that scales and shifts each axis on its own (``matrix[:3, :3]``
    diagonal, e.g. between two grids with the same axes): trilinear interpolation is then one linear
    interpolation per axis, done as three small matrix products over the box the samples need (no index
    arrays, no gathers; several times cheaper than :func:`sample_indices` when the output is finer than
    ``array``, as a field upsampled to an image). The same values up to float32 rounding.

    Args:
        array: ``(Z, Y, X)`` or ``(C, Z, Y, X)`` array-like.
        matrix: ``(4, 4)`` output index → ``array`` index map with a diagonal linear part.
        shape: output ``(Z, Y, X)``.
        padding: ``"zeros"`` or ``"border"``, as :func:`sample_indices`.

    Returns:
        ``shape`` float32 samples, or ``(C, *shape)``.
    """
    dims = np.shape(array)
    lead = tuple(int(n) for n in dims[:-3])
    axes = [axis_weights(matrix[k, k], matrix[k, 3], int(shape[k]), int(dims[len(lead) + k]), padding) for k in range(3)]
    if any(axis is None for axis in axes):
        return np.zeros((*lead, *shape), dtype=np.float32)
    (wz, bz), (wy, by), (wx, bx) = axes  # type: ignore[misc]
    block = read_box(array, (slice(None),) * len(lead) + (bz, by, bx)).astype(np.float32, copy=False)
    values = torch.from_numpy(np.ascontiguousarray(block)).reshape(-1, *block.shape[-3:])
    values = values @ torch.from_numpy(wx).T  # (C, bz, by, X)
    values = torch.from_numpy(wy) @ values  # (C, bz, Y, X)
    values = torch.from_numpy(wz) @ values.reshape(values.shape[0], values.shape[1], -1)  # (C, Z, Y·X)
    return values.reshape(*lead, *shape).numpy()


def is_separable(matrix: np.ndarray) -> bool:
    """Whether an index→index ``matrix`` (``(4, 4)`` or ``(3, 4)``) scales and shifts each axis on its own
    (diagonal linear part)."""
    linear = np.asarray(matrix, dtype=np.float64)[:3, :3]
    return bool(np.all(linear[~np.eye(3, dtype=bool)] == 0.0))


def shifted_indices(target: Grid, source: Grid, shift: np.ndarray) -> np.ndarray:
    """``(3, Z, Y, X)`` float32 indices on ``source`` of ``x + shift(x)`` at every voxel centre ``x`` of
    ``target`` (both grids in one world frame and unit).

    Args:
        target: the grid of the points ``x``.
        source: the grid whose indices are returned.
        shift: ``(3, Z, Y, X)`` world displacement at ``target``'s voxel centres (components ``(z, y, x)``).
    """
    out = affine_indices(source.index_map(target), target.shape)
    to_index = source.inverse_affine[:3, :3]  # world displacement -> source index displacement
    for c in range(3):
        for k in range(3):
            if to_index[c, k] != 0.0:
                out[c] += np.float32(to_index[c, k]) * shift[k]
    return out


def _displacement_on(displacement: Displacement, points: np.ndarray) -> np.ndarray:
    """``(3, Z, Y, X)`` float32 values of a displacement called at ``(Z, Y, X, 3)`` world points."""
    values = np.asarray(displacement(points.reshape(-1, 3)), dtype=np.float32)
    return np.ascontiguousarray(values.T).reshape(3, *points.shape[:-1])


def displacement_after(prior: Displacement, target: Grid, shift: np.ndarray) -> np.ndarray:
    """``prior(x + shift(x))`` at every voxel centre ``x`` of ``target``: ``(3, Z, Y, X)`` float32.

    A :class:`~patchmorph_core.displacement.FieldDisplacement` is sampled at :func:`shifted_indices` by
    :func:`sample_indices` (constant extension outside the field, as its ``__call__``); any other
    displacement is called at the float64 world points.
    """
    if isinstance(prior, FieldDisplacement):
        return sample_indices(prior.field, shifted_indices(target, prior.grid, shift), padding="border")
    return _displacement_on(prior, target.points() + np.moveaxis(shift, 0, -1))


def mapped_indices(prior: Displacement, target: Grid, source: Grid) -> np.ndarray:
    """``(3, Z, Y, X)`` float32 indices on ``source`` of ``x + prior(x)`` at every voxel centre ``x`` of
    ``target`` (the three grids share one world frame and unit).

    A :class:`~patchmorph_core.displacement.FieldDisplacement` prior is sampled by :func:`sample_affine`
    (target voxel → field voxel is affine; constant extension outside the field; a plain box read when
    ``target`` is a box of the field's own grid, as in the refinement passes); any other displacement is
    evaluated at the world points.
    """
    if isinstance(prior, FieldDisplacement):
        disp = sample_affine(prior.field, prior.grid.index_map(target), target.shape, padding="border")
    else:
        disp = _displacement_on(prior, target.points())
    return shifted_indices(target, source, disp)


def coarse_level(image: MultiscaleImage, min_voxels: int = COARSE_VOXELS) -> Level:
    """The coarsest pyramid level that still has ``min_voxels`` voxels (the finest if none has)."""
    for level in reversed(image.levels):
        if int(np.prod(level.grid.shape)) >= min_voxels:
            return level
    return image.levels[0]


def _coarse_values(image: MultiscaleImage) -> tuple[np.ndarray, Grid]:
    level = coarse_level(image)
    values = read_box(level.array, tuple(slice(0, n) for n in level.grid.shape)).astype(np.float32)
    return values, level.grid


def intensity_range(
    image: MultiscaleImage, percentiles: tuple[float, float] = (0.5, 99.5)
) -> tuple[float, float]:
    """Robust intensity range ``(lo, hi)`` from percentiles of a coarse level (finite values only)."""
    values, _ = _coarse_values(image)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, percentiles))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def normalize(patch: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map intensities to 0..1: ``clip((patch - lo) / (hi - lo), 0, 1)`` as float32 of ``patch``'s shape (NaN → 0);
    ``lo`` and ``hi`` in the image's intensity units."""
    out = (np.asarray(patch, dtype=np.float32) - lo) / max(hi - lo, 1e-12)
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0).astype(np.float32, copy=False)


def tissue_weights(image: MultiscaleImage, threshold: float = 0.1) -> tuple[np.ndarray, Grid]:
    """Normalised intensities of a coarse level (:func:`coarse_level`) with values below ``threshold`` set to 0,
    and its grid.

    Returns:
        ``(weights, grid)``: ``(Z, Y, X)`` float32 weights in ``[0, 1]`` (dimensionless; ``threshold`` on the same
        0..1 scale) on that level's grid.
    """
    values, grid = _coarse_values(image)
    lo, hi = intensity_range(image)
    weights = normalize(values, lo, hi)
    weights[weights < threshold] = 0.0
    return weights, grid


def tissue_mask(
    image: MultiscaleImage,
    grid: Grid,
    threshold: float = 0.1,
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """``grid.shape`` bool: where ``image`` (the level for ``grid``, trilinear) is tissue, i.e. its normalised
    intensity (:func:`intensity_range`, or ``value_range`` when the caller has it already) is at least
    ``threshold`` — the same rule as :func:`tissue_weights`, on any grid (e.g. a field's, for folds and inverse
    errors counted inside the tissue only)."""
    level = image.with_unit(grid.unit).level_for_spacing(float(grid.spacing.min()))
    values = sample_affine(level.array, level.grid.index_map(grid), tuple(grid.shape))
    return normalize(values, *(value_range or intensity_range(image))) >= threshold


def tissue_center(image: MultiscaleImage) -> np.ndarray:
    """``(3,)`` world centre of intensity mass of the image's tissue (grid centre for an empty image)."""
    weights, grid = tissue_weights(image)
    total = float(weights.sum())
    if total <= 0:
        return grid.center
    # per axis, the mean index under the weights summed over the other two axes (no (N, 3) index array)
    mean_index = [
        float(np.dot(weights.sum(axis=tuple(a for a in range(3) if a != k), dtype=np.float64), np.arange(n))) / total
        for k, n in enumerate(grid.shape)
    ]
    return grid.index_to_world(np.asarray(mean_index))


def tissue_bounds(image: MultiscaleImage) -> tuple[np.ndarray, np.ndarray]:
    """World axis-aligned box ``(low, high)`` (each ``(3,)``) of the tissue voxels of a coarse level.

    The box of the tissue voxels' own world extents (each voxel centre ± its half-diagonal projected on the world
    axes), not the world box of their index box's corners: on a grid rotated against the world axes the latter
    grows with the rotation (twice: the tissue's index box, then that box's world box), and every size set from
    it with it (the initial affine's fit grid, the cascade's patch extents). On an axis-aligned grid both are the
    same box."""
    weights, grid = tissue_weights(image)
    index = np.argwhere(weights > 0)
    if index.size == 0:
        return grid.world_bounds()
    world = grid.index_to_world(index)
    half = 0.5 * np.abs(grid.linear).sum(axis=1)
    return world.min(axis=0) - half, world.max(axis=0) + half


def initial_translation(fixed: MultiscaleImage, moving: MultiscaleImage) -> np.ndarray:
    """Translation ``t`` (``(3,)``, world units) that aligns the tissue centres of mass.

    The initial transform maps a fixed world point ``x`` to the moving point ``x + t``;
    both images must be in the same unit.
    """
    return tissue_center(moving) - tissue_center(fixed)
