"""The rule that a label map holds whole numbers has one owner (patchmorph_core.labels.check_whole_numbers): every
check of it refuses a fractional map in the same sentence, naming its input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from patchmorph_core.errors import InputError
from patchmorph_core.labels import check_whole_numbers
from patchmorph_core.metrics import dice_per_label
from patchmorph_core.synth import skull_strip_mask
from pipeline.evaluate import _labels_present
from pipeline.importers import check_whole_labels
from pipeline.make_atlas import label_ids
from pipeline.training_data import check_label_map
from pipeline.warp import check_label_values


def _fractional() -> np.ndarray:
    """An anisotropic-shaped ``(Z, Y, X)`` float label map, one fractional value at its centre."""
    ids = np.zeros((9, 14, 5), np.float32)
    ids[2:7, 3:11, 1:4] = 4.0
    ids[4, 7, 2] = 4.5
    return ids


CHECKS: dict[str, tuple[Callable[[np.ndarray], object], str]] = {
    "warp": (lambda a: check_label_values(a, "brain.zarr"), "image brain.zarr"),
    "convert": (lambda a: check_whole_labels(a, "brain.nii.gz"), "label map brain.nii.gz"),
    "training": (lambda a: check_label_map(a, "brain.nii.gz"), "training label map brain.nii.gz"),
    "make-atlas": (lambda a: label_ids(a, Path("annotation.nii.gz")), "the label image annotation.nii.gz"),
    "evaluate": (lambda a: _labels_present((a, a), ("a.zarr", "b.zarr"), None), "label map a.zarr"),
    "metrics": (lambda a: dice_per_label(a, a), "first label map"),
    "synth": (skull_strip_mask, "label map"),
}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_every_label_check_refuses_fractional_values_in_one_sentence(check: str) -> None:
    """Each caller names its input; the rule's words and the value shown are the owner's."""
    call, what = CHECKS[check]
    with pytest.raises(InputError) as err:
        call(_fractional())
    message = str(err.value)
    assert message.startswith(f"{what} holds values that are not whole numbers (e.g. 4.5), which are no label ids: ")
    assert "\n" not in message and message.endswith("."), message
    call(np.rint(_fractional()))  # whole numbers stored as float pass


def test_non_finite_values_are_no_label_ids_unless_a_sample_leaves_them() -> None:
    """NaN and inf are refused by default; a check of a sample (warp, convert) lets them pass as before."""
    for bad in (np.nan, np.inf):
        ids = np.rint(_fractional())
        ids[0, 0, 0] = bad
        with pytest.raises(InputError, match=r"^label map x holds values that are not whole numbers \(e\.g\. (nan|inf)"):
            check_whole_numbers(ids, "label map x", "fix it.")
        check_whole_numbers(ids, "label map x", "fix it.", skip_nonfinite=True)
    check_whole_numbers(np.arange(60, dtype=np.int16).reshape(3, 4, 5), "label map x", "fix it.")


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_every_label_check_refuses_ids_a_float32_map_cannot_hold(check: str) -> None:
    """The Allen annotation's ids (up to 614,454,277) written as float32, as ANTs writes label maps by default, are
    whole numbers but rounded onto other ids above 2²⁴: refused in the owner's sentence; as float64 they pass."""
    call, what = CHECKS[check]
    ids = np.zeros((9, 14, 5), np.float64)
    ids[2:7, 3:11, 1:4] = 614454277.0
    ids[4:6, 6:9, 2:4] = 182305693.0
    with pytest.raises(InputError) as err:
        call(ids.astype(np.float32))
    message = str(err.value)
    assert message.startswith(f"{what} holds ids up to 614454272 stored as float32, which keeps whole numbers exact "
                              "only up to 16777216: "), message  # fmt: skip
    assert "\n" not in message and message.endswith("."), message
    call(ids)  # float64 holds them exactly
    call(np.rint(_fractional()))  # small ids in float32 pass
