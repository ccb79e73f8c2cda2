"""The project's errors that reach the user as one sentence naming the input or output, what is wrong and
the fix (the command line prints ``error: <sentence>``).

Exit codes of the command line: 2 for :class:`InputError` (refused before heavy work: nothing written),
3 for :class:`QualityError` (the result failed its checks: written, marked as failed, not complete),
1 for an operating-system error (disk full, read-only folder, ...: the run resumes when rerun).
"""


class InputError(ValueError):
    """Bad user input (path, metadata, voxel size, config). The message is shown as-is, exit code 2."""


class QualityError(RuntimeError):
    """A result failed its documented quality thresholds; it is kept, marked as failed. Exit code 3."""
