"""Scale benchmark: ``patchmorph register`` and ``warp`` on a large brain, with the field tied to the image.

The fixed image is the real STP mouse brain (``examples/mouse_stp_brainreg``, 50×40×40 µm, ``psl``)
upsampled trilinearly in world space, with imaging noise, to a stated size of uint16 OME-Zarr (streamed
block by block); the moving image is the Allen CCFv3 template (100 µm), converted with its orientation. Each
run (``--run SIZE:FACTOR``: SIZE GiB in memory, the field spacing FACTOR × the fixed image's largest voxel
edge, so the field grows with the image) times, as a user runs them on a local Dask cluster
(``configs/cluster/local.yaml``: 2 GiB per worker):

* ``patchmorph register --field-spacing ...`` (atlas → brain) and ``patchmorph warp`` (the atlas onto the
  brain's full grid: the output is as large as the brain);
* with ``--no-warp``, register only (a series whose warp is not timed);
* with ``--convert``, ``patchmorph convert`` of the brain (OME-Zarr → OME-Zarr: read once, pyramid written).

Per command: wall time, CPU seconds of every process, peak resident memory per worker and of the command's
own process (client + scheduler), bytes read and written by all processes (psutil I/O counters: page-cache
hits count as reads) — all sampled every 0.2 s. Per registration pass (from the run folder's block records):
field voxels, forward-pass, patch-sampling, accumulation, polish and chunk seconds, and their shares of the
worker time. Runs with the same FACTOR form a scaling series; the summary compares each with the series'
smallest against the targets of issue 23 (peak per worker <= 2 GiB and within 20 %, wall time within 1.3×
of linear in field voxels, data read per field voxel flat, forward passes >= 60 % of worker time).

Usage (prints a table, writes ``benchmarks/results/scale.json``; ``benchmarks/report.py`` makes
``docs/scale.md`` with the terabyte projection)::

    nice -n 5 .venv/bin/python benchmarks/scale.py --run 0.25:4 --run 2:4 --run 16:8 --convert
    nice -n 5 .venv/bin/python benchmarks/scale.py --run 2:4 --out /tmp/scale_2gib.json --set overlap=2.0

The scratch volumes go to ``--work`` (default ``benchmarks/out/scale``; a 16 GiB run needs ~20 GB free).
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import dask.array as da
import harness
import numpy as np
import psutil
import yaml
from scipy import ndimage

from patchmorph_core.spatial import Grid

CLUSTER = harness.REPO / "configs" / "cluster" / "local.yaml"
RESULTS_JSON = harness.RESULTS / "scale.json"
GIB = 1024**3
NOISE_STD = 20.0
"""Gaussian noise (uint16 grey values) added to the upsampled brain: real STP data is noisy, and a smooth
upsampled volume would compress to a small fraction of its size on disk."""

TARGETS = {"worker_peak_gib": 2.0, "worker_peak_spread": 0.2, "wall_vs_linear": 1.3, "forward_share": 0.6}
"""Issue 23's targets for a scaling series."""

PROJECTION = {
    "volume_tb": 1.0,
    "extent_mm": [20.0, 25.0, 30.0],
    "voxel_um": [50.0, 1.4, 1.4],
    "field_spacings_um": [50.0, 20.0],
    "workers": [8, 32, 128],
    "cores_per_worker": 4,
    "storage_gb_per_s": [1.0, 5.0, 20.0],
}
"""The terabyte plan of issue 23 (docs/scale.md): a marmoset STP brain of about 30×25×20 mm at 1.4×1.4×50 µm
(planes of 50 µm), 1 TB; fields at 50 and 20 µm; SLURM workers of ``cores_per_worker`` cores
(``configs/cluster/slurm.yaml``); storage read/write bandwidths in GB/s."""


