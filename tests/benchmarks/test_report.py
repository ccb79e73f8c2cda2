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


def test_the_polish_part_pairs_each_network_alone_setting_with_its_polished_twin() -> None:
    def setting(name: str, median: float, seconds: float) -> dict:
        return {"setting": name, "error_um": {"median": median, "p95": 2 * median}, "register_seconds": seconds}

    settings = [
        setting("field 100 µm", 44.0, 8.5),
        setting("field 100 µm, network alone", 69.5, 7.8),
        setting("field 50 µm, network alone", 70.0, 20.0),  # no polished twin: no sentence
    ]
    (sentence,) = report.polish_parts(settings)
    assert "field 100 µm: the network's cascade alone leaves an error of 69.5 / 139.0 µm" in sentence
    assert "with the polish 44.0 / 88.0 µm in 8.5 s" in sentence
