"""Spatial conventions: index↔world↔normalised, orientation codes, patch grids, resampling.

Every test uses anisotropic, non-cubic, rotated grids so that a swapped axis or a flipped component
order fails. Expected values are closed-form (trilinear interpolation reproduces linear functions
exactly) or come from scipy.ndimage.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from patchmorph_core.spatial import (
    ALIGN_CORNERS,
    Grid,
    SpatialError,
    anatomical_array_axis,
    anatomical_extent,
    atlas_coordinates_um,
    atlas_index_slice,
    atlas_span_um,
    displaced_positions,
    grid_block_patch,
    grid_block_start,
    grid_box,
    index_box,
    index_rows_to_normalized,
    index_to_normalized,
    lattice_start,
    nearest_orientation_code,
    orientation_code,
    orientation_matrix,
    patch_grid,
    random_rotation,
    resample,
    sample_field,
    sample_torch,
    unit_scale,
    world_box,
)

SHAPE = (11, 17, 23)
SPACING = (2.5, 0.7, 1.3)


def rotated_grid() -> Grid:
    """An anisotropic, non-cubic grid rotated by ~30° about a skew axis and shifted."""
    rotation = random_rotation(np.random.default_rng(3), 35.0)
    return Grid.from_spacing(SHAPE, SPACING, origin=(5.0, -3.0, 12.0), unit="millimeter", direction=rotation)


def linear_volume(grid: Grid, coeff: np.ndarray, offset: float) -> np.ndarray:
    """Values ``coeff · world + offset`` at the grid's voxel centres, ``(Z, Y, X)``."""
    return (grid.points() @ coeff + offset).astype(np.float64)


def inside_points(grid: Grid, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, 3)`` random world points strictly inside the grid's voxel-centre box."""
    index = rng.uniform(0.5, np.asarray(grid.shape) - 1.5, size=(n, 3))
    return grid.index_to_world(index)


def test_index_world_roundtrip_and_columns() -> None:
    grid = rotated_grid()
    index = np.array([[1.0, 2.0, 3.0], [10.0, 16.0, 22.0]])
    world = grid.index_to_world(index)
    np.testing.assert_allclose(grid.world_to_index(world), index, atol=1e-10)
    np.testing.assert_allclose(grid.world_to_index_rows(world), index.T, atol=1e-10)  # component-major
    # one step along array axis k moves by spacing[k] along direction column k
    step = grid.index_to_world(np.array([0.0, 1.0, 0.0])) - grid.origin
    np.testing.assert_allclose(np.linalg.norm(step), SPACING[1])
    np.testing.assert_allclose(grid.spacing, SPACING)
    np.testing.assert_allclose(grid.direction.T @ grid.direction, np.eye(3), atol=1e-12)
    # the world->index matrix is inverted once per grid; the caller gets a copy it may change
    inverse = grid.inverse_affine
    np.testing.assert_allclose(inverse @ grid.affine, np.eye(4), atol=1e-12)
    inverse[:] = 0.0
    np.testing.assert_allclose(grid.world_to_index(world), index, atol=1e-10)
    np.testing.assert_allclose(grid.inverse_affine @ grid.affine, np.eye(4), atol=1e-12)


def test_center_extent_and_resampled_keeps_centre() -> None:
    grid = rotated_grid()
    np.testing.assert_allclose(grid.extent, np.array(SHAPE) * np.array(SPACING))
    coarse = grid.resampled(3.0)
    np.testing.assert_allclose(coarse.center, grid.center, atol=1e-9)
    np.testing.assert_allclose(coarse.spacing, [3.0, 3.0, 3.0])
    assert coarse.shape == tuple(int(np.ceil(e / 3.0 - 1e-6)) for e in grid.extent)
    np.testing.assert_allclose(coarse.direction, grid.direction, atol=1e-12)


