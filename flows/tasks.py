"""Thin Prefect tasks: each wraps ONE plain function of ``pipeline/`` that also runs without Prefect.

The tasks retry on transient failures only (:func:`retry_on_transient`: I/O errors other than a missing
or forbidden path, timeouts, lost connections); bad input (:class:`~patchmorph_core.errors.InputError`)
fails at once. Retries and delays are set per flow run with ``task.with_options(...)``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from prefect import Task, task
from prefect.client.schemas.objects import State, TaskRun

from flows.settings import PROJECT_LOGGERS, bad_input_without_traceback, copy_to_root_run
from patchmorph_core.config import InferenceConfig
from patchmorph_core.warping import LabelInterpolation
from pipeline import qc
from pipeline.atlas import AtlasOutputs, AtlasRange, BrainGeometry, atlas_item_outputs
from pipeline.checks import CheckOptions, check_brain_not_longer
from pipeline.importers import check_source_planes, convert
from pipeline.ngff import read_image
from pipeline.register import register_files
from pipeline.resume import output_lock
from pipeline.warp import warp_files

bad_input_without_traceback()  # also in a Dask worker, which imports this module to run a task: its failure's log

_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(error: BaseException | None) -> bool:
    """True for errors worth a retry: I/O hiccups, timeouts, dropped connections (not a bad path)."""
    return isinstance(error, OSError | TimeoutError) and not isinstance(error, _PERMANENT_OS_ERRORS)


def retry_on_transient(task_: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure's exception is transient."""
    error = state.data if isinstance(state.data, BaseException) else None
    return is_transient(error)


_TASK_DEFAULTS: dict[str, Any] = {"retry_condition_fn": retry_on_transient, "persist_result": False}

T = TypeVar("T")


class _ThreadWarnings(logging.Handler):
    """Collects the warnings (and worse) that the project's loggers give in one thread."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread: int | None = None
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append(record)


def _to_run_log(records: list[logging.LogRecord]) -> None:
    """Give ``records`` again through the task run's logger, so that they reach the run's log in the API and the
    UI from a Dask worker too, and, for a task of a subflow, the log of the flow run above it, named by the task
    (:func:`flows.settings.copy_to_root_run`; nothing outside a task run)."""
    from prefect.context import TaskRunContext
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        run_log = get_run_logger()
    except MissingContextError:
        return
    for record in records:
        run_log.log(record.levelno, "%s: %s", record.name, record.getMessage())
    context = TaskRunContext.get()
    where = f"{context.task_run.name}: " if context is not None else ""
    for record in records:
        copy_to_root_run([record], prefix=f"{where}{record.name}: ")


def run_isolated(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``func`` in a fresh thread, outside the Dask worker's task context.

    A Prefect task on the DaskTaskRunner runs inside a Dask worker. The plain functions start Dask work
    of their own (a threaded cluster for chunks, ``dask.compute`` for conversion); called from the
    worker's task thread, Dask would route that work to the *outer* worker (``get_worker()`` and the
    worker's client are found through thread-local and context variables). A new thread starts with
    neither, so the function behaves exactly as when called from a notebook. The warnings the project's
    loggers give in that thread go to the task run's log afterwards (:data:`flows.settings.PROJECT_LOGGERS`).
    """
    relay = _ThreadWarnings()
    loggers = [logging.getLogger(name) for name in PROJECT_LOGGERS]

    def call() -> T:
        relay.thread = threading.get_ident()
        return func(*args, **kwargs)

    for logger in loggers:
        logger.addHandler(relay)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="patchmorph-task") as pool:
            return pool.submit(call).result()
    finally:
        for logger in loggers:
            logger.removeHandler(relay)
        _to_run_log(relay.records)


def conversion_record(target: Path) -> Path:
    """The record beside a converted input naming what it was converted from (``<target>.source.json``)."""
    return target.with_name(target.name + ".source.json")


def converted_from(target: Path, key: str) -> bool:
    """Whether ``target`` holds the conversion whose source and geometry have the fingerprint ``key``."""
    record = conversion_record(target)
    return target.exists() and record.is_file() and json.loads(record.read_text()).get("fingerprint") == key


@task(name="convert", task_run_name="convert {target.parent.name}/{target.name}", **_TASK_DEFAULTS)
def convert_task(
    source: Path,
    target: Path,
    voxel_size: tuple[float, float, float] | None,
    unit: str | None,
    orientation: str | None,
    labels: bool,
    key: str,
    channel_index: int | None = None,
) -> Path:
    """:func:`pipeline.importers.convert`: any supported input → OME-Zarr 0.5 at ``target`` (replaced), recorded
    with ``key`` (the fingerprint of its source and geometry; ``channel_index``: the channel of a multi-channel
    source); an image whose mid-planes are constant or not
    finite is refused first (:func:`pipeline.importers.check_source_planes`). A shared input (the atlas) that
    another run is converting is waited for, and kept when that run made the same."""
    with output_lock(conversion_record(target), wait=True):  # not the target's own lock: convert holds that
        if converted_from(target, key):
            return target
        conversion_record(target).unlink(missing_ok=True)
        if not labels:
            check_source_planes(
                source, "image", voxel_size=voxel_size, unit=unit, orientation=orientation, channel_index=channel_index
            )
        written = run_isolated(
            convert,
            source,
            target,
            voxel_size=voxel_size,
            unit=unit,
            orientation=orientation,
            overwrite=True,
            labels=labels,
            channel_index=channel_index,
        )
        conversion_record(target).write_text(json.dumps({"fingerprint": key}))
    return Path(written)


