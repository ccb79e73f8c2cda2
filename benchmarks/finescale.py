"""Accuracy at fine scales against a known answer (issue 23): the real STP brain deformed by a known smooth
field with components from whole-brain down to ~100 µm wavelength, registered back at several field spacings.

The moving image is the real STP mouse brain (``examples/mouse_stp_brainreg``, 50×40×40 µm, ``psl``); the fixed
image is the same brain pulled through a known displacement ``u`` (``fixed(x) = brain(x + u(x))``, linear
interpolation), so a perfect registration returns ``u`` itself. ``u`` is a sum of band-limited random fields
(:func:`fields.band_limited_field`), one per band of wavelengths delimited by :data:`BAND_EDGES_UM`, each with
the RMS length :data:`BAND_RMS_UM` inside the brain: the same RMS strain per band (amplitude proportional to
wavelength), so every band is equally far from folding and none dominates the strain.

Each setting (``--spacing S`` → ``patchmorph register --field-spacing Sum``; ``--network-alone S`` → the same
with a config of ``polish_iterations: 0``, the network's cascade without the polish; ``--stages N`` → a config
with ``n_stages: N``; ``--setting NAME="options"`` for anything else) runs ``patchmorph convert / register / evaluate`` from an empty folder. The field is resampled
(linearly) onto the fixed image's voxels and split into the same bands as the truth (:func:`fields.band_errors`);
per band and setting: the truth's and the error's median and p95 length (µm) inside the brain, and the share
of the band recovered (``1 - rms(error) / rms(truth)``). ANTs SyN (antspyx defaults) registers copies of both
images resampled to ``--ants-spacing`` µm, where it fits in time; its composed field is scored the same way.

Usage (from the repository root; the first run writes the deformed brain, ~1 min)::

    .venv/bin/python benchmarks/finescale.py run --spacing 400 200 100 50 --ants-spacing 100
    .venv/bin/python benchmarks/finescale.py run --spacing 400 200 100 --ants-spacing 100 \
        --setting "field 100 µm, one contrast=--field-spacing 100um --config configs/register_one_contrast.yaml"
    .venv/bin/python benchmarks/finescale.py run --spacing 200 100 --network-alone 200 100   # the polish's part

Writes ``benchmarks/results/finescale.json`` after every setting; ``benchmarks/report.py`` makes the tables.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import accuracy
import fields
import harness
import numpy as np

from patchmorph_core.spatial import Grid

logger = logging.getLogger("benchmarks.finescale")

OUT = harness.OUT / "finescale"
RESULTS_JSON = harness.RESULTS / "finescale.json"
SEED = 2327
BAND_EDGES_UM: tuple[float, ...] = (3200.0, 1600.0, 800.0, 400.0, 200.0, 100.0)
"""Band edges (wavelengths, µm): > 3.2 mm (whole brain), octaves down to 100-200 µm, and < 100 µm."""
STRAIN = 0.08
"""RMS strain of each band: its RMS length is ``STRAIN × λ / (2π)`` at the band's middle wavelength ``λ``."""
INTERIOR_UM = 500.0
"""Band errors are taken inside the brain at least this far (µm) from its surface: a band's filter reaches a
few σ beyond a voxel, and outside the brain the field is unconstrained (the total error uses the whole brain)."""


def band_rms_um() -> tuple[float, ...]:
    """RMS length per band: equal strain (:data:`STRAIN`) at the band's geometric middle; the band above the
    longest edge at twice that edge, the band below the shortest edge empty."""
    edges = list(BAND_EDGES_UM)
    middles = [2 * edges[0]] + [float(np.sqrt(a * b)) for a, b in zip(edges, edges[1:], strict=False)]
    return (*(STRAIN * m / (2 * np.pi) for m in middles), 0.0)


def inputs_key() -> str:
    """What the prepared inputs depend on: the deformation's settings and the source of the code that makes
    them (this module's :func:`prepare`, :mod:`fields`, :mod:`harness`), hashed; inputs written under another
    key are written again, never reused."""
    return harness.inputs_key((SEED, BAND_EDGES_UM, band_rms_um(), STRAIN), [prepare, fields, harness])


