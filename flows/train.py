"""Flow ``train``: train a PatchMorph model from a training YAML (:class:`patchmorph_core.config.TrainConfig`).

One task wraps :func:`pipeline.training_data.run_training` (the same function as ``patchmorph train``); the
flow publishes the final loss and checkpoint as a markdown artifact. Training uses this process's torch
threads or GPU, so the flow keeps Prefect's default (thread) task runner.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict

from flows.artifacts import artifact_key
from flows.settings import project_logs_in_the_run
from flows.tasks import retry_on_transient
from pipeline.training_data import run_training

FLOW_NAME = "train"


class TrainSummary(BaseModel):
    """What a training run did (the flow's return value)."""

    model_config = ConfigDict(extra="forbid")

    steps: int
    final_loss: float
    seconds: float
    checkpoint: Path
    loss_csv: Path


@task(name="train", retry_condition_fn=retry_on_transient, persist_result=False)
def train_task(config: Path, steps: int | None, resume: bool, overwrite: bool) -> TrainSummary:
    """:func:`pipeline.training_data.run_training` as a task."""
    result = run_training(config, resume=resume, steps=steps, overwrite=overwrite)
    return TrainSummary(
        steps=result.steps,
        final_loss=result.final_loss,
        seconds=result.seconds,
        checkpoint=Path(result.checkpoint),
        loss_csv=Path(result.loss_csv),
    )


@flow(name=FLOW_NAME)
def train(config: str, steps: int | None = None, resume: bool = False, overwrite: bool = False) -> TrainSummary:
    """Train from the YAML ``config`` (``steps`` overrides its step count; ``resume`` continues a checkpoint,
    ``overwrite`` replaces it; an existing checkpoint is refused without either)."""
    with project_logs_in_the_run():
        summary = train_task(Path(config), steps, resume, overwrite)
    create_markdown_artifact(
        key=artifact_key(FLOW_NAME, "summary"),
        markdown=(
            "| steps | final loss | seconds | checkpoint | loss curve |\n|---|---|---|---|---|\n"
            f"| {summary.steps} | {summary.final_loss:.4g} | {summary.seconds:.0f} | "
            f"`{summary.checkpoint}` | `{summary.loss_csv}` |\n"
        ),
        description=f"training run from {config}",
    )
    return summary
