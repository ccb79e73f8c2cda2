"""Accuracy benchmark: PatchMorph through its command line against ANTs SyN run right after it, and ANTs SyNCC.

Data: the real FreeSurfer label maps of SynthSeg subjects 07-10 (``human_synthseg``; 01-06 are for training
and validation). Each is skull-stripped (labels >= 500 dropped), downsampled to 2 mm (block mode), cropped
to the brain's bounding box plus :data:`MARGIN_VOX` voxels (world positions kept) and turned into an image
by :func:`patchmorph_core.synth.synthesize_image` with ONE intensity table for every subject (seeded uniform
draw per label id) plus blur (1 voxel), a smooth bias field (0.3) and noise (0.03), each subject with its own
seed. Every subject stays in its native world space (no prior alignment). The inputs are NIfTI files, as a
user holds them.

Per ordered pair (fixed, moving) of the 4 subjects (12 pairs), each PatchMorph method runs as a user runs it,
from an empty folder: ``patchmorph convert`` (the four NIfTI files), ``register``, ``warp --labels`` (moving
labels onto the fixed grid) and ``evaluate`` (Dice over the 28 standard structures, folds inside the fixed
brain), each command timed as a process. Then ANTs SyN (antspyx defaults: affine + SyN on mutual information,
2 threads) registers the same pair. Reported per pair and method: Dice per structure and its mean, % of
voxels with det J <= 0 inside the fixed brain (the headline) and over the whole field grid, the inverse
field's residual inside the brain (percentiles and max, in field voxels), the wall and CPU seconds of each
command, and ``patchmorph register`` as a process against SyN as a process (the whole ``ants_register.py`` run:
imports, reading, registration, warping the labels, writing) in the same run: wall and CPU seconds of both and
their ratios per pair, the mean ratio and the ratio of the mean wall times. ANTs SyNCC
(15-25 min a pair) was run once with the ``ants`` sub-command; its JSON is merged: per-pair Dice difference
with its standard error, and Dice per structure group (left and right together).

Sub-commands (from the repository root, our venv's Python)::

    .venv/bin/python benchmarks/accuracy.py prepare          # the NIfTI inputs (benchmarks/out/accuracy/data)
    .venv/bin/python benchmarks/accuracy.py run              # PatchMorph + SyN on the 12 pairs, merges SyNCC
    .venv/bin/python benchmarks/accuracy.py run --variant fast="--config configs/register_fast.yaml"
    .venv/bin/python benchmarks/accuracy.py ants --transform SyNCC --pairs 07:08,08:09 \\
        --json benchmarks/results/ants_syncc.json          # one ANTs method on some pairs (slow: run once)

``run`` writes ``benchmarks/results/accuracy.json`` after every pair (a stopped run keeps what it measured) and
prints the tables that ``benchmarks/report.py`` puts in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import harness
import numpy as np

from patchmorph_core.metrics import dice_per_label
from patchmorph_core.source import downsampled_grid
from patchmorph_core.spatial import Grid, grid_affine_from_ras
from patchmorph_core.synth import (
    STANDARD_FS_LABELS,
    downsample_labels,
    random_intensities,
    skull_strip_mask,
    synthesize_image,
)

logger = logging.getLogger("benchmarks.accuracy")

ROOT = harness.REPO
DATA = harness.DATA / "human_synthseg"
OUT = harness.OUT / "accuracy"
RESULTS_JSON = harness.RESULTS / "accuracy.json"
SYNCC_JSON = harness.RESULTS / "ants_syncc.json"
ANTS_PYTHON = harness.ANTS_PYTHON
"""ANTs' venv (``validate.py`` runs ANTs through it too)."""
SUBJECTS: tuple[str, ...] = ("07", "08", "09", "10")
FACTOR = 2
"""Downsampling of the 1 mm label maps: images are 2 mm."""
MARGIN_VOX = 6
"""Background margin (2 mm voxels) kept around the brain's bounding box."""
INTENSITY_SEED = 2026
"""Seed of the one intensity table (label id -> intensity) shared by all subjects."""
SYNTH = {"blur_sigma_vox": 1.0, "bias_strength": 0.3, "noise_std": 0.03}

