"""The project's error for bad input: one sentence naming the input, what is wrong and the fix."""


class InputError(ValueError):
    """Bad user input (path, metadata, voxel size, config). The message is shown as-is, exit code 2."""
