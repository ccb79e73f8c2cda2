"""``patchmorph points``: cells given in the brain file's voxels land in the structures and hemispheres that the
job's labels on the brain show there, map back from the atlas to where they were, and are counted per structure
and side with brainmapper's columns; cellfinder's XML is read in its axis order; bad points are refused."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from patchmorph.cli import EXIT_INPUT, app
from patchmorph_core.errors import InputError
from pipeline.ngff import read_image
from pipeline.points import POINT_COLUMNS, SUMMARY_COLUMNS, read_points

DOWNSAMPLE = 3
"""The session's atlas job block-averages the brain file by 3 (``tests/pipeline/conftest.py``)."""


def _table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cells(atlas_job: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """300 'cells' at the brain file's voxels (``3 c + 1``: the middle of job voxel ``c``'s block) where the
    job's labels on the brain are one structure over 3×3×3 job voxels, mapped with ``patchmorph points``."""
    out = atlas_job["out"]
    labels = np.asarray(read_image(out / "brain.ome.zarr" / "labels" / "atlas").levels[0].array[...])
    sides = np.asarray(read_image(out / "brain.ome.zarr" / "labels" / "hemispheres").levels[0].array[...])
    uniform = (ndimage.maximum_filter(labels, 3) == ndimage.minimum_filter(labels, 3)) & (labels > 0)
    chosen = np.argwhere(uniform)
    chosen = chosen[np.random.default_rng(1).choice(len(chosen), 300, replace=False)]
    folder = tmp_path_factory.mktemp("cells")
    points = folder / "cells.csv"
    with points.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["cell", "z", "y", "x"])
        writer.writerows([f"c{k}", *(DOWNSAMPLE * c + 1)] for k, c in enumerate(chosen))
    result = CliRunner().invoke(app, ["points", str(points), "--job", str(out), "-o", str(folder / "mapped")])
    assert result.exit_code == 0, result.output
    return {
        "folder": folder, "mapped": folder / "mapped", "raw": DOWNSAMPLE * chosen + 1,
        "structures": labels[tuple(chosen.T)], "sides": sides[tuple(chosen.T)], "job": out,
    }  # fmt: skip


def test_cells_land_in_the_structures_and_sides_the_labels_on_the_brain_show(cells: dict) -> None:
    rows = _table(cells["mapped"] / "all_points.csv")
    assert list(rows[0]) == [*POINT_COLUMNS, "cell"]
    assert [r["cell"] for r in rows] == [f"c{k}" for k in range(300)]  # order and other columns kept
    raw = np.array([[float(r[f"coordinate_raw_axis_{k}"]) for k in range(3)] for r in rows])
    np.testing.assert_allclose(raw, cells["raw"])
    ids = np.array([int(r["structure_id"]) for r in rows])
    sides = np.array([{"left": 1, "right": 2}.get(r["hemisphere"], 0) for r in rows])
    atlas = np.array([[float(r[f"coordinate_atlas_axis_{k}"]) for k in range(3)] for r in rows])
    resolution_um = 100.0  # the session's atlas job uses the bundled 100 µm atlas (brainrender's points: µm)
    np.testing.assert_allclose(np.load(cells["mapped"] / "points.npy"), atlas * resolution_um, atol=0.05)
    assert np.mean(ids == cells["structures"]) >= 0.98
    assert np.mean(sides == cells["sides"]) >= 0.98
    assert all(r["structure_name"] and r["acronym"] for r in rows)


def test_atlas_coordinates_map_back_to_the_cells(cells: dict) -> None:
    """brainmapper's all_points.csv given as atlas points: the inverse field takes them back to the brain."""
    back = cells["folder"] / "back"
    args = ["points", str(cells["mapped"] / "all_points.csv"), "--job", str(cells["job"]), "-o", str(back)]
    result = CliRunner().invoke(app, [*args, "--space", "atlas"])
    assert result.exit_code == 0, result.output
    rows = _table(back / "all_points.csv")
    raw = np.array([[float(r[f"coordinate_raw_axis_{k}"]) for k in range(3)] for r in rows])
    error = np.abs(raw - cells["raw"])  # brain file voxels (50 × 40 × 40 µm)
    assert np.median(error) < 0.15 and error.max() < 1.0
    before = _table(cells["mapped"] / "all_points.csv")
    assert [r["structure_id"] for r in rows] == [r["structure_id"] for r in before]


