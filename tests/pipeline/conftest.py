"""Fixtures of the chunked-pipeline tests (register / warp / resume / cluster)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chunked_helpers import image_pair, tiny_config

from patchmorph_core.config import InferenceConfig
from pipeline.demo import BRAIN_ORIENTATION, BRAIN_VOXEL_SIZE_UM, EXAMPLE_ATLAS, ExampleFiles


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[Any]:
    """A real 2-process ``LocalCluster`` (1 GiB per worker) shared by the chunked tests."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GiB", dashboard_address=":0"
    ) as cluster:
        yield cluster


@pytest.fixture
def dask_scheduler(dask_cluster: Any) -> str:
    """Scheduler address of :func:`dask_cluster`."""
    return str(dask_cluster.scheduler_address)


@pytest.fixture(scope="session")
def pair_and_config(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, InferenceConfig]:
    """Fixed and moving OME-Zarr images and a tiny-model inference config."""
    folder = tmp_path_factory.mktemp("pair")
    fixed, moving = image_pair(folder)
    return fixed, moving, tiny_config(folder)


@pytest.fixture(scope="session")
def atlas_job(tmp_path_factory: pytest.TempPathFactory, examples: Path) -> dict:
    """``patchmorph atlas BRAIN.tif -o OUT --atlas allen_mouse_100um`` with the atlas found by name in
    $BRAINGLOBE_DIR, the brain block-averaged by 3 (150×120×120 µm) and one extra channel."""
    from typer.testing import CliRunner

    from patchmorph.cli import app

    root = tmp_path_factory.mktemp("atlas_job")
    bg_dir = root / "brainglobe"
    shutil.copytree(examples / EXAMPLE_ATLAS, bg_dir / EXAMPLE_ATLAS)
    config = root / "job.yaml"
    config.write_text(
        "brain_downsample: 3\ninference:\n  device: cpu\n  field_spacing: 170um\ncluster:\n  kind: threads\n"
    )
    files = ExampleFiles.from_dir(examples)
    out = root / "out"
    args = [
        "atlas", str(files.brain), "-o", str(out), "--atlas", "allen_mouse_100um",
        "--voxel-size", *map(str, BRAIN_VOXEL_SIZE_UM), "--orientation", BRAIN_ORIENTATION,
        "--channel", str(files.brain), "--config", str(config),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"BRAINGLOBE_DIR": str(bg_dir)})
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output, "files": files}
