"""The stage check scores displacements by MIND inside the fixed tissue, across contrasts, on a bounded sample of
the pass's own field grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
from registration_stubs import blob_image
from scipy import ndimage

from patchmorph_core import stage_check
from patchmorph_core.alignment import translation_matrix
from patchmorph_core.displacement import AffineDisplacement, FieldDisplacement, TranslationDisplacement
from patchmorph_core.inference import checked_affine
from patchmorph_core.sampling import initial_translation
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid, random_rotation
from patchmorph_core.stage_check import CHECK_VOXELS, PassChecks, StageCheck, StageScorer, check_boxes


def test_check_boxes_sample_a_large_grid_at_its_own_voxels_from_edge_to_edge() -> None:
    grid = Grid.from_spacing((130, 97, 151), (0.1, 0.12, 0.08), direction=random_rotation(np.random.default_rng(2), 40.0))
    boxes = check_boxes(grid, 40**3, 12)
    assert 1 < len(boxes) and len(boxes) * 12**3 <= 40**3
    index = np.array([grid.world_to_index(b.index_to_world(np.zeros(3))) for b in boxes])
    assert np.allclose(index, np.rint(index), atol=1e-6)  # on the grid's own voxels
    assert all(b.shape == (12, 12, 12) and np.allclose(b.affine[:3, :3], grid.affine[:3, :3]) for b in boxes)
    first = np.rint(index).astype(int)
    assert (first.min(axis=0) == 0).all() and (first.max(axis=0) + 12 == np.array(grid.shape)).all()
    taken = np.zeros(grid.shape, dtype=int)  # no voxel sampled twice
    for z, y, x in first:
        taken[z : z + 12, y : y + 12, x : x + 12] += 1
    assert taken.max() == 1
    thin = check_boxes(Grid.from_spacing((200, 10, 300), (1.0, 1.0, 1.0)), 40**3, 16)
    assert {b.shape for b in thin} == {(16, 10, 16)}
    small = Grid.from_spacing((10, 12, 9), (1.0, 1.0, 1.0))
    assert check_boxes(small, 40**3) == [small]


def test_the_check_sees_a_shift_of_one_field_voxel_on_a_large_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fine texture moved by one voxel of a grid of more than ``CHECK_VOXELS`` voxels: scored on its own
    voxels, the shift that undoes it scores higher (a copy of the grid coarsened to ``CHECK_VOXELS`` voxels
    averages the texture away)."""
    grid = Grid.from_spacing((96, 84, 72), (0.1, 0.12, 0.09), unit="millimeter", direction=random_rotation(np.random.default_rng(4), 25.0))
    assert int(np.prod(grid.shape)) > CHECK_VOXELS
    noise = ndimage.gaussian_filter(np.random.default_rng(5).standard_normal(grid.shape), 0.8)
    texture = 50.0 + 25.0 * noise / noise.std()
    shifted = np.roll(texture, 1, axis=1)  # moving(i) = fixed(i - e_y): fixed(x) = moving(x + one y voxel)
    fixed = MultiscaleImage.from_array(texture.astype(np.float32), grid, n_levels=2)
    moving = MultiscaleImage.from_array((200.0 - shifted).astype(np.float32), grid, n_levels=2)  # inverted contrast
    scorer = StageScorer.build(fixed, moving, ((0.0, 100.0), (100.0, 200.0)), grid)
    one_voxel = grid.affine[:3, 1]  # the world step of one y voxel
    assert scorer.score(TranslationDisplacement(one_voxel)) > scorer.score(TranslationDisplacement(np.zeros(3))) + 0.01
    monkeypatch.setattr(stage_check, "ONE_READ_VOXELS", 0)  # a large grid's way: box by box, the same figures
    by_box = StageScorer.build(fixed, moving, ((0.0, 100.0), (100.0, 200.0)), grid)
    assert not by_box.one_read and scorer.one_read
    np.testing.assert_array_equal(by_box.fixed, scorer.fixed)
    field = FieldDisplacement(np.broadcast_to(one_voxel[:, None, None, None], (3, *grid.shape)), grid)
    assert by_box.score(field) == scorer.score(field)


