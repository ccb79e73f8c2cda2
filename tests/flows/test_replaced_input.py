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


def test_an_item_whose_shared_input_another_run_converted_otherwise_fails(tmp_path: Path) -> None:
    """The atlas converted by this run, then again by another run into the same folder with another geometry
    before this run's registrations read it: the item fails at 'inputs' instead of registering the other atlas."""
    import json

    from flows.steps import _converted_as_asked, conversion_key
    from flows.tasks import conversion_record

    (tmp_path / "atlas").mkdir()
    atlas = _store(tmp_path / "atlas" / "atlas.ome.zarr", 1.0)
    moving = ImageInput(path=tmp_path / "atlas.nrrd", converted=atlas)
    job = ItemJob(
        name="item",
        out_dir=tmp_path / "item",
        fixed=ImageInput(path=_store(tmp_path / "item.ome.zarr", 2.0), converted=tmp_path / "item.c.zarr"),
        moving=moving,
    )
    conversion_record(atlas).write_text(json.dumps({"fingerprint": conversion_key(moving)}))
    errors: list = []
    assert _converted_as_asked([job], errors) == [job] and errors == []
    conversion_record(atlas).write_text(json.dumps({"fingerprint": "another geometry"}))
    assert _converted_as_asked([job], errors) == []
    assert [(e.name, e.step) for e in errors] == [("item", "inputs")]
    assert "was converted again by another run with other settings" in errors[0].message


def test_a_finished_item_whose_field_another_run_wrote_again_is_made_again(tmp_path: Path) -> None:
    """An item's ``done.json`` vouches for the field it made: once another run (``patchmorph atlas`` into the item's
    folder, with its own settings) has written the field again, a rerun of the batch makes the item again instead
    of skipping it with outputs it did not make; a record of before the field was recorded is taken as it was."""
    import json

    from flows.records import DONE_FILE, ItemResult, finished_result, write_done

    item = tmp_path / "mouse1"
    item.mkdir()
    field = _store(item / "field.ome.zarr", 1.0)
    write_done(item, ItemResult(name="mouse1", out_dir=item, outputs={"field": field}), "key")
    assert finished_result(item, "key") is not None
    _store(field, 2.0)  # written again by another run
    assert finished_result(item, "key") is None
    record = json.loads((item / DONE_FILE).read_text())
    (item / DONE_FILE).write_text(json.dumps({k: v for k, v in record.items() if k != "field"}))
    assert finished_result(item, "key") is not None
