"""The registration driver: ONE stage loop and ONE polish loop, for a field in memory and for a field on disk.

:func:`run_registration` takes a :class:`~patchmorph_core.inference.RegistrationPlan` and runs it pass by
pass, coarse to fine: each network pass is one :func:`pipeline.chunked.run_chunked` call (block tasks
estimate the patches of a block of lattice cells, :func:`block_sums`; one task per output chunk adds the
pieces that meet it, composes with the prior and writes the chunk once, :func:`write_field_chunk`); the
polish follows (:mod:`pipeline.polish`). Two things vary, and are handed in:

* the **executor** (:mod:`pipeline.executor`): threads of this process, or a Dask cluster;
* the **store** (:class:`FieldStore`): where each pass's field lives and how it is chunked —
  :class:`MemoryStore` (numpy arrays, the whole grid as one chunk, no run records: the in-memory
  registration, :func:`pipeline.register.register_arrays`) or :class:`ZarrStore` (OME-Zarr arrays in
  Zarr write units, with per-chunk completion records in the run folder so that a rerun resumes:
  :func:`pipeline.register.register_files`).

So the in-memory registration is the one-chunk case of the chunked one by construction: the same lattices
(global, seeded per cell, never by the chunk layout), the same block tasks, the same reduction.

*Choice (layers):* the loop lives here, in ``pipeline``, and not in ``patchmorph_core`` over an abstract
executor: the chunk plan, the write-once reduction and the executors are the pipeline's job (the design's
split), while ``patchmorph_core`` keeps what a block and a chunk compute (lattices, patch estimates, sums,
their composition with the prior, the polish's steps) as plain functions. The in-memory API moved up with it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from patchmorph_core.config import InferenceConfig, resolve_device
from patchmorph_core.displacement import (
    AffineDisplacement,
    Displacement,
    FieldDisplacement,
    displacement_on_grid,
)
from patchmorph_core.inference import (
    WEIGHT_EPS,
    FieldSums,
    PatchLattice,
    RegistrationPlan,
    StageFixedImages,
    estimate_and_accumulate,
    finalize,
    specs_in_box,
    update_reach,
)
from patchmorph_core.model import load_model
from patchmorph_core.polish import PolishSettings
from patchmorph_core.source import Level, MultiscaleImage
from patchmorph_core.spatial import Grid, read_box
from patchmorph_core.stage_check import PassChecks, StageCheck
from pipeline.chunked import (
    BLOCK_FIGURES,
    Box,
    CellBlock,
    ChunkPlan,
    StageRun,
    halved_longest,
    output_array,
    partition,
    reduce_partials,
    run_chunked,
    split_partial,
)
from pipeline.cluster import network_resources
from pipeline.executor import Executor
from pipeline.ngff import DEFAULT_CHUNK, write_block
from pipeline.resume import ChunkId, RunRecords, StageRecords

log = logging.getLogger(__name__)

IN_MEMORY_VOXELS = 128**3
"""A coarse pass whose field grid has at most this many voxels is written as one chunk (the finest as its two
halves), and on threads its blocks' pieces wait in memory (:func:`spill_folder`)."""


def small_grid(grid: Grid) -> bool:
    """Whether ``grid`` has at most :data:`IN_MEMORY_VOXELS` voxels (see there what that decides)."""
    return int(np.prod(grid.shape)) <= IN_MEMORY_VOXELS


# -- where each pass's arrays live -----------------------------------------------------------------------------
class Records(Protocol):
    """Completion records of one pass (:class:`pipeline.resume.StageRecords`, or :class:`NoRecords`)."""

    def completed(self) -> set[ChunkId]: ...

    def log_write(self, cid: ChunkId) -> None: ...

    def mark_done(self, cid: ChunkId, info: dict[str, Any]) -> None: ...

    def log_block(self, start: Sequence[int], figures: dict[str, Any]) -> None: ...

    @property
    def pieces(self) -> Path | None: ...


class NoRecords:
    """The records of a pass held in memory: nothing to resume, nothing written."""

    def completed(self) -> set[ChunkId]:
        return set()

    def log_write(self, cid: ChunkId) -> None:
        return None

    def mark_done(self, cid: ChunkId, info: dict[str, Any]) -> None:
        return None

    def log_block(self, start: Sequence[int], figures: dict[str, Any]) -> None:
        return None

    @property
    def pieces(self) -> Path | None:
        return None


