"""Similarities: MIND ignores the contrast, forces point to the answer, locality (the polish takes its force
from these objects: tests/patchmorph_core/test_polish.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from patchmorph_core.similarity import MIND_PAIRS, LocalNCC, MindSSC, make_similarity, mind_ssc

SHAPE = (22, 27, 19)  # non-cubic, so a transposed axis fails


def _labels(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Random blobs: smooth noise cut into 6 classes (a label map with edges in every direction)."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.0)
    return np.digitize(noise, np.quantile(noise, np.linspace(0, 1, 7)[1:-1]))


def _image(labels: np.ndarray, seed: int) -> torch.Tensor:
    """One random intensity per label (a contrast), slightly blurred, ``(1, 1, Z, Y, X)``."""
    table = np.random.default_rng(seed).uniform(size=int(labels.max()) + 1)
    return torch.as_tensor(ndimage.gaussian_filter(table[labels], 0.7), dtype=torch.float32)[None, None]


def test_mind_pairs_are_the_twelve_ssc_pairs() -> None:
    assert len(MIND_PAIRS) == 12
    assert len(set(MIND_PAIRS)) == 12


def test_mind_is_contrast_invariant_where_ncc_is_not() -> None:
    labels = _labels()
    a, b = _image(labels, 1), _image(labels, 2)  # the same anatomy, two contrasts
    shifted = _image(np.roll(labels, 2, axis=1), 2)  # a misaligned one in the second contrast
    mind, ncc = MindSSC(), LocalNCC(radius=2)
    assert mind.loss(a, b) < 0.5 * mind.loss(a, shifted)
    assert mind.loss(a, a) == pytest.approx(0.0, abs=1e-7)
    assert -ncc.loss(a, b) < 0.8  # squared local NCC is far from 1 across contrasts


@pytest.mark.parametrize("name", ["ncc", "mind"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_force_points_to_the_displacement_that_aligns(name: str, axis: int) -> None:
    labels = _labels(3)
    fixed = _image(labels, 1)
    moving = _image(np.roll(labels, 1, axis=axis), 1 if name == "ncc" else 2)  # moved by +1 voxel along axis
    force = make_similarity(name).force(fixed, moving)[0].numpy()  # (3, Z, Y, X)
    mean = force[:, 4:-4, 4:-4, 4:-4].mean(axis=(1, 2, 3))
    assert mean[axis] > 0  # the field that aligns is u = +1 voxel along axis
    assert abs(mean[axis]) > 3 * np.delete(np.abs(mean), axis).max()


@pytest.mark.parametrize("name", ["ncc", "mind"])
def test_force_towards_a_fixed_image_is_the_force_for_every_warped_image(name: str) -> None:
    """The fixed image's part computed once (as the polish steps) gives exactly the force of each call."""
    similarity = make_similarity(name)
    labels = _labels(5)
    fixed = _image(labels, 1)
    towards = similarity.force_towards(fixed)
    for shift, axis in ((1, 0), (-2, 2)):
        warped = _image(np.roll(labels, shift, axis=axis), 3)
        assert torch.equal(towards(warped), similarity.force(fixed, warped))


