"""Accuracy benchmark: PatchMorph against ANTs SyN / SyNCC on synthetic images of real anatomy.

Data: the real FreeSurfer label maps of SynthSeg subjects 07-10 (``human_synthseg``; 01-06 are for
training). Each is skull-stripped (labels >= 500 dropped), downsampled to 2 mm (block mode), cropped to
the brain's bounding box plus :data:`MARGIN_VOX` voxels (world positions kept) and turned into an image by
:func:`patchmorph_core.synth.synthesize_image` with ONE intensity table for every subject (seeded
uniform draw per label id) plus blur (1 voxel), a smooth bias field (0.3) and noise (0.03), each subject
with its own seed. Every subject stays in its native world space (no prior alignment). Each ordered pair
(fixed, moving) of the 4 subjects (12 pairs) is registered, the moving labels are warped onto the fixed
grid (nearest / genericLabel) and scored against the fixed labels: Dice per structure over
:data:`~patchmorph_core.synth.STANDARD_FS_LABELS` and its mean, % of voxels with det J <= 0 of the
deformation, and registration wall time on this machine.

Sub-commands (run from the repository root with our venv's Python)::

    python benchmarks/accuracy.py prepare           # writes the synthetic NIfTI + OME-Zarr inputs
    python benchmarks/accuracy.py ants --transform SyNCC --pairs 07:08,08:09,09:10,10:07 \\
        --json benchmarks/results/ants_syncc.json   # one ANTs method on some pairs (slow: run once)
    python benchmarks/accuracy.py run               # PatchMorph + ANTs SyN on all 12 pairs, merges
                                                    # the SyNCC file, prints the table, writes JSON

ANTs runs in its own venv (``.venv-ants``, antspyx + nibabel) through ``benchmarks/ants_register.py``.
Intermediate files go to ``benchmarks/out/accuracy`` (git-ignored); results to ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from patchmorph_core.metrics import dice_per_label, folding_percent
from patchmorph_core.source import downsampled_grid
from patchmorph_core.spatial import Grid, grid_affine_from_ras, read_box, resample
from patchmorph_core.synth import (
    STANDARD_FS_LABELS,
    downsample_labels,
    random_intensities,
    skull_strip_mask,
    synthesize_image,
)

logger = logging.getLogger("benchmarks.accuracy")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "human_synthseg"
OUT = ROOT / "benchmarks" / "out" / "accuracy"
RESULTS = ROOT / "benchmarks" / "results"
ANTS_PYTHON = ROOT / ".venv-ants" / "bin" / "python"
SUBJECTS: tuple[str, ...] = ("07", "08", "09", "10")
FACTOR = 2
"""Downsampling of the 1 mm label maps: images are 2 mm."""
MARGIN_VOX = 6
"""Background margin (2 mm voxels) kept around the brain's bounding box."""
INTENSITY_SEED = 2026
"""Seed of the one intensity table (label id -> intensity) shared by all subjects."""
SYNTH = {"blur_sigma_vox": 1.0, "bias_strength": 0.3, "noise_std": 0.03}


# -- data ------------------------------------------------------------------------------------------------
def subject_paths(sid: str) -> dict[str, Path]:
    """Paths of one subject's prepared inputs (NIfTI for ANTs, OME-Zarr for PatchMorph)."""
    base = OUT / "data"
    return {
        "image_nii": base / f"image_{sid}.nii.gz",
        "labels_nii": base / f"labels_{sid}.nii.gz",
        "image_zarr": base / f"image_{sid}.ome.zarr",
        "labels_zarr": base / f"labels_{sid}.ome.zarr",
    }