def test_crop_keeps_world_positions() -> None:
    grid = rotated_grid()
    sub = grid.crop((2, 3, 4), (7, 9, 20))
    assert sub.shape == (5, 6, 16)
    np.testing.assert_allclose(sub.index_to_world([1.0, 1.0, 1.0]), grid.index_to_world([3.0, 4.0, 5.0]))


def test_every_step_voxels_keep_their_world_positions() -> None:
    """Every 3rd voxel from (1, 0, 2) of a rotated, anisotropic, non-cubic grid: numpy's [start::step] voxels,
    at their world positions."""
    grid = rotated_grid()
    nodes = grid.every(3, (1, 0, 2))
    assert nodes.shape == tuple(len(range(a, n, 3)) for a, n in zip((1, 0, 2), SHAPE, strict=True))
    np.testing.assert_allclose(nodes.points(), grid.points()[1::3, 0::3, 2::3], atol=1e-9)
    np.testing.assert_allclose(nodes.spacing, 3 * grid.spacing)


def test_with_unit_scales_world() -> None:
    grid = rotated_grid()
    micro = grid.with_unit("micrometer")
    np.testing.assert_allclose(micro.index_to_world([1.0, 2.0, 3.0]), 1000 * grid.index_to_world([1.0, 2.0, 3.0]))
    assert unit_scale("micrometer", "millimeter") == pytest.approx(1e-3)


def test_index_to_normalized_corners_and_component_flip() -> None:
    assert ALIGN_CORNERS is True
    index = torch.tensor([[0.0, 0.0, 22.0], [10.0, 16.0, 0.0], [5.0, 8.0, 11.0]], dtype=torch.float64)
    norm = index_to_normalized(index, SHAPE)
    # output is (x, y, z): x from array axis 2, z from array axis 0
    np.testing.assert_allclose(norm[0].numpy(), [1.0, -1.0, -1.0])
    np.testing.assert_allclose(norm[1].numpy(), [-1.0, 1.0, 1.0])
    np.testing.assert_allclose(norm[2].numpy(), [0.0, 0.0, 0.0], atol=1e-12)

    rows = np.random.default_rng(0).uniform(-2.0, 30.0, size=(3, 50))
    expected = index_to_normalized(torch.from_numpy(np.ascontiguousarray(rows.T)), SHAPE).numpy()
    np.testing.assert_allclose(index_rows_to_normalized(rows, SHAPE), expected, atol=1e-12)
    start = (3, -2, 5)  # a box whose voxel 0 is index start: the rows shifted by -start
    shifted = index_to_normalized(torch.from_numpy(np.ascontiguousarray(rows.T - start)), SHAPE).numpy()
    np.testing.assert_allclose(index_rows_to_normalized(rows, SHAPE, start), shifted, atol=1e-12)


def test_grid_block_patch_lands_on_voxels_and_is_recognised() -> None:
    grid = rotated_grid().resampled(1.25)
    left = Grid(grid.shape, grid.affine @ np.diag([1.0, -1.0, 1.0, 1.0]), grid.unit)  # left-handed
    # stored psl-like: array axes (AP, SI, LR) with signs, i.e. a signed permutation of the world axes
    psl = Grid.from_spacing((14, 11, 9), (1.25,) * 3, unit="millimeter", direction=orientation_matrix("psl"))
    for target in (grid, left, psl):
        center, rotation = grid_block_patch(target, target.center + np.array([0.3, -0.55, 0.9]), 6)
        assert np.isclose(np.linalg.det(rotation), 1.0)
        # patch axes are the grid axes nearest the world axes: identity for the axis-aligned psl grid
        assert np.all(np.diag(rotation) > 0.7) and (target is not psl or np.allclose(rotation, np.eye(3)))
        patch = patch_grid(center, 6 * 1.25, 6, rotation, target.unit)
        start = grid_block_start(patch, target)
        assert start is not None
        index = target.world_to_index(patch.points())
        np.testing.assert_allclose(index, np.round(index), atol=1e-9)
        assert np.array_equal(np.round(index.min(axis=(0, 1, 2))), start[:3])
        # patch axis k runs along target axis start[3 + k] with sign start[6 + k]
        steps = [index[1, 0, 0] - index[0, 0, 0], index[0, 1, 0] - index[0, 0, 0], index[0, 0, 1] - index[0, 0, 0]]
        for k, step in enumerate(steps):
            assert np.allclose(step, np.eye(3)[start[3 + k]] * start[6 + k])
        # not blocks: half a voxel off, another spacing, a rotated patch
        assert grid_block_start(patch.translated(0.5 * target.linear[:, 0]), target) is None
        assert grid_block_start(patch_grid(center, 6 * 1.3, 6, rotation, target.unit), target) is None
        turned = rotation @ random_rotation(np.random.default_rng(1), 10.0)
        assert grid_block_start(patch_grid(center, 6 * 1.25, 6, turned, target.unit), target) is None


