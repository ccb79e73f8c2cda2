"""Fixtures of the chunked-pipeline tests (register / warp / resume / cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chunked_helpers import image_pair, tiny_config

from patchmorph_core.config import InferenceConfig


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
