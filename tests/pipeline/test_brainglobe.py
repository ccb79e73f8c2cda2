"""BrainGlobe atlases read offline: both layouts, lookup by name, hemispheres, structures, the bundled example."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from patchmorph_core.errors import InputError
from patchmorph_core.spatial import orientation_matrix
from pipeline.brainglobe import (
    LEFT,
    RIGHT,
    Structure,
    brainglobe_dirs,
    division_map,
    find_atlas,
    midline_hemispheres,
    open_volume,
    read_atlas,
    write_tiff_atlas,
)
from pipeline.demo import EXAMPLE_ATLAS, write_example_atlas


@pytest.fixture(scope="module")
def example(examples: Path) -> Path:
    return examples / EXAMPLE_ATLAS


def test_bundled_atlas_is_what_the_recipe_builds_from_the_allen_files(tmp_path: Path, example: Path) -> None:
    """The folder in examples/ is write_example_atlas of examples/mouse_ccf (PROVENANCE.md's recipe)."""
    built = write_example_atlas(tmp_path / "atlas")
    for name in ("metadata.json", "structures.json"):
        assert json.loads((built / name).read_text()) == json.loads((example / name).read_text())
    for name in ("reference.tiff", "annotation.tiff"):
        np.testing.assert_array_equal(tifffile.imread(built / name), tifffile.imread(example / name))


def test_an_atlas_written_in_part_is_never_left_as_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails after some files leaves neither the atlas folder nor its hidden partial folder."""
    calls = []

    def fail_on_the_second(path: Path, *args: object, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", fail_on_the_second)
    volume = np.ones((2, 3, 4), np.uint16)
    metadata = {"name": "a", "resolution": [1, 1, 1], "orientation": "asr"}
    with pytest.raises(OSError, match="No space"):
        write_tiff_atlas(tmp_path / "a_v1.0", volume, volume, [Structure(1, "one", "o", (1,))], metadata)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_bundled_atlas_reads_as_brainglobe_allen_mouse_100um(example: Path) -> None:
    atlas = find_atlas(example)
    assert (atlas.name, atlas.version, atlas.layout) == ("allen_mouse_100um", "1.2", "tiff")
    assert atlas.shape == (132, 80, 114) and atlas.orientation == "asr" and atlas.symmetric
    assert atlas.structures[985].acronym == "MOp" and atlas.structures[985].path[0] == 997
    reference, grid = open_volume(atlas, "reference")
    assert reference.shape == grid.shape == (132, 80, 114)
    np.testing.assert_allclose(grid.direction, orientation_matrix("asr"))
    # asr: the olfactory bulbs (anterior) lie at low axis-0 indices, the cerebellum at high ones
    annotation = np.asarray(open_volume(atlas, "annotation")[0])
    bulb = np.argwhere(np.isin(annotation, [507, 212, 220]))  # MOB, its layers
    assert bulb[:, 0].mean() < 0.25 * atlas.shape[0]


def test_an_atlas_folder_given_relative_is_recorded_with_its_absolute_path(
    example: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job records its atlas's folder (``atlas.json``) and ``points``, ``export-brainreg`` and ``cohort`` read it
    later, from whatever folder they are run in: a relative path would name another folder there (or none)."""
    monkeypatch.chdir(example.parent)
    for given in (example.name, f"./{example.name}"):
        atlas = find_atlas(given)
        assert atlas.folder == example.resolve() and atlas.folder.is_absolute()
        assert atlas.describe()["folder"] == str(example.resolve())


def test_symmetric_hemispheres_split_the_left_right_axis_as_brainglobe_does() -> None:
    hemi = midline_hemispheres((2, 3, 5), "asr")  # axis 2 runs right -> left; round(5 / 2) = 2
    assert hemi[0, 0].tolist() == [RIGHT, RIGHT, LEFT, LEFT, LEFT]
    assert midline_hemispheres((4, 2, 2), "lsa")[:, 0, 0].tolist() == [LEFT, LEFT, RIGHT, RIGHT]


def test_atlas_is_found_by_name_in_brainglobe_dir_latest_version(tmp_path: Path, example: Path) -> None:
    for version in ("1.1", "1.2"):
        shutil.copytree(example, tmp_path / f"allen_mouse_100um_v{version}")
    meta = json.loads((tmp_path / "allen_mouse_100um_v1.1" / "metadata.json").read_text())
    (tmp_path / "allen_mouse_100um_v1.1" / "metadata.json").write_text(json.dumps({**meta, "version": "1.1"}))
    assert find_atlas("allen_mouse_100um", dirs=[tmp_path]).version == "1.2"
    with pytest.raises(InputError, match=r"allen_mouse_10um.*installed: allen_mouse_100um.*BRAINGLOBE_DIR"):
        find_atlas("allen_mouse_10um", dirs=[tmp_path])
    assert brainglobe_dirs({"BRAINGLOBE_DIR": str(tmp_path), "HOME": "/nowhere"}) == [tmp_path]
    config = tmp_path / "config"
    config.mkdir()
    (config / "bg_config.conf").write_text(f"[default_dirs]\nbrainglobe_dir = {tmp_path}/mine\n")
    dirs = brainglobe_dirs({"BRAINGLOBE_CONFIG_DIR": str(config), "HOME": "/home/u"})
    assert dirs == [tmp_path / "mine", Path("/home/u/.brainglobe")]


def test_incomplete_atlas_folder_is_named(tmp_path: Path, example: Path) -> None:
    broken = shutil.copytree(example, tmp_path / "broken_v1.0")
    (broken / "annotation.tiff").unlink()
    with pytest.raises(InputError, match="annotation.tiff"):
        read_atlas(broken)
    with pytest.raises(InputError, match="neither metadata.json nor manifest.json"):
        read_atlas(tmp_path)


def _zarr_layout_atlas(root: Path, example: Path, axis_values: list[str]) -> Path:
    """The example atlas in BrainGlobe's OME-Zarr layout (manifest + components), millimetre pyramids with
    RFC-4 axes, as brainglobe-atlasapi writes them, plus a hemisphere volume (not symmetric)."""
    import ome_zarr.writer
    from ome_zarr.io import parse_url

    base = root / "brainglobe-atlasapi"
    reference = tifffile.imread(example / "reference.tiff")
    annotation = tifffile.imread(example / "annotation.tiff")
    hemispheres = np.where(np.arange(114) < 57, RIGHT, LEFT).astype(np.uint8)[None, None, :] * np.ones(
        (132, 80, 1), np.uint8
    )
    axes = [
        {"name": n, "type": "space", "unit": "millimeter", "orientation": {"type": "anatomical", "value": v}}
        for n, v in zip("zyx", axis_values, strict=True)
    ]
    transforms = [
        [{"type": "scale", "scale": [0.1] * 3}, {"type": "translation", "translation": [0.0] * 3}],
        [{"type": "scale", "scale": [0.2] * 3}, {"type": "translation", "translation": [0.05] * 3}],
    ]

    def write(path: Path, array: np.ndarray) -> None:
        group = zarr.group(store=parse_url(path, mode="w").store)
        ome_zarr.writer.write_multiscale(
            [array, array[::2, ::2, ::2]], group, axes=axes, coordinate_transformations=transforms
        )

    write(base / "templates/allen-template/1_2/template.ome.zarr", reference)
    write(base / "annotation-sets/allen-annotation/1_2/annotations_compressed.ome.zarr", annotation)
    write(base / "annotation-sets/allen-annotation/1_2/hemispheres.ome.zarr", hemispheres)
    terms = base / "terminologies/allen-terms/1_2/terminology.csv"
    terms.parent.mkdir(parents=True)
    rows = [
        "identifier,parent_identifier,annotation_value,name,abbreviation,color_hex_triplet,root_identifier_path"
    ]
    for item in json.loads((example / "structures.json").read_text()):
        path = item["structure_id_path"]
        parent = path[-2] if len(path) > 1 else ""
        rows.append(f'{item["id"]},{parent},{item["id"]},"{item["name"]}",{item["acronym"]},#FFFFFF,"{path}"')
    terms.write_text("\n".join(rows) + "\n")
    manifest = base / "atlases/allen_mouse_100um/1_2/manifest.json"
    manifest.parent.mkdir(parents=True)
    template = {"name": "allen-template", "version": "1.2", "location": "/templates/allen-template/1_2"}
    manifest.write_text(
        json.dumps(
            {
                "name": "allen_mouse",
                "version": "1.2",
                "resolution": [100.0, 100.0, 100.0],
                "orientation": "asr",
                "shape": [132, 80, 114],
                "symmetric": False,
                "terminology": {"location": "/terminologies/allen-terms/1_2"},
                "annotation_set": {"location": "/annotation-sets/allen-annotation/1_2", "template": template},
            }
        )
    )
    return manifest.parent


def test_ome_zarr_layout_is_read_with_its_rfc4_orientation(tmp_path: Path, example: Path) -> None:
    folder = _zarr_layout_atlas(
        tmp_path, example, ["anterior-to-posterior", "superior-to-inferior", "right-to-left"]
    )
    atlas = find_atlas("allen_mouse_100um", dirs=[tmp_path])
    assert atlas.folder == folder and atlas.layout == "ome-zarr" and not atlas.symmetric
    assert atlas.orientation == "asr" and atlas.structures[985].name == "Primary motor area"
    tiff = find_atlas(example)
    for role in ("reference", "annotation"):
        array, grid = open_volume(atlas, role)
        np.testing.assert_array_equal(np.asarray(array), np.asarray(open_volume(tiff, role)[0]))
        assert grid.shape == (132, 80, 114)
    hemi = np.asarray(open_volume(atlas, "hemispheres")[0])
    np.testing.assert_array_equal(hemi, np.asarray(open_volume(tiff, "hemispheres")[0]))


def test_ome_zarr_layout_orientation_disagreeing_with_the_manifest_is_refused(
    tmp_path: Path, example: Path
) -> None:
    _zarr_layout_atlas(tmp_path, example, ["posterior-to-anterior", "superior-to-inferior", "right-to-left"])
    with pytest.raises(InputError, match="RFC-4.*psr.*asr"):
        find_atlas("allen_mouse_100um", dirs=[tmp_path])


def test_division_map_groups_structures_into_a_few_major_divisions(example: Path) -> None:
    atlas = find_atlas(example)
    annotation = np.asarray(open_volume(atlas, "annotation")[0])
    divisions = division_map(
        atlas.structures, dict(zip(*np.unique(annotation, return_counts=True), strict=True))
    )
    names = {atlas.structures[d].acronym for d in divisions.values()}
    assert {"STR", "TH", "HY", "MY", "P"} <= names  # the Allen atlas's major divisions
    assert "MOp1" not in names and "Isocortex" not in names and "CH" not in names  # neither finer nor coarser
    mop = [i for i in divisions if 985 in atlas.structures[i].path]  # the layers of the primary motor area
    mos = [i for i in divisions if 993 in atlas.structures[i].path]
    assert len({divisions[i] for i in mop + mos}) == 1
    toy = {1: Structure(1, "a", "a", (9, 1)), 2: Structure(2, "b", "b", (9, 2))}
    assert division_map(toy, {0: 5, 1: 1, 2: 1, 7: 1}, max_divisions=3) == {1: 1, 2: 2, 7: 7}
    flat = {i: Structure(i, f"s{i}", f"s{i}", (9, i)) for i in range(1, 31)}  # an MRI atlas's flat table
    assert division_map(flat, dict.fromkeys(range(1, 31), 10)) == {i: i for i in range(1, 31)}  # each drawn
