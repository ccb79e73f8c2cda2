"""The polish (:mod:`patchmorph_core.polish`) of a registration's finest field: one pass over the data, tile by
tile, like a network stage.

Geometry (``(z, y, x)`` voxel boxes of the final field grid)::

    field grid ──tissue box───▶ region: the fixed image's tissue box (the box the network's patch lattices
                                cover) grown by ``ramp`` voxels, clipped to the grid; nothing beyond it is
                                polished (no step is spent on background), and the velocity tapers to zero
                                across the region's faces inside the grid, within those ``ramp`` voxels
    region     ──PolishTiles──▶ tiles: cores of ``core`` voxels tiling the region (a global lattice centred on
                                it), each polished on its core grown by ``halo`` voxels (clipped to the region)
    tile t     ──weights─────▶  a partition of unity: 1 inside the core, cos²/sin² ramps of ``2 ramp`` voxels
                                across every boundary between two cores, 0 in the outer ``halo − ramp`` voxels
                                (where the box's own border spoils the similarity's windows and smoothing)
    chunk c    ◀──needs───────  the tiles that meet c grown by the integration halo

A tile task (:func:`polish_tile`) reads the fixed image, the network's field ``u₀`` and the moving image on
its box once, takes every step (:func:`~patchmorph_core.polish.polish_result`) and returns the velocity and
residual on the grid the steps ran on, one :class:`TilePiece` per chunk (views of what that chunk reads); one
task per output chunk (:func:`write_polished_chunk`) weights each tile's piece on its part of the chunk and its
integration halo (:attr:`~patchmorph_core.polish.PolishSettings.exp_halo`), adds them, averages them
(``v̄ = Σ w v / Σ w``, :class:`ChunkSums`), integrates ``c = exp(v̄)``
(:func:`~patchmorph_core.displacement.exp_velocity`), composes ``u = c ∘ u₀``
(:func:`~patchmorph_core.inference.compose_on_grid`) and writes the chunk once, with the tiles' residuals
(:func:`~patchmorph_core.polish.residual_map`, blended by the same weights on the chunk) as the chunk of the
uncertainty map.
A polish the stage check rejects leaves the network's field but this residual map. The tiles depend on the grid
and the fixed tissue box alone, so the field depends neither on the chunks nor on the workers; a region within
one tile is one box, or two halves along its longest axis when that is long enough for two threads to share it
(:func:`tile_cores`).

With :attr:`~patchmorph_core.polish.PolishSettings.coarsening` f > 1 (a field finer than the data) each box
is polished on a grid f times coarser (:func:`~patchmorph_core.polish.polish_result`): the halo and ramp grow
f-fold (the same in polish-grid voxels), the box :data:`TILE_BOX` polish-grid voxels up to :data:`TILE_FIELD_BOX`
field voxels (:func:`tile_lattice`; a small grid, :data:`SMALL_GRID`, in boxes of :data:`TILE_FIELD_BOX`). A tile's
result stays on its polish grid until a chunk task needs it (f³ times less memory while the tile waits for its
chunks than sampled back onto the field grid: at f = 2, 8 MB instead of 82 MB for a box of 160³ field voxels).
The chunk task averages the velocity, trilinear from those coarser grids, on every f-th voxel of the field grid
only (one global lattice, so every chunk uses the same nodes), integrates it there and samples the flow back
onto its chunk (:func:`~patchmorph_core.polish.exp_on_nodes`): f³ times fewer voxels to sample, average and
integrate.

Cost: each field voxel is stepped ``((core + 2 halo) / core)³ / f³`` times at most (2.4× at f = 1 on a large
grid, 1× for a field within one tile, at most 1 + :data:`SPLIT_EXTRA` for its two halves; 0.36× at f = 2), and
every input is read once per tile.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from patchmorph_core.config import resolve_device
from patchmorph_core.displacement import FieldDisplacement
from patchmorph_core.inference import compose_on_grid
from patchmorph_core.polish import PolishResult, PolishSettings, exp_on_nodes, polish_result
from patchmorph_core.sampling import tissue_bounds
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid, lattice_start, read_box, world_box
from pipeline.chunked import (
    BLOCK_FIGURES,
    Box,
    ChunkPlan,
    chunk_parts,
    halved_longest,
    run_chunked,
)
from pipeline.cluster import network_resources
from pipeline.driver import IN_MEMORY_VOXELS, FieldStore, Inputs, PassArrays, spill_folder
from pipeline.executor import Executor
from pipeline.resume import ChunkId

log = logging.getLogger(__name__)

TILE_BOX = 96
"""Largest edge of a polished box (core + 2 halo) in voxels of the polish's grid (about 150 bytes a voxel in the
task: the images, ``u₀``, the velocity, the sampling indices and the filters' temporaries, so about 130 MB).
Small enough that a field of a few million voxels already fills whole tiles (the task's memory is the same at
every size beyond), large enough that the halos cost little: each voxel is stepped ``(96 / 72)³ ≈ 2.4`` times
at most, at the same CPU per stepped voxel as in boxes of 160³ (one thread; the filters' passes are memory
bound either way)."""

TILE_FIELD_BOX = 160
"""Largest edge of a polished box in field voxels (with :attr:`~patchmorph_core.polish.PolishSettings.coarsening`
f > 1 the task also holds ``u₀``, the velocity sampled back and the weights on the field grid, about 40 bytes a
field voxel)."""

SMALL_GRID = IN_MEMORY_VOXELS
"""A polish grid of at most this many voxels (:data:`~pipeline.driver.IN_MEMORY_VOXELS`, the size up to which the
output field is stored as two chunks, :meth:`~pipeline.driver.ZarrStore.chunk_for`) is tiled with boxes of up to
:data:`TILE_FIELD_BOX` voxels (one box or a few: the grid bounds a box's memory, at most about twice a :data:`TILE_BOX` box's, and fewer halos mean
fewer steps); a larger one with :data:`TILE_BOX` boxes."""

TILE_HALO = 12
"""Field voxels polished around a tile's core (its neighbours' cores): the box border's effect on the
similarity's windows (radius 2) and on the smoothing (σ 1.5 each step, σ 0.5 accumulated over the steps) fades
within it."""

TILE_RAMP = 6
"""Half-width of the blend between two tiles (field voxels, within :data:`TILE_HALO`)."""

SPLIT_EXTRA = 0.3
"""A grid within one tile is polished as two tiles, its halves along its longest axis, when their halos add at
most this fraction to the polished voxels: two task threads share the polish instead of one. A rule of the grid
alone (:func:`tile_cores`): the same tiles, hence the same field, for any number of threads or workers."""


def tile_cores(shape: tuple[int, int, int], core: int, halo: int) -> tuple[int, int, int]:
    """The tiles' core edge along each axis of a grid of ``shape`` (field voxels): ``core``, except for a grid
    within one core whose longest axis is long enough (:data:`SPLIT_EXTRA`), which is cut in two along it."""
    cores = [core] * 3
    axis = int(np.argmax(shape))
    if max(shape) <= core and 2 * halo <= SPLIT_EXTRA * shape[axis]:
        cores[axis] = halved_longest(shape)[axis]
    return (cores[0], cores[1], cores[2])


@dataclass(frozen=True)
class PolishTiles:
    """The global tile lattice of the polish on the box ``region`` of a grid of ``shape`` (see the module
    docstring).

    Along each axis of ``n`` voxels of the region, ``ceil(n / core)`` cores of ``core`` voxels centred on it
    (edge cores clipped); a region within one core along an axis is one tile along it, without halo or ramp.
    Boxes are clipped to the region: what lies outside it is not polished, and :meth:`taper` brings the
    velocity to zero across the region's faces inside the grid. ``core``: one edge for every axis, or one per
    axis ``(z, y, x)``; ``region``: None for the whole grid.
    """

    shape: tuple[int, int, int]
    core: int | tuple[int, int, int] = TILE_BOX - 2 * TILE_HALO
    halo: int = TILE_HALO
    ramp: int = TILE_RAMP
    region: Box | None = None

    @property
    def bounds(self) -> Box:
        """The polished box of the grid (:attr:`region`, or the whole grid)."""
        return self.region or Box((0, 0, 0), self.shape)

    def _cores(self, axis: int) -> list[tuple[int, int]]:
        low, high = self.bounds.start[axis], self.bounds.stop[axis]
        core = self.core if isinstance(self.core, int) else self.core[axis]
        count = -(-(high - low) // core)
        origin = low + (high - low - count * core) // 2
        return [(max(origin + j * core, low), min(origin + (j + 1) * core, high)) for j in range(count)]

    def tiles(self) -> list[tuple[Box, Box]]:
        """``(core, box)`` of every tile, raster order."""
        axes = [self._cores(a) for a in range(3)]
        bounds = self.bounds
        out = []
        for cz in axes[0]:
            for cy in axes[1]:
                for cx in axes[2]:
                    core = Box(tuple(c[0] for c in (cz, cy, cx)), tuple(c[1] for c in (cz, cy, cx)))  # type: ignore[arg-type]
                    start = tuple(max(a - self.halo, lo) for a, lo in zip(core.start, bounds.start, strict=True))
                    stop = tuple(min(b + self.halo, hi) for b, hi in zip(core.stop, bounds.stop, strict=True))
                    out.append((core, Box(start, stop)))  # type: ignore[arg-type]
        return out

    def _profile(self, axis: int, core: tuple[int, int], box: tuple[int, int], step: int) -> np.ndarray:
        """The 1-D weights of one tile along ``axis`` on every ``step``-th voxel of ``box`` (see the module
        docstring)."""
        index = np.arange(box[0], box[1], step, dtype=np.float64) + 0.5
        weights = np.ones(index.size)
        width = 2.0 * self.ramp
        if core[0] > self.bounds.start[axis]:  # a neighbour before: rise across the boundary
            rise = np.clip((index - (core[0] - self.ramp)) / width, 0.0, 1.0)
            weights *= np.where(rise > 0.0, np.sin(0.5 * math.pi * rise) ** 2, 0.0)
        if core[1] < self.bounds.stop[axis]:  # a neighbour after: fall across it (cos² + sin² = 1 with its rise)
            fall = np.clip((index - (core[1] - self.ramp)) / width, 0.0, 1.0)
            weights *= np.where(fall < 1.0, np.cos(0.5 * math.pi * fall) ** 2, 0.0)
        return weights

    def weights(self, core: Box, box: Box, step: int = 1) -> np.ndarray:
        """Float32 weights of the tile with ``core`` on every ``step``-th voxel of ``box`` from its first (numpy's
        ``[::step]`` of the ``box.shape`` weights; the tiles' weights add up to 1 on the region)."""
        profiles = [self._profile(a, (core.start[a], core.stop[a]), (box.start[a], box.stop[a]), step) for a in range(3)]
        return np.einsum("i,j,k->ijk", *profiles).astype(np.float32)

    def _taper_profile(self, axis: int, box: tuple[int, int], step: int) -> np.ndarray:
        """The 1-D taper along ``axis`` on every ``step``-th voxel of ``box``: 0 outside the region, a sin² rise
        over :attr:`ramp` voxels inside each face of the region that lies inside the grid, 1 elsewhere."""
        index = np.arange(box[0], box[1], step, dtype=np.float64) + 0.5
        low, high = self.bounds.start[axis], self.bounds.stop[axis]
        inside = (index > low) & (index < high)
        profile = inside.astype(np.float64)
        if low > 0:
            profile *= np.sin(0.5 * math.pi * np.clip((index - low) / self.ramp, 0.0, 1.0)) ** 2
        if high < self.shape[axis]:
            profile *= np.sin(0.5 * math.pi * np.clip((high - index) / self.ramp, 0.0, 1.0)) ** 2
        return profile

    def taper(self, box: Box, step: int = 1) -> np.ndarray:
        """Float32 factor of the averaged velocity on every ``step``-th voxel of ``box`` of the grid (as
        :meth:`weights`): it falls smoothly to 0 at the region's faces inside the grid (a smooth velocity stays
        Lipschitz: its exponential stays a diffeomorphism) and is 1 on the whole grid when the region is the
        grid. Shape ``ceil((stop − start) / step)`` per axis ``(z, y, x)`` of ``box``; dimensionless."""
        profiles = [self._taper_profile(a, (box.start[a], box.stop[a]), step) for a in range(3)]
        return np.einsum("i,j,k->ijk", *profiles).astype(np.float32)


def tile_lattice(shape: tuple[int, int, int], coarsening: int, tissue: Box | None = None) -> PolishTiles:
    """The polish's tiles on a field grid of ``shape`` polished ``coarsening`` times coarser: boxes of
    :data:`TILE_BOX` polish-grid voxels (at most :data:`TILE_FIELD_BOX` field voxels; on a polished box of at most
    :data:`SMALL_GRID` polish-grid voxels, :data:`TILE_FIELD_BOX`), the halo and ramp :data:`TILE_HALO` and
    :data:`TILE_RAMP` polish-grid voxels (``coarsening``-fold in field voxels), over the box ``tissue`` of the grid
    grown by the ramp (the velocity's taper lies outside the tissue box; None: the whole grid). A rule of the grid
    and the fixed tissue box alone: the same tiles, hence the same field, whatever the chunks, workers or threads."""
    halo, ramp = TILE_HALO * coarsening, TILE_RAMP * coarsening
    region = None
    if tissue is not None:
        start = tuple(max(a - ramp, 0) for a in tissue.start)
        stop = tuple(min(b + ramp, n) for b, n in zip(tissue.stop, shape, strict=True))
        region = Box(start, stop) if (start, stop) != ((0, 0, 0), shape) else None  # type: ignore[arg-type]
    extent = region.shape if region is not None else shape
    small = math.prod(extent) <= SMALL_GRID * coarsening**3
    box = TILE_FIELD_BOX if small else min(TILE_BOX * coarsening, TILE_FIELD_BOX)
    return PolishTiles(shape, core=tile_cores(extent, box - 2 * halo, halo), halo=halo, ramp=ramp, region=region)


def tissue_box(fixed: MultiscaleImage, grid: Grid) -> Box | None:
    """The box of ``grid`` holding the fixed image's tissue box (:func:`~patchmorph_core.sampling.tissue_bounds`,
    the box the network's patch lattices cover), or None when it holds no voxel of the grid."""
    low, high = tissue_bounds(fixed)
    box = world_box(grid, low, high, margin=0)
    return None if box is None else Box.from_slices(box)


@dataclass(frozen=True)
class PolishTile:
    """One tile: its core and its polished box."""

    core: Box
    box: Box


@dataclass(frozen=True)
class PolishContext:
    """Everything the tasks of the polish need (shared with the tasks once; picklable).

    Attributes:
        fixed, moving: image pyramids (moving in the fixed unit).
        fixed_range, moving_range: intensity ranges (the registration's).
        settings: the polish settings.
        tiles: the tile lattice.
        network_field: ``(3, Z, Y, X)`` array of the network's final field ``u₀``.
        arrays: the output field array, its chunk plan (with the integration halo) and records.
        device: the registration's ``device`` setting (resolved in the task: a GPU worker polishes on it).
        uncertainty: the ``(Z, Y, X)`` uncertainty array the polish overwrites with its residual (None: left
            as the network pass wrote it).
    """

    fixed: MultiscaleImage
    moving: MultiscaleImage
    fixed_range: tuple[float, float]
    moving_range: tuple[float, float]
    settings: PolishSettings
    tiles: PolishTiles
    network_field: Any
    arrays: PassArrays
    device: str = "auto"
    uncertainty: Any = None


@dataclass(frozen=True)
class TilePiece:
    """One chunk's part of a tile's polish: the tile's :class:`~patchmorph_core.polish.PolishResult` restricted
    to what that part reads (on the polish grid: f³ times smaller than on the field grid at coarsening f > 1,
    and the same for every chunk of the tile up to its halo), and the tile's core, which sets its weights."""

    result: PolishResult
    core: Box


@dataclass(frozen=True)
class ChunkSums:
    """A chunk's sums of its tiles' pieces: the weighted velocity and the weight on the lattice nodes of its
    reach box (every f-th field voxel, the voxels the integration uses: :func:`~patchmorph_core.polish.exp_on_nodes`),
    the weighted residual and the weight on the chunk itself (the uncertainty map's voxels).

    Attributes:
        grid: the field grid; ``reach``, ``box``: the chunk's reach box and the chunk (field voxels).
        step: the lattice's step f; ``first``: the reach box's index of its first node (:func:`lattice_start`).
        nodes: the lattice nodes of the reach box (``grid.crop(reach).every(step, first)``).
        velocity, weight: ``(3, *nodes.shape)`` and ``nodes.shape`` float32 sums on the nodes.
        residual, residual_weight: ``box.shape`` float32 sums on the chunk.
    """

    grid: Grid
    reach: Box
    box: Box
    step: int
    first: tuple[int, int, int]
    nodes: Grid
    velocity: np.ndarray
    weight: np.ndarray
    residual: np.ndarray
    residual_weight: np.ndarray

    @classmethod
    def zeros(cls, grid: Grid, reach: Box, box: Box, step: int) -> ChunkSums:
        """Empty sums of the chunk ``box`` with reach box ``reach`` of ``grid``, nodes every ``step`` voxels."""
        first = lattice_start(reach.start, step)
        nodes = grid.crop(reach.start, reach.stop).every(step, first)
        return cls(
            grid, reach, box, step, first, nodes, np.zeros((3, *nodes.shape), np.float32),
            np.zeros(nodes.shape, np.float32), np.zeros(box.shape, np.float32), np.zeros(box.shape, np.float32),
        )  # fmt: skip

    @property
    def origin(self) -> tuple[int, int, int]:
        """The field index ``(z, y, x)`` of node 0."""
        return (self.reach.start[0] + self.first[0], self.reach.start[1] + self.first[1], self.reach.start[2] + self.first[2])

    def node_box(self, lo: Sequence[int], hi: Sequence[int]) -> Box:
        """The box of field voxels from node ``lo`` up to node ``hi`` (node indices ``(z, y, x)``, ``hi``
        exclusive): its voxels taken every ``step`` from its first are those nodes."""
        start = tuple(o + self.step * a for o, a in zip(self.origin, lo, strict=True))
        stop = tuple(o + self.step * b for o, b in zip(self.origin, hi, strict=True))
        return Box(start, stop)  # type: ignore[arg-type]

    def add(self, piece: TilePiece, part: Box, tiles: PolishTiles) -> None:
        """Add the tile ``piece`` weighted by its tile's weights: its velocity at the nodes within ``part`` (its
        part of the reach box), its residual on ``part`` ∩ the chunk."""
        lo = [-(-(p - o) // self.step) for p, o in zip(part.start, self.origin, strict=True)]
        hi = [-(-(p - o) // self.step) for p, o in zip(part.stop, self.origin, strict=True)]
        if all(b > a for a, b in zip(lo, hi, strict=True)):
            at = (slice(None), *(slice(a, b) for a, b in zip(lo, hi, strict=True)))
            weights = tiles.weights(piece.core, self.node_box(lo, hi), self.step)
            self.velocity[at] += piece.result.velocity_on(self.nodes.crop(lo, hi)) * weights
            self.weight[at[1:]] += weights
        inside = part.intersection(self.box)
        if inside is not None:
            weights = tiles.weights(piece.core, inside)
            at3 = inside.relative_to(self.box.start).slices
            self.residual[at3] += piece.result.residual_on(self.grid.crop(inside.start, inside.stop)) * weights
            self.residual_weight[at3] += weights

    def mean_velocity(self, tiles: PolishTiles) -> np.ndarray:
        """``(3, *nodes.shape)`` float32 averaged velocity ``v̄ = Σ w v / Σ w`` at the nodes, times the region's taper
        (0 where no tile reaches)."""
        covered = self.weight > 0
        taper = tiles.taper(self.node_box((0, 0, 0), self.nodes.shape), self.step)
        return self.velocity / np.where(covered, self.weight, np.float32(1.0)) * (covered * taper)

    def mean_residual(self) -> np.ndarray:
        """``box.shape`` float32 averaged residual on the chunk (0 where no tile reaches)."""
        return self.residual / np.where(self.residual_weight > 0, self.residual_weight, np.float32(1.0))


def polish_tile(ctx: PolishContext, tile: PolishTile) -> dict[Any, Any]:
    """Task: polish one tile's box; its result as one :class:`TilePiece` per chunk it meets (grown by the
    integration halo), and its figures (also logged to the records)."""
    tic = time.perf_counter()
    plan = ctx.arrays.plan
    grid = plan.grid.crop(tile.box.start, tile.box.stop)
    field = read_box(ctx.network_field, (slice(None), *tile.box.slices)).astype(np.float32, copy=False)
    result = polish_result(
        ctx.fixed, ctx.moving, (ctx.fixed_range, ctx.moving_range), field, grid, ctx.settings,
        device=resolve_device(ctx.device),
    )  # fmt: skip
    del field
    pieces: dict[Any, Any] = {
        cid: TilePiece(result.restricted(plan.grid.crop(part.start, part.stop)), tile.core)
        for cid, part in chunk_parts(plan, tile.box)
    }
    seconds = time.perf_counter() - tic
    figures = {"seconds": seconds, "polish_seconds": seconds, "voxels": int(np.prod(grid.shape))}
    ctx.arrays.records.log_block(tile.box.start, figures)
    pieces[BLOCK_FIGURES] = figures
    return pieces


def write_polished_chunk(ctx: PolishContext, cid: ChunkId, partials: list[tuple[Box, TilePiece]]) -> dict[str, Any]:
    """Task: average the tiles' velocities over chunk ``cid`` and its integration halo, integrate, compose with
    the network's field on the chunk and write it whole (and the tiles' averaged residual, the uncertainty),
    then record it."""
    tic = time.perf_counter()
    plan = ctx.arrays.plan
    reach, box = plan.reach_box(cid), plan.box(cid)
    sums = ChunkSums.zeros(plan.grid, reach, box, ctx.settings.coarsening)
    for part, piece in partials:
        sums.add(piece, part, ctx.tiles)
    reach_grid = plan.grid.crop(reach.start, reach.stop)
    inner = box.relative_to(reach.start).slices
    displacement = exp_on_nodes(sums.mean_velocity(ctx.tiles), reach_grid, inner, sums.step, sums.first)
    chunk_grid = plan.grid.crop(box.start, box.stop)
    network = FieldDisplacement(ctx.network_field, plan.grid)
    field = compose_on_grid(np.ascontiguousarray(displacement), chunk_grid, network)
    ctx.arrays.records.log_write(cid)
    if ctx.uncertainty is not None:
        ctx.uncertainty[box.slices] = sums.mean_residual()
    ctx.arrays.field[(slice(None), *box.slices)] = field
    info = {"seconds": time.perf_counter() - tic, "blocks": len(partials), "voxels": int(np.prod(box.shape))}
    ctx.arrays.records.mark_done(cid, info)
    return info


def run_polish(
    executor: Executor,
    inputs: Inputs,
    settings: PolishSettings,
    network: PassArrays,
    store: FieldStore,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Polish the network's final field ``network.field`` into the output field (see the module docstring).

    Args:
        executor: where the tile tasks run (with ``{"GPU": 1}`` on GPU clusters, as the network's blocks).
        inputs: the registration's images, plan and settings.
        settings: the polish settings (``settings.iterations`` > 0).
        network: the finest network pass's arrays (its field is ``u₀``; its plan gives the output chunks).
        store: where the output field and the polish's records live.
        progress: show a progress bar.

    Returns:
        The output field array and the polish pass's figures (kind ``"polish"``: steps, tiles, seconds).
    """
    plan = ChunkPlan(network.plan.grid, network.plan.chunk, halo=settings.exp_halo)
    arrays = store.polish_pass("polish", plan)
    tiles = tile_lattice(plan.grid.shape, settings.coarsening, tissue_box(inputs.fixed, plan.grid))
    work = [PolishTile(core, box) for core, box in tiles.tiles()]
    ctx = PolishContext(
        fixed=inputs.fixed, moving=inputs.plan.moving, fixed_range=inputs.plan.fixed_range,
        moving_range=inputs.plan.moving_range, settings=settings, tiles=tiles, network_field=network.field,
        arrays=arrays, device=inputs.config.device, uncertainty=network.uncertainty,
    )  # fmt: skip
    run = run_chunked(
        executor, "polish", arrays.plan, arrays.records, ctx, write_polished_chunk,
        blocks=work, block_fn=polish_tile, supports=[t.box for t in work],
        resources=network_resources(executor), progress=progress,
        spill=spill_folder(executor, arrays.records, arrays.plan.grid),
    )  # fmt: skip
    record = {
        "name": "polish", "kind": "polish", "steps": settings.iterations, "similarity": settings.similarity,
        "tiles": len(work), "tile_core": tiles.core, "region": [list(tiles.bounds.start), list(tiles.bounds.stop)],
        "coarsening": settings.coarsening, "chunks": run.chunks, "skipped": run.skipped,
        "seconds": run.seconds, "block_seconds": run.total("seconds"), "polish_seconds": run.total("polish_seconds"),
        "polished_voxels": int(run.total("voxels")),
        "chunk_seconds": run.chunk_seconds,
        "spilled_bytes": int(run.total("spilled_bytes")),
    }  # fmt: skip
    log.info("polish: %d steps on %d tiles, %.1f s", settings.iterations, len(work), run.seconds)
    return arrays.field, record
