"""Pre-flight checks that every command and flow runs before heavy work: nothing it writes may destroy an
input, and the folder it writes into must be able to hold the result.

* :func:`check_outputs` refuses an output that is, contains or lies inside an input of the same command,
  with or without ``--overwrite`` (``register --out`` equal to ``--fixed`` would otherwise delete the
  image and write the field in its place). Paths are compared after resolving symbolic links.
* :func:`check_checkpoint` refuses to train over an existing checkpoint unless asked to resume or to
  overwrite it.
* :func:`check_writable` and :func:`check_free_space` refuse an output folder that cannot be written or
  that lacks room for the output's estimated size: uncompressed, or, where its input's compression is known
  (:func:`stored_fraction`), that compressed size with a margin, the uncompressed size then giving a warning.

* :func:`check_image` refuses an image with NaN or infinite values, an empty or constant one;
  :func:`check_pair` refuses a pair whose tissue extents differ by more than :data:`MAX_EXTENT_RATIO` on
  an axis (a wrong unit or voxel size) and a pair whose moving image fits the fixed one clearly better
  after another axis permutation or flip (:mod:`patchmorph_core.orientation`: a wrong orientation code),
  and returns the record of both checks for the field's quality block. :class:`CheckOptions` lets the
  user override them. Extents whose ratios differ by :data:`EXTENT_SHAPE_WARNING` or more between the axes
  (one image holds part of the other's tissue, or a wrong voxel size on one axis) give a warning.

Every refusal is an :class:`~patchmorph_core.errors.InputError`: one sentence naming the path and what to
do, exit code 2 on the command line, an item error in a flow; nothing has been written when it is raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict

from patchmorph_core.errors import InputError
from patchmorph_core.orientation import OrientationCheck, check_orientation
from patchmorph_core.sampling import coarse_level, intensity_range, normalize, tissue_bounds, tissue_weights
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import (
    RIGHTWARD,
    nearest_grid_axes,
    orientation_code,
    orientation_matrix,
    read_box,
)
from pipeline.integrity import check_stored

PathLike = str | Path

logger = logging.getLogger(__name__)

MAX_EXTENT_RATIO = 3.0
"""Largest ratio of the two images' tissue extents along any world axis before the pair is refused."""

EXTENT_SHAPE_WARNING = 1.6
"""Largest ratio between two axes' tissue-extent ratios before a warning: between what whole brains of other
shapes or head coverage gave and what one hemisphere against a whole atlas gave (``docs/checks.md``)."""

REVERSED_SHAPE = 1.25
"""A pair is refused when reversing one image's voxel sizes brings the spread of its extent ratios below this
(whole brains in their right order give 1.01-1.08 for mice, up to 1.56 for human heads, ``docs/checks.md``) ..."""

REVERSED_GAIN = 1.3
"""... and at least this many times below the spread as given (the example brain's 50 40 40 µm given as 40 40 50:
1.56 as given, 1.01 reversed)."""

ANISOTROPIC = 1.05
"""Voxels whose largest size is at least this multiple of their smallest are anisotropic: their sizes' order
matters (:func:`_reversed_role`, the orientation refusal's doubts)."""

EXPLAINS = 1.05
"""Reversed voxel sizes explain an orientation refusal when, with them, the given codes' dissimilarity is at most
this multiple of the best other code's as given (:func:`_explains`)."""

MIN_TISSUE_VOXELS = 27
"""An image needs at least this many tissue voxels (normalised intensity >= 0.1) on its coarse level."""

WORLD_AXES = ("superior-inferior", "anterior-posterior", "left-right")
"""Names of the world axes (components z, y, x of the RAS+ frame) for messages."""


