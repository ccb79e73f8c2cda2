"""The quality block of a displacement field: every registration checks its own answer.

After ``register`` has computed the field (and before it is marked complete), :func:`assess_field` measures
on the stored field:

* **similarity** — local normalised cross-correlation (window :data:`NCC_WINDOW` voxels) between the fixed
  image and the moving image, inside the fixed tissue, on the *quality grid* (the field grid, or a coarser
  grid over the same box when the field has more than :data:`QUALITY_GRID_VOXELS` voxels): for the moving
  image as given (``identity``), after the initial alignment (``initial``, where the deformable stages
  start) and through the field (``final``). ``stages``: per pass of the driver, the similarity it scored
  before and after that pass (its own measure, :mod:`patchmorph_core.stage_check`) and whether it was kept,
  ``{"name", "similarity", "before", "after", "accepted"}`` (:func:`stage_similarity`; empty when the
  driver's check is off);
* **folding** — the Jacobian determinant of ``φ(x) = x + u(x)`` at every field voxel, over the voxels inside
  the fixed tissue (the fixed image on the field grid, normalised to 0..1, at least
  :data:`TISSUE_THRESHOLD`): the count and percentage with ``det J <= 0``; computed box by box with a
  one-voxel halo, so memory is bounded by the box, not the field;
* **inverse** — the residual ``|v(y) + u(y + v(y))|`` of the fixed-point inverse that ``warp --inverse``
  uses, at ``y = φ(x)`` for every :data:`INVERSE_STRIDE`-th tissue voxel per axis: percentiles in world
  units and in field voxels (the field's largest spacing).

The block is written to ``attrs["patchmorph"]["quality"]`` (:func:`record_quality`) with the pre-flight
record (geometry, orientation scores) under ``preflight``. The documented thresholds
(:class:`QualityThresholds`): at most 1 % of the tissue voxels folded, a final similarity no lower than
the initial one (by more than 0.01), an inverse residual within two field voxels at the 99th percentile. A field that fails
them is kept but marked ``status: failed_quality`` and not complete (readers refuse it with the reason),
unless the user accepted it (``--accept-quality``).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, Field

from patchmorph_core.displacement import (
    INVERSE_ITERATIONS,
    AffineDisplacement,
    FieldDisplacement,
    displacement_on_grid,
    invert_points,
)
from patchmorph_core.errors import QualityError
from patchmorph_core.metrics import jacobian_determinant, local_ncc
from patchmorph_core.sampling import intensity_range, is_separable, sample_separable, tissue_mask
from patchmorph_core.source import MultiscaleImage, float32_if_small
from patchmorph_core.spatial import Grid, read_box
from pipeline.integrity import VerifiedStore
from pipeline.ngff import field_view

log = logging.getLogger(__name__)

NCC_WINDOW = 5
"""Window of the local NCC on the quality grid, voxels per edge."""

QUALITY_GRID_VOXELS = 64**3
"""Largest quality grid for the similarity (a larger field is compared on a coarser grid over its box): the
figure summarises the whole alignment, so about 64 voxels across the field box resolve it; the before/after
threshold compares two values on the same grid."""

TISSUE_THRESHOLD = 0.1
"""A field voxel is inside the fixed tissue where the normalised fixed image is at least this."""

BOX = 64
"""Edge of the field boxes the folding and the inverse are measured in (plus a one-voxel halo)."""

QUALITY_THREADS = 2
"""Threads that measure the folding and the inverse box by box, beside the one measuring the similarity."""

INVERSE_STRIDE = 2
"""The inverse's residual is measured at every this-many-th tissue voxel along each axis."""

INVERSE_TOLERANCE = 1e-3
"""A point of the inverse check stops iterating once its residual is at most this many field voxels (the
thresholds judge residuals of a field voxel and more; most points get there in a third of the steps)."""


FIELD_IN_MEMORY_BYTES = 512 * 2**20
"""A field up to this size (float32) is read into memory once for the checks; a larger one is read per box
(the inverse's points then read the store at every step)."""


PERCENTILES = (50.0, 90.0, 99.0, 99.9)
"""Percentiles of the inverse residual recorded (and the maximum)."""


