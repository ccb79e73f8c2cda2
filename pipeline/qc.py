"""Quality-control figures of a registration, as PNG files (matplotlib, Agg backend).

Four figures, each three orthogonal slices through the centre of the fixed image, drawn with their physical
aspect ratio: when the image's orientation is known, horizontal, coronal and sagittal, each the usual way up
(:data:`DISPLAY_ORIENTATION`), so that brains stored in different axis orders look alike; else the ``z``, ``y``,
``x`` planes of its arrays:

* ``overlay``: the fixed image (the sample) with the outline of the warped moving image (the atlas):
  the boundaries between the warped atlas labels when there are labels, else an iso-contour of the
  warped atlas intensity;
* ``checkerboard``: alternating squares of the fixed and the warped moving image;
* ``jacobian``: the Jacobian determinant of ``x -> x + u(x)`` (1 = volume kept, < 1 shrink, > 1 grow,
  <= 0 folded, drawn in black);
* ``uncertainty``: the local dissimilarity of the fixed and the registered moving image left after the polish
  (MIND-SSC, 0-1; :func:`patchmorph_core.polish.residual_map`), or without a polish the spread of the
  overlapping patch estimates, in world units.

The array functions (``*_figure``) take in-memory ``(Z, Y, X)`` arrays; :func:`qc_files` reads the
outputs of ``register``/``warp`` at a coarse pyramid level (memory bounded by ``max_size``, never by the
volume size) and writes all four.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict
from skimage.filters import threshold_otsu
from skimage.segmentation import find_boundaries

from patchmorph_core.metrics import dice_per_label, jacobian_determinant, ncc
from patchmorph_core.source import Level, MultiscaleImage, downsample, downsampled_grid
from patchmorph_core.spatial import (
    AXES,
    Grid,
    axes_between,
    orientation_code,
    read_box,
    reorient_array,
    resample,
)
from pipeline.ngff import read_field, read_image

logger = logging.getLogger(__name__)

_PLANES: tuple[tuple[int, int], ...] = ((1, 2), (0, 2), (0, 1))
"""For each slicing axis (z, y, x), the two in-plane axes (rows, columns)."""


class QCRecord(BaseModel):
    """Paths of the QC figures written for one registration, by kind."""

    model_config = ConfigDict(extra="forbid")

    figures: dict[str, Path]


# -- slicing ------------------------------------------------------------------------------------------
def central_slices(volume: np.ndarray, center: Sequence[int] | None = None) -> list[np.ndarray]:
    """The three orthogonal 2-D slices of a ``(Z, Y, X)`` volume through ``center`` (default: the middle).

    Returns:
        ``[volume[cz], volume[:, cy], volume[:, :, cx]]`` of shapes ``(Y, X)``, ``(Z, X)``, ``(Z, Y)``.
    """
    c = [s // 2 for s in volume.shape] if center is None else [int(v) for v in center]
    return [volume[c[0]], volume[:, c[1]], volume[:, :, c[2]]]


def tissue_centre(labels: np.ndarray) -> list[int] | None:
    """The voxel ``(z, y, x)`` at the centre of the non-zero voxels' bounding box (None when there are none)."""
    nonzero = [np.flatnonzero(np.asarray(labels).any(axis=tuple(k for k in range(3) if k != axis))) for axis in range(3)]
    if any(len(n) == 0 for n in nonzero):
        return None
    return [int((n[0] + n[-1]) // 2) for n in nonzero]


def display_range(image: np.ndarray, low: float = 1.0, high: float = 99.5) -> tuple[float, float]:
    """Robust grey-value window ``(lo, hi)`` of an image of any shape, in its grey values (the ``low`` and
    ``high`` percentiles, in percent, of its finite values)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [low, high])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _aspect(spacing: Sequence[float], axis: int) -> float:
    """Pixel aspect (height / width) of the slice perpendicular to ``axis``."""
    rows, cols = _PLANES[axis]
    return float(spacing[rows]) / float(spacing[cols])


DISPLAY_ORIENTATION = "sal"
"""How the figures lay out a brain whose orientation is known, whatever its file's array order: the first panel
horizontal (anterior up, left on the left), the second coronal (superior up, left on the left), the third
sagittal (superior up, anterior on the left)."""


def displayed(
    volumes: Sequence[np.ndarray | None], spacing: Sequence[float], orientation: str | None
) -> tuple[list[np.ndarray | None], np.ndarray, str | None]:
    """``(Z, Y, X)`` volumes of one grid, their voxel size and orientation code laid out as
    :data:`DISPLAY_ORIENTATION` (axes permuted and flipped, no resampling); unchanged when the orientation is not
    known (an oblique grid: the panels then follow the array axes and are named by them)."""
    if orientation is None:
        return list(volumes), np.asarray(spacing, dtype=np.float64), None
    order, _ = axes_between(orientation, DISPLAY_ORIENTATION)
    shown = [None if v is None else reorient_array(np.asarray(v), orientation, DISPLAY_ORIENTATION) for v in volumes]
    return shown, np.asarray(spacing, dtype=np.float64)[list(order)], DISPLAY_ORIENTATION


_OPPOSITE = {"a": "p", "p": "a", "s": "i", "i": "s", "l": "r", "r": "l"}
_PLANE_OF = {
    "s": "horizontal",
    "i": "horizontal",
    "a": "coronal",
    "p": "coronal",
    "l": "sagittal",
    "r": "sagittal",
}


@dataclass(frozen=True)
class PlaneView:
    """How one central slice is labelled.

    Attributes:
        title: the plane's anatomical name (``coronal``, ``sagittal``, ``horizontal``) or ``"<axis> slice"``.
        edges: anatomical side at the ``(top, bottom, left, right)`` edges of the drawn slice (capital letters
            ``A P S I L R``), or None when the image's orientation is not known.
        axes: ``(rows, columns)`` array-axis names of the slice.
    """

    title: str
    edges: tuple[str, str, str, str] | None
    axes: tuple[str, str]


def plane_views(orientation: str | None, axis_names: bool = True) -> list[PlaneView]:
    """The labels of the slices perpendicular to array axes ``z``, ``y``, ``x`` for an orientation code
    (each letter names the side where index 0 lies, drawn at the top or the left; None: axis names only).
    ``axis_names=False`` leaves the array axis out of the titles of a known orientation (arrays laid out for
    display, :func:`displayed`, whose axes are not the file's)."""
    views = []
    for axis, (rows, cols) in enumerate(_PLANES):
        names = (AXES[rows], AXES[cols])
        if orientation is None:
            views.append(PlaneView(f"{AXES[axis]} slice", None, names))
            continue
        code = orientation.lower()
        edges = (code[rows], _OPPOSITE[code[rows]], code[cols], _OPPOSITE[code[cols]])
        title = _PLANE_OF[code[axis]]
        if axis_names:
            title += f" ({AXES[axis]} = {code[axis].upper()}→{_OPPOSITE[code[axis]].upper()})"
        views.append(PlaneView(title, tuple(e.upper() for e in edges), names))  # type: ignore[arg-type]
    return views


def _figure(title: str) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(12, 4.4), layout="constrained")  # no pyplot: the caller's backend is left alone
    axes = fig.subplots(1, 3)
    fig.suptitle(title)
    return fig, axes


def _label_edges(ax: Any, view: PlaneView) -> None:
    """Write the anatomical side letters at the four edges of a drawn slice (or the array axes' names)."""
    if view.edges is None:
        ax.set_xlabel(f"{view.axes[1]} →")
        ax.set_ylabel(f"← {view.axes[0]}")
        return
    top, bottom, left, right = view.edges
    from matplotlib import patheffects

    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    style = {
        "color": "yellow",
        "fontsize": 11,
        "fontweight": "bold",
        "transform": ax.transAxes,
        "path_effects": outline,
    }
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)


def _finish(
    fig: Figure, axes: np.ndarray, path: Path, orientation: str | None = None, axis_names: bool = False
) -> Path:
    for ax, view in zip(axes, plane_views(orientation, axis_names), strict=True):
        ax.set_title(view.title)
        _label_edges(ax, view)
        ax.set_xticks([])
        ax.set_yticks([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    logger.info("wrote QC figure %s", path)
    return path


# -- figures on arrays --------------------------------------------------------------------------------
def label_edges(labels: np.ndarray, min_pixels: int = 480) -> np.ndarray:
    """Thin boundaries between labels of a 2-D label slice, on a grid refined to ``min_pixels`` per side.

    The slice is enlarged by an integer factor (nearest neighbour) before the boundaries are traced, so
    the lines stay one display pixel wide however coarse the preview level is.

    Returns:
        Boolean edge mask of shape ``labels.shape * factor``.
    """
    factor = max(1, -(-min_pixels // max(labels.shape)))
    fine = np.repeat(np.repeat(labels, factor, axis=0), factor, axis=1)
    return find_boundaries(fine, mode="inner")


def relabel(labels: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """``labels`` (any shape) with every id replaced by ``mapping[id]`` (ids missing from it, and 0, kept), as
    int64 of the same shape."""
    values, inverse = np.unique(labels, return_inverse=True)
    mapped = np.array([mapping.get(int(v), int(v)) if v != 0 else 0 for v in values], dtype=np.int64)
    return mapped[inverse].reshape(labels.shape)


def _draw_outline(ax: Any, labels: np.ndarray, aspect: float) -> None:
    edges = label_edges(np.asarray(labels))
    rows, cols = labels.shape
    ax.imshow(
        np.ma.masked_where(~edges, edges), cmap="autumn", aspect=aspect, interpolation="nearest",
        extent=(-0.5, cols - 0.5, rows - 0.5, -0.5),
    )  # fmt: skip


def overlay_figure(
    fixed: np.ndarray,
    spacing: Sequence[float],
    path: Path,
    warped_labels: np.ndarray | None = None,
    warped: np.ndarray | None = None,
    title: str = "warped atlas outline over the sample",
    orientation: str | None = None,
) -> Path:
    """Fixed image with the outline of the warped moving labels (or of the warped moving image).

    Args:
        fixed: ``(Z, Y, X)`` fixed image.
        spacing: ``(3,)`` voxel size ``(z, y, x)`` of the arrays (for the aspect ratio).
        path: PNG file to write.
        warped_labels: ``(Z, Y, X)`` integer labels on the fixed grid; boundaries between labels are drawn
            (map them to a few divisions first, :func:`relabel`, for a figure that reads).
        warped: ``(Z, Y, X)`` warped moving image on the fixed grid, used when there are no labels
            (its Otsu iso-contour is drawn).
        title: figure title.
        orientation: orientation code of the arrays (names the planes and their edges).
    """
    (fixed, warped_labels, warped), spacing, orientation = displayed((fixed, warped_labels, warped), spacing, orientation)
    lo, hi = display_range(fixed)
    fig, axes = _figure(title)
    labels_slices = central_slices(warped_labels) if warped_labels is not None else [None] * 3
    warped_slices = central_slices(warped) if warped is not None else [None] * 3
    level = None
    if warped_labels is None and warped is not None and np.ptp(warped) > 0:
        level = float(threshold_otsu(np.asarray(warped, dtype=np.float32)))
    for axis, (ax, sample) in enumerate(zip(axes, central_slices(fixed), strict=True)):
        aspect = _aspect(spacing, axis)
        ax.imshow(sample, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        if labels_slices[axis] is not None:
            _draw_outline(ax, labels_slices[axis], aspect)
        elif level is not None and warped_slices[axis] is not None:
            ax.contour(warped_slices[axis], levels=[level], colors="yellow", linewidths=0.8)
    return _finish(fig, axes, path, orientation)


def checkerboard(fixed: np.ndarray, warped: np.ndarray, squares: int = 8) -> np.ndarray:
    """``(Z, Y, X)`` checkerboard of two intensity-normalised volumes, ``squares`` squares per axis."""
    fixed_n = _normalised(fixed)
    warped_n = _normalised(warped)
    index = np.indices(fixed.shape)
    cells = [(index[k] * squares) // max(fixed.shape[k], 1) for k in range(3)]
    mask = (cells[0] + cells[1] + cells[2]) % 2 == 0
    return np.where(mask, fixed_n, warped_n)


def _normalised(image: np.ndarray) -> np.ndarray:
    lo, hi = display_range(image)
    return np.clip((np.asarray(image, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


def checkerboard_figure(
    fixed: np.ndarray,
    warped: np.ndarray,
    spacing: Sequence[float],
    path: Path,
    squares: int = 8,
    orientation: str | None = None,
    title: str = "checkerboard: fixed / warped moving",
) -> Path:
    """Checkerboard of the fixed and the warped moving image (both ``(Z, Y, X)`` on the fixed grid)."""
    (board,), spacing, orientation = displayed((checkerboard(fixed, warped, squares),), spacing, orientation)
    fig, axes = _figure(title)
    for axis, (ax, plane) in enumerate(zip(axes, central_slices(board), strict=True)):
        ax.imshow(plane, cmap="gray", vmin=0, vmax=1, aspect=_aspect(spacing, axis), interpolation="nearest")
    return _finish(fig, axes, path, orientation)


JACOBIAN_RANGE: tuple[float, float] = (0.25, 4.0)
"""Colour range of the Jacobian figure (det J, log scale): a quarter to four times the volume."""


def jacobian_figure(
    jacobian: np.ndarray,
    spacing: Sequence[float],
    path: Path,
    orientation: str | None = None,
    mask: np.ndarray | None = None,
) -> Path:
    """Jacobian determinant ``(Z, Y, X)`` on a log colour scale centred on 1 (blue shrinks, red grows; values
    beyond :data:`JACOBIAN_RANGE` in its end colours), folds (det J <= 0) in black; outside ``mask`` (the
    tissue, when given) grey. The title gives the range and the folded share inside the mask."""
    inside = np.ones(jacobian.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    (jacobian, inside), spacing, orientation = displayed((jacobian, inside), spacing, orientation)
    values = jacobian[inside] if inside.any() else jacobian.ravel()
    where = "inside the tissue" if mask is not None else "over the field"
    fig, axes = _figure(
        f"Jacobian determinant {where}: min {np.nanmin(values):.3g}, max {np.nanmax(values):.3g}, "
        f"folded {100.0 * np.mean(values <= 0):.3g} %"
    )
    base = matplotlib.colormaps["RdBu_r"]
    cmap = base.with_extremes(under=base(0.0), over=base(1.0), bad="0.6")
    norm = matplotlib.colors.LogNorm(*JACOBIAN_RANGE)
    folds = matplotlib.colors.ListedColormap(["black"])
    image = None
    for axis, (ax, plane, keep) in enumerate(
        zip(axes, central_slices(jacobian), central_slices(inside), strict=True)
    ):
        aspect = _aspect(spacing, axis)
        shown = np.ma.masked_where(~keep, np.where(plane > 0, plane, JACOBIAN_RANGE[0]))
        image = ax.imshow(shown, cmap=cmap, norm=norm, aspect=aspect, interpolation="nearest")
        folded = np.ma.masked_where(~(keep & (plane <= 0)), np.ones(plane.shape))
        ax.imshow(folded, cmap=folds, aspect=aspect, interpolation="nearest")
    bar = fig.colorbar(
        image, ax=list(axes), shrink=0.8, extend="both", label="det J (log scale); black: folded (det J ≤ 0)"
    )
    bar.ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ticks = [0.25, 0.5, 1.0, 2.0, 4.0]
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    return _finish(fig, axes, path, orientation)


def uncertainty_figure(
    uncertainty: np.ndarray, spacing: Sequence[float], path: Path, unit: str, orientation: str | None = None
) -> Path:
    """Map of the registration's uncertainty ``(Z, Y, X)``; ``unit`` labels the colour bar (the residual's
    name, or the world unit of a spread)."""
    (uncertainty,), spacing, orientation = displayed((uncertainty,), spacing, orientation)
    lo, hi = display_range(uncertainty, 0.0, 99.0)
    fig, axes = _figure("registration uncertainty")
    image = None
    for axis, (ax, plane) in enumerate(zip(axes, central_slices(uncertainty), strict=True)):
        image = ax.imshow(
            plane,
            cmap="magma",
            vmin=0.0,
            vmax=max(hi, 1e-12),
            aspect=_aspect(spacing, axis),
            interpolation="nearest",
        )
    fig.colorbar(image, ax=list(axes), shrink=0.8, label=unit)
    return _finish(fig, axes, path, orientation)


def orientation_preview(
    planes: Sequence[np.ndarray],
    spacing: Sequence[float],
    path: str | Path,
    orientation: str | None,
    source: str,
    shape: Sequence[int] | None = None,
) -> Path:
    """The three mid-planes of an image, each labelled with the anatomical sides its edges face under
    ``orientation`` — how a user checks an orientation code, or finds one (``patchmorph convert --preview``).
    ``shape``: the image's ``(Z, Y, X)`` when the planes were read with a stride (their axes are labelled with its
    index ranges; default: the planes' own).

    Args:
        planes: ``[volume[cz], volume[:, cy], volume[:, :, cx]]`` (any stride).
        spacing: ``(3,)`` voxel size of the strided planes ``(z, y, x)`` (for the aspect ratio).
        path: PNG file to write.
        orientation: the code to label with (None: the world axes the product assumes without one, ``ipl``).
        source: the input's name for the title.
    """
    code = orientation or "ipl"
    fig, axes = _figure(
        f"{source}: mid-planes labelled as orientation '{code}'"
        + (" (none given: the axes are taken as z -> superior, y -> anterior, x -> right)" if orientation is None else "")
    )
    for axis, (ax, plane) in enumerate(zip(axes, planes, strict=True)):
        image = np.asarray(plane, dtype=np.float32)
        lo, hi = display_range(image)
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, aspect=_aspect(spacing, axis), interpolation="nearest")
        rows, cols = _PLANES[axis]
        last = (image.shape[0] - 1, image.shape[1] - 1) if shape is None else (shape[rows] - 1, shape[cols] - 1)
        ax.set_xlabel(f"{AXES[cols]} index 0 → {last[1]} (left → right)")
        ax.set_ylabel(f"{AXES[rows]} index 0 → {last[0]} (top → bottom)")
    fig.supxlabel(
        "Each letter names the side of the brain that edge faces if the code is right (A/P anterior/posterior, "
        "S/I superior/inferior, L/R left/right).\nIf the anatomy disagrees, the code is, for the axes z, y, x in "
        "turn, the side where that axis's index 0 lies (the top edge for rows, the left edge for columns).",
        fontsize=9,
    )
    return _finish(fig, axes, Path(path), code, axis_names=True)


# -- reading outputs at a coarse level ----------------------------------------------------------------
def preview_level(image: MultiscaleImage, max_size: int) -> Level:
    """The finest pyramid level whose every axis has at most ``max_size`` voxels (else the coarsest)."""
    for level in image.levels:
        if max(level.grid.shape) <= max_size:
            return level
    return image.levels[-1]


def on_grid(image: MultiscaleImage, grid: Grid, labels: bool = False) -> np.ndarray:
    """Sample ``image`` at the voxel centres of ``grid`` (same unit), from the level that matches its spacing.

    Args:
        image: a pyramid in ``grid.unit``.
        grid: target grid (small: a preview grid).
        labels: nearest-neighbour sampling keeping the integer dtype.

    Returns:
        ``grid.shape`` array.
    """
    level = image.level_for_spacing(float(grid.spacing.min()))
    if labels:
        dtype = read_box(level.array, (slice(0, 1),) * 3).dtype
        return resample(level.array, level.grid, grid.points(), order=0, dtype=dtype)
    return resample(level.array, level.grid, grid.points(), order=1)


def preview_field(field: object, grid: Grid, max_size: int) -> tuple[np.ndarray, Grid]:
    """A ``(3, Z, Y, X)`` field array-like block-averaged until every axis has at most ``max_size`` voxels.

    Returns:
        ``(field, grid)`` in memory: float32 components ``(z, y, x)`` and the (coarser) grid.
    """
    factors = tuple(max(1, -(-int(n) // max_size)) for n in grid.shape)
    full = read_box(field, (slice(None),) * 4).astype(np.float32)
    if factors == (1, 1, 1):
        return full, grid
    comps = np.stack([downsample(full[k], factors) for k in range(3)])
    return comps, downsampled_grid(grid, factors, comps.shape[1:])


def _load(
    fixed: Path, warped: Path, max_size: int, labels: Path | None = None
) -> tuple[Grid, np.ndarray, np.ndarray, np.ndarray | None]:
    """The fixed image at a preview level, and the warped image (and labels) sampled on that grid."""
    fixed_image = read_image(fixed)
    level = preview_level(fixed_image, max_size)
    grid = level.grid
    fixed_arr = read_box(level.array, (slice(None),) * 3).astype(np.float32)
    warped_arr = on_grid(read_image(warped).with_unit(grid.unit), grid)
    labels_arr = on_grid(read_image(labels).with_unit(grid.unit), grid, labels=True) if labels else None
    return grid, fixed_arr, warped_arr, labels_arr


def qc_files(
    fixed: str | Path,
    warped: str | Path,
    field: str | Path,
    out_dir: str | Path,
    *,
    warped_labels: str | Path | None = None,
    max_size: int = 192,
) -> QCRecord:
    """Write the four QC figures of a registration into ``out_dir``.

    Args:
        fixed: the fixed OME-Zarr image.
        warped: the moving image warped onto the fixed grid (output of ``warp``).
        field: the displacement field (output of ``register``; its ``uncertainty`` child image, when
            present, gives the uncertainty figure).
        out_dir: folder for ``overlay.png``, ``checkerboard.png``, ``jacobian.png``, ``uncertainty.png``.
        warped_labels: the moving labels warped onto the fixed grid (their boundaries form the outline).
        max_size: largest preview size per axis (voxels); the images are read at the pyramid level
            that fits, so memory does not grow with the volume.

    Returns:
        A :class:`QCRecord` with the figure paths by kind.
    """
    out = Path(out_dir)
    grid, fixed_arr, warped_arr, labels_arr = _load(Path(fixed), Path(warped), max_size, _opt(warped_labels))
    spacing, code = grid.spacing, orientation_code(grid.direction)
    figures = {
        "overlay": overlay_figure(
            fixed_arr, spacing, out / "overlay.png", labels_arr, warped_arr, orientation=code
        ),
        "checkerboard": checkerboard_figure(
            fixed_arr, warped_arr, spacing, out / "checkerboard.png", orientation=code
        ),
    }
    figures.update(_field_figures(Path(field), out, max_size))
    return QCRecord(figures=figures)


def _field_figures(field: Path, out: Path, max_size: int, tissue: Path | None = None) -> dict[str, Path]:
    """The Jacobian figure (folds inside the ``tissue`` labels' non-zero voxels when given) and the
    uncertainty figure of a field, at a preview resolution."""
    field_arr, field_grid, meta = read_field(field)
    small, small_grid = preview_field(field_arr, field_grid, max_size)
    code = orientation_code(small_grid.direction)
    mask = None
    if tissue is not None:
        mask = on_grid(read_image(tissue).with_unit(small_grid.unit), small_grid, labels=True) > 0
    figures = {
        "jacobian": jacobian_figure(
            jacobian_determinant(small, small_grid), small_grid.spacing, out / "jacobian.png", code, mask
        )
    }
    unc_path = field / str(meta.get("uncertainty") or "uncertainty")
    if unc_path.is_dir():
        level = preview_level(read_image(unc_path), max_size)
        unc_arr = read_box(level.array, (slice(None),) * 3).astype(np.float32)
        polished = int((meta.get("config") or {}).get("polish_iterations", 0)) > 0
        figures["uncertainty"] = uncertainty_figure(
            unc_arr,
            level.grid.spacing,
            out / "uncertainty.png",
            "MIND-SSC dissimilarity (0-1)" if polished else level.grid.unit,
            orientation_code(level.grid.direction),
        )
    return figures


def atlas_qc(
    paths: Mapping[str, Path], atlas: Any, out_dir: str | Path, max_size: int = 192
) -> dict[str, Path]:
    """QC figures of an atlas registration (``paths`` as :func:`pipeline.atlas.atlas_outputs` returns them).

    * ``overlay``: the brain with the outlines of the atlas's major divisions warped onto it
      (:func:`pipeline.brainglobe.division_map`), planes named by anatomy;
    * ``atlas_space``: a checkerboard of the atlas reference and the brain in atlas space, with the same
      outlines from the atlas annotation;
    * ``jacobian``: det J on a log scale with its colour bar, folds inside the brain counted;
    * ``uncertainty``: the registration's uncertainty map (the residual left after the polish).

    Args:
        paths: ``brain``, ``atlas_on_brain``, ``brain_in_atlas_space`` and ``field``.
        atlas: the :class:`pipeline.atlas.PreparedAtlas`.
        out_dir: folder of the PNG files.
        max_size: largest preview size per axis (voxels).
    """
    from pipeline.brainglobe import division_map

    out = Path(out_dir)
    brain = read_image(paths["brain"])
    level = preview_level(brain, max_size)
    grid = level.grid
    brain_arr = read_box(level.array, (slice(None),) * 3).astype(np.float32)
    labels = on_grid(read_image(paths["atlas_on_brain"]).with_unit(grid.unit), grid, labels=True)
    divisions = division_map(
        atlas.atlas.structures, dict(zip(*np.unique(labels, return_counts=True), strict=True))
    )
    figures = {
        "overlay": overlay_figure(
            brain_arr, grid.spacing, out / "overlay.png", relabel(labels, divisions),
            title="the atlas's major divisions on the brain", orientation=orientation_code(grid.direction),
        )
    }  # fmt: skip
    reference = read_image(atlas.reference)
    ref_level = preview_level(reference, max_size)
    ref_grid = ref_level.grid
    ref_arr = read_box(ref_level.array, (slice(None),) * 3).astype(np.float32)
    in_atlas = on_grid(read_image(paths["brain_in_atlas_space"]).with_unit(ref_grid.unit), ref_grid)
    annotation = on_grid(read_image(atlas.annotation).with_unit(ref_grid.unit), ref_grid, labels=True)
    present = dict(zip(*np.unique(annotation, return_counts=True), strict=True))
    (board, mapped), spacing, code = displayed(
        (checkerboard(ref_arr, in_atlas, squares=8), relabel(annotation, division_map(atlas.atlas.structures, present))),
        ref_grid.spacing,
        orientation_code(ref_grid.direction),
    )
    # through the labelled tissue's centre: a hemisphere's atlas (--brain-geometry) is blank beyond the midline
    centre = tissue_centre(mapped)
    fig, axes = _figure("atlas space: atlas reference / brain (checkerboard) with the major divisions")
    for axis, (ax, plane, lab) in enumerate(
        zip(axes, central_slices(board, centre), central_slices(mapped, centre), strict=True)
    ):
        aspect = _aspect(spacing, axis)
        ax.imshow(plane, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
        _draw_outline(ax, lab, aspect)
    figures["atlas_space"] = _finish(fig, axes, out / "atlas_space.png", code)
    figures.update(_field_figures(Path(paths["field"]), out, max_size, tissue=Path(paths["atlas_on_brain"])))
    return figures


def _opt(path: str | Path | None) -> Path | None:
    return None if path is None else Path(path)


def compact_labels(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel two label maps jointly to ``0..n-1`` (0 stays 0), keeping which voxels share a label; each comes
    back as integer indices of its own shape (e.g. ``(Z, Y, X)``).

    Atlas ids can be large (Allen CCF ids reach ~6e8); per-label counting over compact ids needs memory
    proportional to the number of labels, not to the largest id. Dice per label is unchanged.
    """
    values, inverse = np.unique(np.concatenate([np.ravel(a), np.ravel(b)]), return_inverse=True)
    if values[0] != 0:
        inverse = inverse + 1  # keep id 0 free for background when neither map has any
    inverse = inverse.astype(np.int64)
    return inverse[: np.size(a)].reshape(np.shape(a)), inverse[np.size(a) :].reshape(np.shape(b))


def registration_metrics(
    fixed: str | Path,
    warped: str | Path,
    field: str | Path,
    *,
    fixed_labels: str | Path | None = None,
    warped_labels: str | Path | None = None,
    max_size: int = 192,
) -> dict[str, float]:
    """Scalar quality metrics of a registration, computed at a preview resolution (bounded memory).

    Returns:
        ``ncc`` (fixed vs warped moving, Pearson r), ``jacobian_min``, ``jacobian_max``,
        ``folding_percent`` (voxels with det J <= 0 of the field) and, when both label maps are given,
        ``dice_mean`` over the labels present in either (background 0 excluded) and ``n_labels``.
    """
    grid, fixed_arr, warped_arr, labels_arr = _load(Path(fixed), Path(warped), max_size, _opt(warped_labels))
    field_arr, field_grid, _ = read_field(field)
    small, small_grid = preview_field(field_arr, field_grid, max_size)
    det = jacobian_determinant(small, small_grid)
    metrics = {
        "ncc": ncc(fixed_arr, warped_arr),
        "jacobian_min": float(det.min()),
        "jacobian_max": float(det.max()),
        "folding_percent": float(100.0 * np.mean(det <= 0)),
    }
    if fixed_labels is not None and labels_arr is not None:
        truth = on_grid(read_image(fixed_labels).with_unit(grid.unit), grid, labels=True)
        compact_truth, compact_warped = compact_labels(truth, labels_arr)
        scores = np.asarray(list(dice_per_label(compact_truth, compact_warped).values()), dtype=np.float64)
        metrics["dice_mean"] = float(np.nanmean(scores)) if np.isfinite(scores).any() else 0.0
        metrics["n_labels"] = float(np.isfinite(scores).sum())
    return metrics
