"""docs/benchmarks.md and docs/scale.md are what benchmarks/report.py makes of the committed JSON results: no
figure in them is typed by hand, and none goes stale when a result changes."""

from __future__ import annotations

import report


def test_the_documents_are_generated_from_the_results() -> None:
    for path, text in report.documents().items():
        assert path.is_file(), f"{path} is missing: run benchmarks/report.py"
        assert path.read_text() == text, f"{path} differs from benchmarks/results: run benchmarks/report.py"


def test_a_missing_result_says_how_to_make_it() -> None:
    assert "run `python x.py`" in report.missing("x.json", "python x.py")
    assert report.fmt(None) == "–" and report.fmt(float("nan")) == "–" and report.fmt(0.12345) == "0.123"
