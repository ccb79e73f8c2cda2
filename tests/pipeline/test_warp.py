"""Chunked warping into a sharded output: one task per shard, computed in storage-chunk cubes, written once."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import pipeline.checks as checks
import pipeline.ngff as ngff
from patchmorph_core.config import InferenceConfig
from patchmorph_core.displacement import FieldDisplacement
from patchmorph_core.errors import InputError
from patchmorph_core.spatial import Grid, random_rotation
from patchmorph_core.warping import warp_to_grid
from pipeline.checks import STORED_SIZE_MARGIN, stored_fraction
from pipeline.ngff import finish_image, pyramid_arrays, read_image, write_field, write_image
from pipeline.resume import StageRecords
from pipeline.warp import task_levels, warp_files


def _field(folder: Path, fixed: Path, moving: Path) -> Path:
    """A smooth fold-free field on a 2 mm grid over the fixed image."""
    grid = read_image(fixed).grid.resampled(2.0)
    points = grid.points()
    field = np.stack(
        [np.sin(points[..., 1] / 8.0), 0.7 * np.cos(points[..., 2] / 10.0), -0.5 + 0 * points[..., 0]]
    ).astype(np.float32)
    return write_field(folder / "field.zarr", field, grid, metadata={"fixed": str(fixed), "moving": str(moving)})


def test_sharded_warp_writes_each_shard_once_and_equals_in_memory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dask_scheduler: str,
    pair_and_config: tuple[Path, Path, InferenceConfig],
) -> None:
    fixed, moving, _ = pair_and_config
    field = _field(tmp_path, fixed, moving)
    monkeypatch.setattr(ngff, "SHARD_THRESHOLD_BYTES", 0)  # every output array is sharded (4³ chunks)
    out = tmp_path / "warped.zarr"
    record = warp_files(field, moving, out, chunk_size=6, scheduler=dask_scheduler, progress=False, keep_run=True)

    level0 = zarr.open_array(str(out / "0"), mode="r")
    assert level0.chunks == (6, 6, 6) and level0.shards == (24, 24, 24)
    shards = tuple(-(-n // 24) for n in level0.shape)
    assert record.chunks == int(np.prod(shards))  # one task per shard, not per chunk
    counts = StageRecords(tmp_path / "warped.zarr.run" / "warp").write_counts()
    assert len(counts) == record.chunks and set(counts.values()) == {1}  # each shard written once

    array, grid, _ = ngff.read_field(field)
    expected = warp_to_grid(read_image(moving), FieldDisplacement(np.asarray(array[:]), grid), read_image(fixed).grid)
    np.testing.assert_allclose(level0[:], expected, atol=1e-5)  # float32 indices relative to each task's box


@pytest.mark.parametrize("pyramid_sharded", [False, True])
def test_the_tasks_write_the_first_pyramid_levels_as_finish_image_builds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pyramid_sharded: bool
) -> None:
    direction = random_rotation(np.random.default_rng(3), 25.0)
    grid = Grid.from_spacing((150, 40, 130), (1.0, 1.6, 1.3), origin=(2.0, -1.0, 0.5), unit="millimeter", direction=direction)
    rng = np.random.default_rng(4)
    image = (2000 + 1500 * np.sin(grid.points()[..., 0] / 9.0) + rng.normal(0, 200, grid.shape)).astype(np.uint16)
    moving = write_image(tmp_path / "moving.zarr", image, grid)
    field = _field(tmp_path, moving, moving)
    threshold = 0 if pyramid_sharded else image.nbytes - 1  # every level sharded, or level 0 only
    monkeypatch.setattr(ngff, "SHARD_THRESHOLD_BYTES", threshold)
    out = tmp_path / "warped.zarr"
    warp_files(field, moving, out, chunk_size=8, progress=False)

    level0 = zarr.open_array(str(out / "0"), mode="r")
    assert level0.shards == (32, 32, 32) and level0.dtype == np.uint16
    levels = pyramid_arrays(out, fresh=False)  # anisotropic: halving one or two axes a level
    assert [f for _, f in levels] == [(2, 1, 1), (1, 1, 2), (1, 2, 1), (2, 1, 1), (1, 1, 2)]
    assert len(task_levels(level0, levels)) == 5  # each shard's part of every level is whole write units
    if pyramid_sharded:  # a level's shards no larger than the part of a level-0 shard above them
        assert [tuple(a.shards) for a, _ in levels[:2]] == [(16, 32, 32), (16, 32, 16)]
    rebuilt = tmp_path / "rebuilt.zarr"
    shutil.copytree(out, rebuilt)
    finish_image(rebuilt)  # every level again, from level 0 on disk
    for index in range(1, 6):
        built = zarr.open_array(str(rebuilt / str(index)), mode="r")[:]
        assert built.any()
        np.testing.assert_array_equal(zarr.open_array(str(out / str(index)), mode="r")[:], built)
    assert len(read_image(out).levels) == 6


def test_an_8_bit_mask_keeps_its_signal_through_a_warp(tmp_path: Path) -> None:
    """A uint8 mask on 5 % of the voxels warped onto a coarser, rotated grid gives float32 values equal to those
    of the same mask given as float32 (in uint8 its coarse level and the output rounded the signal away)."""
    mask = (np.random.default_rng(5).random((40, 48, 56)) < 0.05).astype(np.uint8)
    grid = Grid.from_orientation(mask.shape, (50.0, 40.0, 40.0), "psl")
    shape, spacing = (20, 21, 26), np.array([100.0, 80.0, 80.0])
    linear = random_rotation(np.random.default_rng(6), 10.0) * spacing[None, :]
    origin = grid.center - linear @ (np.array(shape) - 1.0) / 2.0  # centred on the mask
    fixed_grid = Grid.from_spacing(shape, spacing, origin=origin, direction=linear / spacing[None, :])
    fixed = write_image(tmp_path / "fixed.zarr", np.zeros(shape, np.float32), fixed_grid)
    warped = {}
    for dtype in (np.uint8, np.float32):
        moving = write_image(tmp_path / f"mask_{np.dtype(dtype).name}.zarr", mask.astype(dtype), grid)
        field = write_field(
            tmp_path / f"zero_{np.dtype(dtype).name}.zarr", np.zeros((3, *shape), np.float32), fixed_grid,
            metadata={"fixed": str(fixed), "moving": str(moving)},
        )  # fmt: skip
        out = tmp_path / f"warped_{np.dtype(dtype).name}.zarr"
        warp_files(field, moving, out, progress=False)
        warped[dtype] = np.asarray(read_image(out).levels[0].array[:])
    assert warped[np.uint8].dtype == np.float32
    np.testing.assert_allclose(warped[np.uint8], warped[np.float32], atol=1e-6)
    assert warped[np.uint8].mean() == pytest.approx(mask.mean(), rel=0.1)  # most of the grid lies on the mask


def test_an_image_already_in_the_output_space_is_refused(tmp_path: Path) -> None:
    """The fixed image given to a forward warp (a brain given where the atlas's images go), also at another
    resolution: refused, naming the way round; given to the inverse warp it is taken."""
    from patchmorph_core.errors import InputError

    rng = np.random.default_rng(7)
    fixed_grid = Grid.from_spacing((20, 22, 24), (1.2, 1.0, 1.1), unit="millimeter",
                                   direction=random_rotation(rng, 12.0))  # fmt: skip
    moving_grid = Grid.from_spacing((24, 26, 25), (1.0, 1.0, 1.0), unit="millimeter")
    fixed = write_image(tmp_path / "fixed.zarr", rng.random(fixed_grid.shape).astype(np.float32), fixed_grid)
    moving = write_image(tmp_path / "moving.zarr", rng.random(moving_grid.shape).astype(np.float32), moving_grid)
    field = write_field(
        tmp_path / "field.zarr", np.zeros((3, *fixed_grid.shape), np.float32), fixed_grid,
        metadata={"fixed": str(fixed), "moving": str(moving)},
    )  # fmt: skip
    with pytest.raises(InputError, match=r"covers the box of the field's fixed image.*warp it with --inverse"):
        warp_files(field, fixed, tmp_path / "wrong.zarr", progress=False)
    assert not (tmp_path / "wrong.zarr").exists()
    finer = Grid.from_spacing((40, 44, 48), fixed_grid.spacing / 2, origin=fixed_grid.index_to_world(np.full(3, -0.25)),
                              unit="millimeter", direction=fixed_grid.direction)  # fmt: skip  (the same box, 2x finer)
    fine = write_image(tmp_path / "fine.zarr", rng.random(finer.shape).astype(np.float32), finer)
    with pytest.raises(InputError, match=r"covers the box of the field's fixed image"):
        warp_files(field, fine, tmp_path / "wrong_fine.zarr", progress=False)
    warp_files(field, fixed, tmp_path / "back.zarr", inverse=True, progress=False)
    assert read_image(tmp_path / "back.zarr").grid.same_voxels(moving_grid)
    with pytest.raises(InputError, match=r"covers the box of the field's moving image.*warp it without"):
        warp_files(field, moving, tmp_path / "wrong2.zarr", inverse=True, progress=False)


def test_an_intensity_image_given_as_a_label_map_is_refused(tmp_path: Path) -> None:
    """A float image with fractional values warped with ``labels`` is refused before any output is made (it became
    an NGFF label image with one "label" per intensity); a label map stored as float (whole numbers) is warped."""
    from patchmorph_core.errors import InputError

    rng = np.random.default_rng(8)
    grid = Grid.from_spacing((30, 36, 42), (0.2, 0.15, 0.1), unit="millimeter")
    image = write_image(tmp_path / "image.zarr", (50 + 100 * rng.random(grid.shape)).astype(np.float32), grid)
    ids = np.zeros(grid.shape, np.float32)
    ids[5:25, 8:30, 10:35] = 3.0
    ids[12:20, 14:22, 16:30] = 7.0
    label_map = write_image(tmp_path / "ids.zarr", ids, grid)
    field = write_field(
        tmp_path / "field.zarr", np.zeros((3, *grid.shape), np.float32), grid,
        metadata={"fixed": str(image), "moving": str(image)},
    )  # fmt: skip
    with pytest.raises(InputError, match=r"image\.zarr holds values that are not whole numbers .*no label ids.*warp it without --labels"):
        warp_files(field, image, tmp_path / "wrong.zarr", labels=True, progress=False)
    assert not (tmp_path / "wrong.zarr").exists() and not (tmp_path / "wrong.zarr.run").exists()
    warp_files(field, label_map, tmp_path / "ids_warped.zarr", labels=True, progress=False)
    assert set(np.unique(read_image(tmp_path / "ids_warped.zarr").levels[0].array[:])) == {0.0, 3.0, 7.0}


def test_a_label_map_whose_pyramid_another_tool_made_keeps_its_ids_on_a_coarser_grid(tmp_path: Path) -> None:
    """A label map written by ome-zarr-py (its default pyramid interpolates the ids) warped onto a grid coarser than
    its level 0 holds only its own ids: its coarser levels, which hold values that are no label, are not read."""
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image as ome_write_image

    ids = np.array([0, 614454277, 1000, 997, 8, 567], np.uint32)  # Allen-like ids
    z, y, x = np.meshgrid(np.arange(40), np.arange(36), np.arange(44), indexing="ij")
    label_map = ids[(z // 5 + 2 * (y // 4) + 3 * (x // 7)) % len(ids)]
    moving = tmp_path / "labels.zarr"
    ome_write_image(
        label_map, zarr.open_group(str(moving), mode="w", zarr_format=3), axes="zyx", fmt=FormatV05(),
        scale_factors=[{"z": 2, "y": 2, "x": 2}], scale={"z": 50.0, "y": 40.0, "x": 40.0},
        axes_units={a: "micrometer" for a in "zyx"},
    )  # fmt: skip
    assert not set(np.unique(zarr.open_array(str(moving / "s1"), mode="r")[:])) <= set(ids)  # no label pyramid
    coarse = Grid.from_spacing((19, 14, 17), (100.0, 100.0, 100.0), origin=(25.0, 50.0, 50.0))  # as coarse as s1
    fixed = write_image(tmp_path / "fixed.zarr", np.ones(coarse.shape, np.float32), coarse)
    field = write_field(
        tmp_path / "field.zarr", np.zeros((3, *coarse.shape), np.float32), coarse,
        metadata={"fixed": str(fixed), "moving": str(moving)},
    )  # fmt: skip
    warp_files(field, moving, tmp_path / "warped.zarr", labels=True, progress=False)
    assert set(np.unique(read_image(tmp_path / "warped.zarr").levels[0].array[:])) <= set(ids.tolist())


def test_a_relative_fixed_image_read_from_another_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A field that names its fixed image by a relative path (as typed to register), used from another animal's
    folder holding an image of that name on another grid: refused before any output (the warp took that image's
    grid silently); from the field's own folder, or with --target, it is warped."""
    from patchmorph_core.errors import InputError

    rng = np.random.default_rng(10)
    grid = Grid.from_spacing((20, 24, 28), (0.2, 0.15, 0.1), unit="millimeter")
    other = Grid.from_spacing((20, 24, 28), (0.3, 0.3, 0.3), unit="millimeter")
    for folder, image_grid in (("mouse1", grid), ("mouse2", other)):
        (tmp_path / folder).mkdir()
        write_image(tmp_path / folder / "brain.ome.zarr", rng.random(image_grid.shape).astype(np.float32), image_grid)
    atlas = Grid.from_spacing((30, 26, 24), (0.1, 0.12, 0.14), origin=(-0.5, -0.3, -0.2), unit="millimeter")
    moving = write_image(tmp_path / "mouse1" / "atlas.ome.zarr", rng.random(atlas.shape).astype(np.float32), atlas)
    monkeypatch.chdir(tmp_path / "mouse1")
    field = write_field(
        Path("field.ome.zarr"), np.zeros((3, *grid.shape), np.float32), grid,
        metadata={"fixed": "brain.ome.zarr", "moving": "atlas.ome.zarr"},
    )  # fmt: skip
    monkeypatch.chdir(tmp_path / "mouse2")
    with pytest.raises(InputError, match=r"names, brain\.ome\.zarr, does not cover the field's box.*pass --target"):
        warp_files(tmp_path / "mouse1" / field, moving, tmp_path / "wrong.ome.zarr", progress=False)
    assert not (tmp_path / "wrong.ome.zarr").exists()
    target = tmp_path / "mouse1" / "brain.ome.zarr"
    warp_files(tmp_path / "mouse1" / field, moving, tmp_path / "targeted.ome.zarr", target=target, progress=False)
    monkeypatch.chdir(tmp_path / "mouse1")
    warp_files(field, moving, tmp_path / "right.ome.zarr", progress=False)
    assert read_image(tmp_path / "right.ome.zarr").grid.same_voxels(grid)


def _disk_with_free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    """The output folder's file system reports ``free`` bytes free."""
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=free))


