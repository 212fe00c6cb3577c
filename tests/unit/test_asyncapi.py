"""The published contract, `docs/asyncapi.yaml`: generated from the code and committed as it is generated, valid
AsyncAPI 3.0 for the official parser, complete (every routing key bound, every event published, every message
type, every reply code), and with examples that validate against their own schemas."""
from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from pydantic import BaseModel

from consumers.pipeline import Envelope, Invalid, parse
from consumers.routes import CITIZEN, OPERATOR, ROUTES, Route
from contracts.base import CertificateId, HsaId, Name, PatientId, Strict, Timestamp
from contracts.events import Event
from contracts.registry import EVENTS
from contracts.replies import MEANINGS, Code
from contracts import topology as topology_names
from contracts.topology import COMMANDS_EXCHANGE, CONSUMED_QUEUES, UNROUTED, dlq, recipient_routing_key
from service import asyncapi
from service.settings import Settings
from service.testdata import wire_example
from service.topology import QUORUM, DeclaredQueue, planned

from .harness import policy

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "asyncapi.yaml"
NODE_MODULES = ROOT / ".cache" / "asyncapi-node" / "node_modules"
REGENERATE = "intygstjanst asyncapi --out docs/asyncapi.yaml"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return asyncapi.document()


def _channel_of(doc: dict[str, Any], operation: dict[str, Any]) -> dict[str, Any]:
    return doc["channels"][operation["channel"]["$ref"].rsplit("/", 1)[1]]


def _parameter_values(channel: dict[str, Any]) -> dict[str, list[str]]:
    return {name: p["examples"] for name, p in channel.get("parameters", {}).items()}


def _expand(text: str, values: dict[str, list[str]]) -> list[str]:
    """`recipient.{recipientId}.#` -> one text per example value of the parameter."""
    out = [text]
    for name, examples in values.items():
        out = [t.replace("{" + name + "}", v) for t in out for v in examples] if "{" + name + "}" in text else out
    return out


def _validate(instance: Any, schema: dict[str, Any], doc: dict[str, Any]) -> None:
    """Against a schema of the document, its `#/components/schemas/...` references resolved in the document."""
    root = {**schema, "components": {"schemas": doc["components"]["schemas"]}}
    Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(instance)


def test_the_committed_document_is_what_the_code_generates(doc):
    generated = asyncapi.render(doc, "yaml")
    committed = COMMITTED.read_text(encoding="utf-8") if COMMITTED.exists() else ""
    if committed != generated:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), generated.splitlines(True),
                                                 "docs/asyncapi.yaml (committed)", "generated"))[:60])
        pytest.fail(f"docs/asyncapi.yaml is not what the code generates. It is the published contract: regenerate "
                    f"it with `{REGENERATE}` and commit the change so that reviewers see it.\n{diff}")


