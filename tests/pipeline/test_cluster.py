"""Cluster configs, the SLURM job script without SLURM, and GPU resources that never oversubscribe."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from patchmorph_core.errors import InputError
from pipeline.cluster import (
    WORKER_MALLOC_ENV,
    ClusterConfig,
    check_slurm,
    job_script,
    load_cluster_config,
    network_resources,
    open_client,
    scheduler_client,
    worker_memory,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "cluster"


def test_configs_load_and_resolve() -> None:
    local = load_cluster_config(CONFIGS / "local.yaml", workers=3)
    assert local.kind == "local" and local.workers == 3 and local.memory_per_worker == "2GiB"
    slurm = load_cluster_config(CONFIGS / "slurm.yaml")
    assert slurm.kind == "slurm" and slurm.slurm.jobs == 8
    address = load_cluster_config("tcp://10.0.0.1:8786")
    assert address.kind == "address" and address.address == "tcp://10.0.0.1:8786"
    assert load_cluster_config(None).kind == "threads"  # no cluster unless asked for
    assert load_cluster_config(None, workers=2).model_dump(include={"kind", "workers"}) == {"kind": "local", "workers": 2}
    with pytest.raises(InputError, match="neither a YAML file nor a scheduler address"):
        load_cluster_config("nonsense")
    with pytest.raises(InputError, match="workers"):
        load_cluster_config(None, workers=0)


def test_a_threads_cluster_file_gives_no_client(tmp_path: Path) -> None:
    """A step given a cluster file of kind ``threads`` (a batch's options without a cluster) runs on threads of this
    process, as without a scheduler, instead of refusing the file."""
    threads = tmp_path / "threads.yaml"
    threads.write_text("kind: threads\n")
    for scheduler in (None, str(threads)):
        with scheduler_client(scheduler) as client:
            assert client is None


def test_slurm_job_script_without_slurm() -> None:
    config = load_cluster_config(CONFIGS / "slurm.yaml")
    script = job_script(config)
    assert "#SBATCH" in script and "--cpus-per-task=4" in script and "-t 04:00:00" in script
    assert "gres" not in script and "--resources" not in script
    # the job asks SLURM for its memory (in sbatch's units); its worker's limit leaves room for the nanny and the
    # file cache, so that Dask restarts a worker that grows, before SLURM kills the job
    assert "#SBATCH --mem=16G\n" in script and "--memory-limit 14.40GiB" in script
    small = config.model_copy(update={"slurm": config.slurm.model_copy(update={"memory": "4GB"})})
    assert "--memory-limit 2.73GiB" in job_script(small)
    with pytest.raises(InputError, match="slurm.memory 1GiB is too small"):
        worker_memory("1GiB")
    # SLURM's own form, a bare G, means GiB as sbatch reads it (Dask would read 16 x 10^9 bytes)
    slurm_style = config.model_copy(update={"slurm": config.slurm.model_copy(update={"memory": "16G"})})
    assert "#SBATCH --mem=16G\n" in job_script(slurm_style) and "--memory-limit 14.40GiB" in job_script(slurm_style)
    gpu = job_script(config.model_copy(update={"gpus": 1}))
    assert "#SBATCH --gres=gpu:1" in gpu and "--resources GPU=1" in gpu
    assert all(f"export {k}={v}" in script for k, v in WORKER_MALLOC_ENV.items())  # before the worker starts


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("walltime: 12:00:00", "43200 is a number, not a time limit"),  # YAML's sexagesimal number of seconds
        ("walltime: 12h", "'12h' is not a time limit sbatch reads"),
        ("memory: 64", "64 has no unit"),
    ],
)
def test_slurm_times_and_memory_are_what_sbatch_reads(tmp_path: Path, line: str, message: str) -> None:
    key = line.split(":")[0]
    text = (CONFIGS / "slurm.yaml").read_text()
    written = "\n".join(f"  {line}" if row.strip().startswith(f"{key}:") else row for row in text.splitlines())
    (tmp_path / "lab.yaml").write_text(written)
    with pytest.raises(InputError, match=f"slurm.{key}.*{message}"):
        load_cluster_config(tmp_path / "lab.yaml")
    # SLURM's own forms are taken as written
    for walltime in ("04:00:00", "1-12", "2-00:30:00", "90"):
        (tmp_path / "ok.yaml").write_text(text.replace('"04:00:00"', f'"{walltime}"'))
        assert f"#SBATCH -t {walltime}\n" in job_script(load_cluster_config(tmp_path / "ok.yaml"))


def _malloc_environ() -> dict[str, str | None]:
    import os

    return {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}


def test_local_workers_start_with_the_malloc_environment() -> None:
    """Worker processes of a local cluster see :data:`WORKER_MALLOC_ENV` from their start (glibc reads it when
    the process starts: set later it does nothing), beside Dask's own trim threshold."""
    with open_client(ClusterConfig(workers=1, memory_per_worker="1GiB")) as (client, _):
        seen = client.run(_malloc_environ)
    assert len(seen) == 1
    for environ in seen.values():
        assert environ["MALLOC_MMAP_THRESHOLD_"] == WORKER_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
        assert environ["MALLOC_TRIM_THRESHOLD_"] is not None  # Dask's pre-spawn environment is kept


def _busy(seconds: float) -> tuple[str, float, float]:
    from distributed import get_worker

    start = time.monotonic()
    time.sleep(seconds)
    return get_worker().address, start, time.monotonic()


def test_gpu_resource_never_oversubscribes(caplog: pytest.LogCaptureFixture) -> None:
    """Two 'GPU' workers with two threads each: network tasks run one at a time per worker; on a machine with fewer
    GPUs than asked for, a warning says the networks run on the CPU."""
    import torch

    config = ClusterConfig(gpus=2, threads_per_worker=2, processes=False)
    with caplog.at_level("WARNING", logger="pipeline.cluster"), open_client(config) as (client, info):
        assert ("asks for 2 GPUs but this machine shows" in caplog.text) == (torch.cuda.device_count() < 2)
        assert info.gpu and info.workers == 2
        resources = network_resources(info)
        assert resources == {"GPU": 1}
        futures = [client.submit(_busy, 0.3, pure=False, resources=resources) for _ in range(6)]
        spans = client.gather(futures)
        free = [client.submit(_busy, 0.3, pure=False) for _ in range(4)]
        free_spans = client.gather(free)
    for worker in {s[0] for s in spans}:
        mine = sorted((a, b) for w, a, b in spans if w == worker)
        assert all(later[0] >= earlier[1] - 1e-3 for earlier, later in zip(mine, mine[1:], strict=False))
    overlaps = [
        (a1 < b2 and a2 < b1)
        for w1, a1, b1 in free_spans
        for w2, a2, b2 in free_spans
        if w1 == w2 and a1 != a2
    ]
    assert any(overlaps)  # without the resource the same workers do run two tasks at once
    assert network_resources(info.__class__("local", "", 1, gpu=False)) is None


def fake_sbatch(folder: Path, refusal: str | None) -> Path:
    """An ``sbatch`` that records its arguments and refuses every job with ``refusal`` (None: accepts them)."""
    folder.mkdir(exist_ok=True)
    script = folder / "sbatch"
    answer = f'echo "{refusal}" >&2; exit 1' if refusal else 'echo "sbatch: Job 1 to start at now" >&2'
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder}/calls"\n{answer}\n')
    script.chmod(0o755)
    return folder


def test_a_worker_job_slurm_refuses_is_named_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_cluster_config(CONFIGS / "slurm.yaml")
    refusal = "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified"
    bin_ = fake_sbatch(tmp_path / "refusing", refusal)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    with pytest.raises(InputError, match="SLURM refuses the worker job .*Invalid account"):
        check_slurm(config)
    with pytest.raises(InputError, match="Invalid account"), open_client(config):
        pass
    assert all(call.startswith("--test-only ") for call in (bin_ / "calls").read_text().splitlines())  # none submitted
    accepting = fake_sbatch(tmp_path / "accepting", None)
    monkeypatch.setenv("PATH", f"{accepting}:{os.environ['PATH']}")
    check_slurm(config)
    check_slurm(load_cluster_config(CONFIGS / "local.yaml"))  # other kinds need no SLURM


def test_slurm_without_sbatch_fails_fast() -> None:
    config = load_cluster_config(CONFIGS / "slurm.yaml")
    if shutil.which("sbatch") is not None:
        pytest.skip("this machine has SLURM")
    with pytest.raises(InputError, match="sbatch"), open_client(config):
        pass
