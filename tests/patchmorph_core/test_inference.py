"""Stochastic inference: lattice, window, aggregator on hand-computed cases, composition, determinism."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from registration_stubs import ConstantUpdate, blob_image, blob_pair
from scipy import ndimage

import patchmorph_core.inference as inference_module
from patchmorph_core.config import InferenceConfig, ModelConfig, load_yaml
from patchmorph_core.displacement import AffineDisplacement, FieldDisplacement, TranslationDisplacement
from patchmorph_core.errors import InputError
from patchmorph_core.inference import (
    WEIGHT_FLOOR,
    FieldSums,
    PatchSpec,
    accumulate,
    averaged_update,
    cascade_extents,
    cell_blocks,
    compose_on_grid,
    estimate_and_accumulate,
    estimate_patches,
    finalize,
    fixed_on_field_grid,
    fold_free_update,
    lattice_box,
    network_precision,
    patch_window,
    plan_registration,
    specs_in_box,
    stage_lattice,
    update_reach,
    window,
)
from patchmorph_core.metrics import jacobian_determinant
from patchmorph_core.model import PatchMorph
from patchmorph_core.sampling import intensity_range
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid, grid_block_start, random_rotation


def _spec(center, size: int = 5, extent: float = 5.0) -> PatchSpec:
    return PatchSpec(0, (0, 0, 0), np.asarray(center, float), np.eye(3), extent, size, "millimeter")


def _rotated_domain() -> Grid:
    rot = random_rotation(np.random.default_rng(2), 25.0)
    return Grid.from_spacing(
        (20, 26, 17), (1.5, 1.0, 2.0), origin=(-10, -12, -15), unit="millimeter", direction=rot
    )


def test_window_zero_at_border_one_in_middle() -> None:
    w = patch_window(9)
    assert w[4, 4, 4] == pytest.approx(1.0)
    border = np.ones((9, 9, 9), bool)
    border[1:-1, 1:-1, 1:-1] = False
    assert np.all(w[border] == 0.0)
    assert np.all(w[1:-1, 1:-1, 1:-1] > 0.0)
    assert np.allclose(w, w[::-1, ::-1, ::-1])
    assert window(np.array([[-0.1, 4.0, 4.0], [4.0, 8.2, 4.0]]), 9).tolist() == [0.0, 0.0]


def test_aggregator_two_overlapping_patches_hand_computed() -> None:
    # target voxels at x = 0..5 (z, y = 0..3); two 5-voxel patches of spacing 1 centred at x = 1 and x = 2
    target = Grid.from_spacing((4, 4, 6), (1.0, 1.0, 1.0), unit="millimeter")
    specs = [_spec((1.5, 1.5, 1.0)), _spec((1.5, 1.5, 2.0))]
    estimates = np.zeros((2, 3, 5, 5, 5), np.float32)
    estimates[0, 2] = 1.0  # patch A: v = (0, 0, 1)
    estimates[1, 2] = 3.0  # patch B: v = (0, 0, 3)
    sums = accumulate(specs, estimates, target)
    # x-window of A at x = 0..5: patch index 1,2,3,4,5,6 -> 0.5, 1, 0.5, 0, 0, 0; B: 0, 0.5, 1, 0.5, 0, 0
    # z and y: patch indices 0.5, 1.5, 2.5, 3.5 -> sin²(π i / 4)
    zy = np.sin(np.pi * np.array([0.5, 1.5, 2.5, 3.5]) / 4) ** 2
    wa, wb = np.array([0.5, 1, 0.5, 0, 0, 0]), np.array([0, 0.5, 1, 0.5, 0, 0])
    expected_weight = zy[:, None, None] * zy[None, :, None] * (wa + wb)[None, None, :]
    assert np.allclose(sums.weight, expected_weight)
    field, uncertainty = finalize(sums, TranslationDisplacement(np.array([7.0, 7.0, 7.0])))
    # averaged update, then the (constant) prior; x = 4, 5: no weight -> the prior alone
    assert np.allclose(field[2, 1, 2], [1.0 + 7, 5 / 3 + 7, 7 / 3 + 7, 3.0 + 7, 7.0, 7.0])
    assert np.allclose(field[:2], 7.0)
    assert np.allclose(uncertainty[0, 3], [0.0, np.sqrt(8) / 3, np.sqrt(8) / 3, 0.0, 0.0, 0.0], atol=1e-6)
    assert sums.patches == 2


def test_aggregator_reproduces_linear_field_under_rotation() -> None:
    # every patch carries the same linear field u(x) = A x + b: the average must equal it where covered
    domain = _rotated_domain()
    lattice = stage_lattice(
        domain, extent=12.0, overlap=2.0, seed=1, stage=0, max_rotation_deg=30.0, patch_size=8
    )
    matrix = np.eye(4)
    matrix[:3, :3] += np.array([[0.02, -0.01, 0.03], [0.0, 0.01, -0.02], [0.01, 0.02, 0.0]])
    matrix[:3, 3] = [0.5, -1.0, 2.0]
    truth = AffineDisplacement(matrix)
    specs = lattice.specs()
    estimates = np.stack([np.moveaxis(truth(s.grid.points()).reshape(8, 8, 8, 3), -1, 0) for s in specs])
    target = domain.resampled(2.0)
    sums = accumulate(specs, estimates, target)
    field, _ = finalize(sums, TranslationDisplacement(np.zeros(3)))
    covered = sums.weight >= WEIGHT_FLOOR  # below it the update fades out toward the lattice's edge
    assert covered.mean() > 0.9
    expected = np.moveaxis(truth(target.points()).reshape(*target.shape, 3), -1, 0)
    assert np.abs(field - expected)[:, covered].max() < 1e-4


def test_lattice_is_independent_of_the_block_partition() -> None:
    lattice = stage_lattice(
        _rotated_domain(), 10.0, 2.0, seed=7, stage=1, max_rotation_deg=20.0, patch_size=8
    )
    reference = {s.cell: s for s in lattice.specs()}
    assert len(reference) == len(lattice) == int(np.prod(lattice.counts)) > 8
    for block in (1, 2, 3):
        seen = [s for start, stop in cell_blocks(lattice, block) for s in specs_in_box(lattice, start, stop)]
        assert sorted(s.cell for s in seen) == sorted(reference)
        for spec in seen:
            ref = reference[spec.cell]
            assert np.array_equal(spec.center, ref.center) and np.array_equal(spec.rotation, ref.rotation)
    # the same seed gives the same patches; centres stay inside their cells; rotations are rotations
    again = stage_lattice(_rotated_domain(), 10.0, 2.0, seed=7, stage=1, max_rotation_deg=20.0, patch_size=8)
    other = stage_lattice(_rotated_domain(), 10.0, 2.0, seed=8, stage=1, max_rotation_deg=20.0, patch_size=8)
    assert all(
        np.array_equal(a.center, b.center) for a, b in zip(lattice.specs(), again.specs(), strict=True)
    )
    assert not np.allclose(lattice.spec((0, 0, 0)).center, other.spec((0, 0, 0)).center)
    # a lattice over a given world box: ceil(box / step) cells per axis, centred on the box
    boxed = stage_lattice(
        _rotated_domain(),
        10.0,
        2.0,
        7,
        1,
        20.0,
        8,
        bounds=(np.array([0.0, 0.0, 0.0]), np.array([4.0, 5.0, 16.0])),
    )
    assert boxed.counts == (1, 1, 4) and np.allclose(boxed.origin, [2.0, 2.5, 0.5])
    for spec in lattice.specs():
        offset = spec.center - (lattice.origin + np.array(spec.cell) * lattice.step)
        assert np.all(np.abs(offset) <= lattice.step / 2)
        assert np.allclose(spec.rotation @ spec.rotation.T, np.eye(3))


@pytest.mark.parametrize("reflected", [False, True])
def test_snapped_lattice_patches_are_blocks_of_the_field_grid(reflected: bool) -> None:
    domain = _rotated_domain()
    if reflected:  # a left-handed index frame (as many scanner and atlas files have)
        domain = Grid(domain.shape, domain.affine @ np.diag([1.0, 1.0, -1.0, 1.0]), domain.unit)
    field_grid = domain.resampled(10.0 / 8)
    free = stage_lattice(domain, 10.0, 2.0, seed=7, stage=1, max_rotation_deg=20.0, patch_size=8)
    snapped = stage_lattice(domain, 10.0, 2.0, 7, 1, 20.0, 8, snap=field_grid)
    assert snapped.max_rotation_deg == 0.0 and len(snapped) == len(free)
    for spec, loose in zip(snapped.specs(), free.specs(), strict=True):
        start = grid_block_start(spec.grid, field_grid)
        assert start is not None
        # every patch voxel centre is a field voxel centre, and the patch is a proper rotation
        index = field_grid.world_to_index(spec.grid.points())
        assert np.abs(index - np.round(index)).max() < 1e-9
        assert np.array_equal(np.round(index.min(axis=(0, 1, 2))), start[:3])
        assert np.isclose(np.linalg.det(spec.rotation), 1.0)
        assert np.allclose(spec.rotation @ spec.rotation.T, np.eye(3))
        # the same jitter as the free lattice, rounded to the field grid (at most half a voxel per axis)
        moved = field_grid.world_to_index(spec.center) - field_grid.world_to_index(loose.center)
        assert np.all(np.abs(moved) <= 0.5 + 1e-9)
    with pytest.raises(ValueError, match="patch spacing"):
        stage_lattice(domain, 10.0, 2.0, 7, 1, 0.0, 8, snap=domain.resampled(1.0))


@pytest.mark.parametrize("frame", ["plain", "reflected", "permuted"])
def test_field_grid_patches_give_the_sums_of_per_patch_interpolation(frame: str) -> None:
    # the block path (one sampling on the field grid, slice additions) against estimate_patches +
    # accumulate (per-patch trilinear sampling and accumulation) on the same snapped patches
    torch.manual_seed(3)
    model = PatchMorph(ModelConfig(patch_size=8, widths=(4, 4), affine_widths=(4, 4), n_stages=2)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    fixed, moving = blob_pair()
    if frame != "plain":  # a left-handed fixed grid; or one whose axes are a signed permutation of the world's
        change = np.diag([1.0, -1.0, 1.0, 1.0]) if frame == "reflected" else np.eye(4)[[1, 2, 0, 3]]
        if frame == "reflected":  # y runs the other way over the same world box
            change[1, 3] = fixed.grid.shape[1] - 1.0
        grid = Grid(fixed.levels[0].grid.shape, fixed.levels[0].grid.affine @ change, "millimeter")
        fixed = MultiscaleImage.from_array(blob_image(grid), grid, n_levels=2)
        assert fixed.levels[0].array.max() > 50.0  # the blob is inside
    moving = moving.with_unit("millimeter")
    field_grid = fixed.grid.resampled(1.5)
    lattice = stage_lattice(fixed.grid, 12.0, 1.5, 4, 1, 10.0, 8, snap=field_grid)
    coarse = field_grid.resampled(3.0)
    rng = np.random.default_rng(1)
    prior = FieldDisplacement(rng.normal(0.0, 0.8, size=(3, *coarse.shape)).astype(np.float32), coarse)
    specs = lattice.specs()
    target = field_grid.crop((2, 3, 1), (14, 12, 16))  # patches reach beyond it on every side
    config = InferenceConfig(batch_size=5, device="cpu", precision="float32")  # the two paths' sums, to rounding
    stats: dict[str, Any] = {}
    fast = estimate_and_accumulate(model, fixed, moving, prior, specs, target, config, stats=stats)
    slow = accumulate(specs, estimate_patches(model, fixed, moving, prior, specs, config), target)
    assert set(stats) == {"forward_seconds", "sampling_seconds", "accumulate_seconds", "fixed_from_grid", "precision"}
    assert stats["precision"] == "float32"
    assert stats["fixed_from_grid"] == 0.0  # no fixed image on the grid given: sampled
    assert fast.weight.max() > 1.0 and np.abs(fast.weighted).max() > 0.5
    np.testing.assert_allclose(fast.weight, slow.weight, rtol=1e-6, atol=1e-7)  # float32 sums
    np.testing.assert_allclose(fast.weighted, slow.weighted, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast.weighted_sq, slow.weighted_sq, rtol=1e-5, atol=1e-4)
    # patches whose window (non-zero on the inner (P-2)³ voxels) reaches the target; the per-patch path
    # also counts patches whose border voxel lands a rounding error inside the window (weight ~1e-30)
    starts = np.array([grid_block_start(spec.grid, target) for spec in specs])[:, :3]
    inner = np.all((starts + 7 > 0) & (starts + 1 < np.array(target.shape)), axis=1)
    assert fast.patches == int(inner.sum()) <= slow.patches < len(specs)
    # the fixed image sampled once on the lattice's box of the field grid holds every patch of every pass
    # and gives the same sums; the image itself is then not sampled again (a blank one gives them too)
    fixed_range = intensity_range(fixed)
    on_grid = fixed_on_field_grid(fixed, lattice_box(lattice), fixed_range)
    assert on_grid is not None and fixed_on_field_grid(fixed, lattice_box(lattice), fixed_range, 1024) is None
    for spec in lattice.specs() + dataclasses.replace(lattice, repeat=2).specs():
        corner = grid_block_start(spec.grid, on_grid.grid)[:3]
        assert np.all(corner >= 0) and np.all(corner + 8 <= np.array(on_grid.grid.shape))
    blank = MultiscaleImage.from_array(np.zeros(fixed.grid.shape, np.float32), fixed.grid, n_levels=2)
    stats = {}
    shared = estimate_and_accumulate(
        model, blank, moving, prior, specs, target, config, fixed_range=fixed_range, fixed_on_grid=on_grid,
        stats=stats,
    )  # fmt: skip
    assert stats["fixed_from_grid"] == 1.0
    np.testing.assert_allclose(shared.weighted, fast.weighted, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shared.weighted_sq, fast.weighted_sq, rtol=1e-5, atol=1e-4)
    # without the spread (a pass whose uncertainty nobody reads): the same sums, a fifth less memory
    estimates = estimate_patches(model, fixed, moving, prior, specs, config)
    with_spread = accumulate(specs, estimates, target)
    for lean, full in (
        (estimate_and_accumulate(model, fixed, moving, prior, specs, target, config, spread=False), fast),
        (accumulate(specs, estimates, target, spread=False), with_spread),
    ):
        assert lean.weighted_sq is None and not lean.spread and full.spread
        np.testing.assert_allclose(lean.weighted, full.weighted, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(lean.weight, full.weight)
        mean, spread = averaged_update(lean)
        np.testing.assert_allclose(mean, averaged_update(full)[0], rtol=1e-6, atol=1e-7)
        assert not spread.any() and averaged_update(full)[1].max() > 0.0
    with pytest.raises(ValueError, match="spread"):
        FieldSums.zeros(target) + FieldSums.zeros(target, spread=False)


def test_block_sums_add_up_and_crop_to_chunks() -> None:
    domain = _rotated_domain()
    lattice = stage_lattice(domain, 10.0, 2.0, seed=3, stage=0, max_rotation_deg=15.0, patch_size=8)
    rng = np.random.default_rng(0)
    estimates = {s.cell: rng.normal(size=(3, 8, 8, 8)).astype(np.float32) for s in lattice.specs()}
    target = domain.resampled(1.7)
    full = accumulate(lattice.specs(), [estimates[s.cell] for s in lattice.specs()], target)
    blocks = FieldSums.zeros(target)
    for start, stop in cell_blocks(lattice, 2):
        specs = specs_in_box(lattice, start, stop)
        blocks = blocks + accumulate(specs, [estimates[s.cell] for s in specs], target)
    # float32 sums: patches added in another order differ by rounding
    assert np.allclose(blocks.weighted, full.weighted, atol=1e-6) and np.allclose(blocks.weight, full.weight, atol=1e-6)
    # a chunk of the field grid is the sums' crop
    cropped = full.crop((3, 2, 4), (11, 9, 13))
    np.testing.assert_array_equal(cropped.weighted, full.weighted[:, 3:11, 2:9, 4:13])
    np.testing.assert_array_equal(cropped.weight, full.weight[3:11, 2:9, 4:13])
    # crop beyond the grid is zero-filled
    beyond = full.crop((-2, 0, 0), (3, 4, 4))
    assert beyond.weight.shape == (5, 4, 4) and np.all(beyond.weight[:2] == 0)
    assert np.allclose(beyond.weight[2:], full.weight[:3, :4, :4])


def test_estimate_patches_returns_the_network_updates() -> None:
    grid = Grid.from_spacing((24, 24, 24), (1.0, 1.0, 1.0), origin=(-12, -12, -12), unit="millimeter")
    image = MultiscaleImage.from_array(blob_image(grid), grid, n_levels=2)
    model = ConstantUpdate((0.5, -1.0, 0.25))
    lattice = stage_lattice(grid, 12.0, 2.0, seed=0, stage=1, max_rotation_deg=10.0, patch_size=8)
    specs = lattice.specs()[:5]
    config = InferenceConfig(batch_size=2, device="cpu")
    out = estimate_patches(model, image, image, TranslationDisplacement(np.array([1.0, 2.0, 3.0])), specs, config)
    assert out.shape == (5, 3, 8, 8, 8) and out.dtype == np.float32
    assert np.allclose(out, np.array([0.5, -1.0, 0.25])[None, :, None, None, None])  # the prior is not added
    assert model.calls == [2, 2, 1]


def _composed(update: np.ndarray, specs: list[PatchSpec], prior: AffineDisplacement) -> np.ndarray:
    """``v(x) + prior(x + v(x))`` per patch at its voxel centres: ``(B, 3, P, P, P)``, as training's chains."""
    points = np.concatenate([s.grid.points().reshape(-1, 3) for s in specs])
    v = np.moveaxis(update, 1, -1).reshape(-1, 3).astype(np.float64)
    total = v + prior(points + v)
    return np.moveaxis(total.reshape(update.shape[0], *update.shape[2:], 3), -1, 1)


