"""Synthetic images from label maps (the SynthMorph idea), random smooth fields, label downsampling.

Array-only: every function takes and returns NumPy arrays in ``(z, y, x)`` axis order; reading label
maps from files is the caller's job (``pipeline.importers.load_nifti``).

Label conventions follow FreeSurfer's aseg (the ids of ``human_synthseg/labels_table.txt``):

* **Skull stripping** keeps the brain labels (ids below 500: cerebrum, cerebellum, brain stem,
  ventricles, CSF, vessels, choroid plexus, optic chiasm, ...) and drops SynthSeg's extra-cerebral
  labels in the 500s (skull, scalp, eyes, dura, ...).
* :data:`STANDARD_FS_LABELS` are the structures scored by Dice: VoxelMorph's 30 evaluation labels
  (``human_voxelmorph/labels.npz``) minus the left/right choroid plexus (31, 63), which the SynthSeg
  label maps do not contain — 28 structures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from patchmorph_core.errors import InputError
from patchmorph_core.labels import check_whole_numbers

STANDARD_FS_LABELS: dict[int, str] = {
    2: "left cerebral white matter",
    3: "left cerebral cortex",
    4: "left lateral ventricle",
    7: "left cerebellum white matter",
    8: "left cerebellum cortex",
    10: "left thalamus",
    11: "left caudate",
    12: "left putamen",
    13: "left pallidum",
    14: "3rd ventricle",
    15: "4th ventricle",
    16: "brain-stem",
    17: "left hippocampus",
    18: "left amygdala",
    24: "CSF",
    28: "left ventral DC",
    41: "right cerebral white matter",
    42: "right cerebral cortex",
    43: "right lateral ventricle",
    46: "right cerebellum white matter",
    47: "right cerebellum cortex",
    49: "right thalamus",
    50: "right caudate",
    51: "right putamen",
    52: "right pallidum",
    53: "right hippocampus",
    54: "right amygdala",
    60: "right ventral DC",
}
"""FreeSurfer id → name of the 28 structures used for Dice (VoxelMorph's set without choroid plexus)."""

EXTRA_CEREBRAL_MIN_LABEL: int = 500
"""Labels ``>=`` this id are SynthSeg's extra-cerebral classes; :func:`skull_strip_mask` drops them."""


def _check_labels(labels: np.ndarray, what: str = "label map") -> np.ndarray:
    """Return ``labels`` as a non-negative int64 ``(Z, Y, X)`` array or raise :class:`InputError`."""
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise InputError(f"{what} has shape {arr.shape}: give a 3-D (z, y, x) array of integer labels.")
    check_whole_numbers(arr, what, "give an integer label map.")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise InputError(f"{what} holds negative labels: give non-negative integer label ids.")
    return arr


def skull_strip_mask(labels: np.ndarray) -> np.ndarray:
    """Brain mask of a FreeSurfer/SynthSeg label map: labels ``1..499`` (drops background and the 500s).

    Args:
        labels: ``(Z, Y, X)`` integer label map (FreeSurfer ids).

    Returns:
        ``(Z, Y, X)`` bool mask, True on brain voxels.
    """
    arr = _check_labels(labels)
    return (arr > 0) & (arr < EXTRA_CEREBRAL_MIN_LABEL)


def random_intensities(labels: Sequence[int], rng: np.random.Generator) -> dict[int, float]:
    """One intensity per label id, uniform in ``[0, 1)``, drawn in ascending label order (reproducible)."""
    return {int(label): float(rng.uniform()) for label in sorted(int(v) for v in labels)}


def _smooth_noise(
    shape: Sequence[int], rng: np.random.Generator, cell_vox: float, channels: int
) -> np.ndarray:
    """``(channels, *shape)`` float32 smooth noise: N(0, 1) on a coarse lattice of ``cell_vox``, cubic upsampling."""
    shape_arr = np.asarray(shape, dtype=np.int64)
    coarse = np.maximum(2, np.ceil(shape_arr / max(cell_vox, 1.0)).astype(int) + 1)
    out = np.empty((channels, *shape_arr), dtype=np.float32)
    zoom = shape_arr / coarse
    for c in range(channels):
        noise = rng.standard_normal(tuple(coarse))
        up = ndimage.zoom(noise, zoom, order=3, mode="nearest", grid_mode=False)
        out[c] = up[tuple(slice(0, n) for n in shape_arr)]
    return out


def synthesize_image(
    labels: np.ndarray,
    rng: np.random.Generator,
    intensities: Mapping[int, float] | None = None,
    blur_sigma_vox: float = 1.0,
    bias_strength: float = 0.3,
    noise_std: float = 0.03,
    background_labels: Sequence[int] = (0,),
    skull_strip: bool = True,
) -> np.ndarray:
    """Synthetic intensity image of a label map: one intensity per label, blur, bias field, noise.

    Steps: each voxel gets its label's intensity (``background_labels`` and, with ``skull_strip``, the
    extra-cerebral labels get 0); Gaussian blur of ``blur_sigma_vox`` voxels (partial-volume look);
    a smooth multiplicative bias ``exp(bias_strength * n(x))`` with ``n`` a unit-variance noise
    interpolated from a lattice of ~1/4 of the volume; additive Gaussian noise of ``noise_std``; clip to
    ``[0, 1]``. Clipping (rather than per-image rescaling) keeps one intensity table meaning the same
    contrast in every image.

    Args:
        labels: ``(Z, Y, X)`` integer label map.
        rng: random generator (used for the missing intensities, the bias field and the noise).
        intensities: label id → intensity in ``[0, 1]``; ``None`` draws one per present label
            (:func:`random_intensities`). Labels missing from a given mapping get 0.
        blur_sigma_vox: Gaussian blur sigma in voxels (0 disables).
        bias_strength: standard deviation of the log bias field (0 disables).
        noise_std: standard deviation of the additive noise (0 disables).
        background_labels: label ids painted 0.
        skull_strip: paint the extra-cerebral labels (ids >= 500) 0 as well.

    Returns:
        ``(Z, Y, X)`` float32 image with values in ``[0, 1]``.
    """
    arr = _check_labels(labels)
    present = np.unique(arr)
    table = random_intensities(present, rng) if intensities is None else dict(intensities)
    lut = np.zeros(int(present.max()) + 1, dtype=np.float32)
    for label in present:
        lut[label] = float(table.get(int(label), 0.0))
    for label in background_labels:
        if 0 <= label < lut.size:
            lut[label] = 0.0
    if skull_strip:
        lut[EXTRA_CEREBRAL_MIN_LABEL:] = 0.0
    image = lut[arr]
    if blur_sigma_vox > 0:
        image = ndimage.gaussian_filter(image, blur_sigma_vox)
    if bias_strength > 0:
        cell = max(min(arr.shape) / 4.0, 2.0)
        image *= np.exp(bias_strength * _smooth_noise(arr.shape, rng, cell, 1)[0])
    if noise_std > 0:
        image += rng.normal(0.0, noise_std, size=arr.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)


def random_smooth_field(
    shape: Sequence[int], rng: np.random.Generator, max_disp_vox: float, smoothness_vox: float
) -> np.ndarray:
    """A random smooth displacement field in voxel units.

    Each component is N(0, 1) noise on a coarse lattice with one node every ``smoothness_vox`` voxels,
    upsampled with cubic splines; the field is then scaled so that the largest displacement length is
    exactly ``max_disp_vox`` (the caller randomises the amplitude if it wants to).

    Args:
        shape: ``(Z, Y, X)`` field shape.
        rng: random generator.
        max_disp_vox: maximum displacement length, in voxels.
        smoothness_vox: spacing of the random lattice, in voxels (larger = smoother).

    Returns:
        ``(3, Z, Y, X)`` float32 displacement, components ``(z, y, x)`` in voxels of the grid.
    """
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise InputError(f"field shape {tuple(shape)} is invalid: give three positive sizes (z, y, x).")
    if max_disp_vox < 0 or smoothness_vox <= 0:
        raise InputError("max_disp_vox must be >= 0 and smoothness_vox > 0.")
    field = _smooth_noise(shape, rng, smoothness_vox, 3)
    peak = float(np.sqrt((field**2).sum(axis=0)).max())
    return (field * (max_disp_vox / peak if peak > 0 else 0.0)).astype(np.float32, copy=False)


def downsample_labels(labels: np.ndarray, factor: int | Sequence[int]) -> np.ndarray:
    """Downsample a label map by integer ``factor`` per axis with the block mode (majority label).

    Block ``i`` covers source voxels ``i*f .. i*f+f-1``, so the output lies on
    ``patchmorph_core.source.downsampled_grid(grid, factors, out.shape)`` (new voxel centre at source
    index ``(f-1)/2``). Partial edge blocks are padded by repeating the last voxel. Ties go to the
    smallest label id.

    Args:
        labels: ``(Z, Y, X)`` integer label map.
        factor: one integer or ``(fz, fy, fx)``.

    Returns:
        ``(ceil(Z/fz), ceil(Y/fy), ceil(X/fx))`` label map, same dtype as the input.
    """
    source = np.asarray(labels)
    arr = _check_labels(source)
    factors = tuple(int(f) for f in np.broadcast_to(np.asarray(factor), (3,)))
    if any(f < 1 for f in factors):
        raise InputError(f"downsampling factor {factor} is invalid: give positive integers.")
    pad = [(0, (-n) % f) for n, f in zip(arr.shape, factors, strict=True)]
    padded = np.pad(arr, pad, mode="edge")
    out_shape = tuple(n // f for n, f in zip(padded.shape, factors, strict=True))
    fz, fy, fx = factors
    blocks = padded.reshape(out_shape[0], fz, out_shape[1], fy, out_shape[2], fx)
    blocks = np.sort(blocks.transpose(0, 2, 4, 1, 3, 5).reshape(*out_shape, fz * fy * fx), axis=-1)
    counts = np.zeros(blocks.shape, dtype=np.int32)
    for j in range(blocks.shape[-1]):
        counts += blocks == blocks[..., j : j + 1]
    best = np.argmax(counts, axis=-1)  # first maximum = smallest label among ties (sorted)
    mode = np.take_along_axis(blocks, best[..., None], axis=-1)[..., 0]
    return mode.astype(source.dtype if np.issubdtype(source.dtype, np.integer) else np.int64)