def brain_crop(labels: np.ndarray, grid: Grid, margin: int) -> tuple[np.ndarray, Grid]:
    """Crop a ``(Z, Y, X)`` label map to its non-zero bounding box plus ``margin`` voxels (same world)."""
    nonzero = np.argwhere(labels > 0)
    start = np.maximum(nonzero.min(axis=0) - margin, 0)
    stop = np.minimum(nonzero.max(axis=0) + 1 + margin, labels.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    return labels[box], grid.crop(start, stop)


def make_subject(sid: str, table: dict[int, float]) -> tuple[np.ndarray, np.ndarray, Grid]:
    """Skull-stripped 2 mm labels, their synthetic image and grid for subject ``sid``."""
    from pipeline.importers import load_nifti

    labels, grid = load_nifti(DATA / f"training_seg_{sid}.nii.gz")
    labels = np.rint(labels).astype(np.int32)
    labels[~skull_strip_mask(labels)] = 0
    small = downsample_labels(labels, FACTOR)
    small_grid = downsampled_grid(grid, (FACTOR,) * 3, small.shape)
    small, small_grid = brain_crop(small, small_grid, MARGIN_VOX)
    image = synthesize_image(small, np.random.default_rng(int(sid)), table, **SYNTH)
    return small, image, small_grid


def save_nifti(path: Path, array: np.ndarray, grid: Grid) -> None:
    """Write a ``(Z, Y, X)`` array on ``grid`` (millimeter) as NIfTI, inverse of ``load_nifti``.

    ``grid_affine_from_ras`` reverses the index and world component order ((i, j, k) <-> (k, j, i),
    (R, A, S) <-> (S, A, R)); the reversal is its own inverse, so it also maps our affine back to
    the NIfTI one, and the file array is ours with its axes reversed.
    """
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), grid_affine_from_ras(grid.affine))
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def prepare(overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Write every subject's synthetic image and labels (NIfTI and OME-Zarr); return shapes/spacings."""
    from pipeline.importers import load_nifti

    table = random_intensities(range(1, 500), np.random.default_rng(INTENSITY_SEED))
    info: dict[str, dict[str, Any]] = {}
    for sid in SUBJECTS:
        paths = subject_paths(sid)
        nifti_missing = not (paths["image_nii"].exists() and paths["labels_nii"].exists())
        zarr_missing = not (paths["image_zarr"].exists() and paths["labels_zarr"].exists())
        if overwrite or nifti_missing or zarr_missing:
            labels, image, grid = make_subject(sid, table)
            if overwrite or nifti_missing:
                save_nifti(paths["image_nii"], image, grid)
                save_nifti(paths["labels_nii"], labels, grid)
                back, back_grid = load_nifti(paths["labels_nii"])
                if not (np.array_equal(back, labels) and np.allclose(back_grid.affine, grid.affine)):
                    raise RuntimeError(f"NIfTI round trip of subject {sid} changed the labels or the grid")
            if overwrite or zarr_missing:
                write_zarr(paths, image, labels, grid)
            logger.info("subject %s: shape %s at %s mm", sid, labels.shape, grid.spacing.round(3))
        labels, grid = load_nifti(paths["labels_nii"])
        info[sid] = {"shape": list(labels.shape), "spacing_mm": grid.spacing.round(4).tolist()}
    return info


def write_zarr(paths: dict[str, Path], image: np.ndarray, labels: np.ndarray, grid: Grid) -> None:
    """Write the OME-Zarr inputs of PatchMorph (skipped with a warning until ``pipeline.ngff`` exists)."""
    try:
        from pipeline.ngff import write_image
    except ImportError:
        logger.warning("pipeline.ngff is not available yet: OME-Zarr inputs not written")
        return
    write_image(paths["image_zarr"], image, grid, name="image", overwrite=True)
    write_image(paths["labels_zarr"], labels, grid, name="labels", labels=True, overwrite=True)


def load_labels(path: Path) -> tuple[np.ndarray, Grid]:
    """A label map ``(Z, Y, X)`` int and its grid from NIfTI or OME-Zarr (level 0)."""
    if path.name.endswith((".nii", ".nii.gz")):
        from pipeline.importers import load_nifti

        labels, grid = load_nifti(path)
    else:
        from pipeline.ngff import read_image

        level = read_image(path).levels[0]
        labels, grid = np.asarray(level.array), level.grid
    return np.rint(labels).astype(np.int32), grid


def score(fixed_sid: str, warped_path: Path) -> dict[str, Any]:
    """Dice per standard structure and its mean between the fixed labels and warped moving labels."""
    fixed, fixed_grid = load_labels(subject_paths(fixed_sid)["labels_nii"])
    warped, warped_grid = load_labels(warped_path)
    if warped.shape != fixed.shape or not np.allclose(warped_grid.affine, fixed_grid.affine, atol=1e-4):
        raise RuntimeError(f"{warped_path} is not on the fixed grid of subject {fixed_sid}")
    dice = dice_per_label(fixed, warped, STANDARD_FS_LABELS)
    values = [v for v in dice.values() if not np.isnan(v)]
    return {"dice": {str(k): v for k, v in dice.items()}, "mean_dice": float(np.mean(values))}


def parse_pairs(text: str | None) -> list[tuple[str, str]]:
    """``"07:08,08:09"`` → ``[("07", "08"), ("08", "09")]`` (fixed:moving); None → all 12 ordered pairs."""
    if not text:
        return list(itertools.permutations(SUBJECTS, 2))
    return [tuple(item.split(":")) for item in text.split(",")]  # type: ignore[misc]


# -- ANTs ------------------------------------------------------------------------------------------------
def run_ants_pair(fixed: str, moving: str, transform: str, threads: int, nice: int) -> dict[str, Any]:
    """Register one pair with ANTs in its venv (subprocess) and score it."""
    fp, mp = subject_paths(fixed), subject_paths(moving)
    out = OUT / transform.lower() / f"{fixed}_{moving}"
    cmd = [
        str(ANTS_PYTHON),
        str(ROOT / "benchmarks" / "ants_register.py"),
        "--fixed", str(fp["image_nii"]),
        "--moving", str(mp["image_nii"]),
        "--moving-labels", str(mp["labels_nii"]),
        "--fixed-labels", str(fp["labels_nii"]),
        "--transform", transform,
        "--threads", str(threads),
        "--out-labels", str(out / "warped_labels.nii.gz"),
        "--out-json", str(out / "record.json"),
    ]  # fmt: skip
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    record = json.loads((out / "record.json").read_text())
    record.update(fixed=fixed, moving=moving, process_seconds=time.perf_counter() - start)
    record.update(score(fixed, out / "warped_labels.nii.gz"))
    return record


def run_ants(pairs: list[tuple[str, str]], transform: str, threads: int, nice: int, json_path: Path) -> None:
    """Run ANTs on ``pairs``, rewriting ``json_path`` after every pair (so partial runs are kept).

    Pairs already in ``json_path`` for the same transform are kept and skipped (a long SyNCC run can be
    stopped and started again); each kept pair still carries the command that made it.
    """
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    doc: dict[str, Any] = {"pairs": []}
    if json_path.is_file():
        doc = json.loads(json_path.read_text())
        if doc.get("method") != f"ANTs {transform}":
            doc = {"pairs": []}
    for pair in doc["pairs"]:
        pair.setdefault("command", doc.get("command", command))
    doc.update(
        method=f"ANTs {transform}",
        command=command,
        machine=machine(),
        pairs_requested=[f"{f}:{m}" for f, m in pairs],
    )
    done = {(p["fixed"], p["moving"]) for p in doc["pairs"]}
    for fixed, moving in pairs:
        if (fixed, moving) in done:
            logger.info("ANTs %s: fixed %s, moving %s already in %s, skipped", transform, fixed, moving, json_path)
            continue
        logger.info("ANTs %s: fixed %s, moving %s", transform, fixed, moving)
        doc["pairs"].append(run_ants_pair(fixed, moving, transform, threads, nice) | {"command": command})
        doc["summary"] = summarize(doc["pairs"])
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=2))
        logger.info("ANTs %s %s->%s: mean Dice %.4f", transform, moving, fixed, doc["pairs"][-1]["mean_dice"])


