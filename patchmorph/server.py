"""``patchmorph server``: a local Prefect server, the deployments of ``prefect.yaml`` and a worker.

The server listens on 127.0.0.1 only and keeps its embedded SQLite database under a project-local
``PREFECT_HOME`` (default ``.prefect/``); analytics are off (:mod:`flows.settings`). The command
creates the process work pool, registers every deployment of ``prefect.yaml`` (``prefect deploy
--all``, run from the project folder, so flow runs start there) and starts a worker, prints the
``PREFECT_API_URL`` to export, and stops everything on Ctrl-C. Then, in another shell::

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    prefect deployment run 'atlas-to-section/on-demand' --param atlas=... --param manifest=... --param out=...

**What the API exposes.** Anyone who can reach the API can read every flow run, its parameters, logs and
artifacts, and start any deployment with any parameters (reading and writing files as the worker's user).
It listens on 127.0.0.1, so that means every user and process of this machine. ``--auth-file FILE`` (a
file holding ``user:password``; or ``PREFECT_SERVER_API_AUTH_STRING`` in the environment) turns on
Prefect's own HTTP basic authentication: the server refuses requests without it, and clients send it
from ``PREFECT_API_AUTH_STRING``.

On an HPC site the same pieces are spread out: the server on a node the compute nodes can reach (with
Postgres instead of SQLite when many workers write), ``PREFECT_API_URL`` pointing at it, a worker (or
the flows' Dask cluster, ``configs/cluster/slurm.yaml``) in SLURM jobs.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import typer

from flows.settings import LOOPBACK, api_url, offline_environment
from patchmorph.app import command
from patchmorph_core.errors import InputError

logger = logging.getLogger(__name__)

WORK_POOL = "patchmorph-local"
"""Name of the process work pool the deployments in ``prefect.yaml`` use."""

PROJECT_DIR = Path(__file__).resolve().parents[1]
"""The folder holding ``prefect.yaml`` (deployments run from here)."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def prefect_executable() -> str:
    """The ``prefect`` command of this Python environment."""
    candidate = Path(sys.executable).with_name("prefect")
    return str(candidate) if candidate.exists() else "prefect"


AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"
"""Prefect's server setting for HTTP basic authentication (``user:password``)."""

CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"
"""The matching client setting (CLI calls, the worker and flow runs send it)."""


def check_port(port: int, host: str = LOOPBACK) -> None:
    """Refuse a port outside 0..65535 or one that another process already listens on at ``host``.

    Raises:
        InputError: the port is invalid or in use (0 asks for a free port and is always accepted).
    """
    if not 0 <= port <= 65535:
        raise InputError(f"--port {port} is invalid: give a TCP port from 1 to 65535 (0: a free port).")
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            raise InputError(
                f"port {port} on {host} is already in use (another Prefect server?): pass --port 0 for a free "
                "port, or stop the process that holds it."
            ) from err


def read_auth_file(path: Path) -> str:
    """The ``user:password`` string of an auth file (first line).

    Raises:
        InputError: the file is missing or its first line is not ``user:password``.
    """
    if not path.is_file():
        raise InputError(f"auth file {path} does not exist: write 'user:password' into it (chmod 600).")
    text = path.read_text().strip().splitlines()
    value = text[0].strip() if text else ""
    user, sep, password = value.partition(":")
    if not (user and sep and password):
        raise InputError(f"auth file {path} must hold one line 'user:password' (neither part empty).")
    return value


