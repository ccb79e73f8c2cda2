"""What ``patchmorph evaluate`` measures: Dice per label, folded-voxel percentage of a field, NCC of two images.

Inputs are OME-Zarr (level 0 is read), NIfTI or NRRD files. Label maps and images that are compared
must lie on the same grid (warp one onto the other first with ``patchmorph warp``). The folding mask
(``--mask``, a label map; voxels > 0) is resampled with nearest neighbour onto the field's grid.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from patchmorph_core.errors import InputError
from patchmorph_core.labels import check_whole_numbers
from patchmorph_core.metrics import dice_per_label, folding_percent, jacobian_determinant, local_ncc, ncc
from patchmorph_core.sampling import tissue_mask
from patchmorph_core.spatial import Grid, box_corners, read_box, resample
from patchmorph_core.synth import STANDARD_FS_LABELS

logger = logging.getLogger(__name__)


def load_volume(path: str | Path) -> tuple[np.ndarray, Grid]:
    """A ``(Z, Y, X)`` array and its grid from OME-Zarr (level 0), NIfTI or NRRD."""
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        from pipeline.importers import load_nifti

        return load_nifti(path)
    if name.endswith((".nrrd", ".nhdr")):
        from pipeline.importers import load_nrrd

        return load_nrrd(path)
    from pipeline.ngff import read_image

    level = read_image(path).levels[0]
    return read_box(level.array, tuple(slice(0, n) for n in level.grid.shape)), level.grid


def _same_grid(a: Grid, b: Grid, what: str) -> None:
    """InputError unless two grids have the same voxels (:meth:`~patchmorph_core.spatial.Grid.same_voxels`)."""
    if not a.same_voxels(b):
        if a.shape != b.shape:
            differs = f"{a.shape} vs {b.shape} voxels"
        else:
            corners = box_corners(np.zeros(3), np.asarray(a.shape, dtype=np.float64) - 1.0)
            apart = np.linalg.norm(a.index_to_world(corners) - b.with_unit(a.unit).index_to_world(corners), axis=1)
            differs = f"the same shape {a.shape}, but their headers place the voxels up to {apart.max():.3g} {a.unit} apart"
        raise InputError(
            f"the {what} lie on different grids ({differs}): warp one onto the other's grid first (patchmorph warp)."
        )


def _labels_present(
    maps: tuple[np.ndarray, np.ndarray], paths: tuple[str | Path, str | Path], label_set: list[int] | None
) -> None:
    """InputError when a label map is not a map of whole-number ids, or neither holds any label of
    ``label_set``."""
    for labels, path in zip(maps, paths, strict=True):
        check_whole_numbers(labels, f"label map {path}", "it is an image, not a label map; give an integer label map.")
    if label_set is not None and not any(np.isin(labels, label_set).any() for labels in maps):
        raise InputError(
            f"label maps {paths[0]} and {paths[1]} hold none of the labels {label_set[:8]}"
            f"{'...' if len(label_set) > 8 else ''}: check --label-set against the maps' label ids."
        )


def _finite_and_varying(values: np.ndarray, path: str | Path, role: str) -> None:
    """InputError for an image with NaN or infinite values, or one that is constant (no correlation)."""
    if not np.all(np.isfinite(values)):
        raise InputError(f"{role} {path} contains NaN or infinite values: replace them (e.g. by 0) first.")
    if values.size == 0 or np.ptp(values) == 0:
        raise InputError(f"{role} {path} is constant: a correlation with it is undefined; give the image itself.")


def parse_label_set(text: str) -> list[int] | None:
    """``"standard"`` → the 28 FreeSurfer structures; ``"all"`` → None (every label); else ``"2,3,17"``."""
    if text == "standard":
        return list(STANDARD_FS_LABELS)
    if text == "all":
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise InputError(
            f"label set {text!r} is invalid: give 'standard', 'all' or comma-separated ids like 2,3,17."
        ) from err


def evaluate_files(
    *,
    labels_a: str | Path | None = None,
    labels_b: str | Path | None = None,
    label_set: list[int] | None = None,
    field: str | Path | None = None,
    mask: str | Path | None = None,
    image_a: str | Path | None = None,
    image_b: str | Path | None = None,
    ncc_window_vox: int = 9,
) -> dict[str, Any]:
    """Compute the metrics whose inputs are given; returns a JSON-ready dict.

    Args:
        labels_a, labels_b: two label maps on one grid → ``dice`` (per label) and ``mean_dice``.
        label_set: label ids to score (None: every non-zero label present).
        field: a displacement field (``patchmorph register`` output) → ``folding_percent`` (det J <= 0,
            inside the tissue) and the min / 1st percentile / max of det J there (:func:`_field_metrics`).
        mask: optional label map; folding is counted where it is > 0 (resampled onto the field grid); without
            it, inside the tissue of the field's fixed image.
        image_a, image_b: two images on one grid → global ``ncc`` and mean ``local_ncc``.
        ncc_window_vox: window of the local NCC, voxels.
    """
    if (labels_a is None) != (labels_b is None) or (image_a is None) != (image_b is None):
        raise InputError("give both label maps (or neither) and both images (or neither).")
    if labels_a is None and field is None and image_a is None:
        raise InputError("nothing to evaluate: give two label maps, a field, or two images.")
    result: dict[str, Any] = {}
    if labels_a is not None and labels_b is not None:
        a, grid_a = load_volume(labels_a)
        b, grid_b = load_volume(labels_b)
        _same_grid(grid_a, grid_b, "label maps")
        _labels_present((a, b), (labels_a, labels_b), label_set)
        dice = dice_per_label(a, b, label_set)
        values = [v for v in dice.values() if not np.isnan(v)]
        result["dice"] = {str(k): v for k, v in dice.items()}
        result["mean_dice"] = float(np.mean(values)) if values else float("nan")
    if field is not None:
        result.update(_field_metrics(field, mask))
    if image_a is not None and image_b is not None:
        a, grid_a = load_volume(image_a)
        b, grid_b = load_volume(image_b)
        _same_grid(grid_a, grid_b, "images")
        for values, path, role in ((a, image_a, "--image-a"), (b, image_b, "--image-b")):
            _finite_and_varying(values, path, role)
        result["ncc"] = ncc(a, b)
        result["local_ncc"] = local_ncc(a, b, ncc_window_vox)
    return result


def _field_metrics(field: str | Path, mask: str | Path | None) -> dict[str, Any]:
    """Folding percentage and det J statistics of a field file inside the tissue.

    The region is ``mask`` (a label map, > 0) when given, else the tissue of the fixed image named in the
    field's metadata (:func:`~patchmorph_core.sampling.tissue_mask` on the field grid) when that image is
    there, else the whole field grid; ``folding_region`` says which. ``folding_percent_whole_grid`` is
    always reported beside it (most of a field grid is background, where folds matter less).
    """
    from pipeline.ngff import read_field

    array, grid, meta = read_field(field)
    values = read_box(array, tuple(slice(0, n) for n in array.shape)).astype(np.float32)
    mask_arr, region = _fold_region(grid, mask, meta.get("fixed"))
    det = jacobian_determinant(values, grid)
    inside = det if mask_arr is None else det[mask_arr]
    return {
        "folding_percent": folding_percent(values, grid, mask_arr),
        "folding_region": region,
        "folding_percent_whole_grid": folding_percent(values, grid),
        "jacobian_min": float(inside.min()),
        "jacobian_p1": float(np.percentile(inside, 1)),
        "jacobian_max": float(inside.max()),
    }


def _fold_region(grid: Grid, mask: str | Path | None, fixed: str | None) -> tuple[np.ndarray | None, str]:
    """``grid.shape`` bool region where folds are counted, and its description (see :func:`_field_metrics`)."""
    if mask is not None:
        mask_labels, mask_grid = load_volume(mask)
        world = grid.with_unit(mask_grid.unit).points()
        return resample(mask_labels, mask_grid, world, order=0, dtype=mask_labels.dtype) > 0, f"--mask {mask}"
    if fixed is not None and Path(fixed).exists():
        from pipeline.ngff import read_image

        region = tissue_mask(read_image(fixed), grid)
        if region.any():
            return region, f"tissue of the fixed image {fixed}"
    return None, "whole field grid (no --mask, and the field's fixed image is not there)"


def format_table(result: dict[str, Any]) -> str:
    """Two-column plain-text table of a result from :func:`evaluate_files`."""
    rows: list[tuple[str, str]] = []
    for label, value in result.get("dice", {}).items():
        name = STANDARD_FS_LABELS.get(int(label), "")
        rows.append((f"dice {label} {name}".rstrip(), f"{value:.4f}"))
    for key in (
        "mean_dice",
        "folding_percent",
        "folding_percent_whole_grid",
        "jacobian_min",
        "jacobian_p1",
        "jacobian_max",
        "ncc",
        "local_ncc",
    ):
        if key in result:
            rows.append((key, f"{result[key]:.4f}"))
    if "folding_region" in result:
        rows.append(("folds counted in", result["folding_region"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