def test_finalize_composes_the_averaged_update_with_a_field_prior() -> None:
    # rotated, anisotropic, non-cubic grid; a random smooth field prior on a coarser, differently rotated grid
    target = _rotated_domain()
    coarse = Grid.from_spacing(
        (9, 11, 8), (4.0, 3.5, 5.0), origin=(-18, -20, -21), unit="millimeter",
        direction=random_rotation(np.random.default_rng(5), 30.0),
    )  # fmt: skip
    rng = np.random.default_rng(4)
    prior = FieldDisplacement(ndimage.gaussian_filter(rng.normal(0, 3.0, (3, *coarse.shape)), (0, 1, 1, 1)), coarse)
    update = ndimage.gaussian_filter(rng.normal(0, 2.0, (3, *target.shape)), (0, 2, 2, 2))
    points = target.points().reshape(-1, 3)
    v = np.moveaxis(update, 0, -1).reshape(-1, 3)
    expected = np.moveaxis((v + prior(points + v)).reshape(*target.shape, 3), -1, 0)
    for block in (1, 500, 10**6):  # one slice per evaluation, a few slices, all at once
        np.testing.assert_allclose(compose_on_grid(update, target, prior, block), expected, atol=1e-4)
    # finalize: v̄ = Σw·v / Σw where covered, 0 (the prior alone) elsewhere
    weight = rng.uniform(0.5, 2.0, target.shape) * (rng.uniform(size=target.shape) > 0.2)
    sums = FieldSums(target, update * weight, weight, np.sum(update**2, axis=0) * weight, 3)
    field, uncertainty = finalize(sums, prior, block=700)
    bare = np.moveaxis(prior(points).reshape(*target.shape, 3), -1, 0)
    np.testing.assert_allclose(field, np.where(weight > 0, expected, bare), atol=1e-4)
    assert np.abs(uncertainty).max() < 1e-3  # one estimate per voxel: no spread


