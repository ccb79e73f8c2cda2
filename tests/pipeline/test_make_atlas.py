"""``patchmorph make-atlas``: an atlas of one's own (template, labels, structure table) as a BrainGlobe folder that
keeps the files' geometry, reads every table format atlases come with, refuses bad input before writing, and
registers to a brain through ``patchmorph atlas``. Data: the SynthSeg label map of ``tests/data`` (a real human
label map at 2 mm, LIA), its label table, and a template drawn from it (one intensity per structure)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from scipy.ndimage import gaussian_filter
from typer.testing import CliRunner

from patchmorph.cli import app
from patchmorph_core.errors import InputError
from patchmorph_core.spatial import orientation_matrix
from pipeline.brainglobe import Structure, open_volume, read_atlas
from pipeline.importers import open_input
from pipeline.make_atlas import ROOT_ID, make_atlas, read_structure_table, with_root
from pipeline.ngff import read_image

DATA = Path(__file__).resolve().parents[1] / "data"
LABEL_MAP = DATA / "synthseg_01_2mm.nii.gz"
LABEL_TABLE = DATA / "synthseg_labels_table.txt"


@pytest.fixture(scope="module")
def atlas_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The SynthSeg map with anisotropic voxels (3 × 2 × 2.5 mm along the file's i, j, k: LIA), a float32 copy of
    it as the label image (as atlases often ship labels) and a float32 template with one intensity per structure."""
    root = tmp_path_factory.mktemp("own_atlas")
    image = nib.load(LABEL_MAP)
    labels = np.asarray(image.dataobj).astype(np.float32)
    affine = image.affine.copy()
    affine[:3, :3] = affine[:3, :3] / 2.0 * np.array([3.0, 2.0, 2.5])
    rng = np.random.default_rng(0)
    intensity = rng.uniform(20.0, 200.0, int(labels.max()) + 1).astype(np.float32)
    intensity[0] = 0.0
    template = gaussian_filter(intensity[labels.astype(int)], 0.7)
    files = {"template": root / "template.nii.gz", "labels": root / "labels.nii.gz", "root": root}
    nib.save(nib.Nifti1Image(template, affine), files["template"])
    nib.save(nib.Nifti1Image(labels, affine), files["labels"])
    return files