def spill_folder(executor: Executor, records: Records, grid: Grid) -> Path | None:
    """Where a pass on ``grid`` leaves its block tasks' pieces for its chunk tasks
    (:func:`~pipeline.chunked.run_chunked`'s ``spill``): the pass's records folder (None in memory), so that what
    waits between tasks does not grow with the volume. On a Dask cluster always (the pieces then travel as
    names); in threads of this process only for a field of more than :data:`IN_MEMORY_VOXELS` voxels, whose
    pieces would otherwise wait in this process's memory (a smaller field's all fit in a few tens of MB)."""
    if executor.kind == "threads" and small_grid(grid):
        return None
    return records.pieces


@dataclass(frozen=True)
class PassArrays:
    """Where one pass writes: its level-0 field ``(3, Z, Y, X)`` (and the uncertainty ``(Z, Y, X)`` of the
    last network pass), the matching chunk plan and the pass's completion records."""

    field: Any
    uncertainty: Any
    plan: ChunkPlan
    records: Records


class FieldStore(Protocol):
    """Arrays and records of the passes of one registration (:class:`MemoryStore`, :class:`ZarrStore`)."""

    def network_pass(self, name: str, grid: Grid, *, last: bool, output: bool) -> PassArrays:
        """The arrays of network pass ``name`` on ``grid``: ``last`` (the finest) also gets the uncertainty;
        ``output``: its field is the registration's output (no polish follows)."""
        ...

    def polish_pass(self, name: str, plan: ChunkPlan) -> PassArrays:
        """The arrays of the polish pass ``name``, which writes the output field, on ``plan``'s grid and chunks
        (the store's chunks where it keeps the pass in one, with ``plan``'s halo)."""
        ...


class MemoryStore:
    """Every pass in numpy arrays, each one chunk (the whole grid): the in-memory registration."""

    def _arrays(self, grid: Grid, uncertainty: bool) -> PassArrays:
        field_ = np.zeros((3, *grid.shape), dtype=np.float32)
        unc = np.zeros(grid.shape, dtype=np.float32) if uncertainty else None
        return PassArrays(field_, unc, ChunkPlan(grid, grid.shape), NoRecords())

    def network_pass(self, name: str, grid: Grid, *, last: bool, output: bool) -> PassArrays:
        return self._arrays(grid, last)

    def polish_pass(self, name: str, plan: ChunkPlan) -> PassArrays:
        arrays = self._arrays(plan.grid, False)
        return PassArrays(arrays.field, None, ChunkPlan(plan.grid, plan.grid.shape, plan.halo), arrays.records)


