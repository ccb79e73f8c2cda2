"""Chunked, write-once computation of fields and warped images with Dask.

Geometry (all boxes are ``(z, y, x)`` voxel index ranges ``start <= index < stop`` of one field grid)::

    field grid  ──ChunkPlan──▶  output chunks C (aligned to the Zarr chunks, written once, whole)
    lattice     ──cell_blocks─▶  blocks B of lattice cells (each patch belongs to exactly one block)
    block b     ──support────▶  box S_b on the field grid: every voxel any of b's patches can weigh
    chunk c     ◀──needs──────  the blocks whose S_b meets c

Offset algebra: a block task sums its patches as :class:`~patchmorph_core.inference.FieldSums` on the
sub-grid ``grid.crop(S_b.start, S_b.stop)`` and cuts them into one piece per chunk ``c = [c0, c1)`` that
``S_b`` meets: its sums on ``S_b ∩ c`` (a view; parts of ``c`` outside ``S_b`` get nothing from ``b``).
The chunk task for ``c`` adds its pieces into ``c``'s sums, finalises and writes ``c``. Because the window is zero outside a patch, the sum over the
blocks that meet ``c`` equals the sum over all patches: the chunked field equals the in-memory one
(:func:`patchmorph_core.inference.register_arrays` is the case of one chunk and one block).

Execution: one task per block (the network's forward passes, annotated with ``{"GPU": 1}`` on GPU
clusters; blocks are sized by a memory budget, :func:`cells_per_block`, not by the chunks or workers), a ``getitem``
per (block, chunk) pair that Dask runs where the block's result lives, so only pieces travel, and one
task per output chunk, submitted in raster order with at most ``window`` chunk tasks in
flight; a block's result is released as soon as every chunk that needs it is written. Each task's memory
is bounded by the chunk, block and patch sizes, not the volume. What stays alive between tasks is the front
of blocks still needed by later chunks (in raster order about one layer of chunks deep: the grid's
cross-section, which grows with the volume). On a Dask cluster, and in threads for a large field
(:func:`pipeline.driver.spill_folder`), the block tasks therefore write their pieces to the run folder
(``spill``: one small file per piece, :class:`SpilledPiece`, whose arrays refer to the block's arrays, written
once per block: neighbouring pieces overlap in the chunks' halos and share those bytes) and return only the
files' names; each chunk task reads its own pieces (only the bytes they cover), and :func:`run_chunked` deletes a
piece once its chunk is recorded and a block's arrays once its last chunk is. So what a worker holds between
tasks no longer grows with the volume, and nothing is sent between workers but names.
Chunks already recorded by :mod:`pipeline.resume` are skipped.
"""

from __future__ import annotations

import logging
import math
import pickle
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm

