"""The polish as a pass of tiles: a partition of unity over a global tile lattice, the chunked polish equal to
the in-memory one whatever the chunks, close to one box over the whole grid, and never folding the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from patchmorph_core.config import InferenceConfig
from patchmorph_core.metrics import jacobian_determinant
from patchmorph_core.model import load_model
from patchmorph_core.spatial import Grid
from pipeline import polish as polish_pipeline
from pipeline.chunked import Box
from pipeline.ngff import read_field, read_image, write_image
from pipeline.polish import (
    SMALL_GRID,
    TILE_BOX,
    TILE_FIELD_BOX,
    TILE_HALO,
    PolishTiles,
    tile_cores,
    tile_lattice,
)
from pipeline.register import register_arrays, register_files


def test_tiles_cover_the_grid_with_a_partition_of_unity() -> None:
    shape = (70, 45, 19)  # the z axis holds 4 cores, y 3 (the edges clipped), x one: no halo, no ramp
    tiles = PolishTiles(shape, core=20, halo=6, ramp=3)
    total = np.zeros(shape)
    cores = np.zeros(shape, dtype=int)
    for core, box in tiles.tiles():
        weights = tiles.weights(core, box)
        assert weights.shape == box.shape and weights.min() >= 0.0
        total[box.slices] += weights
        cores[core.slices] += 1
        outside = np.ones(box.shape, dtype=bool)  # more than the ramp away from the core: no weight
        grown = Box(tuple(max(a - 3, 0) for a in core.start), tuple(min(b + 3, n) for b, n in zip(core.stop, shape, strict=True)))  # type: ignore[arg-type]
        outside[grown.relative_to(box.start).slices] = False
        assert np.all(weights[outside] == 0.0)
    assert len(tiles.tiles()) == 4 * 3 * 1
    assert np.all(cores == 1)  # the cores tile the grid
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert PolishTiles((30, 20, 10), core=40).tiles() == [(Box((0, 0, 0), (30, 20, 10)),) * 2]  # one box


def test_tiles_over_a_region_polish_nothing_beyond_it_and_taper_the_velocity_to_zero_at_its_inner_faces() -> None:
    """Tiles over the tissue box grown by the ramp: a partition of unity on that region, no box beyond it; the
    taper is 1 on the tissue box and wherever the region meets the grid's own faces, 0 outside the region, and
    rises smoothly (steps of at most π/(2 ramp)) across the region's faces inside the grid."""
    shape = (70, 45, 40)
    tissue = Box((10, 0, 8), (50, 45, 30))  # touches the grid's y faces only
    tiles = tile_lattice(shape, 1, tissue)
    ramp = tiles.ramp
    assert tiles.region == Box((10 - ramp, 0, 8 - ramp), (50 + ramp, 45, 30 + ramp))
    region = tiles.bounds
    total = np.zeros(shape)
    for core, box in tiles.tiles():
        assert region.intersection(box) == box  # nothing polished beyond the region
        total[box.slices] += tiles.weights(core, box)
    inside = np.zeros(shape, dtype=bool)
    inside[region.slices] = True
    np.testing.assert_allclose(total[inside], 1.0, atol=1e-6)
    assert np.all(total[~inside] == 0.0)
    taper = tiles.taper(Box((0, 0, 0), shape))
    assert np.all(taper[tissue.slices] == 1.0) and np.all(taper[~inside] == 0.0)
    assert taper.min() >= 0.0 and taper.max() <= 1.0
    profile = taper[:, 20, 20]  # along z, across both inner faces
    assert profile[region.start[0]] < 0.1 and profile[region.stop[0] - 1] < 0.1
    assert np.abs(np.diff(profile)).max() <= np.pi / (2 * ramp) + 1e-6
    assert np.all(taper[30, :, 20] == 1.0)  # the region reaches the grid's y faces: no taper there
    assert tile_lattice(shape, 1, Box((3, 0, 2), (68, 45, 38))).region is None  # grown, it holds the grid
    coarse = tile_lattice(shape, 2, tissue)  # at coarsening 2 the ramp, hence the margin, is twice as wide
    assert coarse.ramp == 2 * ramp and coarse.region == Box((0, 0, 0), (50 + 2 * ramp, 45, 40))  # clipped to the grid
    box = Box((4, 5, 6), (30, 20, 25))
    np.testing.assert_array_equal(tiles.taper(box), taper[box.slices])  # a box's taper is the grid's, cut
    # on every 2nd voxel (a chunk's lattice nodes): the full box's values at those voxels
    np.testing.assert_array_equal(tiles.taper(box, 2), taper[box.slices][::2, ::2, ::2])
    for core, polished in tiles.tiles():
        np.testing.assert_array_equal(tiles.weights(core, polished, 3), tiles.weights(core, polished)[::3, ::3, ::3])