def test_summary_counts_cells_per_structure_and_side_with_densities(cells: dict) -> None:
    rows = _table(cells["mapped"] / "summary.csv")
    assert list(rows[0]) == list(SUMMARY_COLUMNS)
    points = _table(cells["mapped"] / "all_points.csv")
    for row in rows:
        mine = [p for p in points if p["structure_id"] == row["structure_id"]]
        left = sum(p["hemisphere"] == "left" for p in mine)
        assert (int(row["left_cell_count"]), int(row["total_cells"])) == (left, len(mine))
        assert int(row["left_cell_count"]) + int(row["right_cell_count"]) == int(row["total_cells"])
        assert float(row["left_cells_per_mm3"]) == pytest.approx(left / float(row["left_volume_mm3"]), rel=1e-5)
    volumes = {r["structure_id"]: r for r in _table(cells["job"] / "volumes.csv")}
    for row in rows:
        assert row["total_volume_mm3"] == volumes[row["structure_id"]]["total_volume_mm3"]
    assert sum(int(r["total_cells"]) for r in rows) == 300
    assert [int(r["total_cells"]) for r in rows] == sorted((int(r["total_cells"]) for r in rows), reverse=True)


def test_csv_headers_as_spreadsheets_and_napari_write_them_are_read(tmp_path: Path) -> None:
    """A CSV saved by Excel (a byte-order mark first), with spaces after the commas or capital names, and napari's
    points layer (``index, axis-0, axis-1, axis-2``) name their voxel columns as well: they are read, not refused as
    having no voxel columns while the refusal lists z, y, x."""
    files = {
        "excel.csv": "\ufeffz,y,x,cell\n30,20,10,a\n31,21,11,b\n",
        "spaced.csv": "z, y, x, cell\n30, 20, 10, a\n31, 21, 11, b\n",
        "capitals.csv": "Z,Y,X,cell\n30,20,10,a\n31,21,11,b\n",
        "napari.csv": "index,axis-0,axis-1,axis-2\n0,30,20,10\n1,31,21,11\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        points = read_points(tmp_path / name)
        np.testing.assert_array_equal(points.index, [[30, 20, 10], [31, 21, 11]], err_msg=name)
        assert len(points.extra) == 1, (name, points.extra)
    (tmp_path / "tabs.csv").write_text("z\ty\tx\n30\t20\t10\n")
    with pytest.raises(InputError, match="separate the columns by commas"):
        read_points(tmp_path / "tabs.csv")


def test_cellfinders_xml_is_read_cells_only_in_array_order(tmp_path: Path) -> None:
    xml = tmp_path / "cells.xml"
    marker = "<Marker><MarkerX>{}</MarkerX><MarkerY>{}</MarkerY><MarkerZ>{}</MarkerZ></Marker>"
    xml.write_text(
        "<CellCounter_Marker_File><Marker_Data>"
        f"<Marker_Type><Type>1</Type>{marker.format(1, 2, 3)}</Marker_Type>"
        f"<Marker_Type><Type>2</Type>{marker.format(10, 20, 30)}{marker.format(11, 21, 31)}</Marker_Type>"
        "</Marker_Data></CellCounter_Marker_File>"
    )
    np.testing.assert_array_equal(read_points(xml).index, [[30, 20, 10], [31, 21, 11]])  # (z, y, x)
    assert len(read_points(xml, cells_only=False).index) == 3


def test_bad_points_are_refused_in_one_sentence(cells: dict, tmp_path: Path) -> None:
    job = str(cells["job"])
    swapped = tmp_path / "swapped.csv"  # x, y, z order: y beyond the brain file's 192 rows
    swapped.write_text("z,y,x\n30,250,10\n")
    nameless = tmp_path / "nameless.csv"
    nameless.write_text("a,b,c\n1,2,3\n")
    lengths = tmp_path / "micrometres.csv"  # positions in µm, which divided by the voxel size lie inside
    lengths.write_text("z,y,x\n1500,4000,4000\n")
    cases = [
        (["points", str(lengths), "--job", job, "-o", str(tmp_path / "o0")], "look like lengths in micrometers"),
        (["points", str(swapped), "--job", job, "-o", str(tmp_path / "o1")], "lies outside the brain's"),
        (["points", str(nameless), "--job", job, "-o", str(tmp_path / "o2")], "has no voxel columns"),
        (["points", str(swapped), "--job", str(tmp_path), "-o", str(tmp_path / "o3")], "not the folder of a"),
        (["points", str(swapped), "--job", job, "-o", str(tmp_path / "o4"), "--space", "world"], "neither"),
        (["points", str(swapped), "--job", job, "-o", str(cells["mapped"])], "exists"),
    ]
    for args, words in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == EXIT_INPUT, result.output
        assert words in result.output and "Traceback" not in result.output
    assert not any((tmp_path / f"o{k}").exists() for k in range(5))


def test_points_outside_are_refused_with_the_cause_that_fits_them() -> None:
    """The refusal names the cause that explains the points: not lengths in micrometres for a file of voxel indices
    of which one lies a voxel beyond a cropped brain (any voxel index divided by a 40 µm voxel lies inside)."""
    from patchmorph_core.spatial import Grid
    from pipeline.points import ORDER_HINT, _check_inside

    grid = Grid.from_spacing((270, 193, 136), (50.0, 40.0, 40.0))  # a hemisphere cropped from a 271-wide brain
    rng = np.random.default_rng(0)
    cells = rng.uniform(0, 1, (100, 3)) * (269, 192, 135)
    beyond = cells.copy()
    beyond[0, 2] = 136  # one cell of the uncropped brain
    whole = rng.uniform(0, 1, (100, 3)) * (269, 192, 270)  # the whole brain's cells: half of them lie beyond
    for points in (beyond, whole):
        with pytest.raises(InputError, match="another image"):
            _check_inside(points, grid, "brain", "cells.csv")
    causes = {
        "another image": beyond,
        "lengths in micrometers": cells * (50.0, 40.0, 40.0),
        ORDER_HINT: cells[:, ::-1],  # x, y, z columns: x fits the planes, z not the columns
    }
    for words, points in causes.items():
        with pytest.raises(InputError) as refused:
            _check_inside(points, grid, "brain", "cells.csv")
        assert words in str(refused.value), str(refused.value)
        assert all(other not in str(refused.value) for other in causes if other != words), str(refused.value)


@pytest.mark.parametrize("space", ["brain", "atlas"])
def test_columns_in_another_order_that_stay_inside_the_voxels_are_refused(
    cells: dict, tmp_path: Path, space: str
) -> None:
    """Cells whose x, y, z order still lies inside the image (a nearly cubic brain) are refused when another order
    of the columns puts far more of them inside the atlas's labels; the same cells in array order are mapped."""
    rows = _table(cells["mapped"] / "all_points.csv")
    prefix = "coordinate_raw_axis_" if space == "brain" else "coordinate_atlas_axis_"
    index = np.array([[float(r[f"{prefix}{k}"]) for k in range(3)] for r in rows])
    grid_shape = np.array(read_image(cells["job"] / "brain.ome.zarr").grid.shape) * DOWNSAMPLE
    if space == "atlas":
        grid_shape = np.array(read_image(cells["job"] / "atlas" / "annotation.ome.zarr").grid.shape)
    fits = np.all((index[:, ::-1] >= 0) & (index[:, ::-1] <= grid_shape - 1), axis=1)
    assert fits.sum() >= 40, fits.sum()  # enough cells whose reversed order lies inside the voxels too
    columns = ["z", "y", "x"] if space == "brain" else ["axis_0", "axis_1", "axis_2"]
    flags = [] if space == "brain" else ["--space", "atlas"]
    for name, order in [("right", [0, 1, 2]), ("reversed", [2, 1, 0])]:
        path = tmp_path / f"{name}.csv"
        with path.open("w", newline="") as handle:
            csv.writer(handle).writerows([columns, *index[fits][:, order]])
        args = ["points", str(path), "--job", str(cells["job"]), "-o", str(tmp_path / name), *flags]
        result = CliRunner().invoke(app, args)
        if name == "right":
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code == EXIT_INPUT, result.output
            text = " ".join(result.output.split())
            assert "when read as axes 0, 1, 2 = column 3, column 2, column 1" in text, text
            assert not (tmp_path / name).exists()


def test_a_file_without_cells_gives_tables_without_rows(cells: dict, tmp_path: Path) -> None:
    """An animal in which no cell was detected: its tables exist, with their columns and no rows (a cohort's
    tables are made from every animal's)."""
    empty = tmp_path / "none.csv"
    empty.write_text("z,y,x,cell\n")
    result = CliRunner().invoke(app, ["points", str(empty), "--job", str(cells["job"]), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "0 points" in result.output
    with (tmp_path / "o" / "all_points.csv").open() as handle:
        assert list(csv.reader(handle)) == [[*POINT_COLUMNS, "cell"]]
    with (tmp_path / "o" / "summary.csv").open() as handle:
        assert list(csv.reader(handle)) == [list(SUMMARY_COLUMNS)]


def test_cellfinders_candidates_file_gives_no_cells_and_says_which_file_to_give(
    cells: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """cellfinder's cells.xml holds the candidates before classification (all type 1): no cell is taken (an animal
    whose candidates were all rejected looks the same), and the warning names the classified file and --all-markers."""
    xml = tmp_path / "cells.xml"
    markers = "".join(f"<Marker><MarkerX>{x}</MarkerX><MarkerY>{y}</MarkerY><MarkerZ>{z}</MarkerZ></Marker>" for z, y, x in cells["raw"][:5])
    xml.write_text(f"<CellCounter_Marker_File><Marker_Data><Marker_Type><Type>1</Type>{markers}</Marker_Type></Marker_Data></CellCounter_Marker_File>")
    with caplog.at_level(logging.WARNING, logger="pipeline.points"):
        result = CliRunner().invoke(app, ["points", str(xml), "--job", str(cells["job"]), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0 and "0 points" in result.output, result.output
    words = " ".join(caplog.text.split())
    assert "5 markers that are not classified as cells" in words, words
    assert "cell_classification.xml" in words and "--all-markers" in words, words


def test_a_moved_job_folder_is_still_a_job(cells: dict, tmp_path: Path) -> None:
    """The whole job folder moved elsewhere (its records hold absolute paths): points still map through it."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(cells["job"], moved)
    away = cells["job"].with_name(cells["job"].name + ".away")
    cells["job"].rename(away)  # the job is no longer where it was made
    try:
        args = ["points", str(cells["folder"] / "cells.csv"), "--job", str(moved), "-o", str(tmp_path / "o")]
        result = CliRunner().invoke(app, args)
    finally:
        away.rename(cells["job"])
    assert result.exit_code == 0, result.output
    assert _table(tmp_path / "o" / "all_points.csv") == _table(cells["mapped"] / "all_points.csv")


def test_a_job_that_recorded_its_atlas_relative_is_read_from_another_folder(
    cells: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job made with ``--atlas some/folder`` by an earlier version recorded that relative path: it is the path from
    the job's working folder (its record says which), not from where ``points`` runs, and the atlas is found."""
    import json
    import shutil

    from pipeline.points import open_job

    job = tmp_path / "job"
    shutil.copytree(cells["job"], job)
    described = json.loads((job / "atlas" / "atlas.json").read_text())
    atlas = Path(described["folder"])
    (job / "atlas" / "atlas.json").write_text(json.dumps({**described, "folder": atlas.name}))
    record = json.loads((job / "atlas_job.json").read_text())
    (job / "atlas_job.json").write_text(json.dumps({**record, "working_directory": str(atlas.parent)}))
    monkeypatch.chdir(tmp_path)
    assert open_job(job).atlas.folder == atlas.resolve()


def test_points_mapped_through_a_slabs_job_are_qualified(
    cells: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job whose registration recorded tissue of another shape than the atlas's (a 2.5 mm coronal slab: spread 5.4)
    had the whole atlas squeezed into it; its points' atlas positions (0.3 mm off, median, on the example brain's
    slab) came without a word. The whole brain's job maps without the warning."""
    import shutil

    from pipeline.ngff import read_field, set_attribute

    slab = tmp_path / "slab"
    shutil.copytree(cells["job"], slab)
    quality = read_field(slab / "field.ome.zarr")[2]["quality"]
    geometry = {**quality["preflight"]["geometry"], "ratio_spread": 5.4}
    set_attribute(slab / "field.ome.zarr", "quality", {**quality, "preflight": {**quality["preflight"], "geometry": geometry}})
    for job, warned in ((cells["job"], False), (slab, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.points"):
            args = ["points", str(cells["folder"] / "cells.csv"), "--job", str(job), "-o", str(tmp_path / f"o{warned}")]
            result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        words = " ".join(caplog.text.split())
        assert ("registered part of a brain (tissue extent ratios spread 5.4x" in words) is warned, words


def test_points_in_micrometers_move_through_a_field_in_millimeters(tmp_path: Path) -> None:
    """A job whose atlas is in micrometers and whose (inverse) field is in millimeters: points go into the field's
    unit, are displaced, and come back in their own."""
    from patchmorph_core.spatial import Grid
    from pipeline.ngff import write_field
    from pipeline.points import _displace

    grid = Grid.from_spacing((6, 7, 8), (0.5, 0.4, 0.3), unit="millimeter")
    shift = np.array([0.5, -0.25, 0.125])  # mm
    field = np.broadcast_to(shift[:, None, None, None], (3, *grid.shape)).astype(np.float32)
    path = write_field(tmp_path / "f.zarr", field, grid)
    world = grid.index_to_world(np.array([[1.0, 2.0, 3.0], [4.5, 5.0, 0.0]])) * 1000.0  # µm
    np.testing.assert_allclose(_displace(path, world, "micrometer"), world + shift * 1000.0, rtol=1e-6)


def test_brain_points_in_millimeters_land_on_an_atlas_in_micrometers(tmp_path: Path) -> None:
    """map_points converts the moved points from the brain's unit into the atlas's before taking atlas voxels (a
    human brain in mm, an atlas in µm): with a zero field, a brain voxel lands on the atlas voxel at its place."""
    from patchmorph_core.spatial import Grid
    from pipeline.ngff import write_field
    from pipeline.points import JobSpaces, map_points

    brain = Grid.from_spacing((5, 6, 7), (0.2, 0.1, 0.3), unit="millimeter")
    atlas = Grid.from_spacing((10, 6, 21), (100.0, 100.0, 100.0), unit="micrometer")
    field = write_field(tmp_path / "f.zarr", np.zeros((3, *brain.shape), np.float32), brain)
    annotation = np.arange(np.prod(atlas.shape)).reshape(atlas.shape)
    job = JobSpaces(
        brain_grid=brain, atlas_grid=atlas, field=field, inverse_field=field, annotation=annotation,
        hemispheres=np.ones(atlas.shape, np.int64), labels_on_brain=None, labels_grid=brain, structures={},
        volumes=tmp_path / "volumes.csv", atlas=None, atlas_dir=tmp_path, brain_geometry="full", channels={},  # type: ignore[arg-type]
    )  # fmt: skip
    mapped = map_points(job, np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "brain")
    np.testing.assert_allclose(mapped.atlas, [[2.0, 2.0, 9.0], [8.0, 5.0, 18.0]], atol=1e-4)
    np.testing.assert_array_equal(mapped.structure_ids, [annotation[2, 2, 9], annotation[8, 5, 18]])


def test_values_at_takes_the_nearest_voxel() -> None:
    """A mapped point's structure is the label of the voxel nearest to it (a point 0.6 voxels along lies in voxel 1),
    in the outer half of an edge voxel too; beyond the array it is 0."""
    from pipeline.points import values_at

    labels = np.arange(1, 3 * 4 * 5 + 1).reshape(3, 4, 5)
    index = np.array([[0.6, 1.4, 2.7], [-0.4, 3.3, 4.45], [2.0, 0.0, 5.6]])
    np.testing.assert_array_equal(values_at(labels, index), [labels[1, 1, 3], labels[0, 3, 4], 0])


def test_points_that_fit_the_labels_as_given_are_not_refused_for_another_order(tmp_path: Path) -> None:
    """The column-order check refuses points only when another order fits the labels by ORDER_MARGIN more than the
    order given: cells inside a brain that fills the atlas's box fit every order equally and are kept."""
    from patchmorph_core.spatial import Grid
    from pipeline.points import JobSpaces, check_column_order

    atlas = Grid.from_spacing((20, 20, 20), (25.0, 25.0, 25.0))
    job = JobSpaces(
        brain_grid=atlas, atlas_grid=atlas, field=tmp_path, inverse_field=tmp_path,
        annotation=np.ones(atlas.shape, np.int64), hemispheres=np.ones(atlas.shape, np.int64), labels_on_brain=None,
        labels_grid=atlas, structures={}, volumes=tmp_path / "volumes.csv", atlas=None, atlas_dir=tmp_path,  # type: ignore[arg-type]
        brain_geometry="full", channels={},
    )  # fmt: skip
    index = np.random.default_rng(0).uniform(0, 19, (50, 3))
    check_column_order(job, index, "atlas")  # no InputError