def auth_header(auth: str | None) -> dict[str, str]:
    """The HTTP basic ``Authorization`` header for ``user:password`` (empty without auth)."""
    if not auth:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def wait_for_api(
    url: str, timeout: float, process: subprocess.Popen[bytes] | None = None, auth: str | None = None
) -> None:
    """Poll ``<url>/health`` until the server answers (sending ``auth`` when given).

    Raises:
        RuntimeError: the server did not answer within ``timeout`` seconds, or its process exited.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {process.returncode} before answering")
        try:
            request = urllib.request.Request(f"{url}/health", headers=auth_header(auth))
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server at {url} did not answer within {timeout:.0f} s")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Stop a process started with ``start_new_session=True`` and every child in its group."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, timeout / 2), (signal.SIGTERM, timeout / 2), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # children that outlived the group leader (e.g. a flow run) share its group id
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class LocalPrefect:
    """A local Prefect server + worker for this project; every process runs in its own process group.

    Attributes:
        port: loopback port of the API.
        home: ``PREFECT_HOME`` (SQLite database, logs).
        project_dir: folder of ``prefect.yaml``; deployments and flow runs work from here.
        pool: process work pool name.
        log_dir: where the server's and worker's output go (default ``home/logs``).
        auth: ``user:password`` for Prefect's HTTP basic authentication, or None (none).
    """

    port: int
    home: Path
    project_dir: Path = PROJECT_DIR
    pool: str = WORK_POOL
    log_dir: Path | None = None
    auth: str | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        """The ``PREFECT_API_URL`` clients use."""
        return api_url(self.port)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Offline-safe environment of the server, the CLI calls and the worker."""
        env = offline_environment(prefect_home=self.home, api_url=self.api_url)
        env["PREFECT_SERVER_API_PORT"] = str(self.port)
        env.pop(AUTH_ENV, None)
        env.pop(CLIENT_AUTH_ENV, None)
        if self.auth:
            env[AUTH_ENV] = env[CLIENT_AUTH_ENV] = self.auth
        env.update(extra or {})
        return env

    def logs_dir(self) -> Path:
        """Folder of the server and worker logs (created)."""
        folder = self.log_dir or (self.home / "logs")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        log = (self.logs_dir() / f"{name}.log").open("ab")
        process = subprocess.Popen(
            list(args), cwd=self.project_dir, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        logger.info("started %s (pid %d), log %s", name, process.pid, self.logs_dir() / f"{name}.log")
        return process

    def run_cli(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        """Run ``prefect <args>`` against this server from the project folder.

        Raises:
            RuntimeError: the command failed (its output is in the message).
        """
        result = subprocess.run(
            [prefect_executable(), *args], cwd=self.project_dir, env=self.env(), capture_output=True, text=True,
            timeout=timeout, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def start_server(self, timeout: float = 120.0) -> None:
        """Start ``prefect server start`` on 127.0.0.1 and wait until its API answers."""
        self.home.mkdir(parents=True, exist_ok=True)
        process = self._spawn(
            "server",
            [prefect_executable(), "server", "start", "--host", LOOPBACK, "--port", str(self.port), "--analytics-off"],
        )
        wait_for_api(self.api_url, timeout, process, self.auth)

    def deploy(self) -> None:
        """Create the process work pool and register every deployment of ``prefect.yaml``."""
        self.run_cli("work-pool", "create", self.pool, "--type", "process", "--overwrite")
        self.run_cli("--no-prompt", "deploy", "--all", "--prefect-file", str(self.project_dir / "prefect.yaml"))

    def start_worker(self, limit: int = 2) -> None:
        """Start a process worker polling the work pool (at most ``limit`` concurrent flow runs)."""
        self._spawn(
            "worker",
            [prefect_executable(), "worker", "start", "--pool", self.pool, "--type", "process", "--limit", str(limit)],
        )

    def start(self, timeout: float = 120.0, worker_limit: int = 2) -> None:
        """Server, deployments and worker; on any failure everything started so far is stopped."""
        try:
            self.start_server(timeout)
            self.deploy()
            self.start_worker(worker_limit)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the worker and the server (newest first), including their child processes."""
        while self.processes:
            stop_process(self.processes.pop())

    def wait(self) -> int:
        """Block until one of the processes exits; returns its exit code."""
        while True:
            for process in self.processes:
                code = process.poll()
                if code is not None:
                    return code
            time.sleep(1.0)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@command
def server(
    port: int = typer.Option(4200, help="Loopback port of the Prefect API (0: a free port)."),
    home: Path = typer.Option(Path(".prefect"), help="PREFECT_HOME: the SQLite database and logs live here."),
    worker_limit: int = typer.Option(2, help="Flow runs the worker runs at once."),
    auth_file: Path | None = typer.Option(
        None,
        help="File holding 'user:password': the API then requires HTTP basic auth (Prefect's "
        "PREFECT_SERVER_API_AUTH_STRING, also read from the environment).",
    ),
) -> None:
    """Start a local Prefect server (127.0.0.1, SQLite), deploy prefect.yaml and start a worker; Ctrl-C stops."""
    if not (PROJECT_DIR / "prefect.yaml").is_file():
        raise InputError(f"{PROJECT_DIR / 'prefect.yaml'} is missing: run from a PatchMorph checkout.")
    if worker_limit < 1:
        raise InputError(f"--worker-limit {worker_limit} is invalid: give a positive number of flow runs.")
    check_port(port)
    auth = read_auth_file(auth_file) if auth_file is not None else os.environ.get(AUTH_ENV) or None
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    signal.signal(signal.SIGTERM, _interrupt)  # scancel / kill: stop the children too
    stack = LocalPrefect(port=port or free_port(), home=home.resolve(), auth=auth)
    typer.echo(f"starting Prefect server on {stack.api_url} (PREFECT_HOME={stack.home}) ...")
    stack.start(worker_limit=worker_limit)
    login = (
        f"  export {CLIENT_AUTH_ENV}='<user:password of {auth_file or AUTH_ENV}>'\n"
        if auth
        else "  (no authentication: every local user can use this API; see --auth-file)\n"
    )
    typer.echo(
        f"ready: deployments of prefect.yaml registered, worker on pool {stack.pool!r}; logs in {stack.logs_dir()}\n"
        f"use it from another shell with:\n  export PREFECT_API_URL={stack.api_url}\n{login}"
        "  prefect deployment run 'atlas-to-section/on-demand' --param atlas=... --param manifest=... "
        "--param out=...\nCtrl-C stops the server and the worker."
    )
    try:
        code = stack.wait()
        typer.echo(f"a Prefect process exited with code {code}; stopping", err=True)
    except KeyboardInterrupt:
        typer.echo("stopping the Prefect worker and server ...")
    finally:
        stack.stop()
