"""`intygstjanst serve` supervises its processes (service/supervisor.py): a relay and CONSUMER_PROCESSES consumer
processes, a child that dies is started again, SIGTERM stops them all with exit code 0, and no child outlives its
supervisor, not even a SIGKILLed one."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

try:
    from tests.e2e.common import certificate, check_reply
    from tests.e2e.harness import new_id, new_patient
except ImportError:  # tests/ itself on sys.path
    from e2e.common import certificate, check_reply
    from e2e.harness import new_id, new_patient

pytestmark = pytest.mark.integration


def children_of(pid: int) -> dict[int, str]:
    """Live child processes of `pid`: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(0.05)


def role_of(cmdline: str) -> str | None:
    """The child's role; None while it is still a fork of the supervisor, before it runs its own command."""
    return cmdline.split("--role ", 1)[1].split()[0] if "--role " in cmdline else None


def roles(service) -> dict[str, int]:
    """The supervised children by role (one of each expected): role -> pid."""
    return {role: pid for pid, cmd in children_of(service.pid).items() if (role := role_of(cmd)) is not None}


def registers(wire) -> None:
    check_reply(wire, wire.send("certificate.register", {"certificate": certificate(new_id(), new_patient())}),
                "OK", timeout=30)


def test_serve_runs_the_relay_and_the_consumers_as_processes_of_their_own(launch, wire):
    service = launch(CONSUMER_PROCESSES=2)
    children = children_of(service.pid)
    assert sorted(role_of(cmd) for cmd in children.values()) == ["consumers", "order-free", "relay"]
    registers(wire)  # consumed in one process, its reply published by another (woken through NOTIFY)
    assert service.terminate() == 0
    assert not any(alive(pid) for pid in children)


def test_a_killed_child_is_started_again_and_the_service_goes_on(launch, wire):
    service = launch()
    registers(wire)
    for role in ("consumers", "relay"):
        victim = roles(service)[role]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: role in roles(service) and roles(service)[role] != victim, 60, f"a new {role} process")
        registers(wire)
    log = service.log_text()
    assert log.count("child died; restarting it") == 2
    assert service.running
    assert service.terminate() == 0


def test_sigterm_stops_every_child_and_exits_0(launch, wire):
    service = launch()
    registers(wire)
    children = children_of(service.pid)
    assert len(children) == 3  # the relay and the two consumer processes of the default
    assert service.terminate() == 0
    assert not any(alive(pid) for pid in children)
    log = service.log_text()
    assert log.count("consumer stopped") >= 1 and log.count("service stopped") == 4  # three children, supervisor


def test_sigkill_of_the_supervisor_leaves_no_child_behind(launch, wire):
    service = launch()
    children = children_of(service.pid)
    assert len(children) == 3
    assert service.kill() == -signal.SIGKILL
    wait_until(lambda: not any(alive(pid) for pid in children), 60, "every child gone")


@pytest.mark.slow
def test_a_child_that_keeps_dying_stops_the_service_with_a_non_zero_exit_code(launch, wire):
    service = launch()
    for death in range(1, 6):
        victim = roles(service)["consumers"]
        os.kill(victim, signal.SIGKILL)
        if death < 5:
            wait_until(lambda: roles(service).get("consumers") not in (None, victim), 60, "a new consumer process")
            service.wait_log(f'"deaths": {death}', timeout=10)
    assert service.wait(60) == 1
    assert "child cannot be kept alive; stopping the service" in service.log_text()
