"""A conversion killed (SIGKILL) part-way, in a process of its own, for the resume tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline import resume

KILL_AFTER_SLABS = (
    "import os, signal\n"
    "from pipeline.resume import StageRecords\n"
    "mark = StageRecords.mark_done\n"
    "def mark_then_die(self, cid, info):\n"
    "    mark(self, cid, info)\n"
    "    if len(self.completed()) == {slabs}:\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "StageRecords.mark_done = mark_then_die\n"
)
"""Python that makes its process kill itself once ``{slabs}`` slabs of a write are recorded whole."""

CODE_ROOT = str(Path(resume.__file__).resolve().parents[1])
"""Folder holding the ``pipeline`` package this test process imported (its ``resume`` module's: under ``pytest`` the
``pipeline`` module itself may be the tests' folder of that name): the child processes import the same code
(the current folder, or an installed copy, may hold another version, whose run records a rerun here would not
resume: a resume test then failed under ``pytest`` but passed under ``python -m pytest``)."""


def same_code_env() -> dict[str, str]:
    """This process's environment with :data:`CODE_ROOT` first on ``PYTHONPATH``, for a child process."""
    paths = [CODE_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new Python process that imports this process's ``pipeline``; its completed process."""
    script = f"import sys\nsys.path.insert(0, {CODE_ROOT!r})\n" + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)


def killed_after_slabs(code: str, slabs: int) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (imports and a call that writes an image) in a new Python process that kills itself (SIGKILL) once
    ``slabs`` slabs of its write are recorded; its completed process (return code -9 when it was killed)."""
    return run_python(KILL_AFTER_SLABS.format(slabs=slabs) + code)