STRUCTURE_GROUPS: dict[str, tuple[int, ...]] = {
    "cerebral white matter": (2, 41),
    "cerebral cortex": (3, 42),
    "lateral ventricle": (4, 43),
    "cerebellum white matter": (7, 46),
    "cerebellum cortex": (8, 47),
    "thalamus": (10, 49),
    "caudate": (11, 50),
    "putamen": (12, 51),
    "pallidum": (13, 52),
    "3rd ventricle": (14,),
    "4th ventricle": (15,),
    "brain-stem": (16,),
    "hippocampus": (17, 53),
    "amygdala": (18, 54),
    "CSF": (24,),
    "ventral DC": (28, 60),
}
"""The 28 standard structures as 16 groups (left and right together); a group's Dice is its structures' mean."""

GROUP_MARGIN = 0.03
"""No structure group may lie more than this below ANTs SyNCC (issue 24)."""


# -- data ------------------------------------------------------------------------------------------------
def subject_paths(sid: str, folder: Path | None = None) -> dict[str, Path]:
    """NIfTI inputs of one subject (``folder``: default ``benchmarks/out/accuracy/data``)."""
    base = folder or OUT / "data"
    return {"image": base / f"image_{sid}.nii.gz", "labels": base / f"labels_{sid}.nii.gz"}


def all_subject_paths(folder: Path | None = None) -> list[Path]:
    """Every subject's :func:`subject_paths` in ``folder``, one list."""
    return [p for sid in SUBJECTS for p in subject_paths(sid, folder).values()]


def brain_box(labels: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """The non-zero bounding box of a ``(Z, Y, X)`` label map plus ``margin`` voxels, as slices."""
    nonzero = np.argwhere(labels > 0)
    start = np.maximum(nonzero.min(axis=0) - margin, 0)
    stop = np.minimum(nonzero.max(axis=0) + 1 + margin, labels.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]


def brain_crop(labels: np.ndarray, grid: Grid, margin: int) -> tuple[np.ndarray, Grid]:
    """Crop a ``(Z, Y, X)`` label map to :func:`brain_box` (same world)."""
    box = brain_box(labels, margin)
    return labels[box], grid.crop([b.start for b in box], [b.stop for b in box])


def make_subject(sid: str, table: dict[int, float]) -> tuple[np.ndarray, np.ndarray, Grid]:
    """Skull-stripped 2 mm labels, their synthetic image (intensities from ``table``) and grid of ``sid``."""
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
    """Write a ``(Z, Y, X)`` array on ``grid`` as NIfTI (millimetres), the inverse of ``load_nifti``.

    ``grid_affine_from_ras`` reverses the index and world component order ((i, j, k) <-> (k, j, i),
    (R, A, S) <-> (S, A, R)); the reversal is its own inverse, so it also maps our affine back to
    the NIfTI one, and the file array is ours with its axes reversed.
    """
    import nibabel as nib

    mm = grid.with_unit("millimeter")
    img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), grid_affine_from_ras(mm.affine))
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def content_sha256(path: Path) -> str:
    """Hex SHA-256 of a NIfTI file's voxels and index→world matrix (not of its bytes: gzip stamps a time)."""
    from pipeline.importers import load_nifti

    array, grid = load_nifti(path)
    digest = hashlib.sha256(np.ascontiguousarray(array).tobytes())
    digest.update(np.ascontiguousarray(grid.affine).tobytes())
    return digest.hexdigest()


def inputs_key() -> str:
    """What the subjects' images and labels depend on (:func:`harness.inputs_key`): the synthesis settings and
    the code that makes them (this module, :mod:`patchmorph_core.synth`, the NIfTI reader)."""
    from patchmorph_core import synth
    from pipeline import importers

    settings = (SUBJECTS, INTENSITY_SEED, SYNTH, FACTOR, MARGIN_VOX)
    return harness.inputs_key(settings, [sys.modules[__name__], synth, importers])


