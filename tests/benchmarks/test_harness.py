"""The benchmarks' shared harness: statistics, timed commands and the JSON they write."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from harness import mean_and_sem, paired_difference, run_timed, write_json


def test_mean_and_sem_by_hand() -> None:
    stats = mean_and_sem([1.0, 2.0, 4.0, float("nan")])  # NaN is left out
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(7 / 3)
    sd = np.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert stats["sd"] == pytest.approx(sd) and stats["sem"] == pytest.approx(sd / np.sqrt(3))
    assert mean_and_sem([])["n"] == 0


def test_paired_difference_uses_the_common_items_only() -> None:
    ours = {"a": 0.7, "b": 0.6, "c": 0.5}
    peer = {"a": 0.6, "b": 0.65, "d": 0.1}
    diff = paired_difference(ours, peer)
    assert diff["per_item"] == pytest.approx({"a": 0.1, "b": -0.05})
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(0.025)
    assert diff["better"] == 1 and diff["worse"] == 1


def test_run_timed_times_a_command_and_logs_it(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass\nprint('done')"
    timed = run_timed([sys.executable, "-c", burn], log)
    assert timed.seconds >= 0.2 and timed.cpu_seconds >= 0.19
    assert "done" in log.read_text() and log.read_text().startswith("$ ")


def test_run_timed_names_a_failing_command_and_shows_its_last_lines(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"exited with 3(.|\n)*the reason"):
        run_timed(["sh", "-c", "echo the reason; exit 3"], tmp_path / "log.txt")


def test_write_json_writes_numpy_values_whole(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.json"
    write_json(path, {"a": np.float32(1.5), "b": np.arange(3), "c": Path("/x")})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": "/x"}
    assert not path.with_name("r.json.partial").exists()
