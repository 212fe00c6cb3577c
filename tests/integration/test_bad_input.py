"""Bad broker and database configuration (issue 7): a malformed entry in the node list is a configuration error
that names the entry; no reachable node, a database with only a standby, and a TLS handshake that fails keep the
service retrying with back-off, each attempt logged with the node it tried and never a password."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from publishers import amqp

try:
    from tests.cluster import PostgresPair, free_port
    from tests.e2e.harness import REPO, ServiceProcess, cli, service_env
except ImportError:  # tests/ itself on sys.path
    from cluster import PostgresPair, free_port
    from e2e.harness import REPO, ServiceProcess, cli, service_env

pytestmark = pytest.mark.integration

SECRET = "s3cret-pw"


def test_a_malformed_entry_is_named_by_position_without_its_password():
    with pytest.raises(amqp.BrokerUrlError) as wrong:
        amqp.split_nodes(f"amqp://u:{SECRET}@h1:5672/v,amqp://u:{SECRET}@h2:56x2/v")
    assert "entry 2 of 2" in str(wrong.value) and "amqp://u:***@h2:56x2/v" in str(wrong.value)
    assert SECRET not in str(wrong.value)


def test_the_service_refuses_a_malformed_list_at_once_with_a_configuration_error():
    done = subprocess.run(cli("serve"), cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=service_env(AMQP_URL=f"amqp://u:{SECRET}@127.0.0.1:5672/v,,"))
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, said
    assert "configuration error: AMQP_URL entry 2 of 3 is empty" in said and SECRET not in said


def _retries(tmp_path, what: str, attempts: int = 3, timeout: float = 60.0, **settings: str) -> tuple[list[str], str]:
    """Start the service with `settings`; its warnings about `what` once there are `attempts` of them (the process
    still running), and its whole log. It must then stop cleanly on SIGTERM."""
    service = ServiceProcess(service_env(RECONNECT_MAX_S=2, **settings), tmp_path / "service.log").start(ready=False)
    try:
        return _warnings(service, what, attempts, timeout), service.log_text()
    finally:
        assert service.terminate() == 0


def _warnings(service: ServiceProcess, what: str, attempts: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in service.log_text().splitlines() if what in line and "trying again" in line]
        if len(lines) >= attempts:
            assert service.running, service.log_text()[-3000:]
            return lines
        assert service.running, f"the service exited:\n{service.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"fewer than {attempts} retries within {timeout}s:\n" \
                                            f"{service.log_text()[-3000:]}"
        time.sleep(0.2)


def _delays(lines: list[str]) -> list[float]:
    return [float(m) for line in lines for m in re.findall(r"trying again in ([0-9.]+)s", line)]


def test_no_reachable_node_is_retried_with_back_off_naming_each_node(tmp_path, database_url):
    dead = [free_port(), free_port()]
    url = ",".join(f"amqp://guest:{SECRET}@127.0.0.1:{port}/%2F" for port in dead)
    lines, log = _retries(tmp_path, "broker topology", AMQP_URL=url, DATABASE_URL=database_url)
    assert all(f"amqp://127.0.0.1:{port}" in lines[-1] for port in dead)
    assert SECRET not in log
    assert max(_delays(lines)) > min(_delays(lines[:1]))  # backing off, not spinning


@pytest.mark.slow
def test_a_database_of_standbys_only_is_retried_naming_the_server(tmp_path, amqp_url):
    with PostgresPair(standby=True, synchronous=False) as pg:
        assert pg.standby is not None
        url = (f"postgresql://postgres:{SECRET}@127.0.0.1:{pg.standby.port}/postgres"
               "?target_session_attrs=read-write")
        lines, log = _retries(tmp_path, "database migration", AMQP_URL=amqp_url, DATABASE_URL=url)
        assert f"port {pg.standby.port}" in lines[-1] and "session is read-only" in lines[-1]
        assert SECRET not in log


def test_a_failing_tls_handshake_is_retried_naming_the_node(tmp_path, tls_node, pki, database_url):
    node = tls_node.nodes[0]
    url = node.tls_url().replace("guest:guest", f"guest:{SECRET}")
    lines, log = _retries(tmp_path, "broker topology", AMQP_URL=url, AMQP_CA_FILE=str(pki["stranger_ca"]),
                          DATABASE_URL=database_url)
    assert f"amqps://localhost:{node.tls_port}" in lines[-1] and "CERTIFICATE_VERIFY_FAILED" in lines[-1]
    assert SECRET not in log
