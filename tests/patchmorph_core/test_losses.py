"""Similarity and regularizer on closed-form cases; the regularizer means the same at every scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchmorph_core.config import LossConfig
from patchmorph_core.losses import fold_loss, local_ncc_loss, mse_loss, smoothness_loss, stage_loss
from patchmorph_core.similarity import box_mean
from patchmorph_core.spatial import patch_grid, random_rotation
from patchmorph_core.transforms import index_points

P = 16


def _linear(extent: float, seed: int = 1) -> torch.Tensor:
    grid = patch_grid((0.0, 0.0, 0.0), extent, P, random_rotation(np.random.default_rng(seed), 90.0))
    return torch.as_tensor(np.array(grid.linear), dtype=torch.float32)[None]


def _world(linear: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,zyxj->izyx", linear[0], index_points((P, P, P)))[None]


def test_box_mean_equals_cubic_average() -> None:
    x = torch.rand(2, 3, 10, 11, 9)
    expected = F.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
    torch.testing.assert_close(box_mean(x, 5), expected)


def test_local_ncc_identical_and_linearly_related() -> None:
    image = torch.rand(1, 1, P, P, P)
    assert local_ncc_loss(image, image).item() == pytest.approx(-1.0, abs=1e-2)
    assert local_ncc_loss(image, 0.5 * image + 0.2).item() == pytest.approx(-1.0, abs=1e-2)
    assert local_ncc_loss(image, torch.rand(1, 1, P, P, P)).item() > -0.2
    assert mse_loss(image, image + 0.1).item() == pytest.approx(0.01, rel=1e-4)


def test_smoothness_of_affine_and_scale_invariance() -> None:
    matrix = torch.tensor([[0.1, 0.05, 0.0], [0.0, -0.1, 0.0], [0.02, 0.0, 0.2]])
    for extent in (2.0, 200.0):  # the same deformation on a 2 mm and a 200 mm patch
        linear = _linear(extent)
        disp = torch.einsum("ij,bjzyx->bizyx", matrix, _world(linear)) + extent
        assert smoothness_loss(disp, linear, affine_free=True).item() == pytest.approx(0.0, abs=1e-6)
        assert smoothness_loss(disp, linear, affine_free=False).item() == pytest.approx(
            float(matrix.square().sum()), rel=1e-3
        )
    # a sinusoid scaled with the patch: same smoothness at both scales
    values = []
    for extent in (2.0, 200.0):
        linear = _linear(extent)
        x = _world(linear)
        disp = torch.zeros_like(x)
        disp[:, 0] = 0.05 * extent * torch.sin(2 * torch.pi * x[:, 1] / extent)
        values.append(smoothness_loss(disp, linear).item())
    assert values[0] == pytest.approx(values[1], rel=1e-3)
    assert values[0] > 0


def test_fold_loss_zero_without_folds_positive_with() -> None:
    linear = _linear(50.0)
    x = _world(linear)
    assert fold_loss(torch.zeros_like(x), linear).item() == 0.0
    folded = torch.zeros_like(x)
    folded[:, 2] = -1.5 * x[:, 2]  # det J = -0.5
    assert fold_loss(folded, linear, eps=0.05).item() == pytest.approx(0.55, rel=1e-4)


def test_stage_loss_sums_weighted_parts() -> None:
    linear = _linear(30.0)
    fixed = torch.rand(1, 1, P, P, P)
    disp = torch.zeros(1, 3, P, P, P)
    disp[:, 1] = -1.5 * _world(linear)[:, 1]
    config = LossConfig(smooth_weight=2.0, fold_weight=3.0)
    total, parts = stage_loss(fixed, fixed, disp, linear, config)
    assert parts["sim"] == pytest.approx(-1.0, abs=1e-2)
    assert total.item() == pytest.approx(parts["sim"] + 2.0 * parts["smooth"] + 3.0 * parts["fold"], rel=1e-5)
    _, mse_parts = stage_loss(fixed, fixed, disp, linear, LossConfig(similarity="mse"))
    assert mse_parts["sim"] == 0.0


def test_stage_loss_with_mind_prefers_the_aligned_patch_across_contrasts() -> None:
    rng = np.random.default_rng(5)
    labels = torch.as_tensor(rng.integers(0, 4, size=(1, 1, 4, 4, 4)), dtype=torch.float32)
    labels = F.interpolate(labels, size=(P, P, P), mode="nearest")
    fixed = labels / 3.0
    other_contrast = torch.as_tensor([0.9, 0.1, 0.6, 0.3])[labels.long()]
    linear, disp = _linear(20.0), torch.zeros(1, 3, P, P, P)
    config = LossConfig(similarity="mind")
    aligned, parts = stage_loss(fixed, other_contrast, disp, linear, config)
    shifted, _ = stage_loss(fixed, torch.roll(other_contrast, 3, dims=3), disp, linear, config)
    assert parts["sim"] < 0.75 * float(shifted)
    assert float(aligned) < float(shifted)


def test_a_pair_of_independent_contrasts_takes_the_cross_contrast_similarity_and_weight() -> None:
    linear, disp = _linear(20.0), torch.zeros(1, 3, P, P, P)
    fixed = torch.rand(1, 1, P, P, P)
    moving = 1.0 - fixed  # one contrast the other's negative: local NCC -1, MIND indifferent to the sign
    config = LossConfig(similarity="ncc", cross_contrast_similarity="mind", cross_contrast_weight=4.0, smooth_weight=0.0)
    assert config.for_pair(same_contrast=True) is config
    _, same = stage_loss(fixed, moving, disp, linear, config.for_pair(same_contrast=True))
    total, cross = stage_loss(fixed, moving, disp, linear, config.for_pair(same_contrast=False))
    _, mind = stage_loss(fixed, moving, disp, linear, LossConfig(similarity="mind"))
    assert same["sim"] == pytest.approx(-1.0, abs=1e-2)  # squared NCC of a negated image is +1, the loss −1
    assert cross["sim"] == pytest.approx(mind["sim"]) and total.item() == pytest.approx(4.0 * cross["sim"], rel=1e-5)
    assert LossConfig(similarity="mind").for_pair(same_contrast=False).similarity == "mind"  # no override set