class CheckOptions(BaseModel):
    """What the checks may let through (``register --accept-orientation`` etc.; all False: refuse).

    Attributes:
        accept_orientation: register as given even when another orientation fits clearly better.
        allow_size_mismatch: register even when the tissue extents differ by more than 3x on an axis (e.g. a
            thin section against a whole-brain atlas).
        accept_quality: keep a field that failed its quality thresholds as complete (recorded as accepted).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    accept_orientation: bool = False
    allow_size_mismatch: bool = False
    accept_quality: bool = False


def _local(path: PathLike | None) -> Path | None:
    """``path`` resolved (symbolic links followed), or None for no path or a URL."""
    if path is None or "://" in str(path):
        return None
    return Path(path).expanduser().resolve()


def _within(inner: Path, outer: Path) -> bool:
    """True when ``inner`` is ``outer`` or lies below it."""
    return inner == outer or outer in inner.parents


def check_outputs(*, inputs: Mapping[str, PathLike | None], outputs: Mapping[str, PathLike | None]) -> None:
    """Refuse any output that is, contains or lies inside one of the inputs.

    Args:
        inputs: the command's input paths by role (``fixed``, ``moving``, ``weights``, ...); None and URLs
            are ignored.
        outputs: the paths the command writes or replaces by role (the output and its run folder, ...).

    Raises:
        InputError: an output overlaps an input (the message names both and the fix).
    """
    resolved_inputs = [(role, path, _local(path)) for role, path in inputs.items()]
    for out_role, out_path in outputs.items():
        out = _local(out_path)
        if out is None:
            continue
        for role, path, source in resolved_inputs:
            if source is None:
                continue
            if out == source:
                relation = "is"
            elif _within(source, out):
                relation = "contains"
            elif _within(out, source):
                relation = "lies inside"
            else:
                continue
            raise InputError(
                f"{out_role} {out_path} {relation} the {role} input {path}, which writing it would destroy: "
                "choose an output path outside every input (nothing was written)."
            )


def check_checkpoint(checkpoint: PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start training over an existing checkpoint unless ``resume`` or ``overwrite`` is set.

    Raises:
        InputError: ``checkpoint`` exists and neither flag is given, or both are.
    """
    path = Path(checkpoint)
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other: give one of them.")
    if path.exists() and not (resume or overwrite):
        raise InputError(
            f"checkpoint {path} already exists: pass --resume to continue that training, --overwrite to "
            "start again and replace it, or set another checkpoint path in the config."
        )


def check_writable(folder: PathLike) -> None:
    """Refuse an output folder that does not exist or cannot be written (tried with a temporary file, so
    read-only mounts and permissions are both caught, also for the root user).

    Raises:
        InputError: the folder is missing or not writable.
    """
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"output folder {path} does not exist: create it first.")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".patchmorph-write-test-"):
            pass
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise InputError(
            f"output folder {path} cannot be written ({reason.lower()}): choose a writable folder or fix its "
            "permissions."
        ) from err


def format_bytes(count: float) -> str:
    """``count`` bytes as a short human-readable size (``"3.2 GB"``)."""
    size = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.3g} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.3g} PB"


STORED_SIZE_MARGIN = 1.5
"""Factor on an output's size estimated from its input's compression (:func:`stored_fraction`): the warped
image resamples its input, but its chunks need not compress as well as the input's coarse level did."""

COUNTED_CHUNK_FILES = 4096
"""At most this many chunk (or shard) files of a level are listed by :func:`stored_fraction`."""


def stored_fraction(image: MultiscaleImage, dtype: np.dtype) -> float | None:
    """Bytes stored ÷ bytes uncompressed of ``image``'s finest level of ``dtype`` (an output's) with at most
    :data:`COUNTED_CHUNK_FILES` chunk or shard files (so a terabyte image's coarse level is listed, never its
    full one); None when that is not known (no such level, not a zarr array, or nothing stored)."""
    for level in image.levels:
        array = level.array
        files = getattr(array, "shards", None) or getattr(array, "chunks", None)
        if files is None or not hasattr(array, "nbytes_stored"):
            return None
        if array.dtype != dtype or int(np.prod(np.ceil(np.divide(array.shape, files)))) > COUNTED_CHUNK_FILES:
            continue
        stored, raw = int(array.nbytes_stored()), int(array.nbytes)
        return min(1.0, stored / raw) if stored > 0 and raw > 0 else None
    return None


