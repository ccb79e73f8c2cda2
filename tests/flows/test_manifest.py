"""Manifests: YAML and CSV, relative paths, per-entry problems instead of a failed batch, unique names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.manifest import ManifestItem, ManifestProblem, default_name, load_manifest
from patchmorph_core.errors import InputError


def test_yaml_manifest_resolves_paths_and_reports_bad_entries(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "items:\n"
        "  - path: brains/a.ome.zarr\n"
        "  - {path: planes/, voxel_size: [50, 40, 40], unit: micrometer, orientation: PSL, labels: l.nii.gz}\n"
        "  - {path: c.tif, voxel_size: [50, 0, 40]}\n"
        "  - {name: nopath}\n"
        "  - {path: brains/a.ome.zarr, colour: red}\n"
    )
    items = load_manifest(tmp_path / "m.yaml")
    assert [type(i) for i in items] == [ManifestItem, ManifestItem, ManifestProblem, ManifestProblem, ManifestProblem]
    first, second = items[0], items[1]
    assert first.name == "a" and first.path == tmp_path / "brains" / "a.ome.zarr" and first.voxel_size is None
    assert second.name == "planes" and second.voxel_size == (50.0, 40.0, 40.0) and second.orientation == "psl"
    assert second.labels == tmp_path / "l.nii.gz"
    assert "voxel_size" in items[2].message and "c" == items[2].name
    assert "no 'path'" in items[3].message
    assert items[4].name == "a-2" and "colour" in items[4].message


def test_csv_manifest(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text(
        "name,path,voxel_size,unit,orientation\n"
        "b1,/data/b1.tif,50 40 40,micrometer,psl\n"
        "b2,b2.nii.gz,,,\n"
        "b3,b3.tif,50x40x40,micrometer,qqq\n"
    )
    items = load_manifest(tmp_path / "m.csv")
    assert items[0] == ManifestItem(
        name="b1", path=Path("/data/b1.tif"), voxel_size=(50, 40, 40), unit="micrometer", orientation="psl"
    )
    assert items[1].path == tmp_path / "b2.nii.gz" and items[1].unit is None
    assert isinstance(items[2], ManifestProblem) and "orientation" in items[2].message


def test_channels_and_brain_geometry_of_an_item(tmp_path: Path) -> None:
    """Extra channels (a YAML list, or one CSV cell separated by ';') resolve against the manifest's folder."""
    (tmp_path / "m.csv").write_text("path,channels,brain_geometry\nb1.tif,c1.tif; /data/c2.tif,hemisphere_r\n")
    (tmp_path / "m.yaml").write_text("- {path: b1.tif, channels: [c1.tif, /data/c2.tif], brain_geometry: hemisphere_r}\n")
    for name in ("m.csv", "m.yaml"):
        item = load_manifest(tmp_path / name)[0]
        assert isinstance(item, ManifestItem), item
        assert item.channels == (tmp_path / "c1.tif", Path("/data/c2.tif")) and item.brain_geometry == "hemisphere_r"
    (tmp_path / "bad.yaml").write_text("- {path: b1.tif, brain_geometry: hemisphere_x}\n")
    assert isinstance(load_manifest(tmp_path / "bad.yaml")[0], ManifestProblem)


@pytest.mark.parametrize("text", ["{a: 1}", "- just a string", "[: bad yaml"])
def test_structurally_broken_manifest_fails_fast(tmp_path: Path, text: str) -> None:
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(InputError, match="manifest"):
        load_manifest(tmp_path / "m.yaml")


def test_missing_or_empty_manifest(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_manifest(tmp_path / "none.yaml")
    (tmp_path / "empty.yaml").write_text("[]")
    with pytest.raises(InputError, match="no items"):
        load_manifest(tmp_path / "empty.yaml")


def test_a_missing_relative_manifest_names_the_folder_it_was_looked_for_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment's flow run starts in the project folder, not where `prefect deployment run` was typed: the
    sentence names the folder a relative manifest was looked for in and asks for an absolute path."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=rf"brains\.yaml does not exist \(.*{re.escape(str(tmp_path))}.*absolute path"):
        load_manifest("brains.yaml")
    with pytest.raises(InputError) as absolute:
        load_manifest(tmp_path / "brains.yaml")
    assert "absolute path" not in str(absolute.value)


def test_default_names() -> None:
    assert default_name("/x/brain01.ome.zarr/") == "brain01"
    assert default_name("b.nii.gz") == "b" and default_name("planes") == "planes"
