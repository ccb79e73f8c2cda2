"""Scale benchmark of the chunked pipeline: register + warp at two volume sizes, same settings.

The fixed image is the real STP mouse brain (../shared/data/mouse_stp_brainreg, 50×40×40 µm, psl)
upsampled trilinearly in world space to ``--sizes`` GiB of uint16 OME-Zarr (streamed block by block); the
moving image is the Allen CCFv3 average template at 100 µm. For each size the benchmark runs
``register_files`` (atlas → brain) and ``warp_files`` (atlas onto the full-resolution brain grid: the output
is as large as the fixed image) on a local Dask cluster and reports:

* wall time of register and warp;
* peak resident memory of every process (client + scheduler = this process; each worker process),
  sampled every 0.2 s with psutil;
* bytes read and written by all processes (psutil I/O counters, so page-cache hits count as reads);
* the size of the fixed volume in memory (voxels × 2 bytes, the "GiB" of ``--sizes``) and on disk
  (``disk_gib``: the whole OME-Zarr store with its pyramid, Zarr v3 with the product's default compressor;
  the upsampled brain carries Gaussian noise like real data, so it compresses to about half);
* the share of worker time spent in network forward passes (from the per-block timing records), and where
  the rest goes (patch sampling, accumulation, other block work, chunk tasks);
* the same registration once more with ``--deep-stages`` cascade stages (default 4, one more than the
  default model's 3; register only): its finest field has 8× the voxels and is written in many chunks,
  the regime of a whole-brain run at a useful field resolution, where the default's small field (two
  chunks here) is mostly fixed costs.

``--sizes`` is GiB in memory (uint16); an on-disk store of at least 8 GiB needs about 16 GiB in memory, so
the issue's pair (≥ 8 GiB on disk and 8× fewer voxels) is ``--sizes 2 16``.

Usage (prints a table, writes benchmarks/results/scale.json)::

    nice -n 5 .venv/bin/python benchmarks/scale.py --sizes 2 16 --work /work/scale-work
    # another operating point, kept apart from the default's results:
    nice -n 5 .venv/bin/python benchmarks/scale.py --sizes 2 --set overlap=1.5 --out /tmp/scale_overlap15.json

Targets (issue 4): peak memory per worker < 2 GiB and within 20 % between sizes; wall time within 1.3× of
linear in voxel count; ≥ 70 % of worker time in forward passes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import psutil
import yaml
from scipy import ndimage

from patchmorph_core.config import InferenceConfig, ModelConfig
from patchmorph_core.model import DEFAULT_WEIGHTS, PatchMorph, save_checkpoint
from patchmorph_core.spatial import Grid
from pipeline.importers import convert, open_input
from pipeline.ngff import read_image, write_image
from pipeline.register import register_files
from pipeline.warp import warp_files

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
BRAIN = DATA / "mouse_stp_brainreg" / "brain_50x40x40um_psl"
ATLAS = DATA / "mouse_ccf" / "average_template_100.nrrd"
RESULTS = REPO / "benchmarks" / "results" / "scale.json"
CLUSTER = str(REPO / "configs" / "cluster" / "local.yaml")  # 2 GiB per worker
GIB = 1024**3
NOISE_STD = 20.0
"""Gaussian noise (uint16 grey values) added to the upsampled brain: real STP data is noisy, and a smooth
upsampled volume would compress to a small fraction of its size on disk."""


class ProcessSampler:
    """Samples RSS and I/O counters of this process and all its children every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak: dict[int, int] = {}
        self.kind: dict[int, str] = {}
        self.io_start: dict[int, tuple[int, int]] = {}
        self.io_last: dict[int, tuple[int, int]] = {}
        self.cpu_start: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss
                io = proc.io_counters()
                times = proc.cpu_times()
                cmd = " ".join(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            pid = proc.pid
            self.peak[pid] = max(self.peak.get(pid, 0), rss)
            if pid == me.pid:
                self.kind[pid] = "client+scheduler"
            elif "spawn_main" in cmd:  # Dask worker processes (the nannies run in this process)
                self.kind[pid] = "worker"
            else:
                self.kind.setdefault(pid, "other")
            self.io_start.setdefault(pid, (io.read_chars, io.write_chars))
            self.io_last[pid] = (io.read_chars, io.write_chars)
            self.cpu_start.setdefault(pid, times.user + times.system)
            self.cpu_last[pid] = times.user + times.system

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        """Peak RSS per process kind, CPU seconds (user + system; independent of other load on the host)
        and bytes read/written by all sampled processes."""
        workers = [self.peak[p] for p, k in self.kind.items() if k == "worker"]
        read = sum(self.io_last[p][0] - self.io_start[p][0] for p in self.io_last)
        written = sum(self.io_last[p][1] - self.io_start[p][1] for p in self.io_last)
        client = [self.peak[p] for p, k in self.kind.items() if k == "client+scheduler"]
        return {
            "client_scheduler_peak_gib": max(client, default=0) / GIB,
            "worker_peak_gib": [w / GIB for w in sorted(workers, reverse=True)],
            "max_worker_peak_gib": max(workers, default=0) / GIB,
            "read_gib": read / GIB,
            "written_gib": written / GIB,
            "worker_cpu_s": sum(
                self.cpu_last[p] - self.cpu_start[p] for p, k in self.kind.items() if k == "worker"
            ),
            "client_cpu_s": sum(
                self.cpu_last[p] - self.cpu_start[p] for p, k in self.kind.items() if k == "client+scheduler"
            ),
        }


def _upsample_block(
    source: np.ndarray, matrix: np.ndarray, out_dtype: np.dtype, block_info: dict | None = None
) -> np.ndarray:
    """Trilinear samples of ``source`` for one output block; ``matrix`` maps output → source index (4×4)."""
    info = block_info[None]  # type: ignore[index]
    start = np.array([loc[0] for loc in info["array-location"]], dtype=np.float64)
    shape = tuple(int(b - a) for a, b in info["array-location"])
    offset = matrix[:3, 3] + matrix[:3, :3] @ start
    out = ndimage.affine_transform(
        source, matrix[:3, :3], offset=offset, output_shape=shape, order=1, mode="nearest"
    )
    rng = np.random.default_rng([int(v) for v in start])  # imaging noise, seeded by the block's position
    out += rng.normal(0.0, NOISE_STD, size=shape).astype(np.float32)
    return np.clip(np.rint(out), 0, np.iinfo(out_dtype).max).astype(out_dtype)


def make_volume(source: np.ndarray, grid: Grid, gib: float, path: Path) -> tuple[Path, Grid]:
    """Write ``source`` upsampled in world space to about ``gib`` GiB of uint16 OME-Zarr at ``path``."""
    factor = (gib * GIB / 2.0 / source.size) ** (1.0 / 3.0)
    big = grid.resampled(grid.spacing / factor)
    if path.exists():
        return path, read_image(path).grid
    matrix = grid.inverse_affine @ big.affine
    lazy = da.map_blocks(
        _upsample_block,
        source=source.astype(np.float32),
        matrix=matrix,
        out_dtype=np.dtype(np.uint16),
        dtype=np.uint16,
        chunks=tuple((128,) * (n // 128) + ((n % 128,) if n % 128 else ()) for n in big.shape),
        meta=np.empty((0, 0, 0), np.uint16),
    )
    write_image(path, lazy, big, name=path.stem)
    return path, big


def _worker_times(run: Path) -> dict[str, float | None]:
    """Worker task seconds from a run folder's block and chunk records, split by what they were spent on.

    ``forward_share`` is forward-pass seconds over all task seconds (block + chunk tasks, the polish's tiles
    included); ``forward_share_network`` leaves the polish out (the network stages alone); None for runs
    without network (warp).
    """
    forward = sampling = accumulate = block = chunk = polish = 0.0
    for stage in [p for p in run.iterdir() if p.is_dir()]:
        for p in (stage / "blocks").glob("*.json"):
            entry = json.loads(p.read_text())
            forward += entry.get("forward_seconds", 0.0)
            sampling += entry.get("sampling_seconds", 0.0)
            accumulate += entry.get("accumulate_seconds", 0.0)
            polish += entry.get("polish_seconds", 0.0)
            block += entry.get("seconds", 0.0)
        for p in (stage / "done").glob("*.json"):
            chunk += json.loads(p.read_text()).get("seconds", 0.0)
    total = block + chunk
    return {
        "forward_s": forward,
        "patch_sampling_s": sampling,
        "accumulate_s": accumulate,
        "polish_s": polish,
        "block_other_s": block - forward - sampling - accumulate - polish,
        "block_s": block,
        "chunk_s": chunk,
        "forward_share": forward / total if block and total else None,
        "forward_share_network": forward / (total - polish) if block and total > polish else None,
    }


def _store_gib(path: Path) -> float:
    """Bytes on disk of every file under ``path``, in GiB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GIB


def _measured_register(
    fixed: Path, atlas: Path, out: Path, config: InferenceConfig, args: argparse.Namespace
) -> tuple[Any, float, dict[str, Any]]:
    """``register_files`` (atlas → brain) under the process sampler: its record, wall seconds, and the
    sampler's figures with the worker-time split."""
    with ProcessSampler() as sampler:
        tic = time.perf_counter()
        record = register_files(
            fixed, atlas, out, config, chunk_size=args.chunk_size, workers=args.workers, scheduler=CLUSTER,
            overwrite=True,
        )  # fmt: skip
        seconds = time.perf_counter() - tic
    return record, seconds, {**sampler.summary(), **_worker_times(record.run)}


def bench_size(
    gib: float, source: np.ndarray, grid: Grid, atlas: Path, config: InferenceConfig, args: argparse.Namespace
) -> dict[str, Any]:
    """Prepare (or reuse), register and warp at one size; returns the measured figures."""
    work = Path(args.work)
    tic = time.perf_counter()
    reused = (work / f"brain_{gib:g}gib.zarr").exists()
    fixed, big = make_volume(source, grid, gib, work / f"brain_{gib:g}gib.zarr")
    prepare_s = None if reused else time.perf_counter() - tic
    voxels = int(np.prod(big.shape))
    field = work / f"field_{gib:g}gib.zarr"
    warped = work / f"atlas_on_brain_{gib:g}gib.zarr"
    for path in (field, warped):
        for p in (path, path.with_name(path.name + ".run")):
            shutil.rmtree(p, ignore_errors=True)
    record, register_s, register_figures = _measured_register(fixed, atlas, field, config, args)
    with ProcessSampler() as warp_sampler:
        tic = time.perf_counter()
        wrec = warp_files(
            field, atlas, warped, chunk_size=args.chunk_size, workers=args.workers, scheduler=CLUSTER
        )
        warp_s = time.perf_counter() - tic
    deep: dict[str, Any] = {}
    if args.deep_stages:  # the same registration one cascade stage deeper: a field 8x larger, many chunks
        deep_field = work / f"field_deep_{gib:g}gib.zarr"
        deep_config = config.model_copy(update={"n_stages": args.deep_stages})
        drec, deep_s, deep_figures = _measured_register(fixed, atlas, deep_field, deep_config, args)
        deep = {
            "deep_stages": args.deep_stages,
            "register_deep_s": deep_s,
            "deep_field_shape": list(drec.grid_shape),
            "register_deep_chunks": drec.chunks,
            "register_deep": deep_figures,
        }
        for p in (deep_field, deep_field.with_name(deep_field.name + ".run")):
            shutil.rmtree(p, ignore_errors=True)
    row = {
        "run": args.run_id,
        "size_gib_requested": gib,
        "shape": list(big.shape),
        "voxels": voxels,
        "spacing_um": [float(s) for s in big.spacing],
        "disk_gib": _store_gib(fixed),
        "warped_disk_gib": _store_gib(warped),
        "prepare_s": prepare_s,
        "register_s": register_s,
        "warp_s": warp_s,
        "field_shape": list(record.grid_shape),
        "register_chunks": record.chunks,
        "warp_chunks": wrec.chunks,
        "register": register_figures,
        "warp": {**warp_sampler.summary(), **_worker_times(wrec.out.with_name(wrec.out.name + ".run"))},
        **deep,
    }
    if args.cleanup:
        for path in (fixed, field, warped):
            for p in (path, path.with_name(path.name + ".run")):
                shutil.rmtree(p, ignore_errors=True)
    return row


def _relative(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """Ratios of a larger row to a smaller one of the same run, against the targets (wall time within 1.3×
    linear in voxels, worker peak memory within ±20 %, worker peak < 2 GiB, forward share ≥ 70 %)."""
    ratio = large["voxels"] / small["voxels"]
    steps = _steps(small, large)
    wall = {s: large[f"{s}_s"] / small[f"{s}_s"] for s in steps}
    cpu = {
        s: (large[s].get("worker_cpu_s", 0.0) + large[s].get("client_cpu_s", 0.0))
        / max(small[s].get("worker_cpu_s", 0.0) + small[s].get("client_cpu_s", 0.0), 1e-9)
        for s in steps
    }
    peak = {s: large[s]["max_worker_peak_gib"] / max(small[s]["max_worker_peak_gib"], 1e-9) for s in steps}
    worst_peak = max(r[s]["max_worker_peak_gib"] for r in (small, large) for s in steps)
    shares = [r["register"]["forward_share"] for r in (small, large)]
    deep = {}
    if "register_deep" in steps:
        deep_shares = [r["register_deep"]["forward_share"] for r in (small, large)]
        deep = {
            "deep_stages": large["deep_stages"],
            "forward_share_deep": deep_shares,
            "forward_share_deep_met": all(s is not None and s >= 0.7 for s in deep_shares),
        }
    return {
        "sizes_gib": [small["size_gib_requested"], large["size_gib_requested"]],
        "disk_gib": [small["disk_gib"], large["disk_gib"]],
        "voxel_ratio": ratio,
        "wall_ratio": wall,
        "linear_limit": 1.3 * ratio,
        "wall_met": {s: wall[s] <= 1.3 * ratio for s in steps},
        "cpu_ratio": cpu,
        "worker_peak_ratio": peak,
        "worker_peak_met": {s: abs(peak[s] - 1.0) <= 0.2 for s in steps} | {"under_2_gib": worst_peak < 2.0},
        "forward_share": shares,
        "forward_share_met": all(s is not None and s >= 0.7 for s in shares),
        **deep,
    }


def _steps(*rows: dict[str, Any]) -> tuple[str, ...]:
    """The steps every row measured: register and warp, and the deeper register where it was run."""
    return ("register", "warp") + (("register_deep",) if all("register_deep" in r for r in rows) else ())


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every run id: each larger row relative to that run's smallest row (rows of other runs, kept by
    ``--append``, are never compared with each other)."""
    out = []
    for run in dict.fromkeys(r.get("run") for r in rows):
        same = sorted((r for r in rows if r.get("run") == run), key=lambda r: r["voxels"])
        out.extend({"run": run, **_relative(same[0], row)} for row in same[1:])
    return out


def _config(work: Path) -> InferenceConfig:
    """The default model if it exists, else a randomly initialised one of the default architecture."""
    if DEFAULT_WEIGHTS.is_file():
        return InferenceConfig(device="auto")
    path = work / "random_default_architecture.pt"
    if not path.is_file():
        save_checkpoint(path, PatchMorph(ModelConfig()))
    return InferenceConfig(weights=str(path), device="auto")


def _step_name(row: dict[str, Any], step: str) -> str:
    """A step's label in the table (``reg 4st``: the deeper registration, with its stage count)."""
    return f"reg {row['deep_stages']}st" if step == "register_deep" else step


def table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of the results (forward share for register, of all worker time and of the network
    stages' without the polish; warp has no network)."""
    head = (
        f"{'disk':>7} {'voxels':>14} {'step':>8} {'wall s':>8} {'s/Gvox':>8} {'CPU s':>8} {'worker GiB':>10} "
        f"{'client GiB':>10} {'read GiB':>9} {'write GiB':>9} {'fwd %':>6} {'net %':>6} {'polish s':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        for step in _steps(r):
            m = r[step]
            wall = r[f"{step}_s"]
            share = "-" if m["forward_share"] is None else f"{100 * m['forward_share']:.1f}"
            net = "-" if m.get("forward_share_network") is None else f"{100 * m['forward_share_network']:.1f}"
            cpu = m.get("worker_cpu_s", 0.0) + m.get("client_cpu_s", 0.0)
            lines.append(
                f"{r['disk_gib']:>6.2f}G {r['voxels']:>14,d} {_step_name(r, step):>8} {wall:>8.1f} {wall / r['voxels'] * 1e9:>8.1f} {cpu:>8.1f} "
                f"{m['max_worker_peak_gib']:>10.2f} {m['client_scheduler_peak_gib']:>10.2f} {m['read_gib']:>9.2f} "
                f"{m['written_gib']:>9.2f} {share:>6} {net:>6} {m.get('polish_s', 0.0):>8.1f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[1.0, 8.0], help="volume sizes in GiB (uint16)"
    )
    parser.add_argument("--work", default="/work/scale-work", help="scratch folder for the volumes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument(
        "--deep-stages",
        type=int,
        default=4,
        help="also register (only) with this many cascade stages, a field 8x larger per extra stage "
        "(0: skip); the default model has 3",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="override one inference setting, key=value (YAML value), e.g. overlap=2.0 (default: none)",
    )
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--append", action="store_true", help="add the new sizes to the rows already in --out"
    )
    parser.add_argument(
        "--cleanup", action="store_true", help="delete each size's volume, field and warped image after it"
    )
    args = parser.parse_args()
    args.run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    array, grid, _ = open_input(BRAIN, voxel_size=(50.0, 40.0, 40.0), unit="micrometer", orientation="psl")
    source = np.asarray(array.compute())
    atlas = work / "atlas_100um.zarr"
    if not atlas.exists():
        convert(ATLAS, atlas)
    settings = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    config = _config(work).model_copy(update=settings)
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if args.append and out.is_file() else []
    command = "benchmarks/scale.py " + " ".join(sys.argv[1:])
    for gib in args.sizes:
        rows.append({**bench_size(gib, source, grid, atlas, config, args), "command": command, "settings": settings})
        rows.sort(key=lambda r: (str(r.get("run")), r["voxels"]))
        result = {
            "host": {"cpus": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / GIB},
            "workers": args.workers,
            "weights": str(config.weights or DEFAULT_WEIGHTS),
            "rows": rows,
            "summary": summarize(rows),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # after every size, so a long run keeps what it measured
        print(table(rows), flush=True)
    print(json.dumps(summarize(rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
