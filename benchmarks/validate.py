"""Validation Dice on training subjects 01-06: where inference settings are chosen, never on 07-10.

Six pairs of the training subjects (fixed ← moving: 01←02, 03←04, 05←06, 02←05, 06←03, 04←01), their images
synthesised exactly as the accuracy benchmark does (``accuracy.make_subject``: one fixed intensity per
structure, blur, bias, noise; native spaces). Each pair is registered in memory
(:func:`~patchmorph_core.inference.register_arrays`, the one-chunk case of ``register``), the moving labels
are warped onto the fixed grid (label voting, as ``patchmorph warp --labels`` does) and scored with the mean
Dice over the 28 standard structures.

Usage (from the repository root)::

    .venv/bin/python benchmarks/validate.py                          # default inference settings
    .venv/bin/python benchmarks/validate.py --set overlap=2.0 --set refine_passes=1
    .venv/bin/python benchmarks/validate.py --config configs/register_refine.yaml
    .venv/bin/python benchmarks/validate.py --seeds 0 1 --set overlap=1.5   # also the seed-to-seed spread

With ``--seeds A B`` every pair is registered once per seed (the lattice jitter) and the line also gives how
much the stochastic estimate depends on the seed: the RMS difference of the two fields (fixed units, inside
the fixed brain), relative to the RMS of the field's deformation beyond its mean, and the correlation of the
two uncertainty maps inside the brain (a usable uncertainty map must not be mostly seed noise).

Contrast and species (issue 25), ``--pairs``:

* ``human`` (default): the six pairs above, both images from one intensity table (one contrast).
* ``human-cross``: the same pairs, the moving image from its own intensity table drawn independently per
  structure (an MRI-like atlas against a microscopy brain, or two stains).
* ``mouse`` / ``mouse-cross``: three pairs made from the Allen CCF annotation (``examples/mouse_ccf``, 100 µm;
  ids renumbered 1..K): the moving labels are the annotation deformed by a known random smooth field (up to
  0.6 mm) and a small affine (up to 4°, ±4 % scale, 0.4 mm), both images synthesised (``-cross``: independent
  tables). Scored by the mean Dice over the structures of at least 1,000 voxels (1 mm³), and by the field
  error against the known answer inside the brain (median and 95th percentile, µm), with the Pearson
  correlation of the uncertainty map with that error (issue 24.4). Seeds 101-103: not the benchmark's.

``--ants SyN`` (or ``SyNCC``) also registers every pair with ANTs (``.venv-ants``, ``benchmarks/ants_register.py``,
mutual information for ``SyN``) in the same run, for the peer's Dice and time on the same pairs.

Inputs are cached in ``benchmarks/out/validation`` (git-ignored). Prints one line per pair and the mean
Dice, mean registration seconds and largest % of folded voxels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accuracy
import harness
import numpy as np
import yaml
from scipy import ndimage

from patchmorph_core.config import InferenceConfig
from patchmorph_core.displacement import FieldDisplacement, TranslationDisplacement
from patchmorph_core.inference import RegistrationResult
from patchmorph_core.metrics import dice_per_label, folding_percent
from patchmorph_core.model import load_model
from patchmorph_core.spatial import random_rotation
from patchmorph_core.synth import (
    STANDARD_FS_LABELS,
    random_intensities,
    random_smooth_field,
    synthesize_image,
)
from patchmorph_core.warping import warp_to_grid
from pipeline.importers import load_nrrd
from pipeline.ngff import read_image, write_image
from pipeline.register import register_arrays, resolve_config
from pipeline.training_data import renumber_labels

OUT = accuracy.ROOT / "benchmarks" / "out" / "validation"
PAIRS: tuple[tuple[str, str], ...] = (("01", "02"), ("03", "04"), ("05", "06"), ("02", "05"), ("06", "03"), ("04", "01"))
MOUSE_SEEDS: tuple[int, ...] = (101, 102, 103)
MOUSE_ANNOTATION = accuracy.ROOT / "examples" / "mouse_ccf" / "annotation_100um_2017_nearest_from25um.nrrd"
MOUSE_MIN_VOXELS = 1000
"""Structures scored by Dice on the mouse pairs: at least this many voxels (100 µm) in the fixed annotation."""
PAIR_SETS = ("human", "human-cross", "mouse", "mouse-cross")


@dataclass(frozen=True)
class ValidationPair:
    """One validation pair: image and label OME-Zarr paths, the labels scored, and the known field (mouse)."""

    name: str
    fixed_image: Path
    moving_image: Path
    fixed_labels: Path
    moving_labels: Path
    scored: tuple[int, ...]
    known_field: Path | None = None


def inputs_key(*settings: Any) -> str:
    """What the validation inputs depend on (:func:`harness.inputs_key`): ``settings`` and the code that makes
    them (this module, :mod:`accuracy`, :mod:`patchmorph_core.synth`, the OME-Zarr writer)."""
    from patchmorph_core import synth
    from pipeline import ngff

    return harness.inputs_key(settings, [sys.modules[__name__], accuracy, synth, ngff])


def prepare() -> None:
    """Write the training subjects' synthetic images and labels (OME-Zarr) once per :func:`inputs_key`, and each
    subject's second image from an intensity table of its own (``image_<id>_cross``)."""
    table = random_intensities(range(1, 500), np.random.default_rng(accuracy.INTENSITY_SEED))
    subjects = sorted({s for pair in PAIRS for s in pair})
    key = inputs_key(subjects, accuracy.inputs_key())
    names = [f"{kind}_{sid}{suffix}.ome.zarr" for sid in subjects for kind, suffix in (("image", ""), ("image", "_cross"), ("labels", ""))]
    if harness.prepared(OUT, key, [OUT / name for name in names]):
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for sid in subjects:
        labels, image, grid = accuracy.make_subject(sid, table)
        own = random_intensities(range(1, 500), np.random.default_rng(accuracy.INTENSITY_SEED + 100 + int(sid)))
        cross = synthesize_image(labels, np.random.default_rng(1000 + int(sid)), own, **accuracy.SYNTH)
        write_image(OUT / f"image_{sid}.ome.zarr", image, grid, name="image", overwrite=True)
        write_image(OUT / f"image_{sid}_cross.ome.zarr", cross, grid, name="image", overwrite=True)
        write_image(OUT / f"labels_{sid}.ome.zarr", labels, grid, name="labels", labels=True, overwrite=True)
    harness.mark_prepared(OUT, key)