def test_finalize_fades_the_update_out_where_the_coverage_ends() -> None:
    """Where Σw falls toward 0 (the lattice's edge) the averaged update fades out continuously instead of
    keeping one patch's full estimate and then jumping to 0, which folded the field there."""
    target = Grid.from_spacing((3, 4, 40), (2.0, 1.0, 0.5), unit="millimeter")
    weight = np.broadcast_to(np.linspace(0.0, 0.1, 40), target.shape).astype(np.float32).copy()
    update = np.zeros((3, *target.shape), np.float32)
    update[2] = -3.0  # 3 mm along x, six voxels
    sums = FieldSums(target, update * weight, weight, np.sum(update**2, axis=0) * weight, 1)
    field, _ = finalize(sums, TranslationDisplacement(np.zeros(3)))
    expected = -3.0 * np.minimum(1.0, weight / WEIGHT_FLOOR)
    np.testing.assert_allclose(field[2], expected, atol=1e-5)
    assert np.all(np.diff(field[2], axis=-1) <= 1e-6)  # monotone: no jump back to 0
    assert field[2, :, :, -1].max() == pytest.approx(-3.0)  # full estimate where the coverage is good


def _folding_update(grid: Grid) -> np.ndarray:
    """A smooth averaged update that folds: a bump of 4 voxels along x whose gradient reaches -2 per voxel."""
    points = grid.points()
    x = points[..., 2] - points[..., 2].mean()
    update = np.zeros((3, *grid.shape), np.float32)
    update[2] = -4.0 * float(grid.spacing[2]) * np.tanh(x / float(grid.spacing[2]) / 2.0)
    update[0] = 0.5 * float(grid.spacing[0]) * np.sin(points[..., 1] / 3.0)  # and a smooth shear
    return update