class QualityThresholds(BaseModel):
    """The documented thresholds a field must meet (``docs/checks.md``).

    Attributes:
        max_folded_percent: largest percentage of the field voxels inside the fixed tissue with ``det J <= 0``.
        min_similarity_change: smallest ``final - initial`` local NCC inside the tissue: the deformable
            stages must not make the alignment worse than their start (beyond 0.01, rounding of a pair that
            was already aligned).
        max_inverse_p99_voxels: largest 99th percentile of the inverse residual, in field voxels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_folded_percent: float = Field(1.0, ge=0.0)
    min_similarity_change: float = -0.01
    max_inverse_p99_voxels: float = Field(2.0, gt=0.0)


@dataclass
class QualityReport:
    """The quality block of one field and whether it passed.

    Attributes:
        block: the JSON-ready block (``attrs["patchmorph"]["quality"]``).
        failures: one clause per threshold the field failed (empty: passed).
    """

    block: dict[str, Any]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when the field met every threshold."""
        return not self.failures

    def sentence(self, field_path: str | Path) -> str:
        """One sentence for the user: what failed, where the field is, what to do."""
        return (
            f"the registration failed its quality checks ({'; '.join(self.failures)}): the field {field_path} is "
            "kept but marked failed; look at its quality block and the QC images, then rerun with other settings "
            "(--overwrite), or rerun the same command with --accept-quality (in a flow or a job's config: checks.accept_quality) "
            "to keep it."
        )

    def summary(self) -> list[str]:
        """Lines that print the block for the user."""
        sim, fold, inv = (self.block[k] for k in ("similarity", "folding", "inverse"))
        limits = self.block["thresholds"]
        return [
            f"quality: local NCC inside the fixed tissue {sim['identity']:.3f} as given, {sim['initial']:.3f} after "
            f"the initial alignment, {sim['final']:.3f} registered",
            f"quality: folded {fold['folded_percent']:.3g} % of {fold['tissue_voxels']} tissue voxels of the field "
            f"(limit {limits['max_folded_percent']} %); smallest det J {fold['min_jacobian']:.3g}",
            f"quality: inverse residual p50 {inv['percentiles_voxels']['50']:.3g}, p99 "
            f"{inv['percentiles_voxels']['99']:.3g}, max {inv['max_voxels']:.3g} field voxels (limit p99 "
            f"{limits['max_inverse_p99_voxels']}); {'passed' if self.passed else 'FAILED'}",
        ]


def _boxes(shape: tuple[int, ...], edge: int = BOX) -> Iterator[tuple[slice, slice, slice]]:
    """The ``edge``-sized boxes that tile a grid of ``shape`` (raster order, clipped at the far sides)."""
    for corner in itertools.product(*(range(0, n, edge) for n in shape)):
        yield tuple(slice(c, min(c + edge, n)) for c, n in zip(corner, shape, strict=True))  # type: ignore[misc]


def _tissue(fixed: MultiscaleImage, grid: Grid, fixed_range: tuple[float, float]) -> np.ndarray:
    """``(Z, Y, X)`` bool: the voxels of ``grid`` inside the fixed tissue (:func:`sampling.tissue_mask`)."""
    return tissue_mask(fixed, grid, TISSUE_THRESHOLD, fixed_range)


def _quality_grid(grid: Grid) -> Grid:
    """The field grid, or a coarser grid over its box with at most :data:`QUALITY_GRID_VOXELS` voxels."""
    voxels = float(np.prod(grid.shape))
    if voxels <= QUALITY_GRID_VOXELS:
        return grid
    factor = (voxels / QUALITY_GRID_VOXELS) ** (1.0 / 3.0)
    return grid.resampled(grid.spacing * factor)


@dataclass(frozen=True)
class SimilarityStart:
    """The part of the similarity block that needs no field (:func:`similarity_start`).

    Attributes:
        grid: the quality grid (:func:`_quality_grid` of the field grid).
        mask: ``(Z, Y, X)`` bool, the fixed tissue on ``grid``.
        target: ``(Z, Y, X)`` the fixed image on ``grid``.
        identity, initial: local NCC inside the tissue of the moving image as given and after the initial
            alignment.
    """

    grid: Grid
    mask: np.ndarray
    target: np.ndarray
    identity: float
    initial: float


