"""Validation Dice on training subjects 01-06: where inference settings are chosen, never on 07-10.

Six pairs of the training subjects (fixed ← moving: 01←02, 03←04, 05←06, 02←05, 06←03, 04←01), their images
synthesised exactly as the accuracy benchmark does (``accuracy.make_subject``: one fixed intensity per
structure, blur, bias, noise; native spaces). Each pair is registered in memory
(:func:`~patchmorph_core.inference.register_arrays`, the one-chunk case of ``register``), the moving labels
are warped onto the fixed grid (nearest) and scored with the mean Dice over the 28 standard structures.

Usage (from the repository root)::

    .venv/bin/python benchmarks/validate.py                          # default inference settings
    .venv/bin/python benchmarks/validate.py --set overlap=2.0 --set refine_passes=1
    .venv/bin/python benchmarks/validate.py --config configs/register_refine.yaml
    .venv/bin/python benchmarks/validate.py --seeds 0 1 --set overlap=1.5   # also the seed-to-seed spread

With ``--seeds A B`` every pair is registered once per seed (the lattice jitter) and the line also gives how
much the stochastic estimate depends on the seed: the RMS difference of the two fields (fixed units, inside
the fixed brain), relative to the RMS of the field's deformation beyond its mean, and the correlation of the
two uncertainty maps inside the brain (a usable uncertainty map must not be mostly seed noise).

Inputs are cached in ``benchmarks/out/validation`` (git-ignored). Prints one line per pair and the mean
Dice, mean registration seconds and largest % of folded voxels.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import accuracy
import numpy as np
import yaml

from patchmorph_core.config import InferenceConfig
from patchmorph_core.displacement import FieldDisplacement, TranslationDisplacement
from patchmorph_core.inference import RegistrationResult, register_arrays
from patchmorph_core.metrics import dice_per_label, folding_percent
from patchmorph_core.model import load_model
from patchmorph_core.synth import STANDARD_FS_LABELS, random_intensities
from patchmorph_core.warping import warp_to_grid
from pipeline.ngff import read_image, write_image
from pipeline.register import resolve_config

OUT = accuracy.ROOT / "benchmarks" / "out" / "validation"
PAIRS: tuple[tuple[str, str], ...] = (("01", "02"), ("03", "04"), ("05", "06"), ("02", "05"), ("06", "03"), ("04", "01"))


def prepare() -> None:
    """Write the training subjects' synthetic images and labels (OME-Zarr) once."""
    table = random_intensities(range(1, 500), np.random.default_rng(accuracy.INTENSITY_SEED))
    OUT.mkdir(parents=True, exist_ok=True)
    for sid in sorted({s for pair in PAIRS for s in pair}):
        if (OUT / f"labels_{sid}.ome.zarr").exists():
            continue
        labels, image, grid = accuracy.make_subject(sid, table)
        write_image(OUT / f"image_{sid}.ome.zarr", image, grid, name="image", overwrite=True)
        write_image(OUT / f"labels_{sid}.ome.zarr", labels, grid, name="labels", labels=True, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="inference YAML (default: the packaged defaults)")
    parser.add_argument("--set", action="append", default=[], help="override one setting, key=value (YAML value)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="register with each of these seeds (default: the config's)"
    )
    args = parser.parse_args()
    prepare()
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    config = resolve_config(args.config).model_copy(update=overrides)
    model = load_model(config.weights)
    seeds = args.seeds or [config.seed]
    dice, seconds, folds, spreads = [], [], [], []
    for fixed, moving in PAIRS:
        results = []
        for seed in seeds:
            result, pair_seconds = _register(model, fixed, moving, config.model_copy(update={"seed": seed}))
            seconds.append(pair_seconds)
            dice.append(_dice(fixed, moving, result))
            folds.append(folding_percent(result.field, result.grid))
            results.append(result)
            print(
                f"{fixed} <- {moving} (seed {seed}): Dice {dice[-1]:.4f}, {seconds[-1]:.2f} s, "
                f"folded {folds[-1]:.4f} %",
                flush=True,
            )
        if len(results) > 1:
            spreads.append(seed_spread(results[0], results[1], fixed))
            print(
                f"{fixed} <- {moving}: seeds {seeds[0]} vs {seeds[1]}: field RMS difference "
                f"{spreads[-1]['field_rms_diff']:.4f} ({100 * spreads[-1]['relative']:.1f} % of the deformation), "
                f"uncertainty correlation {spreads[-1]['uncertainty_corr']:.3f}",
                flush=True,
            )
    print(
        f"mean Dice {np.mean(dice):.4f} over {len(PAIRS)} pairs x {len(seeds)} seeds; mean {np.mean(seconds):.2f} s "
        f"a registration (the first includes warm-up); folded at most {max(folds):.4f} % "
        f"({overrides or 'defaults'}, {args.config})"
    )
    if spreads:
        print(
            "seed to seed: field RMS difference "
            f"{np.mean([s['field_rms_diff'] for s in spreads]):.4f} "
            f"({100 * np.mean([s['relative'] for s in spreads]):.1f} % of the deformation), uncertainty "
            f"correlation {np.mean([s['uncertainty_corr'] for s in spreads]):.3f} (means over pairs)"
        )


def _register(model: Any, fixed: str, moving: str, config: InferenceConfig) -> tuple[RegistrationResult, float]:
    """One in-memory registration of a validation pair and its wall seconds."""
    fixed_img = accuracy.in_memory_image(OUT / f"image_{fixed}.ome.zarr")
    moving_img = accuracy.in_memory_image(OUT / f"image_{moving}.ome.zarr")
    tic = time.perf_counter()
    result = register_arrays(model, fixed_img, moving_img, config, show_progress=False)
    return result, time.perf_counter() - tic


def _dice(fixed: str, moving: str, result: RegistrationResult) -> float:
    """Mean Dice over the standard structures of the moving labels warped (nearest) onto the fixed grid."""
    fixed_labels = read_image(OUT / f"labels_{fixed}.ome.zarr").levels[0]
    warped = warp_to_grid(
        accuracy.in_memory_image(OUT / f"labels_{moving}.ome.zarr"),
        FieldDisplacement(result.field, result.grid),
        fixed_labels.grid,
        order=0,
    )  # fmt: skip
    per_label = dice_per_label(
        np.rint(np.asarray(fixed_labels.array)).astype(np.int32), np.rint(warped).astype(np.int32), STANDARD_FS_LABELS
    )  # fmt: skip
    return float(np.nanmean(list(per_label.values())))


def seed_spread(a: RegistrationResult, b: RegistrationResult, fixed: str) -> dict[str, float]:
    """How much two registrations of one pair that differ only in the seed differ, inside the fixed brain.

    Returns ``field_rms_diff`` (RMS of ``|u_a − u_b|``, fixed units), ``relative`` (that over the RMS of
    ``|u_a − mean(u_a)|``, the deformation beyond a translation) and ``uncertainty_corr`` (Pearson
    correlation of the two uncertainty maps), all over the field voxels inside the fixed labels.
    """
    labels = read_image(OUT / f"labels_{fixed}.ome.zarr").levels[0]
    inside = warp_to_grid(labels, TranslationDisplacement(np.zeros(3)), a.grid, order=0) > 0
    diff = np.sqrt(np.mean(np.sum((a.field - b.field) ** 2, axis=0)[inside]))
    centred = a.field[:, inside] - a.field[:, inside].mean(axis=1, keepdims=True)
    scale = np.sqrt(np.mean(np.sum(centred**2, axis=0)))
    corr = np.corrcoef(a.uncertainty[inside], b.uncertainty[inside])[0, 1]
    return {"field_rms_diff": float(diff), "relative": float(diff / scale), "uncertainty_corr": float(corr)}


if __name__ == "__main__":
    main()