# -- PatchMorph ------------------------------------------------------------------------------------------
def run_ours_pair(fixed: str, moving: str, config: Path | None, folder: str = "patchmorph") -> dict[str, Any]:
    """Register one pair with PatchMorph (default model; inference ``config`` YAML or defaults), score it.

    Goes through the product path (``register_files`` / ``warp_files``: OME-Zarr in and out, local Dask
    cluster), so the wall time includes cluster start-up, reading and writing. Outputs go to
    ``benchmarks/out/accuracy/<folder>/<fixed>_<moving>/``.
    """
    from pipeline.ngff import read_field
    from pipeline.register import register_files
    from pipeline.warp import warp_files

    fp, mp = subject_paths(fixed), subject_paths(moving)
    out = OUT / folder / f"{fixed}_{moving}"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rec = register_files(
        fp["image_zarr"],
        mp["image_zarr"],
        out / "field.ome.zarr",
        config=config,
        overwrite=True,
        progress=False,
    )
    reg_seconds = time.perf_counter() - start
    start = time.perf_counter()
    warp_files(
        out / "field.ome.zarr", mp["labels_zarr"], out / "warped_labels.ome.zarr", labels=True, overwrite=True,
        progress=False,
    )  # fmt: skip
    warp_seconds = time.perf_counter() - start
    memory_seconds, memory_cpu, memory_diff = time_in_memory(
        fp["image_zarr"], mp["image_zarr"], out / "field.ome.zarr", config
    )
    field, field_grid, _ = read_field(out / "field.ome.zarr")
    values = read_box(field, tuple(slice(0, n) for n in field.shape))
    fixed_labels, fixed_grid = load_labels(fp["labels_nii"])
    brain = resample(fixed_labels, fixed_grid, field_grid.points(), order=0, dtype=np.int32) > 0
    record = {
        "fixed": fixed,
        "moving": moving,
        "register_seconds": memory_seconds,
        "register_cpu_seconds": memory_cpu,
        "product_register_seconds": reg_seconds,
        "in_memory_max_abs_diff": memory_diff,
        "warp_seconds": warp_seconds,
        "initial_alignment": rec.initial_alignment,
        "stages": rec.stages,
        "field_shape": list(field_grid.shape),
        "field_spacing_mm": field_grid.spacing.round(4).tolist(),
        "folding_percent": folding_percent(values, field_grid),
        "folding_percent_in_brain": folding_percent(values, field_grid, brain),
    }
    record.update(score(fixed, out / "warped_labels.ome.zarr"))
    record["start_mean_dice"] = start_dice(fixed, moving, np.asarray(rec.initial_alignment["matrix"]))
    return record


