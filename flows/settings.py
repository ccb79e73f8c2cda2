"""Offline-safe Prefect defaults, applied by our entry points (never at import time of library code).

Prefect reads its settings from the environment when it is first imported, so an entry point (the
``patchmorph server`` command, a flow script's ``__main__``, the test fixtures) calls
:func:`apply_offline_defaults` before it imports Prefect, or passes :func:`offline_environment` to
the subprocesses it starts. A value the user already set always wins.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from uuid import UUID

LOOPBACK = "127.0.0.1"
"""The only interface the local server listens on."""

OFFLINE_DEFAULTS: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_API_HOST": LOOPBACK,
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "PREFECT_CLI_PROMPT": "false",
}
"""Environment defaults: no analytics or tracking, a generous ephemeral-server start-up timeout, the
API bound to the loopback interface, no interactive prompts."""

PROJECT_LOGGERS = ("flows", "pipeline", "patchmorph_core")
"""This project's loggers, whose warnings a flow run sends to its log in the API and the UI."""


@functools.lru_cache(maxsize=64)
def root_flow_run_id(flow_run_id: UUID) -> UUID:
    """The flow run at the top of ``flow_run_id``'s chain of parents (itself when it is no subflow), read from the
    API: a subflow's run names the task run of its parent that started it."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        while run.parent_task_run_id is not None:
            parent = client.read_task_run(run.parent_task_run_id).flow_run_id
            if parent is None:
                break
            run = client.read_flow_run(parent)
    return run.id


def copy_to_root_run(records: Sequence[logging.LogRecord], prefix: str = "") -> None:
    """Send ``records`` (their message after ``prefix``) to the log of the flow run that started the current run's
    chain of subflows too, when the current run (flow or task) belongs to a subflow: a user looking at the flow run
    they started (``atlas-to-section``) in the UI sees its items' warnings, which its ``align-items`` subflow and that
    subflow's tasks on Dask workers give. Nothing outside a run, nothing for a run that is no subflow's, and nothing
    but a log line on the terminal when the API cannot be read (a copy never stops the run)."""
    if not records:
        return
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    task_context, flow_context = TaskRunContext.get(), FlowRunContext.get()
    if task_context is not None:
        current = task_context.task_run.flow_run_id
    elif flow_context is not None and flow_context.flow_run is not None:
        current = flow_context.flow_run.id
    else:
        return
    try:
        root = root_flow_run_id(current) if current is not None else None
    except Exception as err:  # noqa: BLE001 - the API unreachable: the records are in the run's own log already
        logging.getLogger(__name__).info("warnings not copied to the parent flow run's log: %s", err)
        return
    if root is None or root == current:
        return
    handler = APILogHandler()
    for record in records:
        copy = logging.makeLogRecord(
            {**record.__dict__, "msg": prefix + record.getMessage(), "args": None, "flow_run_id": root, "task_run_id": None}
        )
        handler.handle(copy)


RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
"""Prefect's loggers of flow runs and task runs: what they log reaches the run's log in the API and the UI."""


class _BadInputSentence(logging.Filter):
    """Gives a record of a run's failure whose exception is the project's bad input
    (:class:`~patchmorph_core.errors.InputError`, a sentence naming what is wrong, which input and what to do) or a
    batch's failed items (:class:`~flows.runner.BatchFailed`, a sentence naming how many failed and the first, each
    item's error logged as it failed) as that sentence alone, without the traceback: Prefect logs every exception of a
    flow or task run with its traceback (``Encountered exception during execution``, ``Task run failed with
    exception``, and for a deployment's run ``Engine execution exited with unexpected exception``), which users read
    in the UI. Any other exception (a real crash) keeps its traceback; the run's state is not touched (it still ends
    Failed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from flows.runner import BatchFailed
        from patchmorph_core.errors import InputError

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, InputError | BatchFailed):
            record.msg, record.args, record.exc_info, record.exc_text = "%s", (str(error),), None, None
        return True


_BAD_INPUT_SENTENCE = _BadInputSentence()


def bad_input_without_traceback() -> None:
    """Give the project's bad-input failures in the runs' logs as their sentence, without a traceback
    (:class:`_BadInputSentence` on :data:`RUN_LOGGERS`; once per process, kept: the flow and task engines log a
    failure after the run's own code has returned)."""
    for name in RUN_LOGGERS:
        logging.getLogger(name).addFilter(_BAD_INPUT_SENTENCE)  # a filter already there is not added twice


class _RootRunCopy(logging.Handler):
    """Copies the warnings (and worse) given inside a subflow's run to the log of the flow run above it
    (:func:`copy_to_root_run`)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        copy_to_root_run([record])


_ROOT_RUN_COPY = _RootRunCopy()


@contextlib.contextmanager
def project_logs_in_the_run() -> Iterator[None]:
    """While the block runs (inside a flow), :data:`PROJECT_LOGGERS` have the handlers of Prefect's ``prefect.extra``
    logger, as Prefect's ``PREFECT_LOGGING_EXTRA_LOGGERS`` gives them when it is set before Prefect is imported: their
    warnings (an item that failed, a part of a brain, a failed quality check) then show in the flow run's log in the API and the UI,
    not only on the worker's terminal; inside a subflow its warnings go to the log of the flow run above it too
    (:func:`copy_to_root_run`). They are removed after it (outside a flow run they could send nothing). A bad-input
    failure of the run shows in its log as its sentence, without a traceback (:func:`bad_input_without_traceback`)."""
    bad_input_without_traceback()
    extra = [*logging.getLogger("prefect.extra").handlers, _ROOT_RUN_COPY]
    added = [
        (logger, handler)
        for logger in (logging.getLogger(name) for name in PROJECT_LOGGERS)
        for handler in extra
        if handler not in logger.handlers
    ]
    for logger, handler in added:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, handler in added:
            logger.removeHandler(handler)


def offline_environment(
    base: Mapping[str, str] | None = None, *, prefect_home: Path | None = None, api_url: str | None = None
) -> dict[str, str]:
    """A copy of ``base`` (default: ``os.environ``) with :data:`OFFLINE_DEFAULTS` filled in where unset.

    Args:
        base: environment to start from.
        prefect_home: when given, ``PREFECT_HOME`` (where the server keeps its SQLite database) is set
            to it, overriding ``base``.
        api_url: when given, ``PREFECT_API_URL`` is set to it, overriding ``base``.

    Returns:
        A new environment mapping for :mod:`subprocess`.
    """
    env = dict(os.environ if base is None else base)
    for key, value in OFFLINE_DEFAULTS.items():
        env.setdefault(key, value)
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


def apply_offline_defaults() -> None:
    """Fill :data:`OFFLINE_DEFAULTS` into ``os.environ`` where unset (call before importing Prefect)."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def api_url(port: int, host: str = LOOPBACK) -> str:
    """The ``PREFECT_API_URL`` of a server listening on ``host:port``."""
    return f"http://{host}:{port}/api"
