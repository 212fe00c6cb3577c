"""ops/ against the real thing: the alert rules pass `promtool check rules` and their unit tests
(ops/prometheus/alerts.test.yml), and a real Prometheus scrapes a running service, evaluates the rules, fires the
dead-letter alert for a dead letter, and answers every query of the Grafana dashboard.

Needs Debian's `prometheus` package (`apt-get install prometheus`: the `prometheus` and `promtool` binaries)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from tests.cluster import free_port, wait_port
    from tests.e2e.harness import REPO, probe, wait_for
except ImportError:  # tests/ itself on sys.path
    from cluster import free_port, wait_port
    from e2e.harness import REPO, probe, wait_for

OPS = REPO / "ops"
ALERTS = OPS / "prometheus" / "alerts.yml"
DASHBOARD = OPS / "grafana" / "dashboards" / "intygstjanst.json"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("promtool") is None or shutil.which("prometheus") is None,
                       reason="Debian's prometheus package is not installed (apt-get install prometheus)"),
]


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard, with its variables as Grafana would fill them in."""
    panels = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    return [t["expr"].replace("$job", "intygstjanst").replace("$__rate_interval", "1m")
            for panel in panels for t in panel["targets"]]


def test_the_alert_rules_are_valid_and_each_alert_fires_as_its_unit_test_says():
    checked = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout
    tested = subprocess.run(["promtool", "test", "rules", "alerts.test.yml"], cwd=ALERTS.parent,
                            capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


class Prometheus:
    def __init__(self, port: int) -> None:
        self.port = port

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]


@pytest.fixture
def prometheus_of(tmp_path: Path) -> Iterator:
    processes: list[subprocess.Popen] = []

    def start(target_port: int) -> Prometheus:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "intygstjanst",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }))
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        processes.append(subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT))
        wait_port(port, 30, "prometheus")
        return Prometheus(port)

    yield start
    for process in processes:
        process.terminate()
        process.wait(30)


def test_a_real_prometheus_scrapes_the_service_evaluates_the_alerts_and_answers_the_dashboard(
        launch, wire, prometheus_of):
    port = free_port()
    launch(metrics_port=port)
    wait_for(lambda: probe(port, "/readyz")[0] == 200, 30, "the service ready")
    prometheus = prometheus_of(port)

    wait_for(lambda: prometheus.query('up{job="intygstjanst"} == 1'), 30, "the first scrape")
    wait_for(lambda: prometheus.query('intyg_outbox_relay_leader{job="intygstjanst"} == 1'), 30, "a relay leading")
    groups = wait_for(lambda: prometheus.api("rules")["groups"], 30, "the rules loaded")
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == {"IntygOutboxStuck", "IntygDeadLettersGrowing", "IntygNoRelayLeader", "IntygConsumerDown",
                          "IntygInstanceDown"}
    assert all(rule["health"] in ("ok", "unknown") for rule in rules.values()), rules

    # a healthy service pages nobody (an evaluation before the first scrape may have set one pending)
    wait_for(lambda: not [a for a in prometheus.api("alerts")["alerts"] if a["labels"]["severity"] == "page"], 15,
             "no page alert firing or pending")

    # a dead letter fires the dead-letter alert for its queue and code
    wire.send("certificate.register", b"{not json")
    firing = wait_for(lambda: [a for a in prometheus.api("alerts")["alerts"]
                               if a["labels"]["alertname"] == "IntygDeadLettersGrowing" and a["state"] == "firing"],
                      30, "the dead-letter alert firing")
    assert [(a["labels"]["messaging_destination_name"], a["labels"]["error_type"]) for a in firing] == [
        ("intyg.registration.dlq", "INVALID_MESSAGE")]

    # every query of the dashboard is valid PromQL, and every metric it or the alerts name is one the service has
    for expr in dashboard_queries():
        prometheus.query(expr)
    exposed = set(prometheus.api("label/__name__/values", **{"match[]": '{job="intygstjanst"}'}))
    # (every metric in ops/ is selected by job: a name followed by `{`, which tells it from a label name)
    named = set(re.findall(r"\b((?:intyg|messaging)_[a-z_]+)\{", ALERTS.read_text() + "\n".join(dashboard_queries())))
    assert {"intyg_outbox_oldest_unpublished_age_seconds", "messaging_process_duration_seconds_bucket"} <= named
    never_incremented = {"intyg_consumer_transaction_retries_total", "intyg_consumer_reconnects_total"}
    assert named - exposed <= never_incremented, named - exposed