def _parser(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Runs the official parser (scripts/asyncapi/validate.cjs) on a document; skips only without Node.js."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("no Node.js on this machine: the official AsyncAPI parser (@asyncapi/parser) cannot run")
    assert (NODE_MODULES / "@asyncapi" / "parser").is_dir(), (
        "the AsyncAPI parser is not installed: run scripts/asyncapi/install (scripts/test does it)")
    path = tmp_path / "asyncapi.yaml"
    path.write_text(text, encoding="utf-8")
    return subprocess.run([node, str(ROOT / "scripts" / "asyncapi" / "validate.cjs"), str(path)],
                          env={**os.environ, "NODE_PATH": str(NODE_MODULES)}, capture_output=True, text=True,
                          timeout=120)


def test_the_official_asyncapi_parser_accepts_the_document(doc, tmp_path):
    run = _parser(asyncapi.render(doc, "yaml"), tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "valid AsyncAPI 3.0.0" in run.stdout


def test_a_broken_document_is_refused_by_the_parser(doc, tmp_path):
    """The check above can fail: a binding the AMQP binding schema does not know is an error."""
    broken = json.loads(json.dumps(doc))
    broken["channels"]["certificate.register"]["bindings"]["amqp"]["exchange"]["type"] = "round-robin"
    run = _parser(json.dumps(broken), tmp_path)
    assert run.returncode == 1
    assert "channels.certificate.register.bindings.amqp" in run.stdout


def test_every_routing_key_the_service_binds_appears_in_the_document(doc):
    in_document: set[str] = set()
    for channel in doc["channels"].values():
        amqp = channel.get("bindings", {}).get("amqp", {})
        if amqp.get("is") == "routingKey" and channel["address"]:
            in_document.add(f"{amqp['exchange']['name']}: {channel['address']}")
        for binding in amqp.get("x-intyg-bindings", []):
            in_document.update(_expand(binding, _parameter_values(channel)))
    bound = {b for queue in planned(Settings.model_construct()).queues for b in queue.bindings}
    assert bound, "the topology binds nothing?"
    assert bound - in_document == set()


def test_every_event_the_service_can_publish_appears_in_the_document(doc):
    published: set[str] = set()
    for operation in doc["operations"].values():
        if operation["action"] != "send":
            continue
        channel = _channel_of(doc, operation)
        values = _parameter_values(channel)
        keys = operation["bindings"]["amqp"].get("cc") or (
            [channel["address"]] if channel["bindings"]["amqp"]["is"] == "routingKey" else [])
        for key in keys:
            published.update(_expand(key, values))
    recipients = [r.id for r in Settings.model_construct().recipients]
    can_publish = {key.format(recipient_id=r) for key in EVENTS for r in recipients}
    assert {recipient_routing_key(r, what) for r in recipients for what in ("sent", "revoked")} <= can_publish
    assert can_publish - published == set()


def test_every_message_type_is_received_with_a_reply_and_the_roles_that_may_send_it(doc):
    for key, route in ROUTES.items():
        operation = doc["operations"][key]
        assert operation["action"] == "receive"
        assert operation["channel"] == {"$ref": f"#/channels/{key}"}
        assert doc["channels"][key]["bindings"]["amqp"]["exchange"]["name"] == "intyg.commands"
        assert {s["$ref"].rsplit("/", 1)[1] for s in operation["security"]} == set(route.roles)
        assert operation["reply"]["address"]["location"] == "$message.header#/reply_to"
        assert doc["components"]["messages"][key]["payload"] == {"$ref": f"#/components/schemas/"
                                                                          f"{route.model.__name__}"}


def test_every_queue_the_service_consumes_is_received_and_answered(doc):
    received: set[str] = set()
    for operation in doc["operations"].values():
        if operation["action"] == "receive" and operation["reply"] == asyncapi.REPLY:
            channel = _channel_of(doc, operation)
            amqp = channel["bindings"]["amqp"]
            received.add(amqp["x-intyg-queue"]["name"] if amqp["is"] == "routingKey" else channel["address"])
    assert set(CONSUMED_QUEUES) - received == set()


def test_messages_of_an_unknown_type_are_described_where_they_go(doc):
    unrouted = doc["channels"][UNROUTED]
    assert unrouted["description"].endswith(f"bound to `{UNROUTED}` (what `{COMMANDS_EXCHANGE}` cannot route).")
    assert list(doc["channels"][dlq(UNROUTED)]["messages"]) == [f"{UNROUTED}.dead-letter"]
    commands = doc["channels"]["certificate.register"]["bindings"]["amqp"]
    assert commands["x-intyg-exchange-arguments"] == {"alternate-exchange": UNROUTED}


def test_every_header_the_service_sets_is_described_on_its_dead_letters(doc):
    named = {value for name, value in vars(topology_names).items() if name.startswith("H_")}
    described = set(doc["components"]["schemas"]["DeadLetterHeaders"]["properties"])
    assert named - described == set()


def test_every_reply_code_is_published_with_its_meaning(doc):
    codes = doc["components"]["messages"]["reply"]["description"]
    for code in Code:
        assert f"`{code.value}` | {MEANINGS[code]} |" in codes


def test_every_message_has_an_example_from_the_fixtures_that_validates_against_its_schemas(doc):
    messages = doc["components"]["messages"]
    for name, message in messages.items():
        assert message["examples"], f"{name} has no example"
        for example in message["examples"]:
            _validate(example["headers"], message["headers"], doc)
            if "anyOf" in message["payload"] or "$ref" in message["payload"]:
                assert "payload" in example, f"{name}: an example without a payload"
                _validate(example["payload"], message["payload"], doc)
    register = messages["certificate.register"]["examples"][0]["payload"]
    assert register == {"certificate": wire_example(ROUTES["certificate.register"].model)["certificate"]}


def test_the_schemas_of_the_document_reject_what_the_service_rejects(doc):
    """The example check bites: an unknown field (INVALID_MESSAGE in the service) fails against the schema."""
    message = doc["components"]["messages"]["consent.set"]
    payload = {**message["examples"][0]["payload"], "consent": "yes"}
    with pytest.raises(ValidationError):
        _validate(payload, message["payload"], doc)


def test_the_documented_message_id_limit_is_the_one_the_service_enforces(doc):
    limit = doc["components"]["schemas"]["RequestProperties"]["properties"]["message_id"]["maxLength"]
    body = json.dumps(wire_example(ROUTES["consent.get"].model)).encode()
    assert parse(Envelope("consent.get", body, message_id="m" * limit, reply_to="r"), policy()).message
    with pytest.raises(Invalid):
        parse(Envelope("consent.get", body, message_id="m" * (limit + 1), reply_to="r"), policy())


def test_a_message_without_an_example_value_is_named_not_published():
    class Mystery(BaseModel):
        riddle: str

    with pytest.raises(LookupError, match="Mystery.riddle"):
        wire_example(Mystery)


def test_yaml_and_json_are_the_same_document(doc):
    assert yaml.safe_load(asyncapi.render(doc, "yaml")) == json.loads(asyncapi.render(doc, "json")) == doc


class AccessLogged(Event):
    ROUTING_KEY: ClassVar[str] = "access.logged"
    at: Timestamp
    action: Literal["READ", "LIST"]
    certificate_id: CertificateId
    patient_id: PatientId
    person_id: HsaId
    person_name: Name
    care_unit_id: HsaId


class ListAccessLog(Strict):
    MESSAGE_TYPE: ClassVar[str] = "access-log.list"
    patient_id: PatientId


def test_what_the_code_declares_next_is_published_with_no_change_to_the_generator(monkeypatch, tmp_path):
    """Contract v1.1's access log, declared the way the code declares everything else, appears in the document
    by itself: an event collected by a queue of its own (not a broadcast), and a new query."""
    monkeypatch.setitem(EVENTS, AccessLogged.ROUTING_KEY, AccessLogged)
    monkeypatch.setitem(ROUTES, ListAccessLog.MESSAGE_TYPE,
                        Route(ListAccessLog, lambda *_: None, frozenset({CITIZEN, OPERATOR}), query=True))
    declared = asyncapi.planned

    def planned_with_more(settings):
        summary = declared(settings)
        next(q for q in summary.queues if q.name == "intyg.query").bindings.append("intyg.commands: access-log.list")
        summary.queues.append(DeclaredQueue("intyg.access-log", "quorum", "access-log",
                                            ["intyg.events: access.logged"], QUORUM))
        return summary

    monkeypatch.setattr(asyncapi, "planned", planned_with_more)
    doc = asyncapi.document()

    assert list(doc["channels"]["intyg.access-log"]["messages"]) == ["access.logged"]
    assert doc["operations"]["access.logged"]["bindings"]["amqp"]["cc"] == ["access.logged"]
    assert "access.logged" not in doc["channels"]
    assert doc["operations"]["access-log.list"]["action"] == "receive"
    assert doc["components"]["messages"]["access.logged"]["examples"][0]["payload"]["person_name"]
    run = _parser(json.dumps(doc), tmp_path)
    assert run.returncode == 0, run.stdout


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", "asyncapi", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_the_command_writes_the_document_to_a_file(tmp_path, doc):
    out = tmp_path / "asyncapi.json"
    run = _cli("--format", "json", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text(encoding="utf-8")) == doc


@pytest.mark.parametrize("args, says", [
    (["--format", "xml"], "--format must be one of yaml, json, not 'xml'"),
    (["--out", "{tmp}/no/such/folder/asyncapi.yaml"], "cannot write"),
    (["--out", "{tmp}"], "cannot write"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, says):
    run = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert run.returncode == 2
    assert run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and says in run.stderr
