"""Chunked field reduction equals the in-memory one (awkward chunk sizes), on the real algorithm."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from patchmorph_core import inference
from patchmorph_core.config import InferenceConfig
from patchmorph_core.inference import RegistrationResult, accumulate, specs_in_box, stage_lattice
from patchmorph_core.model import load_model
from patchmorph_core.spatial import Grid
from pipeline.chunked import (
    Box,
    ChunkPlan,
    block_folder,
    cells_per_block,
    needs,
    partition,
    reduce_partials,
    split_partial,
)
from pipeline.ngff import read_field, read_image
from pipeline.register import register_arrays, register_files


def _rotated_grid() -> Grid:
    """Anisotropic, non-cubic, rotated field grid (any transposition shows)."""
    angle = np.deg2rad(20.0)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    return Grid.from_spacing(
        (45, 50, 38), (1.2, 1.0, 0.9), origin=(3.0, -2.0, 5.0), unit="millimeter", direction=rot
    )


def _plan(grid: Grid, size: int) -> ChunkPlan:
    """Cubic chunks of ``size`` field voxels, clipped to ``grid``."""
    return ChunkPlan(grid, tuple(min(size, n) for n in grid.shape))  # type: ignore[arg-type]


def _block_files(folder: Path, block: int) -> list[Path]:
    """The files of block ``block``'s arrays in the spill folder ``folder`` (what its pieces refer to)."""
    return sorted(block_folder(folder, block).glob("*.raw"))


def _estimates(specs: list) -> np.ndarray:
    """A different smooth-free random estimate per patch, drawn from the patch's cell only."""
    return np.stack(
        [np.random.default_rng(list(s.cell)).normal(size=(3, s.size, s.size, s.size)) for s in specs]
    )