def human_pairs(cross: bool) -> list[ValidationPair]:
    """The six human pairs (:data:`PAIRS`); ``cross``: the moving image in its own contrast."""
    prepare()
    suffix = "_cross" if cross else ""
    return [
        ValidationPair(
            f"{fixed} <- {moving}",
            OUT / f"image_{fixed}.ome.zarr",
            OUT / f"image_{moving}{suffix}.ome.zarr",
            OUT / f"labels_{fixed}.ome.zarr",
            OUT / f"labels_{moving}.ome.zarr",
            tuple(STANDARD_FS_LABELS),
        )
        for fixed, moving in PAIRS
    ]


def mouse_pairs(cross: bool) -> list[ValidationPair]:
    """The three mouse pairs (see module doc), written once per seed."""
    return [_mouse_pair(seed, cross) for seed in MOUSE_SEEDS]


def _mouse_pair(seed: int, cross: bool) -> ValidationPair:
    """Fixed: the CCF annotation synthesised; moving: the annotation through a known deformation (module doc)."""
    folder = OUT / f"mouse_{seed}"
    labels_path, field_path = folder / "labels_fixed.ome.zarr", folder / "known_field.npy"
    key = inputs_key(seed, MOUSE_ANNOTATION.name)
    names = ["image_fixed", "image_moving", "image_moving_cross", "labels_fixed", "labels_moving"]
    if not harness.prepared(folder, key, [field_path, *(folder / f"{n}.ome.zarr" for n in names)]):
        labels, grid = load_nrrd(MOUSE_ANNOTATION)
        labels = renumber_labels(np.rint(labels).astype(np.int64))
        rng = np.random.default_rng(seed)
        pull = known_pull(labels.shape, rng)  # (3, Z, Y, X) index displacement: moving(y) = fixed(y + pull(y))
        moving = ndimage.map_coordinates(labels, np.indices(labels.shape) + pull, order=0, mode="constant")
        tables = [random_intensities(range(1, int(labels.max()) + 1), rng) for _ in range(2)]
        folder.mkdir(parents=True, exist_ok=True)
        for name, lab, table in (("fixed", labels, tables[0]), ("moving", moving, tables[0]), ("moving_cross", moving, tables[1])):
            image = synthesize_image(lab, rng, table, skull_strip=False, **accuracy.SYNTH)
            write_image(folder / f"image_{name}.ome.zarr", image, grid, name="image", overwrite=True)
        write_image(labels_path, labels, grid, name="labels", labels=True, overwrite=True)
        write_image(folder / "labels_moving.ome.zarr", moving, grid, name="labels", labels=True, overwrite=True)
        np.save(field_path, np.einsum("ij,jzyx->izyx", grid.linear, inverse_displacement(pull)).astype(np.float32))
        harness.mark_prepared(folder, key)
    ids, counts = np.unique(np.asarray(read_image(labels_path).levels[0].array), return_counts=True)
    scored = tuple(int(i) for i, n in zip(ids, counts, strict=True) if i > 0 and n >= MOUSE_MIN_VOXELS)
    return ValidationPair(
        f"mouse {seed}",
        folder / "image_fixed.ome.zarr",
        folder / ("image_moving_cross.ome.zarr" if cross else "image_moving.ome.zarr"),
        labels_path,
        folder / "labels_moving.ome.zarr",
        scored,
        field_path,
    )


