"""The contrasts benchmark's summary: ours against SyN of the same run and against SyNCC's stored pairs; a run of
some parts keeps or refuses to drop the others."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from contrasts import run, summarize_part


def _record(pair: str, dice: float, seconds: float, **extra: float) -> dict:
    return {"pair": pair, "matched": {"mean_dice": dice}, "folding_percent_in_brain": 0.0,
            "register_seconds": seconds, **extra}  # fmt: skip


def test_ours_is_compared_with_syn_and_the_stored_syncc_pairs_it_shares() -> None:
    records = {
        "PatchMorph": [_record("a", 0.70, 5.0), _record("b", 0.60, 6.0)],
        "ANTs SyN": [_record("a", 0.65, 4.0, process_seconds=10.0), _record("b", 0.62, 3.0, process_seconds=6.0)],
        "ANTs SyNCC": [_record("b", 0.55, 600.0), _record("c", 0.90, 500.0)],  # "c": not a pair of this run
    }
    summary = summarize_part(records, ["matched"])
    ours = summary["PatchMorph"]
    assert ours["versus_syn"]["dice"]["per_item"] == pytest.approx({"a": 0.05, "b": -0.02})
    assert ours["versus_syn"]["command_vs_process_wall_ratio"]["mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert ours["versus_syncc"]["dice"]["per_item"] == pytest.approx({"b": 0.05})
    assert ours["versus_syncc"]["dice"]["better"] == 1
    for peer in ("ANTs SyN", "ANTs SyNCC"):  # the peers are not compared with each other
        assert "versus_syn" not in summary[peer] and "versus_syncc" not in summary[peer]
    assert summary["ANTs SyNCC"]["matched"]["mean"] == pytest.approx(0.725)


def test_a_run_of_some_parts_refuses_to_drop_the_others_of_its_json_unless_kept(tmp_path: Path) -> None:
    out = tmp_path / "contrasts.json"
    out.write_text(json.dumps({"parts": {"human": {"pairs": {}}, "mouse": {"pairs": {}}}}))
    args = argparse.Namespace(parts=["mri"], keep=False, out=out, variant=[])
    with pytest.raises(SystemExit, match="holds parts human, mouse that this run does not redo"):
        run(args)  # before any work: the JSON is as it was
    assert json.loads(out.read_text()) == {"parts": {"human": {"pairs": {}}, "mouse": {"pairs": {}}}}


def test_the_mri_atlas_part_reports_the_whole_job_beside_syn() -> None:
    """Part (e)'s table: ours is the whole ``patchmorph atlas`` job (its registration and its wall time), SyN's
    process beside it, the Dice difference per pair."""
    from report import contrasts_section

    records = {
        "PatchMorph": [_record("07", 0.70, 5.0, atlas_job_seconds=30.0), _record("08", 0.60, 6.0, atlas_job_seconds=32.0)],
        "ANTs SyN": [_record("07", 0.65, 4.0, process_seconds=10.0), _record("08", 0.62, 3.0, process_seconds=6.0)],
    }
    part = {"summary": summarize_part(records, ["matched"]), "label_sets": ["matched"], "n_structures": 27,
            "make_atlas_seconds": 2.0, "command": "contrasts.py run --parts mri-atlas", "machine": {}}  # fmt: skip
    text = contrasts_section({"parts": {"mri-atlas": part}})
    assert "**(e) The main job with an MRI-based atlas" in text
    assert "| PatchMorph | 2 | 0.650 ± 0.050 | 0.0000 (max 0.0000; folds in 0/2 pairs) | 5.5 | 31.0 | +0.015 ± 0.035 (better on 1/2) |" in text
    assert "| ANTs SyN | 2 | 0.635 ± 0.015 |" in text and "| 3.5 | 8.0 | – |" in text
