"""Resume records: written after the chunk, atomic, fingerprinted; a killed run resumes to the same field."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchmorph_core.errors import InputError
from pipeline.resume import open_run


def test_records_and_write_log(tmp_path: Path) -> None:
    run = open_run(tmp_path / "out.run", {"fixed": "a", "chunk": 8}, overwrite=False)
    stage = run.stage("stage0")
    assert stage.completed() == set()
    stage.log_write((0, 1, 2))
    assert not stage.is_done((0, 1, 2))  # written but not recorded: a half-written chunk
    stage.mark_done((0, 1, 2), {"seconds": 0.1})
    stage.log_write((1, 0, 0))
    stage.log_write((1, 0, 0))
    assert stage.completed() == {(0, 1, 2)}
    assert stage.write_counts() == {(0, 1, 2): 1, (1, 0, 0): 2}
    assert not list((tmp_path / "out.run" / "stage0" / "done").glob(".*tmp"))  # no temporary left


def test_rerun_same_fingerprint_resumes_other_refused(tmp_path: Path) -> None:
    root = tmp_path / "out.run"
    open_run(root, {"fixed": "a", "chunk": 8}, overwrite=False).stage("s").mark_done((0, 0, 0), {})
    again = open_run(root, {"chunk": 8, "fixed": "a"}, overwrite=False)
    assert again.stage("s").completed() == {(0, 0, 0)}
    with pytest.raises(InputError, match="chunk"):
        open_run(root, {"fixed": "a", "chunk": 16}, overwrite=False)
    fresh = open_run(root, {"fixed": "a", "chunk": 16}, overwrite=True)
    assert fresh.stage("s").completed() == set()
    assert not fresh.finished
    fresh.finish()
    assert fresh.finished
