"""No listener beyond 127.0.0.1 unless asked: a local Dask cluster's scheduler, workers and dashboards bind to
the loopback interface, and the dashboard address the commands print is the one bound (checked on the real
sockets of this process and its worker processes)."""

from __future__ import annotations

from urllib.parse import urlparse

import psutil
import pytest

from pipeline.cluster import ClusterConfig, loopback_unless_named, open_client


def _listening() -> list[tuple[str, int]]:
    """``(address, port)`` of every listening TCP socket of this process and its children."""
    me = psutil.Process()
    out = []
    for process in [me, *me.children(recursive=True)]:
        for conn in process.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                out.append((conn.laddr.ip, conn.laddr.port))
    return out


@pytest.mark.parametrize("dashboard", ["127.0.0.1:0", ":0"])  # ':0' is Dask's 'every interface'
@pytest.mark.parametrize("processes", [True, False])
def test_local_cluster_listens_on_loopback_only(dashboard: str, processes: bool) -> None:
    before = set(_listening())
    config = ClusterConfig(kind="local", workers=1, processes=processes, dashboard_address=dashboard)
    with open_client(config) as (_, info):
        opened = [s for s in _listening() if s not in before]
        assert opened, "the cluster opened no socket"
        assert all(ip == "127.0.0.1" for ip, _ in opened), opened
        link = urlparse(info.dashboard)
        assert link.hostname == "127.0.0.1" and ("127.0.0.1", link.port) in opened


def test_an_address_naming_its_host_is_kept() -> None:
    assert loopback_unless_named(":8787") == "127.0.0.1:8787"
    assert loopback_unless_named("0.0.0.0:8787") == "0.0.0.0:8787"  # asked for: every interface
