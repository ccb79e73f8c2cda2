"""The ``patchmorph`` command line. Each command lives in the module that owns its work.

Every command turns :class:`~patchmorph_core.errors.InputError` into one line on stderr and exit code 2,
before any heavy work starts.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import typer

from patchmorph_core.errors import InputError

app = typer.Typer(
    help="PatchMorph: world-space, patch-based deep registration of large brain volumes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Register ``func`` as a sub-command; bad input becomes ``error: <sentence>`` and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return func(*args, **kwargs)
        except InputError as err:
            typer.echo(f"error: {err}", err=True)
            sys.exit(2)

    app.command(name=func.__name__.replace("_", "-"))(wrapper)
    return func


def _register_commands() -> None:
    """Import the modules whose functions are decorated with :func:`command`."""
    # Each owning module is imported here once it exists; keep this list sorted.
    import pipeline.convert_cmd  # noqa: F401
    import pipeline.demo_cmd  # noqa: F401
    import pipeline.evaluate_cmd  # noqa: F401
    import pipeline.register_cmd  # noqa: F401
    import pipeline.server_cmd  # noqa: F401
    import pipeline.train_cmd  # noqa: F401


_register_commands()