def check_free_space(folder: PathLike, needed_bytes: int, what: str, stored_fraction: float | None = None) -> None:
    """Refuse to start when the file system of ``folder`` cannot hold the output.

    Args:
        folder: the folder the output goes into (must exist).
        needed_bytes: the output's uncompressed size, an upper bound.
        what: the output, for the message (e.g. ``"the warped image /data/out.zarr"``).
        stored_fraction: the fraction of its uncompressed size the output's input takes on disk
            (:func:`stored_fraction`), or None when unknown. When known, the refusal takes that fraction of
            ``needed_bytes`` times :data:`STORED_SIZE_MARGIN`, and less room than ``needed_bytes`` only warns:
            a disk that fills mid-write stops the command with nothing taken as finished, and a rerun resumes.

    Raises:
        InputError: not enough free space.
    """
    free = shutil.disk_usage(folder).free
    likely = needed_bytes if stored_fraction is None else min(needed_bytes, int(needed_bytes * stored_fraction * STORED_SIZE_MARGIN))
    if likely > free:
        size = f"up to {format_bytes(needed_bytes)}" if likely == needed_bytes else f"about {format_bytes(likely)}"
        raise InputError(
            f"{what} needs {size} but {folder} has {format_bytes(free)} free: free some space or write "
            "elsewhere (nothing of it was written; a rerun keeps what earlier steps finished)."
        )
    if needed_bytes > free:
        logger.warning(
            "%s takes about %s compressed as its input is, up to %s uncompressed, and %s has %s free: if the disk "
            "fills, the command stops with nothing taken as finished and a rerun resumes once there is room",
            what, format_bytes(likely), format_bytes(needed_bytes), folder, format_bytes(free),
        )


def run_outputs(out: PathLike) -> dict[str, Path]:
    """What a resumable chunked command writes: its output and the run folder ``<out>.run`` beside it."""
    path = Path(out)
    return {"output": path, "its run folder": path.with_name(path.name + ".run")}


def check_image(image: MultiscaleImage, role: str, path: PathLike) -> None:
    """Refuse an image that lost a chunk file (:func:`pipeline.integrity.check_stored`), or whose coarse level
    holds NaN or infinite values, is constant, or has almost no tissue (fewer than :data:`MIN_TISSUE_VOXELS`
    voxels at 10 % of its robust intensity range).

    Raises:
        InputError: naming the image and the fix.
    """
    for stored in image.levels:
        check_stored(stored.array)
    level = coarse_level(image)
    values = read_box(level.array, tuple(slice(0, n) for n in level.grid.shape))
    if not np.all(np.isfinite(values)):
        raise InputError(
            f"{role} image {path} contains NaN or infinite values: replace them (e.g. by 0) first."
        )
    low, high = float(np.min(values)), float(np.max(values))
    if low == high:
        raise InputError(
            f"{role} image {path} is constant (every voxel is {low:g}): give an image with tissue in it."
        )
    tissue = int(np.count_nonzero(normalize(values, *intensity_range(image)) >= 0.1))
    if tissue < MIN_TISSUE_VOXELS:
        raise InputError(
            f"{role} image {path} is empty: only {tissue} of {values.size} coarse voxels hold tissue; give an "
            "image with tissue in it (or check its intensities)."
        )


def _extents_with_reversed_voxels(image: MultiscaleImage, extent: np.ndarray) -> np.ndarray | None:
    """The tissue extent per world axis (``extent`` as given) that ``image`` would have with its voxel sizes in
    the reverse order (``x, y, z`` given for ``z, y, x``); None when its axes are oblique or its voxels nearly
    cubic (a reversal changes nothing)."""
    direction, spacing = image.grid.direction, image.grid.spacing
    if orientation_code(direction) is None or spacing.max() / spacing.min() < ANISOTROPIC:
        return None
    permutation = np.abs(np.rint(direction))
    voxels = (permutation.T @ extent) / spacing  # tissue extent in voxels along each array axis
    return permutation @ (voxels * spacing[::-1])


def _reversed_role(
    fixed: MultiscaleImage, moving: MultiscaleImage, extents: tuple[np.ndarray, np.ndarray], given_spread: float
) -> tuple[str, float] | None:
    """The image (``"fixed"`` or ``"moving"``) whose voxel sizes in the reverse order would make the two images'
    tissue alike in shape (spread below :data:`REVERSED_SHAPE`, and :data:`REVERSED_GAIN` times below the spread
    as given), with that spread; None when neither would."""
    f_ext, m_ext = extents
    for role, image in (("fixed", fixed), ("moving", moving)):
        reversed_ext = _extents_with_reversed_voxels(image, f_ext if role == "fixed" else m_ext)
        if reversed_ext is None:
            continue
        shape = (reversed_ext / m_ext) if role == "fixed" else (f_ext / reversed_ext)
        spread = float(shape.max() / max(shape.min(), 1e-12))
        if spread < REVERSED_SHAPE and given_spread >= REVERSED_GAIN * spread:
            return role, spread
    return None


