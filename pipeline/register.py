"""``register``: OME-Zarr fixed + moving image → OME-Zarr displacement field; and the same in memory.

:func:`register_files` is the one function the CLI and the flows call. It

1. validates every input before heavy work (paths, output, weights, units, finite intensities, overlap of
   the two images in world after the initial alignment);
2. derives the run plan with :func:`patchmorph_core.inference.plan_registration` (lattices, field grids,
   intensity ranges);
3. runs it with the one registration driver (:func:`pipeline.driver.run_registration`) on an executor
   (:func:`pipeline.cluster.open_executor`: threads of this process unless a Dask cluster is asked for)
   into OME-Zarr arrays (:class:`pipeline.driver.ZarrStore`): each pass's field in ``<out>.run/<name>.zarr``
   (``stage1``, ``stage2``, ``stage2.1`` for a refinement pass of stage 2; see ``PatchLattice.name``),
   the uncertainty in ``<out>/uncertainty`` (the finest pass's spread, overwritten by the polish's residual),
   the polished field in ``out``;
4. resumes: ``<out>.run/`` keeps per-chunk completion records (:mod:`pipeline.resume`); rerunning the same
   command after a crash skips finished chunks and yields the identical field.

:func:`register_arrays` runs the same driver on images already in memory, every pass one chunk in numpy
(:class:`pipeline.driver.MemoryStore`), on threads of this process.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from patchmorph_core.config import InferenceConfig, load_yaml
from patchmorph_core.errors import InputError
from patchmorph_core.inference import RegistrationPlan, RegistrationResult, plan_registration
from patchmorph_core.model import DEFAULT_WEIGHTS, load_model
from patchmorph_core.sampling import intensity_range
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid
from pipeline.checks import (
    CheckOptions,
    check_free_space,
    check_geometry,
    check_outputs,
    check_pair_orientation,
    check_writable,
    collected_warnings,
    run_outputs,
    warn_bright_planes,
    warn_empty_planes,
    warn_stretch,
)
from pipeline.cluster import load_cluster_config, open_executor
from pipeline.driver import Inputs, MemoryStore, ZarrStore, run_registration
from pipeline.executor import thread_executor
from pipeline.ngff import (
    converted_pyramid,
    field_metadata,
    finish_image,
    read_image,
    set_attribute,
    written_by_patchmorph,
)
from pipeline.quality import assess_field, conclude, raise_if_failed, similarity_start, stage_similarity
from pipeline.resume import (
    atomic_write_json,
    check_inputs_unchanged,
    code_identity,
    content_identity,
    input_writes,
    locks_output,
    open_run,
    run_folder,
    stored_attribute,
)

log = logging.getLogger(__name__)


class RegistrationRecord(BaseModel):
    """What :func:`register_files` wrote.

    Attributes:
        field: the displacement field (OME-Zarr, axes ``c, z, y, x``, fixed → moving, fixed unit).
        uncertainty: the registration's uncertainty map (child image of ``field``): the local MIND-SSC
            dissimilarity left after the polish (0-1), or without a polish the spread of the patch estimates.
        run: the run folder with the completion records (a rerun of an interrupted command resumes from
            it); removed when the run finishes unless ``keep_run``.
        grid_shape: field grid shape ``(Z, Y, X)``.
        spacing: field spacing ``(z, y, x)`` in ``unit``.
        field_spacing: the field spacing used, where it came from (given or default, with the reason) and
            the patch spacing of every network pass.
        unit: world unit (the fixed image's).
        chunks: output chunks of the final stage; ``skipped``: chunks of all stages found done.
        stages: per-stage figures (chunks, blocks, patches, seconds).
        polish: the polish's figures (steps and tiles per pass, seconds), or None (``polish_iterations: 0``).
        initial_alignment: the initial alignment's record (method, NCC before/after, accepted, seconds)
            and its ``(4, 4)`` fixed → moving ``matrix``.
        quality: the field's quality block (:mod:`pipeline.quality`), also in its metadata.
        seconds: wall time.
        dashboard: Dask dashboard address used.
    """

    model_config = ConfigDict(extra="forbid")

    field: Path
    uncertainty: Path
    run: Path
    grid_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    field_spacing: dict[str, Any]
    unit: str
    chunks: int
    skipped: int
    stages: list[dict[str, Any]]
    polish: dict[str, Any] | None = None
    initial_alignment: dict[str, Any]
    quality: dict[str, Any]
    seconds: float
    dashboard: str


# -- client side --------------------------------------------------------------------------------------------
def _open_inputs(fixed: str | Path, moving: str | Path) -> tuple[MultiscaleImage, MultiscaleImage]:
    """Open both images lazily, an image another tool wrote with the pyramid ``convert`` would give it, in memory
    (:func:`pipeline.ngff.converted_pyramid`; such images together within :data:`IMAGES_IN_MEMORY_BYTES`, else the
    one that does not fit is refused, naming ``convert``); InputError naming the bad one."""
    images, budget = [], IMAGES_IN_MEMORY_BYTES
    for role, path in (("fixed", fixed), ("moving", moving)):
        if not Path(path).exists() and "://" not in str(path):
            raise InputError(f"{role} image {path} does not exist: give the path of an OME-Zarr image.")
        image = read_image(path)
        if not written_by_patchmorph(path):
            image = converted_pyramid(image, path, f"{role} image", budget)
            budget -= image.nbytes
        images.append(image)
    return images[0], images[1]


IMAGES_IN_MEMORY_BYTES = 256 * 2**20
"""Both input pyramids up to this size together are read into memory once when the registration runs on
threads of this process: every pass then samples arrays in memory instead of reading the stores patch by
patch (the same values, so the same field); larger inputs, and runs on a Dask cluster, read lazily. The
PatchMorph pyramids built for images another tool wrote (:func:`pipeline.ngff.converted_pyramid`, in ``register``
and ``warp``) must fit in it too, on any executor."""


FIELD_WARNINGS = "warnings"
"""Key of ``attrs["patchmorph"]`` under which a field keeps the warnings its registration gave (each once, in
order): the summaries of a job or a batch item that reuses the field list them."""


def field_warnings(field: str | Path) -> list[str]:
    """The warnings the registration that wrote ``field`` gave (:data:`FIELD_WARNINGS`; none for a field of an
    earlier version)."""
    return list(stored_attribute(Path(field), FIELD_WARNINGS) or [])


def weights_identity(weights: str | Path | None) -> dict[str, Any] | None:
    """Path and SHA-256 (:func:`pipeline.resume.content_identity`) of the model weights ``weights`` (the packaged
    default when None)."""
    return content_identity(Path(weights) if weights else DEFAULT_WEIGHTS)


MIN_FIELD_VOXELS = 2
"""The field needs at least this many voxels along every axis: across one (a single section, or two planes of 50 µm
under a 100 µm field) the fit has nothing to go on and the polish's gradients fail."""


def _check_thickness(fixed: Grid, field: Grid, fixed_path: str | Path) -> None:
    """InputError when the output ``field`` grid (the finest pass's, on the fixed image's box) has fewer than
    :data:`MIN_FIELD_VOXELS` voxels along an axis: the fixed image (``fixed``, its voxels) is too thin for a 3-D
    field, e.g. a single section."""
    axis = int(np.argmin(field.shape))
    if field.shape[axis] >= MIN_FIELD_VOXELS:
        return
    spacing = field.spacing[axis]
    raise InputError(
        f"fixed image {fixed_path} is {fixed.shape[axis]} voxel(s) of {fixed.spacing[axis]:g} {fixed.unit} thick along "
        f"its array axis {axis}, less than {MIN_FIELD_VOXELS} voxels of the {spacing:g} {field.unit} field: a single "
        "section or a few planes cannot be registered in 3-D; give a stack thicker than "
        f"{(MIN_FIELD_VOXELS - 1) * spacing:g} {field.unit} (more planes), or check its voxel size."
    )


def _check_overlap(fixed: Grid, moving: Grid, initial: np.ndarray, moving_path: str | Path) -> None:
    """InputError when the moving image, moved by the initial alignment, misses the fixed image's world box.

    ``initial`` is the ``(4, 4)`` fixed → moving world map; the moving box's corners are mapped back into
    the fixed world frame and their axis-aligned box is compared with the fixed one.
    """
    f_low, f_high = fixed.world_bounds()
    m_low, m_high = moving.world_bounds()
    corners = np.array(np.meshgrid(*np.stack([m_low, m_high]).T, indexing="ij")).reshape(3, -1).T
    back = (np.c_[corners, np.ones(len(corners))] @ np.linalg.inv(initial).T)[:, :3]
    low = np.maximum(f_low, back.min(axis=0))
    high = np.minimum(f_high, back.max(axis=0))
    if np.any(high <= low):
        raise InputError(
            f"moving image {moving_path} does not overlap the fixed image in world space after the initial "
            "alignment: check both images' voxel sizes, units and orientation."
        )


def resolve_config(config: InferenceConfig | str | Path | None) -> InferenceConfig:
    """An :class:`InferenceConfig` from an object, a YAML path or None (defaults)."""
    if config is None:
        return InferenceConfig()
    if isinstance(config, InferenceConfig):
        return config
    return load_yaml(config, InferenceConfig)


def _fingerprint(
    fixed: str | Path, moving: str | Path, config: InferenceConfig, plan: RegistrationPlan, chunk: int | None
) -> dict[str, Any]:
    """What a resumable run must share with the run that left the records (inputs by content identity)."""
    weights = Path(config.weights) if config.weights else DEFAULT_WEIGHTS
    return {
        "fixed": content_identity(fixed),
        "moving": content_identity(moving),
        "config": config.model_dump(mode="json"),
        "weights": content_identity(weights),
        "chunk_size": chunk,
        "grids": [[list(g.shape), np.round(g.affine, 9).tolist()] for g in plan.grids],
        "code": code_identity(),
    }


INITIAL_RECORD = "initial.json"
"""File in the run folder holding the initial alignment of the first attempt (reused on resume: the fit
runs on floating-point hardware whose last bits may differ between processes)."""


def _stored_initial(run_root: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The initial matrix and record a previous attempt of this run stored, or None."""
    path = run_root / INITIAL_RECORD
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return np.asarray(data["matrix"], dtype=np.float64), data["alignment"]


def _store_initial(run_root: Path, rplan: RegistrationPlan) -> None:
    """Keep the run's initial alignment for a resumed attempt (written once, atomically)."""
    path = run_root / INITIAL_RECORD
    if path.is_file():
        return
    atomic_write_json(path, {"matrix": rplan.initial.tolist(), "alignment": rplan.alignment})


def _field_meta(
    fixed: str | Path, moving: str | Path, cfg: InferenceConfig, model: Any, rplan: RegistrationPlan
) -> dict[str, Any]:
    """The output field's metadata: inputs, model, config, initial alignment (plus the field contract)."""
    provenance = {
        "fixed": str(fixed),
        "moving": str(moving),
        "model": {
            "weights": str(cfg.weights or DEFAULT_WEIGHTS),
            "weights_identity": weights_identity(cfg.weights),
            "config": model.config.model_dump(mode="json"),
        },
        "config": cfg.model_dump(mode="json"),
        "initial_matrix": rplan.initial.tolist(),
        "initial_alignment": rplan.alignment,
        "field_spacing": _spacing_record(rplan),
    }
    return field_metadata(rplan.grids[-1], provenance)


def _spacing_record(plan: RegistrationPlan) -> dict[str, Any]:
    """The field spacing used, where it came from, and the patch spacing of every network pass."""
    spacing = plan.field_spacing
    return {
        "value": spacing.value,
        "unit": spacing.unit,
        "source": spacing.source,
        "note": spacing.note,
        "passes": {lat.name: lat.extent / lat.size for lat in plan.lattices},
    }


@locks_output
def register_files(
    fixed: str | Path,
    moving: str | Path,
    out: str | Path,
    config: InferenceConfig | str | Path | None = None,
    chunk_size: int | None = None,
    workers: int | None = None,
    scheduler: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    checks: CheckOptions | None = None,
    keep_run: bool = False,
    names: Mapping[str, str] | None = None,
) -> RegistrationRecord:
    """Register ``moving`` to ``fixed`` and write the displacement field to ``out`` (see the module docstring).

    Args:
        fixed: fixed image (OME-Zarr); the field lives on its world frame and unit.
        moving: moving image (OME-Zarr, any unit, spacing, orientation).
        out: output field (``.zarr``); its uncertainty image is ``out/uncertainty``.
        config: :class:`InferenceConfig`, a YAML path, or None for defaults.
        chunk_size: field voxels per chunk edge of the output (default: :meth:`~pipeline.driver.ZarrStore.chunk_for`,
            64, or a field of at most 128³ voxels in two halves).
        workers: local Dask workers (default: fit the machine).
        scheduler: scheduler address or cluster YAML (``configs/cluster/*.yaml``); None: local cluster.
        overwrite: replace a finished output and discard old records.
        progress: show progress bars.
        checks: what the pre-flight and quality checks may let through (:class:`pipeline.checks.CheckOptions`).
        keep_run: keep the run folder ``<out>.run`` (per-chunk records, block timings, the passes' fields)
            after the run finishes; by default it is removed then (it exists only to resume).
        names: how the checks' messages name the ``fixed`` and ``moving`` images (default: their paths; a job
            names what the user gave, not its converted copies).

    Returns:
        A :class:`RegistrationRecord` naming what was written.

    Raises:
        InputError: any bad input, before heavy work starts (:func:`pipeline.checks.check_pair`'s two parts;
            the orientation check runs beside the initial alignment), or another run writing ``out``
            (:func:`pipeline.resume.output_lock`, held while this runs).
        QualityError: the field failed its quality thresholds (:mod:`pipeline.quality`) and was not accepted.
    """
    with collected_warnings() as warned:  # recorded in the field: a job that reuses it lists them in its summary
        return _register_files(
            fixed, moving, out, config, chunk_size, workers, scheduler, overwrite, progress, checks, keep_run, names,
            warned,
        )  # fmt: skip


def _register_files(
    fixed: str | Path,
    moving: str | Path,
    out: str | Path,
    config: InferenceConfig | str | Path | None,
    chunk_size: int | None,
    workers: int | None,
    scheduler: str | Path | None,
    overwrite: bool,
    progress: bool,
    checks: CheckOptions | None,
    keep_run: bool,
    names: Mapping[str, str] | None,
    warned: list[str],
) -> RegistrationRecord:
    """:func:`register_files`; ``warned`` fills with the warnings logged meanwhile, and is recorded in the field
    (``attrs["patchmorph"]["warnings"]``) before it is marked complete."""
    tic = time.perf_counter()
    out = Path(out)
    cfg = resolve_config(config)
    inputs = {"fixed": fixed, "moving": moving, "weights": cfg.weights, "config": config, "scheduler": scheduler}
    check_outputs(inputs={k: v for k, v in inputs.items() if isinstance(v, str | Path)}, outputs=run_outputs(out))
    cluster_config = load_cluster_config(scheduler, workers)
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"--chunk-size {chunk_size} is invalid: give a positive number of field voxels.")
    run_root = run_folder(out, overwrite)
    fixed_img, moving_img = _open_inputs(fixed, moving)
    reading = input_writes({"fixed": fixed, "moving": moving})
    checks = checks or CheckOptions()
    paths = {"fixed": str(fixed), "moving": str(moving), **(names or {})}
    geometry = check_geometry(fixed_img, moving_img, paths, checks)
    if cluster_config.kind == "threads" and fixed_img.nbytes + moving_img.nbytes <= IMAGES_IN_MEMORY_BYTES:
        fixed_img, moving_img = fixed_img.in_memory(), moving_img.in_memory()
    model = load_model(cfg.weights, "cpu")
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="preflight") as pool:
        # the orientation check and the initial alignment read the same coarse copies and nothing else: they
        # run side by side (both cores work); the check's refusal wins over anything the plan raised
        orientation = pool.submit(check_pair_orientation, fixed_img, moving_img, paths, checks, geometry)
        try:
            rplan = plan_registration(
                model, fixed_img, moving_img, cfg, None if overwrite else _stored_initial(run_root)
            )
        finally:
            preflight = orientation.result()
    _check_thickness(fixed_img.grid, rplan.grids[-1], paths["fixed"])
    _check_overlap(fixed_img.grid, rplan.moving.grid, rplan.initial, paths["moving"])
    warn_stretch(rplan.initial, fixed_img, paths["fixed"])
    for role, image in (("fixed", fixed_img), ("moving", moving_img)):
        warn_empty_planes(image, role, paths[role])
        warn_bright_planes(image, role, paths[role])
    check_writable(out.parent)
    check_free_space(out.parent, sum(2 * 16 * int(np.prod(g.shape)) for g in rplan.grids), f"the field {out}")
    records = open_run(run_root, _fingerprint(fixed, moving, cfg, rplan, chunk_size), overwrite)
    _store_initial(run_root, rplan)
    store = ZarrStore(out, records, chunk_size, _field_meta(fixed, moving, cfg, model, rplan))
    with open_executor(cluster_config) as executor, concurrent.futures.ThreadPoolExecutor(1) as side:
        # the quality block's similarity before the field needs no field: measured while the passes run
        start = side.submit(
            similarity_start, fixed_img, rplan.moving, rplan.grids[-1], rplan.initial, intensity_range(fixed_img)
        )
        inputs = Inputs(fixed_img, rplan, cfg, cfg.weights, model if executor.kind == "threads" else None)
        run = run_registration(executor, inputs, store, progress)
        client = getattr(executor, "client", None)
        finish_image(out / "uncertainty", n_levels=1, client=client)
        quality = assess_field(
            out, fixed_img, rplan.moving, rplan.grids[-1], rplan.initial, preflight,
            stages=stage_similarity(run.stages), start=start.result(),
        )  # fmt: skip
        check_inputs_unchanged(reading, out)
        set_attribute(out, FIELD_WARNINGS, list(warned))
        if conclude(out, quality, checks.accept_quality):
            finish_image(out, n_levels=1, client=client)
            records.finish()
            if not keep_run:
                shutil.rmtree(run_root)
    grid = rplan.grids[-1]
    record = RegistrationRecord(
        field=out,
        uncertainty=out / "uncertainty",
        run=run_root,
        grid_shape=grid.shape,
        spacing=tuple(float(s) for s in grid.spacing),  # type: ignore[arg-type]
        field_spacing=_spacing_record(rplan),
        unit=grid.unit,
        chunks=run.chunks,
        skipped=run.skipped,
        stages=run.stages,
        polish=run.polish,
        initial_alignment={**rplan.alignment, "matrix": rplan.initial.tolist()},
        quality=quality.block,
        seconds=time.perf_counter() - tic,
        dashboard=executor.dashboard,
    )
    log.info(
        "wrote displacement field %s (grid %s, %s), uncertainty %s",
        out,
        grid.shape,
        grid.unit,
        record.uncertainty,
    )
    raise_if_failed(out, quality, checks.accept_quality)
    return record


