"""Manifests: YAML and CSV, relative paths, per-entry problems instead of a failed batch, unique names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.manifest import ManifestItem, ManifestProblem, default_name, load_manifest
from patchmorph_core.errors import InputError
from pipeline.importers import ImageChannel


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
        assert item.channels == (ImageChannel(tmp_path / "c1.tif"), ImageChannel(Path("/data/c2.tif")))
        assert item.brain_geometry == "hemisphere_r"
    (tmp_path / "bad.yaml").write_text("- {path: b1.tif, brain_geometry: hemisphere_x}\n")
    assert isinstance(load_manifest(tmp_path / "bad.yaml")[0], ManifestProblem)


def test_channels_of_one_multi_channel_file_in_a_manifest(tmp_path: Path) -> None:
    """An item's ``channel_index`` (YAML or CSV column) and its other channels of the same file as ``PATH:N``; a
    bioformats2raw series ``brain.zarr/0`` is named after its store (not "0"); a negative index is the item's
    problem."""
    (tmp_path / "m.csv").write_text("path,channel_index,channels\nbrain.zarr/0,0,brain.zarr/0:1;brain.zarr/0:2\n")
    (tmp_path / "m.yaml").write_text("- {path: brain.zarr/0, channel_index: 0, channels: [brain.zarr/0:1, brain.zarr/0:2]}\n")
    for name in ("m.csv", "m.yaml"):
        item = load_manifest(tmp_path / name)[0]
        assert isinstance(item, ManifestItem), item
        assert item.name == "brain" and item.channel_index == 0
        series = tmp_path / "brain.zarr" / "0"
        assert item.channels == (ImageChannel(series, 1), ImageChannel(series, 2))
        assert [c.name() for c in item.channels] == ["brain_ch1", "brain_ch2"]
    (tmp_path / "bad.yaml").write_text("- {path: b.zarr, channel_index: -1}\n")
    (problem,) = load_manifest(tmp_path / "bad.yaml")
    assert isinstance(problem, ManifestProblem) and "channel_index is invalid" in problem.message, problem


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
    assert default_name("brains/stp.zarr/0") == "stp"  # a bioformats2raw series: its store's name, not "0"


def test_atlas_range_of_an_item(tmp_path: Path) -> None:
    """An item's atlas_range as ``patchmorph atlas --atlas-range`` takes it: a string (directions comma-separated,
    in a CSV one quoted cell) or a YAML list of such strings, ``auto`` included; none is the whole atlas."""
    (tmp_path / "m.csv").write_text('path,atlas_range\nb1.tif,"ap=6200:9200,dv=1000:5000"\nb2.tif,\nb4.tif,AP=Auto\n')
    (tmp_path / "m.yaml").write_text(
        "- {path: b1.tif, atlas_range: 'ap=6200:9200,dv=1000:5000'}\n"
        "- {path: b2.tif}\n"
        "- {path: b3.tif, atlas_range: [ap=6200:9200, dv=1000:5000], brain_geometry: hemisphere_l}\n"
        "- {path: b4.tif, atlas_range: [ap=auto]}\n"
    )
    for name in ("m.csv", "m.yaml"):
        items = load_manifest(tmp_path / name)
        assert all(isinstance(i, ManifestItem) for i in items), items
        assert items[0].atlas_range == {"ap": (6200.0, 9200.0), "dv": (1000.0, 5000.0)} and items[1].atlas_range == {}
        assert items[-1].atlas_range == {"ap": "auto"}
    assert items[2].atlas_range == items[0].atlas_range and items[2].brain_geometry == "hemisphere_l"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("si=5000:7500", "atlas_range 'si=5000:7500' names no direction of the atlas: give ap=FROM:TO"),
        ("ap=9200:6200", "atlas_range 'ap=9200:6200': FROM (9200) must be less than TO (6200) µm"),
        ("ap=6200-9200", "atlas_range 'ap=6200-9200' is not ap=FROM:TO with two numbers"),
        ("ap=1:2,ap=3:4", "atlas_range gives ap twice"),
        (6200, "atlas_range 6200 is not a string such as 'ap=6200:9200'"),
        (["ap=1:2", 3], "is not a string such as 'ap=6200:9200' (or a list of such strings)"),
    ],
)
def test_a_bad_atlas_range_is_that_items_problem(tmp_path: Path, value: object, says: str) -> None:
    """One sentence naming the item; the other items are kept."""
    import yaml

    (tmp_path / "m.yaml").write_text(yaml.safe_dump([{"path": "b1.tif", "atlas_range": value}, {"path": "b2.tif"}]))
    bad, good = load_manifest(tmp_path / "m.yaml")
    assert isinstance(bad, ManifestProblem) and isinstance(good, ManifestItem)
    assert bad.name == "b1" and bad.message.startswith("manifest item 'b1': ") and says in bad.message, bad.message
    assert not re.search(r"\.\s+[A-Z]", bad.message) and bad.message.endswith("."), bad.message  # one sentence


def test_atlas_ranges_are_prepared_once_each_and_a_refused_one_is_its_items_error(
    tmp_path: Path, examples: Path
) -> None:
    """The atlas is cut once per (brain geometry, range) of the manifest, in a folder named after both (a whole
    atlas keeps ``atlas``, a hemisphere ``atlas_<geometry>``); a range outside the atlas, or a range with an image
    atlas, is that item's error; the range is in the item's fingerprint and in how its checks name the atlas."""
    from flows.atlas_to_section import atlas_jobs, prepared_atlases
    from flows.config import AtlasToSectionOptions
    from pipeline.brainglobe import find_atlas
    from pipeline.demo import EXAMPLE_ATLAS

    (tmp_path / "m.yaml").write_text(
        "- {name: whole, path: b.tif}\n"
        "- {name: slab, path: b.tif, atlas_range: ap=5000:7500}\n"
        "- {name: slab2, path: b.tif, atlas_range: [ap=5000:7500]}\n"
        "- {name: left_slab, path: b.tif, atlas_range: ap=5000:7500, brain_geometry: hemisphere_l}\n"
        "- {name: outside, path: b.tif, atlas_range: ap=12000:14000}\n"
    )
    entries = load_manifest(tmp_path / "m.yaml")
    out = tmp_path / "out"
    prepared = prepared_atlases(find_atlas(examples / EXAMPLE_ATLAS), entries, out)
    assert sorted(p.name for p in out.iterdir()) == ["atlas", "atlas_ap5000-7500", "atlas_hemisphere_l_ap5000-7500"]
    jobs, errors = atlas_jobs(examples / EXAMPLE_ATLAS, entries, out, AtlasToSectionOptions(), prepared)
    (refused,) = errors
    assert refused.name == "outside" and refused.step == "manifest", refused
    assert refused.message.startswith("manifest item 'outside': atlas_range ap=12000:14000 lies outside the atlas")
    by_name = {job.name: job for job in jobs}
    assert by_name["whole"].atlas_dir == out / "atlas" and by_name["slab"].atlas_dir == out / "atlas_ap5000-7500"
    assert by_name["slab"].atlas_range == {"ap": (5000.0, 7500.0)} == by_name["slab2"].atlas_range
    options = AtlasToSectionOptions()
    assert by_name["slab"].key(options) != by_name["slab"].model_copy(update={"atlas_range": {}}).key(options)
    assert "its part ap=5000:7500 µm only (atlas_range)" in by_name["slab"].check_names()["moving"]
    assert "its part" not in by_name["whole"].check_names()["moving"]
    _, errors = atlas_jobs(tmp_path / "atlas.nii.gz", entries[:2], out, options, None)
    assert [e.name for e in errors] == ["slab"] and "atlas_range ap=5000:7500 needs a BrainGlobe atlas" in errors[0].message


def test_an_item_named_as_a_prepared_atlas_folder_is_refused(tmp_path: Path) -> None:
    """An item's output folder must not be the one where the batch prepares the atlas for a brain geometry or atlas
    range (``atlas_hemisphere_l``, ``atlas_ap6200-9200``, ...; without case): the two would overwrite each other.
    Every folder :func:`flows.atlas_to_section.prepared_folder` names is found; other ``atlas_...`` names are kept."""
    from flows.atlas_to_section import prepared_folder

    keys = [("hemisphere_l", ""), ("hemisphere_r", "ap=6200:9200"), ("full", "ap=6200.5:9200,dv=1000:5000,lr=0:5700")]
    folders = [prepared_folder(tmp_path, key).name for key in keys]
    assert folders[0] == "atlas_hemisphere_l"
    names = [*folders, "ATLAS_AP6200-9200", "atlas_test", "atlas_full", "atlas_ap9200-6200"]
    (tmp_path / "m.yaml").write_text("".join(f"- {{name: {name}, path: b.tif}}\n" for name in names))
    items = load_manifest(tmp_path / "m.yaml")
    assert [type(i) for i in items] == [ManifestProblem] * 4 + [ManifestItem] * 3, items
    assert [i.name for i in items] == names
    assert items[1].message == (
        "manifest item 'atlas_hemisphere_r_ap6200-9200': its output folder would be the one where the batch prepares "
        "the atlas for brain_geometry hemisphere_r and atlas_range ap=6200:9200, and the two would overwrite each "
        "other: give the item another name."
    )
    assert "for atlas_range ap=6200:9200," in items[3].message and "brain_geometry hemisphere_l," in items[0].message


def test_a_voxel_size_without_three_numbers_is_named_as_such(tmp_path: Path) -> None:
    """A voxel size of two or four numbers (a CSV cell ``50 40``, a YAML list) is that item's error, saying how many
    numbers it holds and that z, y and x are needed, not a validation path such as ``voxel_size.2``."""
    (tmp_path / "m.csv").write_text("name,path,voxel_size\ntwo,b.tif,50 40\nfour,b.tif,50x40x40x40\ngood,b.tif,50;40;40\n")
    (tmp_path / "m.yaml").write_text("- {name: two, path: b.tif, voxel_size: [50, 40]}\n")
    for items in (load_manifest(tmp_path / "m.csv"), load_manifest(tmp_path / "m.yaml")):
        for item, count in zip(items, (2, 4), strict=False):
            assert isinstance(item, ManifestProblem), item
            assert item.message.startswith(f"manifest item {item.name!r}: voxel_size "), item.message
            assert f"holds {count} numbers, not three: give the voxel size along z, y and x" in item.message
            assert "voxel_size." not in item.message and item.message.endswith(".")
    assert load_manifest(tmp_path / "m.csv")[2] == ManifestItem(name="good", path=tmp_path / "b.tif", voxel_size=(50, 40, 40))


def test_a_channel_index_an_items_file_lacks_is_that_items_error_before_any_conversion(
    tmp_path: Path, examples: Path
) -> None:
    """Two items of one manifest on a two-channel bioformats2raw store given as its top folder: the one asking for
    channels 0 and 1 becomes a job whose brain and channel are channels of the store (converted, named
    ``stp_ch1``); the one asking for channel 5 is that item's ``inputs`` error, one sentence, from the store's
    header, and nothing is converted; the job's channel converts to that channel of the store alone."""
    import numpy as np
    from bioformats_stores import write_bioformats2raw

    from flows.atlas_to_section import atlas_jobs, prepared_atlases
    from flows.config import AtlasToSectionOptions
    from flows.steps import conversion_key, missing_inputs
    from flows.tasks import convert_task, converted_from
    from pipeline.brainglobe import find_atlas
    from pipeline.demo import EXAMPLE_ATLAS
    from pipeline.ngff import read_image

    data = np.arange(2 * 6 * 7 * 8, dtype=np.uint16).reshape(2, 6, 7, 8)
    write_bioformats2raw(tmp_path / "stp.zarr", [data])
    (tmp_path / "m.yaml").write_text(
        "- {path: stp.zarr, channel_index: 0, channels: ['stp.zarr:1']}\n"
        "- {name: wrong, path: stp.zarr, channel_index: 5}\n"
    )
    entries = load_manifest(tmp_path / "m.yaml")
    out = tmp_path / "out"
    prepared = prepared_atlases(find_atlas(examples / EXAMPLE_ATLAS), entries, out)
    jobs, errors = atlas_jobs(examples / EXAMPLE_ATLAS, entries, out, AtlasToSectionOptions(), prepared)
    assert errors == []
    ready, errors = missing_inputs(jobs)
    (refused,) = errors
    assert refused.name == "wrong" and refused.step == "inputs", refused
    assert refused.message == (
        f"fixed input: channel index 5 is not a channel of '{tmp_path / 'stp.zarr'}', which holds 2: give 0 to 1."
    )
    (job,) = ready
    assert job.name == "stp" and job.fixed.channel_index == 0 and job.fixed.needs_conversion
    assert {name: (image.path, image.channel_index) for name, image in job.channels.items()} == {
        "stp_ch1": (tmp_path / "stp.zarr", 1)
    }
    assert not (out / "stp").exists() and not (out / "wrong").exists()
    image = job.channels["stp_ch1"]  # converted by the convert step's task, its channel only
    image.converted.parent.mkdir(parents=True)
    convert_task.fn(image.path, image.converted, None, None, None, False, conversion_key(image), image.channel_index)
    np.testing.assert_array_equal(np.asarray(read_image(image.converted).levels[0].array), data[1])
    assert converted_from(image.converted, conversion_key(image))
    assert conversion_key(image) != conversion_key(image.model_copy(update={"channel_index": 0}))
    other = job.model_copy(update={"fixed": job.fixed.model_copy(update={"channel_index": 1})})
    options = AtlasToSectionOptions()  # another channel registered: neither finished nor its registration reused
    assert other.key(options) != job.key(options) and other.registration_key(options) != job.registration_key(options)
