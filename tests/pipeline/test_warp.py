"""Chunked warping into a sharded output: one task per shard, computed in storage-chunk cubes, written once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

import pipeline.ngff as ngff
from patchmorph_core.config import InferenceConfig
from patchmorph_core.displacement import FieldDisplacement
from patchmorph_core.warping import warp_to_grid
from pipeline.ngff import read_image, write_field
from pipeline.resume import StageRecords
from pipeline.warp import warp_files


def _field(folder: Path, fixed: Path, moving: Path) -> Path:
    """A smooth fold-free field on a 2 mm grid over the fixed image."""
    grid = read_image(fixed).grid.resampled(2.0)
    points = grid.points()
    field = np.stack(
        [np.sin(points[..., 1] / 8.0), 0.7 * np.cos(points[..., 2] / 10.0), -0.5 + 0 * points[..., 0]]
    ).astype(np.float32)
    return write_field(folder / "field.zarr", field, grid, metadata={"fixed": str(fixed), "moving": str(moving)})


def test_sharded_warp_writes_each_shard_once_and_equals_in_memory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dask_scheduler: str,
    pair_and_config: tuple[Path, Path, InferenceConfig],
) -> None:
    fixed, moving, _ = pair_and_config
    field = _field(tmp_path, fixed, moving)
    monkeypatch.setattr(ngff, "SHARD_THRESHOLD_BYTES", 0)  # every output array is sharded (4³ chunks)
    out = tmp_path / "warped.zarr"
    record = warp_files(field, moving, out, chunk_size=6, scheduler=dask_scheduler, progress=False, keep_run=True)

    level0 = zarr.open_array(str(out / "0"), mode="r")
    assert level0.chunks == (6, 6, 6) and level0.shards == (24, 24, 24)
    shards = tuple(-(-n // 24) for n in level0.shape)
    assert record.chunks == int(np.prod(shards))  # one task per shard, not per chunk
    counts = StageRecords(tmp_path / "warped.zarr.run" / "warp").write_counts()
    assert len(counts) == record.chunks and set(counts.values()) == {1}  # each shard written once

    array, grid, _ = ngff.read_field(field)
    expected = warp_to_grid(read_image(moving), FieldDisplacement(np.asarray(array[:]), grid), read_image(fixed).grid)
    np.testing.assert_allclose(level0[:], expected, atol=1e-6)
