"""Logging: one JSON object per line on stdout (12-factor), through structlog.

No personnummer in clear (CONTRACT §8): the message log line carries `patient_hash(pid)` (a salted sha256 prefix,
the same for one patient within one deployment when `LOG_SALT` is set), and as a safety net every string in every
log line, tracebacks included, is scrubbed of anything that looks like a personnummer or samordningsnummer.
Library logs (pika, SQLAlchemy) go through the same renderer.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from domain.privacy import patient_hash, scrub, scrub_value, set_salt

__all__ = ["audit_logger", "configure", "get_logger", "patient_hash", "scrub", "scrub_personnummer"]

def scrub_personnummer(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the last line of defence against a personnummer in a log line."""
    for key, value in list(event_dict.items()):
        if key not in _WRITTEN_HERE:
            event_dict[key] = scrub_value(value)
    return event_dict


# Keys whose values the logging itself writes (the patient's is already a hash): nothing of a client's is in them.
_WRITTEN_HERE = frozenset({"patient", "timestamp", "level", "logger"})


class _LineLogger:
    """structlog's end of the line: writes the rendered JSON through the stdlib handler's stream and lock, so that
    the service's own lines and library lines never interleave. Going straight there (instead of through a stdlib
    `LogRecord` and `ProcessorFormatter`, which copies the record and renders again) costs about a third: the
    message loop logs one line per message."""

    def __init__(self, name: str | None) -> None:
        self.name = name

    def msg(self, line: str) -> None:
        handler = _handler
        if handler is None:
            return
        with handler.lock:
            stream = handler.stream
            stream.write(line + "\n")
            stream.flush()

    log = debug = info = warn = warning = err = error = critical = fatal = exception = failure = msg


def _line_logger_factory(*args: Any) -> _LineLogger:
    if args:
        return _LineLogger(str(args[0]))
    try:  # like structlog.stdlib.LoggerFactory: an unnamed logger is named after the calling module
        from structlog._frames import _find_first_app_frame_and_name
        return _LineLogger(_find_first_app_frame_and_name(["service.logging"])[1])
    except Exception:  # noqa: BLE001 - a private helper of structlog; a name is nice to have
        return _LineLogger(None)


def _add_logger_name(logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    name = getattr(logger, "name", None)
    if name:
        event_dict["logger"] = name
    return event_dict


def add_trace_ids(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the ids of the active span, when there is one (a message being handled with tracing
    on); costs one context lookup when there is none. No span can be active where OpenTelemetry was never
    imported (tracing off), and this does not import it."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return event_dict
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict["trace_id"] = format(context.trace_id, "032x")
        event_dict["span_id"] = format(context.span_id, "016x")
    return event_dict


_handler: logging.StreamHandler | None = None


def configure(level: str = "INFO", *, salt: str | None = None, stream: Any = None) -> None:
    """Configure structlog and the standard library's logging (idempotent; call once at start-up)."""
    global _handler
    if salt:
        set_salt(salt)
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else int(level)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    stream = stream or sys.stdout

    # (No structlog.contextvars.merge_contextvars: nothing binds context variables, and the message loop writes a
    # line per message.)
    shared: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
    ]
    # Plain-text tracebacks (dict tracebacks would show local variables: personnummer).
    tail: list[Any] = [structlog.processors.StackInfoRenderer(), structlog.processors.format_exc_info,
                       scrub_personnummer]

    # The service's own lines: rendered once, written by the handler below (`_LineLogger`); the same keys in the
    # same order as a library line's.
    structlog.configure(
        processors=[*shared, _add_logger_name, *tail, structlog.processors.JSONRenderer(ensure_ascii=False)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_line_logger_factory,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, *tail],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer(ensure_ascii=False)],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_intygstjanst", False):
            root.removeHandler(old)
    handler._intygstjanst = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    _handler = handler
    root.setLevel(numeric)
    # pika narrates every reconnect at INFO and dumps tracebacks at ERROR; the service says what matters itself.
    logging.getLogger("pika").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("pika.adapters.utils.io_services_utils").setLevel(logging.CRITICAL)
    logging.getLogger("pika.adapters.blocking_connection").setLevel(logging.CRITICAL)
    logging.getLogger("pika.adapters.base_connection").setLevel(logging.CRITICAL)
    logging.getLogger("pika.adapters.utils.connection_workflow").setLevel(logging.CRITICAL)
    logging.getLogger("pika.connection").setLevel(logging.ERROR)


def get_logger(name: str = "intygstjanst", **bound: Any) -> Any:
    return structlog.get_logger(name).bind(**bound)


def audit_logger(stream: Any, name: str = "intygstjanst.audit") -> Any:
    """A logger of its own (not the process-wide configuration) writing the service's JSON lines to `stream`:
    for a command line tool that records an access on stderr while stdout carries its output. Not scrubbed: an
    access record names exactly what was accessed (a message id such as a UUID ending in twelve digits would look
    like a personnummer to the scrubber), and it carries ids and user names, never content."""
    def named(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event_dict["logger"] = name
        return event_dict

    return structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=[structlog.stdlib.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True), named,
                    structlog.processors.JSONRenderer(ensure_ascii=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