def prepare(overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Write every subject's synthetic image and labels (NIfTI) once per :func:`inputs_key`; return shapes,
    spacings, checksums."""
    from pipeline.importers import load_nifti

    table = random_intensities(range(1, 500), np.random.default_rng(INTENSITY_SEED))
    info: dict[str, dict[str, Any]] = {}
    key = inputs_key()
    folder = OUT / "data"
    fresh = not overwrite and harness.prepared(folder, key, all_subject_paths())
    for sid in SUBJECTS:
        paths = subject_paths(sid)
        if not fresh:
            labels, image, grid = make_subject(sid, table)
            save_nifti(paths["image"], image, grid)
            save_nifti(paths["labels"], labels, grid)
            back, back_grid = load_nifti(paths["labels"])
            if not (np.array_equal(back, labels) and np.allclose(back_grid.affine, grid.affine)):
                raise RuntimeError(f"NIfTI round trip of subject {sid} changed the labels or the grid")
            logger.info("subject %s: shape %s at %s mm", sid, labels.shape, grid.spacing.round(3))
        labels, grid = load_nifti(paths["labels"])
        info[sid] = {
            "shape": list(labels.shape),
            "spacing_mm": grid.spacing.round(4).tolist(),
            "image_sha256": content_sha256(paths["image"]),
            "labels_sha256": content_sha256(paths["labels"]),
        }
    if not fresh:
        harness.mark_prepared(folder, key)
    return info


def in_memory_image(path: Path) -> Any:
    """An OME-Zarr image (:class:`~patchmorph_core.source.MultiscaleImage`) with every level read into memory
    (``validate.py`` registers in memory)."""
    from pipeline.ngff import read_image

    return read_image(path).in_memory()


def parse_pairs(text: str | None, subjects: tuple[str, ...] = SUBJECTS) -> list[tuple[str, str]]:
    """``"07:08,08:09"`` → ``[("07", "08"), ("08", "09")]`` (fixed:moving); None → every ordered pair."""
    if not text:
        return list(itertools.permutations(subjects, 2))
    return [tuple(item.split(":")) for item in text.split(",")]  # type: ignore[misc]


def pair_key(fixed: str, moving: str) -> str:
    """``"07:08"`` (fixed:moving), the key of a pair in the results."""
    return f"{fixed}:{moving}"


# -- scoring ---------------------------------------------------------------------------------------------
def load_labels(path: Path) -> tuple[np.ndarray, Grid]:
    """A label map ``(Z, Y, X)`` int32 and its grid (NIfTI, NRRD or OME-Zarr level 0)."""
    from pipeline.evaluate import load_volume

    labels, grid = load_volume(path)
    return np.rint(labels).astype(np.int32), grid


def dice_record(fixed_labels: np.ndarray, warped: np.ndarray, labels: dict[int, str]) -> dict[str, Any]:
    """Dice per structure of ``labels`` (keys as strings) and its mean over the structures present."""
    dice = dice_per_label(fixed_labels, warped, list(labels))
    values = [v for v in dice.values() if not np.isnan(v)]
    return {"dice": {str(k): float(v) for k, v in dice.items()}, "mean_dice": float(np.mean(values))}


def group_dice(dice: dict[str, float]) -> dict[str, float]:
    """Dice per structure group (:data:`STRUCTURE_GROUPS`): the mean of its structures' Dice."""
    return {
        name: float(np.nanmean([dice[str(label)] for label in ids])) for name, ids in STRUCTURE_GROUPS.items()
    }


def field_quality(run: harness.CommandRun, fixed_labels: Path) -> dict[str, Any]:
    """What the written field says beyond ``evaluate``: folds over the whole field grid, the inverse's
    residual inside the fixed brain (as ``warp --inverse`` inverts), the field grid, the initial affine."""
    from fields import folds, inverse_residual

    from patchmorph_core.spatial import resample
    from pipeline.ngff import read_field
    from pipeline.warp import INVERSE_ITERATIONS

    array, grid, meta = read_field(run.path("field.ome.zarr"))
    field = np.asarray(array, dtype=np.float32)
    labels, labels_grid = load_labels(fixed_labels)
    points = grid.with_unit(labels_grid.unit).points()
    brain = resample(labels, labels_grid, points, order=0, dtype=np.int32) > 0
    return {
        "field_shape": list(grid.shape),
        "field_spacing": grid.spacing.round(4).tolist(),
        "field_unit": grid.unit,
        "folding_percent_whole_grid": folds(field, grid)["folding_percent"],
        "inverse_residual_in_brain": inverse_residual(field, grid, brain, INVERSE_ITERATIONS),
        "initial_matrix": meta.get("initial_matrix"),
        "initial_alignment": meta.get("initial_alignment"),
    }


def start_dice(fixed: str, moving: str, matrix: list[list[float]], folder: Path | None = None) -> float:
    """Mean Dice of the initial affine alone: the moving labels through the field's ``initial_matrix``."""
    from patchmorph_core.displacement import AffineDisplacement
    from patchmorph_core.source import Level, MultiscaleImage
    from patchmorph_core.warping import warp_to_grid

    fixed_labels, fixed_grid = load_labels(subject_paths(fixed, folder)["labels"])
    moving_labels, moving_grid = load_labels(subject_paths(moving, folder)["labels"])
    image = MultiscaleImage((Level(moving_labels, moving_grid),), "labels")
    warped = warp_to_grid(image, AffineDisplacement(np.asarray(matrix)), fixed_grid, "nearest")
    return dice_record(fixed_labels, warped, STANDARD_FS_LABELS)["mean_dice"]


# -- the methods ------------------------------------------------------------------------------------------
def ours_pair(fixed: str, moving: str, folder: Path, register_options: list[str]) -> dict[str, Any]:
    """One pair through ``patchmorph convert / register / warp / evaluate``; the record of it."""
    fp, mp = subject_paths(fixed), subject_paths(moving)
    sources = harness.PairSources(
        fixed=harness.Source(fp["image"]),
        moving=harness.Source(mp["image"]),
        fixed_labels=harness.Source(fp["labels"]),
        moving_labels=harness.Source(mp["labels"]),
    )
    run = harness.run_patchmorph_pair(sources, folder, register_options, label_set="standard")
    evaluation = harness.read_evaluation(run)
    quality = field_quality(run, fp["labels"])
    record: dict[str, Any] = {
        "fixed": fixed,
        "moving": moving,
        "dice": evaluation["dice"],
        "mean_dice": evaluation["mean_dice"],
        "folding_percent_in_brain": evaluation["folding_percent"],
        "jacobian_min_in_brain": evaluation["jacobian_min"],
        **quality,
        **run.timings(),
    }
    if quality["initial_matrix"] is not None:
        record["start_mean_dice"] = start_dice(fixed, moving, quality["initial_matrix"])
    return record


def ants_pair(fixed: str, moving: str, transform: str, folder: Path, nice: int = 0) -> dict[str, Any]:
    """One pair registered by ANTs (``transform``: SyN or SyNCC) in its venv; the record of it, scored."""
    fp, mp = subject_paths(fixed), subject_paths(moving)
    record = harness.run_ants_pair(
        fp["image"], mp["image"], mp["labels"], folder, transform, fixed_labels=fp["labels"], nice=nice
    )
    fixed_labels, _ = load_labels(fp["labels"])
    warped, _ = load_labels(folder / "warped_labels.nii.gz")
    record.update(fixed=fixed, moving=moving, **dice_record(fixed_labels, warped, STANDARD_FS_LABELS))
    return record


def run_ants(pairs: list[tuple[str, str]], transform: str, nice: int, json_path: Path) -> None:
    """Run one ANTs method on ``pairs``, rewriting ``json_path`` after every pair.

    Pairs already in ``json_path`` for the same transform are kept and skipped (a long SyNCC run can be
    stopped and started again); each pair carries the command that made it.
    """
    command = harness.recorded_command()
    doc: dict[str, Any] = {"pairs": []}
    if json_path.is_file():
        doc = json.loads(json_path.read_text())
        if doc.get("method") != f"ANTs {transform}":
            doc = {"pairs": []}
    doc.update(method=f"ANTs {transform}", command=command, machine=harness.machine())
    done = {(p["fixed"], p["moving"]) for p in doc["pairs"]}
    for fixed, moving in pairs:
        if (fixed, moving) in done:
            logger.info("ANTs %s %s:%s already in %s, skipped", transform, fixed, moving, json_path)
            continue
        record = ants_pair(fixed, moving, transform, OUT / transform.lower() / f"{fixed}_{moving}", nice)
        doc["pairs"].append(record | {"command": command})
        harness.write_json(json_path, doc)
        logger.info("ANTs %s %s:%s mean Dice %.4f", transform, fixed, moving, record["mean_dice"])


# -- summaries ---------------------------------------------------------------------------------------------
def by_pair(pairs: list[dict[str, Any]], key: str) -> dict[str, float]:
    """``{"07:08": value}`` of one figure of every pair record that has it."""
    return {pair_key(p["fixed"], p["moving"]): float(p[key]) for p in pairs if p.get(key) is not None}


def summarize(method: dict[str, Any]) -> dict[str, Any]:
    """Means over a method's pairs: Dice (with its spread), folds, inverse residual, seconds per command."""
    pairs = method["pairs"]
    if not pairs:
        return {"n_pairs": 0}
    out: dict[str, Any] = {
        "n_pairs": len(pairs),
        "mean_dice": harness.mean_and_sem([p["mean_dice"] for p in pairs]),
        "dice_per_structure": {
            str(k): float(np.nanmean([p["dice"][str(k)] for p in pairs])) for k in STANDARD_FS_LABELS
        },
        "dice_per_group": {
            g: float(np.mean([group_dice(p["dice"])[g] for p in pairs])) for g in STRUCTURE_GROUPS
        },
    }
    for key in ("folding_percent_in_brain", "folding_percent_whole_grid", "folding_percent"):
        values = [p[key] for p in pairs if p.get(key) is not None]
        if values:
            out[key] = {"mean": float(np.mean(values)), "max": float(np.max(values)),
                        "pairs_with_folds": int(sum(v > 0 for v in values))}  # fmt: skip
    residuals = [p["inverse_residual_in_brain"] for p in pairs if "inverse_residual_in_brain" in p]
    if residuals:
        out["inverse_residual_in_brain"] = {
            "p999_vox_max": float(max(r["p999_vox"] for r in residuals)),
            "max_vox_max": float(max(r["max_vox"] for r in residuals)),
            "p999_vox_mean": float(np.mean([r["p999_vox"] for r in residuals])),
        }
    for key in ("start_mean_dice",):
        values = [p[key] for p in pairs if key in p]
        if values:
            out[key] = float(np.mean(values))
    seconds = sorted({k for p in pairs for k in p if k.endswith("_seconds")})
    out["seconds"] = {k: float(np.mean([p[k] for p in pairs if k in p])) for k in seconds}
    return out


def command_versus_process(ours: list[dict[str, Any]], syn: list[dict[str, Any]]) -> dict[str, Any]:
    """``patchmorph register`` as a process against ANTs SyN's process (``ants_register.py``: imports, reading,
    registration, warping the labels, writing) on the pairs both ran, in the same run: per pair the wall and CPU
    seconds of both and their ratios (ours ÷ SyN's), and over the pairs the mean ratio (± SE), its largest value,
    the pairs where ours was faster, and the ratio of the mean wall times (the target: below 1)."""
    ours_wall, ours_cpu = by_pair(ours, "register_seconds"), by_pair(ours, "register_cpu_seconds")
    syn_wall, syn_cpu = by_pair(syn, "process_seconds"), by_pair(syn, "process_cpu_seconds")
    common = sorted(set(ours_wall) & set(syn_wall))
    per_pair = {
        k: {
            "command_seconds": ours_wall[k],
            "command_cpu_seconds": ours_cpu.get(k),
            "syn_process_seconds": syn_wall[k],
            "syn_process_cpu_seconds": syn_cpu.get(k),
            "wall_ratio": ours_wall[k] / syn_wall[k],
            "cpu_ratio": ours_cpu[k] / syn_cpu[k] if k in ours_cpu and k in syn_cpu else None,
        }
        for k in common
    }
    wall = [p["wall_ratio"] for p in per_pair.values()]
    cpu = [p["cpu_ratio"] for p in per_pair.values() if p["cpu_ratio"] is not None]
    mean_ours = float(np.mean([ours_wall[k] for k in common])) if common else float("nan")
    mean_syn = float(np.mean([syn_wall[k] for k in common])) if common else float("nan")
    return {
        "per_pair": per_pair,
        "wall_ratio": {**harness.mean_and_sem(wall), "max": max(wall, default=float("nan"))},
        "cpu_ratio": {**harness.mean_and_sem(cpu), "max": max(cpu, default=float("nan"))},
        "pairs_faster": int(sum(r < 1 for r in wall)),
        "mean_command_seconds": mean_ours,
        "mean_syn_process_seconds": mean_syn,
        "ratio_of_mean_wall": mean_ours / mean_syn if common else float("nan"),
    }


def compare(doc: dict[str, Any]) -> dict[str, Any]:
    """Every PatchMorph method against SyN (same run: Dice difference; ``patchmorph register``'s wall and CPU time
    against SyN's process, per pair, :func:`command_versus_process`) and against
    the stored SyNCC (Dice difference per pair with its standard error, Dice per structure group)."""
    methods = doc["methods"]
    syn = methods.get("ANTs SyN", {"pairs": []})["pairs"]
    syncc = methods.get("ANTs SyNCC", {"pairs": []})["pairs"]
    out: dict[str, Any] = {}
    for name, method in methods.items():
        if method.get("kind") != "patchmorph" or not method["pairs"]:
            continue
        ours = method["pairs"]
        entry: dict[str, Any] = {}
        if syn:
            entry["versus_syn"] = {
                "dice": harness.paired_difference(by_pair(ours, "mean_dice"), by_pair(syn, "mean_dice")),
                "command_versus_process": command_versus_process(ours, syn),
            }
        if syncc:
            common = {pair_key(p["fixed"], p["moving"]) for p in syncc}
            ours_common = [p for p in ours if pair_key(p["fixed"], p["moving"]) in common]
            syncc_common = [p for p in syncc if pair_key(p["fixed"], p["moving"]) in {pair_key(q["fixed"], q["moving"]) for q in ours_common}]
            groups_ours = summarize({"pairs": ours_common}).get("dice_per_group", {})
            groups_syncc = summarize({"pairs": syncc_common}).get("dice_per_group", {})
            diffs = {g: groups_ours[g] - groups_syncc[g] for g in groups_ours}
            worst = min(diffs, key=diffs.__getitem__) if diffs else None
            entry["versus_syncc"] = {
                "dice": harness.paired_difference(by_pair(ours, "mean_dice"), by_pair(syncc, "mean_dice")),
                "groups": {g: {"ours": groups_ours[g], "syncc": groups_syncc[g], "difference": diffs[g]} for g in diffs},
                "worst_group": worst,
                "groups_more_than_margin_below": [g for g, d in diffs.items() if d < -GROUP_MARGIN],
            }
        out[name] = entry
    return out


def finish(doc: dict[str, Any], out: Path) -> None:
    """Summaries and comparisons into ``doc``; write the JSON to ``out``."""
    for method in doc["methods"].values():
        method["summary"] = summarize(method)
    doc["comparisons"] = compare(doc)
    harness.write_json(out, doc)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name=--config configs/x.yaml`` → ``("PatchMorph, name", ["--config", "configs/x.yaml"])``."""
    name, _, options = text.partition("=")
    return f"PatchMorph, {name.strip()}", shlex.split(options)


def run(
    pairs: list[tuple[str, str]], variants: list[str], skip_syn: bool, nice: int, out: Path = RESULTS_JSON
) -> dict[str, Any]:
    """The benchmark: every PatchMorph method, then ANTs SyN, pair after pair; SyNCC merged from its file."""
    inputs = prepare()
    ours: dict[str, list[str]] = {"PatchMorph": []}
    ours.update(parse_variant(v) for v in variants)
    doc: dict[str, Any] = {
        "benchmark": "accuracy",
        "command": harness.recorded_command(),
        "machine": harness.machine(),
        "subjects": inputs,
        "synthesis": {**SYNTH, "intensity_seed": INTENSITY_SEED, "factor": FACTOR, "margin_vox": MARGIN_VOX},
        "structures": {str(k): v for k, v in STANDARD_FS_LABELS.items()},
        "structure_groups": {g: list(ids) for g, ids in STRUCTURE_GROUPS.items()},
        "methods": {
            name: {"kind": "patchmorph", "register_options": options, "pairs": []} for name, options in ours.items()
        },
    }
    if not skip_syn:
        doc["methods"]["ANTs SyN"] = {"kind": "ants", "transform": "SyN", "pairs": []}
    if SYNCC_JSON.is_file():
        stored = json.loads(SYNCC_JSON.read_text())
        doc["methods"]["ANTs SyNCC"] = {"kind": "ants", "transform": "SyNCC", "command": stored["command"],
                                        "stored": str(SYNCC_JSON.relative_to(ROOT)), "pairs": stored["pairs"]}  # fmt: skip
    for fixed, moving in pairs:  # alternate ours and SyN pair by pair: both see the same machine load
        for name, options in ours.items():
            folder = OUT / ("patchmorph" if name == "PatchMorph" else name.split(", ")[1]) / f"{fixed}_{moving}"
            record = ours_pair(fixed, moving, folder, options)
            doc["methods"][name]["pairs"].append(record)
            logger.info("%s %s:%s Dice %.4f, register %.1f s", name, fixed, moving, record["mean_dice"],
                        record["register_seconds"])  # fmt: skip
        if not skip_syn:
            record = ants_pair(fixed, moving, "SyN", OUT / "syn" / f"{fixed}_{moving}", nice)
            doc["methods"]["ANTs SyN"]["pairs"].append(record)
            logger.info("ANTs SyN %s:%s Dice %.4f, process %.1f s (registration %.1f s)", fixed, moving,
                        record["mean_dice"], record["process_seconds"], record["register_seconds"])  # fmt: skip
        finish(doc, out)
    finish(doc, out)
    return doc


def main() -> None:
    """Command line (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_prep = sub.add_parser("prepare", help="write the synthetic NIfTI inputs")
    p_prep.add_argument("--overwrite", action="store_true")
    p_ants = sub.add_parser("ants", help="run one ANTs method on some pairs")
    p_ants.add_argument("--transform", choices=["SyN", "SyNCC"], required=True)
    p_ants.add_argument("--pairs", help="fixed:moving,... (default: all 12)")
    p_ants.add_argument("--json", type=Path, required=True)
    p_ants.add_argument("--nice", type=int, default=0, help="nice level of the ANTs process")
    p_run = sub.add_parser("run", help="PatchMorph (command line) + ANTs SyN, SyNCC merged; JSON + tables")
    p_run.add_argument("--pairs", help="fixed:moving,... (default: all 12)")
    p_run.add_argument(
        "--variant", action="append", default=[],
        help='another PatchMorph method: NAME="register options", e.g. fast="--config configs/register_fast.yaml"',
    )  # fmt: skip
    p_run.add_argument("--skip-syn", action="store_true", help="PatchMorph only (no SyN beside it)")
    harness.add_run_options(p_run, RESULTS_JSON)
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.overwrite)
    elif args.cmd == "ants":
        prepare()
        run_ants(parse_pairs(args.pairs), args.transform, args.nice, args.json)
    else:
        import report

        doc = run(parse_pairs(args.pairs), args.variant, args.skip_syn, args.nice, args.out)
        print(report.accuracy_section(doc))
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