def test_a_grid_within_one_tile_is_split_in_two_along_its_longest_axis_when_long_enough() -> None:
    shape = (81, 102, 87)  # a 2 mm human brain's field grid: one 136-voxel core would hold it whole
    cores = tile_cores(shape, 136, 12)
    assert cores == (136, 51, 136)
    tiles = PolishTiles(shape, core=cores, halo=12, ramp=6)
    assert [(c, b) for c, b in tiles.tiles()] == [
        (Box((0, 0, 0), (81, 51, 87)), Box((0, 0, 0), (81, 63, 87))),
        (Box((0, 51, 0), (81, 102, 87)), Box((0, 39, 0), (81, 102, 87))),
    ]
    total = np.zeros(shape)
    for core, box in tiles.tiles():
        total[box.slices] += tiles.weights(core, box)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    polished = sum(np.prod(box.shape) for _, box in tiles.tiles())
    assert polished <= 1.3 * np.prod(shape)  # SPLIT_EXTRA: the halos add at most 30 %
    assert tile_cores((30, 20, 10), 136, 12) == (136, 136, 136)  # too short: halos would double the work
    assert tile_cores((200, 90, 80), 136, 12) == (136, 136, 136)  # several tiles already


def test_the_split_polish_gives_the_same_field_on_one_thread_or_two(
    pair_and_config: tuple[Path, Path, InferenceConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    fixed, moving, config = pair_and_config
    config = config.model_copy(update={"polish_iterations": 4, "stage_check": False})
    model = load_model(config.weights, "cpu")
    images = read_image(fixed), read_image(moving)
    monkeypatch.setattr(polish_pipeline, "TILE_HALO", 6)  # so that the test pair's 23-voxel axis is split
    monkeypatch.setattr(polish_pipeline, "TILE_RAMP", 3)
    monkeypatch.setattr(polish_pipeline, "SPLIT_EXTRA", 0.6)
    one = register_arrays(model, *images, config, threads=1)
    two = register_arrays(model, *images, config, threads=2)
    assert one.info["polish"]["tiles"] == two.info["polish"]["tiles"] == 2
    assert np.array_equal(one.field, two.field) and np.array_equal(one.uncertainty, two.uncertainty)


def test_tile_boxes_do_not_grow_with_the_field() -> None:
    """At coarsening 1 every box of a large grid is at most :data:`TILE_BOX` field voxels a side whatever the
    field's size (2 and 8 GiB of the scale benchmark's brain), so a tile task's memory is the same at every size
    beyond a few tiles; a small grid keeps boxes of :data:`TILE_FIELD_BOX`; at coarsening 2 the box is capped at
    :data:`TILE_FIELD_BOX` field voxels, its halo twice as wide."""
    for shape in ((191, 110, 154), (303, 174, 244)):
        tiles = tile_lattice(shape, 1)
        assert (tiles.core, tiles.halo) == ((TILE_BOX - 2 * TILE_HALO,) * 3, TILE_HALO)
        boxes = [box for _, box in tiles.tiles()]
        assert max(max(box.shape) for box in boxes) == TILE_BOX
        covered = np.zeros(shape, dtype=int)
        for core, _ in tiles.tiles():
            covered[core.slices] += 1
        assert np.all(covered == 1)
    small = tile_lattice((102, 115, 81), 1)  # a 2 mm human brain's field: within SMALL_GRID, a 136-voxel core
    assert np.prod((102, 115, 81)) <= SMALL_GRID and small.core[0] == small.core[2] == TILE_FIELD_BOX - 2 * TILE_HALO
    assert len(small.tiles()) == 2  # cut in two along its longest axis (tile_cores)
    mouse = tile_lattice((130, 96, 148), 1)  # the Allen mouse brain's field at 100 um: 1.8 M voxels, two boxes
    assert np.prod((130, 96, 148)) <= SMALL_GRID and len(mouse.tiles()) == 2
    coarse = tile_lattice((303, 174, 244), 2)
    assert coarse.halo == 2 * TILE_HALO and coarse.core[0] + 2 * coarse.halo == min(2 * TILE_BOX, TILE_FIELD_BOX)
    assert max(max(box.shape) for _, box in coarse.tiles()) == TILE_FIELD_BOX


def _network_field(run: Path, name: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(run / f"{name}.zarr"), mode="r")["0"][:])


def test_chunked_polish_equals_in_memory_and_never_folds(
    tmp_path: Path,
    dask_scheduler: str,
    pair_and_config: tuple[Path, Path, InferenceConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Small tiles (3 x 3 x 3 on the 23 x 22 x 19 field) and 7³ chunks on a Dask cluster give the in-memory
    field and uncertainty (the same tiles, the whole grid one chunk) to float rounding; tiles of one box give nearly the same
    field; the polish moves the network's field by voxels and folds nothing."""
    fixed, moving, config = pair_and_config
    config = config.model_copy(update={"polish_iterations": 6, "polish_max_step": 0.4, "stage_check": False})
    model = load_model(config.weights, "cpu")
    images = read_image(fixed), read_image(moving)
    monkeypatch.setattr(polish_pipeline, "TILE_BOX", 20)  # cores of 8 voxels, halo 6
    monkeypatch.setattr(polish_pipeline, "TILE_FIELD_BOX", 20)  # (the test's small grid takes this box)
    monkeypatch.setattr(polish_pipeline, "TILE_HALO", 6)
    monkeypatch.setattr(polish_pipeline, "TILE_RAMP", 3)
    reference = register_arrays(model, *images, config)
    assert reference.info["polish"]["tiles"] == 27
    record = register_files(
        fixed, moving, tmp_path / "tiles.zarr", config, chunk_size=7, scheduler=dask_scheduler, progress=False,
        keep_run=True,
    )  # fmt: skip
    spacing = float(reference.grid.spacing.min())
    tiled = np.asarray(read_field(record.field)[0][:])
    assert record.polish is not None and record.polish["tiles"] == 27 and record.chunks == 4 * 4 * 3
    assert np.abs(tiled - reference.field).max() < 1e-4 * spacing
    uncertainty = np.asarray(read_image(record.uncertainty).levels[0].array[:])  # the tiles' residual
    assert reference.uncertainty.max() > 0.0 and np.abs(uncertainty - reference.uncertainty).max() < 1e-5
    network = _network_field(record.run, "stage1")
    moved = np.linalg.norm(tiled - network, axis=0) / spacing
    assert moved.max() > 0.5  # the polish does something
    assert jacobian_determinant(network, reference.grid).min() > 0.0
    assert jacobian_determinant(tiled, reference.grid).min() > 0.0  # and folds nothing
    monkeypatch.undo()  # the default tiles: the whole field is one box
    one = register_arrays(model, *images, config)
    assert one.info["polish"]["tiles"] == 1
    # tiles of 8-voxel cores and 6-voxel halos on a rough random-model field: a coarse approximation of the one
    # box (with the default 136/12 tiles on a real pair it agrees to 0.003 field voxels, docs/method.md)
    difference = np.linalg.norm(one.field - reference.field, axis=0) / spacing
    assert np.percentile(difference, 99) < 0.3 * np.percentile(moved, 99) and difference.max() < 0.5


def test_coarse_steps_chunked_equal_in_memory_and_never_fold(
    tmp_path: Path, pair_and_config: tuple[Path, Path, InferenceConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With coarse steps first (``polish_coarse_iterations``) 7³ chunks on threads give the in-memory field to
    float rounding, the coarse steps change the field, and nothing folds (the velocity's larger bound, which sets
    the chunks' integration halo, is tested in ``tests/patchmorph_core/test_polish.py``)."""
    fixed, moving, config = pair_and_config
    config = config.model_copy(
        update={"polish_iterations": 4, "polish_coarse_iterations": 10, "polish_max_step": 0.4, "stage_check": False}
    )
    model = load_model(config.weights, "cpu")
    images = read_image(fixed), read_image(moving)
    monkeypatch.setattr(polish_pipeline, "TILE_BOX", 20)
    monkeypatch.setattr(polish_pipeline, "TILE_FIELD_BOX", 20)
    monkeypatch.setattr(polish_pipeline, "TILE_HALO", 6)
    monkeypatch.setattr(polish_pipeline, "TILE_RAMP", 3)
    reference = register_arrays(model, *images, config)
    record = register_files(fixed, moving, tmp_path / "coarse.zarr", config, chunk_size=7, progress=False)
    spacing = float(reference.grid.spacing.min())
    chunked = np.asarray(read_field(record.field)[0][:])
    assert np.abs(chunked - reference.field).max() < 1e-4 * spacing
    fine_only = register_arrays(model, *images, config.model_copy(update={"polish_coarse_iterations": 0}))
    assert np.abs(fine_only.field - reference.field).max() > 0.1 * spacing
    assert jacobian_determinant(chunked, reference.grid).min() > 0.0


def test_a_polish_at_coarsening_2_chunked_equals_in_memory_and_never_folds(
    tmp_path: Path, pair_and_config: tuple[Path, Path, InferenceConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At ``polish_coarsening: 2`` (the velocity integrated on every 2nd field voxel and sampled back) 5³ chunks,
    one of whose reach boxes starts at an odd index, give the in-memory field to float rounding (nodes taken
    from each reach box's own voxel 0 would differ by 0.4 field voxels); the polish moves the network's field
    and folds nothing."""
    fixed, moving, config = pair_and_config
    config = config.model_copy(
        update={"polish_iterations": 6, "polish_coarsening": 2, "polish_max_step": 0.4, "stage_check": False}
    )
    model = load_model(config.weights, "cpu")
    images = read_image(fixed), read_image(moving)
    monkeypatch.setattr(polish_pipeline, "TILE_BOX", 10)  # polish-grid voxels: 20 field voxels
    monkeypatch.setattr(polish_pipeline, "TILE_FIELD_BOX", 20)
    monkeypatch.setattr(polish_pipeline, "TILE_HALO", 3)
    monkeypatch.setattr(polish_pipeline, "TILE_RAMP", 1)
    reference = register_arrays(model, *images, config)
    assert reference.info["polish"]["coarsening"] == 2 and reference.info["polish"]["tiles"] > 1
    record = register_files(fixed, moving, tmp_path / "coarse2.zarr", config, chunk_size=5, progress=False, keep_run=True)
    spacing = float(reference.grid.spacing.min())
    chunked = np.asarray(read_field(record.field)[0][:])
    assert np.abs(chunked - reference.field).max() < 1e-4 * spacing
    network = _network_field(record.run, "stage1")
    assert np.linalg.norm(chunked - network, axis=0).max() > 0.3 * spacing  # the polish does something
    assert jacobian_determinant(chunked, reference.grid).min() > 0.0


def _padded(path: Path, folder: Path, pad: int) -> Path:
    """The image at ``path`` inside ``pad`` voxels of zero background on every side, on the same world frame."""
    image = read_image(path)
    grid = image.grid
    values = np.pad(np.asarray(image.levels[0].array[:]), pad)
    affine = grid.affine.copy()
    affine[:3, 3] = grid.index_to_world(np.full((1, 3), -float(pad)))[0]
    return write_image(folder / path.name, values, Grid(values.shape, affine, grid.unit), overwrite=True)


def test_a_brain_smaller_than_its_volume_is_polished_on_its_tissue_box_only(
    tmp_path: Path, pair_and_config: tuple[Path, Path, InferenceConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test pair inside 12 voxels of background (on its anisotropic, rotated grid): the polish steps only on the
    tissue box grown by the ramp; beyond that region the output is the network's field, the field written in 7³
    chunks equals the in-memory one, and nothing folds."""
    fixed, moving, config = pair_and_config
    fixed, moving = _padded(fixed, tmp_path, 12), _padded(moving, tmp_path, 12)
    config = config.model_copy(update={"polish_iterations": 6, "polish_max_step": 0.4, "stage_check": False})
    model = load_model(config.weights, "cpu")
    monkeypatch.setattr(polish_pipeline, "TILE_HALO", 6)
    monkeypatch.setattr(polish_pipeline, "TILE_RAMP", 3)
    images = read_image(fixed), read_image(moving)
    reference = register_arrays(model, *images, config)
    shape = reference.grid.shape
    start, stop = reference.info["polish"]["region"]
    region = Box(tuple(start), tuple(stop))  # type: ignore[arg-type]
    tissue = polish_pipeline.tissue_box(images[0], reference.grid)
    assert tissue is not None and region.intersection(tissue) == tissue  # the tissue box, grown by the ramp
    assert region.shape[2] < shape[2]  # along x, background beyond it (the rotation about x widens z and y)
    record = register_files(
        fixed, moving, tmp_path / "field.zarr", config, chunk_size=7, workers=2, progress=False, keep_run=True
    )
    spacing = float(reference.grid.spacing.min())
    field = np.asarray(read_field(record.field)[0][:])
    assert np.abs(field - reference.field).max() < 1e-4 * spacing
    network = _network_field(record.run, "stage1")
    outside = np.ones(shape, dtype=bool)
    outside[region.slices] = False
    moved = np.linalg.norm(field - network, axis=0) / spacing
    assert moved[~outside].max() > 0.1  # the polish moves the tissue box
    assert moved[outside].max() < 1e-4  # and nothing beyond the region
    assert jacobian_determinant(field, reference.grid).min() > 0.0
    faces = np.maximum(moved[:, :, region.start[2]], moved[:, :, region.stop[2] - 1])
    assert faces.max() < 0.01 * moved.max()  # the velocity tapers to zero at the region's faces inside the grid