def _plan_for(arrays: list[Any], grid: Grid) -> ChunkPlan:
    """The chunk plan whose chunks are the largest write unit of ``arrays`` (each a multiple of the others)."""
    units = [tuple(write_block(a))[-3:] for a in arrays]
    largest = max(units, key=lambda u: int(np.prod(u)))
    for unit in units:
        if any(big % small and big != n for big, small, n in zip(largest, unit, grid.shape, strict=True)):
            raise ValueError(f"write units {units} do not nest; cannot write them whole from one task")
    return ChunkPlan(grid, largest)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ZarrStore:
    """Every pass in OME-Zarr arrays in Zarr write units, with completion records: a registration on disk.

    The registration's output field is ``out`` (its uncertainty ``out/uncertainty``); every other pass is
    ``<run>/<name>.zarr``. A coarse pass whose field has at most :data:`IN_MEMORY_VOXELS` voxels is one chunk;
    the finest pass and the output of such a field are two, its halves along its longest axis
    (:meth:`chunk_for`).

    Attributes:
        out: the output field (``.zarr``).
        records: the run folder's records (one stage per pass).
        chunk_size: field voxels per chunk edge (None: :meth:`chunk_for`'s default).
        meta: the output field's metadata (``attrs["patchmorph"]``).
    """

    out: Path
    records: RunRecords
    chunk_size: int | None
    meta: dict[str, Any]

    def _array(
        self, path: Path, grid: Grid, chunk: int | tuple[int, int, int] | None, channels: int | None, resume: bool, **kw: Any
    ) -> Any:
        return output_array(path, grid, np.float32, chunk, channels, resume, **kw)

    def chunk_for(self, grid: Grid) -> int | tuple[int, int, int] | None:
        """The chunks of the finest field on ``grid`` and of the output: ``chunk_size`` when given; else, for a
        field of at most :data:`IN_MEMORY_VOXELS` voxels, its two halves along its longest axis (one task per
        core of a small machine, and the fewest halos: each chunk task also integrates a halo of up to 11
        voxels around its chunk, which roughly doubles the work on 64³ chunks); else
        :data:`~pipeline.ngff.DEFAULT_CHUNK`³ (None)."""
        if self.chunk_size is not None or not small_grid(grid):
            return self.chunk_size
        return halved_longest(grid.shape)

    def _records(self, name: str, stores: list[Path]) -> StageRecords:
        """The records of pass ``name``, dropped when a store they vouch for (``stores``) is gone or was
        written anew since (:meth:`~pipeline.resume.StageRecords.vouch_for`): its chunks are computed again,
        never trusted to a store that no longer holds them."""
        records = self.records.stage(name)
        if not records.vouch_for(stores):
            log.warning("%s: a store its records vouch for was deleted or rewritten; computing it again", name)
        return records

    def network_pass(self, name: str, grid: Grid, *, last: bool, output: bool) -> PassArrays:
        run_path = self.records.root / f"{name}.zarr"
        if not last:
            records = self._records(name, [run_path])
            resume = bool(records.completed())
            chunk = max(grid.shape) if small_grid(grid) else self.chunk_size
            field_ = self._array(run_path, grid, chunk, 3, resume, name=name)
            records.bind([run_path])
            return PassArrays(field_, None, _plan_for([field_], grid), records)
        stores = [self.out, self.out / "uncertainty", *([] if output else [run_path])]
        records = self._records(name, stores)
        resume = bool(records.completed())
        chunk = self.chunk_for(grid)
        final = self._array(self.out, grid, chunk, 3, resume, name="displacement", extra_attrs=self.meta)
        unc = self._array(
            self.out / "uncertainty", grid, chunk, None, resume, name="uncertainty", extra_attrs={"kind": "uncertainty"}
        )
        field_ = final if output else self._array(run_path, grid, self._polish_input_chunk(chunk), 3, resume, name=name)
        records.bind(stores)
        # the polish writes the output field in the same units: the plan nests all three
        return PassArrays(field_, unc, _plan_for([field_, unc, final], grid), records)

    @staticmethod
    def _polish_input_chunk(output: int | tuple[int, int, int] | None) -> int | tuple[int, int, int]:
        """Chunks of the finest network pass's field when the polish follows: half the output's chunk edge (when
        even; it nests in the output's chunks, so a task still writes it whole), or the output's chunks when
        they are a small field's halves. The polish reads that field over its tiles and over every output chunk
        grown by the velocity's reach, and a zarr chunk is read whole: at half the edge a read wastes less of
        its neighbours' chunks."""
        if isinstance(output, tuple):
            return output
        size = output or DEFAULT_CHUNK
        return size // 2 if size % 2 == 0 else size

    def polish_pass(self, name: str, plan: ChunkPlan) -> PassArrays:
        stores = [self.out, self.out / "uncertainty"]
        records = self._records(name, stores)
        field_ = self._array(
            self.out, plan.grid, self.chunk_for(plan.grid), 3, True, name="displacement", extra_attrs=self.meta
        )
        records.bind(stores)
        return PassArrays(field_, None, plan, records)


# -- the tasks of a network pass -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def worker_model(weights: str | None, device: str) -> Any:
    """The model, loaded once per process (cached by weights path and device); on a Dask worker torch gets
    the worker's thread count and, on a local multi-GPU cluster, worker ``i`` owns GPU ``i``."""
    import torch

    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not inside a Dask worker
        worker = None
    if worker is not None:
        torch.set_num_threads(max(1, int(worker.state.nthreads)))
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        if gpus > 1 and str(worker.name).isdigit():
            torch.cuda.set_device(int(worker.name) % gpus)
    return load_model(weights, device)


