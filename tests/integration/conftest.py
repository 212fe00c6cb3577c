"""Fixtures shared by integration modules: a CA made for the run, and a RabbitMQ node of the suite's own with a TLS
listener whose certificate it signed (started once, on first use)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from tests.cluster import RabbitCluster, TestCA
except ImportError:  # tests/ itself on sys.path
    from cluster import RabbitCluster, TestCA


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca = TestCA(directory)
    server_cert, server_key = ca.issue("server")  # localhost and 127.0.0.1
    broker_cert, broker_key = ca.issue("broker", ips=())  # localhost only
    client_cert, client_key = ca.issue("client", hosts=("intygstjanst",), ips=(), client=True)
    (directory / "other").mkdir()
    stranger = TestCA(directory / "other", "stranger CA")
    return {"ca": ca.cert, "broker_cert": broker_cert, "broker_key": broker_key, "server_cert": server_cert,
            "server_key": server_key, "client_cert": client_cert, "client_key": client_key,
            "stranger_ca": stranger.cert}


@pytest.fixture(scope="session")
def tls_node(pki) -> Iterator[RabbitCluster]:
    with RabbitCluster(1, tls=(pki["ca"], pki["broker_cert"], pki["broker_key"])) as cluster:
        yield cluster
