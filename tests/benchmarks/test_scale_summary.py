"""The scale benchmark's bookkeeping: per-pass figures from a run folder, shares, series against the targets,
and the terabyte projection's arithmetic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from report import load, projection, throughput
from scale import PROJECTION, pass_at, pass_figures, relative, shares


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def test_pass_figures_sum_the_block_and_chunk_records(tmp_path: Path) -> None:
    run = tmp_path / "field.zarr.run"
    _write(run / "stage2" / "blocks" / "0_0_0.json", {"forward_seconds": 3.0, "sampling_seconds": 1.0, "seconds": 5.0})
    _write(run / "stage2" / "blocks" / "0_1_0.json", {"forward_seconds": 1.0, "accumulate_seconds": 0.5, "seconds": 2.0})
    _write(run / "stage2" / "done" / "0_0_0.json", {"seconds": 1.0, "voxels": 100})
    _write(run / "stage2" / "spilled.json", {"bytes": 1234})  # what went through the run folder
    _write(run / "polish1" / "blocks" / "0_0_0.json", {"polish_seconds": 2.0, "seconds": 2.0, "voxels": 100})
    _write(run / "polish1" / "done" / "0_0_0.json", {"seconds": 0.0})
    (run / "stage1.zarr").mkdir()  # a pass's array, not a records folder
    rows = {r["name"]: r for r in pass_figures(run)}
    assert set(rows) == {"polish1", "stage2"}
    assert rows["stage2"] == pytest.approx(
        {"name": "stage2", "forward_s": 4.0, "sampling_s": 1.0, "accumulate_s": 0.5, "polish_s": 0.0, "block_s": 7.0,
         "chunk_s": 1.0, "voxels": 100, "spilled_bytes": 1234}
    )  # fmt: skip
    assert rows["polish1"]["voxels"] == 100  # from the blocks when the chunks do not say
    assert rows["polish1"]["spilled_bytes"] == 0  # nothing went through the run folder
    parts = shares(list(rows.values()))
    assert parts["forward"] == pytest.approx(0.4) and parts["polish"] == pytest.approx(0.2)
    assert parts["other"] == pytest.approx(1 - 0.4 - 0.1 - 0.05 - 0.2)


def test_a_peak_is_attributed_to_the_pass_that_was_running(tmp_path: Path) -> None:
    """A pass ends with its last record (block or chunk): a peak belongs to the first pass that ended at or
    after it; one after every pass is the quality block's."""
    run = tmp_path / "field.zarr.run"
    times = {"stage1/blocks/0_0_0": 100.0, "stage1/done/0_0_0": 110.0, "stage2/blocks/0_0_0": 150.0,
             "stage2/done/0_0_1": 170.0, "polish/blocks/0_0_0": 180.0, "polish/done/0_0_0": 200.0}  # fmt: skip
    for name, mtime in times.items():
        _write(run / f"{name}.json", {"seconds": 1.0})
        os.utime(run / f"{name}.json", (mtime, mtime))
    assert pass_at(run, 50.0) == "stage1"
    assert pass_at(run, 110.0) == "stage1"
    assert pass_at(run, 160.0) == "stage2"
    assert pass_at(run, 175.0) == "polish"  # the polish sorts last, whatever its name
    assert pass_at(run, 230.0) == "after the passes"
    assert pass_at(run, None) is None and pass_at(tmp_path / "missing", 100.0) is None


def _row(gib: float, voxels: int, field_voxels: int, wall: float, peak: float, forward: float) -> dict:
    step = {"wall_s": wall, "cpu_s": 2 * wall, "max_worker_peak_gib": peak, "read_gib": field_voxels / 1e6}
    return {
        "size_gib_requested": gib,
        "field_factor": 4.0,
        "voxels": voxels,
        "bytes": 2 * voxels,
        "field_voxels": field_voxels,
        "register": {**step, "shares": {"forward": forward}},
        "warp": {**step, "read_gib": voxels / 1e9},
    }


def test_a_series_is_judged_against_linear_work() -> None:
    small = _row(0.25, 10**8, 10**6, 10.0, 1.0, 0.7)
    large = _row(2.0, 8 * 10**8, 8 * 10**6, 100.0, 1.1, 0.65)
    register = relative(small, large)["register"]
    assert register["wall_vs_linear"] == pytest.approx(1.25)
    assert register["met"]["wall_within_1.3x_linear"]
    assert register["read_per_unit_ratio"] == pytest.approx(1.0)
    assert register["met"]["worker_peak_within_20pct"] and register["met"]["forward_share_60pct"]
    slow = relative(small, _row(2.0, 8 * 10**8, 8 * 10**6, 110.0, 1.3, 0.55))["register"]
    assert slow["wall_vs_linear"] == pytest.approx(1.375) and not slow["met"]["wall_within_1.3x_linear"]
    assert not slow["met"]["worker_peak_within_20pct"] and not slow["met"]["forward_share_60pct"]


def test_the_projection_follows_from_the_measured_throughput() -> None:
    row = _row(2.0, 10**9, 10**7, 100.0, 1.0, 0.5)
    row["register"]["cpu_s"] = 100.0  # 10 µs of CPU per field voxel
    row["register"]["passes"] = []
    row["warp"]["cpu_s"] = 200.0  # 2e9 bytes in 200 s: 1e7 bytes per CPU second
    plan = {**PROJECTION, "field_spacings_um": [50.0], "workers": [10], "cores_per_worker": 4, "storage_gb_per_s": [1.0]}
    doc = {"rows": [row], "projection": plan}
    assert throughput(doc)["register_cpu_s_per_field_voxel"] == pytest.approx(1e-5)
    field = projection(doc)["fields"][0]
    box_um3 = 20e3 * 25e3 * 30e3
    assert field["field_voxels"] == pytest.approx(box_um3 / 50.0**3)
    assert field["register_core_s"] == pytest.approx(field["field_voxels"] * 1e-5)
    assert field["warp_core_s"] == pytest.approx(1e12 / 1e7)
    cpu = (field["register_core_s"] + field["warp_core_s"]) / 40
    only = field["rows"][0]
    assert only["cpu_wall_s"] == pytest.approx(cpu)
    assert only["gpu_wall_bound_s"] == pytest.approx((0.5 * field["register_core_s"] + field["warp_core_s"]) / 40)
    assert only["io_floor_s"][1.0] == pytest.approx(3e12 / 1e9)


def test_a_series_timed_without_warp_takes_the_warp_figure_from_the_warp_benchmark() -> None:
    """``scale.py --no-warp``: the series judges register alone, and the projection's warp throughput is the warp
    benchmark's (``benchmarks/results/warp_throughput.json``), named where it is used."""
    small, large = _row(0.25, 10**8, 10**6, 10.0, 1.0, 0.7), _row(2.0, 8 * 10**8, 8 * 10**6, 100.0, 1.1, 0.65)
    for row in (small, large):
        del row["warp"]
        row["register"]["passes"] = []
    series = relative(small, large)
    assert "warp" not in series and series["register"]["wall_vs_linear"] == pytest.approx(1.25)
    warp = load("warp_throughput.json")
    assert warp is not None
    speed = throughput({"rows": [small, large], "projection": PROJECTION})
    assert speed["warp_bytes_per_cpu_s"] == pytest.approx(warp["rows"]["ours"]["mb_per_cpu_s"] * 1e6)
    assert speed["warp_source"] == warp["command"]