# -- measuring commands ---------------------------------------------------------------------------------------
class ProcessSampler:
    """Samples RSS, CPU times and I/O counters of the processes this one starts, every ``interval`` seconds.

    Kinds: ``command`` (a process this one started: the command, its client and scheduler), ``worker`` (Dask
    worker processes, started through multiprocessing's spawn), ``other``. This process itself (the
    benchmark, idle while a command runs) is not counted.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak: dict[int, int] = {}
        self.peak_at: dict[int, float] = {}  # wall-clock time (epoch s) of each process's peak
        self.kind: dict[int, str] = {}
        self.first: dict[int, tuple[int, int, float]] = {}
        self.last: dict[int, tuple[int, int, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in me.children(recursive=True):
            try:
                rss = proc.memory_info().rss
                io = proc.io_counters()
                times = proc.cpu_times()
                cmd = " ".join(proc.cmdline())
                parent = proc.ppid()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            pid = proc.pid
            if rss > self.peak.get(pid, 0):
                self.peak[pid], self.peak_at[pid] = rss, time.time()
            if "spawn_main" in cmd:
                self.kind[pid] = "worker"
            elif parent == me.pid:
                self.kind[pid] = "command"
            else:
                self.kind.setdefault(pid, "other")
            sample = (io.read_chars, io.write_chars, times.user + times.system)
            self.first.setdefault(pid, sample)
            self.last[pid] = sample

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
        """Peak RSS per kind (GiB), CPU seconds per kind and bytes read/written by all sampled processes.

        CPU and I/O are counted from each process's first sample: the few hundred milliseconds before a
        process is first seen (interpreter start) are missed.
        """
        worker_pids = sorted((p for p, k in self.kind.items() if k == "worker"), key=lambda p: -self.peak[p])
        workers = [self.peak[p] / GIB for p in worker_pids]
        command = [self.peak[p] / GIB for p, k in self.kind.items() if k == "command"]

        def delta(index: int, kind: str | None = None) -> float:
            return sum(
                self.last[p][index] - self.first[p][index] for p in self.last if kind is None or self.kind[p] == kind
            )

        return {
            "worker_peak_gib": workers,
            "max_worker_peak_gib": max(workers, default=0.0),
            "max_worker_peak_at": self.peak_at[worker_pids[0]] if worker_pids else None,
            "command_peak_gib": max(command, default=0.0),
            "read_gib": delta(0) / GIB,
            "written_gib": delta(1) / GIB,
            "worker_cpu_s": delta(2, "worker"),
            "command_cpu_s": delta(2, "command"),
            "cpu_s": delta(2),
        }


def measured(args: list[str], log: Path, run: Path | None = None) -> dict[str, Any]:
    """Run one command under the sampler: its wall seconds and the sampler's figures; with the command's run
    folder ``run`` (records kept), also the pass during which the busiest worker peaked (:func:`pass_at`)."""
    with ProcessSampler() as sampler:
        timed = harness.run_timed(args, log)
    figures = sampler.summary()
    at = figures.pop("max_worker_peak_at")
    if run is not None:
        figures["worker_peak_pass"] = pass_at(run, at)
    return {"wall_s": timed.seconds, **figures}


# -- the volumes ---------------------------------------------------------------------------------------------
def _upsample_block(
    source: np.ndarray, matrix: np.ndarray, out_dtype: np.dtype, block_info: dict | None = None
) -> np.ndarray:
    """Trilinear samples of ``source`` for one output block; ``matrix`` maps output → source index (4×4)."""
    info = block_info[None]  # type: ignore[index]
    start = np.array([loc[0] for loc in info["array-location"]], dtype=np.float64)
    shape = tuple(int(b - a) for a, b in info["array-location"])
    offset = matrix[:3, 3] + matrix[:3, :3] @ start
    out = ndimage.affine_transform(source, matrix[:3, :3], offset=offset, output_shape=shape, order=1, mode="nearest")
    rng = np.random.default_rng([int(v) for v in start])  # imaging noise, seeded by the block's position
    out += rng.normal(0.0, NOISE_STD, size=shape).astype(np.float32)
    return np.clip(np.rint(out), 0, np.iinfo(out_dtype).max).astype(out_dtype)


def make_volume(source: np.ndarray, grid: Grid, gib: float, path: Path) -> Grid:
    """Write ``source`` upsampled in world space to about ``gib`` GiB (in memory) of uint16 OME-Zarr at
    ``path`` (kept and reused when it exists); its grid."""
    from pipeline.ngff import read_image, write_image

    factor = (gib * GIB / 2.0 / source.size) ** (1.0 / 3.0)
    big = grid.resampled(grid.spacing / factor)
    if path.exists():
        return read_image(path).grid
    lazy = da.map_blocks(
        _upsample_block,
        source=source.astype(np.float32),
        matrix=grid.inverse_affine @ big.affine,
        out_dtype=np.dtype(np.uint16),
        dtype=np.uint16,
        chunks=tuple((128,) * (n // 128) + ((n % 128,) if n % 128 else ()) for n in big.shape),
        meta=np.empty((0, 0, 0), np.uint16),
    )
    write_image(path, lazy, big, name=path.stem)
    return big


def store_gib(path: Path) -> float:
    """Bytes on disk of every file under ``path``, in GiB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GIB