def test_the_atlas_keeps_the_files_geometry_labels_and_names(
    atlas_files: dict[str, Path], tmp_path: Path
) -> None:
    folder = make_atlas(
        tmp_path / "synthseg_human", atlas_files["template"], atlas_files["labels"], LABEL_TABLE,
        metadata={"species": "Homo sapiens"},
    )  # fmt: skip
    atlas = read_atlas(folder)
    _, grid, _ = open_input(atlas_files["template"])
    # the file's axes i, j, k are L, I, A and our arrays (z, y, x) = (k, j, i): index 0 at P, S, R
    assert atlas.orientation == "psr"
    assert atlas.resolution_um == (2500.0, 2000.0, 3000.0)
    assert atlas.shape == tuple(grid.shape) == (113, 115, 79)
    np.testing.assert_allclose(atlas.grid.direction, grid.direction, atol=1e-9)
    np.testing.assert_allclose(atlas.grid.direction, orientation_matrix("psr"))
    truth = np.asarray(nib.load(atlas_files["labels"]).dataobj).transpose(2, 1, 0)
    annotation = np.asarray(open_volume(atlas, "annotation")[0])
    np.testing.assert_array_equal(annotation, truth.astype(np.uint32))
    reference = tifffile.imread(folder / "reference.tiff")
    template = np.asarray(nib.load(atlas_files["template"]).dataobj).transpose(2, 1, 0)
    assert reference.dtype == np.uint16 and reference.max() == 65535 and reference.min() == 0
    assert np.corrcoef(reference.ravel(), template.ravel())[0, 1] > 0.99999  # scaled linearly
    # names from SynthSeg's table; ids it lacks are named; everything hangs below one root
    assert atlas.structures[17].name == "left hippocampus"
    assert atlas.structures[ROOT_ID].path == (ROOT_ID,)
    assert all(s.path[0] == ROOT_ID for s in atlas.structures.values())
    present = {int(i) for i in np.unique(truth)} - {0}
    assert present <= set(atlas.structures)
    assert atlas.structures[25].name == "label 25"  # a label SynthSeg's table does not list
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["species"] == "Homo sapiens" and meta["symmetric"] is True and meta["name"] == "synthseg_human"  # the folder's name, not the template file's
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "itksnap.txt",
            '# ITK-SnAP Label Description File\n    0     0    0    0        0  0  0    "Clear Label"\n'
            '    5   255    0    0        1  1  1    "Caudate nucleus"\n   12     0  255    0        1  1  1    "V1"\n',
            {5: ("Caudate nucleus", (), (255, 0, 0)), 12: ("V1", (), (0, 255, 0))},
        ),
        (
            "FreeSurferColorLUT.txt",
            "#No. Label Name:                            R   G   B   A\n0   Unknown   0   0   0   0\n"
            "17  Left-Hippocampus                        220 216  20   0\n",
            {17: ("Left-Hippocampus", (), (220, 216, 20))},
        ),
        (
            "table.csv",
            "id,name,acronym,parent_id\n1,Brain,BR,\n2,Cortex,CTX,1\n3,Area 17,V1,2\n",
            {1: ("Brain", (1,), (255, 255, 255)), 2: ("Cortex", (1, 2), (255, 255, 255)), 3: ("Area 17", (1, 2, 3), (255, 255, 255))},
        ),
        (
            "table.tsv",
            "Label\tName\n4\tthalamus\n",
            {4: ("thalamus", (), (255, 255, 255))},
        ),
        (
            "structures.json",
            json.dumps([{"id": 8, "name": "Grey", "acronym": "GR", "structure_id_path": [997, 8], "rgb_triplet": [1, 2, 3]}]),
            {8: ("Grey", (997, 8), (1, 2, 3))},
        ),
    ],
)
def test_structure_tables_of_each_format(tmp_path: Path, name: str, text: str, expected: dict) -> None:
    path = tmp_path / name
    path.write_text(text)
    found = {s.id: (s.name, s.path, s.rgb) for s in read_structure_table(path)}  # colours kept
    assert found == expected


def test_synthseg_table_skips_its_prose(tmp_path: Path) -> None:
    found = {s.id: s.name for s in read_structure_table(LABEL_TABLE)}
    assert found[2] == "left cerebral white matter" and found[60] == "right ventral DC" and 0 not in found


def test_every_structure_hangs_below_one_root() -> None:
    flat = [Structure(5, "a", "a"), Structure(6, "b", "b")]
    assert [s.path for s in with_root(flat, [0, 5, 6, 9])] == [(997,), (997, 5), (997, 6), (997, 9)]
    taken = [Structure(997, "a", "a"), Structure(6, "b", "b")]
    assert [s.path for s in with_root(taken, [997])] == [(998,), (998, 997), (998, 6)]
    tree = [Structure(1, "brain", "br", (1,)), Structure(2, "cortex", "ctx", (1, 2))]
    assert [s.path for s in with_root(tree, [2, 9])] == [(1,), (1, 2), (1, 9)]  # the table's own root
    unlisted_root = [Structure(2, "cortex", "ctx", (1, 2)), Structure(3, "v1", "v1", (1, 2, 3))]
    assert [(s.id, s.path) for s in with_root(unlisted_root, [3])] == [(1, (1,)), (2, (1, 2)), (3, (1, 2, 3))]


def test_bad_tables_are_refused(tmp_path: Path) -> None:
    columns = tmp_path / "columns.csv"
    columns.write_text("code,title\n1,Brain\n")
    with pytest.raises(InputError, match="needs an id column"):
        read_structure_table(columns)
    cycle = tmp_path / "cycle.csv"
    cycle.write_text("id,name,parent_id\n1,a,2\n2,b,1\n")
    with pytest.raises(InputError, match="form a cycle"):
        read_structure_table(cycle)
    empty = tmp_path / "empty.txt"
    empty.write_text("no structures here\n")
    with pytest.raises(InputError, match="lists no structure"):
        read_structure_table(empty)


def _save_like(path: Path, values: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(values, affine), path)
    return path


