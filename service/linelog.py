"""The supervisor's log lines, with the standard library only: the same JSON objects as `service.logging` writes
(the fields, then `event`, `level`, `timestamp` in UTC, `logger`; every string scrubbed of anything that looks like
a personnummer), one per line on stdout.

Why not structlog here: the supervisor of `serve` logs a few lines a day, and structlog (with asyncio, which it
imports) would cost it about 10 MB of resident memory, which counts against the service's (issue 10:
`benchmarks/memory.py`).
"""
from __future__ import annotations

import datetime as dt
import json
import sys
import threading
from typing import Any

from domain.privacy import scrub, scrub_value

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_lock = threading.Lock()


class LineLogger:
    def __init__(self, name: str, level: str = "INFO", stream: Any = None) -> None:
        self.name = name
        self.threshold = LEVELS.get(level.lower(), LEVELS["info"])
        self.stream = stream

    def _line(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if LEVELS[level] < self.threshold:
            return
        line = {key: scrub_value(value) for key, value in fields.items()}
        line.update(event=scrub(event), level=level,
                    timestamp=dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"), logger=self.name)
        stream = self.stream or sys.stdout
        with _lock:
            stream.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
            stream.flush()

    def debug(self, event: str, **fields: Any) -> None:
        self._line("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._line("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._line("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._line("error", event, fields)
