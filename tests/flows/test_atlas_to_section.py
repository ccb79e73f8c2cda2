"""atlas-to-section end to end on small real data, under a Prefect test server with a real Dask cluster."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.atlas_to_section import atlas_to_section
from flows.records import RunReport
from flows.runner import BatchFailed
from patchmorph_core.errors import InputError


def _run(batch: dict[str, Path], manifest: Path) -> tuple[RunReport, str]:
    """Run the flow; its report and final state name (a batch with failed items ends Failed, report kept)."""
    state = atlas_to_section(
        str(batch["atlas"]), str(manifest), str(batch["out"]), config=str(batch["options"]), return_state=True
    )
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BatchFailed):
        assert state.is_failed() and state.message == str(outcome)
        return outcome.report, state.name
    return outcome, state.name


@pytest.fixture(scope="module")
def batch(
    flow_data: dict[str, Path], write_options: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A manifest of two good items, one unreadable file and one invalid entry; options; output folder."""
    root = tmp_path_factory.mktemp("a2s")
    broken = root / "broken.tif"
    broken.write_bytes(b"this is not a TIFF file")
    manifest = root / "manifest.yaml"
    manifest.write_text(
        yaml.safe_dump(
            [
                {"name": "stp", "path": str(flow_data["brain_tif"]), "voxel_size": [200, 200, 200],
                 "unit": "micrometer", "orientation": "psl"},
                {"name": "broken", "path": "broken.tif", "voxel_size": [200, 200, 200], "orientation": "psl"},
                {"name": "bad-entry", "path": "x.tif", "orientation": "xyz"},
                {"name": "template", "path": str(flow_data["atlas"]), "labels": str(flow_data["atlas_labels"])},
            ]
        )
    )
    options = write_options(root / "options.yaml", atlas_labels=str(flow_data["atlas_labels"]))
    return {"manifest": manifest, "options": options, "out": root / "out", "atlas": flow_data["atlas"]}


@pytest.mark.usefixtures("prefect_server")
def test_batch_finishes_good_items_and_records_errors(batch: dict[str, Path]) -> None:
    report, state = _run(batch, batch["manifest"])

    assert state == "Failed"  # not plain Completed: two items failed, the two good ones finished
    assert sorted(r.name for r in report.results) == ["stp", "template"]
    assert all(r.status == "done" for r in report.results)
    errors = {e.name: e for e in report.errors}
    assert set(errors) == {"broken", "bad-entry"}
    assert errors["broken"].step == "convert" and errors["broken"].error_type == "InputError"
    assert errors["bad-entry"].step == "manifest" and "orientation" in errors["bad-entry"].message

    for result in report.results:
        for role in ("field", "warped", "warped_labels", "metrics"):
            assert result.outputs[role].exists(), (result.name, role)
        assert set(result.qc) == {"overlay", "checkerboard", "jacobian", "uncertainty"}
        assert all(p.stat().st_size > 5000 for p in result.qc.values())
        assert -1.0 <= result.metrics["ncc"] <= 1.0
        assert result.metrics["folding_percent"] >= 0.0
        assert (result.out_dir / "done.json").is_file()
    template = next(r for r in report.results if r.name == "template")
    assert 0.0 <= template.metrics["dice_mean"] <= 1.0 and template.metrics["n_labels"] > 10
    # the TIFF sample was converted next to its outputs; the OME-Zarr sample was used in place
    assert (batch["out"] / "stp" / "sample.ome.zarr").is_dir()
    assert not (batch["out"] / "template" / "sample.ome.zarr").exists()

    table = (batch["out"] / "report.md").read_text()
    stp = next(r for r in report.results if r.name == "stp")
    assert f"| stp | {stp.source} | done |" in table and "failed (convert)" in table and "failed (manifest)" in table
    saved = json.loads((batch["out"] / "report.json").read_text())
    assert len(saved["results"]) == 2 and len(saved["errors"]) == 2
    assert report.artifacts[0] == "atlas-to-section-metrics" and "atlas-to-section-qc-stp" in report.artifacts

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        keys = {a.key for a in artifact}
        # the failed item is in the log of the run the user started (API and UI), not only in its items' subflow's
        # or on the worker's terminal
        flows = FlowFilter(name=FlowFilterName(any_=["atlas-to-section"]))
        runs = client.read_flow_runs(flow_filter=flows, sort=FlowRunSort.START_TIME_DESC, limit=1)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[runs[0].id])))
    assert {"atlas-to-section-metrics", "atlas-to-section-qc-stp", "atlas-to-section-qc-template"} <= keys
    assert any("item broken failed at convert" in entry.message for entry in logs), [e.message for e in logs]


