"""An item whose shared input (the converted atlas) another run into the same folder writes again while the item
reads it is refused, not recorded as done: its field and its warps could come from two different atlases."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flows.steps import ImageInput, ItemJob, _input_writes, _inputs_kept
from patchmorph_core.spatial import Grid
from pipeline.ngff import write_image


def _store(path: Path, value: float) -> Path:
    image = np.full((4, 5, 6), value, np.float32)
    return write_image(path, image, Grid.from_spacing((4, 5, 6), (1, 1, 1)), overwrite=True)


def test_an_item_whose_shared_input_was_written_again_fails(tmp_path: Path) -> None:
    (tmp_path / "atlas").mkdir()
    atlas = _store(tmp_path / "atlas" / "atlas.ome.zarr", 1.0)
    jobs = [
        ItemJob(
            name=name,
            out_dir=tmp_path / name,
            fixed=ImageInput(path=_store(tmp_path / f"{name}.ome.zarr", 2.0), converted=tmp_path / f"{name}.c.zarr"),
            moving=ImageInput(path=tmp_path / "atlas.nrrd", converted=atlas),
        )
        for name in ("first", "second")
    ]
    read_from = {job.name: _input_writes(job) for job in jobs}
    errors: list = []
    assert _inputs_kept(jobs, read_from, errors) == jobs and errors == []
    _store(atlas, 3.0)  # another run converts the atlas again, with other settings
    assert _inputs_kept(jobs, read_from, errors) == []
    assert [(e.name, e.step) for e in errors] == [("first", "inputs"), ("second", "inputs")]
    assert f"{atlas} was written again by another run while this item read it" in errors[0].message