def test_aligned_scores_higher_than_shifted_across_contrasts() -> None:
    fixed_grid = Grid.from_spacing((24, 28, 22), (1.2, 1.0, 1.4), origin=(-14, -14, -15), unit="millimeter")
    fixed = MultiscaleImage.from_array(blob_image(fixed_grid), fixed_grid, n_levels=2)
    shift = np.array([1.5, -2.0, 1.0])
    other = blob_image(fixed_grid, shift)
    moving = MultiscaleImage.from_array(np.where(other > 120, 10.0, other).astype(np.float32), fixed_grid, n_levels=2)
    scorer = StageScorer.build(fixed, moving, ((0.0, 160.0), (0.0, 100.0)), fixed_grid)
    aligned, start = scorer.score(TranslationDisplacement(shift)), scorer.score(TranslationDisplacement(np.zeros(3)))
    assert aligned > start
    assert StageCheck(start, aligned).accepted and not StageCheck(aligned, start).accepted
    assert StageCheck(math.nan, math.nan).accepted


def test_pass_checks_carry_the_score_on_one_grid_and_score_the_start_again_on_a_new_one() -> None:
    fixed_grid = Grid.from_spacing((24, 28, 22), (1.2, 1.0, 1.4), origin=(-14, -14, -15), unit="millimeter")
    fixed = MultiscaleImage.from_array(blob_image(fixed_grid), fixed_grid, n_levels=2)
    shift = np.array([1.5, -2.0, 1.0])
    moving = MultiscaleImage.from_array(blob_image(fixed_grid, shift), fixed_grid, n_levels=2)
    checks = PassChecks(fixed, moving, ((0.0, 160.0), (0.0, 160.0)))
    coarse, fine = fixed_grid.resampled(2.5), fixed_grid
    start, half, aligned = (TranslationDisplacement(shift * f) for f in (0.0, 0.5, 1.0))
    first = checks.check(coarse, start, half)
    assert first.accepted and first.after > first.before
    second = checks.check(fine, half, aligned)  # a new grid: the start is scored there
    on_fine = StageScorer.build(fixed, moving, ((0.0, 160.0), (0.0, 160.0)), fine)
    assert second.before == on_fine.score(half) and second.before != first.after
    worse = checks.check(fine, aligned, start)
    assert worse.before == second.after and not worse.accepted
    assert checks.check(fine, aligned, aligned).before == second.after  # a rejected pass leaves the score


def test_an_affine_worse_than_the_centre_of_mass_on_the_first_grid_is_not_kept() -> None:
    fixed_grid = Grid.from_spacing((24, 28, 22), (1.2, 1.0, 1.4), origin=(-14, -14, -15), unit="millimeter")
    fixed = MultiscaleImage.from_array(blob_image(fixed_grid), fixed_grid, n_levels=2)
    shift = np.array([1.5, -2.0, 1.0])
    moving = MultiscaleImage.from_array(blob_image(fixed_grid, shift), fixed_grid, n_levels=2)
    ranges = ((0.0, 160.0), (0.0, 160.0))
    right, wrong = np.eye(4), np.eye(4)
    right[:3, 3], wrong[:3, 3] = shift, shift + np.array([0.0, 3.0, -2.0])
    centre_of_mass = translation_matrix(initial_translation(fixed, moving))
    assert checked_affine(fixed, moving, fixed_grid, centre_of_mass, right, ranges).accepted
    check = checked_affine(fixed, moving, fixed_grid, centre_of_mass, wrong, ranges)
    assert not check.accepted and check.after < check.before
    assert np.isclose(check.before, StageScorer.build(fixed, moving, ranges, fixed_grid).score(AffineDisplacement(right)), atol=0.02)


def test_the_check_counts_only_the_fixed_tissue() -> None:
    """The score is a mean over the fixed tissue (normalised fixed intensity at or above ``TISSUE_LEVEL``), never over
    the background around the brain, where the moving image's clutter would decide whether a pass is kept."""
    fixed_grid = Grid.from_spacing((24, 28, 22), (1.2, 1.0, 1.4), origin=(-14, -14, -15), unit="millimeter")
    fixed = MultiscaleImage.from_array(blob_image(fixed_grid), fixed_grid, n_levels=2)
    scorer = StageScorer.build(fixed, fixed, ((0.0, 160.0), (0.0, 160.0)), fixed_grid)
    assert 0.0 < scorer.tissue.mean() < 0.5
    np.testing.assert_array_equal(scorer.tissue, scorer.fixed >= stage_check.TISSUE_LEVEL)