def _with_reversed_voxels(image: MultiscaleImage) -> MultiscaleImage:
    """``image`` with its voxel sizes in the reverse order (each level's axes scaled alike)."""
    scale = image.grid.spacing[::-1] / image.grid.spacing
    levels = tuple(dataclasses.replace(level, grid=level.grid.with_axis_scale(scale)) for level in image.levels)
    return dataclasses.replace(image, levels=levels)


def _explains(result: OrientationCheck, reversed_result: OrientationCheck) -> bool:
    """Whether reversed voxel sizes explain an orientation refusal as well as another code does: with them the
    given codes fit best, as well as the code the refusal would suggest (a wrong code distorts the tissue's
    extents too, so the shape alone does not tell the two apart)."""
    return (
        not reversed_result.fits_better
        and reversed_result.given.dissimilarity <= EXPLAINS * result.best.dissimilarity
    )


def _voxel_order_error(image: MultiscaleImage, role: str, path: PathLike, spread: float) -> InputError:
    sizes, reverse = (" ".join(f"{v:g}" for v in order) for order in (image.grid.spacing, image.grid.spacing[::-1]))
    return InputError(
        f"the {role} image {path} has voxels of {sizes} {image.unit} (z y x), which make its tissue another shape "
        f"than the other image's, and the reverse order, {reverse}, would make them alike (ratios spread "
        f"{spread:.2f}x): give the voxel size axis 0 first (the planes of a stack), or pass --allow-size-mismatch "
        "(in a flow or a job's config: checks.allow_size_mismatch) if the order is right."
    )


HEMISPHERE_HINT = "; one hemisphere onto a whole atlas: patchmorph atlas --brain-geometry hemisphere_l or hemisphere_r"
"""What the part-of-a-brain warning adds when the fixed tissue looks like one hemisphere of the moving one's."""