@dataclass(frozen=True)
class StageContext:
    """Everything the tasks of one network pass need (shared with the tasks once; picklable without ``model``).

    Attributes:
        fixed, moving: image pyramids (moving in the fixed unit), lazily backed by their stores.
        weights: model checkpoint path (None: default weights); loaded once per process.
        model: the model itself (a run in this process passes it; a Dask run loads ``weights``).
        config: inference settings.
        fixed_range, moving_range: intensity ranges for patch normalisation (computed once).
        lattice: this pass's global patch lattice.
        arrays: this pass's output arrays, chunk plan and records.
        prior: the previous transform (the initial alignment or the coarser pass's lazy field).
        fixed_on_grid: the normalised fixed image on the box of the field grid the pass's patches reach
            (:func:`~patchmorph_core.inference.fixed_on_field_grid`), or None (each block samples its own).
    """

    fixed: MultiscaleImage
    moving: MultiscaleImage
    weights: str | None
    model: Any
    config: InferenceConfig
    fixed_range: tuple[float, float]
    moving_range: tuple[float, float]
    lattice: PatchLattice
    arrays: PassArrays
    prior: Displacement
    fixed_on_grid: Level | None = None

    @property
    def spread(self) -> bool:
        """Whether the blocks sum the spread of the patches' estimates (``FieldSums.weighted_sq``): only for the
        finest pass when no polish follows, whose spread is the output's uncertainty map (the polish writes its
        residual there instead). Without it a block's sums are a fifth smaller."""
        return self.arrays.uncertainty is not None and self.config.polish_iterations == 0

    def the_model(self) -> Any:
        """The model to run (:attr:`model`, else loaded from :attr:`weights` once per process)."""
        if self.model is not None:
            return self.model
        return worker_model(self.weights, resolve_device(self.config.device))


def block_sums(ctx: StageContext, block: CellBlock) -> dict[Any, Any]:
    """Task: estimate the patches of one block of lattice cells, summed on the block's support box and cut
    into one piece per output chunk the box meets (:func:`~pipeline.chunked.split_partial`), plus the
    block's figures under :data:`~pipeline.chunked.BLOCK_FIGURES` (also logged to the pass's records)."""
    tic = time.perf_counter()
    if block.support is None:
        raise ValueError("a block without support box was submitted")
    specs = specs_in_box(ctx.lattice, block.start, block.stop)
    plan = ctx.arrays.plan
    target = plan.grid.crop(block.support.start, block.support.stop)
    stats: dict[str, Any] = {}
    sums = estimate_and_accumulate(
        ctx.the_model(), ctx.fixed, ctx.moving, ctx.prior, specs, target, ctx.config,
        fixed_range=ctx.fixed_range, moving_range=ctx.moving_range, fixed_on_grid=ctx.fixed_on_grid,
        stats=stats, spread=ctx.spread,
    )  # fmt: skip
    pieces: dict[Any, Any] = dict(split_partial(plan, block.support, sums))
    stats.update(patches=len(specs), seconds=time.perf_counter() - tic)
    ctx.arrays.records.log_block(block.start, stats)
    pieces[BLOCK_FIGURES] = stats
    return pieces


def max_update(lattice: PatchLattice, config: InferenceConfig) -> float | None:
    """The cap on a pass's fold-free update (a quarter of its patch extent, world units; 6 voxels of the default
    24-voxel patch, well above what one pass moves, ``docs/method.md``, *Fold-free updates*), or None when
    ``config.fold_free_updates`` is off (:func:`~patchmorph_core.inference.fold_free_update`). The cap sets the
    halo every chunk task reads (:func:`~patchmorph_core.inference.update_reach`)."""
    return lattice.extent / 4.0 if config.fold_free_updates else None


def write_field_chunk(ctx: StageContext, cid: ChunkId, partials: list[tuple[Box, FieldSums]]) -> dict[str, Any]:
    """Task: add the partial sums that meet chunk ``cid`` and its halo, average them, make the update fold-free
    (on the chunk and its halo, the reach :func:`~patchmorph_core.inference.fold_free_update` reads), compose
    the chunk with the prior, write it whole, then record it."""
    tic = time.perf_counter()
    plan = ctx.arrays.plan
    reach, box = plan.reach_box(cid), plan.box(cid)
    sums = reduce_partials(plan.grid, reach, partials)
    inner = box.relative_to(reach.start).slices
    field_, uncertainty = finalize(sums, ctx.prior, max_update=max_update(ctx.lattice, ctx.config), inner=inner)
    ctx.arrays.records.log_write(cid)
    ctx.arrays.field[(slice(None), *box.slices)] = field_
    if ctx.arrays.uncertainty is not None:
        ctx.arrays.uncertainty[box.slices] = uncertainty
    info = {
        "seconds": time.perf_counter() - tic,
        "blocks": len(partials),
        "voxels": int(np.prod(box.shape)),
        "covered": int(np.count_nonzero(sums.weight[inner] > WEIGHT_EPS)),
    }
    ctx.arrays.records.mark_done(cid, info)
    return info


# -- the loop ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Inputs:
    """What every pass of one registration reads.

    Attributes:
        fixed: fixed image pyramid (the field's world frame and unit).
        plan: the registration plan (moving image in the fixed unit, start, ranges, lattices, grids).
        config: inference settings.
        weights: checkpoint path for processes that load the model themselves (None: default weights).
        model: the model, for tasks that run in this process (None: loaded from ``weights``).
    """

    fixed: MultiscaleImage
    plan: RegistrationPlan
    config: InferenceConfig
    weights: str | None
    model: Any = None