def _ncc_through(start_grid: Grid, moving: MultiscaleImage, world: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Local NCC inside ``mask`` between ``target`` and the moving image sampled at ``world`` ``(N, 3)``."""
    warped = moving.sample(world.reshape((*start_grid.shape, 3)), float(np.min(start_grid.spacing)))
    return local_ncc(target, warped, NCC_WINDOW, mask=mask) if mask.any() else 0.0


def similarity_start(
    fixed: MultiscaleImage, moving: MultiscaleImage, grid: Grid, initial: np.ndarray, fixed_range: tuple[float, float]
) -> SimilarityStart:
    """The similarity before the deformable stages on the quality grid of the field grid ``grid``: the moving
    image as given and after the ``(4, 4)`` initial alignment (it needs no field, so ``register`` measures it
    while the passes run). ``moving`` must be in the fixed image's unit."""
    quality = _quality_grid(grid)
    flat = quality.points().reshape(-1, 3)
    mask = _tissue(fixed, quality, fixed_range)
    target = fixed.sample(quality.points(), float(np.min(quality.spacing)))
    identity = _ncc_through(quality, moving, flat, target, mask)
    after_initial = _ncc_through(quality, moving, flat + AffineDisplacement(initial)(flat), target, mask)
    return SimilarityStart(quality, mask, target, identity, after_initial)


def _field_on(quality: Grid, field_array: Any, grid: Grid) -> np.ndarray:
    """``(3, Z, Y, X)`` float32: the field on ``grid`` sampled trilinearly at the voxel centres of the quality
    grid (constant beyond the field's outer voxel centres) — axis by axis when the quality grid is the field
    grid or a resampling of it (:func:`~patchmorph_core.sampling.sample_separable`: the same values up to
    float32 rounding, without a gather per point), else point by point."""
    matrix = grid.index_map(quality)
    if is_separable(matrix):
        return sample_separable(field_array, matrix, tuple(quality.shape), "border")
    return displacement_on_grid(FieldDisplacement(field_array, grid), quality)


def similarity_block(
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    field_array: Any,
    grid: Grid,
    initial: np.ndarray,
    fixed_range: tuple[float, float],
    start: SimilarityStart | None = None,
) -> dict[str, Any]:
    """Local NCC inside the fixed tissue on the quality grid: moving as given, after the initial alignment,
    and through the field (see the module docstring). ``moving`` must be in the fixed image's unit; ``start``:
    the first two, measured before (None: measured here). ``field_array``: the ``(3, Z, Y, X)`` world
    displacement on ``grid`` (components ``(z, y, x)``, in ``grid.unit``); ``initial``: the ``(4, 4)``
    world→world initial alignment; ``fixed_range``: ``(lo, hi)`` in the fixed image's intensity units. The NCC
    values are dimensionless, in ``[-1, 1]``."""
    start = start or similarity_start(fixed, moving, grid, initial, fixed_range)
    quality = start.grid
    flat = quality.points().reshape(-1, 3)
    through = np.moveaxis(_field_on(quality, field_array, grid), 0, -1)
    final = _ncc_through(quality, moving, flat + through.reshape(-1, 3), start.target, start.mask)
    return {
        "metric": f"local NCC, {NCC_WINDOW}-voxel window, inside the fixed tissue",
        "grid_shape": list(quality.shape),
        "grid_spacing": [float(s) for s in quality.spacing],
        "identity": float(start.identity),
        "initial": float(start.initial),
        "final": float(final),
    }


@dataclass(frozen=True)
class BoxQuality:
    """Folding and inverse figures of one box of the field grid (:func:`box_quality`)."""

    tissue_voxels: int
    folded: int
    min_det: float
    residuals: np.ndarray


def box_quality(
    fixed: MultiscaleImage,
    forward: FieldDisplacement,
    box: tuple[slice, slice, slice],
    fixed_range: tuple[float, float],
) -> BoxQuality:
    """Tissue voxels, folded ones and the smallest det J among them, and the inverse's residual norms (world
    units) at every :data:`INVERSE_STRIDE`-th tissue voxel, in ``box`` of ``forward``'s grid."""
    grid, shape = forward.grid, forward.grid.shape
    halo = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, shape, strict=True))
    block = read_box(forward.field, (slice(None), *halo)).astype(np.float32)
    det = jacobian_determinant(block, grid.crop([s.start for s in halo], [s.stop for s in halo]))
    inner = tuple(slice(s.start - h.start, s.stop - h.start) for s, h in zip(box, halo, strict=True))
    det = det[inner]
    box_grid = grid.crop([s.start for s in box], [s.stop for s in box])
    mask = _tissue(fixed, box_grid, fixed_range)
    sub = np.zeros_like(mask)
    sub[::INVERSE_STRIDE, ::INVERSE_STRIDE, ::INVERSE_STRIDE] = True
    index = np.argwhere(mask & sub)
    residuals = np.zeros(0)
    if index.size:
        x = box_grid.index_to_world(index)
        tolerance = INVERSE_TOLERANCE * float(np.max(grid.spacing))
        _, residual = invert_points(forward, x + forward(x), INVERSE_ITERATIONS, tolerance=tolerance)
        residuals = np.linalg.norm(residual, axis=-1)
    min_det = float(det[mask].min()) if mask.any() else np.inf
    return BoxQuality(int(mask.sum()), int((det[mask] <= 0).sum()), min_det, residuals)


