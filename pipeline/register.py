"""``register``: OME-Zarr fixed + moving image → OME-Zarr displacement field, chunk by chunk on Dask.

:func:`register_files` is the one function the CLI and the flows call. It

1. validates every input before heavy work (paths, output, weights, units, finite intensities, overlap of
   the two images in world after the initial alignment);
2. derives the run plan with :func:`patchmorph_core.inference.plan_registration` — the same lattices, field
   grids and intensity ranges as the in-memory :func:`~patchmorph_core.inference.register_arrays`;
3. runs each stage through :func:`pipeline.chunked.run_chunked`: one task per block of lattice cells
   (:func:`~patchmorph_core.inference.estimate_and_accumulate` on the block's support box, cut into one
   piece per chunk; blocks sized by a memory budget), one task per output chunk (sum
   of its pieces, :func:`~patchmorph_core.inference.finalize`, one whole write). A coarse stage whose
   field has at most :data:`IN_MEMORY_VOXELS` voxels is one chunk. Each pass's field is
   written to ``<out>.run/<name>.zarr`` (``stage1``, ``stage2``, ``stage2.1`` for a refinement pass of
   stage 2; see ``PatchLattice.name``) and read lazily (only the boxes the next stage's patches need)
   as the next stage's prior; the last stage writes the ``uncertainty`` image, and its field is polished
   into the output field (:mod:`pipeline.polish`; with ``polish_iterations: 0`` the last stage writes
   the output field itself);
4. resumes: ``<out>.run/`` keeps per-chunk completion records (:mod:`pipeline.resume`); rerunning the same
   command after a crash skips finished chunks and yields the identical field.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from patchmorph_core.config import InferenceConfig, load_yaml, resolve_device
from patchmorph_core.displacement import (
    AffineDisplacement,
    Displacement,
    FieldDisplacement,
)
from patchmorph_core.errors import InputError
from patchmorph_core.inference import (
    FieldSums,
    PatchLattice,
    RegistrationPlan,
    StageFixedImages,
    estimate_and_accumulate,
    finalize,
    plan_registration,
    specs_in_box,
)
from patchmorph_core.model import DEFAULT_WEIGHTS, load_model
from patchmorph_core.polish import PolishSettings
from patchmorph_core.sampling import coarse_level
from patchmorph_core.source import Level, MultiscaleImage
from patchmorph_core.spatial import Grid, read_box
from pipeline.chunked import (
    Box,
    CellBlock,
    ChunkPlan,
    output_array,
    partition,
    reduce_partials,
    run_chunked,
    split_partial,
)
from pipeline.cluster import ClusterInfo, load_cluster_config, network_resources, open_client
from pipeline.ngff import field_metadata, finish_image, read_image, write_block
from pipeline.polish import run_polish
from pipeline.resume import ChunkId, StageRecords, atomic_write_json, open_run, run_folder

log = logging.getLogger(__name__)

IN_MEMORY_VOXELS = 128**3
"""A coarse stage whose field grid has at most this many voxels is written as one chunk."""


class RegistrationRecord(BaseModel):
    """What :func:`register_files` wrote.

    Attributes:
        field: the displacement field (OME-Zarr, axes ``c, z, y, x``, fixed → moving, fixed unit).
        uncertainty: the per-voxel spread of the patch estimates (child image of ``field``).
        run: the run folder with completion records (rerun to resume; safe to delete when done).
        grid_shape: field grid shape ``(Z, Y, X)``.
        spacing: field spacing ``(z, y, x)`` in ``unit``.
        unit: world unit (the fixed image's).
        chunks: output chunks of the final stage; ``skipped``: chunks of all stages found done.
        stages: per-stage figures (chunks, blocks, patches, seconds).
        polish: the polish's figures (steps and tiles per pass, seconds), or None (``polish_iterations: 0``).
        initial_alignment: the initial alignment's record (method, NCC before/after, accepted, seconds)
            and its ``(4, 4)`` fixed → moving ``matrix``.
        seconds: wall time.
        dashboard: Dask dashboard address used.
    """

    model_config = ConfigDict(extra="forbid")

    field: Path
    uncertainty: Path
    run: Path
    grid_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    unit: str
    chunks: int
    skipped: int
    stages: list[dict[str, Any]]
    polish: dict[str, Any] | None = None
    initial_alignment: dict[str, Any]
    seconds: float
    dashboard: str


# -- worker side --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def worker_model(weights: str | None, device: str) -> Any:
    """The model, loaded once per worker process (cached by weights path and device)."""
    import torch
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:  # not inside a Dask worker
        worker = None
    if worker is not None:
        torch.set_num_threads(max(1, int(worker.state.nthreads)))
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        if gpus > 1 and str(worker.name).isdigit():  # local GPU cluster: worker i owns GPU i
            torch.cuda.set_device(int(worker.name) % gpus)
    return load_model(weights, device)


@dataclass(frozen=True)
class StageContext:
    """Everything the tasks of one stage need; sent to each worker once (picklable).

    Attributes:
        fixed, moving: image pyramids (moving in the fixed unit), lazily backed by their stores.
        weights: model checkpoint path (None: default weights).
        config: inference settings.
        fixed_range, moving_range: intensity ranges for patch normalisation (computed once).
        lattice: this stage's global patch lattice.
        plan: this stage's output chunks (on the stage's field grid).
        prior: the previous transform (initial translation or the coarser stage's lazy field).
        field: level-0 ``(3, Z, Y, X)`` output array; ``uncertainty``: ``(Z, Y, X)`` array or None.
        records: completion records of this stage.
        fixed_on_grid: the normalised fixed image on the box of the field grid the stage's patches reach
            (:func:`~patchmorph_core.inference.fixed_on_field_grid`, made once on the client for the
            stage's passes and sent with each pass's context), or None (too large, or not a snapped
            lattice: each block samples its own box).
    """

    fixed: MultiscaleImage
    moving: MultiscaleImage
    weights: str | None
    config: InferenceConfig
    fixed_range: tuple[float, float]
    moving_range: tuple[float, float]
    lattice: PatchLattice
    plan: ChunkPlan
    prior: Displacement
    field: Any
    uncertainty: Any
    records: StageRecords
    fixed_on_grid: Level | None = None


def block_sums(ctx: StageContext, block: CellBlock) -> dict[ChunkId, FieldSums]:
    """Task: estimate the patches of one block of lattice cells, summed on the block's support box and cut
    into one piece per output chunk the box meets (:func:`~pipeline.chunked.split_partial`)."""
    tic = time.perf_counter()
    model = worker_model(ctx.weights, resolve_device(ctx.config.device))
    specs = specs_in_box(ctx.lattice, block.start, block.stop)
    if block.support is None:
        raise ValueError("a block without support box was submitted")
    target = ctx.plan.grid.crop(block.support.start, block.support.stop)
    stats: dict[str, float] = {}
    sums = estimate_and_accumulate(
        model, ctx.fixed, ctx.moving, ctx.prior, specs, target, ctx.config,
        fixed_range=ctx.fixed_range, moving_range=ctx.moving_range, fixed_on_grid=ctx.fixed_on_grid,
        stats=stats,
    )  # fmt: skip
    pieces = split_partial(ctx.plan, block.support, sums)
    stats.update(patches=len(specs), seconds=time.perf_counter() - tic)
    ctx.records.log_block(block.start, stats)
    return pieces


def write_field_chunk(
    ctx: StageContext, cid: ChunkId, partials: list[tuple[Box, FieldSums]]
) -> dict[str, Any]:
    """Task: add the partial sums that meet chunk ``cid``, finalise, write the chunk whole, then record it."""
    tic = time.perf_counter()
    box = ctx.plan.box(cid)
    sums = reduce_partials(ctx.plan.grid, box, partials)
    field, uncertainty = finalize(sums, ctx.prior)
    ctx.records.log_write(cid)
    ctx.field[(slice(None), *box.slices)] = field
    if ctx.uncertainty is not None:
        ctx.uncertainty[box.slices] = uncertainty
    info = {"seconds": time.perf_counter() - tic, "blocks": len(partials)}
    ctx.records.mark_done(cid, info)
    return info


# -- client side --------------------------------------------------------------------------------------------
def _open_inputs(fixed: str | Path, moving: str | Path) -> tuple[MultiscaleImage, MultiscaleImage]:
    """Open both images lazily; InputError naming the bad one."""
    images = []
    for role, path in (("fixed", fixed), ("moving", moving)):
        if not Path(path).exists() and "://" not in str(path):
            raise InputError(f"{role} image {path} does not exist: give the path of an OME-Zarr image.")
        images.append(read_image(path))
    return images[0], images[1]


def _check_finite(image: MultiscaleImage, role: str, path: str | Path) -> None:
    """InputError when the coarse level of ``image`` holds NaN or infinite values."""
    level = coarse_level(image)
    values = read_box(level.array, tuple(slice(0, n) for n in level.grid.shape))
    if not np.all(np.isfinite(values)):
        raise InputError(
            f"{role} image {path} contains NaN or infinite values: replace them (e.g. by 0) first."
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
    """What a resumable run must share with the run that left the records."""
    weights = Path(config.weights) if config.weights else DEFAULT_WEIGHTS
    return {
        "fixed": str(Path(fixed).resolve()),
        "moving": str(Path(moving).resolve()),
        "config": config.model_dump(mode="json"),
        "weights": [str(weights.resolve()), weights.stat().st_size],
        "chunk_size": chunk,
        "grids": [[list(g.shape), np.round(g.affine, 9).tolist()] for g in plan.grids],
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


def _plan_for(arrays: list[Any], grid: Grid) -> ChunkPlan:
    """The chunk plan whose chunks are the largest write unit of ``arrays`` (each a multiple of the others)."""
    units = [tuple(write_block(a))[-3:] for a in arrays]
    largest = max(units, key=lambda u: int(np.prod(u)))
    for unit in units:
        if any(big % small and big != n for big, small, n in zip(largest, unit, grid.shape, strict=True)):
            raise ValueError(f"write units {units} do not nest; cannot write them whole from one task")
    return ChunkPlan(grid, largest)  # type: ignore[arg-type]


@dataclass(frozen=True)
class StageOutput:
    """Where one stage writes: its level-0 field (and uncertainty) arrays and the matching chunk plan;
    ``polished``: the output field that the polish writes from the last stage's ``field``, or None."""

    field: Any
    uncertainty: Any
    plan: ChunkPlan
    polished: Any = None


def _stage_output(
    out: Path | None,
    run_root: Path,
    lattice: PatchLattice,
    grid: Grid,
    chunk_size: int | None,
    records: StageRecords,
    meta: dict[str, Any],
    polish: bool = False,
) -> StageOutput:
    """The arrays of one stage: the output field + uncertainty for the last stage (``out``), else
    ``<run>/<lattice.name>.zarr``. With ``polish`` the last stage writes its field to
    ``<run>/<lattice.name>.zarr`` too, and the polish writes the output field. A coarse stage whose field has
    at most :data:`IN_MEMORY_VOXELS` voxels is one chunk (its blocks are sized like every stage's,
    :func:`~pipeline.chunked.cells_per_block`).
    """
    resume = bool(records.completed())
    if out is not None:
        field = output_array(
            out, grid, np.float32, chunk_size, 3, resume, name="displacement", extra_attrs=meta
        )
        polished = None
        if polish:
            polished = field
            field = output_array(run_root / f"{lattice.name}.zarr", grid, np.float32, chunk_size, 3, resume, name=lattice.name)
        uncertainty = output_array(
            out / "uncertainty",
            grid,
            np.float32,
            chunk_size,
            None,
            resume,
            name="uncertainty",
            extra_attrs={"kind": "uncertainty"},
        )
        arrays = [field, uncertainty] if polished is None else [field, uncertainty, polished]
        return StageOutput(field, uncertainty, _plan_for(arrays, grid), polished)
    in_memory = int(np.prod(grid.shape)) <= IN_MEMORY_VOXELS
    chunk = max(grid.shape) if in_memory else chunk_size
    path = run_root / f"{lattice.name}.zarr"
    field = output_array(path, grid, np.float32, chunk, 3, resume, name=lattice.name)
    return StageOutput(field, None, _plan_for([field], grid))


def _field_meta(
    fixed: str | Path, moving: str | Path, cfg: InferenceConfig, model: Any, rplan: RegistrationPlan
) -> dict[str, Any]:
    """The output field's metadata: inputs, model, config, initial alignment (plus the field contract)."""
    provenance = {
        "fixed": str(fixed),
        "moving": str(moving),
        "model": {
            "weights": str(cfg.weights or DEFAULT_WEIGHTS),
            "config": model.config.model_dump(mode="json"),
        },
        "config": cfg.model_dump(mode="json"),
        "initial_matrix": rplan.initial.tolist(),
        "initial_alignment": rplan.alignment,
    }
    return field_metadata(rplan.grids[-1], provenance)


def _run_stage(
    client: Any,
    info: ClusterInfo,
    ctx_base: dict[str, Any],
    lattice: PatchLattice,
    output: StageOutput,
    prior: Displacement,
    records: StageRecords,
    progress: bool,
    fixed_on_grid: Level | None,
) -> dict[str, Any]:
    """One stage through :func:`run_chunked`; returns its figures."""
    plan = output.plan
    batch = ctx_base["config"].batch_size
    blocks = [b for b in partition(lattice, plan, None, batch) if b.support is not None]
    context = StageContext(
        lattice=lattice,
        plan=plan,
        prior=prior,
        field=output.field,
        uncertainty=output.uncertainty,
        records=records,
        fixed_on_grid=fixed_on_grid,
        **ctx_base,
    )
    run = run_chunked(
        client, lattice.name, plan, records, context, write_field_chunk,
        blocks=blocks, block_fn=block_sums, supports=[b.support for b in blocks],
        resources=network_resources(info), progress=progress,
    )  # fmt: skip
    timing = [json.loads(p.read_text()) for p in (records.root / "blocks").glob("*.json")]
    return {
        "stage": lattice.stage,
        "repeat": lattice.repeat,
        "patches": len(lattice),
        "patch_extent": lattice.extent,
        "field_shape": list(plan.grid.shape),
        "chunks": run.chunks,
        "chunk_shape": list(plan.chunk),
        "skipped": run.skipped,
        "blocks": run.blocks,
        "seconds": run.seconds,
        "forward_seconds": sum(t.get("forward_seconds", 0.0) for t in timing),
        "block_seconds": sum(t.get("seconds", 0.0) for t in timing),
    }


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
) -> RegistrationRecord:
    """Register ``moving`` to ``fixed`` and write the displacement field to ``out`` (see the module docstring).

    Args:
        fixed: fixed image (OME-Zarr); the field lives on its world frame and unit.
        moving: moving image (OME-Zarr, any unit, spacing, orientation).
        out: output field (``.zarr``); its uncertainty image is ``out/uncertainty``.
        config: :class:`InferenceConfig`, a YAML path, or None for defaults.
        chunk_size: field voxels per chunk edge of the output (default 64).
        workers: local Dask workers (default: fit the machine).
        scheduler: scheduler address or cluster YAML (``configs/cluster/*.yaml``); None: local cluster.
        overwrite: replace a finished output and discard old records.
        progress: show progress bars.

    Returns:
        A :class:`RegistrationRecord` naming what was written.

    Raises:
        InputError: any bad input, before heavy work starts.
    """
    tic = time.perf_counter()
    out = Path(out)
    cfg = resolve_config(config)
    cluster_config = load_cluster_config(scheduler, workers)
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"--chunk-size {chunk_size} is invalid: give a positive number of field voxels.")
    run_root = run_folder(out, overwrite)
    fixed_img, moving_img = _open_inputs(fixed, moving)
    for image, role, path in ((fixed_img, "fixed", fixed), (moving_img, "moving", moving)):
        _check_finite(image, role, path)
    model = load_model(cfg.weights, "cpu")
    rplan = plan_registration(model, fixed_img, moving_img, cfg, None if overwrite else _stored_initial(run_root))
    _check_overlap(fixed_img.grid, rplan.moving.grid, rplan.initial, moving)
    records = open_run(run_root, _fingerprint(fixed, moving, cfg, rplan, chunk_size), overwrite)
    _store_initial(run_root, rplan)
    meta = _field_meta(fixed, moving, cfg, model, rplan)
    ctx_base = {
        "fixed": fixed_img,
        "moving": rplan.moving,
        "weights": cfg.weights,
        "config": cfg,
        "fixed_range": rplan.fixed_range,
        "moving_range": rplan.moving_range,
    }
    prior: Displacement = AffineDisplacement(rplan.initial)
    stages: list[dict[str, Any]] = []
    fixed_images = StageFixedImages(fixed_img, rplan.fixed_range)
    settings = PolishSettings.from_config(cfg)
    with open_client(cluster_config) as (client, info):
        for lattice, grid in zip(rplan.lattices, rplan.grids, strict=True):
            stage_records = records.stage(lattice.name)
            final = lattice is rplan.lattices[-1]
            output = _stage_output(
                out if final else None, run_root, lattice, grid, chunk_size, stage_records, meta,
                polish=settings.iterations > 0,
            )  # fmt: skip
            fixed_on_grid = fixed_images.get(lattice)
            stages.append(
                _run_stage(
                    client, info, ctx_base, lattice, output, prior, stage_records, progress, fixed_on_grid
                )
            )
            prior = FieldDisplacement(output.field, grid)
        polish = None
        if output.polished is not None:
            polish = run_polish(
                client, ctx_base, settings, output.plan, output.field, output.polished, records, run_root, progress,
                resources=network_resources(info),
            )  # fmt: skip
        finish_image(out / "uncertainty", n_levels=1)
        finish_image(out, n_levels=1)
    records.finish()
    grid = rplan.grids[-1]
    record = RegistrationRecord(
        field=out,
        uncertainty=out / "uncertainty",
        run=run_root,
        grid_shape=grid.shape,
        spacing=tuple(float(s) for s in grid.spacing),  # type: ignore[arg-type]
        unit=grid.unit,
        chunks=stages[-1]["chunks"],
        skipped=sum(s["skipped"] for s in stages),
        stages=stages,
        polish=polish,
        initial_alignment={**rplan.alignment, "matrix": rplan.initial.tolist()},
        seconds=time.perf_counter() - tic,
        dashboard=info.dashboard,
    )
    log.info(
        "wrote displacement field %s (grid %s, %s), uncertainty %s",
        out,
        grid.shape,
        grid.unit,
        record.uncertainty,
    )
    return record
