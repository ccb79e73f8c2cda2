"""Registration quality metrics: Dice overlap, Jacobian determinant and folding, NCC.

Array-only, ``(z, y, x)`` axis order. Displacement fields follow :mod:`patchmorph_core.spatial`:
``(3, Z, Y, X)`` world displacements (components ``z, y, x``, the grid's unit) of the map
``phi(x) = x + u(x)`` from fixed to moving world points, sampled at the voxel centres of a :class:`Grid`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from patchmorph_core.errors import InputError
from patchmorph_core.labels import check_whole_numbers
from patchmorph_core.spatial import Grid


def _label_array(labels: np.ndarray, what: str) -> np.ndarray:
    """``labels`` as a non-negative int64 array (a float map must hold whole numbers); InputError otherwise."""
    arr = np.asarray(labels)
    check_whole_numbers(arr, what, "it is an image, not a label map; give an integer label map.")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise InputError(f"{what} holds negative labels: give non-negative integer label ids.")
    return arr


def dice_per_label(a: np.ndarray, b: np.ndarray, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice overlap ``2 |A ∩ B| / (|A| + |B|)`` of each label between two label maps on one grid.

    Args:
        a, b: integer label maps of the same shape (any dimensionality; float maps are rounded).
        labels: label ids to score; ``None`` scores every non-zero label present in ``a`` or ``b``.

    Returns:
        label id → Dice in ``[0, 1]``; NaN for a label absent from both maps.
    """
    arr_a = _label_array(a, "first label map")
    arr_b = _label_array(b, "second label map")
    if arr_a.shape != arr_b.shape:
        raise InputError(
            f"label maps have different shapes {arr_a.shape} and {arr_b.shape}: resample one onto the "
            "other's grid first (patchmorph warp)."
        )
    # compact the ids first (atlas ids reach ~1e9): memory follows the number of distinct labels
    ids, inverse = np.unique(np.concatenate([arr_a.ravel(), arr_b.ravel()]), return_inverse=True)
    code_a, code_b = inverse[: arr_a.size], inverse[arr_a.size :]
    count_a = np.bincount(code_a, minlength=ids.size)
    count_b = np.bincount(code_b, minlength=ids.size)
    count_both = np.bincount(code_a[code_a == code_b], minlength=ids.size)
    position = {int(v): k for k, v in enumerate(ids)}
    wanted = [int(v) for v in ids if v != 0] if labels is None else [int(v) for v in labels]
    out: dict[int, float] = {}
    for label in wanted:
        k = position.get(label)
        total = count_a[k] + count_b[k] if k is not None else 0
        out[label] = float(2.0 * count_both[k] / total) if total > 0 else float("nan")
    return out


