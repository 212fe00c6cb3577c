"""`intygstjanst serve` with a fault injected for the crash tests: SIGKILL right after the commit that holds the
message id in `TEST_CRASH_AFTER_COMMIT`, before anything is published or acknowledged. Fault injection lives here,
in the tests, not in the service's settings."""
from __future__ import annotations

import os
import signal
import sys

import structlog

from consumers.loop import Consumer
from service.cli import app

CRASH_AFTER_COMMIT = "TEST_CRASH_AFTER_COMMIT"


def main() -> None:
    victim = os.environ[CRASH_AFTER_COMMIT]
    committed = Consumer._committed

    def crash_after(self: Consumer, items) -> None:
        committed(self, items)
        if any(item.message_id == victim for item in items):
            structlog.get_logger("intygstjanst.test").warning("crash injected after commit", message_id=victim)
            os.kill(os.getpid(), signal.SIGKILL)

    Consumer._committed = crash_after
    # The patch lives in this process only: the supervised serve would run the consumers in fresh interpreters.
    sys.argv = ["intygstjanst", *sys.argv[1:], "--single-process"]
    app()


if __name__ == "__main__":
    main()
