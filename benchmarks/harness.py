"""What every benchmark shares: paths, timed commands, the PatchMorph command line per pair, the ANTs peer,
paired statistics and JSON records.

The benchmarks measure what a user runs: each PatchMorph step is the ``patchmorph`` command (``convert``,
``register``, ``warp``, ``evaluate``) started as a process from an empty folder, timed from outside
(wall seconds and the CPU seconds of the process and its children). ANTs runs in its own virtual
environment (``.venv-ants``: antspyx pins its own NumPy) through ``benchmarks/ants_register.py``, right
after ours on the same pair, so that both see the same machine load; a ratio of the two is the figure to
read on a shared machine, not either time alone.

Scripts import this module flat (``import harness``): they run as ``python benchmarks/<name>.py``, which puts
``benchmarks/`` on ``sys.path``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("benchmarks.harness")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
"""The team's read-only real data (benchmarks may read it; tests may not)."""
EXAMPLES = REPO / "examples"
OUT = REPO / "benchmarks" / "out"
"""Scratch outputs of the benchmarks (git-ignored)."""
RESULTS = REPO / "benchmarks" / "results"
"""The JSON results the docs are generated from (committed)."""
ANTS_PYTHON = REPO / ".venv-ants" / "bin" / "python"
ANTS_SCRIPT = REPO / "benchmarks" / "ants_register.py"
PATCHMORPH = Path(sys.executable).with_name("patchmorph")
"""The ``patchmorph`` script of the environment running the benchmark."""
COMMAND_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


# -- where and how ------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """Where and on what the numbers were measured: CPUs, memory, platform, the load average at the call and
    the code (the repository's commit, and whether files differed from it)."""
    import psutil

    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "code": code_version(),
    }


def code_version() -> dict[str, Any]:
    """The repository's commit and whether tracked files differ from it (None values outside a git clone)."""

    def git(*args: str) -> str | None:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "modified": None if status is None else bool(status)}


def recorded_command() -> str:
    """The command line that runs the current benchmark again (from the repository root)."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return shlex.join([".venv/bin/python", str(shown), *sys.argv[1:]])


def empty_folder(path: Path) -> Path:
    """``path`` as a new empty folder (anything there before is deleted): every run starts from nothing."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


INPUTS_KEY = "inputs_key.txt"
"""File in a folder of prepared inputs: the :func:`inputs_key` they were made under."""


def inputs_key(settings: Any, sources: Sequence[Any]) -> str:
    """What prepared inputs depend on, hashed (SHA-256 hex): ``repr(settings)`` and the source text of each of
    ``sources`` (a module: its whole file; a function: its own source). Inputs made under another key are made
    again (:func:`prepared`), never reused."""
    parts = [repr(settings)]
    for source in sources:
        parts.append(Path(source.__file__).read_text() if isinstance(source, types.ModuleType) else inspect.getsource(source))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def prepared(folder: Path, key: str, paths: Iterable[Path]) -> bool:
    """True when every one of ``paths`` exists and ``folder`` was prepared under ``key`` (:func:`mark_prepared`).
    Otherwise the folder's key is removed, so that inputs interrupted while being made again are never taken
    for prepared."""
    record = folder / INPUTS_KEY
    if record.is_file() and record.read_text() == key and all(Path(p).exists() for p in paths):
        return True
    record.unlink(missing_ok=True)
    return False


def mark_prepared(folder: Path, key: str) -> None:
    """Record that ``folder``'s inputs were made under ``key`` (call after the last of them is written)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INPUTS_KEY).write_text(key)


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` as indented JSON, through a temporary file so that a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    """NumPy scalars and arrays, and paths, as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# -- timed commands -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timed:
    """Wall seconds of one command and the CPU seconds (user + system) of its process and children."""

    seconds: float
    cpu_seconds: float


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(args: Sequence[str | Path], log: Path, nice: int = 0) -> Timed:
    """Run one command to completion, its output appended to ``log``; time it from outside.

    Raises:
        RuntimeError: the command exited non-zero (the message names it and ends with its last log lines).
    """
    argv = [str(a) for a in args]
    if nice:
        argv = ["nice", "-n", str(nice), *argv]
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **COMMAND_ENV}
    with log.open("a") as handle:
        handle.write(f"$ {shlex.join(argv)}\n")
        handle.flush()
        cpu, start = _children_cpu(), time.perf_counter()
        code = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False).returncode
        timed = Timed(time.perf_counter() - start, _children_cpu() - cpu)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{shlex.join(argv[:3])} ... exited with {code}; last lines of {log}:\n{tail}")
    return timed