def test_free_space_is_judged_by_how_the_input_compresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Mostly background (as a brain's grid is) compresses far below its uncompressed size: a disk that holds
    that with a margin is not refused (a warning names the uncompressed bound); one that cannot is refused
    before anything is written."""
    grid = Grid.from_orientation((40, 24, 32), (2.0, 1.0, 1.5), "lia", unit="millimeter")
    image = np.zeros(grid.shape, np.uint16)
    image[10:30, 6:18, 8:24] = np.random.default_rng(0).integers(900, 1100, (20, 12, 16), dtype=np.uint16)
    moving = write_image(tmp_path / "moving.zarr", image, grid)
    field = write_field(tmp_path / "field.zarr", np.zeros((3, *grid.resampled(4.0).shape), np.float32), grid.resampled(4.0),
                        metadata={"fixed": str(moving), "moving": str(moving)})  # fmt: skip
    fraction = stored_fraction(read_image(moving), np.dtype(np.uint16))
    assert fraction is not None and 0 < fraction < 0.5
    needed = int(np.prod(grid.shape)) * 2 * 4 // 3  # the uncompressed output with its pyramid

    _disk_with_free(monkeypatch, int(needed * fraction * STORED_SIZE_MARGIN) + 4096)
    with caplog.at_level("WARNING", logger="pipeline.checks"):
        warp_files(field, moving, tmp_path / "warped.zarr", progress=False)
    assert read_image(tmp_path / "warped.zarr").levels[0].array.shape == grid.shape
    assert "compressed as its input is" in caplog.text and "a rerun resumes" in caplog.text

    _disk_with_free(monkeypatch, int(needed * fraction * STORED_SIZE_MARGIN) - 4096)
    with pytest.raises(InputError, match=r"the warped image .*again\.zarr needs about .* free: free some space"):
        warp_files(field, moving, tmp_path / "again.zarr", progress=False)
    assert not (tmp_path / "again.zarr").exists()


def test_the_compressed_fraction_is_read_from_a_coarse_level_of_the_outputs_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = Grid.from_orientation((40, 24, 32), (2.0, 1.0, 1.5), "lia", unit="millimeter")
    noise = np.random.default_rng(1).random(grid.shape).astype(np.float32)  # incompressible
    image = read_image(write_image(tmp_path / "noise.zarr", noise, grid, chunks=(8, 8, 8), n_levels=2))
    assert stored_fraction(image, np.dtype(np.float32)) > 0.8
    assert stored_fraction(image, np.dtype(np.uint16)) is None  # no level of the output's dtype
    levels = [int(np.prod(np.ceil(np.divide(level.array.shape, level.array.chunks)))) for level in image.levels]
    monkeypatch.setattr(checks, "COUNTED_CHUNK_FILES", levels[1])  # the full level is not listed
    listed: list[tuple[int, ...]] = []
    nbytes_stored = zarr.Array.nbytes_stored
    monkeypatch.setattr(zarr.Array, "nbytes_stored", lambda self: listed.append(self.shape) or nbytes_stored(self))
    assert stored_fraction(image, np.dtype(np.float32)) > 0.8
    assert listed == [image.levels[1].array.shape]