from patchmorph_core.inference import FieldSums, PatchLattice, cell_blocks
from patchmorph_core.spatial import Grid, world_box
from pipeline.executor import Executor
from pipeline.integrity import writable
from pipeline.ngff import create_image_array
from pipeline.resume import ChunkId, StageRecords, atomic_write, chunk_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Box:
    """A voxel box ``start <= index < stop`` (each ``(z, y, x)``) of some grid."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxels per axis."""
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """The box as a tuple of slices."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))  # type: ignore[return-value]

    def intersection(self, other: Box) -> Box | None:
        """The voxels both boxes hold, or None when they share none."""
        start = tuple(max(a, b) for a, b in zip(self.start, other.start, strict=True))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop, strict=True))
        if any(b <= a for a, b in zip(start, stop, strict=True)):
            return None
        return Box(start, stop)  # type: ignore[arg-type]

    @classmethod
    def from_slices(cls, slices: Sequence[slice]) -> Box:
        """The box of a tuple of slices (with explicit starts and stops, as :func:`~patchmorph_core.spatial.index_box`
        gives)."""
        return cls(tuple(int(s.start) for s in slices), tuple(int(s.stop) for s in slices))  # type: ignore[arg-type]

    def relative_to(self, origin: Sequence[int]) -> Box:
        """The same box in the index frame whose voxel 0 is ``origin``."""
        start = tuple(int(a - o) for a, o in zip(self.start, origin, strict=True))
        stop = tuple(int(b - o) for b, o in zip(self.stop, origin, strict=True))
        return Box(start, stop)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ChunkPlan:
    """Output chunks of a grid: edge ``chunk`` voxels per axis, raster order, edge chunks clipped.

    The Zarr arrays written through a plan use exactly these chunks (``(3, *chunk)`` for a field), so each
    chunk task writes whole Zarr chunks and no two tasks ever write to one chunk. ``halo``: voxels around a
    chunk that its task also receives sums for (:meth:`reach_box`; a task that filters or integrates its
    values needs them), written by the neighbours, never by it.
    """

    grid: Grid
    chunk: tuple[int, int, int]
    halo: int = 0

    @property
    def counts(self) -> tuple[int, int, int]:
        """Chunks per axis ``(z, y, x)``."""
        return tuple(-(-n // c) for n, c in zip(self.grid.shape, self.chunk, strict=True))  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(np.prod(self.counts))

    def ids(self) -> list[ChunkId]:
        """Every chunk index ``(i, j, k)`` in raster (C) order."""
        return [tuple(int(v) for v in c) for c in np.ndindex(*self.counts)]  # type: ignore[misc]

    def box(self, cid: ChunkId) -> Box:
        """Voxel box of chunk ``cid``."""
        start = tuple(int(i * c) for i, c in zip(cid, self.chunk, strict=True))
        stop = tuple(min(s + c, n) for s, c, n in zip(start, self.chunk, self.grid.shape, strict=True))
        return Box(start, stop)  # type: ignore[arg-type]

    def reach_box(self, cid: ChunkId) -> Box:
        """Chunk ``cid``'s box grown by :attr:`halo` voxels on every side, clipped to the grid."""
        box = self.box(cid)
        start = tuple(max(a - self.halo, 0) for a in box.start)
        stop = tuple(min(b + self.halo, n) for b, n in zip(box.stop, self.grid.shape, strict=True))
        return Box(start, stop)  # type: ignore[arg-type]

    def chunks_meeting(self, box: Box, halo: int = 0) -> list[ChunkId]:
        """The chunks that share a voxel with ``box`` grown by ``halo`` voxels (``start // chunk`` to
        ``(stop - 1) // chunk`` per axis, clipped to the grid)."""
        first = [max(a - halo, 0) // c for a, c in zip(box.start, self.chunk, strict=True)]
        last = [(min(b + halo, n) - 1) // c for b, c, n in zip(box.stop, self.chunk, self.grid.shape, strict=True)]
        spans = (b - a + 1 for a, b in zip(first, last, strict=True))
        return [tuple(int(a + o) for a, o in zip(first, offset, strict=True)) for offset in np.ndindex(*spans)]  # type: ignore[misc]

    def chunk_grid(self, cid: ChunkId) -> Grid:
        """The sub-grid of chunk ``cid`` (same world positions as the plan's grid)."""
        box = self.box(cid)
        return self.grid.crop(box.start, box.stop)


MIN_BLOCKS = 2
"""Shares a stage is split into at least (when its lattice allows): no block holds more than this fraction
of the lattice's cells, so that two workers share even a small stage (a block of most of the cells beside a
small one would leave one worker idle most of the stage). A constant, not the worker count: the blocks decide the order in which
patch sums are added, and the field must not depend on the cluster (bit-identical with 1 or 2 workers and after
a resume)."""

BLOCK_BOX_VOXELS = 160**3
"""Largest box of field voxels a block's patches may span (sizes blocks; a block task holds about 100 bytes
per box voxel: its sums, the three sampled images and their indices, so about 0.4 GB at this size)."""


def cells_per_block(
    lattice: PatchLattice,
    grid: Grid,
    min_cells: int = 1,
    min_blocks: int = MIN_BLOCKS,
    max_voxels: int = BLOCK_BOX_VOXELS,
) -> int:
    """Lattice cells per block edge: as many as keep the block's box of field voxels (``n`` steps plus one
    patch per axis) within ``max_voxels``, fewer while the largest block would hold more than ``1 / min_blocks``
    of the lattice's cells (:data:`MIN_BLOCKS`), never under ``min_cells`` (so that a block fills a network
    batch).

    Blocks do not follow the output chunks: a block task hands each chunk its own piece
    (:func:`split_partial`), so large blocks cost no transfer, and they sample each image once over a box
    that a chunk-sized block would sample again and again in the margins it shares with its neighbours.
    """
    spacing = float(np.min(grid.spacing))
    edge = max_voxels ** (1.0 / 3.0)
    n = int((edge - lattice.extent / spacing) // (lattice.step / spacing))
    n = min(max(n, 1), max(lattice.counts))

    cells = int(np.prod(lattice.counts))

    def largest(k: int) -> int:  # cells of the largest block: k per edge, clipped by the lattice's counts
        return int(np.prod([min(k, c) for c in lattice.counts]))

    while n > 1 and largest(n) * min_blocks > cells:
        n -= 1
    return max(n, int(min_cells))


def needs(plan: ChunkPlan, supports: Sequence[Box | None]) -> dict[ChunkId, list[int]]:
    """For every chunk, the indices of the blocks whose support box meets it (ascending).

    Each support box covers :meth:`ChunkPlan.chunks_meeting`, so the cost is the number of (block, chunk)
    pairs, not blocks × chunks.
    """
    out: dict[ChunkId, list[int]] = {cid: [] for cid in plan.ids()}
    for n, support in enumerate(supports):
        if support is None:
            continue
        for cid in plan.chunks_meeting(support, plan.halo):
            out[cid].append(n)
    return out


BLOCK_FIGURES = "figures"
"""Key of a block task's own figures (seconds, forward seconds, ...) in the dict it returns beside its pieces."""


SPILL_INLINE_BYTES = 2**16
"""A piece's arrays smaller than this are pickled inside the piece's file; larger ones are written once per block
(:func:`spill_block`)."""


@dataclass(frozen=True)
class SpilledPiece:
    """A block's piece for one chunk task, kept in a file of the run folder instead of a worker's memory
    (written by :func:`spill_block`, read by :func:`unspilled_chunk`, deleted by :func:`run_chunked` once
    the chunk is recorded). Its large arrays refer to the block's arrays in the block's folder, which every piece
    of the block shares (:func:`block_folder`)."""

    path: Path

    def load(self) -> Any:
        """The piece itself, its arrays read from the block's files (only the bytes the piece covers)."""
        with self.path.open("rb") as handle:
            return _PieceUnpickler(handle, self.path.parent).load()


def piece_path(folder: Path, block: int, cid: ChunkId) -> Path:
    """File of block ``block``'s piece for chunk ``cid`` in the spill folder ``folder``."""
    return folder / f"{block}-{chunk_name(cid)}.pkl"


def block_folder(folder: Path, block: int) -> Path:
    """The folder of block ``block``'s arrays inside the spill folder ``folder`` (removed whole with its last chunk)."""
    return folder / f"block-{block}"


def _raw_owner(array: np.ndarray) -> np.ndarray | None:
    """The array whose contiguous memory ``array`` views (itself, or the last array of its ``base`` chain), as a
    flat byte view, or None when that memory is not one contiguous block."""
    owner = array
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    if owner.flags.c_contiguous:
        return owner.reshape(-1).view(np.uint8)
    if owner.flags.f_contiguous:
        return owner.T.reshape(-1).view(np.uint8)
    return None


class _BlockPickler(pickle.Pickler):
    """Pickles a block's pieces with their large arrays as references ``(file, offset, shape, strides, dtype)``
    into the memory of the arrays they view, each written once as ``<block>.<k>.raw`` in :func:`block_folder`:
    pieces that overlap (chunks' halos) share the block's bytes instead of copying them."""

    def __init__(
        self, handle: Any, folder: Path, block: int, files: dict[tuple[int, int], tuple[str, int]]
    ) -> None:
        super().__init__(handle, protocol=pickle.HIGHEST_PROTOCOL)
        self.folder, self.block, self.files = folder, block, files

    def persistent_id(self, obj: Any) -> tuple[Any, ...] | None:
        """The reference of a large array whose bytes lie in one contiguous owner (its file written the first time),
        else None (pickled in place)."""
        if not isinstance(obj, np.ndarray) or obj.nbytes < SPILL_INLINE_BYTES or obj.dtype.hasobject:
            return None
        raw = _raw_owner(obj)
        if raw is None:
            return None
        start = obj.__array_interface__["data"][0] - raw.__array_interface__["data"][0]
        span = [(n - 1) * s for n, s in zip(obj.shape, obj.strides, strict=True)]
        low = start + sum(min(0, x) for x in span)
        high = start + sum(max(0, x) for x in span) + obj.itemsize
        if low < 0 or high > raw.nbytes:
            return None
        key = (raw.__array_interface__["data"][0], raw.nbytes)  # one memory block: its start and its length
        if key not in self.files:
            owners = block_folder(self.folder, self.block)
            owners.mkdir(exist_ok=True)
            name = f"{owners.name}/{self.block}.{len(self.files)}.raw"
            self.files[key] = (name, atomic_write(self.folder / name, raw.tofile))
        return (self.files[key][0], start, obj.shape, obj.strides, obj.dtype.str)


class _PieceUnpickler(pickle.Unpickler):
    """Reads a piece pickled by :class:`_BlockPickler`: each reference becomes a copy of the bytes it covers."""

    def __init__(self, handle: Any, folder: Path) -> None:
        super().__init__(handle)
        self.folder = folder

    def persistent_load(self, pid: Any) -> np.ndarray:
        """A copy of the array a reference of :meth:`_BlockPickler.persistent_id` names."""
        name, start, shape, strides, dtype = pid
        raw = np.memmap(self.folder / name, dtype=np.uint8, mode="r")
        return np.array(np.ndarray(shape, np.dtype(dtype), buffer=raw, offset=start, strides=strides))


def spill_block(block_fn: Callable[[Any, Any], Any], folder: Path, index: int, context: Any, block: Any) -> Any:
    """Task: ``block_fn(context, block)`` with every piece written to ``folder`` (:func:`piece_path`) and replaced
    by its :class:`SpilledPiece`; the arrays the pieces view are written once for the whole block
    (:class:`_BlockPickler`), every file through an atomic rename. The figures gain ``spilled_bytes``, the
    bytes written."""
    out: dict[Any, Any] = {}
    files: dict[tuple[int, int], tuple[str, int]] = {}
    written = 0
    for key, value in block_fn(context, block).items():
        if key == BLOCK_FIGURES:
            out[key] = value
            continue
        path = piece_path(folder, index, key)
        written += atomic_write(path, lambda handle, v=value: _BlockPickler(handle, folder, index, files).dump(v))
        out[key] = SpilledPiece(path)
    written += sum(size for _, size in files.values())
    out[BLOCK_FIGURES] = {**out.get(BLOCK_FIGURES, {}), "spilled_bytes": written}
    return out


def unspilled_chunk(chunk_fn: Callable[..., dict[str, Any]], context: Any, cid: ChunkId, partials: list[Any]) -> dict[str, Any]:
    """Task: ``chunk_fn(context, cid, partials)`` with every :class:`SpilledPiece` among the pieces read first."""
    loaded = [(box, piece.load() if isinstance(piece, SpilledPiece) else piece) for box, piece in partials]
    return chunk_fn(context, cid, loaded)


@dataclass(frozen=True)
class StageRun:
    """What one :func:`run_chunked` call did.

    Attributes:
        name: the stage's name.
        chunks: output chunks of the plan; ``skipped``: chunks found done by an earlier run.
        blocks: block tasks run.
        seconds: wall time.
        block_figures: the figures each block task returned under :data:`BLOCK_FIGURES`.
        chunk_figures: what each chunk task returned.
    """

    name: str
    chunks: int
    skipped: int
    blocks: int
    seconds: float
    block_figures: list[dict[str, Any]] = field(default_factory=list)
    chunk_figures: list[dict[str, Any]] = field(default_factory=list)

    def total(self, key: str) -> float:
        """Sum of ``key`` over the block tasks' figures (0 where absent)."""
        return float(sum(f.get(key, 0.0) for f in self.block_figures))

    @property
    def chunk_seconds(self) -> float:
        """Seconds of all the chunk tasks together."""
        return float(sum(f.get("seconds", 0.0) for f in self.chunk_figures))


def run_chunked(
    executor: Executor,
    name: str,
    plan: ChunkPlan,
    records: StageRecords,
    context: Any,
    chunk_fn: Callable[..., dict[str, Any]],
    blocks: Sequence[Any] = (),
    block_fn: Callable[[Any, Any], Any] | None = None,
    supports: Sequence[Box | None] = (),
    resources: dict[str, float] | None = None,
    window: int | None = None,
    progress: bool = True,
    spill: Path | None = None,
) -> StageRun:
    """Run one stage: block tasks (optional) feeding write-once chunk tasks, skipping recorded chunks.

    Args:
        executor: where the tasks run (:mod:`pipeline.executor`: threads of this process or a Dask cluster).
        name: stage name for logs, task keys and the progress bar.
        plan: the output chunks.
        records: this stage's completion records (chunks with a record are skipped).
        context: state every task needs (images, prior, output arrays); shared with the tasks once
            (:meth:`~pipeline.executor.Executor.share`; picklable for a Dask cluster).
        chunk_fn: ``chunk_fn(context, cid, partials)`` where ``partials`` lists ``(box, piece)`` of the
            blocks that meet chunk ``cid`` (``box``: the part of the block's support the piece covers); it
            writes the chunk whole, then records it (:mod:`pipeline.resume`) and returns a small dict of
            figures.
        blocks: work items of the block tasks (empty for stages without blocks, e.g. warping).
        block_fn: ``block_fn(context, block)`` → ``{cid: piece, ..., BLOCK_FIGURES: {...}}``, the block's
            partial result cut into one piece per chunk its support meets (:func:`split_partial`; runs the
            network) and its figures. A chunk task receives only its pieces: on a Dask cluster each is taken
            from its block's result where that result lives.
        supports: support box of each block on ``plan.grid`` (None: the block touches nothing).
        resources: Dask resources of block tasks (``{"GPU": 1}`` on GPU clusters).
        window: most chunk tasks in flight (default: 2 per task slot) — bounds memory.
        progress: show a tqdm bar (chunks done / total, rate, ETA).
        spill: a folder for the blocks' pieces (:func:`spill_block`; emptied first, removed at the end), or
            None to keep them in the memory of the process that made them.
    """
    t0 = time.perf_counter()
    done = records.completed()
    todo = [cid for cid in plan.ids() if cid not in done]
    need = needs(plan, supports) if blocks else {cid: [] for cid in todo}
    users = Counter(b for cid in todo for b in need[cid])
    window = 2 * executor.threads if window is None else window
    token = uuid.uuid4().hex[:8]
    ctx = executor.share(context) if todo else None
    if spill is not None and todo and blocks:
        shutil.rmtree(spill, ignore_errors=True)  # pieces of an interrupted run: their blocks run again
        spill.mkdir(parents=True)
    else:
        spill = None
    block_futures: dict[int, Any] = {}
    figure_futures: list[Any] = []
    pending = iter(todo)
    chunk_of: dict[Any, ChunkId] = {}
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc=name, unit="chunk", disable=not progress)

    def submit_next() -> Any | None:
        cid = next(pending, None)
        if cid is None:
            return None
        partials = []
        for b in need[cid]:
            if b not in block_futures:
                key = f"{name}-block-{b}-{token}"
                task = (block_fn,) if spill is None else (spill_block, block_fn, spill, b)
                block_futures[b] = executor.submit(*task, ctx, blocks[b], key=key, resources=resources)
                figure_futures.append(executor.piece(block_futures[b], BLOCK_FIGURES, key=f"{key}-figures"))
            piece = executor.piece(block_futures[b], cid, key=f"{name}-piece-{b}-{chunk_name(cid)}-{token}")
            partials.append((plan.reach_box(cid).intersection(supports[b]), piece))
        task = (chunk_fn,) if spill is None else (unspilled_chunk, chunk_fn)
        future = executor.submit(*task, ctx, cid, partials, key=f"{name}-chunk-{chunk_name(cid)}-{token}")
        chunk_of[future] = cid
        return future

    chunk_figures = []
    queue = executor.completions([f for f in (submit_next() for _ in range(window)) if f is not None])
    with bar:  # closed (its line ended) also when a task fails, so an error message starts a line
        for future in queue:
            cid = chunk_of.pop(future)
            chunk_figures.append(future.result())  # a failed task raises here
            executor.release(future)
            for b in need[cid]:
                if spill is not None:
                    piece_path(spill, b, cid).unlink(missing_ok=True)
                users[b] -= 1
                if users[b] == 0:
                    executor.release(block_futures.pop(b))
                    if spill is not None:
                        shutil.rmtree(block_folder(spill, b), ignore_errors=True)
            bar.update(1)
            nxt = submit_next()
            if nxt is not None:
                queue.add(nxt)
    block_figures = [f.result() for f in figure_futures]
    run = StageRun(
        name, len(plan), len(plan) - len(todo), len(block_figures), time.perf_counter() - t0, block_figures, chunk_figures
    )
    if spill is not None:
        shutil.rmtree(spill, ignore_errors=True)
        records.log_spilled(int(run.total("spilled_bytes")))
    log.info(
        "%s: %d chunks written, %d already done, %.1f s%s", name, len(todo), run.skipped, run.seconds,
        "" if spill is None else f", {run.total('spilled_bytes') / 1e6:.0f} MB of pieces through {spill}",
    )  # fmt: skip
    return run


def output_array(
    path: Path,
    grid: Grid,
    dtype: Any,
    chunk: int | tuple[int, int, int] | None,
    channels: int | None,
    resume: bool,
    **kwargs: Any,
) -> Any:
    """Level-0 array of an output written chunk by chunk (:func:`pipeline.ngff.create_image_array`); ``chunk``:
    the spatial chunk edge, or its shape ``(z, y, x)`` (None: the default).

    With ``resume`` an existing output is reopened (its written chunks are kept), else a new one replaces
    whatever is at ``path``. ``kwargs`` go to ``create_image_array`` (name, labels, extra_attrs).
    """
    chunks = (chunk,) * 3 if isinstance(chunk, int) else chunk
    if resume and path.exists():
        group = zarr.open_group(str(path), mode="r+")
        if dict(group.attrs).get("patchmorph", {}).get("complete"):
            return writable(group["0"])  # finished before its run was marked finished
        return create_image_array(path, grid.shape, grid, dtype, chunks, channels=channels, resume=True)
    return create_image_array(
        path, grid.shape, grid, dtype, chunks, channels=channels, overwrite=True, **kwargs
    )


# -- the field reduction -------------------------------------------------------------------------------------
def block_support(lattice: PatchLattice, start: Sequence[int], stop: Sequence[int], grid: Grid) -> Box | None:
    """Support box on ``grid`` of the patches of lattice cells ``start <= cell < stop``, without drawing them.

    A cell's patch centre lies within half a step of the cell centre; the window is non-zero only inside
    the patch's voxel-centre cube of half-edge ``extent (P − 1) / (2P)``, which a rotation can widen to
    at most ``√3`` times that; a lattice snapped to ``grid`` moves centres by up to half a voxel per grid
    axis and lays the cube along the grid's axes (whose index box is inside that of the world box). The
    box of those reaches (plus one voxel) is a superset of the exact support.
    """
    half = lattice.extent * (lattice.size - 1) / (2.0 * lattice.size)
    reach = half * (np.sqrt(3.0) if lattice.max_rotation_deg > 0 else 1.0) + lattice.step / 2.0
    if lattice.snap is not None:
        reach += float(lattice.snap.spacing.max()) * np.sqrt(3.0) / 2.0
    first = lattice.origin + np.asarray(start, dtype=np.float64) * lattice.step - reach
    last = lattice.origin + (np.asarray(stop, dtype=np.float64) - 1.0) * lattice.step + reach
    box = world_box(grid, first, last, margin=1)
    return None if box is None else Box.from_slices(box)


@dataclass(frozen=True)
class CellBlock:
    """One block of lattice cells ``start <= cell < stop`` and its support box on the field grid."""

    start: tuple[int, ...]
    stop: tuple[int, ...]
    support: Box | None


def halved_longest(shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` ``(z, y, x)`` with its longest axis (the first of equals) cut to the larger of its two halves:
    the edges of the two parts a box, a lattice or a grid is split into so that two task threads share it."""
    edges = [int(n) for n in shape]
    axis = int(np.argmax(edges))
    edges[axis] = -(-edges[axis] // 2)
    return (edges[0], edges[1], edges[2])


def partition(
    lattice: PatchLattice,
    plan: ChunkPlan,
    cells_per_edge: int | None = None,
    batch_size: int = 1,
    min_blocks: int = MIN_BLOCKS,
) -> list[CellBlock]:
    """Blocks of lattice cells (every cell in exactly one block) with their support on ``plan.grid``.

    ``cells_per_edge`` defaults to :func:`cells_per_block` with at least ``ceil(batch_size^(1/3))`` cells
    per edge: one block task per patch would run the network one patch at a time (several times slower
    per patch than in batches) and pay the task's fixed costs per patch. A lattice those edges would leave
    in one block (the first pass: 3³ cells) is cut in two along its longest axis (the first part holding the
    larger half) when ``min_blocks`` > 1, so that two task threads share it.
    """
    min_cells = math.ceil(batch_size ** (1.0 / 3.0) - 1e-9)
    if cells_per_edge is not None:
        block = [int(cells_per_edge)] * 3
    else:
        block = [cells_per_block(lattice, plan.grid, min_cells, min_blocks)] * 3
        counts = [int(c) for c in lattice.counts]
        if min_blocks > 1 and all(b >= c for b, c in zip(block, counts, strict=True)) and max(counts) > 1:
            block = list(halved_longest(counts))
    return [
        CellBlock(start, stop, block_support(lattice, start, stop, plan.grid))
        for start, stop in cell_blocks(lattice, block)
    ]


def chunk_parts(plan: ChunkPlan, support: Box) -> list[tuple[ChunkId, Box]]:
    """Every chunk of ``plan`` whose reach box (:meth:`ChunkPlan.reach_box`: the chunk and its halo) meets the
    box ``support``, with ``support ∩ reach`` (:meth:`Box.intersection`): the part of a block's result that
    chunk's task takes."""
    parts = []
    for cid in plan.chunks_meeting(support, plan.halo):
        part = support.intersection(plan.reach_box(cid))
        assert part is not None  # chunks_meeting gives only chunks that share a voxel with the support
        parts.append((cid, part))
    return parts


def split_partial(plan: ChunkPlan, support: Box, sums: FieldSums) -> dict[ChunkId, FieldSums]:
    """A block's sums on its ``support`` box cut into one piece per chunk of ``plan`` whose reach box
    (:meth:`ChunkPlan.reach_box`: the chunk and its halo) the box meets: the piece of chunk ``c`` lies on
    ``support ∩ reach(c)`` (:meth:`Box.intersection`; a view of ``sums``, so without a halo the pieces
    together hold no more memory than the block's sums), so that a chunk task receives only its own part
    instead of the block's whole box."""
    pieces = {}
    for cid, part in chunk_parts(plan, support):
        rel = part.relative_to(support.start)
        inner = (slice(None), *rel.slices)
        pieces[cid] = FieldSums(
            sums.grid.crop(rel.start, rel.stop),
            sums.weighted[inner],
            sums.weight[rel.slices],
            None if sums.weighted_sq is None else sums.weighted_sq[rel.slices],
            sums.patches,
        )
    return pieces


def reduce_partials(grid: Grid, box: Box, partials: Sequence[tuple[Box | None, FieldSums]]) -> FieldSums:
    """Sum the partial :class:`FieldSums` of neighbouring blocks over the chunk ``box`` of ``grid``.

    Each partial lives on ``grid.crop(support.start, support.stop)`` (a block's whole support, or its piece
    on ``support ∩ box``); the part inside the chunk (``box - support.start`` in its own index frame) is
    added in place into the chunk's sums (:meth:`FieldSums.add_from`; see the module docstring). The sums hold
    the spread (:attr:`FieldSums.weighted_sq`) when every partial does.
    """
    total = FieldSums.zeros(grid.crop(box.start, box.stop), all(sums.spread for _, sums in partials))
    patches = 0
    for support, sums in partials:
        if support is not None and total.add_from(sums, box.relative_to(support.start).start):
            patches += sums.patches
    return FieldSums(total.grid, total.weighted, total.weight, total.weighted_sq, patches)
