"""Warping through displacements (checked against scipy) and fixed-point field inversion."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from patchmorph_core import warping
from patchmorph_core.displacement import (
    FieldDisplacement,
    InverseDisplacement,
    TranslationDisplacement,
    displacement_on_grid,
)
from patchmorph_core.source import Level, MultiscaleImage
from patchmorph_core.spatial import Grid, random_rotation
from patchmorph_core.warping import field_on_grid, invert_field, warp_to_grid


def _grids() -> tuple[Grid, Grid]:
    """A rotated anisotropic moving grid (mm) and a differently rotated, anisotropic target grid (µm)."""
    moving = Grid.from_spacing(
        (12, 15, 10),
        (2.0, 1.0, 1.5),
        origin=(-9.0, -7.0, -6.0),
        unit="millimeter",
        direction=random_rotation(np.random.default_rng(5), 40.0),
    )
    target = Grid.from_spacing(
        (10, 13, 14),
        (1500.0, 1200.0, 900.0),
        origin=(-7000.0, -6000.0, -5000.0),
        unit="micrometer",
        direction=random_rotation(np.random.default_rng(6), 40.0),
    )
    return moving, target


def _scipy_reference(
    array: np.ndarray, moving: Grid, target: Grid, shift: np.ndarray, order: int
) -> np.ndarray:
    """scipy's affine_transform: target index -> world (µm) -> +shift -> mm -> moving index.

    Outside the array: nearest labels extend half a voxel beyond the edge voxel centres (each voxel is a
    cell), linear samples are 0 beyond the edge voxel centres.
    """
    to_world = target.affine.copy()
    shift_matrix = np.eye(4)
    shift_matrix[:3, 3] = shift
    um_to_mm = np.diag([1e-3, 1e-3, 1e-3, 1.0])
    matrix = moving.inverse_affine @ um_to_mm @ shift_matrix @ to_world
    return ndimage.affine_transform(
        array,
        matrix,
        output_shape=target.shape,
        order=order,
        mode="grid-constant" if order == 0 else "constant",
        cval=0.0,
        prefilter=False,
    )


def test_warp_labels_and_image_translation_match_scipy() -> None:
    moving_grid, target = _grids()
    rng = np.random.default_rng(0)
    labels = ndimage.zoom(rng.integers(0, 6, size=(4, 5, 4)), 3, order=0)[:12, :15, :10].astype(np.uint16)
    image = ndimage.gaussian_filter(rng.uniform(size=moving_grid.shape), 1.0).astype(np.float32)
    shift = np.array([700.0, -1300.0, 450.0])  # micrometer
    displacement = TranslationDisplacement(shift)
    warped = warp_to_grid(Level(labels, moving_grid), displacement, target, "nearest")
    expected = _scipy_reference(labels, moving_grid, target, shift, order=0)
    assert warped.dtype == np.uint16
    assert (warped != 0).sum() > 100  # the test covers real overlap
    assert np.array_equal(warped, expected)  # voxel cells: nearest up to half a voxel beyond the edge
    warped_image = warp_to_grid(Level(image, moving_grid), displacement, target, block=333)
    expected_image = _scipy_reference(image, moving_grid, target, shift, order=1)
    inside = ndimage.binary_erosion(expected_image > 0, iterations=1)
    assert np.abs(warped_image - expected_image)[inside].max() < 1e-5


def _label_vote_reference(labels: np.ndarray, moving: Grid, target: Grid, shift: np.ndarray) -> np.ndarray:
    """Label-wise linear interpolation the long way: each label's indicator through scipy's trilinear
    ``affine_transform`` (outside the array: background), then the label of the largest value."""
    ids = np.unique(labels)
    assert ids[0] == 0
    to_world = target.affine.copy()
    shift_matrix = np.eye(4)
    shift_matrix[:3, 3] = shift
    matrix = moving.inverse_affine @ np.diag([1e-3, 1e-3, 1e-3, 1.0]) @ shift_matrix @ to_world
    shares = [
        ndimage.affine_transform((labels == k).astype(np.float64), matrix, output_shape=target.shape, order=1,
                                 mode="grid-constant", cval=float(k == 0), prefilter=False)
        for k in ids
    ]  # fmt: skip
    return ids[np.argmax(np.stack(shares), axis=0)].astype(labels.dtype)


def test_label_vote_is_label_wise_linear_interpolation_on_rotated_anisotropic_grids() -> None:
    moving_grid, target = _grids()
    rng = np.random.default_rng(1)
    labels = ndimage.zoom(rng.integers(0, 6, size=(4, 5, 4)), 3, order=0)[:12, :15, :10].astype(np.uint16)
    shift = np.array([-400.0, 900.0, 250.0])  # micrometer
    displacement = TranslationDisplacement(shift)
    voted = warp_to_grid(Level(labels, moving_grid), displacement, target, "vote", cube=(4, 5, 6))
    nearest = warp_to_grid(Level(labels, moving_grid), displacement, target, "nearest")
    assert voted.dtype == np.uint16
    np.testing.assert_array_equal(voted, _label_vote_reference(labels, moving_grid, target, shift))
    assert (voted != nearest).sum() > 20  # the two differ where neighbours disagree...
    assert (voted != 0).sum() > 300 and (voted == nearest).mean() > 0.8  # ...and agree inside the structures


def test_label_vote_keeps_whole_structures_and_takes_the_larger_share() -> None:
    labels = np.zeros((6, 6, 6), dtype=np.int32)
    labels[:, :, 3:] = 7  # x ≥ 3: structure 7
    rows = np.array([[2.0, 2.0, 2.0, 3.0], [2.0, 2.0, 2.0, 3.0], [2.4, 2.6, 4.0, 5.4]])  # x between voxels
    np.testing.assert_array_equal(warping.vote_labels(labels, rows, 0), [0, 7, 7, 7])
    edge = np.array([[1.0, 1.0], [1.0, 1.0], [5.4, 5.6]])  # beyond the last centre: the outside counts as cval
    np.testing.assert_array_equal(warping.vote_labels(labels, edge, 0), [7, 0])


def test_warp_identity_reads_matching_level() -> None:
    grid = Grid.from_spacing((16, 16, 16), (1.0, 1.0, 1.0), unit="millimeter")
    image = np.arange(16**3, dtype=np.float32).reshape(16, 16, 16)
    pyramid = MultiscaleImage.from_array(image, grid, n_levels=2)
    out = warp_to_grid(pyramid, TranslationDisplacement(np.zeros(3)), grid)
    assert np.allclose(out, image)
    coarse = grid.resampled(2.0)
    out = warp_to_grid(pyramid, TranslationDisplacement(np.zeros(3)), coarse)
    assert np.allclose(out, pyramid.levels[1].array)  # same voxel centres: the coarse level, exactly


def _analytic(points: np.ndarray, amplitude: float) -> np.ndarray:
    """Smooth analytic displacement (mm): sines of the coordinates, largest gradient ≈ amplitude * 2π/40."""
    k = 2 * np.pi / 40.0
    z, y, x = points[..., 0], points[..., 1], points[..., 2]
    return amplitude * np.stack([np.sin(k * y), np.sin(k * x + 1.0), np.cos(k * z)], axis=-1)


def test_invert_field_error_on_analytic_field() -> None:
    grid = Grid.from_spacing((20, 22, 24), (2.0, 2.0, 2.0), origin=(-20.0, -22.0, -24.0), unit="millimeter")
    amplitude = 3.0  # mm; gradient ≈ 0.47, well inside the contraction range
    field = np.moveaxis(_analytic(grid.points(), amplitude), -1, 0).astype(np.float32)
    inner = grid.crop((3, 3, 3), (17, 19, 21))  # stay where y + v(y) remains inside the field grid
    result = invert_field(field, grid, iterations=30, target=inner)
    assert result.max_error < 1e-3  # residual against the sampled field (fixed-point convergence)
    # error against the analytic forward map; dominated by trilinear interpolation of the sampled field
    # (≈ h² k² A / 8 ≈ 0.04 mm here), not by the inversion
    y = inner.points().reshape(-1, 3)
    v = np.moveaxis(result.field, 0, -1).reshape(-1, 3)
    analytic_error = np.linalg.norm(v + _analytic(y + v, amplitude), axis=-1)
    assert analytic_error.max() < 0.05 * grid.spacing.min()
    assert analytic_error.mean() < 0.025 * grid.spacing.min()
    print(
        f"inverse error: residual max {result.max_error:.2e} mm, analytic max {analytic_error.max():.3f} mm, "
        f"mean {analytic_error.mean():.3f} mm (spacing 2 mm)"
    )


def test_inverse_warp_round_trip_labels() -> None:
    grid = Grid.from_spacing((24, 24, 24), (1.0, 1.0, 1.0), origin=(-12.0, -12.0, -12.0), unit="millimeter")
    labels = np.zeros(grid.shape, dtype=np.uint8)
    labels[6:18, 5:15, 8:20] = 1
    labels[8:14, 15:20, 4:12] = 2
    field = np.moveaxis(_analytic(grid.points(), 1.5), -1, 0).astype(np.float32)
    forward = FieldDisplacement(field, grid)
    warped = warp_to_grid(Level(labels, grid), forward, grid, "nearest")
    back = warp_to_grid(Level(warped, grid), InverseDisplacement(forward, 20), grid, "nearest")
    for label in (1, 2):
        a, b = labels == label, back == label
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9
    on_grid = displacement_on_grid(InverseDisplacement(forward, 20), grid)
    whole = invert_field(field, grid, 20)
    assert np.allclose(on_grid, whole.field, atol=1e-5)
    blocked = invert_field(field, grid, 20, block=1000)  # block-wise = whole (the inversion is point-wise)
    assert np.array_equal(blocked.field, whole.field) and blocked.max_error == whole.max_error


def test_field_on_grid_equals_point_wise_on_a_rotated_anisotropic_grid() -> None:
    rotation = random_rotation(np.random.default_rng(7), 30.0)
    fixed = Grid.from_spacing((30, 26, 34), (1.5, 1.0, 0.8), origin=(2.0, -3.0, 1.0), unit="millimeter", direction=rotation)
    field_grid = fixed.resampled(3.0)  # same axes, coarser
    field = np.random.default_rng(8).normal(size=(3, *field_grid.shape)).astype(np.float32)
    sampler = FieldDisplacement(field, field_grid)
    target = fixed.crop((3, 0, 5), (30, 17, 34))  # a chunk, reaching the edges (constant extension)
    expected = sampler(target.points().reshape(-1, 3)).reshape(*target.shape, 3)
    np.testing.assert_allclose(np.moveaxis(field_on_grid(sampler, target), 0, -1), expected, atol=1e-5)
    turned = Grid(target.shape, target.affine @ np.diag([1.0, 1.0, 1.0, 1.0])[[0, 2, 1, 3]], target.unit)
    np.testing.assert_allclose(  # permuted axes: the same float32 interpolation
        np.moveaxis(field_on_grid(sampler, turned), 0, -1),
        sampler(turned.points().reshape(-1, 3)).reshape(*turned.shape, 3),
        atol=1e-5,
    )
    other_unit = FieldDisplacement(field, field_grid.with_unit("micrometer"))  # another unit: point-wise
    assert np.abs(field_on_grid(other_unit, target.with_unit("micrometer")) - field_on_grid(sampler, target)).max() < 1e-5


def test_warp_in_cubes_equals_one_block_and_rounds_integers() -> None:
    grid = Grid.from_spacing((20, 23, 17), (1.0, 1.2, 0.9), unit="millimeter")
    image = (np.random.default_rng(9).random(grid.shape) * 1000).astype(np.float32)
    field_grid = grid.resampled(4.0)
    field = np.random.default_rng(10).normal(scale=1.5, size=(3, *field_grid.shape)).astype(np.float32)
    displacement = FieldDisplacement(field, field_grid)
    whole = warp_to_grid(Level(image, grid), displacement, grid, block=10**6)
    cubes = warp_to_grid(Level(image, grid), displacement, grid, cube=(7, 5, 6))
    np.testing.assert_allclose(cubes, whole, rtol=1e-5, atol=1e-4)  # float32 indices per cube
    as_int = warp_to_grid(Level(image, grid), displacement, grid, dtype=np.uint16, cube=(7, 5, 6))
    assert as_int.dtype == np.uint16
    np.testing.assert_array_equal(as_int, np.clip(np.rint(cubes), 0, 65535).astype(np.uint16))


def test_the_moving_box_in_memory_gives_the_per_cube_values(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = Grid.from_spacing((21, 18, 25), (1.0, 1.3, 0.8), origin=(1.0, -2.0, 0.5), unit="millimeter")
    image = (np.random.default_rng(12).random(grid.shape) * 1000).astype(np.float32)
    field_grid = grid.resampled(3.5)
    field = np.random.default_rng(13).normal(scale=2.0, size=(3, *field_grid.shape)).astype(np.float32)
    displacement = FieldDisplacement(field, field_grid)
    target = grid.crop((3, -2, 4), (19, 15, 29))  # a chunk reaching beyond the image: 0 or cval there
    for cval in (0.0, -5.0):
        held = warp_to_grid(Level(image, grid), displacement, target, cval=cval, cube=(6, 7, 5))
        monkeypatch.setattr(warping, "MOVING_CACHE_BYTES", 0)  # every cube reads what it needs
        per_cube = warp_to_grid(Level(image, grid), displacement, target, cval=cval, cube=(6, 7, 5))
        monkeypatch.undo()
        np.testing.assert_allclose(held, per_cube, atol=1e-2)  # values up to 1000: float32 indices per box
        assert (held == cval).sum() > 50 and (held != cval).sum() > 1000  # both cases are covered
    box = warping.MovingBox.read(Level(image, grid), (slice(2, 9), slice(0, 18), slice(3, 20)))
    rows = np.array([[2.0, 8.0], [-3.0, 17.0], [3.0, 19.0]], dtype=np.float32)
    assert box.holds(rows)  # outside the image counts as held (0 there)
    assert not box.holds(rows + np.float32(0.5))  # z = 8.5 needs voxel 9, beyond the box
