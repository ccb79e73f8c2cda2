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

Inputs are cached in ``benchmarks/out/validation`` (git-ignored). Prints one line per pair and the mean
Dice, mean registration seconds and largest % of folded voxels.
"""

from __future__ import annotations

import argparse
import time

import accuracy
import numpy as np
import yaml

from patchmorph_core.displacement import FieldDisplacement
from patchmorph_core.inference import register_arrays
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
    args = parser.parse_args()
    prepare()
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    config = resolve_config(args.config).model_copy(update=overrides)
    model = load_model(config.weights)
    dice, seconds, folds = [], [], []
    for fixed, moving in PAIRS:
        fixed_img = accuracy.in_memory_image(OUT / f"image_{fixed}.ome.zarr")
        moving_img = accuracy.in_memory_image(OUT / f"image_{moving}.ome.zarr")
        tic = time.perf_counter()
        result = register_arrays(model, fixed_img, moving_img, config, show_progress=False)
        seconds.append(time.perf_counter() - tic)
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
        dice.append(float(np.nanmean(list(per_label.values()))))
        folds.append(folding_percent(result.field, result.grid))
        print(f"{fixed} <- {moving}: Dice {dice[-1]:.4f}, {seconds[-1]:.2f} s, folded {folds[-1]:.4f} %", flush=True)
    print(
        f"mean Dice {np.mean(dice):.4f} over {len(PAIRS)} pairs; mean {np.mean(seconds):.2f} s a pair "
        f"(the first includes warm-up); folded at most {max(folds):.4f} % ({overrides or 'defaults'}, {args.config})"
    )


if __name__ == "__main__":
    main()
