"""A real local Prefect server + process worker on a free loopback port with HTTP basic authentication, the
deployments of prefect.yaml, and `prefect deployment run` as a user types it; every process started here
is stopped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from patchmorph.server import LocalPrefect, auth_header, check_port, free_port, prefect_executable
from patchmorph_core.errors import InputError

AUTH = "patchmorph:not-a-real-secret"


@pytest.fixture
def local_prefect(tmp_path: Path) -> Iterator[LocalPrefect]:
    stack = LocalPrefect(port=free_port(), home=tmp_path / "prefect-home", auth=AUTH)
    try:
        stack.start(timeout=180, worker_limit=1)
        yield stack
    finally:
        stack.stop()
        for process in stack.processes:
            assert process.poll() is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _status(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_deployment_run_completes_against_local_server(
    local_prefect: LocalPrefect, flow_data: dict[str, Path], write_options: Callable[..., Path], tmp_path: Path
) -> None:
    deployments = f"{local_prefect.api_url}/deployments/filter"
    assert _status(deployments, {}) == 401  # the API refuses requests without the credentials
    assert _status(deployments, auth_header("patchmorph:wrong")) == 401
    assert _status(deployments, auth_header(AUTH)) == 200
    listed = subprocess.run(
        [prefect_executable(), "deployment", "ls"], env={**local_prefect.env(), "COLUMNS": "250"},
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    for name in ("atlas-to-section/on-demand", "atlas-to-section/nightly-example", "register-pair/on-demand"):
        assert name in listed
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"name,path,voxel_size,orientation\nstp,{flow_data['brain_tif']},200 200 200,psl\n")
    options = write_options(tmp_path / "options.yaml", workers=1)
    out = tmp_path / "out"
    pids = [p.pid for p in local_prefect.processes]

    run = subprocess.run(
        [
            prefect_executable(), "deployment", "run", "atlas-to-section/on-demand",
            "--param", f"atlas={flow_data['atlas']}",
            "--param", f"manifest={manifest}",
            "--param", f"out={out}",
            "--param", f"config={options}",
            "--watch", "--watch-timeout", "400",
        ],
        env=local_prefect.env(), capture_output=True, text=True, timeout=480, check=False,
    )

    assert run.returncode == 0, run.stdout + run.stderr
    assert "Completed" in run.stdout
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["results"]] == ["stp"] and report["errors"] == []
    assert (out / "stp" / "field.ome.zarr").is_dir() and (out / "stp" / "qc" / "overlay.png").is_file()
    local_prefect.stop()
    assert not any(_alive(pid) for pid in pids)


def test_server_port_in_use_or_invalid_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InputError, match=rf"port {port} on 127.0.0.1 is already in use"):
            check_port(port)
    for bad in (-1, 70000):
        with pytest.raises(InputError, match=rf"--port {bad} is invalid"):
            check_port(bad)
    check_port(0)


def test_prefect_yaml_declares_the_deployments() -> None:
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    by_flow = {(d["entrypoint"].split(":")[1], d["name"]) for d in config["deployments"]}
    assert {("atlas_to_section", "on-demand"), ("atlas_to_section", "nightly-example"), ("register_pair", "on-demand")} <= by_flow
    nightly = next(d for d in config["deployments"] if d["name"] == "nightly-example")
    assert nightly["schedules"][0]["cron"] and set(nightly["parameters"]) >= {"atlas", "manifest", "out"}
    for deployment in config["deployments"]:
        assert deployment["work_pool"]["name"] == "patchmorph-local"
