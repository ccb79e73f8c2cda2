"""Dice over groups of labels (the mouse benchmark's major divisions) on the bundled Allen annotation; the real
MRI's axes named from its segmentation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from contrasts import LabelSet, ancestors, mouse_atlas, mouse_sets, mri_orientation, ontology_parents

from patchmorph_core.spatial import Grid


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


def _blobs() -> np.ndarray:
    """A toy FreeSurfer segmentation, axes (posterior→anterior, inferior→superior, left→right), non-cubic: left
    and right structures mirrored, thalamus above the brain stem, caudate in front of the cerebellar cortex."""
    labels = np.zeros((20, 24, 28), dtype=np.int32)
    for label, (a, s, r) in {
        2: (10, 12, 5), 41: (10, 12, 22),  # cerebral white matter
        10: (10, 15, 11), 49: (10, 15, 16),  # thalamus
        16: (10, 4, 13),  # brain stem (centred between the hemispheres)
        8: (2, 7, 8), 47: (2, 7, 19),  # cerebellar cortex
        11: (17, 13, 10), 50: (17, 13, 17),  # caudate
    }.items():  # fmt: skip
        labels[a - 1 : a + 2, s - 1 : s + 2, r - 1 : r + 2] = label
    return labels


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("flips", [(), (0,), (1, 2), (0, 1, 2)])
def test_the_scans_axes_are_named_from_its_segmentation(perm: tuple[int, ...], flips: tuple[int, ...]) -> None:
    """Whatever the axis order and signs of the file, the named axes put right, up and front where they are."""
    labels = np.flip(np.transpose(_blobs(), perm), flips) if flips else np.transpose(_blobs(), perm)
    grid = Grid.from_orientation(labels.shape, (1.0, 1.0, 1.0), mri_orientation(labels), unit="millimeter")

    def centre(ids: tuple[int, ...]) -> np.ndarray:  # world (S, A, R) components
        return grid.index_to_world(np.argwhere(np.isin(labels, ids))).mean(axis=0)

    assert (centre((41, 47, 49, 50)) - centre((2, 8, 10, 11)))[2] > 5  # right of left
    assert (centre((10, 49)) - centre((16,)))[0] > 5  # thalamus above the brain stem
    assert (centre((11, 50)) - centre((8, 47)))[1] > 5  # caudate in front of the cerebellum