def start_dice(fixed: str, moving: str, matrix: np.ndarray) -> float:
    """Mean Dice of the initial alignment alone: the moving labels through the ``(4, 4)`` start matrix."""
    from patchmorph_core.displacement import AffineDisplacement
    from patchmorph_core.warping import warp_to_grid
    from pipeline.ngff import read_image

    fixed_labels, fixed_grid = load_labels(subject_paths(fixed)["labels_nii"])
    warped = warp_to_grid(read_image(subject_paths(moving)["labels_zarr"]), AffineDisplacement(matrix), fixed_grid, order=0)
    dice = dice_per_label(fixed_labels, warped, STANDARD_FS_LABELS)
    return float(np.mean([v for v in dice.values() if not np.isnan(v)]))


def in_memory_image(path: Path) -> Any:
    """An OME-Zarr image (:class:`~patchmorph_core.source.MultiscaleImage`) with every level read into memory."""
    from patchmorph_core.source import Level, MultiscaleImage
    from pipeline.ngff import read_image

    image = read_image(path)
    return MultiscaleImage(tuple(Level(np.asarray(lv.array), lv.grid) for lv in image.levels), image.name)


def time_in_memory(
    fixed: Path, moving: Path, field_path: Path, config: Path | None
) -> tuple[float, float, float]:
    """Wall time of the registration itself, like ANTs' ``ants.registration`` call: both images already in
    memory, the model loaded, then :func:`~patchmorph_core.inference.register_arrays` (the one-chunk case
    of the product path, no Dask cluster, no reading or writing). Returns the wall seconds, the CPU seconds
    of this process (all threads; less sensitive to other jobs on the machine) and the largest difference
    (world units) from the field the product path wrote, as a check that both computed the same
    registration.
    """
    from patchmorph_core.model import load_model
    from pipeline.ngff import read_field
    from pipeline.register import register_arrays, resolve_config

    cfg = resolve_config(config)
    fixed_img, moving_img = in_memory_image(fixed), in_memory_image(moving)
    model = load_model(cfg.weights)
    start, cpu = time.perf_counter(), time.process_time()
    result = register_arrays(model, fixed_img, moving_img, cfg, show_progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    written, _, _ = read_field(field_path)
    return seconds, cpu, float(np.abs(np.asarray(written) - result.field).max())


# -- report ----------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    import os

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}