def folding_and_inverse(
    fixed: MultiscaleImage,
    field_array: Any,
    grid: Grid,
    fixed_range: tuple[float, float],
    pool: concurrent.futures.Executor,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Folded tissue voxels and the inverse's residual of a stored field, box by box (module docstring), the
    boxes on ``pool``'s threads (NumPy and SciPy release the GIL in their loops; the figures do not depend on
    the order)."""
    forward = FieldDisplacement(field_array, grid)
    results = list(pool.map(lambda box: box_quality(fixed, forward, box, fixed_range), _boxes(grid.shape, BOX)))
    tissue_voxels = sum(r.tissue_voxels for r in results)
    folded = sum(r.folded for r in results)
    min_det = min((r.min_det for r in results), default=np.inf)
    residuals = [r.residuals for r in results if r.residuals.size]
    voxel = float(np.max(grid.spacing))
    values = np.concatenate(residuals) if residuals else np.zeros(1)
    percentiles = {f"{p:g}": float(np.percentile(values, p)) for p in PERCENTILES}
    folding = {
        "tissue_voxels": tissue_voxels,
        "folded_voxels": folded,
        "folded_percent": 100.0 * folded / max(tissue_voxels, 1),
        "min_jacobian": float(min_det) if np.isfinite(min_det) else 1.0,
    }
    inverse = {
        "unit": grid.unit,
        "field_voxel": voxel,
        "samples": int(values.size),
        "percentiles": percentiles,
        "max": float(values.max()),
        "percentiles_voxels": {k: v / voxel for k, v in percentiles.items()},
        "max_voxels": float(values.max()) / voxel,
    }
    return folding, inverse


def stage_similarity(passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-pass similarity figures of the driver's pass records (the passes it scored)."""
    return [
        {
            "name": p.get("name"),
            "similarity": p.get("similarity"),
            "before": p["similarity_before"],
            "after": p["similarity_after"],
            "accepted": p.get("accepted"),
        }
        for p in passes
        if "similarity_before" in p
    ]


def judge(block: Mapping[str, Any], limits: QualityThresholds) -> list[str]:
    """The clauses of every threshold ``block`` fails (empty: passed)."""
    failures = []
    sim, fold, inv = block["similarity"], block["folding"], block["inverse"]
    if fold["folded_percent"] > limits.max_folded_percent:
        failures.append(
            f"{fold['folded_percent']:.3g} % of the field inside the fixed tissue is folded (limit "
            f"{limits.max_folded_percent:g} %)"
        )
    change = sim["final"] - sim["initial"]
    if change < limits.min_similarity_change:
        failures.append(
            f"the local NCC fell from {sim['initial']:.3f} at the start to {sim['final']:.3f} registered"
        )
    p99 = inv["percentiles_voxels"]["99"]
    if p99 > limits.max_inverse_p99_voxels:
        failures.append(
            f"the inverse's residual is {p99:.3g} field voxels at the 99th percentile (limit "
            f"{limits.max_inverse_p99_voxels:g})"
        )
    return failures