@dataclass(frozen=True)
class DriverRun:
    """What :func:`run_registration` made.

    Attributes:
        field: the output field array (``(3, Z, Y, X)``, on ``grid``).
        uncertainty: the uncertainty array (``(Z, Y, X)``): the finest network pass's spread, overwritten by
            the polish's residual when the polish runs.
        grid: the output field grid.
        stages: one record per pass, network passes then the polish's (name, kind, figures, seconds):
            the per-stage figures a caller reports or checks.
        polish: the polish pass's figures (also the last of ``stages``), or None (``polish_iterations: 0``).
        chunks: chunks of the output field; ``skipped``: chunks of every pass found done.
    """

    field: Any
    uncertainty: Any
    grid: Grid
    stages: list[dict[str, Any]] = field(default_factory=list)
    polish: dict[str, Any] | None = None
    chunks: int = 0
    skipped: int = 0


def _network_record(lattice: PatchLattice, plan: ChunkPlan, run: StageRun) -> dict[str, Any]:
    """The figures of one network pass."""
    voxels = sum(f.get("voxels", 0) for f in run.chunk_figures)
    covered = sum(f.get("covered", 0) for f in run.chunk_figures)
    return {
        "name": lattice.name,
        "kind": "network",
        "stage": lattice.stage,
        "repeat": lattice.repeat,
        "patches": len(lattice),
        "patch_extent": lattice.extent,
        "patch_spacing": lattice.extent / lattice.size,
        "lattice": list(lattice.counts),
        "field_shape": list(plan.grid.shape),
        "field_spacing": float(plan.grid.spacing.max()),
        "chunks": run.chunks,
        "chunk_shape": list(plan.chunk),
        "skipped": run.skipped,
        "blocks": run.blocks,
        "coverage": covered / voxels if voxels else None,
        "seconds": run.seconds,
        "block_seconds": run.total("seconds"),
        "forward_seconds": run.total("forward_seconds"),
        "precision": sorted({str(f["precision"]) for f in run.block_figures if "precision" in f}),
        "sampling_seconds": run.total("sampling_seconds"),
        "accumulate_seconds": run.total("accumulate_seconds"),
        "fixed_from_grid": run.total("fixed_from_grid") / run.blocks if run.blocks else None,
        "chunk_seconds": run.chunk_seconds,
        "spilled_bytes": int(run.total("spilled_bytes")),
    }


def run_network_pass(
    executor: Executor,
    inputs: Inputs,
    lattice: PatchLattice,
    arrays: PassArrays,
    prior: Displacement,
    fixed_on_grid: Level | None,
    progress: bool,
) -> dict[str, Any]:
    """One network pass through :func:`~pipeline.chunked.run_chunked`; returns its figures. Its chunk tasks
    receive the sums on their chunk grown by the reach of the fold-free update
    (:func:`~patchmorph_core.inference.update_reach`)."""
    cap = max_update(lattice, inputs.config)
    if cap is not None:
        arrays = replace(arrays, plan=replace(arrays.plan, halo=update_reach(cap, arrays.plan.grid)))
    plan = arrays.plan
    blocks = [b for b in partition(lattice, plan, None, inputs.config.batch_size) if b.support is not None]
    context = StageContext(
        fixed=inputs.fixed, moving=inputs.plan.moving, weights=inputs.weights,
        model=inputs.model if executor.kind == "threads" else None, config=inputs.config,
        fixed_range=inputs.plan.fixed_range, moving_range=inputs.plan.moving_range, lattice=lattice,
        arrays=arrays, prior=prior, fixed_on_grid=fixed_on_grid,
    )  # fmt: skip
    run = run_chunked(
        executor, lattice.name, plan, arrays.records, context, write_field_chunk,
        blocks=blocks, block_fn=block_sums, supports=[b.support for b in blocks], resources=network_resources(executor),
        progress=progress, spill=spill_folder(executor, arrays.records, plan.grid),
    )  # fmt: skip
    record = _network_record(lattice, plan, run)
    log.info(
        "%s: %d patches of %.4g %s, field %s, %.1f s", lattice.name, len(lattice), lattice.extent,
        plan.grid.unit, plan.grid.shape, run.seconds,
    )  # fmt: skip
    return record