# -- per-pass figures ------------------------------------------------------------------------------------------
PASS_FIGURES = ("forward_seconds", "sampling_seconds", "accumulate_seconds", "polish_seconds")


def pass_figures(run: Path) -> list[dict[str, Any]]:
    """Worker seconds of every pass of a registration, from its run folder's block and chunk records.

    Each row: ``name``, the block figures summed over blocks (forward passes, patch sampling, accumulation,
    polish), ``block_s`` (all block task time), ``chunk_s`` (chunk task time) and ``voxels`` (field voxels
    the pass's chunks covered, where recorded), ``spilled_bytes`` (what its block tasks handed to its chunk tasks
    through the run folder: ``spilled.json``, 0 when nothing went through it). No rows when the command left no
    run folder.
    """
    rows: list[dict[str, Any]] = []
    for stage in _pass_folders(run):
        blocks = [json.loads(p.read_text()) for p in (stage / "blocks").glob("*.json")]
        chunks = [json.loads(p.read_text()) for p in (stage / "done").glob("*.json")]
        row: dict[str, Any] = {"name": stage.name}
        for key in PASS_FIGURES:
            row[key.replace("_seconds", "_s")] = sum(b.get(key, 0.0) for b in blocks)
        row["block_s"] = sum(b.get("seconds", 0.0) for b in blocks)
        row["chunk_s"] = sum(c.get("seconds", 0.0) for c in chunks)
        row["voxels"] = sum(c.get("voxels", 0) for c in chunks) or sum(b.get("voxels", 0) for b in blocks)
        spilled = stage / "spilled.json"
        row["spilled_bytes"] = json.loads(spilled.read_text())["bytes"] if spilled.is_file() else 0
        rows.append(row)
    return rows


def _pass_folders(run: Path) -> list[Path]:
    """The record folders of a run's passes, in the order they ran (network stages, then the polish)."""
    folders = [p for p in run.iterdir() if p.is_dir() and (p / "blocks").is_dir()] if run.is_dir() else []
    return sorted(folders, key=lambda p: (p.name.startswith("polish"), p.name))


def pass_at(run: Path, at: float | None) -> str | None:
    """The pass of a registration that was running at wall-clock time ``at`` (epoch s), from the modification
    times of its run folder's records (a pass ends with its last record): the first pass that ended at or after
    ``at``, ``"after the passes"`` (the quality block, the output's metadata) when all had ended before it."""
    if at is None:
        return None
    folders = _pass_folders(run)
    for stage in folders:
        ends = [f.stat().st_mtime for sub in ("blocks", "done") for f in (stage / sub).glob("*.json")]
        if ends and max(ends) >= at:
            return stage.name
    return "after the passes" if folders else None


def shares(passes: list[dict[str, Any]]) -> dict[str, float | None]:
    """Shares of all worker task time (blocks and chunks of every pass): forward passes, patch sampling,
    accumulation, polish and the rest."""
    total = sum(p["block_s"] + p["chunk_s"] for p in passes)
    if total <= 0:
        return {"forward": None, "sampling": None, "accumulate": None, "polish": None, "other": None}
    parts = {k: sum(p[f"{k}_s"] for p in passes) / total for k in ("forward", "sampling", "accumulate", "polish")}
    return {**parts, "other": 1.0 - sum(parts.values())}