def test_points_are_index_to_world_of_every_index() -> None:
    grid = rotated_grid()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), axis=-1)
    np.testing.assert_allclose(grid.points(), grid.index_to_world(index), atol=1e-9)


def test_sample_torch_reproduces_linear_function_on_rotated_grid() -> None:
    grid = rotated_grid()
    coeff = np.array([0.3, -1.7, 2.2])
    vol = linear_volume(grid, coeff, 4.0)
    pts = inside_points(grid, 500, np.random.default_rng(0))
    out = sample_torch(
        torch.from_numpy(vol)[None, None],
        torch.from_numpy(grid.inverse_affine),
        torch.from_numpy(pts).reshape(1, 5, 10, 10, 3),
    )
    np.testing.assert_allclose(out.reshape(-1).numpy(), pts @ coeff + 4.0, atol=1e-8)


def test_resample_matches_scipy_and_closed_form() -> None:
    grid = rotated_grid()
    rng = np.random.default_rng(1)
    vol = rng.normal(size=SHAPE)
    pts = inside_points(grid, 300, rng)
    ours = resample(vol, grid, pts, order=1, dtype=np.float64)
    ref = ndimage.map_coordinates(vol, grid.world_to_index(pts).T, order=1)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    lin = linear_volume(grid, np.array([1.0, 2.0, -0.5]), 0.0)
    np.testing.assert_allclose(resample(lin, grid, pts, dtype=np.float64), pts @ [1.0, 2.0, -0.5], atol=1e-3)


def test_resample_nearest_equals_torch_nearest() -> None:
    grid = rotated_grid()
    labels = np.random.default_rng(2).integers(0, 9, size=SHAPE)
    pts = inside_points(grid, 400, np.random.default_rng(5))
    ours = resample(labels, grid, pts, order=0, dtype=labels.dtype)
    theirs = sample_torch(
        torch.from_numpy(labels.astype(np.float64))[None, None],
        torch.from_numpy(grid.inverse_affine),
        torch.from_numpy(pts).reshape(1, 4, 10, 10, 3),
        mode="nearest",
    )
    agree = np.mean(ours == theirs.reshape(-1).numpy().astype(labels.dtype))
    assert agree > 0.99  # ties at exact half-voxels may round differently