def register_arrays(
    model: Any,
    fixed: MultiscaleImage,
    moving: MultiscaleImage,
    config: InferenceConfig,
    *,
    show_progress: bool = False,
    threads: int | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` in memory: the chunked driver with every pass one chunk in numpy
    (:class:`~pipeline.driver.MemoryStore`) on threads of this process — the same lattices, block tasks and
    reduction as :func:`register_files`, hence the same field. Seeded: the same inputs and config give the
    same field.

    Args:
        model: a PatchMorph model (anything with ``config.patch_size``, ``stage_extents`` and
            ``stage_update``), run as it is (not reloaded).
        fixed: fixed image pyramid (its grid and unit define the field's world frame).
        moving: moving image pyramid (converted to the fixed unit).
        config: inference settings.
        show_progress: a progress bar per pass.
        threads: task threads (None: one per core).

    Returns:
        :class:`~patchmorph_core.inference.RegistrationResult`: the field, its grid, the uncertainty and
        ``info`` (initial alignment, per-pass figures, polish, settings).
    """
    plan = plan_registration(model, fixed, moving, config)
    with thread_executor(threads) as executor:
        run = run_registration(executor, Inputs(fixed, plan, config, config.weights, model), MemoryStore(), show_progress)
    info = {
        "initial_matrix": plan.initial.tolist(),
        "initial_alignment": plan.alignment,
        "field_spacing": _spacing_record(plan),
        "polish": run.polish,
        "unit": fixed.unit,
        "stages": run.stages,
        "inference_config": config.model_dump(mode="json"),
        "model_config": model.config.model_dump(mode="json"),
    }
    return RegistrationResult(run.field, run.grid, run.uncertainty, info)
