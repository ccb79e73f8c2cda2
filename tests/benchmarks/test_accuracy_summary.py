"""The accuracy benchmark's summaries: our command against SyN's process pair by pair, the difference to SyNCC, structure groups."""

from __future__ import annotations

import pytest
from accuracy import STRUCTURE_GROUPS, compare, group_dice, summarize

from patchmorph_core.synth import STANDARD_FS_LABELS


def _pair(fixed: str, moving: str, dice: float, seconds: float, **extra: float) -> dict:
    return {
        "fixed": fixed,
        "moving": moving,
        "dice": {str(k): dice for k in STANDARD_FS_LABELS},
        "mean_dice": dice,
        "register_seconds": seconds,
        "register_cpu_seconds": 2 * seconds,
        **extra,
    }


def test_group_dice_averages_left_and_right() -> None:
    dice = {str(k): 0.5 for k in STANDARD_FS_LABELS} | {"17": 0.2, "53": 0.4}
    groups = group_dice(dice)
    assert set(groups) == set(STRUCTURE_GROUPS) and len(groups) == 16
    assert groups["hippocampus"] == pytest.approx(0.3) and groups["brain-stem"] == pytest.approx(0.5)


def test_compare_pairs_methods_by_pair() -> None:
    doc = {
        "methods": {
            "PatchMorph": {"kind": "patchmorph", "pairs": [
                _pair("07", "08", 0.72, 10.0, folding_percent_in_brain=0.0),
                _pair("08", "07", 0.70, 12.0, folding_percent_in_brain=0.02),
            ]},
            "ANTs SyN": {"kind": "ants", "pairs": [  # the registration call is faster than the process
                _pair("07", "08", 0.60, 5.0, process_seconds=20.0, process_cpu_seconds=10.0),
                _pair("08", "07", 0.62, 5.0, process_seconds=8.0, process_cpu_seconds=48.0),
            ]},
            "ANTs SyNCC": {"kind": "ants", "pairs": [_pair("07", "08", 0.70, 900.0), _pair("09", "07", 0.9, 900.0)]},
        }
    }  # fmt: skip
    result = compare(doc)["PatchMorph"]
    speed = result["versus_syn"]["command_versus_process"]  # our command against SyN's process, not its call
    assert {k: p["wall_ratio"] for k, p in speed["per_pair"].items()} == pytest.approx({"07:08": 0.5, "08:07": 1.5})
    assert {k: p["cpu_ratio"] for k, p in speed["per_pair"].items()} == pytest.approx({"07:08": 2.0, "08:07": 0.5})
    assert speed["wall_ratio"]["mean"] == pytest.approx(1.0) and speed["wall_ratio"]["max"] == pytest.approx(1.5)
    assert speed["pairs_faster"] == 1 and speed["ratio_of_mean_wall"] == pytest.approx(22.0 / 28.0)
    assert result["versus_syn"]["dice"]["mean"] == pytest.approx(0.1)
    syncc = result["versus_syncc"]  # only 07:08 is common to both
    assert syncc["dice"]["n"] == 1 and syncc["dice"]["mean"] == pytest.approx(0.02)
    assert syncc["groups"]["thalamus"]["difference"] == pytest.approx(0.02)
    assert syncc["groups_more_than_margin_below"] == []
    summary = summarize(doc["methods"]["PatchMorph"])
    assert summary["folding_percent_in_brain"] == {"mean": pytest.approx(0.01), "max": 0.02, "pairs_with_folds": 1}
    assert summary["seconds"]["register_seconds"] == pytest.approx(11.0)