class RecordingArray:
    """Array-like that records which boxes are read (to prove partial reads)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.shape = data.shape
        self.boxes: list[tuple[slice, ...]] = []

    def __getitem__(self, box: tuple[slice, ...]) -> np.ndarray:
        self.boxes.append(box)
        return self.data[box]


def test_resample_reads_only_needed_box() -> None:
    grid = Grid.from_spacing((200, 150, 120), (1.0, 2.0, 3.0), unit="micrometer")
    arr = RecordingArray(np.zeros(grid.shape, dtype=np.uint16))
    patch = patch_grid(grid.index_to_world([100, 75, 60]), 12.0, 8, unit="micrometer")
    resample(arr, grid, patch.points())
    (box,) = arr.boxes
    sizes = [s.stop - s.start for s in box]
    assert all(size <= 12.0 / sp + 4 for size, sp in zip(sizes, (1.0, 2.0, 3.0), strict=True))


def test_world_box_holds_every_voxel_centre_of_the_world_box_on_a_rotated_anisotropic_grid() -> None:
    """The voxels whose centres lie in an axis-aligned world box all lie in :func:`world_box`'s slices (grown by
    the margin, clipped to the grid), whatever the grid's direction; a box beside the grid gives None."""
    grid = Grid.from_spacing((30, 24, 20), (1.5, 1.0, 0.7), direction=random_rotation(np.random.default_rng(4), 40.0))
    points = grid.points().reshape(-1, 3)
    low, high = np.percentile(points, 30, axis=0), np.percentile(points, 60, axis=0)
    inside = np.all((points >= low) & (points <= high), axis=1).reshape(grid.shape)
    assert inside.any()
    box = world_box(grid, low, high, margin=0)
    assert box is not None and inside[box].sum() == inside.sum()
    grown = world_box(grid, low, high, margin=2)
    assert grown is not None and all(
        g.start == max(b.start - 2, 0) and g.stop == min(b.stop + 2, n) for g, b, n in zip(grown, box, grid.shape, strict=True)
    )
    far = points.max(axis=0) + 100.0
    assert world_box(grid, far, far + 1.0) is None


def test_grid_box_holds_the_voxel_centres_of_another_grid_on_the_same_frame() -> None:
    """A box of a rotated, anisotropic grid gives its own slices; a coarser grid over part of it gives the box
    that holds every one of its voxel centres (plus the margin); a grid beside it gives None."""
    grid = Grid.from_spacing((30, 24, 20), (1.5, 1.0, 0.7), direction=random_rotation(np.random.default_rng(6), 40.0))
    part = grid.crop((4, 5, 6), (20, 17, 15))
    assert grid_box(grid, part, margin=0) == (slice(4, 20), slice(5, 17), slice(6, 15))
    assert grid_box(grid, part, margin=2) == (slice(2, 22), slice(3, 19), slice(4, 17))
    coarse = part.resampled(part.spacing * 2.0)
    box = grid_box(grid, coarse, margin=0)
    index = grid.world_to_index(coarse.points().reshape(-1, 3))
    assert box is not None and all(
        s.start <= lo + 1e-9 and hi <= s.stop - 1 + 1e-9 for s, lo, hi in zip(box, index.min(axis=0), index.max(axis=0), strict=True)
    )
    beside = grid.crop((0, 0, 0), (2, 2, 2)).translated(np.full(3, 1000.0))
    assert grid_box(grid, beside) is None


def test_index_box_outside_is_none() -> None:
    assert index_box(np.array([[-10.0, -10.0, -10.0], [-5.0, -6.0, -7.0]]), (4, 4, 4)) is None


def test_patch_grid_centre_spacing_rotation() -> None:
    rot = random_rotation(np.random.default_rng(7), 90.0)
    patch = patch_grid((1.0, 2.0, 3.0), 64.0, 32, rotation=rot, unit="millimeter")
    np.testing.assert_allclose(patch.center, [1.0, 2.0, 3.0], atol=1e-12)
    np.testing.assert_allclose(patch.spacing, [2.0, 2.0, 2.0])
    np.testing.assert_allclose(patch.direction, rot, atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0)
    # anisotropic extent (one per patch axis), no rotation: voxel (P-1)/2 at the centre
    patch = patch_grid((1.0, 2.0, 3.0), (64.0, 32.0, 16.0), 8, unit="millimeter")
    np.testing.assert_allclose(patch.spacing, [8.0, 4.0, 2.0])
    np.testing.assert_allclose(patch.index_to_world(np.full(3, 3.5)), [1.0, 2.0, 3.0], atol=1e-12)
    np.testing.assert_allclose(patch.origin, [1.0 - 28.0, 2.0 - 14.0, 3.0 - 7.0], atol=1e-12)


