"""The ``patchmorph`` command line: the entry point, which registers every command module's commands on
:data:`patchmorph.app.app`. Each command lives in a small module of this package that imports the heavy layers
(torch, Dask, Prefect) only inside the command's body, so ``patchmorph --help`` stays fast.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

from patchmorph.app import EXIT_INPUT, EXIT_QUALITY, app

__all__ = ["EXIT_INPUT", "EXIT_QUALITY", "app", "main"]


def _register_commands() -> None:
    """Import the modules whose functions are decorated with :func:`command` (light imports only)."""
    # keep this list sorted
    import patchmorph.atlas  # noqa: F401
    import patchmorph.convert  # noqa: F401
    import patchmorph.demo  # noqa: F401
    import patchmorph.evaluate  # noqa: F401
    import patchmorph.fields  # noqa: F401
    import patchmorph.register  # noqa: F401
    import patchmorph.server  # noqa: F401
    import patchmorph.train  # noqa: F401


FAST_EXIT_COMMANDS = frozenset(
    {
        "register", "warp", "convert", "evaluate", "export-field", "import-field", "export-image", "make-atlas",
        "points", "export-brainreg", "cohort",
    }
)
"""Commands that start no server, flow or process that outlives their body (a Dask cluster they start is closed
within it): when one succeeds, :func:`main` ends the process at once."""


def _command(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first argument after the program that is not an option)."""
    return next((a for a in argv[1:] if not a.startswith("-")), None)


BLAS_THREADS = {"OPENBLAS_NUM_THREADS": "1"}
"""Set in the command's environment before numpy is imported, unless the user set them: numpy's OpenBLAS works on
one thread. The command's parallelism is its task threads and torch's; OpenBLAS threads started inside every task
thread's small matrix products fight them for the cores (measured: ``docs/decisions.md``). Dask's workers get the
same from distributed's ``pre-spawn-environ``; torch keeps its own thread count."""


def main() -> None:
    """Entry point of the ``patchmorph`` script and of ``python -m patchmorph``.

    Numpy's BLAS is set to one thread first (:data:`BLAS_THREADS`).

    When the command ends, every object still alive is moved to the garbage collector's permanent generation
    (``gc.freeze``): the process is about to exit, and the interpreter's final collection would otherwise walk
    the hundreds of thousands of objects torch leaves behind, for a few tenths of a second of every command.
    Objects are still released as their references drop; only the last cyclic sweep skips them. A command of
    :data:`FAST_EXIT_COMMANDS` that succeeded, refused its input or failed its quality checks has written and
    closed what it wrote (its thread pools and clusters are shut down before the exit code is set): the process
    then flushes its streams and log handlers and exits without the interpreter's teardown (``os._exit``), whose
    atexit work is torch's operator-library finalisers (``docs/method.md``, *Where a command's time goes*) and,
    after a refused read, Zarr's event-loop thread, which printed a traceback.
    """
    for name, value in BLAS_THREADS.items():
        os.environ.setdefault(name, value)
    try:
        app()
    except SystemExit as end:
        code = 0 if end.code is None else end.code
        if code in (0, EXIT_INPUT, EXIT_QUALITY) and _command(sys.argv) in FAST_EXIT_COMMANDS:
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(code)
        raise
    finally:
        gc.freeze()


_register_commands()