def known_pull(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """``(3, Z, Y, X)`` index displacement ``w`` of the moving image (``moving(y) = fixed(y + w(y))``): a random
    smooth field of up to 6 voxels (lattice of 12 voxels) plus an affine about the centre (up to 4°, ±4 %
    scale, 4 voxels)."""
    smooth = random_smooth_field(shape, rng, 6.0, smoothness_vox=12.0)
    matrix = random_rotation(rng, 4.0) * float(np.exp(rng.uniform(-0.04, 0.04)))
    centre = (np.asarray(shape) - 1) / 2.0
    offset = np.indices(shape, dtype=np.float64) - centre[:, None, None, None]
    affine = np.einsum("ij,jzyx->izyx", matrix - np.eye(3), offset) + rng.uniform(-4, 4, size=3)[:, None, None, None]
    return (smooth + affine).astype(np.float32)


def inverse_displacement(pull: np.ndarray, iterations: int = 30) -> np.ndarray:
    """``u`` with ``x + u(x) = y`` where ``y + pull(y) = x``: the fixed → moving field in index units, by the
    fixed-point iteration ``u(x) = −pull(x + u(x))`` (converges for ``|∇ pull| < 1``)."""
    grid = np.indices(pull.shape[1:], dtype=np.float32)
    u = -pull
    for _ in range(iterations):
        u = -np.stack([ndimage.map_coordinates(c, grid + u, order=1, mode="nearest") for c in pull])
    return u


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="inference YAML (default: the packaged defaults)")
    parser.add_argument("--set", action="append", default=[], help="override one setting, key=value (YAML value)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="register with each of these seeds (default: the config's)"
    )
    parser.add_argument("--pairs", choices=PAIR_SETS, default="human", help="which validation pairs (module doc)")
    parser.add_argument("--ants", choices=("SyN", "SyNCC"), default=None, help="also register each pair with ANTs")
    args = parser.parse_args()
    pairs = mouse_pairs(args.pairs.endswith("cross")) if args.pairs.startswith("mouse") else human_pairs(args.pairs.endswith("cross"))
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    config = resolve_config(args.config).model_copy(update=overrides)
    model = load_model(config.weights)
    seeds = args.seeds or [config.seed]
    dice, seconds, folds, spreads, errors, ants = [], [], [], [], [], []
    for pair in pairs:
        results = []
        for seed in seeds:
            result, pair_seconds = _register(model, pair, config.model_copy(update={"seed": seed}))
            seconds.append(pair_seconds)
            dice.append(_dice(pair, result))
            folds.append(folding_percent(result.field, result.grid))
            results.append(result)
            line = (
                f"{pair.name} (seed {seed}): Dice {dice[-1]:.4f} (before {_dice(pair, None):.4f}), {seconds[-1]:.2f} s, "
                f"folded {folds[-1]:.4f} %"
            )
            if pair.known_field is not None:
                errors.append(field_error(pair, result))
                line += (
                    f", field error median {errors[-1]['median_um']:.0f} um, p95 {errors[-1]['p95_um']:.0f} um, "
                    f"uncertainty-error correlation {errors[-1]['uncertainty_error_corr']:.3f}"
                )
            print(line, flush=True)
        if len(results) > 1:
            spreads.append(seed_spread(results[0], results[1], pair))
            print(
                f"{pair.name}: seeds {seeds[0]} vs {seeds[1]}: field RMS difference "
                f"{spreads[-1]['field_rms_diff']:.4f} ({100 * spreads[-1]['relative']:.1f} % of the deformation), "
                f"uncertainty correlation {spreads[-1]['uncertainty_corr']:.3f}",
                flush=True,
            )
        if args.ants:
            ants.append(run_ants(pair, args.ants))
            print(f"{pair.name}: ANTs {args.ants} Dice {ants[-1]['dice']:.4f}, {ants[-1]['register_seconds']:.2f} s", flush=True)
    print(
        f"mean Dice {np.mean(dice):.4f} over {len(pairs)} {args.pairs} pairs x {len(seeds)} seeds; mean "
        f"{np.mean(seconds):.2f} s a registration (the first includes warm-up); folded at most {max(folds):.4f} % "
        f"({overrides or 'defaults'}, {args.config})"
    )
    if errors:
        print(
            f"field error: median {np.mean([e['median_um'] for e in errors]):.0f} um, p95 "
            f"{np.mean([e['p95_um'] for e in errors]):.0f} um, uncertainty-error correlation "
            f"{np.mean([e['uncertainty_error_corr'] for e in errors]):.3f} (means over pairs)"
        )
    if spreads:
        print(
            "seed to seed: field RMS difference "
            f"{np.mean([s['field_rms_diff'] for s in spreads]):.4f} "
            f"({100 * np.mean([s['relative'] for s in spreads]):.1f} % of the deformation), uncertainty "
            f"correlation {np.mean([s['uncertainty_corr'] for s in spreads]):.3f} (means over pairs)"
        )
    if ants:
        print(
            f"ANTs {args.ants}: mean Dice {np.mean([a['dice'] for a in ants]):.4f}, mean "
            f"{np.mean([a['register_seconds'] for a in ants]):.2f} s a registration"
        )


def _register(model: Any, pair: ValidationPair, config: InferenceConfig) -> tuple[RegistrationResult, float]:
    """One in-memory registration of a validation pair and its wall seconds."""
    fixed_img = accuracy.in_memory_image(pair.fixed_image)
    moving_img = accuracy.in_memory_image(pair.moving_image)
    tic = time.perf_counter()
    result = register_arrays(model, fixed_img, moving_img, config, show_progress=False)
    return result, time.perf_counter() - tic


def _dice(pair: ValidationPair, result: RegistrationResult | None) -> float:
    """Mean Dice over the scored structures of the moving labels warped (label voting) onto the fixed grid
    (None: the labels as they lie, before registration)."""
    fixed_labels = read_image(pair.fixed_labels).levels[0]
    displacement = TranslationDisplacement(np.zeros(3)) if result is None else FieldDisplacement(result.field, result.grid)
    warped = warp_to_grid(accuracy.in_memory_image(pair.moving_labels), displacement, fixed_labels.grid, "vote")
    return mean_dice(np.asarray(fixed_labels.array), warped, pair.scored)


def mean_dice(fixed_labels: np.ndarray, warped_labels: np.ndarray, scored: tuple[int, ...]) -> float:
    """Mean Dice over the ``scored`` label ids (NaN ids, absent from both, left out)."""
    ids = {int(i): str(i) for i in scored}
    per_label = dice_per_label(np.rint(fixed_labels).astype(np.int32), np.rint(warped_labels).astype(np.int32), ids)
    return float(np.nanmean(list(per_label.values())))


def _inside(pair: ValidationPair, grid: Any) -> np.ndarray:
    """Field-grid voxels inside the fixed labels (nearest)."""
    labels = read_image(pair.fixed_labels).levels[0]
    return warp_to_grid(labels, TranslationDisplacement(np.zeros(3)), grid, "nearest") > 0


def field_error(pair: ValidationPair, result: RegistrationResult) -> dict[str, float]:
    """Error of the field against the known answer inside the fixed brain: median and 95th percentile of
    ``|u − u*|`` in µm, and the Pearson correlation of the uncertainty map with that error."""
    labels = read_image(pair.fixed_labels).levels[0]
    known = np.load(pair.known_field)  # (3, Z, Y, X) world displacement on the fixed labels' grid
    index = labels.grid.world_to_index_rows(result.grid.points().reshape(-1, 3))
    truth = np.stack([ndimage.map_coordinates(c, index, order=1, mode="nearest") for c in known])
    truth = truth.reshape(result.field.shape)
    inside = _inside(pair, result.grid)
    error = np.sqrt(np.sum((result.field - truth) ** 2, axis=0))[inside]
    scale = {"millimeter": 1000.0, "micrometer": 1.0}[result.grid.unit]
    return {
        "median_um": float(np.median(error) * scale),
        "p95_um": float(np.percentile(error, 95) * scale),
        "uncertainty_error_corr": float(np.corrcoef(result.uncertainty[inside], error)[0, 1]),
    }


def seed_spread(a: RegistrationResult, b: RegistrationResult, pair: ValidationPair) -> dict[str, float]:
    """How much two registrations of one pair that differ only in the seed differ, inside the fixed brain.

    Returns ``field_rms_diff`` (RMS of ``|u_a − u_b|``, fixed units), ``relative`` (that over the RMS of
    ``|u_a − mean(u_a)|``, the deformation beyond a translation) and ``uncertainty_corr`` (Pearson
    correlation of the two uncertainty maps), all over the field voxels inside the fixed labels.
    """
    inside = _inside(pair, a.grid)
    diff = np.sqrt(np.mean(np.sum((a.field - b.field) ** 2, axis=0)[inside]))
    centred = a.field[:, inside] - a.field[:, inside].mean(axis=1, keepdims=True)
    scale = np.sqrt(np.mean(np.sum(centred**2, axis=0)))
    corr = np.corrcoef(a.uncertainty[inside], b.uncertainty[inside])[0, 1]
    return {"field_rms_diff": float(diff), "relative": float(diff / scale), "uncertainty_corr": float(corr)}


def run_ants(pair: ValidationPair, transform: str) -> dict[str, Any]:
    """Register ``pair`` with ANTs (``benchmarks/ants_register.py`` in ``.venv-ants``); its record with the Dice."""
    from pipeline.importers import load_nifti

    folder = OUT / "ants" / f"{pair.name.replace(' <- ', '_').replace(' ', '_')}_{pair.moving_image.stem}_{transform}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, path in (("fixed", pair.fixed_image), ("moving", pair.moving_image), ("moving_labels", pair.moving_labels)):
        level = read_image(path).levels[0]
        paths[key] = folder / f"{key}.nii.gz"
        accuracy.save_nifti(paths[key], np.asarray(level.array), level.grid.with_unit("millimeter"))
    command = [
        str(accuracy.ANTS_PYTHON), str(accuracy.ROOT / "benchmarks" / "ants_register.py"),
        "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]), "--moving-labels", str(paths["moving_labels"]),
        "--transform", transform, "--out-labels", str(folder / "warped.nii.gz"), "--out-json", str(folder / "record.json"),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    record = json.loads((folder / "record.json").read_text())
    warped, _ = load_nifti(folder / "warped.nii.gz")
    record["dice"] = mean_dice(np.asarray(read_image(pair.fixed_labels).levels[0].array), warped, pair.scored)
    return record


if __name__ == "__main__":
    main()