def prepare(folder: Path) -> dict[str, Any]:
    """Write (once per :func:`inputs_key`; anything derived from older inputs is removed) the moving brain, the
    deformed fixed brain, its tissue mask (NIfTI, mm) and the true field (``truth_um.npy``, ``(3, Z, Y, X)`` µm on
    the brain's grid); return the inputs' paths and figures."""
    from scipy import ndimage

    from pipeline.demo import BRAIN_ORIENTATION, BRAIN_VOXEL_SIZE_UM, read_tiff

    paths = {
        "moving": folder / "brain.nii.gz",
        "fixed": folder / "brain_deformed.nii.gz",
        "tissue": folder / "tissue_deformed.nii.gz",
        "truth": folder / "truth_um.npy",
    }
    brain = read_tiff(harness.EXAMPLES / "mouse_stp_brainreg" / "brain_50x40x40um_psl.tif").astype(np.float32)
    grid = Grid.from_orientation(brain.shape, BRAIN_VOXEL_SIZE_UM, BRAIN_ORIENTATION, unit="micrometer")
    tissue = harness.tissue_mask(brain)
    key = inputs_key()
    if not harness.prepared(folder, key, paths.values()):
        for stale in folder.glob("*.nii.gz"):  # also the resampled copies derived from them (ants_inputs)
            stale.unlink()
        truth = fields.band_limited_field(
            grid, BAND_EDGES_UM, band_rms_um(), np.random.default_rng(SEED), tissue
        )
        fixed = fields.warp_array(brain, grid, grid, truth, order=1)
        accuracy.save_nifti(paths["moving"], brain, grid)
        accuracy.save_nifti(paths["fixed"], fixed, grid)
        accuracy.save_nifti(
            paths["tissue"], fields.warp_array(tissue.astype(np.uint8), grid, grid, truth, 0), grid
        )
        np.save(paths["truth"], truth)
        harness.mark_prepared(folder, key)
    truth = np.load(paths["truth"])
    mask = fields.warp_array(tissue.astype(np.uint8), grid, grid, truth, order=0) > 0
    interior = ndimage.distance_transform_edt(mask, sampling=grid.spacing) > INTERIOR_UM
    truth_bands = fields.band_stats(truth, grid, BAND_EDGES_UM, interior)
    return {
        "paths": paths,
        "grid": grid,
        "mask": mask,
        "interior": interior,
        "truth": truth,
        "truth_bands": truth_bands,
        "figures": {
            "shape": list(grid.shape),
            "spacing_um": grid.spacing.tolist(),
            "interior_um": INTERIOR_UM,
            "interior_share": float(interior.sum() / mask.sum()),
            "truth_um": fields.length_stats(truth, mask),
            "truth_folds": fields.folds(truth, grid, mask),
            "truth_bands_um": [
                {"band": b.label(), **row}
                for b, row in zip(fields.bands(BAND_EDGES_UM), truth_bands, strict=True)
            ],
            "band_edges_um": BAND_EDGES_UM,
            "band_rms_um": band_rms_um(),
            "strain": STRAIN,
            "seed": SEED,
        },
    }


def ants_inputs(folder: Path, inputs: dict[str, Any], spacing: float) -> dict[str, Path]:
    """Both brains and the fixed mask resampled to an isotropic ``spacing`` (µm) for ANTs (Gaussian
    anti-aliasing first), NIfTI."""
    from scipy import ndimage

    from patchmorph_core.spatial import resample
    from pipeline.evaluate import load_volume

    grid: Grid = inputs["grid"]
    coarse = grid.resampled(spacing)
    paths = {k: folder / f"{k}_{spacing:g}um.nii.gz" for k in ("fixed", "moving", "tissue")}
    if all(p.exists() for p in paths.values()):
        return paths
    sigma = 0.5 * np.sqrt(np.maximum((spacing / grid.spacing) ** 2 - 1.0, 0.0))
    for key in ("fixed", "moving"):
        image, _ = load_volume(inputs["paths"][key])
        small = resample(
            ndimage.gaussian_filter(np.asarray(image, np.float32), sigma), grid, coarse.points(), order=1
        )
        accuracy.save_nifti(paths[key], small, coarse)
    tissue = resample(inputs["mask"].astype(np.uint8), grid, coarse.points(), order=0, dtype=np.uint8)
    accuracy.save_nifti(paths["tissue"], tissue, coarse)
    return paths