def test_bad_input_is_one_sentence_before_any_folder(atlas_files: dict[str, Path], tmp_path: Path) -> None:
    labels = nib.load(atlas_files["labels"])
    values, affine = np.asarray(labels.dataobj), labels.affine
    tilt = affine.copy()
    c, s = np.cos(0.3), np.sin(0.3)
    tilt[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    shifted = affine.copy()
    shifted[:3, 3] += 1.0
    ras_x = nib.affines.apply_affine(affine, np.indices(values.shape).reshape(3, -1).T)[:, 0].reshape(values.shape)
    middle = np.median(ras_x[values > 0])
    sides = np.where(values > 0, np.where(ras_x > middle, 2, 1), 0).astype(np.uint8)  # 1 left, 2 right (RAS x)
    template = np.asarray(nib.load(atlas_files["template"]).dataobj)
    nan = template.copy()
    nan[10, 10, 10] = np.nan
    tifffile.imwrite(tmp_path / "t.tif", template)
    tifffile.imwrite(tmp_path / "l.tif", values)
    other_table = tmp_path / "other_atlas.csv"
    other_table.write_text("id,name\n" + "".join(f"{1000 + int(i)},region {i}\n" for i in np.unique(values) if i))
    cases = [
        (
            [atlas_files["template"], atlas_files["labels"], "--hemispheres",
             _save_like(tmp_path / "swapped.nii.gz", np.where(sides > 0, 3 - sides, 0).astype(np.uint8), affine)],
            "has 1 (left) to the right of 2 (right)",
        ),  # fmt: skip
        ([_save_like(tmp_path / "nan.nii.gz", nan, affine), atlas_files["labels"]], "holds NaN or infinite values"),
        (
            [tmp_path / "t.tif", tmp_path / "l.tif", "--voxel-size", "3", "2", "2.5"],
            "states no anatomical orientation",
        ),
        (
            [atlas_files["template"], _save_like(tmp_path / "crop.nii.gz", values[1:], affine)],
            "is not on the template's grid (shape (113, 115, 78), the template's (113, 115, 79);",
        ),
        (
            [atlas_files["template"], _save_like(tmp_path / "moved.nii.gz", values, shifted)],
            "is not on the template's grid (voxel 0 1.73 millimeter (0.866 voxels) from the template's;",
        ),
        (
            [
                _save_like(tmp_path / "t.nii.gz", values, tilt),
                _save_like(tmp_path / "l.nii.gz", values, tilt),
            ],
            "oblique axes",
        ),
        ([atlas_files["template"], atlas_files["template"]], "holds values that are not whole numbers"),
        (
            [atlas_files["template"], atlas_files["labels"], "--hemispheres", atlas_files["labels"]],
            "other than 0, 1",
        ),
        ([atlas_files["template"], tmp_path / "none.nii.gz"], "does not exist"),
        (  # another atlas's table (SynthSeg's ids shifted): no id of the label image named, every name a placeholder
            [atlas_files["template"], atlas_files["labels"], "--structures", other_table],
            "names none of the",
        ),
    ]
    runner = CliRunner()
    for args, message in cases:
        out = tmp_path / "atlas"
        result = runner.invoke(app, ["make-atlas", *map(str, args), "-o", str(out)])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not out.exists() and not list(tmp_path.glob(".atlas*")), args
    hemispheres = _save_like(tmp_path / "sides.nii.gz", sides, affine)
    args = [str(atlas_files["template"]), str(atlas_files["labels"]), "--hemispheres", str(hemispheres)]
    result = runner.invoke(app, ["make-atlas", *args, "-o", str(tmp_path / "sided")])
    assert result.exit_code == 0, result.output  # the same image with 1 on the left is taken
    assert f"give --atlas {tmp_path / 'sided'} (the folder, not the name)" in " ".join(result.output.split())
    # with a side at every voxel, as BrainGlobe's: the map ends where the labels do, the voxels around take the nearest
    written = tifffile.imread(tmp_path / "sided" / "hemispheres.tiff")
    labelled = tifffile.imread(tmp_path / "sided" / "annotation.tiff") > 0
    assert set(np.unique(written).tolist()) == {1, 2}
    assert [int((written[labelled] == side).sum()) for side in (1, 2)] == [int((sides == side).sum()) for side in (1, 2)]
    out = tmp_path / "taken"
    out.mkdir()
    result = runner.invoke(
        app, ["make-atlas", str(atlas_files["template"]), str(atlas_files["labels"]), "-o", str(out)]
    )
    assert result.exit_code == 2 and "already exists" in result.output
    # a mistyped path makes no tree of folders, as 'patchmorph atlas -o' does not
    result = runner.invoke(app, ["make-atlas", *args[:2], "-o", str(tmp_path / "atlases_typo" / "mine")])
    assert result.exit_code == 2 and "atlases_typo does not exist" in result.output
    assert not (tmp_path / "atlases_typo").exists()


def test_own_atlas_registers_to_a_brain_through_the_commands(
    atlas_files: dict[str, Path], tmp_path: Path
) -> None:
    """``make-atlas`` then ``atlas``: the brain is the template itself in another array order (RAS) with its header
    rotated by 10° and shifted by a few mm, so the labels it should get are known voxel for voxel."""
    runner = CliRunner()
    folder = tmp_path / "synthseg_human_v1.0"
    result = runner.invoke(
        app,
        ["make-atlas", str(atlas_files["template"]), str(atlas_files["labels"]), "-o", str(folder),
         "--structures", str(LABEL_TABLE), "--name", "synthseg_human"],
    )  # fmt: skip
    assert result.exit_code == 0 and "synthseg_human_2500um" in result.output, result.output
    brain_image = nib.as_closest_canonical(nib.load(atlas_files["template"]))
    truth = np.asarray(nib.as_closest_canonical(nib.load(atlas_files["labels"])).dataobj).transpose(2, 1, 0)
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    affine = brain_image.affine.copy()
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    affine[:3, 3] += [6.0, -4.0, 3.0]
    brain = _save_like(tmp_path / "brain.nii.gz", np.asarray(brain_image.dataobj), affine)
    config = tmp_path / "job.yaml"
    config.write_text("qc: false\ncluster:\n  kind: threads\n")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["atlas", str(brain), "-o", str(out), "--atlas", str(folder), "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    on_brain = np.asarray(read_image(out / "brain.ome.zarr" / "labels" / "atlas").levels[0].array)
    assert on_brain.shape == truth.shape
    dice = []
    for sid in np.unique(truth):
        inside, got = truth == sid, on_brain == sid
        if sid != 0 and inside.sum() >= 100:
            dice.append(2.0 * (inside & got).sum() / (inside.sum() + got.sum()))
    assert np.mean(dice) > 0.9 and np.min(dice) > 0.6, (np.mean(dice), np.min(dice))


def test_allen_nrrd_files_need_their_true_orientation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The Allen CCFv3 NRRD files say left-posterior-superior, which is wrong: an atlas made from them with the header's
    code would have its hemispheres and axes wrong, so make-atlas refuses them without --orientation; with 'rsa' the
    atlas is BrainGlobe's own (the bundled atlas folder holds the same arrays)."""
    ccf = Path(__file__).resolve().parents[2] / "examples" / "mouse_ccf"
    files = [str(ccf / "average_template_100.nrrd"), str(ccf / "annotation_100um_2017_nearest_from25um.nrrd")]
    runner = CliRunner()
    result = runner.invoke(app, ["make-atlas", *files, "-o", str(tmp_path / "allen")])
    assert result.exit_code == 2 and "is an Allen CCFv3 NRRD file" in result.output, result.output
    assert "--orientation rsa" in result.output and not (tmp_path / "allen").exists()
    with caplog.at_level("WARNING"):
        open_input(files[0])  # convert and atlas read it too: they warn
    assert "give --orientation rsa" in caplog.text
    result = runner.invoke(app, ["make-atlas", *files, "-o", str(tmp_path / "allen"), "--orientation", "rsa"])
    assert result.exit_code == 0, result.output
    atlas = read_atlas(tmp_path / "allen")
    bundled = Path(files[0]).parents[1] / "allen_mouse_100um_v1.2"
    assert atlas.orientation == "rsa"  # the file's array order, BrainGlobe's 'asr' reversed
    reference = tifffile.imread(tmp_path / "allen" / "reference.tiff")
    np.testing.assert_array_equal(reference, tifffile.imread(bundled / "reference.tiff").transpose(2, 1, 0))
    annotation = np.asarray(open_volume(atlas, "annotation")[0])
    np.testing.assert_array_equal(annotation, tifffile.imread(bundled / "annotation.tiff").transpose(2, 1, 0))
