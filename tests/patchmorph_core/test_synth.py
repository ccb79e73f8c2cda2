"""Tests of patchmorph_core.synth: synthetic images, smooth fields, label downsampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from patchmorph_core.errors import InputError
from patchmorph_core.synth import (
    STANDARD_FS_LABELS,
    downsample_labels,
    random_smooth_field,
    skull_strip_mask,
    synthesize_image,
)

DATA = Path(__file__).resolve().parents[2] / "tests" / "data"


def _toy_labels() -> np.ndarray:
    labels = np.zeros((12, 10, 14), dtype=np.int32)
    labels[2:10, 2:8, 2:12] = 2
    labels[4:8, 3:7, 4:10] = 17
    labels[0, :, :] = 507  # extra-cerebral
    return labels


def test_synthesize_fixed_intensities_without_corruption_is_exact_lookup() -> None:
    labels = _toy_labels()
    image = synthesize_image(
        labels,
        np.random.default_rng(0),
        {2: 0.4, 17: 0.9, 507: 0.7},
        blur_sigma_vox=0,
        bias_strength=0,
        noise_std=0,
    )
    assert image.dtype == np.float32 and image.shape == labels.shape
    expected = np.select([labels == 2, labels == 17], [0.4, 0.9], 0.0)
    np.testing.assert_allclose(image, expected, atol=1e-7)
    kept = synthesize_image(
        labels,
        np.random.default_rng(0),
        {507: 0.7},
        blur_sigma_vox=0,
        bias_strength=0,
        noise_std=0,
        skull_strip=False,
    )
    assert np.allclose(kept[0], 0.7)


def test_synthesize_with_corruption_is_seeded_bounded_and_keeps_contrast() -> None:
    labels = _toy_labels()
    table = {2: 0.3, 17: 0.8}
    a = synthesize_image(labels, np.random.default_rng(1), table)
    b = synthesize_image(labels, np.random.default_rng(1), table)
    c = synthesize_image(labels, np.random.default_rng(2), table)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert a[labels == 17].mean() > a[labels == 2].mean() + 0.2


def test_synthesize_random_intensities_differ_per_label() -> None:
    labels = _toy_labels()
    image = synthesize_image(labels, np.random.default_rng(3), None, 0, 0, 0)
    assert np.unique(image[labels == 2]).size == 1 and np.unique(image[labels == 17]).size == 1
    assert image[labels == 2][0] != image[labels == 17][0]


def test_skull_strip_mask_drops_background_and_500s() -> None:
    labels = _toy_labels()
    mask = skull_strip_mask(labels)
    np.testing.assert_array_equal(mask, (labels == 2) | (labels == 17))


def test_random_smooth_field_shape_peak_and_smoothness() -> None:
    shape = (20, 16, 24)
    field = random_smooth_field(shape, np.random.default_rng(0), max_disp_vox=3.0, smoothness_vox=8)
    assert field.shape == (3, *shape) and field.dtype == np.float32
    assert np.isclose(np.sqrt((field**2).sum(0)).max(), 3.0, rtol=1e-5)
    step = np.abs(np.diff(field, axis=1)).max()
    assert step < 1.5  # smooth: neighbouring voxels move alike
    np.testing.assert_array_equal(field, random_smooth_field(shape, np.random.default_rng(0), 3.0, 8))


def test_downsample_labels_block_mode_hand_computed() -> None:
    labels = np.zeros((2, 2, 4), dtype=np.uint8)
    labels[:, :, 2:] = 5
    labels[0, 0, 0] = 3  # one 3 among seven 0s -> 0
    labels[:, :, 3] = 7  # block 1: four 5s, four 7s -> tie -> 5
    out = downsample_labels(labels, 2)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[[0, 5]]])


def test_downsample_labels_odd_shape_and_per_axis_factor() -> None:
    labels = np.arange(5 * 3 * 4).reshape(5, 3, 4)
    out = downsample_labels(labels, (2, 1, 4))
    assert out.shape == (3, 3, 1)
    with pytest.raises(InputError):
        downsample_labels(labels, 0)
    with pytest.raises(InputError):
        downsample_labels(labels[0], 2)


def test_standard_labels_exist_in_synthseg_and_voxelmorph_sets() -> None:
    voxelmorph = set(np.load(DATA / "voxelmorph_labels.npz")["labels"].tolist())
    assert set(STANDARD_FS_LABELS) == voxelmorph - {31, 63}
    table = (DATA / "synthseg_labels_table.txt").read_text()
    synthseg = {int(line.split()[0]) for line in table.splitlines() if line[:1].isdigit()}
    assert set(STANDARD_FS_LABELS) <= synthseg