@pytest.mark.parametrize(("chunk", "cells"), [(17, 1), (40, 2), (17, None)])
def test_chunked_sums_equal_whole_grid(chunk: int, cells: int | None) -> None:
    grid = _rotated_grid()
    lattice = stage_lattice(
        grid, extent=24.0, overlap=2.0, seed=3, stage=1, max_rotation_deg=15.0, patch_size=8
    )
    all_specs = lattice.specs()
    whole = accumulate(all_specs, _estimates(all_specs), grid)

    plan = _plan(grid, chunk)
    blocks = partition(lattice, plan, cells, min_blocks=4)  # None: sized by the box budget, >= 4 blocks
    assert len(blocks) >= 4
    partials, pieces = [], []
    for block in blocks:
        specs = specs_in_box(lattice, block.start, block.stop)
        sub = grid.crop(block.support.start, block.support.stop)
        partials.append((block.support, accumulate(specs, _estimates(specs), sub)))
        pieces.append(split_partial(plan, block.support, partials[-1][1]))
    need = needs(plan, [b.support for b in blocks])
    assert sum(len(specs_in_box(lattice, b.start, b.stop)) for b in blocks) == len(all_specs)
    for n, block_pieces in enumerate(pieces):  # a block's pieces are exactly the chunks that need it
        assert sorted(block_pieces) == sorted(cid for cid in plan.ids() if n in need[cid])
        box_voxels = sum(int(np.prod(p.grid.shape)) for p in block_pieces.values())
        assert box_voxels == int(np.prod(blocks[n].support.shape))  # the pieces tile the support, no more
    for cid in plan.ids():
        box = plan.box(cid)
        whole_sums = reduce_partials(grid, box, [partials[n] for n in need[cid]])  # cut by the chunk task
        cut = reduce_partials(  # cut by the blocks: each piece on its block's support ∩ the chunk
            grid, box, [(blocks[n].support.intersection(box), pieces[n][cid]) for n in need[cid]]
        )
        for sums in (whole_sums, cut):
            np.testing.assert_allclose(sums.weight, whole.weight[box.slices], rtol=1e-5, atol=1e-6)  # float32 sums
            np.testing.assert_allclose(
                sums.weighted, whole.weighted[(slice(None), *box.slices)], rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(
                sums.weighted_sq, whole.weighted_sq[box.slices], rtol=1e-5, atol=1e-6
            )
    assert whole.weight.min() > 0  # every voxel is covered, so the comparison is not of zeros


def test_blocks_follow_the_box_budget_and_min_blocks() -> None:
    grid = _rotated_grid()
    lattice = stage_lattice(grid, extent=24.0, overlap=2.0, seed=3, stage=1, max_rotation_deg=0.0, patch_size=8)
    spacing = float(grid.spacing.min())
    def box_voxels(n: int) -> float:  # field voxels of the box a block of n cells per edge spans
        return ((n * lattice.step + lattice.extent) / spacing) ** 3

    for budget in (20**3, 61**3, 85**3):
        n = cells_per_block(lattice, grid, min_blocks=1, max_voxels=budget)
        assert n == 1 or box_voxels(n) <= budget  # within the budget (one cell at least)
        assert n == max(lattice.counts) or box_voxels(n + 1) > budget  # and as large as it allows
    assert cells_per_block(lattice, grid, min_blocks=1, max_voxels=10**6) == max(lattice.counts)  # one block
    n = cells_per_block(lattice, grid, min_blocks=8, max_voxels=10**6)
    assert int(np.prod([-(-c // n) for c in lattice.counts])) >= 8
    assert cells_per_block(lattice, grid, min_cells=3, max_voxels=1) == 3  # a block fills a network batch
    cells = int(np.prod(lattice.counts))
    for shares in (2, 3):  # no block holds more than 1/shares of the cells, so the workers share the stage
        n = cells_per_block(lattice, grid, min_blocks=shares, max_voxels=10**6)
        assert int(np.prod([min(n, c) for c in lattice.counts])) * shares <= cells


def test_a_lattice_within_one_block_is_cut_in_two_along_its_longest_axis() -> None:
    """A small lattice whose network batch would make it one block (the first pass) becomes two blocks, the
    halves of its longest axis, each cell in one of them; with min_blocks 1 it stays one block."""
    grid = _rotated_grid()
    lattice = stage_lattice(grid, extent=40.0, overlap=1.5, seed=3, stage=0, max_rotation_deg=0.0, patch_size=8)
    counts = tuple(int(c) for c in lattice.counts)
    assert max(counts) > 1 and len(set(counts)) > 1  # non-cubic, so the axis is not a tie
    plan = _plan(grid, 40)
    blocks = partition(lattice, plan, batch_size=16)
    axis = int(np.argmax(counts))
    assert len(blocks) == 2
    assert [b.stop[axis] - b.start[axis] for b in blocks] == [-(-counts[axis] // 2), counts[axis] // 2]
    cells = [tuple(c) for b in blocks for c in lattice.cells(b.start, b.stop)]
    assert sorted(cells) == sorted(tuple(c) for c in lattice.cells())
    assert len(partition(lattice, plan, batch_size=16, min_blocks=1)) == 1


def test_chunk_plan_covers_grid_once() -> None:
    grid = _rotated_grid()
    plan = _plan(grid, 17)
    assert plan.counts == (3, 3, 3)
    hits = np.zeros(grid.shape, dtype=int)
    for cid in plan.ids():
        hits[plan.box(cid).slices] += 1
        assert np.allclose(
            plan.chunk_grid(cid).index_to_world(np.zeros(3)),
            grid.index_to_world(np.array(plan.box(cid).start)),
        )
    assert np.all(hits == 1)


def _in_memory(fixed: Path, moving: Path, config: InferenceConfig) -> RegistrationResult:
    model = load_model(config.weights, "cpu")
    return register_arrays(model, read_image(fixed), read_image(moving), config, show_progress=False)


def _fixed_from_grid(run: Path) -> list[float]:
    """Per block task of a run: 1 if it sliced the fixed image sent with its stage, 0 if it sampled it."""
    return [json.loads(p.read_text())["fixed_from_grid"] for p in sorted(run.rglob("blocks/*.json"))]


def test_chunked_registration_equals_in_memory(
    tmp_path: Path,
    dask_cluster: Any,
    dask_scheduler: str,
    pair_and_config: tuple[Path, Path, InferenceConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real cluster, real model: the field does not depend on chunk size (17, 40), worker count (2, 1) or
    whether the client sent the fixed image on the field grid (it does up to a size limit). Without the
    polish, which amplifies float rounding (its own test follows)."""
    from distributed import Client

    fixed, moving, config = pair_and_config
    config = config.model_copy(update={"polish_iterations": 0})
    reference = _in_memory(fixed, moving, config)
    tolerance = 1e-4 * float(reference.grid.spacing.min())
    assert np.abs(reference.field).max() > 10 * tolerance  # a field that is not all zero
    fields = {}
    for chunk in (17, 40):
        record = register_files(
            fixed, moving, tmp_path / f"field{chunk}.zarr", config, chunk_size=chunk, scheduler=dask_scheduler,
            progress=False, keep_run=True,
        )  # fmt: skip
        array, grid, meta = read_field(record.field)
        fields[chunk] = np.asarray(array[:])
        assert grid.shape == reference.grid.shape and np.allclose(grid.affine, reference.grid.affine)
        assert np.abs(fields[chunk] - reference.field).max() < tolerance
        unc = np.asarray(read_image(record.uncertainty).levels[0].array[:])
        assert np.abs(unc - reference.uncertainty).max() < tolerance
        assert meta["config"]["seed"] == config.seed and meta["components"] == ["z", "y", "x"]
    assert record.chunks == 1 and record.stages[-1]["chunk_shape"] == list(reference.grid.shape)
    assert all(s["spilled_bytes"] > 0 for s in record.stages)  # the blocks' pieces went through files,
    assert not list(Path(record.run).rglob("pieces"))  # all removed
    sliced = _fixed_from_grid(record.run)
    assert sliced and all(v == 1.0 for v in sliced)
    monkeypatch.setattr(inference, "FIXED_ON_GRID_BYTES", 0)  # on the client, which makes the image
    record = register_files(
        fixed, moving, tmp_path / "sampled.zarr", config, chunk_size=17, scheduler=dask_scheduler, progress=False,
        keep_run=True,
    )
    monkeypatch.undo()
    assert all(v == 0.0 for v in _fixed_from_grid(record.run))
    assert np.abs(np.asarray(read_field(record.field)[0][:]) - fields[17]).max() < tolerance
    dask_cluster.scale(1)  # the same run on one worker
    with Client(dask_scheduler) as client:
        client.wait_for_workers(1)
        while len(client.scheduler_info()["workers"]) > 1:
            time.sleep(0.1)
        record = register_files(
            fixed, moving, tmp_path / "one_worker.zarr", config, chunk_size=17, scheduler=dask_scheduler,
            progress=False,
        )  # fmt: skip
        assert len(client.scheduler_info()["workers"]) == 1
        dask_cluster.scale(2)
        client.wait_for_workers(2)
    one = np.asarray(read_field(record.field)[0][:])
    assert np.abs(one - fields[17]).max() < 1e-6 * float(reference.grid.spacing.min())


def test_spilled_pieces_reach_their_chunks_through_files_and_are_removed(tmp_path: Path) -> None:
    """With a spill folder the block tasks' pieces travel as files of the run folder: each chunk task gets
    copies equal to what its blocks made (read while the file exists), the totals equal the run without a
    spill folder, and no piece is left once the stage is done."""
    from pipeline.chunked import BLOCK_FIGURES, SpilledPiece, run_chunked, spill_block
    from pipeline.executor import thread_executor
    from pipeline.resume import StageRecords, chunk_name

    grid = _rotated_grid()
    plan = _plan(grid, 17)
    supports = [plan.box((0, 0, 0)), Box((0, 0, 0), (30, 30, 30))]
    made: dict[tuple[int, Any], np.ndarray] = {}

    def block_fn(_ctx: Any, b: int) -> dict[Any, Any]:
        values = np.arange(20_000.0) + 10.0 * b  # block 1's pieces view it (160 kB: written once, by reference)
        cids = plan.chunks_meeting(supports[b], plan.halo)
        out: dict[Any, Any] = {cid: values[sum(cid) :] if b == 1 else np.full(3, sum(cid)) for cid in cids}
        made.update({(b, cid): piece for cid, piece in out.items()})
        out[BLOCK_FIGURES] = {"seconds": 0.0}
        return out

    def run(spill: Path | None) -> dict[Any, float]:
        totals: dict[Any, float] = {}

        def chunk_fn(_ctx: Any, cid: Any, partials: list[tuple[Any, np.ndarray]]) -> dict[str, Any]:
            if spill is not None:
                originals = [id(a) for a in made.values()]
                assert all(id(piece) not in originals for _, piece in partials)  # read from the files
                assert len(list(spill.glob(f"*-{chunk_name(cid)}.pkl"))) == len(partials)  # one file a piece
                if any(piece.size > 3 for _, piece in partials):  # block 1's bytes, shared by its pieces
                    assert [p.name for p in _block_files(spill, 1)] == ["1.0.raw"]
            totals[cid] = float(sum(piece.sum() for _, piece in partials))
            return {}

        records = StageRecords(tmp_path / ("spilled" if spill else "kept"))
        with thread_executor(2) as executor:
            stage = run_chunked(
                executor, "s", plan, records, None, chunk_fn, blocks=[0, 1], block_fn=block_fn,
                supports=supports, progress=False, spill=spill,
            )  # fmt: skip
        assert stage.blocks == 2 and stage.chunks == len(plan)
        spilled = records.root / "spilled.json"  # the bytes handed over, for the scale benchmark's pass figures
        if spill is None:
            assert not spilled.exists()
        else:
            assert json.loads(spilled.read_text()) == {"bytes": stage.total("spilled_bytes")}
        return totals

    kept = run(None)
    spill = tmp_path / "spilled" / "pieces"
    assert run(spill) == kept and sum(kept.values()) > 0
    assert not spill.exists()  # every piece read, deleted, and the folder removed
    out = spill_block(block_fn, tmp_path, 1, None, 1)  # a spilled piece is a file holding the same values
    piece = next(v for k, v in out.items() if k != BLOCK_FIGURES)
    written = [*tmp_path.glob("1-*.pkl"), *_block_files(tmp_path, 1)]
    assert out[BLOCK_FIGURES]["spilled_bytes"] == sum(p.stat().st_size for p in written) > 0
    assert isinstance(piece, SpilledPiece) and piece.path.is_file()
    np.testing.assert_array_equal(piece.load(), made[(1, next(k for k in out if k != BLOCK_FIGURES))])


def test_a_blocks_shared_bytes_are_deleted_with_its_last_chunk(tmp_path: Path) -> None:
    """A block's arrays in the spill folder live while a chunk that needs the block is still to be written and
    are gone once its last such chunk is recorded (one chunk task in flight, so each task sees the folder as
    the previous one left it)."""
    from pipeline.chunked import BLOCK_FIGURES, needs, run_chunked
    from pipeline.executor import thread_executor
    from pipeline.resume import StageRecords

    grid = _rotated_grid()
    plan = _plan(grid, 17)
    supports = [Box((0, 0, 0), (20, 20, 20)), Box((0, 0, 0), tuple(grid.shape))]  # type: ignore[arg-type]
    need = needs(plan, supports)
    last_of_block_0 = max(cid for cid in plan.ids() if 0 in need[cid])
    seen: dict[Any, bool] = {}

    def block_fn(_ctx: Any, b: int) -> dict[Any, Any]:
        values = np.arange(10_000.0) + b  # 80 kB, viewed by every piece: written once as the block's file
        return {**{cid: values[1:] for cid in plan.chunks_meeting(supports[b], plan.halo)}, BLOCK_FIGURES: {}}

    def chunk_fn(_ctx: Any, cid: Any, _partials: list[Any]) -> dict[str, Any]:
        seen[cid] = bool(_block_files(spill, 0))
        return {}

    spill = tmp_path / "pieces"
    with thread_executor(1) as executor:
        run_chunked(
            executor, "s", plan, StageRecords(tmp_path / "records"), None, chunk_fn, blocks=[0, 1],
            block_fn=block_fn, supports=supports, window=1, progress=False, spill=spill,
        )  # fmt: skip
    assert all(seen[cid] for cid in plan.ids() if cid <= last_of_block_0)
    assert any(cid > last_of_block_0 for cid in seen) and not any(
        seen[cid] for cid in plan.ids() if cid > last_of_block_0
    )


def test_overlapping_pieces_share_their_block_bytes_in_the_spill_folder(tmp_path: Path) -> None:
    """Pieces that view one large array of their block (chunks' halos overlap) are written as references into
    one file of that array: the block's bytes are written once, not once a piece; each piece reads back the
    values (and shape) of its view, reversed and transposed views included; a small array stays inside its
    piece's file."""
    from pipeline.chunked import BLOCK_FIGURES, SPILL_INLINE_BYTES, spill_block

    sums = np.arange(2 * 40 * 30 * 20, dtype=np.float32).reshape(2, 40, 30, 20)  # 192 kB, C order
    fortran = np.asfortranarray(sums[0])
    views = {
        (0, 0, 0): {"sums": sums[:, :25], "small": np.ones(3)},
        (0, 0, 1): {"sums": sums[:, 15:]},  # overlaps the first piece by 10 slices
        (0, 1, 0): {"reversed": sums[1, ::-1, :, ::2], "transposed": fortran[:, 5:, :].T},
    }

    def block_fn(_ctx: Any, _block: int) -> dict[Any, Any]:
        return {**views, BLOCK_FIGURES: {"seconds": 0.0}}

    out = spill_block(block_fn, tmp_path, 3, None, 3)
    files = _block_files(tmp_path, 3)
    assert [f.stat().st_size for f in files] == [sums.nbytes, fortran.nbytes]  # each array's bytes once
    pieces = sum(p.stat().st_size for p in tmp_path.glob("3-*.pkl"))
    assert out[BLOCK_FIGURES]["spilled_bytes"] == pieces + sums.nbytes + fortran.nbytes
    assert pieces < SPILL_INLINE_BYTES  # the pieces hold references, not copies
    for cid, made in views.items():
        loaded = out[cid].load()
        assert loaded.keys() == made.keys()
        for name, array in made.items():
            assert loaded[name].shape == array.shape
            np.testing.assert_array_equal(loaded[name], array)


def test_threads_write_the_pieces_of_a_large_field_and_get_the_same_field(
    tmp_path: Path, pair_and_config: tuple[Path, Path, InferenceConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In threads of one process a small field's pieces stay in memory; a field above ``IN_MEMORY_VOXELS`` (here
    every field) writes them to the run folder like a cluster, and the field is the same."""
    from pipeline import driver

    fixed, moving, config = pair_and_config
    kept = register_files(fixed, moving, tmp_path / "kept.zarr", config, chunk_size=17, progress=False)
    monkeypatch.setattr(driver, "IN_MEMORY_VOXELS", 0)
    spilled = register_files(fixed, moving, tmp_path / "spilled.zarr", config, chunk_size=17, progress=False)
    assert [s["name"] for s in spilled.stages] == [s["name"] for s in kept.stages] and spilled.polish is not None
    assert all(s["spilled_bytes"] == 0 for s in kept.stages)
    assert all(s["spilled_bytes"] > 0 for s in spilled.stages)
    assert np.array_equal(np.asarray(read_field(spilled.field)[0][:]), np.asarray(read_field(kept.field)[0][:]))
    assert not spilled.run.exists()  # the run folder, pieces and all, is gone once the command finished
