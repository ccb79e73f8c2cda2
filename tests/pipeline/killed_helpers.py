"""A conversion killed (SIGKILL) part-way, in a process of its own, for the resume tests."""

from __future__ import annotations

import subprocess
import sys

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


def killed_after_slabs(code: str, slabs: int) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (imports and a call that writes an image) in a new Python process that kills itself (SIGKILL) once
    ``slabs`` slabs of its write are recorded; its completed process (return code -9 when it was killed)."""
    script = KILL_AFTER_SLABS.format(slabs=slabs) + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
