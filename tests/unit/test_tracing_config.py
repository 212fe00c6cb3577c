"""Tracing is configured by the standard OTEL_* variables only, is off unless asked for, and a collector that is
away is reported once, not once per batch of spans."""
from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from structlog.testing import capture_logs

from service.tracing import Reporting, exporter_name, provider_from_env


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, None),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, None),
])
def test_tracing_is_off_unless_the_environment_asks_for_an_exporter(env, expected):
    assert exporter_name(env) == expected


def test_without_otel_variables_no_sdk_is_set_up():
    assert provider_from_env({}) is None


def test_an_exporter_the_service_does_not_ship_is_refused_at_start():
    with pytest.raises(ValueError, match="zipkin"):
        exporter_name({"OTEL_TRACES_EXPORTER": "zipkin"})


class Flaky(SpanExporter):
    def __init__(self, results):
        self.results = list(results)

    def export(self, spans):
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


def test_a_collector_that_is_away_is_reported_once_and_its_return_once():
    failure, success = SpanExportResult.FAILURE, SpanExportResult.SUCCESS
    with capture_logs() as logged:
        reporting = Reporting(Flaky([success, failure, ConnectionError("refused"), failure, success, success]),
                              "http://127.0.0.1:9")
        results = [reporting.export([]) for _ in range(6)]
    assert results == [success, failure, failure, failure, success, success]
    assert [line["event"] for line in logged] == ["traces not exported; spans are dropped until the collector answers",
                      "traces exported again"]