def mean_dice(a: np.ndarray, b: np.ndarray, labels: Iterable[int] | None = None) -> float:
    """Mean of :func:`dice_per_label` over the labels present in either map (NaNs skipped)."""
    values = [v for v in dice_per_label(a, b, labels).values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _check_field(field: np.ndarray, grid: Grid) -> np.ndarray:
    """``field`` as a float64 ``(3, Z, Y, X)`` array matching ``grid``; InputError otherwise."""
    arr = np.asarray(field)
    if arr.shape != (3, *grid.shape):
        raise InputError(
            f"displacement field has shape {arr.shape} but its grid is {grid.shape}: give a (3, Z, Y, X) "
            "field on that grid."
        )
    return arr.astype(np.float64, copy=False)


def jacobian_determinant(field: np.ndarray, grid: Grid) -> np.ndarray:
    """Jacobian determinant of ``phi(x) = x + u(x)`` at every voxel centre, derivatives in world units.

    The derivative of ``u`` with respect to the array index is taken with central differences (one-sided
    at the borders, :func:`numpy.gradient`); the chain rule with the inverse of the grid's linear part
    ``L`` (world = L @ index + t) gives ``du/dx = (du/dindex) @ L^-1``, so anisotropic, rotated and
    flipped grids give the same determinant as an isotropic one. ``J = I + du/dx``.

    Args:
        field: ``(3, Z, Y, X)`` displacement, components ``(z, y, x)`` in the grid's unit.
        grid: the field's grid.

    Returns:
        ``(Z, Y, X)`` float32 determinant (1 = volume kept, <= 0 = folded).
    """
    arr = _check_field(field, grid)
    inv_linear = grid.inverse_affine[:3, :3].astype(arr.dtype)
    # d_index[c, k] = du_c / d index_k, (3, 3, Z, Y, X); axes of size 1 have no derivative (zero).
    d_index = np.zeros((3, 3, *grid.shape), dtype=arr.dtype)
    for k in range(3):
        if grid.shape[k] > 1:
            d_index[:, k] = np.gradient(arr, axis=1 + k)
    jac = np.einsum("ckzyx,kj->cjzyx", d_index, inv_linear)
    for c in range(3):
        jac[c, c] += 1.0
    det = (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )
    return det.astype(np.float32)


def folding_percent(field: np.ndarray, grid: Grid, mask: np.ndarray | None = None) -> float:
    """Percentage of voxels (inside ``mask`` if given, a ``(Z, Y, X)`` bool array) with det J <= 0."""
    det = jacobian_determinant(field, grid)
    if mask is None:
        return float(100.0 * np.mean(det <= 0))
    mask_arr = np.asarray(mask, dtype=bool)
    if mask_arr.shape != det.shape:
        raise InputError(f"mask shape {mask_arr.shape} differs from the field grid {det.shape}.")
    if not mask_arr.any():
        raise InputError("folding mask is empty: give a mask with at least one True voxel.")
    return float(100.0 * np.mean(det[mask_arr] <= 0))


def _pair(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Two same-shape float64 arrays, restricted to ``mask`` (flattened) when given."""
    arr_a = np.asarray(a, dtype=np.float64)
    arr_b = np.asarray(b, dtype=np.float64)
    if arr_a.shape != arr_b.shape:
        raise InputError(f"images have different shapes {arr_a.shape} and {arr_b.shape}: resample first.")
    if mask is not None:
        mask_arr = np.asarray(mask, dtype=bool)
        if mask_arr.shape != arr_a.shape:
            raise InputError(f"mask shape {mask_arr.shape} differs from the image shape {arr_a.shape}.")
        return arr_a[mask_arr], arr_b[mask_arr]
    return arr_a, arr_b


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Global normalised cross-correlation (Pearson r) of two images, over ``mask`` if given; in [-1, 1].

    ``a``, ``b`` and ``mask`` (boolean) are arrays of one shape (any, e.g. ``(Z, Y, X)``). A constant image gives 0.
    """
    arr_a, arr_b = _pair(a, b, mask)
    da = arr_a - arr_a.mean()
    db = arr_b - arr_b.mean()
    denom = np.sqrt((da * da).sum() * (db * db).sum())
    return float((da * db).sum() / denom) if denom > 0 else 0.0


def local_ncc(
    a: np.ndarray, b: np.ndarray, window_vox: int = 9, mask: np.ndarray | None = None, eps: float = 1e-10
) -> float:
    """Mean local normalised cross-correlation of two ``(Z, Y, X)`` images of one shape in cubic windows of
    ``window_vox`` voxels per edge.

    At every voxel the correlation coefficient ``cov / sqrt(var_a var_b)`` of the two images inside the
    window centred there (box filter, edges reflected) is computed; the result is its mean over the
    voxels (inside ``mask`` if given) whose windows are not flat (``var_a var_b > eps``): a flat window,
    e.g. empty background, has no defined correlation and is left out (0 if every window is flat).
    Unlike VoxelMorph's loss it is not squared, so anti-correlated windows count as negative.
    """
    arr_a, arr_b = _pair(a, b, None)
    size = int(window_vox)
    mean_a = ndimage.uniform_filter(arr_a, size)
    mean_b = ndimage.uniform_filter(arr_b, size)
    cov = ndimage.uniform_filter(arr_a * arr_b, size) - mean_a * mean_b
    var_a = np.maximum(ndimage.uniform_filter(arr_a * arr_a, size) - mean_a**2, 0.0)
    var_b = np.maximum(ndimage.uniform_filter(arr_b * arr_b, size) - mean_b**2, 0.0)
    product = var_a * var_b
    valid = product > eps
    if mask is not None:
        mask_arr = np.asarray(mask, dtype=bool)
        if mask_arr.shape != product.shape:
            raise InputError(f"mask shape {mask_arr.shape} differs from the image shape {product.shape}.")
        valid &= mask_arr
    if not valid.any():
        return 0.0
    return float(np.clip(cov[valid] / np.sqrt(product[valid]), -1.0, 1.0).mean())