def _reject(name: str, check: StageCheck) -> None:
    log.warning(
        "%s lowered the similarity (MIND %.4f -> %.4f): rejected, the registration goes on from the field "
        "before it", name, check.before, check.after,
    )  # fmt: skip


def write_displacement(array: Any, displacement: Displacement, grid: Grid) -> None:
    """Overwrite the ``(3, Z, Y, X)`` field ``array`` on ``grid`` with ``displacement``, in slabs of whole chunks
    along z (the array's own chunking; one slab for an in-memory array)."""
    chunks = getattr(array, "chunks", None)
    slab = int(chunks[1]) if chunks else grid.shape[0]
    for start in range(0, grid.shape[0], slab):
        stop = min(start + slab, grid.shape[0])
        part = grid.crop((start, 0, 0), (stop, *grid.shape[1:]))
        array[:, start:stop] = displacement_on_grid(displacement, part)


def prior_array(field: Any, grid: Grid) -> Any:
    """A pass's ``(3, Z, Y, X)`` field as the next pass reads it: in memory when it is one chunk
    (:data:`IN_MEMORY_VOXELS`; read once here and shared with the tasks, instead of every block of the next
    pass reading and decoding the whole chunk), else the array itself (each block reads its box)."""
    if small_grid(grid):
        return np.asarray(read_box(field, (slice(None),) * 4), dtype=np.float32)
    return field


def run_registration(executor: Executor, inputs: Inputs, store: FieldStore, progress: bool = False) -> DriverRun:
    """Every pass of ``inputs.plan``, coarse to fine, then the polish (see the module docstring).

    Each pass's field is the next pass's prior (read lazily: only the boxes the next pass's patches need);
    the finest network pass writes the uncertainty, and its field is polished into the output field (with
    ``polish_iterations: 0`` it writes the output itself). With ``config.stage_check`` every pass and the
    polish are scored before and after (:mod:`patchmorph_core.stage_check`, figures in the pass's record); a
    pass that lowers the similarity is rejected: the next pass starts from the field before it, and a rejected
    last pass or polish leaves that field in its array.

    Args:
        executor: where the tasks run.
        inputs: images, plan, settings and model.
        store: where the passes' arrays and records live.
        progress: show a progress bar per pass.
    """
    from pipeline.polish import run_polish  # the polish's tasks build on this module's stores

    plan = inputs.plan
    data_spacing = max(float(inputs.fixed.grid.spacing.min()), float(plan.moving.grid.spacing.min()))
    settings = PolishSettings.from_config(inputs.config, float(plan.grids[-1].spacing.min()), data_spacing)
    prior: Displacement = AffineDisplacement(plan.initial)
    fixed_images = StageFixedImages(inputs.fixed, plan.fixed_range)
    checks = PassChecks(inputs.fixed, plan.moving, (plan.fixed_range, plan.moving_range))
    stages: list[dict[str, Any]] = []
    arrays = None
    for n, (lattice, grid) in enumerate(zip(plan.lattices, plan.grids, strict=True)):
        last = n == len(plan.lattices) - 1
        arrays = store.network_pass(lattice.name, grid, last=last, output=last and settings.iterations == 0)
        stages.append(
            run_network_pass(executor, inputs, lattice, arrays, prior, fixed_images.get(lattice), progress)
        )
        candidate = FieldDisplacement(prior_array(arrays.field, grid), grid)
        if inputs.config.stage_check:
            check = checks.check(grid, prior, candidate)
            stages[-1].update(check.record())
            if not check.accepted:
                _reject(lattice.name, check)
                if last:  # its field is the output's base: the field before it, on its grid
                    write_displacement(arrays.field, prior, grid)
                continue
        prior = candidate
    if arrays is None:
        raise ValueError("the registration plan has no pass to run")
    output, polish = arrays.field, None
    if settings.iterations > 0:
        output, polish = run_polish(executor, inputs, settings, arrays, store, progress)
        stages.append(polish)
        if inputs.config.stage_check:
            network = FieldDisplacement(arrays.field, plan.grids[-1])
            check = checks.check(plan.grids[-1], network, FieldDisplacement(output, plan.grids[-1]))
            stages[-1].update(check.record())
            if not check.accepted:
                _reject("the polish", check)
                write_displacement(output, network, plan.grids[-1])
    return DriverRun(
        field=output,
        uncertainty=arrays.uncertainty,
        grid=plan.grids[-1],
        stages=stages,
        polish=polish,
        chunks=len(arrays.plan),
        skipped=sum(int(s.get("skipped", 0)) for s in stages),
    )