@pytest.mark.parametrize(
    ("code", "axis0"),
    [("asr", [0, -1, 0]), ("psl", [0, 1, 0]), ("sal", [-1, 0, 0]), ("LIA", [0, 0, 1])],
)
def test_orientation_matrix_origin_convention(code: str, axis0: list[int]) -> None:
    direction = orientation_matrix(code)
    np.testing.assert_allclose(direction[:, 0], axis0)
    np.testing.assert_allclose(np.abs(direction).sum(axis=0), [1, 1, 1])


def test_orientation_psl_vs_asr_same_anatomy() -> None:
    """A voxel toward posterior-superior-left in a psl array lies at low indices; in asr at high/low/high."""
    psl = Grid.from_orientation((20, 30, 40), (1.0, 1.0, 1.0), "psl", unit="millimeter")
    world_first = psl.index_to_world([0, 0, 0])
    # index 0 of a 'psl' array is the posterior, superior, left corner: A<0, S>0, R<0
    assert world_first[1] < 0 and world_first[0] > 0 and world_first[2] < 0
    asr = Grid.from_orientation((20, 30, 40), (1.0, 1.0, 1.0), "asr", unit="millimeter")
    idx = asr.world_to_index(world_first)
    np.testing.assert_allclose(idx, [19.0, 0.0, 39.0], atol=1e-9)


@pytest.mark.parametrize(("code_from", "code_to"), [("psl", "sal"), ("ras", "sal"), ("lia", "asr"), ("asr", "asr")])
def test_reorient_array_keeps_every_voxel_at_its_world_position(code_from: str, code_to: str) -> None:
    """An anisotropic, non-cubic array permuted and flipped into another orientation (both grids centred on the
    world origin): each voxel keeps its world position, with the voxel size permuted alike."""
    from patchmorph_core.spatial import axes_between, reorient_array

    shape, spacing = (5, 7, 9), np.array([50.0, 20.0, 10.0])
    values = np.arange(np.prod(shape)).reshape(shape)
    order, _ = axes_between(code_from, code_to)
    moved = reorient_array(values, code_from, code_to)
    source = Grid.from_orientation(shape, spacing, code_from)
    target = Grid.from_orientation(moved.shape, spacing[list(order)], code_to)
    index = np.argwhere(np.ones(shape, dtype=bool))
    landed = np.rint(target.world_to_index(source.index_to_world(index))).astype(int)
    np.testing.assert_array_equal(moved[tuple(landed.T)], values[tuple(index.T)])
    np.testing.assert_array_equal(reorient_array(moved, code_to, code_from), values)


@pytest.mark.parametrize("code", ["xyz", "aas", "ps", "", "pslr"])
def test_bad_orientation_code_is_one_clear_error(code: str) -> None:
    with pytest.raises(SpatialError, match="orientation code"):
        orientation_matrix(code)


@pytest.mark.parametrize("spacing", [(0.0, 1.0, 1.0), (1.0, -2.0, 1.0), (float("nan"), 1.0, 1.0)])
def test_bad_spacing_rejected(spacing: tuple[float, float, float]) -> None:
    with pytest.raises(SpatialError, match="voxel size"):
        Grid.from_spacing((4, 4, 4), spacing)


def test_singular_affine_rejected() -> None:
    affine = np.eye(4)
    affine[2, 2] = 0.0
    with pytest.raises(SpatialError, match="singular"):
        Grid((4, 4, 4), affine)


def test_unknown_unit_rejected() -> None:
    with pytest.raises(SpatialError, match="unit"):
        Grid.from_spacing((4, 4, 4), (1.0, 1.0, 1.0), unit="furlong")


def test_sample_field_linear_and_clamped() -> None:
    grid = rotated_grid()
    world = grid.points()
    field = np.stack([world[..., 2] * 0.1, world[..., 0] * -0.2, np.full(SHAPE, 0.5)]).astype(np.float32)
    pts = inside_points(grid, 50, np.random.default_rng(9))
    expected = np.stack([pts[:, 2] * 0.1, pts[:, 0] * -0.2, np.full(50, 0.5)], axis=-1)
    np.testing.assert_allclose(sample_field(field, grid, pts), expected, atol=1e-4)
    far = grid.index_to_world(np.array([[-50.0, 8.0, 11.0]]))
    edge = grid.index_to_world(np.array([[0.0, 8.0, 11.0]]))
    np.testing.assert_allclose(sample_field(field, grid, far), sample_field(field, grid, edge), atol=1e-5)


