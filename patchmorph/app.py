"""The ``patchmorph`` application object and the :func:`command` decorator that each command module registers its
command with. Command modules import this module, never :mod:`patchmorph.cli`, which imports them all: so any one
of them imports on its own.

Every command turns :class:`~patchmorph_core.errors.InputError` into one ``error: ...`` line on stderr and
exit code 2, before any heavy work starts. Logging is quiet by default (warnings only); ``--verbose``
shows the INFO log of every step.
"""

from __future__ import annotations

import errno
import functools
import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from patchmorph import __version__
from patchmorph_core.errors import InputError, QualityError

app = typer.Typer(
    help="PatchMorph: world-space, patch-based deep registration of large brain volumes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

QUIET_LOGGERS = ("distributed", "dask_jobqueue", "tornado", "asyncio", "httpx", "prefect", "urllib3")
"""Libraries whose INFO chatter is hidden unless ``--verbose`` is given."""


def configure_logging(verbose: bool) -> None:
    """INFO for this project's modules with ``verbose``, else warnings only; third-party loggers stay at
    WARNING either way (their INFO lines say nothing a user acts on)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"patchmorph {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the INFO log of every step (default: warnings only).")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """PatchMorph: world-space, patch-based deep registration of large brain volumes."""
    configure_logging(verbose)


EXIT_INPUT, EXIT_QUALITY, EXIT_SYSTEM = 2, 3, 1
"""Exit codes: refused input (nothing written), failed quality (written, marked failed), OS error."""


LOST_WORKER = frozenset({"CommClosedError", "KilledWorker", "StreamClosedError"})
"""Dask's errors for a worker that died or whose connection closed (most often: it exceeded its memory limit and
was restarted), matched by name so that this module imports no Dask."""


def lost_worker_sentence(err: BaseException) -> str:
    """One sentence for a Dask worker lost mid-run: the likely cause and what to do."""
    return (
        f"the Dask cluster lost a worker ({type(err).__name__}: {err}); a worker that exceeds its memory limit is "
        "restarted (the warning above says so): raise memory_per_worker in the cluster file (slurm.memory for SLURM "
        "jobs) or give a smaller "
        "--chunk-size, then rerun the same command: finished chunks are kept and the run resumes."
    )


def system_error_sentence(err: OSError, output: object = None) -> str:
    """One sentence for an operating-system error: what failed, on which path (the error's own, else the
    command's ``output`` that was being written), and what to do."""
    reason = (err.strerror or str(err) or type(err).__name__).rstrip(".")
    where = f" ({err.filename})" if err.filename else f" (while writing {output})" if output is not None else ""
    remedy = "free space on that disk or write elsewhere" if err.errno == errno.ENOSPC else "fix the cause"
    return (
        f"{reason[:1].lower()}{reason[1:]}{where}: {remedy} and rerun the same command; finished chunks "
        "are kept and the run resumes (nothing unfinished is marked complete)."
    )


def command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Register ``func`` as a sub-command. Errors the user can act on become one ``error: <sentence>``
    line and an exit code (:data:`EXIT_INPUT`, :data:`EXIT_QUALITY`, :data:`EXIT_SYSTEM`); with
    ``--verbose`` the traceback of an operating-system error is logged too."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InputError as err:
            typer.echo(f"error: {err}", err=True)
            sys.exit(EXIT_INPUT)
        except QualityError as err:
            typer.echo(f"error: {err}", err=True)
            sys.exit(EXIT_QUALITY)
        except Exception as err:  # an operating-system error, or a Dask worker lost: one sentence; else re-raised
            lost = type(err).__name__ in LOST_WORKER
            if not (lost or isinstance(err, OSError)):
                raise
            logging.getLogger(__name__).info("operating-system error", exc_info=True)
            output = kwargs.get("out", kwargs.get("output"))
            typer.echo(f"error: {lost_worker_sentence(err) if lost else system_error_sentence(err, output)}", err=True)
            sys.exit(EXIT_SYSTEM)

    app.command(name=func.__name__.replace("_", "-"), options_metavar="[OPTIONS]")(wrapper)
    return func