def score(estimate: np.ndarray, inputs: dict[str, Any]) -> dict[str, Any]:
    """Error of a field on the brain's grid (µm): in total inside the fixed brain and inside its interior, and
    per band of wavelengths inside the interior (:data:`INTERIOR_UM`)."""
    grid, truth, interior = inputs["grid"], inputs["truth"], inputs["interior"]
    rows = fields.band_errors(estimate, truth, grid, BAND_EDGES_UM, interior, inputs["truth_bands"])
    return {
        "error_um": fields.length_stats(estimate - truth, inputs["mask"]),
        "error_um_interior": fields.length_stats(estimate - truth, interior),
        "bands": rows,
    }


def estimate_of(record: dict[str, Any], inputs: dict[str, Any]) -> np.ndarray:
    """The field a setting's record points to (ours: OME-Zarr; ANTs: ITK NIfTI), on the brain's grid (µm)."""
    from pipeline.ngff import read_field

    path = harness.REPO / record["field"] if "field" in record else field_path(record)
    if path.name.endswith(".nii.gz"):
        field, grid = fields.read_itk_field(path)
    else:
        array, grid, _ = read_field(path)
        field = np.asarray(array, np.float32)
    return fields.field_on_grid(field, grid, inputs["grid"])


def field_path(record: dict[str, Any]) -> Path:
    """Where a setting's run left its field (for records that do not name it)."""
    if "image_spacing_um" in record:
        return OUT / "runs" / f"ants_syn_{record['image_spacing_um']:g}um" / "field.nii.gz"
    return OUT / "runs" / record["setting"] / "field.ome.zarr"


def rescore(path: Path) -> dict[str, Any]:
    """Score every setting of a results JSON again from the fields its runs left (e.g. after a change of the
    scoring), without registering again."""
    import json

    inputs = prepare(OUT / "data")
    doc = json.loads(path.read_text())
    doc["inputs"] = inputs["figures"]
    for record in doc["settings"]:
        record.update(score(estimate_of(record, inputs), inputs))
    doc["rescored"] = harness.recorded_command()
    harness.write_json(path, doc)
    return doc


def ours(name: str, options: list[str], inputs: dict[str, Any], nice: int) -> dict[str, Any]:
    """One setting through ``patchmorph convert / register / evaluate``; its record."""
    from pipeline.ngff import read_field

    run = harness.CommandRun(harness.empty_folder(OUT / "runs" / name))
    log = run.path("commands.log")
    paths = inputs["paths"]
    convert = [
        harness.run_timed(
            harness.patchmorph("convert", paths[k], run.path(f"{k}.ome.zarr"), *extra), log, nice
        )
        for k, extra in (("fixed", ()), ("moving", ()), ("tissue", ("--labels",)))
    ]
    run.times["convert"] = harness.Timed(sum(t.seconds for t in convert), sum(t.cpu_seconds for t in convert))
    run.times["register"] = harness.run_timed(
        harness.patchmorph("register", "--fixed", run.path("fixed.ome.zarr"), "--moving", run.path("moving.ome.zarr"),
                           "--out", run.path("field.ome.zarr"), *options),
        log, nice,
    )  # fmt: skip
    run.times["evaluate"] = harness.run_timed(
        harness.patchmorph("evaluate", "--field", run.path("field.ome.zarr"), "--mask", run.path("tissue.ome.zarr"),
                           "--out", run.path("evaluate.json")),
        log, nice,
    )  # fmt: skip
    _, field_grid, _ = read_field(run.path("field.ome.zarr"))
    evaluation = harness.read_evaluation(run)
    record = {
        "setting": name,
        "register_options": options,
        "field": str(run.path("field.ome.zarr").relative_to(harness.REPO)),
        "field_shape": list(field_grid.shape),
        "field_voxels": int(np.prod(field_grid.shape)),
        "field_spacing_um": field_grid.with_unit("micrometer").spacing.round(2).tolist(),
        "folding_percent_in_brain": evaluation["folding_percent"],
        "jacobian_min_in_brain": evaluation["jacobian_min"],
        **run.timings(),
    }
    return record | score(estimate_of(record, inputs), inputs)