def summarize(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over pairs: Dice per structure, mean Dice (and its std), folding %, wall time."""
    if not pairs:
        return {}
    per_label = {str(k): float(np.nanmean([p["dice"][str(k)] for p in pairs])) for k in STANDARD_FS_LABELS}
    means = [p["mean_dice"] for p in pairs]
    out: dict[str, Any] = {
        "n_pairs": len(pairs),
        "mean_dice": float(np.mean(means)),
        "std_dice": float(np.std(means)),
        "dice_per_label": per_label,
        "folding_percent": float(np.mean([p["folding_percent"] for p in pairs])),
        "register_seconds": float(np.mean([p["register_seconds"] for p in pairs])),
    }
    for key in ("start_mean_dice", "product_register_seconds"):
        values = [p[key] for p in pairs if key in p]
        if values:
            out[key] = float(np.mean(values))
    cpu = [p["register_cpu_seconds"] for p in pairs if "register_cpu_seconds" in p]
    if cpu:
        out["register_cpu_seconds"] = float(np.mean(cpu))
        out["n_pairs_with_cpu_seconds"] = len(cpu)
    return out


def table(methods: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per method (mean over its pairs)."""
    lines = [
        "| method | pairs | mean Dice (± sd over pairs) | Dice of the initial affine | folded voxels % "
        "| registration wall time s | registration CPU s | product path s (cluster + I/O) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, summary in methods.items():
        if not summary:
            lines.append(f"| {name} | 0 | – | – | – | – | – | – |")
            continue
        cpu = f"{summary['register_cpu_seconds']:.1f}" if "register_cpu_seconds" in summary else "–"
        start = f"{summary['start_mean_dice']:.3f}" if "start_mean_dice" in summary else "–"
        product = f"{summary['product_register_seconds']:.1f}" if "product_register_seconds" in summary else "–"
        lines.append(
            f"| {name} | {summary['n_pairs']} | {summary['mean_dice']:.3f} ± {summary['std_dice']:.3f} | {start} | "
            f"{summary['folding_percent']:.4f} | {summary['register_seconds']:.1f} | {cpu} | {product} |"
        )
    return "\n".join(lines)


def structure_table(methods: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the mean Dice per structure and method."""
    names = [n for n, s in methods.items() if s]
    lines = ["| structure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, name in STANDARD_FS_LABELS.items():
        cells = [f"{methods[n]['dice_per_label'][str(label)]:.3f}" for n in names]
        lines.append(f"| {label} {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variant_name(config: Path) -> str:
    """Method name of a PatchMorph variant run with the inference YAML ``config``."""
    return f"PatchMorph, {config.stem}"


def run(
    pairs: list[tuple[str, str]],
    skip_ours: bool,
    skip_syn: bool,
    threads: int,
    config: Path | None,
    variants: list[Path] | None = None,
) -> None:
    """The full benchmark: PatchMorph (and its ``variants``, inference YAMLs) and ANTs SyN on ``pairs``,
    alternated pair by pair, plus the stored SyNCC results."""
    variants = variants or []
    info = prepare()
    doc: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "subjects": info,
        "synthesis": {**SYNTH, "intensity_seed": INTENSITY_SEED, "factor": FACTOR, "margin_vox": MARGIN_VOX},
        "structures": {str(k): v for k, v in STANDARD_FS_LABELS.items()},
        "methods": {},
    }
    previous = RESULTS / "accuracy.json"
    syn_path = RESULTS / "ants_syn.json"
    if not skip_syn and syn_path.exists():
        syn_path.unlink()  # SyN is rerun beside ours, not resumed
    # PatchMorph methods: name -> (inference YAML or None for the defaults, output folder)
    ours: dict[str, tuple[Path | None, str]] = {"PatchMorph": (config, "patchmorph")}
    ours.update({variant_name(v): (v, f"patchmorph_{v.stem}") for v in variants})
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in ours}
    for fixed, moving in pairs:  # alternate ours and SyN pair by pair: all see the same machine load
        if not skip_ours:
            for name, (cfg, folder) in ours.items():
                records[name].append(run_ours_pair(fixed, moving, cfg, folder))
        if not skip_syn:
            run_ants([(fixed, moving)], "SyN", threads, 0, syn_path)
    if not skip_ours:
        for name, (cfg, _) in ours.items():
            doc["methods"][name] = {
                "command": doc["command"],
                "config": None if cfg is None else str(cfg),
                "pairs": records[name],
            }
    elif previous.exists():  # every PatchMorph method of the previous run, reused
        for name, method in json.loads(previous.read_text())["methods"].items():
            if name.startswith("PatchMorph"):
                doc["methods"][name] = method
    if syn_path.exists():  # with --skip-syn: the previous SyN run's file
        doc["methods"]["ANTs SyN"] = json.loads(syn_path.read_text())
    syncc_path = RESULTS / "ants_syncc.json"
    if syncc_path.exists():
        doc["methods"]["ANTs SyNCC"] = json.loads(syncc_path.read_text())
    for method in doc["methods"].values():
        method["summary"] = summarize(method["pairs"])
    summaries = {name: m["summary"] for name, m in doc["methods"].items()}
    text = table(summaries) + "\n\n" + structure_table(summaries)
    if "ANTs SyNCC" in doc["methods"]:
        done = {(p["fixed"], p["moving"]) for p in doc["methods"]["ANTs SyNCC"]["pairs"]}
        subset = {
            name: summarize([p for p in m["pairs"] if (p["fixed"], p["moving"]) in done])
            for name, m in doc["methods"].items()
        }
        doc["on_syncc_pairs"] = {"pairs": sorted(f"{f}:{m}" for f, m in done), "summaries": subset}
        text += "\n\nOn the pairs ANTs SyNCC finished (" + ", ".join(sorted(f"{m}->{f}" for f, m in done))
        text += "; moving->fixed):\n\n" + table(subset)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accuracy.json").write_text(json.dumps(doc, indent=2))
    (RESULTS / "accuracy.md").write_text(text + "\n")
    print(f"wrote {RESULTS / 'accuracy.json'}")


def main() -> None:
    """Command line (see module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_prep = sub.add_parser("prepare", help="write the synthetic inputs")
    p_prep.add_argument("--overwrite", action="store_true")
    p_ants = sub.add_parser("ants", help="run one ANTs method on some pairs")
    p_ants.add_argument("--transform", choices=["SyN", "SyNCC"], required=True)
    p_ants.add_argument("--pairs", help="fixed:moving,... (default: all 12)")
    p_ants.add_argument("--json", type=Path, required=True)
    p_ants.add_argument("--threads", type=int, default=2)
    p_ants.add_argument("--nice", type=int, default=0, help="nice level of the ANTs process")
    p_run = sub.add_parser("run", help="PatchMorph + ANTs SyN, merge SyNCC, table + JSON")
    p_run.add_argument("--pairs", help="fixed:moving,... (default: all 12)")
    p_run.add_argument("--skip-ours", action="store_true", help="reuse PatchMorph from results/accuracy.json")
    p_run.add_argument("--skip-syn", action="store_true", help="reuse results/ants_syn.json")
    p_run.add_argument("--threads", type=int, default=2)
    p_run.add_argument("--config", type=Path, help="PatchMorph inference YAML (default: built-in defaults)")
    p_run.add_argument(
        "--variant", type=Path, action="append", default=[],
        help="another PatchMorph inference YAML, run beside the default on every pair (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.overwrite)
    elif args.cmd == "ants":
        prepare()
        run_ants(parse_pairs(args.pairs), args.transform, args.threads, args.nice, args.json)
    else:
        run(parse_pairs(args.pairs), args.skip_ours, args.skip_syn, args.threads, args.config, args.variant)


if __name__ == "__main__":
    main()
