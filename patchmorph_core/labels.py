"""The rule every label map the project reads obeys: its values are whole numbers (label ids).

An intensity image given as a label map, or a label map resampled by interpolation, holds fractional values; cast
to integers they become ids that name no structure. Every check of that rule (convert, warp and evaluate with
labels, training label maps, make-atlas, the metrics, the synthesis) calls :func:`check_whole_numbers`, which
owns the test and the sentence; the callers name the input and the fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from patchmorph_core.errors import InputError
from patchmorph_core.spatial import read_box

LABEL_SAMPLE_VOXELS = 64
"""Edge in voxels of the block at an image's centre that the checks of a label map read (:func:`central_block`):
one bounded read (64³ voxels, 1 MiB of float32), whatever the volume's size."""


def central_block(array: Any, edge: int = LABEL_SAMPLE_VOXELS) -> np.ndarray:
    """The block of at most ``edge`` voxels per axis at the centre of a ``(Z, Y, X)`` numpy, zarr, dask or
    TensorStore array, read alone (the whole array when it is smaller).

    Returns:
        ``(min(Z, edge), min(Y, edge), min(X, edge))`` values, the array's dtype.
    """
    box = tuple(slice(max(0, n // 2 - edge // 2), max(0, n // 2 - edge // 2) + edge) for n in array.shape)
    return read_box(array, box)


def check_whole_numbers(values: np.ndarray, what: str, fix: str, *, skip_nonfinite: bool = False) -> None:
    """Refuse a label map whose values are not whole numbers; an integer or boolean array passes unread.

    Args:
        values: the label map's values, any shape (a whole ``(Z, Y, X)`` map or a sample of it: planes, a block).
        what: the input as the sentence names it first, e.g. ``"label map /data/brain.zarr"``.
        fix: what to do instead, ending the sentence.
        skip_nonfinite: let NaN and ±inf pass (a check of a sample that leaves them to others); by default they
            are refused too, being no label ids either.

    Raises:
        InputError: ``"<what> holds values that are not whole numbers (e.g. 0.3), which are no label ids: <fix>"``;
            or, for a map stored in a float type too narrow for its ids (float32 above 2²⁴, e.g. the Allen
            annotation's ids written as ANTs writes label maps by default), a sentence saying that its ids were
            rounded when the file was written.
    """
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        return
    finite = np.isfinite(values)
    broken = values[(values != np.rint(values)) & finite if skip_nonfinite else (values != np.rint(values)) | ~finite]
    if broken.size:
        raise InputError(
            f"{what} holds values that are not whole numbers (e.g. {float(broken[0]):.6g}), which are no label ids: "
            f"{fix}"
        )
    exact = exact_float_ids(values.dtype)
    largest = float(np.abs(values[finite]).max()) if finite.any() else 0.0
    if largest > exact:
        raise InputError(
            f"{what} holds ids up to {largest:.0f} stored as {values.dtype}, which keeps whole numbers exact only up "
            f"to {exact:.0f}: larger ids may have been rounded to other ids when the file was written (ANTs writes label maps "
            "as float32 unless told otherwise); write the label map with an integer type (e.g. uint32) from its source."
        )


def exact_float_ids(dtype: np.dtype | type) -> float:
    """The largest whole number up to which a floating-point ``dtype`` holds every whole number exactly (2²⁴ for
    float32, 2⁵³ for float64)."""
    return float(2 ** (np.finfo(dtype).nmant + 1))