@pytest.mark.usefixtures("prefect_server")
def test_rerun_skips_finished_items(batch: dict[str, Path]) -> None:
    done = batch["out"] / "stp" / "done.json"
    if not done.is_file():
        pytest.skip("needs the first run of this module")
    field_mtime = (batch["out"] / "stp" / "field.ome.zarr" / "zarr.json").stat().st_mtime_ns
    record_mtime = done.stat().st_mtime_ns

    report, _ = _run(batch, batch["manifest"])

    assert sorted((r.name, r.status) for r in report.results) == [("stp", "skipped"), ("template", "skipped")]
    assert {e.name for e in report.errors} == {"broken", "bad-entry"}  # failed items are retried, fail again
    assert (batch["out"] / "stp" / "field.ome.zarr" / "zarr.json").stat().st_mtime_ns == field_mtime
    assert done.stat().st_mtime_ns == record_mtime


def test_an_item_that_stopped_after_its_registration_keeps_its_field(batch: dict[str, Path]) -> None:
    """An item whose later step failed (here: its completion record is gone, as when the disk filled while its
    labels were written) is made again from its finished field: the rerun does not register it again."""
    item = batch["out"] / "stp"
    if not (item / "done.json").is_file():
        pytest.skip("needs the first run of this module")
    field_mtime = (item / "field.ome.zarr" / "zarr.json").stat().st_mtime_ns
    before = json.loads((item / "metrics.json").read_text())["register_seconds"]
    (item / "done.json").unlink()

    report, _ = _run(batch, batch["manifest"])

    assert sorted((r.name, r.status) for r in report.results) == [("stp", "done"), ("template", "skipped")]
    assert (item / "field.ome.zarr" / "zarr.json").stat().st_mtime_ns == field_mtime
    assert json.loads((item / "metrics.json").read_text())["register_seconds"] == before  # the run that made it