def add_run_options(parser: argparse.ArgumentParser, out: Path) -> None:
    """The options every benchmark's ``run`` has: ``--nice`` (of ours and the peer alike) and ``--out``."""
    parser.add_argument("--nice", type=int, default=0, help="nice level of every command (ours and ANTs alike)")
    parser.add_argument("--out", type=Path, default=out, help="results JSON (default: %(default)s)")


@functools.cache
def supports(command: str, option: str) -> bool:
    """Whether ``patchmorph COMMAND --help`` lists ``option`` (an option some versions of the command lack)."""
    done = subprocess.run([str(PATCHMORPH), command, "--help"], capture_output=True, text=True, check=False)
    return option in done.stdout


def patchmorph(*args: str | Path) -> list[str]:
    """The argument vector of one ``patchmorph`` command."""
    return [str(PATCHMORPH), *(str(a) for a in args)]


# -- PatchMorph through the command line, one pair -----------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One input as a user holds it, and the ``patchmorph convert`` options it needs (voxel size, ...)."""

    path: Path
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class PairSources:
    """The four inputs of one benchmark pair (the fixed labels score the result and mask the tissue)."""

    fixed: Source
    moving: Source
    fixed_labels: Source
    moving_labels: Source


@dataclass
class CommandRun:
    """Files and timings of one pair through ``convert / register / warp / evaluate``."""

    folder: Path
    times: dict[str, Timed] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        """A file of this run's folder (``fixed.ome.zarr``, ``field.ome.zarr``, ...)."""
        return self.folder / name

    def timings(self) -> dict[str, float]:
        """``{step}_seconds`` and ``{step}_cpu_seconds`` of every timed step."""
        out: dict[str, float] = {}
        for step, timed in self.times.items():
            out[f"{step}_seconds"] = timed.seconds
            out[f"{step}_cpu_seconds"] = timed.cpu_seconds
        return out


def run_patchmorph_pair(
    sources: PairSources,
    folder: Path,
    register_options: Sequence[str] = (),
    label_set: str = "all",
    nice: int = 0,
) -> CommandRun:
    """A pair as a user runs it, from an empty ``folder``: convert the four inputs to OME-Zarr, register,
    warp the moving labels onto the fixed grid, and evaluate (Dice over ``label_set``, folds inside the
    fixed labels > 0, written to ``evaluate.json``). Every command is timed; the log is ``commands.log``.
    """
    run = CommandRun(empty_folder(folder))
    log = run.path("commands.log")
    convert = Timed(0.0, 0.0)
    for role, source in (
        ("fixed", sources.fixed),
        ("moving", sources.moving),
        ("fixed_labels", sources.fixed_labels),
        ("moving_labels", sources.moving_labels),
    ):
        labels = ("--labels",) if role.endswith("labels") else ()
        step = run_timed(
            patchmorph("convert", source.path, run.path(f"{role}.ome.zarr"), *labels, *source.options),
            log,
            nice,
        )
        convert = Timed(convert.seconds + step.seconds, convert.cpu_seconds + step.cpu_seconds)
    run.times["convert"] = convert
    run.times["register"] = run_timed(
        patchmorph(
            "register", "--fixed", run.path("fixed.ome.zarr"), "--moving", run.path("moving.ome.zarr"),
            "--out", run.path("field.ome.zarr"), *register_options,
        ),
        log,
        nice,
    )  # fmt: skip
    run.times["warp"] = run_timed(
        patchmorph(
            "warp", "--field", run.path("field.ome.zarr"), "--moving", run.path("moving_labels.ome.zarr"),
            "--out", run.path("warped_labels.ome.zarr"), "--labels",
        ),
        log,
        nice,
    )  # fmt: skip
    run.times["evaluate"] = run_timed(
        patchmorph(
            "evaluate", "--labels-a", run.path("fixed_labels.ome.zarr"), "--labels-b",
            run.path("warped_labels.ome.zarr"), "--label-set", label_set, "--field", run.path("field.ome.zarr"),
            "--mask", run.path("fixed_labels.ome.zarr"), "--out", run.path("evaluate.json"),
        ),
        log,
        nice,
    )  # fmt: skip
    return run


def read_evaluation(run: CommandRun) -> dict[str, Any]:
    """``patchmorph evaluate``'s JSON of a pair run (``dice``, ``mean_dice``, ``folding_percent`` inside the
    fixed labels, det J statistics)."""
    return json.loads(run.path("evaluate.json").read_text())


