"""`intygstjanst demo` against the running service: as a subprocess, and in-process to read every reply."""
from __future__ import annotations

import io
import subprocess

import pytest
from rich.console import Console

try:
    from tests.e2e.harness import REPO, cli, service_env
except ImportError:  # tests/ itself on sys.path
    from e2e.harness import REPO, cli, service_env

from service import demo

pytestmark = pytest.mark.integration

# (result, code) of each step: register, consent, list, send, archive, list, list archive, read care copy, remove
# care copy, read care copy, withdraw consent, citizen reads, register again, citizen reads who accessed it
EXPECTED = [("OK", None), ("OK", None), ("OK", None), ("OK", None), ("OK", None), ("OK", None), ("OK", None),
            ("OK", None), ("OK", None), ("ERROR", "NOT_FOUND"), ("OK", None), ("ERROR", "NO_CONSENT"),
            ("ERROR", "PURGED"), ("OK", None)]


def test_the_demo_plays_the_story_against_the_running_service_and_ends_in_the_purge(launch, stack):
    launch()
    done = subprocess.run([*cli("demo", "--seed", "7")], cwd=REPO, env=service_env(AMQP_URL=stack.amqp_url,
                                                                                   COLUMNS="160"),
                          capture_output=True, text=True, timeout=90)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "purged for good" in output and "PURGED" in output, output
    assert "Försäkringskassan" in output and "receives lisjp" in output, output
    assert "asks who read it" in output and "Sara Sjuksköterska" in output and "REMOVE_CARE_COPY" in output, output

    replies = demo.run(stack.amqp_url, Console(file=io.StringIO(), width=160), seed=8)
    assert [(r["result"], r["code"]) for r in replies] == EXPECTED, replies
    assert replies[8]["data"] == {"outcome": "CITIZEN_ONLY"}
    assert replies[10]["data"] == {"purged": 1}
    # §9: the purged certificate's access log remains, newest first; the refused read left no entry
    assert [(e["action"], e["person_name"]) for e in replies[13]["data"]["entries"]] == [
        ("REMOVE_CARE_COPY", "Sara Sjuksköterska"), ("READ", "Sara Sjuksköterska")]
