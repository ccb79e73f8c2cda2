"""docs/orientation_check.md is what benchmarks/orientation_check.py makes of its committed JSON result, and that
result is the rule the product uses (so the documented figures are the shipped check's)."""

from __future__ import annotations

import json

import orientation_check

from patchmorph_core import orientation


def test_the_document_is_generated_from_the_result() -> None:
    doc = json.loads(orientation_check.RESULT.read_text())
    assert orientation_check.DOC.read_text() == orientation_check.markdown(doc)
    assert doc["rule"] == {"min_gain": orientation.MIN_GAIN, "ratio": orientation.RATIO}
    assert (doc["refine"], doc["refine_steps"]) == (orientation.REFINE, orientation.REFINE_STEPS)
