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


@pytest.mark.usefixtures("prefect_server")
def test_two_runs_into_one_folder_keep_each_others_items_in_the_report(tmp_path: Path) -> None:
    """The folder's report.json and report.md hold every item of the folder: a second run (another manifest) keeps
    the first run's items, an item both ran has the later outcome, and the report each run returns is its own."""
    import json

    from prefect import flow

    from flows.records import ItemError, ItemResult, Outcomes, RunReport
    from flows.runner import finish_run

    def result(name: str, ncc: float) -> ItemResult:
        return ItemResult(name=name, out_dir=tmp_path / name, metrics={"ncc": ncc})

    @flow(name="report-twice")
    def report_twice() -> RunReport:  # as the flows call it: inside a flow run
        first = Outcomes(results=[result("mouse1", 0.7), result("mouse2", 0.6)], errors=[])
        finish_run("atlas-to-section", {}, tmp_path, first)
        failed = ItemError(name="mouse3", step="convert", error_type="InputError", message="unreadable")
        return finish_run("atlas-to-section", {}, tmp_path, Outcomes(results=[result("mouse2", 0.8)], errors=[failed]))

    second = report_twice()
    assert [r.name for r in second.results] == ["mouse2"] and [e.name for e in second.errors] == ["mouse3"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert {r["name"]: r["metrics"]["ncc"] for r in saved["results"]} == {"mouse1": 0.7, "mouse2": 0.8}
    assert [e["name"] for e in saved["errors"]] == ["mouse3"]
    table = (tmp_path / "report.md").read_text()
    assert table.startswith("# atlas-to-section: 2 aligned, 1 failed") and "| mouse1 |" in table


def test_an_ome_zarr_another_tool_wrote_is_converted_before_it_is_registered(tmp_path: Path) -> None:
    """An OME-Zarr input of ome-zarr-py (its own pyramid, halving y and x only) is converted by the flow, as a TIFF
    would be, so that the registration reads PatchMorph's pyramid; one that PatchMorph wrote is read as it is."""
    import numpy as np
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image as ome_write_image

    from flows.steps import ImageInput
    from pipeline.importers import convert

    foreign = tmp_path / "brain.zarr"
    ome_write_image(
        np.random.default_rng(0).integers(0, 1000, (6, 16, 20)).astype(np.uint16),
        zarr.open_group(str(foreign), mode="w", zarr_format=2), axes="zyx", fmt=FormatV04(), scale_factors=[2],
        scale={"z": 50.0, "y": 40.0, "x": 40.0}, axes_units={a: "micrometer" for a in "zyx"},
    )  # fmt: skip
    given = ImageInput(path=foreign, converted=tmp_path / "out" / "fixed.ome.zarr")
    assert given.needs_conversion and given.ready == tmp_path / "out" / "fixed.ome.zarr"
    ours = convert(foreign, tmp_path / "ours.ome.zarr")
    kept = ImageInput(path=ours, converted=tmp_path / "out" / "moving.ome.zarr")
    assert not kept.needs_conversion and kept.ready == ours
