"""The polish (:mod:`patchmorph_core.polish`) of a chunked registration's final field, tile by tile on Dask.

Every polish step at a voxel depends on the voxels within ``reach`` of it (:attr:`PolishSettings.reach`),
so ``k`` steps on a tile of output chunks padded by ``k × reach`` voxels give the tile's inside as the whole
grid would (to float rounding). The steps are run in passes: each pass reads the network's field ``u₀`` and the
correction of the pass before (``<run>/polish<p>.zarr``) on its padded tiles, takes ``k`` steps and writes
its tiles' correction; the last pass writes ``u₀ + c`` into the output field. The steps per pass and the
tile size are chosen (:func:`polish_passes`) so that a padded tile stays within :data:`POLISH_BOX_VOXELS`
and as little as possible is computed twice; a field that fits is one tile and one pass — the in-memory
case (:func:`patchmorph_core.inference.polish_field`). Tiles run through :func:`pipeline.chunked.run_chunked`
as blocks whose pieces are the output chunks, so passes resume chunk by chunk like the stages.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchmorph_core.config import resolve_device
from patchmorph_core.polish import PolishSettings, polish_correction
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import read_box
from pipeline.chunked import BLOCK_FIGURES, Box, ChunkPlan, run_chunked
from pipeline.driver import FieldStore, Inputs, PassArrays, Records
from pipeline.executor import Executor
from pipeline.resume import ChunkId

log = logging.getLogger(__name__)

POLISH_BOX_VOXELS = 160**3
"""Largest padded tile of a polish pass (field voxels; about 80 bytes each in the task: the field, the
correction, the images and the filter temporaries, so about 0.3 GB)."""


def polish_passes(
    shape: tuple[int, ...], chunk: tuple[int, ...], settings: PolishSettings, max_voxels: int | None = None
) -> list[tuple[int, int]]:
    """``(steps, tile edge in chunks)`` of each pass: per pass the pair that computes the fewest padded voxels
    per output voxel and step, ``prod(tile + 2 k reach) / prod(tile) / k`` (tiles and pads clipped to the
    grid), among those whose padded tile has at most ``max_voxels`` voxels (else one chunk and one step);
    ties go to more steps and larger tiles (fewer passes and tasks). ``max_voxels`` defaults to
    :data:`POLISH_BOX_VOXELS`, read at call time."""
    max_voxels = POLISH_BOX_VOXELS if max_voxels is None else max_voxels
    remaining = settings.iterations
    most_chunks = max(-(-n // c) for n, c in zip(shape, chunk, strict=True))
    passes: list[tuple[int, int]] = []
    while remaining > 0:
        best: tuple[float, int, int] | None = None
        for steps in range(remaining, 0, -1):
            halo = steps * settings.reach
            for m in range(most_chunks, 0, -1):
                tile = [min(m * c, n) for c, n in zip(chunk, shape, strict=True)]
                padded = [min(t + 2 * halo, n) for t, n in zip(tile, shape, strict=True)]
                if int(np.prod(padded)) > max_voxels:
                    continue
                cost = float(np.prod(padded)) / float(np.prod(tile)) / steps
                if best is None or cost < best[0] - 1e-9:
                    best = (cost, steps, m)
        steps, m = (1, 1) if best is None else best[1:]
        passes.append((steps, m))
        remaining -= steps
    return passes


def tiles(plan: ChunkPlan, chunks_per_tile: int) -> list[Box]:
    """The output grid cut into tiles of ``chunks_per_tile`` chunks per axis (edge tiles clipped), raster order."""
    edge = [chunks_per_tile * c for c in plan.chunk]
    counts = [-(-n // e) for n, e in zip(plan.grid.shape, edge, strict=True)]
    out = []
    for index in np.ndindex(*counts):
        start = tuple(int(i * e) for i, e in zip(index, edge, strict=True))
        stop = tuple(min(s + e, n) for s, e, n in zip(start, edge, plan.grid.shape, strict=True))
        out.append(Box(start, stop))  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class PolishContext:
    """Everything the tasks of one polish pass need (picklable; sent to each worker once).

    Attributes:
        fixed, moving: image pyramids (moving in the fixed unit).
        fixed_range, moving_range: intensity ranges (the registration's).
        settings: the polish settings; ``steps``: the steps of this pass.
        plan: the output chunks of the final field grid.
        network_field: ``(3, Z, Y, X)`` array of the network's final field ``u₀``.
        correction: ``(3, Z, Y, X)`` array of the previous pass's correction, or None (first pass).
        out: the array this pass writes: the next correction, or the output field ``u₀ + c`` (``total``).
        records: this pass's completion records.
        device: the registration's ``device`` setting (resolved on the worker: a GPU worker polishes on it).
    """

    fixed: MultiscaleImage
    moving: MultiscaleImage
    fixed_range: tuple[float, float]
    moving_range: tuple[float, float]
    settings: PolishSettings
    steps: int
    plan: ChunkPlan
    network_field: Any
    correction: Any
    out: Any
    total: bool
    records: Records
    device: str = "auto"


def polish_tile(ctx: PolishContext, tile: Box) -> dict[ChunkId, np.ndarray]:
    """Task: ``ctx.steps`` polish steps on ``tile`` padded by ``steps × reach`` voxels; returns the tile's
    values (correction, or ``u₀ + c`` in the last pass) cut into one ``(3, *chunk)`` piece per output chunk;
    its seconds go to ``<run>/polish<p>/blocks/<tile>.json`` (:meth:`~pipeline.resume.StageRecords.log_block`)."""
    tic = time.perf_counter()
    shape = ctx.plan.grid.shape
    halo = ctx.steps * ctx.settings.reach
    start = [max(a - halo, 0) for a in tile.start]
    stop = [min(b + halo, n) for b, n in zip(tile.stop, shape, strict=True)]
    outer = (slice(None), *(slice(a, b) for a, b in zip(start, stop, strict=True)))
    grid = ctx.plan.grid.crop(start, stop)
    field = read_box(ctx.network_field, outer).astype(np.float32, copy=False)
    previous = None if ctx.correction is None else read_box(ctx.correction, outer)
    correction = polish_correction(
        ctx.fixed, ctx.moving, (ctx.fixed_range, ctx.moving_range), field, previous, grid, ctx.settings, ctx.steps,
        device=resolve_device(ctx.device),
    )  # fmt: skip
    values = field + correction if ctx.total else correction
    seconds = time.perf_counter() - tic
    figures = {"seconds": seconds, "polish_seconds": seconds, "voxels": int(np.prod(grid.shape))}
    ctx.records.log_block(tile.start, figures)
    pieces: dict[Any, Any] = {BLOCK_FIGURES: figures}
    for cid in ctx.plan.chunks_meeting(tile):
        box = ctx.plan.box(cid)
        inner = tuple(slice(a - s, b - s) for a, b, s in zip(box.start, box.stop, start, strict=True))
        pieces[cid] = np.ascontiguousarray(values[(slice(None), *inner)])
    return pieces


def write_polish_chunk(ctx: PolishContext, cid: ChunkId, partials: list[tuple[Box, np.ndarray]]) -> dict[str, Any]:
    """Task: write chunk ``cid`` of the pass's output whole (its one tile's piece), then record it."""
    tic = time.perf_counter()
    if len(partials) != 1:
        raise ValueError(f"polish chunk {cid} got {len(partials)} tiles, expected 1")
    box, piece = partials[0]
    ctx.records.log_write(cid)
    ctx.out[(slice(None), *box.slices)] = piece
    info = {"seconds": time.perf_counter() - tic}
    ctx.records.mark_done(cid, info)
    return info


def run_polish(
    executor: Executor,
    inputs: Inputs,
    settings: PolishSettings,
    network: PassArrays,
    store: FieldStore,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Polish the network's final field ``network.field`` in passes (see the module doc).

    Args:
        executor: where the tile tasks run (with ``{"GPU": 1}`` on GPU clusters, as the network's blocks).
        inputs: the registration's images, plan and settings.
        settings: the polish settings (``settings.iterations`` > 0).
        network: the finest network pass's arrays (its field is ``u₀``; its plan gives the output chunks).
        store: where each pass's correction and the output field live (one record stage ``polish<p>`` a pass).
        progress: show progress bars.

    Returns:
        The output field array and the figures: steps and tiles per pass, seconds.
    """
    tic = time.perf_counter()
    plan = network.plan
    passes = polish_passes(plan.grid.shape, plan.chunk, settings)
    resources = {"GPU": 1.0} if executor.gpu else None
    correction = None
    figures = []
    target = network.field
    for p, (steps, per_tile) in enumerate(passes):
        name = f"polish{p + 1}"
        total = p == len(passes) - 1
        arrays = store.polish_pass(name, plan, output=total)
        target = arrays.field
        ctx = PolishContext(
            fixed=inputs.fixed, moving=inputs.plan.moving, fixed_range=inputs.plan.fixed_range,
            moving_range=inputs.plan.moving_range, settings=settings, steps=steps, plan=plan,
            network_field=network.field, correction=correction, out=target, total=total, records=arrays.records,
            device=inputs.config.device,
        )  # fmt: skip
        work = tiles(plan, per_tile)
        run = run_chunked(
            executor, name, plan, arrays.records, ctx, write_polish_chunk,
            blocks=work, block_fn=polish_tile, supports=work, resources=resources, progress=progress,
        )  # fmt: skip
        figures.append({
            "name": name, "kind": "polish", "pass": p + 1, "steps": steps, "tiles": len(work), "skipped": run.skipped,
            "seconds": run.seconds, "block_seconds": run.total("seconds"), "polish_seconds": run.total("polish_seconds"),
            "chunk_seconds": float(sum(f.get("seconds", 0.0) for f in run.chunk_figures)),
        })  # fmt: skip
        correction = target
    info = {"iterations": settings.iterations, "passes": figures, "seconds": time.perf_counter() - tic}
    log.info("polish: %d steps in %d passes, %.1f s", settings.iterations, len(passes), info["seconds"])
    return target, info