def open_field_array(path: str | Path, grid: Grid) -> Any:
    """Level 0 of a field being finished (complete or not) on ``grid``, read through a checking store and
    seen in world components (:func:`pipeline.ngff.field_view`), as :func:`pipeline.ngff.read_field` reads it."""
    store = VerifiedStore(
        zarr.storage.LocalStore(str(path), read_only=True), str(path), every_chunk_written=True
    )
    group = zarr.open_group(store=store, mode="r")
    return field_view(group["0"], grid, dict(group.attrs).get("patchmorph", {}))


def assess_field(
    path: str | Path,
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    grid: Grid,
    initial: np.ndarray,
    preflight: Mapping[str, Any] | None = None,
    limits: QualityThresholds | None = None,
    stages: list[dict[str, Any]] | None = None,
    start: SimilarityStart | None = None,
) -> QualityReport:
    """Measure the quality block of the field stored at ``path`` and write it into its metadata.

    Args:
        path: the field (OME-Zarr written by ``register``; complete or not).
        fixed: the fixed image; ``moving``: the moving image in the fixed image's unit.
        grid: the field's grid.
        initial: the ``(4, 4)`` initial alignment (fixed → moving world).
        preflight: the pre-flight record to keep in the block (geometry, orientation scores).
        limits: thresholds (default :class:`QualityThresholds`).
        stages: per-pass similarity before/after (:func:`stage_similarity` of the driver's pass records).
        start: the similarity before the field (:func:`similarity_start`), when measured already.

    Returns:
        The :class:`QualityReport`; a failed one has marked the field ``status: failed_quality``.
    """
    limits = limits or QualityThresholds()
    array = open_field_array(path, grid)
    array = float32_if_small(array, FIELD_IN_MEMORY_BYTES)  # read once, not at every step of the inverse
    fixed_range = intensity_range(fixed)
    with (
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="quality") as pool,
        concurrent.futures.ThreadPoolExecutor(QUALITY_THREADS, thread_name_prefix="quality-box") as boxes,
    ):
        # the parts are independent and NumPy/SciPy release the GIL in their loops: every core works
        folds = pool.submit(folding_and_inverse, fixed, array, grid, fixed_range, boxes)
        similarity = similarity_block(fixed, moving, array, grid, initial, fixed_range, start)
        folding, inverse = folds.result()
    block = {
        "version": 1,
        "similarity": {**similarity, "stages": list(stages or [])},
        "folding": folding,
        "inverse": inverse,
        "thresholds": limits.model_dump(),
        "preflight": dict(preflight or {}),
    }
    report = QualityReport(block, judge(block, limits))
    block["passed"] = report.passed
    block["failures"] = list(report.failures)
    record_quality(path, block)
    for line in report.summary():
        log.info("%s", line)
    return report


def record_quality(path: str | Path, block: Mapping[str, Any], accepted: bool = False) -> None:
    """Write the quality block into the field's metadata; a failed, unaccepted field gets
    ``status: failed_quality`` and ``complete: false`` (:func:`pipeline.ngff.read_field` refuses it)."""
    group = zarr.open_group(str(path), mode="r+")
    meta = dict(group.attrs["patchmorph"])
    meta["quality"] = {**dict(block), "accepted": accepted}
    if block["passed"] or accepted:
        meta.pop("status", None)
    else:
        meta["status"] = "failed_quality"
        meta["complete"] = False
    group.attrs["patchmorph"] = meta


def conclude(path: str | Path, report: QualityReport, accept: bool) -> bool:
    """Whether the field may be marked complete: it passed, or the user accepted it (recorded in the block)."""
    if report.passed:
        return True
    if accept:
        record_quality(path, report.block, accepted=True)
        log.warning("the field %s failed its quality checks and was accepted (--accept-quality)", path)
        return True
    return False


def raise_if_failed(path: str | Path, report: QualityReport, accept: bool) -> None:
    """:class:`QualityError` with :meth:`QualityReport.sentence` for a failed field the user did not accept."""
    if not report.passed and not accept:
        raise QualityError(report.sentence(path))