def test_fold_free_update_unfolds_and_keeps_smooth_updates() -> None:
    """Rotated, anisotropic, non-cubic grid: an averaged update that folds comes out fold-free; a gentle one
    comes out nearly as it went in (the difference is of order |∇v|²|v|)."""
    grid = Grid.from_spacing(
        (14, 17, 23), (1.5, 1.0, 0.8), origin=(-10, -8, -9), unit="millimeter",
        direction=random_rotation(np.random.default_rng(8), 25.0),
    )  # fmt: skip
    folding = _folding_update(grid)
    assert jacobian_determinant(folding, grid).min() < 0
    unfolded = fold_free_update(folding, grid, max_length=12.0)
    assert jacobian_determinant(unfolded, grid).min() > 0
    gentle = 0.05 * folding  # |∇v| about 0.1 per voxel
    close = fold_free_update(gentle, grid, max_length=12.0)
    assert np.abs(close - gentle).max() < 0.02 * np.abs(gentle).max()
    capped = fold_free_update(np.full((3, *grid.shape), 5.0, np.float32), grid, max_length=1.0)
    np.testing.assert_allclose(np.linalg.norm(capped, axis=0), 1.0, rtol=1e-4)  # a constant flow, capped


def test_fold_free_update_on_a_box_grown_by_its_reach_equals_the_whole_grid() -> None:
    grid = Grid.from_spacing((30, 26, 34), (1.0, 1.2, 0.9), unit="millimeter")
    update = ndimage.gaussian_filter(np.random.default_rng(3).normal(0, 1, (3, *grid.shape)), (0, 3, 3, 3))
    update *= 2.5 / np.abs(update).max()  # up to 2.5 mm: a chunk grown by only 2 voxels is off by 4e-4 mm
    whole = fold_free_update(update, grid, max_length=3.0)
    reach = update_reach(3.0, grid)
    start, stop = (8, 6, 10), (20, 18, 22)
    lo = [max(a - reach, 0) for a in start]
    hi = [min(b + reach, n) for b, n in zip(stop, grid.shape, strict=True)]
    part = fold_free_update(update[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], grid.crop(lo, hi), max_length=3.0)
    inner = tuple(slice(a - o, b - o) for a, b, o in zip(start, stop, lo, strict=True))
    np.testing.assert_allclose(
        part[(slice(None), *inner)], whole[:, start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]], atol=1e-5
    )