@task(name="register", task_run_name="register {out.parent.name}", **_TASK_DEFAULTS)
def register_task(
    fixed: Path,
    moving: Path,
    out: Path,
    config: InferenceConfig,
    chunk_size: int | None,
    scheduler: str,
    workers: int | None,
    checks: CheckOptions,
    names: dict[str, str] | None = None,
    whole_atlas: bool = False,
) -> Any:
    """:func:`pipeline.register.register_files`: the displacement field of ``moving`` onto ``fixed``.

    The item is being (re)computed, so an earlier field at ``out`` is replaced. ``checks``: what its
    pre-flight and quality checks may let through; ``names``: how their messages name ``fixed`` and ``moving``.
    ``whole_atlas``: ``moving`` is an atlas's uncut reference, so a brain far longer than it along one axis is
    refused first (:func:`pipeline.checks.check_brain_not_longer`), as ``patchmorph atlas`` refuses it.
    """
    if whole_atlas:
        brain = (names or {}).get("fixed", str(fixed))
        check_brain_not_longer(read_image(fixed), read_image(moving), brain, checks)
    return run_isolated(
        register_files,
        fixed,
        moving,
        out,
        config,
        chunk_size=chunk_size,
        workers=workers,
        scheduler=scheduler,
        overwrite=True,
        progress=False,
        checks=checks,
        names=names,
    )


@task(name="warp", task_run_name="warp {out.parent.name}/{out.name}", **_TASK_DEFAULTS)
def warp_task(
    field: Path,
    moving: Path,
    out: Path,
    labels: bool,
    target: Path,
    chunk_size: int | None,
    scheduler: str,
    workers: int | None,
    label_interpolation: LabelInterpolation = "vote",
) -> Any:
    """:func:`pipeline.warp.warp_files`: ``moving`` resampled onto ``target``'s grid through ``field`` (a label
    map by ``label_interpolation``)."""
    return run_isolated(
        warp_files,
        field,
        moving,
        out,
        labels=labels,
        label_interpolation=label_interpolation,
        target=target,
        chunk_size=chunk_size,
        workers=workers,
        scheduler=scheduler,
        overwrite=True,
        progress=False,
    )


@task(name="qc", task_run_name="qc {out_dir.parent.name}", **_TASK_DEFAULTS)
def qc_task(fixed: Path, warped: Path, field: Path, out_dir: Path, warped_labels: Path | None) -> qc.QCRecord:
    """:func:`pipeline.qc.qc_files`: the four QC figures of one registration."""
    return run_isolated(qc.qc_files, fixed, warped, field, out_dir, warped_labels=warped_labels)


@task(name="metrics", task_run_name="metrics {field.parent.name}", **_TASK_DEFAULTS)
def metrics_task(
    fixed: Path, warped: Path, field: Path, fixed_labels: Path | None, warped_labels: Path | None
) -> dict[str, float]:
    """:func:`pipeline.qc.registration_metrics`: NCC, Jacobian range and folding, Dice when labelled."""
    return run_isolated(
        qc.registration_metrics, fixed, warped, field, fixed_labels=fixed_labels, warped_labels=warped_labels
    )


@task(name="atlas-outputs", task_run_name="atlas-outputs {out_dir.name}", **_TASK_DEFAULTS)
def atlas_outputs_task(
    brain: Path,
    field: Path,
    atlas: str,
    atlas_dir: Path,
    out_dir: Path,
    scheduler: str,
    with_qc: bool,
    label_interpolation: LabelInterpolation = "vote",
    brain_geometry: BrainGeometry = "full",
    channels: dict[str, Path] | None = None,
    atlas_range: AtlasRange | None = None,
) -> AtlasOutputs:
    """:func:`pipeline.atlas.atlas_item_outputs`: labels on the brain (by ``label_interpolation``), the brain in
    atlas space, the inverse field, volumes.csv and the atlas QC figures of one item (its atlas prepared for its
    ``brain_geometry`` and ``atlas_range``), and each of its ``channels`` in atlas space with its signal table."""
    return run_isolated(
        atlas_item_outputs, brain, field, atlas, atlas_dir, out_dir, scheduler=scheduler, qc=with_qc,
        label_interpolation=label_interpolation, brain_geometry=brain_geometry, channels=channels,
        atlas_range=atlas_range,
    )  # fmt: skip
