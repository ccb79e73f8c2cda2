"""docs/warp.md is what benchmarks/warp_throughput.py makes of its committed JSON result; the benchmark's known
field is fold-free and its comparison of outputs counts what differs."""

from __future__ import annotations

import json

import numpy as np
import warp_throughput

from patchmorph_core.metrics import jacobian_determinant
from patchmorph_core.spatial import Grid


def test_the_document_is_generated_from_the_result() -> None:
    doc = json.loads(warp_throughput.RESULT.read_text())
    assert warp_throughput.DOC.read_text() == warp_throughput.markdown(doc)
    assert set(doc["rows"]) >= {"ours", "floor"} and doc["agreement"]["ours"]["mean"] < 1.0


def test_the_known_field_moves_every_axis_without_folding() -> None:
    grid = Grid.from_spacing((40, 30, 50), (120.0, 100.0, 90.0), origin=(5.0, -3.0, 2.0), unit="micrometer")
    field = warp_throughput.known_field(grid)
    assert field.shape == (3, *grid.shape) and field.dtype == np.float32
    assert all(np.ptp(field[c]) > 100.0 for c in range(3))  # every component moves (µm)
    assert jacobian_determinant(field, grid).min() > 0.5


def test_differences_count_grey_values() -> None:
    reference = np.zeros((70, 30, 40), dtype=np.uint16)
    other = reference.copy()
    other[65, 1, 1] = 7  # in the second slab of 64 planes
    got = warp_throughput.differences(reference, other)
    assert got == {"mean": 7 / reference.size, "p99_9": 0.0, "max": 7.0}
