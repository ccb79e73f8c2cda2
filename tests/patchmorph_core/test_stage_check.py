"""The stage check scores displacements by MIND inside the fixed tissue, across contrasts, on a small grid."""

from __future__ import annotations

import math

import numpy as np
from registration_stubs import blob_image

from patchmorph_core.displacement import TranslationDisplacement
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid, random_rotation
from patchmorph_core.stage_check import StageCheck, StageScorer, check_grid


def test_check_grid_is_small_and_covers_the_same_box() -> None:
    grid = Grid.from_spacing((130, 97, 151), (0.1, 0.12, 0.08), direction=random_rotation(np.random.default_rng(2), 40.0))
    small = check_grid(grid, 40**3)
    assert int(np.prod(small.shape)) <= 40**3 and min(small.shape) >= 20
    low, high = grid.world_bounds()
    small_low, small_high = small.world_bounds()
    assert np.allclose(small_low, low, atol=0.5) and np.allclose(small_high, high, atol=0.5)
    assert check_grid(Grid.from_spacing((10, 12, 9), (1.0, 1.0, 1.0)), 40**3).shape == (10, 12, 9)


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
