"""Concurrent warps of one item never share a Dask client: a five-item batch of image and label warps, run ten
times on the flows' Dask task runner with two threads in one worker process (so an item's image warp and its
label warp run at the same time in one process, each with its own in-process cluster), without one failure
and with every output equal to the in-memory warp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prefect import flow
from scipy import ndimage

from flows.config import StepOptions
from flows.records import ItemError
from flows.runner import dask_task_runner
from flows.steps import ImageInput, ItemJob, _step, _submit_warps
from flows.tasks import warp_task
from patchmorph_core.displacement import FieldDisplacement
from patchmorph_core.spatial import Grid
from patchmorph_core.warping import warp_to_grid
from pipeline.cluster import ClusterConfig
from pipeline.ngff import read_field, read_image, write_field, write_image

ITEMS, ROUNDS = 5, 10


@flow(name="warp-rounds")
def warp_rounds(jobs: list[ItemJob], options: StepOptions, rounds: int) -> list[list[ItemError]]:
    """The flows' warp step (image and labels of every job at once), ``rounds`` times; the errors of each."""
    warp = warp_task.with_options(retries=0)
    failures = []
    for _ in range(rounds):
        errors: list[ItemError] = []
        _step(jobs, "warp", lambda job: _submit_warps(job, warp, options), errors)
        failures.append(errors)
    return failures


def _jobs(root: Path) -> list[ItemJob]:
    """Five items on a small anisotropic grid, each with its own field (another shift), image and labels."""
    shape = (14, 18, 12)
    grid = Grid.from_orientation(shape, (2.0, 1.5, 2.5), "lia", unit="millimeter")
    image = ndimage.gaussian_filter(np.random.default_rng(5).random(shape), 1.5).astype(np.float32)
    fixed = write_image(root / "fixed.zarr", image, grid)
    moving = write_image(root / "moving.zarr", image, grid)
    labels = write_image(root / "labels.zarr", np.rint(image * 9).astype(np.uint16), grid, labels=True)
    field_grid = grid.resampled(3.0)
    jobs = []
    for item in range(ITEMS):
        out = root / f"item{item}"
        out.mkdir()
        shift = np.array([0.5 * item, -0.3 * item, 0.2], np.float32)[:, None, None, None]
        field = np.ascontiguousarray(np.broadcast_to(shift, (3, *field_grid.shape)))
        write_field(out / "field.ome.zarr", field, field_grid, metadata={"fixed": str(fixed), "moving": str(moving)})
        jobs.append(
            ItemJob(
                name=f"item{item}",
                out_dir=out,
                fixed=ImageInput(path=fixed, converted=out / "fixed.ome.zarr"),
                moving=ImageInput(path=moving, converted=out / "moving.ome.zarr"),
                moving_labels=ImageInput(path=labels, converted=out / "labels.ome.zarr", labels=True),
            )
        )
    return jobs


@pytest.mark.usefixtures("prefect_server")
def test_five_item_batch_of_image_and_label_warps_ten_times(tmp_path: Path) -> None:
    jobs = _jobs(tmp_path)
    options = StepOptions(chunk_size=8)  # chunks of 8 field voxels: every warp has many tasks
    cluster = ClusterConfig(kind="local", workers=1, threads_per_worker=2, memory_per_worker="2GiB")
    with dask_task_runner(cluster) as runner:
        failures = warp_rounds.with_options(task_runner=runner)(jobs, options, ROUNDS)

    assert failures == [[] for _ in range(ROUNDS)]
    moving, labels = read_image(jobs[0].moving.path), read_image(jobs[0].moving_labels.path)  # type: ignore[union-attr]
    target = read_image(jobs[0].fixed.path).grid
    for job in jobs:
        values, grid, _ = read_field(job.field)
        forward = FieldDisplacement(np.asarray(values[:]), grid)
        warped = np.asarray(read_image(job.warped).levels[0].array[:])
        np.testing.assert_allclose(warped, warp_to_grid(moving, forward, target), atol=1e-5)
        warped_labels = np.asarray(read_image(job.warped_labels).levels[0].array[:])  # type: ignore[arg-type]
        np.testing.assert_array_equal(warped_labels, warp_to_grid(labels, forward, target, "vote"))


@pytest.mark.usefixtures("prefect_server")
def test_flow_warps_label_maps_by_the_chosen_interpolation(tmp_path: Path) -> None:
    jobs = _jobs(tmp_path)[3:]  # item 4's shift moves 220 voxels' label between vote and nearest
    options = StepOptions(chunk_size=8, label_interpolation="nearest")
    assert jobs[0].key(options) != jobs[0].key(StepOptions(chunk_size=8))  # a finished vote run is not reused
    cluster = ClusterConfig(kind="local", workers=1, threads_per_worker=2, memory_per_worker="2GiB")
    with dask_task_runner(cluster) as runner:
        failures = warp_rounds.with_options(task_runner=runner)(jobs, options, 1)

    assert failures == [[]]
    labels = read_image(jobs[0].moving_labels.path)  # type: ignore[union-attr]
    target = read_image(jobs[0].fixed.path).grid
    differ = 0
    for job in jobs:
        values, grid, _ = read_field(job.field)
        forward = FieldDisplacement(np.asarray(values[:]), grid)
        warped_labels = np.asarray(read_image(job.warped_labels).levels[0].array[:])  # type: ignore[arg-type]
        nearest = warp_to_grid(labels, forward, target, "nearest")
        np.testing.assert_array_equal(warped_labels, nearest)
        differ += np.count_nonzero(nearest != warp_to_grid(labels, forward, target, "vote"))
    assert differ > 0