@pytest.mark.usefixtures("prefect_server")
def test_changed_input_is_recomputed(
    batch: dict[str, Path], flow_data: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An item whose input changed (here: its voxel size) is recomputed, with a warning that its earlier outputs
    are replaced; the others are still skipped."""
    if not (batch["out"] / "stp" / "done.json").is_file():
        pytest.skip("needs the first run of this module")
    entries = yaml.safe_load(batch["manifest"].read_text())
    entries = [e for e in entries if e["name"] in ("stp", "template")]
    entries[0]["voxel_size"] = [210, 200, 200]
    manifest = batch["manifest"].with_name("manifest_changed.yaml")
    manifest.write_text(yaml.safe_dump(entries))

    with caplog.at_level("WARNING", logger="flows.steps"):
        report, state = _run(batch, manifest)

    assert sorted((r.name, r.status) for r in report.results) == [("stp", "done"), ("template", "skipped")]
    assert report.errors == [] and state == "Completed"
    assert "item stp: its inputs or settings changed since it finished" in caplog.text
    assert "item template: its inputs" not in caplog.text


@pytest.mark.usefixtures("prefect_server")
def test_brainglobe_atlas_gives_each_item_the_atlas_jobs_outputs(
    flow_data: dict[str, Path], write_options: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundled BrainGlobe atlas folder as ``atlas``: per item what ``patchmorph atlas`` writes — labels
    nested in a copy of the sample, the sample in atlas space in the atlas's array order, the inverse field,
    volumes.csv, the atlas QC figures and their figures in the metrics. A slab item with ``atlas_range: ap=auto``
    gets the range ``patchmorph atlas --atlas-range ap=auto`` finds, near where the whole brain's item puts its tissue,
    with the search in its summary, and a rerun reads it back; one too thin for the search is its own error."""
    import csv

    import tifffile
    import zarr

    from pipeline.demo import EXAMPLE_ATLAS, EXAMPLE_DIR
    from pipeline.ngff import image_orientation, read_field, read_image

    brain = tifffile.imread(flow_data["brain_tif"])
    tifffile.imwrite(tmp_path / "left.tif", brain[:, :, : brain.shape[2] // 2 + 1])  # psl: axis 2 runs left to right
    tifffile.imwrite(tmp_path / "slab.tif", brain[27:40])  # a 2.6 mm coronal slab, about ap=6300:9300 of the atlas (the stp item puts its tissue there)
    tifffile.imwrite(tmp_path / "thin.tif", brain[27:33])  # 1.2 mm: too thin for the search
    geometry = {"voxel_size": [200, 200, 200], "orientation": "psl"}
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(
        yaml.safe_dump(
            [
                {"name": "stp", "path": str(flow_data["brain_tif"]), "channels": [str(flow_data["brain_tif"])], **geometry},
                {"name": "left", "path": str(tmp_path / "left.tif"), "brain_geometry": "hemisphere_l", **geometry},
                {"name": "left_as_right", "path": str(tmp_path / "left.tif"), "brain_geometry": "hemisphere_r", **geometry},
                {"name": "slab", "path": str(tmp_path / "slab.tif"), "atlas_range": "ap=4800:8500", **geometry},
                {"name": "slab_outside", "path": str(tmp_path / "slab.tif"), "atlas_range": ["ap=12000:14000"], **geometry},
                {"name": "slab_auto", "path": str(tmp_path / "slab.tif"), "atlas_range": "ap=auto", **geometry},
                {"name": "thin_auto", "path": str(tmp_path / "thin.tif"), "atlas_range": ["ap=auto"], **geometry},
                {"name": "stretched", "path": str(flow_data["brain_tif"]), **geometry, "voxel_size": [400, 200, 200]},
            ]
        )
    )
    options = write_options(tmp_path / "options.yaml", workers=1)
    state = atlas_to_section(
        str(EXAMPLE_DIR / EXAMPLE_ATLAS), str(manifest), str(tmp_path / "out"), config=str(options), return_state=True
    )
    failed = state.result(raise_on_failure=False)
    assert state.is_failed() and isinstance(failed, BatchFailed)
    report = failed.report

    assert sorted(r.name for r in report.results) == ["left", "slab", "slab_auto", "stp"]
    # the other hemisphere given: refused before its registration, naming the atlas's half and the other one
    refused, outside, stretched, thin = sorted(report.errors, key=lambda e: e.name)
    # a voxel size twice too large along axis 0: refused before its registration, as patchmorph atlas refuses it
    assert stretched.name == "stretched" and stretched.step == "register", stretched
    assert "times longer along anterior-posterior" in stretched.message and "manifest item's voxel_size" in stretched.message
    assert not (tmp_path / "out" / "stretched" / "field.ome.zarr").exists()
    # a slab too thin for ap=auto: its error in one sentence, from its header (nothing of it made)
    assert thin.name == "thin_auto" and thin.step == "atlas_range", thin
    assert thin.message.startswith("manifest item 'thin_auto': atlas_range ap=auto: the voxels of the brain")
    assert "span only 1200 µm along ap, less than the 1500 µm" in thin.message
    assert not (tmp_path / "out" / "thin_auto").exists()
    # a range outside the atlas: that item's error, before anything of it is made
    assert outside.name == "slab_outside" and outside.step == "manifest", outside
    assert "manifest item 'slab_outside': atlas_range ap=12000:14000 lies outside the atlas" in outside.message
    assert not (tmp_path / "out" / "slab_outside").exists()
    assert refused.name == "left_as_right" and refused.step == "register", refused
    assert "its right hemisphere only" in refused.message and "give hemisphere_l" in refused.message
    assert str(tmp_path / "left.tif") in refused.message and "fixed.ome.zarr" not in refused.message
    # the hemisphere item is registered to the atlas's left hemisphere: no structure of the right on it
    left = next(r for r in report.results if r.name == "left")
    sides = [(float(r["left_volume_mm3"]), float(r["right_volume_mm3"])) for r in csv.DictReader(left.outputs["volumes"].open())]
    assert sum(r for _, r in sides) == 0.0 and sum(v for v, _ in sides) > 50
    assert json.loads((tmp_path / "out" / "atlas_hemisphere_l" / "atlas.json").read_text())["brain_geometry"] == "hemisphere_l"
    # the slab is registered to the atlas cut to its range (asr: axis 0 anterior to posterior, 100 µm voxels),
    # which its summary and its job's record (read by points and the cohort) name
    from pipeline.cohort import cohort_tables
    from pipeline.points import map_points, open_job

    cut = np.asarray(read_image(tmp_path / "out" / "atlas_ap4800-8500" / "annotation.ome.zarr").levels[0].array[...])
    assert cut[48:85].any() and not cut[:48].any() and not cut[85:].any()
    assert json.loads((tmp_path / "out" / "slab" / "summary.json").read_text())["atlas_range"] == {"ap": [4800.0, 8500.0]}
    assert "Atlas cut to ap=4800:8500 µm" in " ".join((tmp_path / "out" / "slab" / "summary.md").read_text().split())
    assert open_job(tmp_path / "out" / "slab").atlas_range == {"ap": [4800.0, 8500.0]}
    assert json.loads((tmp_path / "out" / "stp" / "summary.json").read_text())["atlas_range"] == {}
    # ap=auto: the range found lies where the whole brain's item puts the slab's tissue (as the single job's test)
    from flows.atlas_to_section import atlas_jobs, placed_items, prepared_atlases
    from flows.config import AtlasToSectionOptions, resolve_options
    from flows.manifest import load_manifest
    from flows.steps import split_finished
    from pipeline.brainglobe import find_atlas

    tissue = np.argwhere(brain[27:40] > np.percentile(brain, 60))[::5]
    whole = map_points(open_job(tmp_path / "out" / "stp"), tissue + [27, 0, 0], "brain").atlas[:, 0] * 100.0  # µm
    low, high = np.floor(whole.min() / 100) * 100, np.ceil(whole.max() / 100) * 100 + 100
    auto = json.loads((tmp_path / "out" / "slab_auto" / "summary.json").read_text())
    found = auto["atlas_range"]["ap"]  # measured: 6500:9100 against 6300:9300
    assert abs((found[0] + found[1]) / 2 - (low + high) / 2) <= 300.0, (found, low, high)  # test_atlas's AUTO_TOLERANCE_UM
    assert auto["atlas_placement"]["ap"]["range"] == found and len(auto["atlas_placement"]["ap"]["candidates"]) > 10
    assert f"Atlas range found: ap={found[0]:g}:{found[1]:g} µm" in (tmp_path / "out" / "slab_auto" / "summary.md").read_text()
    assert json.loads((tmp_path / "out" / f"atlas_ap{found[0]:g}-{found[1]:g}" / "atlas.json").read_text())["atlas_range"] == {"ap": found}
    # a rerun reads the range back (no search) and finds the item finished

    def searched(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rerun searched again")

    monkeypatch.setattr("pipeline.atlas_job.place_in_atlas", searched)
    example = find_atlas(EXAMPLE_DIR / EXAMPLE_ATLAS)
    entries, placements, unplaced = placed_items(
        example, [e for e in load_manifest(manifest) if e.name == "slab_auto"], tmp_path / "out"
    )
    assert not unplaced and entries[0].atlas_range == {"ap": tuple(found)}
    # the batch's overwrite searches again, as it recomputes every item
    _, _, again = placed_items(
        example, [e for e in load_manifest(manifest) if e.name == "slab_auto"], tmp_path / "out", overwrite=True
    )
    assert [e.message for e in again] == ["a rerun searched again"]
    jobs, _ = atlas_jobs(
        EXAMPLE_DIR / EXAMPLE_ATLAS, entries, tmp_path / "out", AtlasToSectionOptions(),
        prepared_atlases(example, entries, tmp_path / "out"), placements,
    )  # fmt: skip
    finished, todo = split_finished(jobs, resolve_options(str(options), AtlasToSectionOptions))
    assert [r.name for r in finished] == ["slab_auto"] and not todo
    # an item given other channels keeps its registration (its record is keyed by what the field is made from)
    from flows.records import reusable_registration

    step_options = resolve_options(str(options), AtlasToSectionOptions)
    for_stp = [e for e in load_manifest(manifest) if e.name == "stp"]
    without = [e.model_copy(update={"channels": ()}) for e in for_stp]
    (given,), (other,) = (
        atlas_jobs(
            EXAMPLE_DIR / EXAMPLE_ATLAS, items, tmp_path / "out", AtlasToSectionOptions(),
            prepared_atlases(example, items, tmp_path / "out"), {},
        )[0]
        for items in (for_stp, without)
    )  # fmt: skip
    assert given.channels and not other.channels and given.key(step_options) != other.key(step_options)
    assert reusable_registration(other.out_dir, other.registration_key(step_options), other.field) is not None
    with pytest.raises(InputError, match="different parts of the atlas"):
        cohort_tables([tmp_path / "out" / "stp", tmp_path / "out" / "slab"], tmp_path / "cohort")
    result = next(r for r in report.results if r.name == "stp")
    item = tmp_path / "out" / "stp"
    brain = item / "brain.ome.zarr"
    assert result.outputs["atlas_on_brain"] == brain / "labels" / "atlas"
    assert dict(zarr.open_group(str(brain / "labels"), mode="r").attrs)["ome"]["labels"] == [
        "atlas", "hemispheres", "boundaries"
    ]  # fmt: skip
    in_atlas = result.outputs["brain_in_atlas_space"]
    assert read_image(in_atlas).grid.shape == (132, 80, 114) and image_orientation(in_atlas) == "asr"
    assert (
        Path(read_field(result.outputs["inverse_field"])[2]["fixed"])
        == tmp_path / "out" / "atlas" / "reference.ome.zarr"
    )
    rows = list(csv.DictReader(result.outputs["volumes"].open()))
    assert len(rows) > 400 and {"structure_id", "acronym"} <= set(rows[0])
    assert {"overlay", "atlas_space", "jacobian"} <= set(result.qc)
    assert all(p.stat().st_size > 5000 for p in result.qc.values())
    assert result.metrics["ncc_in_atlas_space"] > 0.5 and result.metrics["n_structures"] > 400
    # its extra channel (the sample itself) in atlas space, and its signal per structure
    channel = flow_data["brain_tif"].name.split(".")[0]
    assert read_image(result.outputs[f"{channel}_in_atlas_space"]).grid.shape == (132, 80, 114)
    signal = list(csv.DictReader(result.outputs[f"{channel}_signal"].open()))
    assert len(signal) > 400 and float(signal[0]["total_integral_mm3"]) != 0.0
    # lengths in one unit whatever the item's, its own registration time, and where it came from
    assert "inverse_max_error" not in result.metrics and 0 < result.metrics["inverse_max_error_um"] < 1000
    assert result.metrics["register_seconds"] > 0 and result.source == str(flow_data["brain_tif"])
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| item | source | status |" in table and "group wall s" in table and str(flow_data["brain_tif"]) in table
    # the one-page summary that 'patchmorph atlas' writes, per item, with its figures and times
    summary = json.loads((item / "summary.json").read_text())
    assert summary["atlas"] == "allen_mouse_100um" and summary["ncc_in_atlas_space"] == result.metrics["ncc_in_atlas_space"]
    assert summary["register_seconds"] > 0 and summary["field_unit"] == "micrometer"
    page = (item / "summary.md").read_text()
    assert page.startswith("# Atlas allen_mouse_100um registered to the brain") and "qc/overlay.png" in page
    assert result.outputs["summary_md"] == item / "summary.md"
    # a batch item is a finished atlas job for the commands that read one
    from typer.testing import CliRunner

    from patchmorph.cli import app

    labels = np.asarray(read_image(brain / "labels" / "atlas").levels[0].array[...])
    from scipy import ndimage

    uniform = (ndimage.maximum_filter(labels, 3) == ndimage.minimum_filter(labels, 3)) & (labels > 0)
    cells = np.argwhere(uniform)[::50][:20]  # inside a structure, not at its border (where vote and nearest differ)
    (tmp_path / "cells.csv").write_text("z,y,x\n" + "\n".join(",".join(map(str, c)) for c in cells) + "\n")
    mapped = CliRunner().invoke(app, ["points", str(tmp_path / "cells.csv"), "--job", str(item), "-o", str(tmp_path / "cells")])
    assert mapped.exit_code == 0, mapped.output
    rows = list(csv.DictReader((tmp_path / "cells" / "all_points.csv").open()))
    found = np.array([int(r["structure_id"]) for r in rows])
    assert len(cells) == 20 and np.mean(found == labels[tuple(cells.T)]) >= 0.9
    exported = CliRunner().invoke(app, ["export-brainreg", "--job", str(tmp_path / "out" / "left"), "-o", str(tmp_path / "br")])
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "br" / "brainreg.json").read_text())["brain_geometry"] == "hemisphere_l"
    # an item's extra channel goes into brainreg's folder as 'patchmorph atlas --channel' does
    exported = CliRunner().invoke(app, ["export-brainreg", "--job", str(item), "-o", str(tmp_path / "br_stp")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "br_stp" / f"downsampled_{channel}.tiff").is_file()
    assert (tmp_path / "br_stp" / f"downsampled_standard_{channel}.tiff").is_file()
