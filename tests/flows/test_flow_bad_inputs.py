"""Bad input to the flows (the flow half of the issue-22 bad-input suite, with ``tests/app/test_bad_inputs.py``):
run-level problems fail the flow run with one sentence; item-level problems become that item's error record
while the batch goes on, and the run ends ``Failed`` (not ``Completed``); no failed item leaves an output
marked complete, and no input changes."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from flows.atlas_to_section import atlas_to_section
from flows.manifest import MAX_NAME_LENGTH, ManifestItem, load_manifest
from flows.register_pair import register_pair
from flows.runner import BatchFailed
from flows.train import train
from patchmorph_core.model import save_checkpoint
from pipeline.ngff import read_image, write_image

RUN_CASES = {
    # id: (what to break, expected message)
    "atlas-missing": ("atlas", r"atlas .*nowhere\.zarr does not exist"),
    "manifest-missing": ("manifest_missing", r"manifest .*nowhere\.yaml does not exist"),
    "manifest-empty": ("manifest_empty", r"lists no items"),
    "manifest-not-a-list": ("manifest_mapping", r"must be a list of items"),
    "manifest-invalid-yaml": ("manifest_yaml", r"is not valid YAML"),
    "report-over-the-manifest": ("report_is_manifest", r"report .*report\.md is the manifest input"),
    "options-unknown-key": ("options_unknown", r"no_such_option"),
}


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for root in paths:
        for path in sorted([root] if root.is_file() else (p for p in root.rglob("*") if p.is_file())):
            digest.update(str(path).encode() + path.read_bytes())
    return digest.hexdigest()


def _failure(state: object) -> str:
    """The one-sentence message of a failed flow run state."""
    assert state.is_failed(), state  # type: ignore[attr-defined]
    return str(state.message)  # type: ignore[attr-defined]


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_run_level_bad_input_fails_the_run(
    case: str, flow_data: dict[str, Path], write_options: Callable[..., Path], tmp_path: Path
) -> None:
    what, pattern = RUN_CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump([{"name": "stp", "path": str(flow_data["brain_tif"]), "voxel_size": [200] * 3}]))
    options = write_options(tmp_path / "options.yaml")
    atlas = flow_data["atlas"]
    if what == "atlas":
        atlas = tmp_path / "nowhere.zarr"
    elif what == "manifest_missing":
        manifest = tmp_path / "nowhere.yaml"
    elif what == "manifest_empty":
        manifest.write_text("[]\n")
    elif what == "manifest_mapping":
        manifest.write_text("path: brain.tif\n")
    elif what == "manifest_yaml":
        manifest.write_text("- {path: [unclosed\n")
    elif what == "report_is_manifest":
        manifest = out / "report.md"
        manifest.write_text(yaml.safe_dump([{"path": str(flow_data["brain_tif"]), "voxel_size": [200] * 3}]))
    elif what == "options_unknown":
        options.write_text(options.read_text() + "no_such_option: 1\n")
    before = _digest([flow_data["root"], *([manifest] if manifest.exists() else [])])
    state = atlas_to_section(str(atlas), str(manifest), str(out), config=str(options), return_state=True)
    message = _failure(state)
    assert re.search(pattern, message), message
    assert _digest([flow_data["root"], *([manifest] if manifest.exists() else [])]) == before
    assert not any(out.rglob("done.json")) and not (out / "stp").exists()


@pytest.fixture(scope="module")
def bad_items(flow_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A manifest whose every item is bad in its own way (one flow run shows them all)."""
    root = tmp_path_factory.mktemp("bad_items")
    out = root / "out"
    (out / "clash").mkdir(parents=True)
    brain = read_image(flow_data["atlas"])
    # an input that lies where the item's warped image would go: the item must not overwrite it
    write_image(out / "clash" / "warped.ome.zarr", np.asarray(brain.levels[0].array[:]), brain.grid)
    raw = flow_data["brain_tif"].read_bytes()
    (root / "truncated.tif").write_bytes(raw[: len(raw) // 3])
    tifffile.imwrite(root / "empty.tif", np.zeros(tifffile.TiffFile(flow_data["brain_tif"]).series[0].shape, np.uint16))
    entries = [
        {"name": "bad-orientation", "path": str(flow_data["brain_tif"]), "voxel_size": [200] * 3, "orientation": "abc"},
        {"name": "no-path", "voxel_size": [200] * 3},
        {"name": "missing-file", "path": str(root / "nowhere.tif"), "voxel_size": [200] * 3, "orientation": "psl"},
        {"name": "clash", "path": str(out / "clash" / "warped.ome.zarr")},
        {"name": "truncated", "path": str(root / "truncated.tif"), "voxel_size": [200] * 3, "orientation": "psl"},
        {"name": "wrong-unit", "path": str(flow_data["brain_tif"]), "voxel_size": [0.2] * 3, "unit": "micrometer",
         "orientation": "psl"},
        {"name": "bad-voxel-size", "path": str(flow_data["brain_tif"]), "voxel_size": [0, 200, 200]},
        {"name": "empty", "path": str(root / "empty.tif"), "voxel_size": [200] * 3, "orientation": "psl"},
        {"name": "hemisphere-of-an-image-atlas", "path": str(flow_data["brain_tif"]), "voxel_size": [200] * 3,
         "orientation": "psl", "brain_geometry": "hemisphere_r"},
    ]  # fmt: skip
    manifest = root / "manifest.yaml"
    manifest.write_text(yaml.safe_dump(entries))
    return {"root": root, "manifest": manifest, "out": out}


ITEM_CASES = {
    # item: (step, message pattern)
    "bad-orientation": ("manifest", r"orientation is invalid"),
    "no-path": ("manifest", r"has no 'path': add the image path"),
    "missing-file": ("inputs", r"fixed input .*nowhere\.tif does not exist"),
    "clash": ("inputs", r"warped .*warped\.ome\.zarr is the fixed input"),
    "truncated": ("convert", r"truncated\.tif.* (cannot be read to its end|is not a readable TIFF)"),
    "wrong-unit": ("register", r"spans .* of tissue along .* more than 3x"),
    "bad-voxel-size": ("manifest", r"voxel_size is invalid"),
    "empty": ("convert", r"empty\.tif looks empty: its three mid-planes are constant"),
    "hemisphere-of-an-image-atlas": ("manifest", r"brain_geometry hemisphere_r needs a BrainGlobe atlas"),
}


@pytest.fixture(scope="module")
def bad_batch(bad_items: dict[str, Path], flow_data: dict[str, Path], write_options: Callable[..., Path]) -> dict:
    # the atlas is given an orientation, so the flow converts it into <out>/atlas/, a folder it must create
    options = write_options(bad_items["root"] / "options.yaml", workers=1, atlas_geometry={"orientation": "rsa"})
    before = _digest([flow_data["root"], bad_items["out"] / "clash" / "warped.ome.zarr"])
    state = atlas_to_section(
        str(flow_data["atlas"]), str(bad_items["manifest"]), str(bad_items["out"]), config=str(options),
        return_state=True,
    )  # fmt: skip
    after = _digest([flow_data["root"], bad_items["out"] / "clash" / "warped.ome.zarr"])
    return {"state": state, "unchanged": before == after, **bad_items}


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("item", sorted(ITEM_CASES))
def test_bad_item_is_an_error_record(item: str, bad_batch: dict) -> None:
    step, pattern = ITEM_CASES[item]
    failure = bad_batch["state"].result(raise_on_failure=False)
    assert isinstance(failure, BatchFailed) and bad_batch["state"].name == "Failed"
    assert f"{len(ITEM_CASES)} of {len(ITEM_CASES)} items failed" in str(failure)
    errors = {e.name: e for e in failure.report.errors}
    assert errors[item].step == step, errors[item]
    assert re.search(pattern, errors[item].message), errors[item].message
    assert bad_batch["unchanged"]  # no input changed, the clashing one included
    folder = bad_batch["out"] / item
    assert not (folder / "done.json").exists()
    field = folder / "field.ome.zarr" / "zarr.json"
    assert not field.exists() or not json.loads(field.read_text())["attributes"]["patchmorph"]["complete"]
    report = json.loads((bad_batch["out"] / "report.json").read_text())
    assert item in {e["name"] for e in report["errors"]}
    atlas = bad_batch["out"] / "atlas" / "atlas.ome.zarr" / "zarr.json"
    assert json.loads(atlas.read_text())["attributes"]["patchmorph"]["complete"]  # converted on the first run


NAME_CASES = {
    # what: (manifest names, the output folder names they must get)
    "duplicates": (["dup", "dup", "dup-2"], ["dup", "dup-2", "dup-2-2"]),
    "reserved": (["report.md", "atlas", "REPORT.json"], ["report.md-2", "atlas-2", "REPORT.json-2"]),
    "case-only": (["Brain", "brain"], ["Brain", "brain-2"]),
    "too-long": (["x" * 300, "x" * 300], None),
    "unusable-characters": (["../..", "a/b c"], ["a_b_c"]),  # '../..' has nothing usable: an error record
}


@pytest.mark.parametrize("case", sorted(NAME_CASES))
def test_item_names_are_unique_and_safe(case: str, tmp_path: Path) -> None:
    names, expected = NAME_CASES[case]
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump([{"name": n, "path": f"b{i}.tif"} for i, n in enumerate(names)]))
    items = [item for item in load_manifest(manifest) if isinstance(item, ManifestItem)]
    got = [item.name for item in items]
    if expected is not None:
        assert got == expected
    assert len({n.lower() for n in got}) == len(got)
    for name in got:
        assert 0 < len(name) <= MAX_NAME_LENGTH and "/" not in name and not name.startswith(".")
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()  # a folder inside the output folder


@pytest.mark.usefixtures("prefect_server")
def test_register_pair_with_a_missing_input_fails_the_run(
    flow_data: dict[str, Path], write_options: Callable[..., Path], tmp_path: Path
) -> None:
    options = write_options(tmp_path / "options.yaml", workers=1)
    state = register_pair(
        str(flow_data["atlas"]), str(tmp_path / "nowhere.nii.gz"), str(tmp_path / "pair"), config=str(options),
        return_state=True,
    )  # fmt: skip
    assert re.search(r"register-pair: 1 of 1 items failed .* at inputs: .*nowhere\.nii\.gz does not exist", _failure(state))
    assert not (tmp_path / "pair" / "done.json").exists()


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize(("steps", "pattern"), [(2, r"checkpoint .*model\.pt already exists"), (-1, r"--steps -1 is invalid")])
def test_train_flow_refuses_before_training(steps: int, pattern: str, tmp_path: Path) -> None:
    from patchmorph_core.config import ModelConfig
    from patchmorph_core.model import PatchMorph

    checkpoint = save_checkpoint(tmp_path / "model.pt", PatchMorph(ModelConfig(patch_size=16, n_stages=2, widths=(4, 8))))
    before = checkpoint.read_bytes()
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"data": {"kind": "pairs", "pairs": [["a.nii.gz", "b.nii.gz"]]}, "checkpoint": str(checkpoint)}))
    state = train(str(config), steps=steps, return_state=True)
    assert state.is_failed() and re.search(pattern, str(state.result(raise_on_failure=False)))
    assert checkpoint.read_bytes() == before  # hours of training are not lost