def test_nearest_grid_axes_solve_the_assignment() -> None:
    from scipy.optimize import linear_sum_assignment

    from patchmorph_core.spatial import nearest_grid_axes

    rng = np.random.default_rng(7)
    for _ in range(200):
        direction = random_rotation(rng, 180.0) @ np.eye(3)[rng.permutation(3)]
        rows, cols = linear_sum_assignment(-np.abs(direction))
        assert nearest_grid_axes(direction) == tuple(int(c) for c in cols[np.argsort(rows)])
    assert nearest_grid_axes(np.eye(3)[[2, 0, 1]]) == (2, 0, 1)


def test_field_vectors_convert_between_world_components_and_index_steps() -> None:
    """On a rotated, anisotropic grid a world vector of one voxel along an index axis is one index step along
    that axis and nothing along the others; the two conversions invert each other."""
    grid = Grid.from_spacing(SHAPE, SPACING, direction=random_rotation(np.random.default_rng(5), 30.0))
    vectors = np.zeros((3, *SHAPE), np.float32)
    vectors += grid.linear[:, 1].astype(np.float32)[:, None, None, None]  # one voxel along y, world components
    steps = grid.index_steps(vectors)
    np.testing.assert_allclose(steps[:, 0, 0, 0], [0.0, 1.0, 0.0], atol=1e-6)
    field = np.random.default_rng(6).normal(size=(3, *SHAPE)).astype(np.float32)
    np.testing.assert_allclose(grid.world_vectors(grid.index_steps(field)), field, atol=1e-5)


def test_displaced_positions_match_index_to_normalized() -> None:
    """A box of a non-cubic grid (one axis of one voxel) moved by a displacement in voxels: the grid_sample
    coordinates of its voxels are index_to_normalized of the moved indices, components flipped to (x, y, z)."""
    shape, start, box = (9, 12, 1), (3, 2, 0), (4, 7, 1)
    disp = torch.randn(2, 3, *box, generator=torch.Generator().manual_seed(2)) * torch.tensor([1.5, 0.5, 0.0]).view(1, 3, 1, 1, 1)
    index = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) + s for n, s in zip(box, start, strict=True)), indexing="ij"), -1)
    expected = index_to_normalized(index[None] + disp.permute(0, 2, 3, 4, 1), shape)
    torch.testing.assert_close(displaced_positions(disp, start, shape), expected)


def test_same_box_holds_across_resolutions_not_across_places_or_axes() -> None:
    """A block-averaged copy (and a source grid rebuilt from it) covers the same box; a copy shifted by two of its
    voxels, or turned, does not; nor does another unit's number taken for this one."""
    from patchmorph_core.source import downsampled_grid, source_grid

    turn = random_rotation(np.random.default_rng(2), 30.0)
    grid = Grid.from_spacing((30, 41, 52), (50.0, 40.0, 40.0), origin=(100.0, -20.0, 7.0), direction=turn)
    coarse = downsampled_grid(grid, (3, 3, 3), (10, 13, 17))
    assert grid.same_box(coarse) and coarse.same_box(grid)
    back = source_grid(coarse, (3, 3, 3), grid.shape)
    np.testing.assert_allclose(back.affine, grid.affine, atol=1e-9)
    assert grid.same_box(grid.with_unit("millimeter"))
    assert not grid.same_box(grid.translated(grid.linear @ np.array([6.0, 0.0, 0.0])))  # two coarse voxels
    rotation = np.eye(4)
    rotation[:3, :3] = random_rotation(np.random.default_rng(3), 20.0)
    assert not grid.same_box(grid.transformed(rotation))


