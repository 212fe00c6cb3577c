"""The supervisor's log lines (service.linelog) are the JSON objects every other process writes (service.logging):
the same keys in the same order, the same scrubbing of anything that looks like a personnummer."""
from __future__ import annotations

import io
import json

from service import linelog, logging as service_logging


def test_a_supervisor_line_has_the_keys_of_a_service_line_in_their_order():
    structured = io.StringIO()
    service_logging.configure("INFO", stream=structured)
    service_logging.get_logger("intygstjanst.supervisor").info("child started", child="relay-1", pid=42)
    plain = io.StringIO()
    linelog.LineLogger("intygstjanst.supervisor", stream=plain).info("child started", child="relay-1", pid=42)
    expected, got = json.loads(structured.getvalue()), json.loads(plain.getvalue())
    assert list(got) == list(expected)
    assert {k: v for k, v in got.items() if k != "timestamp"} == {k: v for k, v in expected.items()
                                                                   if k != "timestamp"}
    assert got["timestamp"].endswith("Z") and len(got["timestamp"]) == len(expected["timestamp"])


def test_a_supervisor_line_never_shows_a_personnummer():
    out = io.StringIO()
    linelog.LineLogger("x", stream=out).error("child died: 191212121212", detail=["19121212-1212"])
    line = out.getvalue()
    assert "191212121212" not in line and "19121212-1212" not in line and line.count("<personnummer>") == 2


def test_lines_below_the_level_are_not_written():
    out = io.StringIO()
    log = linelog.LineLogger("x", level="WARNING", stream=out)
    log.info("quiet")
    log.warning("loud")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["loud"]
