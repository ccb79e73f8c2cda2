"""Dice over groups of labels (the mouse benchmark's major divisions) on the bundled Allen annotation."""

from __future__ import annotations

import numpy as np
import pytest
from contrasts import LabelSet, ancestors, mouse_atlas, mouse_sets, ontology_parents


def test_label_set_merges_members_before_dice() -> None:
    groups = LabelSet("g", {10: (1, 2), 20: (3,)})
    fixed = np.array([[[1, 1, 2, 3, 0, 7]]])
    warped = np.array([[[2, 2, 1, 0, 3, 7]]])  # 1 <-> 2 swaps stay inside group 10
    np.testing.assert_array_equal(groups.relabel(fixed), [[[10, 10, 10, 20, 0, 0]]])
    scored = groups.score(fixed, warped)
    assert scored["dice"] == {"10": pytest.approx(1.0), "20": pytest.approx(0.0)}
    assert scored["mean_dice"] == pytest.approx(0.5)


def test_the_allen_structures_fall_into_the_major_divisions() -> None:
    parents = ontology_parents()
    assert ancestors(382, parents)[:4] == [382, 375, 1080, 1089]  # CA1 -> CA -> hippocampal region -> HPF
    atlas, grid = mouse_atlas()
    structures, divisions = mouse_sets(atlas)
    assert grid.unit == "micrometer" and np.allclose(grid.spacing, 100.0)
    assert {315, 1089, 512, 1009} <= set(divisions.groups)  # isocortex, HPF, cerebellum, fiber tracts
    members = [m for ms in divisions.groups.values() for m in ms]
    assert len(members) == len(set(members))  # each structure in one division at most
    big = set(structures.groups)
    assert big and all(np.count_nonzero(atlas == label) >= 1000 for label in list(big)[:5])