def test_holds_index_counts_the_outer_half_of_the_edge_voxels() -> None:
    """Voxel k spans k ± 0.5: a point in the outer half of the first or last voxel is inside (a cell detected at
    the brain's edge), one beyond the voxel's face is not, and a margin moves both faces in."""
    grid = Grid.from_spacing((4, 5, 6), (3.0, 1.0, 0.5))
    inside = np.array([[-0.5, 0.0, 0.0], [0.0, -0.4, 5.4], [3.5, 4.5, 5.5], [1.0, 2.0, 3.0]])
    outside = np.array([[-0.51, 0.0, 0.0], [0.0, 4.51, 0.0], [0.0, 0.0, 5.51], [3.6, 0.0, 0.0]])
    assert grid.holds_index(inside).all()
    assert not grid.holds_index(outside).any()
    np.testing.assert_array_equal(grid.holds_index(np.array([[0.4, 1.0, 1.0], [0.6, 1.0, 1.0]]), margin=1.0), [False, True])


def test_box_extent_along_a_cyclically_permuted_orientation() -> None:
    """'lia' (FreeSurfer's) permutes the world axes cyclically, so its direction matrix is not its own transpose: axis
    0 runs along left-right, 1 along superior-inferior, 2 along anterior-posterior, whatever the grid's own axes."""
    grid = Grid.from_spacing((10, 20, 30), (1.0, 2.0, 0.5))  # world extents S 10, A 40, R 15
    np.testing.assert_allclose(grid.box_extent_along("lia"), [15.0, 10.0, 40.0])
    new = grid.reoriented("lia", (5, 4, 8))
    np.testing.assert_allclose(new.spacing, [3.0, 2.5, 5.0])
    np.testing.assert_allclose(new.center, grid.center)


@pytest.mark.parametrize("step", [2, 3, 4])
def test_a_boxs_lattice_nodes_are_the_whole_grids(step: int) -> None:
    """The polish lattice of a chunk's box (nodes every ``step`` voxels, coarsening up to 4) is the whole grid's, so
    the result does not depend on where the chunks start."""
    grid = Grid.from_spacing((20, 21, 22), (1.5, 1.0, 0.5))
    origin, stop = (5, 7, 0), (17, 20, 13)
    first = lattice_start(origin, step)
    assert all(0 <= f < step and (o + f) % step == 0 for o, f in zip(origin, first, strict=True))
    box_nodes = grid.crop(origin, stop).every(step, first).points().reshape(-1, 3)
    whole = grid.every(step).points().reshape(-1, 3)
    assert all(np.isclose(whole, p).all(axis=1).any() for p in box_nodes)


def test_nearest_resample_rounds_half_voxel_ties_up() -> None:
    """order=0 takes, at a point midway between two voxel centres, the higher one along every axis (as the docstring
    says), never the even one: a label map sampled on a grid offset by half a voxel shifts uniformly."""
    labels = np.arange(4 * 5 * 6, dtype=np.int32).reshape(4, 5, 6)
    grid = Grid.from_spacing(labels.shape, (2.0, 1.0, 0.5))
    index = np.array([[0.5, 1.5, 2.5], [1.5, 2.5, 3.5], [2.5, 0.5, 4.5]])
    got = resample(labels, grid, grid.index_to_world(index), order=0, dtype=labels.dtype)
    expected = [labels[1, 2, 3], labels[2, 3, 4], labels[3, 1, 5]]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("code", ["psl", "asr", "lia", "ras", "ipr"])
def test_orientation_code_and_nearest_code_invert_orientation_matrix(code: str) -> None:
    """The code read back from a direction matrix is the one that made it (the RFC-4 axes an image is written with
    come from it), and the nearest code of a slightly rotated grid is still that code: a sign flip would name every
    axis's origin on the wrong side and still be a one-to-one map of the 48 codes."""
    direction = orientation_matrix(code)
    assert orientation_code(direction) == code
    tilted = random_rotation(np.random.default_rng(3), 10.0) @ direction
    assert orientation_code(tilted) is None
    assert nearest_orientation_code(tilted) == code


