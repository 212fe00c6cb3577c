"""The OpenTelemetry SDK, set up from the standard `OTEL_*` environment variables only.

Off unless asked for: `OTEL_TRACES_EXPORTER=otlp` (or `console`), or an OTLP endpoint
(`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) without `OTEL_TRACES_EXPORTER`.
(The specification's default exporter is `otlp`; ours is none, so that a service nobody collects traces from
spends nothing on them.) `OTEL_SDK_DISABLED=true` and `OTEL_TRACES_EXPORTER=none` turn it off. Everything else
(endpoint, headers, timeout, sampler, batch sizes, service name, resource attributes) is read by the SDK itself.

Spans leave through a `BatchSpanProcessor`: a consumer only puts a finished span in a bounded queue, and a
background thread exports; when the collector is away, spans are dropped, never waited for. That is said once
in the log (and once more when export works again), instead of the exporter's line per failed batch.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor, ConsoleSpanExporter, SpanExporter, SpanExportResult,
)

from service.logging import get_logger

TRACER_NAME = "intygstjanst"
SHUTDOWN_S = 5.0  # how long stopping waits for the last spans to leave
_OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def exporter_name(env: Any = os.environ) -> str | None:
    """Which exporter the environment asks for, or None: tracing off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not name:
        return "otlp" if any(env.get(v) for v in _OTLP_ENDPOINTS) else None
    if name == "none":
        return None
    if name not in ("otlp", "console"):
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported here: use otlp, console or none")
    return name


def provider_from_env(env: Any = os.environ) -> TracerProvider | None:
    """A tracer provider exporting as the environment says, or None when tracing is off."""
    name = exporter_name(env)
    if name is None:
        return None
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Its own line per failed batch (with a traceback) is what `Reporting` replaces.
        logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter").setLevel(logging.CRITICAL)
        logging.getLogger("opentelemetry.exporter.otlp.proto.http").setLevel(logging.CRITICAL)
        exporter: SpanExporter = OTLPSpanExporter()
        where = next((env[v] for v in _OTLP_ENDPOINTS if env.get(v)), "http://localhost:4318")
    else:
        exporter, where = ConsoleSpanExporter(), "stdout"
    provider = TracerProvider(resource=_resource(env))
    provider.add_span_processor(BatchSpanProcessor(Reporting(exporter, where)))
    get_logger("intygstjanst.tracing").info("tracing on", exporter=name, endpoint=where)
    return provider


def _resource(env: Any) -> Resource:
    from importlib.metadata import PackageNotFoundError, version

    attributes: dict[str, Any] = {}
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes[SERVICE_NAME] = "intygstjanst"
    try:
        attributes[SERVICE_VERSION] = version("intygstjanst")
    except PackageNotFoundError:  # run from a source tree
        pass
    return Resource.create(attributes)


class Reporting(SpanExporter):
    """Wraps an exporter: says once that spans are being dropped, and once that they leave again."""

    def __init__(self, exporter: SpanExporter, where: str) -> None:
        self.exporter, self.where = exporter, where
        self.log = get_logger("intygstjanst.tracing")
        self._failing = False
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.exporter.export(spans)
        except Exception as exc:  # noqa: BLE001 - an exporter's fault never reaches the service
            result, why = SpanExportResult.FAILURE, type(exc).__name__
        else:
            why = "export failed"
        now_failing = result is not SpanExportResult.SUCCESS
        with self._lock:
            was_failing, self._failing = self._failing, now_failing
        if now_failing and not was_failing:
            self.log.warning("traces not exported; spans are dropped until the collector answers",
                             endpoint=self.where, error=why)
        elif was_failing and not now_failing:
            self.log.info("traces exported again", endpoint=self.where)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def shutdown(provider: TracerProvider) -> None:
    """Export what is left, waiting at most `SHUTDOWN_S` (a collector that is away must not hold up a stop)."""
    done = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
    done.start()
    done.join(SHUTDOWN_S)


__all__ = ["TRACER_NAME", "Reporting", "exporter_name", "provider_from_env", "shutdown"]
