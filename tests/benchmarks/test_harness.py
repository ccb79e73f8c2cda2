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


def test_tissue_mask_is_one_solid_region_despite_dark_tracts_and_bright_specks() -> None:
    """A bright ellipsoid (anisotropic grid) with a dark tract reaching its surface, a dark core, a few
    saturated specks outside and noise: the mask is the whole ellipsoid and nothing outside it."""
    from harness import tissue_mask
    from scipy import ndimage

    z, y, x = np.mgrid[:40, :56, :48]
    inside = ((z - 20) / 16.0) ** 2 + ((y - 28) / 24.0) ** 2 + ((x - 24) / 20.0) ** 2 <= 1
    image = np.where(inside, 300.0, 20.0)
    image[(abs(y - 28) < 3) & (x > 24) & inside] = 60.0  # a dark tract running out to the surface
    image[((z - 20) ** 2 + (y - 28) ** 2 + (x - 24) ** 2) < 25] = 40.0  # a dark core
    image[2, 2, 2] = image[37, 50, 3] = 65000.0  # saturated specks in the background
    image += np.random.default_rng(0).normal(0, 5.0, image.shape)
    mask = tissue_mask(image)
    assert mask.dtype == bool and not mask[2, 2, 2] and not mask[37, 50, 3]
    assert mask[inside].mean() > 0.995  # the tract and the core are tissue
    assert not (mask & ~ndimage.binary_dilation(inside, iterations=3)).any()  # at most the smoothing's rim beyond