def ants(spacing: float, inputs: dict[str, Any], nice: int) -> dict[str, Any]:
    """ANTs SyN on copies at ``spacing`` µm; its composed field scored on the brain's grid."""
    folder = OUT / "runs" / f"ants_syn_{spacing:g}um"
    small = ants_inputs(OUT / "data", inputs, spacing)
    record = harness.run_ants_pair(
        small["fixed"],
        small["moving"],
        None,
        folder,
        "SyN",
        fixed_labels=small["tissue"],
        write_field=True,
        nice=nice,
    )
    record = {
        "setting": f"ANTs SyN at {spacing:g} µm",
        "image_spacing_um": spacing,
        "field": str((folder / "field.nii.gz").relative_to(harness.REPO)),
        **record,
    }
    return record | score(estimate_of(record, inputs), inputs)


def settings(args: argparse.Namespace) -> dict[str, list[str]]:
    """Setting name → ``patchmorph register`` options, from ``--spacing``, ``--stages`` and ``--setting``."""
    out: dict[str, list[str]] = {}
    for spacing in args.spacing:
        out[f"field {spacing:g} µm"] = ["--field-spacing", f"{spacing:g}um"]
    for spacing in args.network_alone:
        config = OUT / "configs" / "network_alone.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text("polish_iterations: 0\n")
        out[f"field {spacing:g} µm, network alone"] = ["--field-spacing", f"{spacing:g}um", "--config", str(config)]
    for stages in args.stages:
        config = OUT / "configs" / f"stages{stages}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f"n_stages: {stages}\n")
        out[f"{stages} stages"] = ["--config", str(config)]
    for text in args.setting:
        name, _, options = text.partition("=")
        out[name.strip()] = shlex.split(options)
    return out or {"default": []}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting, then ANTs at every ``--ants-spacing``; the JSON rewritten after each."""
    inputs = prepare(OUT / "data")
    doc: dict[str, Any] = {
        "benchmark": "finescale",
        "command": harness.recorded_command(),
        "machine": harness.machine(),
        "inputs": inputs["figures"],
        "settings": [],
    }
    for name, options in settings(args).items():
        doc["settings"].append(ours(name, options, inputs, args.nice))
        logger.info("%s: error median %.1f µm", name, doc["settings"][-1]["error_um"]["median"])
        harness.write_json(args.out, doc)
    for spacing in args.ants_spacing:
        doc["settings"].append(ants(spacing, inputs, args.nice))
        harness.write_json(args.out, doc)
    return doc


def main() -> None:
    """Command line (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run the benchmark (JSON + tables)")
    p_run.add_argument(
        "--spacing", type=float, nargs="*", default=[], help="field spacings in µm (--field-spacing)"
    )
    p_run.add_argument(
        "--network-alone", type=float, nargs="*", default=[], help="field spacings in µm without the polish"
    )
    p_run.add_argument("--stages", type=int, nargs="*", default=[], help="cascade stage counts (n_stages)")
    p_run.add_argument("--setting", action="append", default=[], help='NAME="register options"')
    p_run.add_argument(
        "--ants-spacing", type=float, nargs="*", default=[], help="ANTs SyN at these spacings (µm)"
    )
    harness.add_run_options(p_run, RESULTS_JSON)
    p_score = sub.add_parser("rescore", help="score the fields of an earlier run again (no registration)")
    p_score.add_argument("--out", type=Path, default=RESULTS_JSON, help="results JSON (default: %(default)s)")
    args = parser.parse_args()
    import report

    doc = rescore(args.out) if args.cmd == "rescore" else run(args)
    print(report.finescale_section(doc))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