@pytest.mark.parametrize("name", ["ncc", "mind"])
def test_values_depend_only_on_voxels_within_reach(name: str) -> None:
    similarity = make_similarity(name)
    labels = _labels(4)
    fixed, warped = _image(labels, 1), _image(np.roll(labels, 1, axis=0), 5)
    whole_map, whole_force = similarity.voxel_map(fixed, warped), similarity.force(fixed, warped)
    box = (slice(None), slice(None), slice(3, 20), slice(5, 24), slice(2, 17))
    part_map, part_force = similarity.voxel_map(fixed[box], warped[box]), similarity.force(fixed[box], warped[box])
    r = similarity.reach
    inner = (slice(None), slice(None), slice(r, -r), slice(r, -r), slice(r, -r))
    inner_whole = (slice(None), slice(None), slice(3 + r, 20 - r), slice(5 + r, 24 - r), slice(2 + r, 17 - r))
    torch.testing.assert_close(part_map[inner], whole_map[inner_whole], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(part_force[inner], whole_force[inner_whole], atol=1e-5, rtol=1e-4)


def test_mind_descriptor_range_and_gradient_flows() -> None:
    image = _image(_labels(), 1).requires_grad_(True)
    descriptor = mind_ssc(image).detach()
    assert descriptor.shape == (1, 12, *SHAPE)
    assert float(descriptor.min()) >= 0.0 and float(descriptor.max()) <= 1.0
    MindSSC().loss(_image(_labels(), 2), image).backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0


def _mind_reference(image: np.ndarray, radius: int, dilation: int) -> np.ndarray:
    """MIND-SSC by its definition, voxel by voxel: the image extended by replicating its border, each pair's
    squared difference averaged over the full (2 radius + 1)³ window, ``exp(−(D − min D) / V)``."""
    pad = dilation + radius
    extended = np.pad(image.astype(np.float64), pad, mode="edge")
    window = np.arange(-radius, radius + 1)
    ssd = np.zeros((len(MIND_PAIRS), *image.shape))
    for c, (a, b) in enumerate(MIND_PAIRS):
        for q in np.ndindex(*image.shape):
            total = 0.0
            for t in np.ndindex(*(len(window),) * 3):
                y = [pad + q[i] + window[t[i]] for i in range(3)]
                first = extended[tuple(y[i] + dilation * (a[i] - 1) for i in range(3))]
                second = extended[tuple(y[i] + dilation * (b[i] - 1) for i in range(3))]
                total += (first - second) ** 2
            ssd[(c, *q)] = total / len(window) ** 3
    ssd -= ssd.min(axis=0)
    return np.exp(-ssd / np.maximum(ssd.mean(axis=0), 1e-3))


@pytest.mark.parametrize(("radius", "dilation"), [(1, 2), (1, 1), (2, 1)])
def test_mind_is_its_definition_at_every_voxel_border_included(radius: int, dilation: int) -> None:
    """The six shared differences and their window sums give each channel's value of the definition, on a
    non-cubic volume, at the border as well (where neighbours and windows reach the replicated border)."""
    image = np.random.default_rng(7).uniform(size=(5, 7, 6)).astype(np.float32)
    expected = _mind_reference(image, radius, dilation)
    got = mind_ssc(torch.from_numpy(image)[None, None], radius, dilation)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=5e-6)
    with_grad = mind_ssc(torch.from_numpy(image)[None, None].requires_grad_(True), radius, dilation)
    np.testing.assert_allclose(with_grad[0].detach().numpy(), got, atol=1e-7)  # in place or not: the same values


def test_unknown_similarity_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        make_similarity("mi")


@pytest.mark.parametrize("window", [3, 5, 9, 11])
def test_box_mean_is_the_truncated_average_and_its_gradient(window: int) -> None:
    """Shifted sums over counts give avg_pool3d's truncated windows (count_include_pad=False) and gradients,
    also where the window exceeds an axis (it shrinks to the axis' largest odd size)."""
    from patchmorph_core.similarity import box_mean

    x = torch.rand(2, 3, 4, 9, 3, dtype=torch.float64, requires_grad=True)
    reference = x
    for axis in range(3):
        size = min(window, x.shape[2 + axis])
        size -= 1 - size % 2
        kernel, padding = [1, 1, 1], [0, 0, 0]
        kernel[axis], padding[axis] = size, size // 2
        reference = torch.nn.functional.avg_pool3d(reference, tuple(kernel), 1, tuple(padding), count_include_pad=False)
    ours = box_mean(x, window)
    torch.testing.assert_close(ours, reference)
    weights = torch.rand_like(reference)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), x)
    torch.testing.assert_close(grad_ours, grad_reference)