# -- one run -----------------------------------------------------------------------------------------------------
def bench_run(gib: float, factor: float, inputs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Prepare (or reuse) the brain at ``gib``, then convert / register / warp it; the row of figures."""
    from pipeline.ngff import read_field

    work = Path(args.work)
    volume = work / f"brain_{gib:g}gib.zarr"
    tic = time.perf_counter()
    reused = volume.exists()
    grid = make_volume(inputs["source"], inputs["grid"], gib, volume)
    prepare_s = None if reused else time.perf_counter() - tic
    spacing_um = float(factor * grid.with_unit("micrometer").spacing.max())
    folder = harness.empty_folder(work / f"run_{gib:g}gib_x{factor:g}")
    log = folder / "commands.log"
    cluster = ["--scheduler", str(CLUSTER)]
    steps: dict[str, dict[str, Any]] = {}
    if args.convert:
        steps["convert"] = measured(harness.patchmorph("convert", volume, folder / "brain.ome.zarr"), log)
        shutil.rmtree(folder / "brain.ome.zarr", ignore_errors=True)
    keep = ["--keep-run"] if harness.supports("register", "--keep-run") else []  # the per-pass records
    register = harness.patchmorph(
        "register", "--fixed", volume, "--moving", inputs["atlas"], "--out", folder / "field.ome.zarr",
        "--field-spacing", f"{spacing_um:.6g}um", *cluster, *keep, *args.register_options, "--accept-quality",
    )  # fmt: skip
    # --accept-quality: a field failing its quality thresholds is measured and its block reported, not lost
    steps["register"] = measured(register, log, folder / "field.ome.zarr.run")
    _, field_grid, meta = read_field(folder / "field.ome.zarr")
    quality = meta.get("quality", {})
    passes = pass_figures(folder / "field.ome.zarr.run")
    steps["register"].update(passes=passes, shares=shares(passes))
    if not args.no_warp:
        warp = harness.patchmorph(
            "warp", "--field", folder / "field.ome.zarr", "--moving", inputs["atlas"], "--out", folder / "warped.ome.zarr",
            *cluster,
        )  # fmt: skip
        steps["warp"] = measured(warp, log)
    row = {
        "size_gib_requested": gib,
        "field_factor": factor,
        "shape": list(grid.shape),
        "voxels": int(np.prod(grid.shape)),
        "bytes": int(np.prod(grid.shape)) * 2,
        "spacing_um": grid.with_unit("micrometer").spacing.round(4).tolist(),
        "disk_gib": store_gib(volume),
        "warped_disk_gib": None if args.no_warp else store_gib(folder / "warped.ome.zarr"),
        "prepare_s": prepare_s,
        "field_spacing_um": spacing_um,
        "field_shape": list(field_grid.shape),
        "field_voxels": int(np.prod(field_grid.shape)),
        "quality": {k: quality.get(k) for k in ("passed", "failures", "folding", "inverse")},
        **steps,
    }
    if args.cleanup:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(volume, ignore_errors=True)
    return row


# -- summaries ----------------------------------------------------------------------------------------------------
def relative(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """A larger run against the smallest of its series (same field factor), against issue 23's targets."""
    field_ratio = large["field_voxels"] / small["field_voxels"]
    voxel_ratio = large["voxels"] / small["voxels"]
    out: dict[str, Any] = {
        "sizes_gib": [small["size_gib_requested"], large["size_gib_requested"]],
        "field_factor": large["field_factor"],
        "voxel_ratio": voxel_ratio,
        "field_voxel_ratio": field_ratio,
    }
    for step, work_ratio in (("register", field_ratio), ("warp", voxel_ratio)):
        if step not in small or step not in large:  # --no-warp
            continue
        wall = large[step]["wall_s"] / small[step]["wall_s"]
        cpu = large[step]["cpu_s"] / max(small[step]["cpu_s"], 1e-9)
        peak = large[step]["max_worker_peak_gib"] / max(small[step]["max_worker_peak_gib"], 1e-9)
        read = (large[step]["read_gib"] / work_ratio) / max(small[step]["read_gib"], 1e-9)
        out[step] = {
            "wall_ratio": wall,
            "cpu_ratio": cpu,
            "wall_vs_linear": wall / work_ratio,
            "cpu_vs_linear": cpu / work_ratio,
            "worker_peak_ratio": peak,
            "read_per_unit_ratio": read,
            "met": {
                "wall_within_1.3x_linear": wall / work_ratio <= TARGETS["wall_vs_linear"],
                "worker_peak_within_20pct": abs(peak - 1.0) <= TARGETS["worker_peak_spread"],
                "worker_peak_under_2gib": max(small[step]["max_worker_peak_gib"], large[step]["max_worker_peak_gib"])
                <= TARGETS["worker_peak_gib"],
            },
        }
    forward = [r["register"]["shares"]["forward"] for r in (small, large)]
    out["register"]["forward_share"] = forward
    out["register"]["met"]["forward_share_60pct"] = all(f is not None and f >= TARGETS["forward_share"] for f in forward)
    return out


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every run of a series (same field factor) relative to the series' smallest."""
    out = []
    for factor in sorted({r["field_factor"] for r in rows}):
        series = sorted((r for r in rows if r["field_factor"] == factor), key=lambda r: r["voxels"])
        out.extend(relative(series[0], row) for row in series[1:])
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of the runs."""
    head = (
        f"{'GiB':>6} {'field':>12} {'step':>9} {'wall s':>8} {'CPU s':>8} {'worker GiB':>10} {'cmd GiB':>8} "
        f"{'read GiB':>9} {'write GiB':>9} {'fwd %':>6} {'polish %':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        for step in ("convert", "register", "warp"):
            if step not in r:
                continue
            m = r[step]
            share = m.get("shares", {})
            pct = {k: "-" if share.get(k) is None else f"{100 * share[k]:.1f}" for k in ("forward", "polish")}
            lines.append(
                f"{r['disk_gib']:>6.2f} {r['field_voxels']:>12,d} {step:>9} {m['wall_s']:>8.1f} {m['cpu_s']:>8.1f} "
                f"{m['max_worker_peak_gib']:>10.2f} {m['command_peak_gib']:>8.2f} {m['read_gib']:>9.2f} "
                f"{m['written_gib']:>9.2f} {pct['forward']:>6} {pct['polish']:>8}"
            )
    return "\n".join(lines)


def parse_run(text: str) -> tuple[float, float]:
    """``"2:4"`` → ``(2.0, 4.0)`` (GiB in memory, field factor)."""
    size, _, factor = text.partition(":")
    return float(size), float(factor or 4.0)


def main() -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", default=[], help="SIZE:FACTOR (GiB in memory : field factor)")
    parser.add_argument("--work", default=str(harness.OUT / "scale"), help="scratch folder for the volumes")
    parser.add_argument("--convert", action="store_true", help="also time 'patchmorph convert' of the brain")
    parser.add_argument("--set", action="append", default=[], help="inference setting key=value (a config YAML)")
    parser.add_argument("--no-warp", action="store_true", help="time register only (no 'patchmorph warp')")
    parser.add_argument("--cleanup", action="store_true", help="delete each run's volume and outputs after it")
    parser.add_argument("--out", type=Path, default=RESULTS_JSON, help="results JSON (default: %(default)s)")
    args = parser.parse_args()
    runs = [parse_run(r) for r in args.run] or [(0.25, 4.0), (2.0, 4.0)]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.register_options = []
    if args.set:
        config = work / "settings.yaml"
        config.write_text(yaml.safe_dump({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}))
        args.register_options = ["--config", str(config)]
    inputs = prepare_inputs(work)
    doc: dict[str, Any] = {
        "benchmark": "scale",
        "command": harness.recorded_command(),
        "machine": harness.machine(),
        "cluster": yaml.safe_load(CLUSTER.read_text()),
        "settings": args.set,
        "targets": TARGETS,
        "projection": PROJECTION,
        "rows": [],
    }
    for gib, factor in runs:
        doc["rows"].append(bench_run(gib, factor, inputs, args))
        doc["summary"] = summarize(doc["rows"])
        harness.write_json(args.out, doc)  # after every run: a long benchmark keeps what it measured
        print(table(doc["rows"]), flush=True)
    print(json.dumps(doc["summary"], indent=1))
    print(f"wrote {args.out}")


def prepare_inputs(work: Path) -> dict[str, Any]:
    """The real brain in memory with its grid, and the atlas template converted (once) with its orientation."""
    from pipeline.demo import ATLAS_ORIENTATION, BRAIN_ORIENTATION, BRAIN_VOXEL_SIZE_UM, read_tiff

    source = read_tiff(harness.EXAMPLES / "mouse_stp_brainreg" / "brain_50x40x40um_psl.tif")
    grid = Grid.from_orientation(source.shape, BRAIN_VOXEL_SIZE_UM, BRAIN_ORIENTATION, unit="micrometer")
    atlas = work / "atlas_100um.ome.zarr"
    if not atlas.exists():
        template = harness.EXAMPLES / "mouse_ccf" / "average_template_100.nrrd"
        harness.run_timed(harness.patchmorph("convert", template, atlas, "--orientation", ATLAS_ORIENTATION), work / "convert.log")
    return {"source": np.asarray(source), "grid": grid, "atlas": atlas}


if __name__ == "__main__":
    main()