def test_an_atlas_span_is_the_range_that_keeps_its_voxels() -> None:
    """``atlas_span_um`` of voxels 65-89 at 100 µm is 6500:9000, which ``atlas_index_slice`` turns back into them."""
    assert atlas_span_um(65, 25, 100.0) == (6500.0, 9000.0)
    assert atlas_index_slice(*atlas_span_um(65, 25, 100.0), 100.0) == slice(65, 90)


def test_the_extent_along_a_direction_is_that_of_its_world_component() -> None:
    """A psl grid of 50 planes of 50 µm (anisotropic, non-cubic): its voxel centres span 2450 µm along ap (its
    array axis 0), 30 × 40 − 40 µm along dv and 20 × 30 − 30 µm along lr, whatever order its axes have."""
    grid = Grid.from_orientation((50, 30, 20), (50.0, 40.0, 30.0), "psl")
    low, high = grid.world_bounds()
    extents = [anatomical_extent(low, high, d) for d in ("ap", "dv", "lr")]
    np.testing.assert_allclose(extents, [2450.0, 1160.0, 570.0])
    edges = [anatomical_extent(*grid.world_edge_bounds(), d) for d in ("ap", "dv", "lr")]
    np.testing.assert_allclose(edges, [2500.0, 1200.0, 600.0])  # every voxel whole: shape × voxel size


def test_the_box_of_whole_voxels_of_a_rotated_grid_holds_each_voxels_corners() -> None:
    """On a rotated, anisotropic, non-cubic grid the box of whole voxels is that of the centres grown by half a
    voxel's world extent along each world axis (the corners of the corner voxels)."""
    grid = Grid.from_spacing((5, 7, 4), (2.0, 1.0, 3.0), direction=random_rotation(np.random.default_rng(8), 40.0))
    low, high = grid.world_edge_bounds()
    corners = grid.index_to_world(
        np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in grid.shape], indexing="ij")).reshape(3, -1).T
    )
    np.testing.assert_allclose(low, corners.min(axis=0))
    np.testing.assert_allclose(high, corners.max(axis=0))
    centres_low, centres_high = grid.world_bounds()
    half = 0.5 * np.abs(grid.linear).sum(axis=1)
    np.testing.assert_allclose(low, centres_low - half)
    np.testing.assert_allclose(high, centres_high + half)


@pytest.mark.parametrize(("code", "axes"), [("asr", (0, 1, 2)), ("psl", (0, 1, 2)), ("lia", (2, 1, 0)), ("ras", (1, 2, 0))])
def test_the_array_axis_of_each_anatomical_direction(code: str, axes: tuple[int, int, int]) -> None:
    """``ap``, ``dv``, ``lr``: the array axis whose orientation letter is a/p, s/i, l/r."""
    assert tuple(anatomical_array_axis(code, d) for d in ("ap", "dv", "lr")) == axes


def test_atlas_coordinates_are_index_times_each_axis_resolution() -> None:
    """BrainGlobe's atlas coordinates on an anisotropic atlas (25 × 10 × 50 µm, non-cubic): each axis's index times
    that axis's resolution, no origin; a transposed resolution would move every voxel off its axis. The slice of an
    atlas range holds the indices whose coordinate lies in it, half-open."""
    resolution = (25.0, 10.0, 50.0)
    index = np.array([[0.0, 0.0, 0.0], [3.0, 7.0, 2.0], [1.5, 0.25, 10.0]])
    np.testing.assert_allclose(
        atlas_coordinates_um(index, resolution), [[0.0, 0.0, 0.0], [75.0, 70.0, 100.0], [37.5, 2.5, 500.0]]
    )
    cut = atlas_index_slice(70.0, 150.0, resolution[1])  # 70 µm at 10 µm: indices 7 .. 14
    assert (cut.start, cut.stop) == (7, 15)
    assert atlas_index_slice(70.0, 150.0, resolution[0]) == slice(3, 6)  # 75, 100, 125 µm; 150 is left out
