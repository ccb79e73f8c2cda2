"""Two runs into one output folder at once convert a shared input (the atlas) once: the second waits for the first
and keeps what it made, instead of replacing the store under the first run's registrations."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from flows import tasks
from pipeline.ngff import read_image

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_a_shared_input_is_converted_once_by_two_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = EXAMPLES / "mouse_ccf" / "average_template_100.nrrd", tmp_path / "atlas" / "atlas.ome.zarr"
    target.parent.mkdir()
    calls: list[Path] = []
    convert = tasks.convert

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(Path(args[1]))
        return convert(*args, **kwargs)

    monkeypatch.setattr(tasks, "convert", counted)
    results: list[Path] = []

    def run() -> None:
        results.append(tasks.convert_task.fn(source, target, None, None, None, False, "key-1"))

    runs = [threading.Thread(target=run) for _ in range(2)]
    for started in runs:
        started.start()
    for started in runs:
        started.join()
    assert calls == [target] and results == [target, target]
    assert tasks.converted_from(target, "key-1") and sorted(read_image(target).grid.shape) == [80, 114, 132]
    # another source or geometry (another fingerprint) is converted again
    tasks.convert_task.fn(source, target, None, None, "asl", False, "key-2")
    assert len(calls) == 2 and tasks.converted_from(target, "key-2") and not tasks.converted_from(target, "key-1")
