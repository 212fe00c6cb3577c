"""`serve`'s supervisor stops its children with SIGTERM and says by its exit code whether all stopped cleanly. A child
restarted a moment before is still importing when the stop comes: it has no handler yet and SIGTERM ends it, as
asked; that is a clean stop, not an error. A child that was ready and died of the signal is one."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import SimpleNamespace

from service.supervisor import Supervisor

SETTINGS = SimpleNamespace(consumer_processes=1, metrics_port=0, reconnect_max_s=1.0, log_level="ERROR",
                           log_salt="")
NO_HANDLER = [sys.executable, "-c", "import time; time.sleep(60)"]  # SIGTERM's default action: killed by it


def supervisor_of(ready: bool) -> Supervisor:
    supervisor = Supervisor(SETTINGS)
    for child in supervisor.children:
        child.proc = subprocess.Popen(NO_HANDLER)
        child.ready = ready
    time.sleep(0.2)
    return supervisor


def test_a_child_stopped_while_it_was_starting_stopped_cleanly():
    supervisor = supervisor_of(ready=False)
    assert supervisor._stop_children() is True
    assert all(c.proc.returncode == -signal.SIGTERM for c in supervisor.children)


def test_a_ready_child_that_dies_of_the_signal_did_not_stop_cleanly():
    supervisor = supervisor_of(ready=True)
    assert supervisor._stop_children() is False