def recorded_geometry(field_meta: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The :func:`check_geometry` record a field's metadata (``attrs["patchmorph"]``) keeps in its quality block
    (None: a field without one)."""
    return field_meta.get("quality", {}).get("preflight", {}).get("geometry")


def part_of_a_brain(geometry: Mapping[str, Any] | None) -> bool:
    """Whether a registration's ``geometry`` record (:func:`check_geometry`) says that one image's tissue has
    another shape than the other's (the spread of their extent ratios reached :data:`EXTENT_SHAPE_WARNING`): part
    of a brain, a slab say, registered to a whole one, which the registration squeezes into it."""
    return bool(geometry) and float(geometry.get("ratio_spread", 1.0)) >= EXTENT_SHAPE_WARNING


def shortest_axis(geometry: Mapping[str, Any] | None) -> tuple[int, float] | None:
    """The world axis (0 superior, 1 anterior, 2 right) along which a registration's ``geometry`` record
    (:func:`check_geometry`) finds the fixed tissue shortest against the moving tissue, relative to the median axis,
    and that factor (>= 1): how many times too small the fixed image's voxel size there would be if it held a whole
    brain. None: a record without the extents."""
    if not geometry or "fixed_tissue_extent" not in geometry or "moving_tissue_extent" not in geometry:
        return None
    shape = _extent_ratio(geometry["fixed_tissue_extent"], geometry["moving_tissue_extent"])
    axis = int(np.argmin(shape))
    return axis, float(np.median(shape) / max(shape[axis], 1e-12))


def _extent_ratio(extent: ArrayLike, other: ArrayLike) -> np.ndarray:
    """``(3,)`` ratio of two tissue extents per world axis (superior, anterior, right), ``extent / other`` (an empty
    axis of ``other`` counts as 1e-12 long)."""
    return np.asarray(extent, dtype=np.float64) / np.maximum(np.asarray(other, dtype=np.float64), 1e-12)


def _one_hemisphere(shape: np.ndarray) -> bool:
    """Whether fixed / moving tissue extents per world axis (``(3,)``, superior, anterior, right) look like one
    hemisphere against a whole brain: about half along left-right, about alike along the other two."""
    others = np.delete(shape, RIGHTWARD)
    return bool(0.35 <= shape[RIGHTWARD] <= 0.7 and np.all((others >= 0.8) & (others <= 1.25)))


def _extent_check(
    fixed: MultiscaleImage, moving: MultiscaleImage, paths: Mapping[str, PathLike], allow: bool
) -> dict[str, Any]:
    """The tissue extents of both images per world axis; InputError when they differ more than
    :data:`MAX_EXTENT_RATIO`-fold on an axis (unless ``allow``)."""
    moving_path = paths["moving"]
    f_low, f_high = tissue_bounds(fixed)
    m_low, m_high = tissue_bounds(moving)
    f_ext, m_ext = f_high - f_low, m_high - m_low
    ratios = np.maximum(f_ext, m_ext) / np.maximum(np.minimum(f_ext, m_ext), 1e-12)
    shape = _extent_ratio(f_ext, m_ext)
    spread = float(shape.max() / max(shape.min(), 1e-12))
    record = {
        "unit": fixed.unit,
        "fixed_tissue_extent": [float(v) for v in f_ext],
        "moving_tissue_extent": [float(v) for v in m_ext],
        "largest_ratio": float(ratios.max()),
        "ratio_spread": spread,
        "allowed": allow,
    }
    if spread >= EXTENT_SHAPE_WARNING:
        ratio_text = ", ".join(f"{r:.2f} along {name}" for r, name in zip(shape, WORLD_AXES, strict=True))
        logger.warning(
            "the tissue of the fixed image spans %s times the moving image's: one of them may hold only part of a "
            "brain (the registration then squeezes the other into it: crop it to the same part first, an atlas with patchmorph atlas --atlas-range%s) or have a "
            "wrong voxel size on one axis",
            ratio_text,
            HEMISPHERE_HINT if _one_hemisphere(shape) else "",
        )
    axis = int(np.argmax(ratios))
    if ratios[axis] > MAX_EXTENT_RATIO and not allow:
        raise InputError(
            f"the moving image {moving_path} spans {m_ext[axis]:.4g} {fixed.unit} of tissue along "
            f"{WORLD_AXES[axis]} but the fixed image {f_ext[axis]:.4g} {fixed.unit} ({ratios[axis]:.1f}x, more than "
            f"{MAX_EXTENT_RATIO:g}x): check both images' voxel size and unit; if one holds only part of a brain (a "
            "slab or a few sections), --allow-size-mismatch (in a flow or a job's config: checks.allow_size_mismatch) "
            "registers anyway, but squeezes the whole of the other image into that part, so its structures land "
            "hundreds of micrometres off (docs/checks.md): crop the other image to the same part first (an "
            "atlas: patchmorph atlas --atlas-range, e.g. ap=5000:7500 for a coronal slab)."
        )
    return record


LONGER_THAN_ATLAS = 1.4
"""A brain whose tissue is at least this many times the whole atlas's along one world axis, and
:data:`EXTENT_SHAPE_WARNING` times its ratio along the median axis, is no part of a brain (a part is shorter, not
longer): its voxel size along that axis is too large (:func:`check_brain_not_longer`; how the limits were chosen:
docs/checks.md, *Refused before any work*)."""


def check_brain_not_longer(
    brain: MultiscaleImage, atlas: MultiscaleImage, brain_path: PathLike, options: CheckOptions | None = None
) -> None:
    """InputError when ``brain``'s tissue is longer than the whole ``atlas``'s reference along one world axis by far
    more than along the others (:data:`LONGER_THAN_ATLAS`, :data:`EXTENT_SHAPE_WARNING`): a part of a brain cannot be
    that, a voxel size too large along that axis is (``--voxel-size 100 40 40`` for 50 40 40 µm). Only for an atlas
    that is not cut (no brain geometry or atlas range), before the registration; ``allow_size_mismatch`` lets it
    through. ``brain_path``: the brain as the user gave it (for the message)."""
    if options is not None and options.allow_size_mismatch:
        return
    atlas = atlas.with_unit(brain.unit)
    (b_low, b_high), (a_low, a_high) = tissue_bounds(brain), tissue_bounds(atlas)
    shape = _extent_ratio(b_high - b_low, a_high - a_low)
    axis = int(np.argmax(shape))
    factor = float(shape[axis] / np.median(shape))
    if shape[axis] < LONGER_THAN_ATLAS or factor < EXTENT_SHAPE_WARNING:
        return
    array_axis = nearest_grid_axes(brain.grid.direction)[axis]
    ratios = ", ".join(f"{r:.2f} along {name}" for r, name in zip(shape, WORLD_AXES, strict=True))
    raise InputError(
        f"the brain {brain_path}'s tissue spans {ratios} times the atlas's: {factor:.1f} times longer along "
        f"{WORLD_AXES[axis]} than along its other axes, which no part of a brain is, so its voxel size along its array "
        f"axis {array_axis} is most likely about "
        f"{factor:.1f} times too large: check --voxel-size (axis 0 first; in a batch, the manifest item's voxel_size), "
        "or pass --allow-size-mismatch (in a job's or a batch's config: checks.allow_size_mismatch) if the brain really "
        "is that shape."
    )


STRETCH_WARNING = 1.35
"""The initial alignment's scale along one world axis of the fixed image, against the median of its three axes'
scales, from which :func:`warn_stretch` warns (either way; how the limit was chosen: docs/checks.md)."""


def warn_stretch(initial: np.ndarray, fixed: MultiscaleImage, fixed_path: PathLike) -> float:
    """Warn when the ``(4, 4)`` fixed → moving world ``initial`` alignment scales the fixed image along one world
    axis :data:`STRETCH_WARNING` times more or less than along its median axis: a voxel size off along the fixed
    image's array axis there (which passes every other check below 1.6 and makes every volume wrong by the factor),
    or part of a brain. Returns that largest factor (>= 1)."""
    scales = np.linalg.norm(np.asarray(initial, dtype=np.float64)[:3, :3], axis=0)  # (3,) per fixed world axis
    deviation = np.maximum(scales / np.median(scales), np.median(scales) / scales)
    axis = int(np.argmax(deviation))
    factor = float(deviation[axis])
    if factor < STRETCH_WARNING:
        return factor
    array_axis = nearest_grid_axes(fixed.grid.direction)[axis]
    # a fixed axis that the alignment shrinks (scale < 1 against the others) is too long: its voxel size too large
    size = "large" if scales[axis] < np.median(scales) else "small"
    logger.warning(
        "the initial alignment scales the fixed image %s %.2f times %s along %s than along its other axes to fit the "
        "moving image: whole brains differ far less in shape, so the fixed image's voxel size along its array axis %d "
        "may be about %.2f times too %s (or it holds part of a brain along it): check --voxel-size; with a "
        "wrong voxel size the labels may still land near where they belong, but every volume is off by that factor",
        fixed_path, factor, "less" if size == "large" else "more", WORLD_AXES[axis], array_axis, factor, size,
    )  # fmt: skip
    return factor


EMPTY_PLANE = 0.05
"""A plane of an image's coarse level (array axis 0) with fewer tissue voxels than this fraction of the median plane
within the tissue, between planes with tissue, is a gap (:func:`warn_empty_planes`; how the limit was chosen:
docs/checks.md)."""


def empty_planes(image: MultiscaleImage) -> list[tuple[float, float]]:
    """Runs of planes (array axis 0) of ``image``'s coarse level that hold (almost) no tissue between planes that
    do (:data:`EMPTY_PLANE`): ``(start, stop)`` in ``image.unit`` along axis 0, counted from the start of its first
    plane (a gap narrower than a coarse plane is averaged away and not found). The tissue's tapering ends (a head's
    top planes of a few voxels each) are no gap: only runs with planes above the limit on both sides count."""
    weights, grid = tissue_weights(image)
    counts = (weights > 0).sum(axis=(1, 2))
    planes = np.nonzero(counts)[0]
    if planes.size < 3:
        return []
    limit = EMPTY_PLANE * float(np.median(counts[planes[0] : planes[-1] + 1]))
    held = np.flatnonzero(counts >= limit)  # (P,) planes that hold tissue
    step = float(grid.spacing[0])
    return [((held[0] + a) * step, (held[0] + b) * step) for a, b in _runs(counts[held[0] : held[-1] + 1] < limit)]


def warn_empty_planes(image: MultiscaleImage, role: str, path: PathLike) -> list[tuple[float, float]]:
    """Warn of the gaps :func:`empty_planes` finds in ``image`` (the ``role`` image at ``path``): lost or blank
    sections, whose labels, volumes and points the registration fills in from the other image, unmeasured."""
    gaps = empty_planes(image)
    if gaps:
        where = ", ".join(f"{a:.0f}-{b:.0f}" for a, b in gaps)
        logger.warning(
            "the %s image %s holds no tissue on its planes at %s %s along its array axis 0 (from its first plane), "
            "between planes with tissue: lost or blank sections? The registration bridges them, so the labels, "
            "volumes and points there are the other image's anatomy, not measured: give the missing planes, or leave "
            "out the structures there",
            role, path, where, image.unit,
        )  # fmt: skip
    return gaps


BRIGHT_PLANE = 4.0
"""A plane of an image's coarse level (array axis 0) whose bright voxels (the 90th percentile of those above the
image's median) are this many times the median plane's is too bright (:func:`warn_bright_planes`; how the limit was
chosen: docs/checks.md)."""


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` index runs where the 1-D bool ``flags`` is True."""
    edges = np.flatnonzero(np.diff(np.r_[False, flags, False].astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def bright_planes(image: MultiscaleImage) -> list[tuple[float, float, float]]:
    """Runs of planes (array axis 0) of ``image``'s coarse level far brighter than the others
    (:data:`BRIGHT_PLANE`): ``(start, stop, factor)``, start and stop in ``image.unit`` along axis 0 from the start
    of its first plane, factor the run's largest ratio to the median plane."""
    level = coarse_level(image)
    values = read_box(level.array, tuple(slice(0, n) for n in level.grid.shape)).astype(np.float32)
    values = np.where(np.isfinite(values), values, np.nan)
    above = float(np.nanmedian(values))
    bright = np.full(values.shape[0], np.nan)
    for k, plane in enumerate(values):
        tissue = plane[plane > above]
        if tissue.size >= 10:
            bright[k] = np.percentile(tissue, 90)
    reference = float(np.nanmedian(bright)) if np.isfinite(bright).any() else np.nan
    if not np.isfinite(reference) or reference <= 0:
        return []
    ratio = np.nan_to_num(bright / reference, nan=0.0)
    step = float(level.grid.spacing[0])
    return [(a * step, b * step, float(ratio[a:b].max())) for a, b in _runs(ratio >= BRIGHT_PLANE)]


def warn_bright_planes(image: MultiscaleImage, role: str, path: PathLike) -> list[tuple[float, float, float]]:
    """Warn of the planes :func:`bright_planes` finds in ``image`` (the ``role`` image at ``path``): saturated
    sections set the image's intensity range, which dims the rest of it for the registration."""
    runs = bright_planes(image)
    if runs:
        where = ", ".join(f"{a:.0f}-{b:.0f} ({f:.0f} times)" for a, b, f in runs)
        logger.warning(
            "the %s image %s has planes far brighter than the others at %s %s along its array axis 0 (from its first "
            "plane): saturated or overexposed sections? They set its intensity range, which dims the rest of the "
            "brain for the registration and moves its labels, though every check passes: clip or replace those "
            "planes and register again",
            role, path, where, image.unit,
        )  # fmt: skip
    return runs


def check_pair(
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    paths: Mapping[str, PathLike],
    options: CheckOptions | None = None,
) -> dict[str, Any]:
    """The pre-flight checks of a registration pair (module docstring), before any heavy work: both images
    and their tissue extents (:func:`check_geometry`), then the orientation (:func:`check_pair_orientation`).

    Args:
        fixed: the fixed image; ``moving``: the moving image (any unit).
        paths: ``{"fixed": ..., "moving": ...}`` as the user gave them (for messages).
        options: what the user lets through.

    Returns:
        The record for the quality block: ``geometry`` (tissue extents) and ``orientation`` (scores).

    Raises:
        InputError: a bad image, implausible extents or a better-fitting orientation (named).
    """
    geometry = check_geometry(fixed, moving, paths, options)
    return check_pair_orientation(fixed, moving, paths, options, geometry)


def check_geometry(
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    paths: Mapping[str, PathLike],
    options: CheckOptions | None = None,
) -> dict[str, Any]:
    """The first part of :func:`check_pair`: both images (:func:`check_image`) and their tissue extents.

    Returns:
        The ``geometry`` record (tissue extents per world axis, their largest ratio).

    Raises:
        InputError: a bad image or implausible extents (named).
    """
    options = options or CheckOptions()
    check_image(fixed, "fixed", paths["fixed"])
    check_image(moving, "moving", paths["moving"])
    return _extent_check(fixed, moving.with_unit(fixed.unit), paths, options.allow_size_mismatch)


def check_pair_orientation(
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    paths: Mapping[str, PathLike],
    options: CheckOptions | None,
    geometry: dict[str, Any],
) -> dict[str, Any]:
    """The second part of :func:`check_pair`: the 48 orientations of the moving frame
    (:func:`~patchmorph_core.orientation.check_orientation`; it reads only the coarse copies, so it may run
    beside the initial alignment).

    Returns:
        The record for the quality block: ``geometry`` (as given) and ``orientation`` (scores).

    Raises:
        InputError: another orientation fits clearly better and the user did not accept the given one.
    """
    options = options or CheckOptions()
    moving = moving.with_unit(fixed.unit)
    result = check_orientation(fixed, moving)
    record = {
        "geometry": geometry,
        "orientation": {**result.record(), "accepted": options.accept_orientation},
    }
    extents = (np.asarray(geometry["fixed_tissue_extent"]), np.asarray(geometry["moving_tissue_extent"]))
    suspect = None if options.allow_size_mismatch else _reversed_role(fixed, moving, extents, geometry["ratio_spread"])
    if suspect is not None and not (result.fits_better and options.accept_orientation):
        role, spread = suspect
        images = {"fixed": fixed, "moving": moving}
        images[role] = _with_reversed_voxels(images[role])
        if not result.fits_better or _explains(result, check_orientation(images["fixed"], images["moving"])):
            raise _voxel_order_error({"fixed": fixed, "moving": moving}[role], role, paths[role], spread)
    if result.fits_better and not options.accept_orientation:
        fixed_code, moving_code = result.suggested_codes(fixed.grid.direction, moving.grid.direction)
        given = orientation_code(moving.grid.direction), orientation_code(fixed.grid.direction)
        if moving_code and fixed_code and all(given):  # the fixed image first: in a job it is the user's brain
            alternative = (
                f"with one orientation code changed, the fixed image's to {fixed_code!r} instead of {given[1]!r} or the "
                f"moving image's to {moving_code!r} instead of {given[0]!r},"
            )
        else:
            alternative = "after a permutation or flip of its axes than as given,"
        raise InputError(
            f"the moving image {paths['moving']} fits the fixed image {paths['fixed']} clearly better {alternative} "
            f"dissimilarity {result.best.dissimilarity:.4f} vs {result.given.dissimilarity:.4f} (MIND-SSC, lower is "
            "better): fix the orientation code of the wrong one "
            "(convert --orientation; images cannot tell left from right, so the codes keep the given sides: check "
            f"them){_doubts(fixed, moving, paths, geometry, (fixed_code, moving_code), given[::-1])}, or pass "
            "--accept-orientation (in a flow or a job's config: checks.accept_orientation) to register as given."
        )
    return record


def _doubts(
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    paths: Mapping[str, PathLike],
    geometry: Mapping[str, Any],
    suggested: tuple[str | None, str | None],
    given: tuple[str | None, str | None],
) -> str:
    """What else an orientation refusal may come from, as a clause of its sentence: tissue of other shapes (part of
    a brain: the comparison is unreliable, so a suggested code is not to be trusted), and a suggestion that swaps
    the axes of an image with anisotropic voxels (its voxel sizes given in x, y, z order)."""
    clauses = []
    if geometry.get("ratio_spread", 1.0) >= EXTENT_SHAPE_WARNING:
        clauses.append(
            "; but the two images' tissue differs in shape (see the warning above: part of a brain, or a wrong voxel "
            "size), where this comparison is unreliable: do not take a suggested code on trust, check it with "
            "'patchmorph convert --preview', and for part of a brain crop the atlas to the same part (--atlas-range; one "
            "hemisphere: patchmorph atlas --brain-geometry hemisphere_l or hemisphere_r)"
        )
    for role, image, new, old in zip(("fixed", "moving"), (fixed, moving), suggested, given, strict=True):
        spacing = image.grid.spacing
        swaps = new and old and not np.array_equal(np.abs(orientation_matrix(new)), np.abs(orientation_matrix(old)))
        if swaps and float(spacing.max() / spacing.min()) >= ANISOTROPIC:
            sizes = " ".join(f"{v:g}" for v in spacing)
            clauses.append(
                f"; the suggestion swaps the axes of the {role} image {paths[role]}, whose voxels are {sizes} "
                f"{image.unit} (z y x): if its voxel sizes were given in x, y, z order, give them axis 0 first instead"
            )
    return "".join(clauses)


class _Collected(logging.Handler):
    """Keeps the messages of the warnings logged while a job runs, for its summary."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


@contextlib.contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """The warnings that PatchMorph's modules log inside the block (each once, in order): a job's summary lists
    them, so a warning seen only on the terminal (a part of a brain, an assumed orientation) stays with the
    results."""
    handler = _Collected()
    loggers = [logging.getLogger(name) for name in ("pipeline", "patchmorph_core", "flows")]
    for each in loggers:
        each.addHandler(handler)
    try:
        yield handler.messages
    finally:
        for each in loggers:
            each.removeHandler(handler)