# -- ANTs -----------------------------------------------------------------------------------------------------
def run_ants_pair(
    fixed: Path,
    moving: Path,
    moving_labels: Path | None,
    folder: Path,
    transform: str = "SyN",
    fixed_labels: Path | None = None,
    write_field: bool = False,
    fixed_in_moving: bool = False,
    threads: int = 2,
    nice: int = 0,
) -> dict[str, Any]:
    """Register one NIfTI pair with ANTs (``type_of_transform = transform``, antspyx defaults otherwise) in
    its own venv, from an empty ``folder``.

    Returns the record of ``ants_register.py`` (registration wall and CPU seconds of ``ants.registration``
    alone, folds) plus ``process_seconds`` / ``process_cpu_seconds`` of the whole process (imports, reading,
    warping the labels, writing). In ``folder``: the warped ``moving_labels`` (``warped_labels.nii.gz``), with
    ``write_field`` the composed fixed→moving displacement (``field.nii.gz``, ITK convention), with
    ``fixed_in_moving`` the fixed image on the moving grid (``fixed_in_moving.nii.gz``).
    """
    if not ANTS_PYTHON.is_file():
        raise RuntimeError(
            f"{ANTS_PYTHON} is missing: create ANTs' venv with "
            "'python3.11 -m venv .venv-ants && .venv-ants/bin/pip install antspyx nibabel'."
        )
    out = empty_folder(folder)
    args: list[str | Path] = [
        ANTS_PYTHON, ANTS_SCRIPT, "--fixed", fixed, "--moving", moving, "--transform", transform,
        "--threads", str(threads), "--out-json", out / "record.json",
    ]  # fmt: skip
    if moving_labels is not None:
        args += ["--moving-labels", moving_labels, "--out-labels", out / "warped_labels.nii.gz"]
    if fixed_labels is not None:
        args += ["--fixed-labels", fixed_labels]
    if write_field:
        args += ["--out-field", out / "field.nii.gz"]
    if fixed_in_moving:
        args += ["--out-fixed-in-moving", out / "fixed_in_moving.nii.gz"]
    timed = run_timed(args, out / "ants.log", nice)
    record = json.loads((out / "record.json").read_text())
    record.update(process_seconds=timed.seconds, process_cpu_seconds=timed.cpu_seconds)
    return record


# -- images ----------------------------------------------------------------------------------------------------------
def tissue_mask(image: np.ndarray, sigma_vox: float = 2.0, closing_vox: int = 3) -> np.ndarray:
    """The tissue of a microscopy brain as one solid region: Otsu's threshold on the log of the smoothed image
    (a few bright specks do not lift it above dim tissue), a closing, holes filled, the largest component.

    Args:
        image: ``(Z, Y, X)`` intensities (background dark).
        sigma_vox: Gaussian smoothing before the threshold, voxels.
        closing_vox: iterations of the binary closing (bridges dark tracts at the surface).

    Returns:
        ``(Z, Y, X)`` bool mask.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    log = np.log1p(np.maximum(ndimage.gaussian_filter(np.asarray(image, np.float32), sigma_vox), 0.0))
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(log > threshold_otsu(log), iterations=closing_vox))
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    return components == np.argmax(np.bincount(components.ravel())[1:]) + 1


# -- statistics -------------------------------------------------------------------------------------------------
def mean_and_sem(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, standard deviation and standard error of the mean (n - 1 in the deviation) of ``values``."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, "mean": float("nan"), "sd": float("nan"), "sem": float("nan")}
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"n": int(arr.size), "mean": float(arr.mean()), "sd": sd, "sem": sd / float(np.sqrt(arr.size))}


def paired_difference(ours: Mapping[str, float], peer: Mapping[str, float]) -> dict[str, Any]:
    """Per-item difference ``ours - peer`` over the items both have, with its mean and standard error.

    The items of a benchmark (ordered pairs of a few subjects) share subjects, so they are not independent;
    the standard error is the plain one over items and reads as a lower bound of the uncertainty.
    """
    common = sorted(set(ours) & set(peer))
    diffs = {k: float(ours[k]) - float(peer[k]) for k in common}
    stats = mean_and_sem(list(diffs.values()))
    wins = sum(d > 0 for d in diffs.values())
    return {"per_item": diffs, **stats, "better": wins, "worse": sum(d < 0 for d in diffs.values())}
