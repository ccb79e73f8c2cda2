"""Fixtures of the flow tests: small real data, a tiny model, one Prefect test server per session."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from flows.settings import apply_offline_defaults
from patchmorph_core.config import ModelConfig
from patchmorph_core.model import DEFAULT_WEIGHTS, PatchMorph, save_checkpoint
from patchmorph_core.source import downsample, downsampled_grid
from pipeline.importers import load_nrrd
from pipeline.ngff import write_image

DATA = Path(__file__).resolve().parents[2] / "examples"
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """Every flow test of the session runs against one temporary Prefect server (SQLite)."""
    apply_offline_defaults()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def flow_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small real inputs in the formats users hold.

    * ``atlas``: the Allen CCFv3 template (NRRD, 100 um) downsampled x2 to 200 um, OME-Zarr with the
      ``rsa`` orientation (brainglobe "asr" in file order); ``atlas_labels``: its annotation taken at every 2nd voxel (same grid).
    * ``brain_tif``: the brainreg STP brain (50 x 40 x 40 um, ``psl``) block-averaged x(4, 5, 5) to
      200 um, as a TIFF stack (needs voxel size and orientation, so the flow converts it).
    """
    root = tmp_path_factory.mktemp("flow_data")
    template, grid = load_nrrd(DATA / "mouse_ccf" / "average_template_100.nrrd", orientation="rsa")
    labels, _ = load_nrrd(DATA / "mouse_ccf" / "annotation_100um_2017_nearest_from25um.nrrd", orientation="rsa")
    small = downsample(template, (2, 2, 2))
    small_grid = downsampled_grid(grid, (2, 2, 2), small.shape)
    small_labels = downsample(labels, (2, 2, 2), labels=True)
    brain = tifffile.imread(DATA / "mouse_stp_brainreg" / "brain_50x40x40um_psl.tif").astype(np.float32)
    brain_small = downsample(brain, (4, 5, 5)).astype(np.uint16)
    brain_tif = root / "brain_200um_psl.tif"
    tifffile.imwrite(brain_tif, brain_small)
    return {
        "atlas": write_image(root / "atlas.ome.zarr", small, small_grid),
        "atlas_labels": write_image(root / "atlas_labels.ome.zarr", small_labels, small_grid, labels=True),
        "brain_tif": brain_tif,
        "root": root,
    }


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed default model when it exists, else a tiny randomly initialised one (flow wiring only)."""
    if DEFAULT_WEIGHTS.is_file():
        return DEFAULT_WEIGHTS
    torch.manual_seed(0)
    model = PatchMorph(ModelConfig(patch_size=16, n_stages=2, widths=(4, 8), affine_widths=(4, 8)))
    return save_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt", model)


@pytest.fixture(scope="session")
def write_options(weights: Path) -> Callable[..., Path]:
    """Writer of flow options YAMLs for the tests: small inference, a local cluster of ``workers`` worker
    processes (tasks and their parameters cross process boundaries as in a user's run), fast retries."""
    return functools.partial(_write_options, weights=weights)


def _write_options(path: Path, weights: Path, workers: int = 2, **extra: object) -> Path:
    cluster = {"kind": "local", "workers": workers, "threads_per_worker": 1, "memory_per_worker": "3GiB"}
    options = {
        "inference": {"weights": str(weights), "device": "cpu", "batch_size": 8, "overlap": 1.0, "max_rotation_deg": 0},
        "cluster": cluster,
        "register_cluster": str(CONFIG_DIR / "flows" / "task_cluster.yaml"),
        "retries": 1,
        "retry_delay_seconds": 0,
        **extra,
    }
    path.write_text(yaml.safe_dump(options))
    return path


@pytest.fixture(autouse=True)
def _quiet_torch_threads() -> None:
    """Keep torch to one thread per process: 2 shared cores, several Dask workers."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
