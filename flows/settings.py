"""Offline-safe Prefect defaults, applied by our entry points (never at import time of library code).

Prefect reads its settings from the environment when it is first imported, so an entry point (the
``patchmorph server`` command, a flow script's ``__main__``, the test fixtures) calls
:func:`apply_offline_defaults` before it imports Prefect, or passes :func:`offline_environment` to
the subprocesses it starts. A value the user already set always wins.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

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


@contextlib.contextmanager
def project_logs_in_the_run() -> Iterator[None]:
    """While the block runs (inside a flow), :data:`PROJECT_LOGGERS` have the handlers of Prefect's ``prefect.extra``
    logger, as Prefect's ``PREFECT_LOGGING_EXTRA_LOGGERS`` gives them when it is set before Prefect is imported: an
    item that failed, a part of a brain, a reused registration then show in the flow run's log in the API and the UI,
    not only on the worker's terminal. They are removed after it (outside a flow run they could send nothing)."""
    import logging

    extra = logging.getLogger("prefect.extra").handlers
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
