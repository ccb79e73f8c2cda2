"""Where chunked runs execute: threads of this process, a local Dask cluster, a running scheduler, or SLURM.

``--scheduler`` takes an address (``tcp://host:8786``) or a YAML file mapping onto :class:`ClusterConfig`
(``configs/cluster/local.yaml``, ``configs/cluster/slurm.yaml``); ``--workers N`` asks for a local cluster of
``N`` worker processes. Without either, a run uses threads of its own process (``kind: threads``,
:class:`~pipeline.executor.ThreadExecutor`): no worker process to start, stop or fill with imports.
Nothing is chosen at import time: the executor exists only inside :func:`open_executor`.

GPU workers: with ``gpus > 0`` every worker owns exactly one GPU and advertises the Dask resource
``GPU=1`` (:data:`GPU_RESOURCE`); network tasks are submitted with ``resources={"GPU": 1}``
(:func:`network_resources`), so a worker never runs two forward passes on its GPU at once while I/O and
reduction tasks still use every thread. On SLURM one job = one worker = one GPU (``--gres=gpu:1``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from patchmorph_core.config import load_yaml
from patchmorph_core.errors import InputError
from pipeline.executor import DaskExecutor, Executor, machine_cores, thread_executor

log = logging.getLogger(__name__)

GPU_RESOURCE = "GPU"
"""Name of the Dask worker resource that stands for one GPU."""

LOOPBACK = "127.0.0.1"
"""The only interface a local cluster listens on (scheduler, workers, dashboards)."""

WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(16 * 1024**2)}
"""Environment of every worker process (local: set before the nanny spawns it; SLURM: exported by the job
script): glibc serves allocations below 16 MiB from its heap instead of a fresh ``mmap`` each. The tasks allocate
and free arrays of a few MB many times (the polish's steps, the chunk tasks' integration), and Dask's worker
environment (``MALLOC_TRIM_THRESHOLD_``, which also fixes glibc's otherwise adaptive mmap threshold at 128 kB)
makes each such array a new mapping whose pages are faulted in and zeroed again. A much higher threshold saves a
little more CPU but keeps freed heap memory with the process (measured in ``docs/scale.md``)."""


class SlurmConfig(BaseModel):
    """Options of ``dask_jobqueue.SLURMCluster`` (one job = one worker process).

    Attributes:
        queue: SLURM partition.
        account: account to charge (``--account``).
        cores: CPU cores per job (= threads of its worker).
        memory: memory per job, e.g. ``"16GiB"`` (``--mem``; its worker's limit is a little less: :func:`worker_memory`).
        walltime: job time limit ``HH:MM:SS``.
        jobs: number of jobs (workers) to start.
        job_extra_directives: extra ``#SBATCH`` lines, e.g. ``["--constraint=skylake"]``.
        job_script_prologue: shell lines run before the worker starts (module loads, venv activation).
        local_directory: worker scratch folder on the node.
        python: python executable on the nodes (default: this one).
    """

    model_config = ConfigDict(extra="forbid")

    queue: str | None = None
    account: str | None = None
    cores: int = Field(4, ge=1)
    memory: str = "16GiB"
    walltime: str = "04:00:00"
    jobs: int = Field(4, ge=1)
    job_extra_directives: tuple[str, ...] = ()
    job_script_prologue: tuple[str, ...] = ()
    local_directory: str | None = None
    python: str | None = None

    @field_validator("memory", mode="before")
    @classmethod
    def _memory_with_unit(cls, memory: Any) -> Any:
        if isinstance(memory, int | float) and not isinstance(memory, bool):
            raise ValueError(f"{memory} has no unit: give the job's memory with one, e.g. 16GiB")
        return memory

    @field_validator("memory")
    @classmethod
    def _worker_fits(cls, memory: str) -> str:
        worker_memory(memory)  # a size that leaves its worker room: checked when the file is read
        return memory

    @field_validator("walltime", mode="before")
    @classmethod
    def _walltime_as_slurm_reads_it(cls, walltime: Any) -> Any:
        return slurm_walltime(walltime)


class ClusterConfig(BaseModel):
    """Where chunked work runs (YAML files in ``configs/cluster/``).

    Attributes:
        kind: ``"threads"`` (a thread pool in this process, no Dask), ``"local"`` (a
            ``distributed.LocalCluster`` on this machine), ``"address"`` (connect to the running scheduler
            at ``address``) or ``"slurm"``.
        address: scheduler address for ``kind="address"``.
        workers: local worker processes (None: fit the machine, see :func:`default_workers`).
        threads_per_worker: threads per local worker.
        memory_per_worker: memory limit per local worker, e.g. ``"2GiB"`` (None: share of the machine).
        processes: local workers are processes (True) or threads of this process (False).
        gpus: GPUs to use; each gets its own worker with resource ``GPU=1`` (0: CPU only).
        dashboard_address: where the dashboard listens (``"127.0.0.1:0"``: loopback, a free port; an
            address without host, ``":8787"``, is made loopback too, :func:`loopback_unless_named`).
        slurm: SLURM options for ``kind="slurm"``.
        threads: threads of ``kind="threads"`` (None: one per core).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["threads", "local", "address", "slurm"] = "local"
    address: str | None = None
    workers: int | None = Field(None, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_per_worker: str | None = None
    processes: bool = True
    gpus: int = Field(0, ge=0)
    dashboard_address: str = f"{LOOPBACK}:0"
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    threads: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class ClusterInfo:
    """What a run is connected to.

    Attributes:
        kind: cluster kind.
        dashboard: dashboard URL (may be empty when the scheduler has none).
        workers: number of workers at start.
        gpu: network tasks must carry ``resources={"GPU": 1}``.
    """

    kind: str
    dashboard: str
    workers: int
    gpu: bool


def default_workers(memory_per_worker_bytes: int = 2 * 1024**3) -> int:
    """Local workers that fit the machine: one per core, at most one per ``memory_per_worker_bytes`` of RAM."""
    import psutil  # here: a run on threads of this process never sizes a cluster

    cores = machine_cores()
    by_memory = max(1, int(psutil.virtual_memory().available // memory_per_worker_bytes))
    return max(1, min(cores, by_memory))


def load_cluster_config(scheduler: str | Path | None, workers: int | None = None) -> ClusterConfig:
    """Resolve ``--scheduler`` / ``--workers`` into a :class:`ClusterConfig`.

    Args:
        scheduler: None (threads of this process, or a local cluster when ``workers`` is given), a YAML
            path (``*.yaml``/``*.yml``) or a scheduler address.
        workers: local worker processes (with ``scheduler`` None: asks for a local Dask cluster).

    Raises:
        InputError: the YAML file is missing or invalid, or ``workers`` is not positive.
    """
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers} is invalid: give a positive number of worker processes.")
    if scheduler is None:
        config = ClusterConfig(kind="threads" if workers is None else "local")
    elif str(scheduler).endswith((".yaml", ".yml")):
        config = load_yaml(scheduler, ClusterConfig)
    else:
        address = str(scheduler)
        if "://" not in address and ":" not in address:
            raise InputError(
                f"--scheduler {address!r} is neither a YAML file nor a scheduler address: give e.g. "
                "tcp://host:8786 or configs/cluster/slurm.yaml."
            )
        config = ClusterConfig(kind="address", address=address)
    if workers is not None and config.kind != "threads":
        config = config.model_copy(update={"workers": workers})
    return config


def loopback_unless_named(address: str) -> str:
    """A listening address with no host (``":8787"``, which Dask binds on every interface) made loopback-only
    (``"127.0.0.1:8787"``); an address that names its host (``"0.0.0.0:8787"``) is kept as asked."""
    return f"{LOOPBACK}{address}" if address.startswith(":") else address


def _local_cluster(config: ClusterConfig) -> Any:
    """Start a ``LocalCluster`` from ``config`` (GPU: one worker per GPU with resource ``GPU=1``)."""
    import dask
    import psutil
    from distributed import LocalCluster

    n_workers = config.gpus or config.workers or default_workers()
    memory = config.memory_per_worker
    if memory is None:
        share = psutil.virtual_memory().total // max(n_workers, 1)
        memory = str(int(min(share, 4 * 1024**3)))
    kwargs: dict[str, Any] = {
        "n_workers": n_workers,
        "threads_per_worker": config.threads_per_worker,
        "processes": config.processes,
        "memory_limit": memory,
        "dashboard_address": loopback_unless_named(config.dashboard_address),
        "worker_dashboard_address": f"{LOOPBACK}:0",
    }
    if config.processes:
        kwargs["host"] = LOOPBACK  # threads talk in-process (inproc://) and need no host
    if config.gpus:
        kwargs["resources"] = {GPU_RESOURCE: 1}
        import torch

        if torch.cuda.device_count() < config.gpus:
            log.warning(
                "the cluster file asks for %d GPUs but this machine shows %d CUDA GPUs: workers without one run the "
                "networks on the CPU (check the CUDA build of torch and CUDA_VISIBLE_DEVICES)",
                config.gpus, torch.cuda.device_count(),
            )  # fmt: skip
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", default={}), **WORKER_MALLOC_ENV}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):  # read by each nanny as it starts
        return LocalCluster(**kwargs)


JOB_MEMORY_RESERVE = 0.1, 1024**3
"""Share of a SLURM job's memory (at least the bytes) that its worker's memory limit leaves out (:func:`worker_memory`)."""


def slurm_bytes(memory: str) -> int:
    """Bytes of a memory size as SLURM reads ``--mem``: a bare K, M, G or T suffix (``16G``) in units of 1024, as
    SLURM means them; other forms (``16GiB``, ``16GB``) as Dask reads them.

    Raises:
        ValueError: not a size.
    """
    from dask.utils import parse_bytes

    bare = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])\s*", str(memory), flags=re.IGNORECASE)
    if bare:
        return int(float(bare.group(1)) * 1024 ** ("KMGT".index(bare.group(2).upper()) + 1))
    return int(parse_bytes(memory))


SLURM_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d+(:\d{1,2}){0,2}")
"""The forms of sbatch's ``--time``: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
days-hours:minutes and days-hours:minutes:seconds."""


def slurm_walltime(walltime: Any) -> str:
    """``walltime`` as a SLURM job's time limit (``--time``), checked before any job is submitted.

    Raises:
        ValueError: a number (YAML reads ``12:00:00`` without quotes as the number of seconds 43200), or a text
            that sbatch would refuse (``12h``).
    """
    if isinstance(walltime, int | float) and not isinstance(walltime, bool):
        raise ValueError(
            f"{walltime} is a number, not a time limit (YAML reads 12:00:00 without quotes as seconds): write it in "
            'quotes as SLURM does, e.g. "12:00:00"'
        )
    if not isinstance(walltime, str) or not SLURM_TIME.fullmatch(walltime.strip()):
        raise ValueError(f"{walltime!r} is not a time limit sbatch reads: give HH:MM:SS or D-HH:MM:SS, e.g. \"12:00:00\"")
    return walltime.strip()


def worker_memory(job_memory: str) -> int:
    """The memory limit (bytes) of the worker of a SLURM job with ``job_memory`` (e.g. ``"16GiB"``): the job's
    memory less :data:`JOB_MEMORY_RESERVE` for the nanny process and what else SLURM counts against the job (the
    file cache of the chunks it writes), so that Dask restarts a worker that grows too large, and the run names the
    cause, before SLURM kills the whole job.

    Raises:
        InputError: the memory is not a size, or too small to leave the worker anything.
    """
    try:
        total = slurm_bytes(job_memory)
    except (ValueError, TypeError) as err:
        raise InputError(f"slurm.memory {job_memory!r} is not a size: give it as e.g. 16GiB.") from err
    share, least = JOB_MEMORY_RESERVE
    limit = total - max(int(share * total), least)
    if limit < least:
        raise InputError(f"slurm.memory {job_memory} is too small for a worker: give at least 2GiB.")
    return limit


def slurm_cluster(config: ClusterConfig) -> Any:
    """A ``dask_jobqueue.SLURMCluster`` built from ``config.slurm`` (no job is submitted until scaled)."""
    from dask_jobqueue import SLURMCluster
    from dask_jobqueue.slurm import slurm_format_bytes_ceil

    s = config.slurm
    directives = list(s.job_extra_directives)
    worker_args: list[str] = []
    if config.gpus:
        directives.append("--gres=gpu:1")
        worker_args = ["--resources", f"{GPU_RESOURCE}=1"]
    kwargs: dict[str, Any] = {
        "queue": s.queue,
        "account": s.account,
        "cores": s.cores,
        "processes": 1,
        "memory": str(worker_memory(s.memory)),  # the worker's limit; the job asks SLURM for all of s.memory
        "job_mem": slurm_format_bytes_ceil(slurm_bytes(s.memory)),  # as sbatch --mem reads it (16G)
        "walltime": s.walltime,
        "job_extra_directives": directives,
        "job_script_prologue": [*s.job_script_prologue, *(f"export {k}={v}" for k, v in WORKER_MALLOC_ENV.items())],
        "worker_extra_args": worker_args,
        "scheduler_options": {"dashboard_address": loopback_unless_named(config.dashboard_address)},
    }
    if s.local_directory:
        kwargs["local_directory"] = s.local_directory
    if s.python:
        kwargs["python"] = s.python
    return SLURMCluster(**kwargs)


def job_script(config: ClusterConfig) -> str:
    """The batch script one SLURM worker job would run (works without SLURM installed)."""
    cluster = slurm_cluster(config)
    try:
        return str(cluster.job_script())
    finally:
        cluster.close()


def check_slurm(config: ClusterConfig) -> None:
    """Refuse a SLURM cluster that cannot start, before any work: no ``sbatch`` on this machine, or a worker job
    that SLURM refuses (``sbatch --test-only`` on its job script, which submits nothing: a wrong partition,
    account, GPU request, time limit or memory), with SLURM's own reason. Otherwise dask-jobqueue logs each refused
    submission as a traceback and the run stops at its first chunked step with no worker to run it.

    Raises:
        InputError: as above; nothing for a cluster of another kind.
    """
    if config.kind != "slurm":
        return
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise InputError(
            "cluster kind 'slurm' needs SLURM's sbatch, which is not on this machine: run on a SLURM login "
            "node, or pass --scheduler with a running scheduler's address."
        )
    with tempfile.TemporaryDirectory(prefix="patchmorph-slurm-") as folder:
        script = Path(folder) / "worker.sh"
        script.write_text(job_script(config))
        try:
            tested = subprocess.run([sbatch, "--test-only", str(script)], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            log.warning("sbatch --test-only did not answer in 60 s: the worker jobs are submitted unchecked")
            return
    if tested.returncode != 0:
        said = (tested.stderr.strip() or tested.stdout.strip() or f"exit code {tested.returncode}").splitlines()[-1]
        raise InputError(
            f"SLURM refuses the worker job of the cluster file ({said}): fix slurm.queue, slurm.account, gpus, "
            "slurm.walltime or slurm.memory there ('patchmorph cluster-script FILE' prints the job script)."
        )


@contextlib.contextmanager
def open_client(config: ClusterConfig) -> Iterator[tuple[Any, ClusterInfo]]:
    """Connect a ``distributed.Client`` as ``config`` says; closes what it started on exit.

    The client is never the process-wide default (``set_as_default=False``): two runs in threads of one
    process (a flow's image and label warps) each keep their own cluster, and work is sent to it explicitly
    (``client.submit``, ``finish_image(..., client=client)``), never through Dask's global scheduler setting.

    Yields:
        ``(client, info)``; ``info.dashboard`` is the address the dashboard is bound to.
    """
    from distributed import Client

    cluster: Any = None
    if config.kind == "threads":
        raise InputError("cluster kind 'threads' runs without Dask: give a local, address or slurm cluster here.")
    if config.kind == "address":
        if not config.address:
            raise InputError("cluster config kind 'address' needs an address: set address: tcp://host:8786.")
        try:
            client = Client(config.address, timeout="20s", set_as_default=False)
        except OSError as err:
            raise InputError(
                f"cannot reach the Dask scheduler at {config.address} ({err}): start it or fix --scheduler."
            ) from err
    elif config.kind == "slurm":
        check_slurm(config)
        cluster = slurm_cluster(config)
        cluster.scale(jobs=config.slurm.jobs)
        client = Client(cluster, set_as_default=False)
    else:
        cluster = _local_cluster(config)
        client = Client(cluster, set_as_default=False)
    try:
        scheduler = client.scheduler_info(n_workers=-1)
        workers = len(scheduler.get("workers", {}))
        dashboard = str(client.dashboard_link or "")
        port = scheduler.get("services", {}).get("dashboard")
        if config.kind == "local" and port:  # the link's host is a guess; the bound host is the configured one
            host = loopback_unless_named(config.dashboard_address).rpartition(":")[0] or LOOPBACK
            dashboard = f"http://{host}:{port}/status"
        info = ClusterInfo(config.kind, dashboard, workers, gpu=config.gpus > 0)
        log.info("Dask dashboard: %s (%d workers)", info.dashboard or "none", workers)
        yield client, info
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextlib.contextmanager
def scheduler_client(scheduler: str | None) -> Iterator[Any]:
    """A ``distributed.Client`` of the cluster at ``scheduler`` (an address or a cluster YAML, as ``--scheduler``
    takes; closed on exit, with the cluster if it started one), or None for threads of this process (``scheduler``
    None, or a cluster YAML of kind ``threads``, as a batch's options may give)."""
    config = None if scheduler is None else load_cluster_config(scheduler)
    if config is None or config.kind == "threads":
        yield None
        return
    with open_client(config) as (client, _):
        yield client


@contextlib.contextmanager
def open_executor(config: ClusterConfig) -> Iterator[Executor]:
    """The :class:`~pipeline.executor.Executor` ``config`` describes (threads of this process, or a client of
    the Dask cluster :func:`open_client` connects); closes what it started on exit."""
    if config.kind == "threads":
        with thread_executor(config.threads) as executor:
            yield executor
        return
    with open_client(config) as (client, info):
        yield DaskExecutor(client, info.kind, info.dashboard, info.gpu)


def network_resources(info: ClusterInfo | Executor) -> dict[str, float] | None:
    """Resources to annotate network (forward-pass) tasks with: ``{"GPU": 1}`` on GPU clusters, else None."""
    return {GPU_RESOURCE: 1} if info.gpu else None