def test_default_register_yaml_matches_config_defaults() -> None:
    path = Path(__file__).resolve().parents[2] / "configs" / "register_default.yaml"
    assert load_yaml(path, InferenceConfig) == InferenceConfig()


def test_network_precision_follows_the_device_the_cpu_and_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(inference_module, "cpu_computes_bfloat16", lambda: True)
    assert network_precision(cpu, "auto") == "bfloat16" and network_precision(cpu, "float32") == "float32"
    assert network_precision(cuda, "auto") == "float16" and network_precision(cuda, "float32") == "float32"
    monkeypatch.setattr(inference_module, "cpu_computes_bfloat16", lambda: False)
    assert network_precision(cpu, "auto") == "float32"  # emulated bfloat16 would be slower than float32


def test_bfloat16_patch_estimates_stay_within_a_small_fraction_of_the_float32_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``precision: auto`` on a CPU with bfloat16 instructions (forced here: emulated where the CPU lacks them)
    runs the forward passes in bfloat16: the estimates differ from float32's, by a small fraction of the update,
    and the figures say which format ran."""
    monkeypatch.setattr(inference_module, "cpu_computes_bfloat16", lambda: True)
    torch.manual_seed(1)
    model = PatchMorph(ModelConfig(patch_size=8, widths=(4, 4), affine_widths=(4, 4), n_stages=1)).eval()
    with torch.no_grad():  # random weights large enough for updates of many voxels
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    fixed, moving = blob_pair()
    moving = moving.with_unit("millimeter")
    specs = stage_lattice(fixed.grid, 20.0, 2.0, seed=0, stage=0, max_rotation_deg=20.0, patch_size=8).specs()[:6]
    prior = TranslationDisplacement(np.array([0.5, -1.0, 0.8]))
    stats: dict[str, Any] = {}
    reduced = estimate_patches(model, fixed, moving, prior, specs, InferenceConfig(batch_size=4, device="cpu"), stats=stats)
    full = estimate_patches(model, fixed, moving, prior, specs, InferenceConfig(batch_size=4, device="cpu", precision="float32"))
    assert stats["precision"] == "bfloat16" and reduced.dtype == np.float32
    difference = float(np.abs(reduced - full).max())
    assert np.abs(full).max() > 0.3  # a real update
    assert 0.0 < difference < 0.03 * float(np.abs(full).max())


@pytest.mark.parametrize("alignment", ["center_of_mass", "affine"])
def test_patch_estimate_equals_the_training_forward_pass(alignment: str) -> None:
    # the same patch through inference (numpy sampling, per-image normalisation) and through training's
    # differentiable cascade (torch sampling) must give the same total displacement
    from patchmorph_core.config import LossConfig
    from patchmorph_core.sampling import intensity_range, normalize
    from patchmorph_core.training import ChainBatch, TrainPair, run_chains

    torch.manual_seed(1)
    model = PatchMorph(ModelConfig(patch_size=8, widths=(4, 4), affine_widths=(4, 4), n_stages=1)).eval()
    with torch.no_grad():  # random weights large enough for updates of about a voxel
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    # piecewise-constant images whose extremes fill > 0.5 % of voxels: the percentile range is the full
    # range, so normalising before sampling (training) equals normalising after sampling (inference)
    fixed, moving = (
        MultiscaleImage(
            tuple(type(lv)(np.clip(np.round(lv.array / 40.0), 0, 2), lv.grid) for lv in im.levels[:1])
        )
        for im in blob_pair()
    )
    moving = moving.with_unit("millimeter")
    config = InferenceConfig(batch_size=4, device="cpu", precision="float32")  # training's format
    lattice = stage_lattice(fixed.grid, 20.0, 2.0, seed=0, stage=0, max_rotation_deg=20.0, patch_size=8)
    specs = lattice.specs()[:3]
    pair = TrainPair.from_images(
        *(
            MultiscaleImage(
                tuple(type(lv)(normalize(lv.array, *intensity_range(im)), lv.grid) for lv in im.levels)
            )
            for im in (fixed, moving)
        ),
        alignment=alignment,
    )
    if alignment == "affine":  # the fitted start is a real affine, not a translation
        assert np.abs(pair.initial[:3, :3] - np.eye(3)).max() > 1e-3
    update = estimate_patches(model, fixed, moving, AffineDisplacement(pair.initial), specs, config)
    ours = _composed(update, specs, AffineDisplacement(pair.initial))
    with torch.no_grad():
        theirs = run_chains(
            model, pair, ChainBatch.from_chains([[s.grid] for s in specs]), LossConfig(ncc_window=3)
        )
    start = AffineDisplacement(pair.initial)(np.stack([sp.grid.points() for sp in specs]).reshape(-1, 3))
    start = start.reshape(len(specs), *specs[0].grid.shape, 3).transpose(0, 4, 1, 2, 3)
    assert np.abs(ours - start).max() > 0.1  # a real update
    assert np.abs(ours - theirs.displacement.numpy()).max() < 1e-3 * float(specs[0].grid.spacing.max())


def test_plan_skips_the_whole_brain_stage_only_after_an_accepted_affine() -> None:
    fixed, moving = blob_pair()
    model = ConstantUpdate((0.0, 0.0, 0.0))
    two = {"device": "cpu", "field_spacing": "2mm"}  # two stages on this ~34 mm brain with P = 8
    affine = plan_registration(model, fixed, moving, InferenceConfig(**two))
    assert affine.alignment["method"] == "affine" and affine.alignment["accepted"]
    assert not np.allclose(affine.initial[:3, :3], np.eye(3))  # a rotated moving grid: a real affine
    assert [lat.name for lat in affine.lattices] == ["stage1"]  # no refinement pass by default
    com = plan_registration(
        model, fixed, moving, InferenceConfig(**two, initial_alignment="center_of_mass", refine_passes=2)
    )
    assert [lat.name for lat in com.lattices] == ["stage0", "stage1", "stage1.1", "stage1.2"]
    assert np.allclose(com.initial[:3, :3], np.eye(3))
    forced = plan_registration(
        model, fixed, moving, InferenceConfig(**two, first_stage=0, refine_passes=0)
    )
    assert [lat.name for lat in forced.lattices] == ["stage0", "stage1"]
    with pytest.raises(InputError, match="first_stage 2 leaves no stage"):
        plan_registration(model, fixed, moving, InferenceConfig(**two, first_stage=2))


def test_cascade_halves_until_the_patch_spacing_is_within_sqrt2_of_the_field_spacing() -> None:
    # E_0 = 216 mm, P = 24, 2 mm field: patch spacings 9, 4.5 (> 2.83), then the last stage on the field
    assert cascade_extents(216.0, 24, 2.0) == [216.0, 108.0, 48.0]
    # 2.4 mm: 9, 4.5, 2.25 (<= 3.39 stops halving) -> the last stage is laid on 2.4 mm, not added below it
    assert cascade_extents(216.0, 24, 2.4) == [216.0, 108.0, pytest.approx(57.6)]
    # each halving of the field spacing adds one stage
    assert [len(cascade_extents(216.0, 24, h)) for h in (8.0, 4.0, 2.0, 1.0, 0.5)] == [1, 2, 3, 4, 5]
    assert cascade_extents(20.0, 24, 2.0) == [48.0]  # the field coarser than the brain: one stage on it
    assert cascade_extents(216.0, 24, 2.0, n_stages=4) == [216.0, 108.0, 54.0, 48.0]  # a given count, floored


def test_field_spacing_sets_the_stages_and_is_never_finer_than_the_fixed_voxels() -> None:
    fixed, moving = blob_pair()  # fixed voxels 1.2 x 1.0 x 1.4 mm; moving 1.5 x 1.4 x 1.0 mm (given in um)
    model = ConstantUpdate((0.0, 0.0, 0.0))
    base = {"device": "cpu", "first_stage": 0, "refine_passes": 0, "initial_alignment": "center_of_mass"}
    default = plan_registration(model, fixed, moving, InferenceConfig(**base))
    assert default.field_spacing.source == "default" and default.field_spacing.value == pytest.approx(1.0)
    assert "coarser voxel" in default.field_spacing.note
    coarse = plan_registration(model, fixed, moving, InferenceConfig(**base, field_spacing="2000 µm"))
    assert coarse.field_spacing.value == pytest.approx(2.0) and coarse.field_spacing.unit == "millimeter"
    assert len(coarse.lattices) == len(default.lattices) - 1  # a field twice as coarse: one stage less
    for plan in (default, coarse):
        assert np.allclose(plan.grids[-1].spacing, plan.field_spacing.value)
        assert plan.lattices[-1].extent == pytest.approx(8 * plan.field_spacing.value)  # P x the field spacing
        assert all(lat.snap is not None for lat in plan.lattices)  # every stage on its own field grid
    # finer than the fixed image's finest voxel (1.0 mm): raised to it, and the note says so
    fine = plan_registration(model, fixed, moving, InferenceConfig(**base, field_spacing="0.5mm"))
    assert fine.field_spacing.value == pytest.approx(1.0) and "raised" in fine.field_spacing.note
    assert [lat.extent for lat in fine.lattices] == [lat.extent for lat in default.lattices]
    with pytest.raises(ValueError, match="not a length unit"):  # pydantic's error; a YAML file gives InputError
        InferenceConfig(field_spacing="2 s")


def test_tasks_starting_together_wait_while_one_places_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first tasks of a pass start on several threads at once: the model is placed once, and no task goes
    on to its forward pass before the placement is finished (a pass beside the move would read weights in
    both layouts)."""
    import threading
    import time

    from patchmorph_core import inference

    model = PatchMorph(ModelConfig(patch_size=8, widths=(4, 4), affine_widths=(4, 4), n_stages=2))
    placing, placed, returned_early = [], threading.Event(), []
    real = inference.place_model

    def slow_place(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        placing.append(threading.current_thread().name)
        time.sleep(0.2)
        real(module, device)
        placed.set()
        return module

    monkeypatch.setattr(inference, "place_model", slow_place)
    config = InferenceConfig(device="cpu")

    def task() -> None:
        inference._model_device(model, config)
        if not placed.is_set():
            returned_early.append(threading.current_thread().name)

    threads = [threading.Thread(target=task) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(placing) == 1 and not returned_early and not model.training
