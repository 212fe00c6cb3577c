"""publishers.dlq and `intygstjanst dlq` against a real RabbitMQ.

The dead letters live in a quorum queue of the test's own (like the real `Q.dlq`), and their original routing keys
are unique to the test, bound to an observer queue on `intyg.commands`: a replay reaches no service queue, so it
leaves nothing behind for other tests in the vhost.
"""
from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from typer.testing import CliRunner

from contracts.topology import (
    COMMANDS_EXCHANGE, H_ATTEMPTS, H_DEAD_LETTERED_AT, H_ERROR, H_ERROR_CODE, H_FIRST_ATTEMPT_AT,
    H_ORIGINAL_ROUTING_KEY, H_ORIGINAL_USER_ID, CONSUMED_QUEUES, UNROUTED, dlq,
)
from consumers import retry
from publishers import dlq as ops
from service.dlq_cli import dlq_app
from service.settings import Settings
from service.topology import declare_exchanges

try:
    from tests import factories
except ImportError:  # tests/ itself on sys.path
    import factories

pytestmark = pytest.mark.integration
PATIENT = "191212121212"

BOOKKEEPING = {H_ATTEMPTS: 5, H_ERROR_CODE: "UNAVAILABLE", H_ERROR: "database unavailable",
               H_DEAD_LETTERED_AT: "2026-11-25T10:00:00+00:00", H_FIRST_ATTEMPT_AT: "2026-11-25T09:59:00+00:00"}


@pytest.fixture
def channel(amqp_url):
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    ch = connection.channel()
    declare_exchanges(ch)
    ch.confirm_delivery()  # so that a message put into a queue is there when the next line counts it
    yield ch
    if connection.is_open:
        connection.close()


@pytest.fixture
def tag():
    return uuid.uuid4().hex[:8]


@pytest.fixture
def dead_letters(channel, tag):
    """A quorum DLQ of the test's own; the routing key the letters came with is bound to an observer queue."""
    queue = f"test.{tag}.dlq"
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    observer = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(observer, COMMANDS_EXCHANGE, routing_key=f"{tag}.certificate.revoke")
    yield queue, observer
    channel.queue_delete(queue)


@pytest.fixture
def sender(broker_users, amqp_url):
    """A channel of another broker user (a care system), whose messages carry its `user_id`."""
    name = broker_users.unique("vardsystem")
    url = broker_users.add(name, "secret")
    connection = pika.BlockingConnection(pika.URLParameters(url))
    their = connection.channel()
    their.confirm_delivery()
    yield name, their
    connection.close()


def put(channel, queue: str, message_id: str, routing_key: str, *, user_id: str | None = None,
        body: bytes | None = None) -> tuple[bytes, pika.BasicProperties]:
    """A dead letter as the service leaves it: the original message plus the bookkeeping headers."""
    body = body if body is not None else json.dumps({"certificate_id": message_id, "patient_id": "191212121212",
                                                      "reason": None}).encode()
    properties = pika.BasicProperties(
        message_id=message_id, content_type="application/json", delivery_mode=2, correlation_id=f"corr-{message_id}",
        reply_to="amq.rabbitmq.reply-to.whatever", type=routing_key, user_id=user_id,
        headers={**BOOKKEEPING, H_ORIGINAL_ROUTING_KEY: routing_key, "x-trace": f"trace-{message_id}"})
    channel.basic_publish("", queue, body, properties)
    return body, properties


def ids_in(channel, queue: str) -> list[str]:
    return [letter.message_id for letter in ops.peek(channel, queue, 1000)]


def drain(channel, queue: str) -> list[tuple[object, object, bytes]]:
    got = []
    for _ in range(200):
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            if got or _ > 20:
                break
            channel.connection.sleep(0.02)
            continue
        got.append((method, properties, body))
    return got


# --- reading ----------------------------------------------------------------------------------------------------
def test_peek_shows_the_dead_letters_and_leaves_them_in_place(channel, dead_letters, tag):
    queue, _ = dead_letters
    put(channel, queue, f"{tag}-a", f"{tag}.certificate.revoke")
    put(channel, queue, f"{tag}-b", f"{tag}.certificate.revoke")
    letters = ops.peek(channel, queue, 10)
    assert [letter.message_id for letter in letters] == [f"{tag}-a", f"{tag}-b"]
    first = letters[0]
    assert first.routing_key == f"{tag}.certificate.revoke"
    assert (first.error_code, first.error, first.attempts) == ("UNAVAILABLE", "database unavailable", 5)
    assert first.dead_lettered_at == "2026-11-25T10:00:00+00:00"
    assert "191212121212" not in first.masked_body() and f'"certificate_id": "{tag}-a"' in first.masked_body()
    assert ops.message_count(channel, queue) == 2
    assert ids_in(channel, queue) == [f"{tag}-a", f"{tag}-b"]  # browsing again sees the same, in order
    assert len(ops.peek(channel, queue, 1)) == 1


def test_list_dlqs_counts_every_consumed_queues_dlq(channel, amqp_url):
    from service.topology import declare

    declare(channel, Settings(amqp_url=amqp_url))
    listed = dict(ops.list_dlqs(channel))
    assert list(listed) == [dlq(q) for q in CONSUMED_QUEUES]
    assert all(isinstance(count, int) for count in listed.values())
    assert channel.is_open


def test_queue_names_accept_the_service_queue_or_its_dlq():
    assert ops.resolve_queue("intyg.status") == ops.resolve_queue("intyg.status.dlq") == "intyg.status.dlq"
    with pytest.raises(ValueError):
        ops.resolve_queue("intyg.nope")


# --- replay -----------------------------------------------------------------------------------------------------
def test_replay_of_selected_ids_republishes_them_unchanged_and_removes_exactly_those(channel, dead_letters, tag,
                                                                                     sender, amqp_url):
    queue, observer = dead_letters
    user, their_channel = sender
    key = f"{tag}.certificate.revoke"
    sent = {mid: put(their_channel, queue, mid, key, user_id=user) for mid in (f"{tag}-a", f"{tag}-b", f"{tag}-c")}
    progress: list[tuple[int, int]] = []

    result = ops.replay(channel, queue, {f"{tag}-a", f"{tag}-c"}, progress_cb=lambda *p: progress.append(p))

    assert (result.seen, result.selected, result.replayed, result.failed, result.requeued) == (3, 2, 2, 0, 1)
    assert result.not_found == set()
    assert progress[-1] == (3, 3)
    assert ids_in(channel, queue) == [f"{tag}-b"]
    replayed = drain(channel, observer)
    assert [p.message_id for _, p, _ in replayed] == [f"{tag}-a", f"{tag}-c"]
    for method, props, body in replayed:
        original_body, original = sent[props.message_id]
        assert method.exchange == COMMANDS_EXCHANGE and method.routing_key == key
        assert body == original_body
        assert (props.content_type, props.delivery_mode, props.correlation_id, props.reply_to, props.type) == (
            original.content_type, original.delivery_mode, original.correlation_id, original.reply_to, original.type)
        # why it was dead-lettered is dropped; the service's bookkeeping stays as it is (its signature covers it)
        expected_headers = {k: v for k, v in original.headers.items() if k not in (H_ERROR_CODE, H_ERROR,
                                                                                    H_DEAD_LETTERED_AT)}
        assert props.headers == expected_headers
        assert props.user_id == pika.URLParameters(amqp_url).credentials.username  # the operator who replays


def test_replay_keeps_the_user_id_of_the_publishing_user(channel, dead_letters, tag, amqp_url):
    queue, observer = dead_letters
    me = pika.URLParameters(amqp_url).credentials.username
    put(channel, queue, f"{tag}-mine", f"{tag}.certificate.revoke", user_id=me)
    assert ops.replay(channel, queue, None).replayed == 1
    [(_, props, _)] = drain(channel, observer)
    assert props.user_id == me and H_ORIGINAL_USER_ID not in props.headers


def test_dry_run_changes_nothing(channel, dead_letters, tag):
    queue, observer = dead_letters
    for i in range(3):
        put(channel, queue, f"{tag}-{i}", f"{tag}.certificate.revoke")
    result = ops.replay(channel, queue, None, dry_run=True)
    assert (result.seen, result.replayed, result.requeued, result.dry_run) == (3, 3, 3, True)
    assert ids_in(channel, queue) == [f"{tag}-{i}" for i in range(3)]
    assert drain(channel, observer) == []


def test_a_dead_letter_that_cannot_be_routed_is_kept(channel, dead_letters, tag):
    queue, observer = dead_letters
    channel.exchange_delete(UNROUTED)  # without the alternate exchange an unknown type comes back (mandatory)
    try:
        put(channel, queue, f"{tag}-lost", f"{tag}.nobody.listens")
        put(channel, queue, f"{tag}-ok", f"{tag}.certificate.revoke")
        result = ops.replay(channel, queue, None)
    finally:
        declare_exchanges(channel)
    assert (result.replayed, result.failed, result.requeued) == (1, 1, 1)
    assert ids_in(channel, queue) == [f"{tag}-lost"]
    assert [p.message_id for _, p, _ in drain(channel, observer)] == [f"{tag}-ok"]


def test_replay_of_all_terminates_with_many_messages_and_reports_unknown_ids(channel, dead_letters, tag):
    queue, observer = dead_letters
    for i in range(300):
        put(channel, queue, f"{tag}-{i}", f"{tag}.certificate.revoke")
    result = ops.replay(channel, queue, {f"{tag}-7", f"{tag}-nope"})
    assert (result.seen, result.replayed, result.requeued) == (300, 1, 299)
    assert result.not_found == {f"{tag}-nope"}
    assert ops.message_count(channel, queue) == 299
    assert ops.replay(channel, queue, None).replayed == 299
    assert ops.message_count(channel, queue) == 0
    assert len(drain(channel, observer)) == 200  # drain's own cap; the rest are there too


# --- purge ------------------------------------------------------------------------------------------------------
def test_purge_removes_only_the_selected(channel, dead_letters, tag):
    queue, observer = dead_letters
    for name in "abc":
        put(channel, queue, f"{tag}-{name}", f"{tag}.certificate.revoke")
    result = ops.purge(channel, queue, {f"{tag}-b"})
    assert (result.seen, result.purged, result.requeued) == (3, 1, 2)
    assert ids_in(channel, queue) == [f"{tag}-a", f"{tag}-c"]
    assert ops.purge(channel, queue, None).purged == 2
    assert ops.message_count(channel, queue) == 0
    assert drain(channel, observer) == []  # purging publishes nothing


# --- the command line -----------------------------------------------------------------------------------------
def test_cli_refuses_to_replay_or_purge_without_a_selection(amqp_url):
    runner = CliRunner()
    env = {"AMQP_URL": amqp_url}
    refused = runner.invoke(dlq_app, ["replay", "intyg.status"], env=env)
    assert refused.exit_code == 2 and "--all" in refused.output
    refused = runner.invoke(dlq_app, ["purge", "intyg.status", "--yes"], env=env)
    assert refused.exit_code == 2
    unknown = runner.invoke(dlq_app, ["show", "intyg.nope"], env=env)
    assert unknown.exit_code == 2


def test_cli_list_show_replay_purge(channel, amqp_url, tag):
    from service.topology import declare

    declare(channel, Settings(amqp_url=amqp_url))
    queue = dlq("intyg.consent")
    observer = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(observer, COMMANDS_EXCHANGE, routing_key=f"{tag}.consent.set")
    before = ops.message_count(channel, queue)
    for name in "ab":
        put(channel, queue, f"{tag}-{name}", f"{tag}.consent.set")
    runner = CliRunner()
    env = {"AMQP_URL": amqp_url}

    listed = runner.invoke(dlq_app, ["list", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    assert {"queue": queue, "messages": before + 2} in json.loads(listed.stdout)

    shown = runner.invoke(dlq_app, ["show", "intyg.consent", "--json", "--limit", "1000"], env=env)
    assert shown.exit_code == 0, shown.output
    assert {f"{tag}-a", f"{tag}-b"} <= {letter["message_id"] for letter in json.loads(shown.stdout)}

    dry = runner.invoke(dlq_app, ["replay", "intyg.consent", "--id", f"{tag}-a", "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert "would replay 1" in dry.stdout
    replayed = runner.invoke(dlq_app, ["replay", "intyg.consent.dlq", "--id", f"{tag}-a"], env=env)
    assert replayed.exit_code == 0, replayed.output
    assert [p.message_id for _, p, _ in drain(channel, observer)] == [f"{tag}-a"]

    purged = runner.invoke(dlq_app, ["purge", "intyg.consent", "--id", f"{tag}-b", "--yes"], env=env)
    assert purged.exit_code == 0, purged.output
    assert ops.message_count(channel, queue) == before


# --- the operator's view --------------------------------------------------------------------------------------------
@pytest.fixture
def night(tag, channel) -> Iterator[dt.datetime]:
    """A night of the test's own: the dead letters the test puts into the shared DLQs are the only ones in it
    (and are purged afterwards)."""
    start = dt.datetime(2030, 1, 1, 18, tzinfo=dt.UTC) + dt.timedelta(days=int(tag, 16) % 100_000)
    yield start
    mine = ops.Filter(since=start - dt.timedelta(days=1), until=start + dt.timedelta(days=1))
    for queue in (dlq("intyg.registration"), dlq("intyg.status")):
        ops.purge(channel, queue, None, where=mine)


def failed(channel, queue: str, routing_key: str, code: str, at: dt.datetime, body: dict[str, Any], *,
           message_id: str | None = None) -> str:
    """A dead letter as the service writes it: signed bookkeeping, code and time."""
    message_id = message_id or f"m-{uuid.uuid4()}"
    headers = retry.dead_letter_headers({}, message_id, retry.History(0, at), routing_key, user_id="portal",
                                        code=code, error=f"{code.lower()} for a test", now=at,
                                        signer=retry.Signer(b"test"))
    channel.basic_publish("", queue, json.dumps(body).encode(), pika.BasicProperties(
        message_id=message_id, content_type="application/json", delivery_mode=2, headers=headers))
    return message_id


def poisoned(channel, tag: str, routing_key: str, dead_letter_queue: str) -> str:
    """A dead letter of the broker itself: a quorum queue's delivery limit exceeded."""
    poison = f"test.{tag}.poison"
    channel.queue_declare(poison, durable=True, arguments={
        "x-queue-type": "quorum", "x-delivery-limit": 1, "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue})
    channel.queue_bind(poison, COMMANDS_EXCHANGE, routing_key=routing_key)
    message_id = f"poison-{tag}"
    channel.basic_publish(COMMANDS_EXCHANGE, routing_key, b'{"certificate_id": "c-1"}', pika.BasicProperties(
        message_id=message_id, content_type="application/json", delivery_mode=2))
    for _ in range(50):
        method, _props, _body = channel.basic_get(poison, auto_ack=False)
        if method is not None:
            channel.basic_nack(method.delivery_tag, requeue=True)
        elif ops.message_count(channel, dead_letter_queue) and not ops.message_count(channel, poison):
            break
        channel.connection.sleep(0.05)
    channel.queue_delete(poison)
    return message_id


@pytest.fixture
def topology(channel, amqp_url):
    from service.topology import declare

    declare(channel, Settings(amqp_url=amqp_url))


def cli_json(runner, *args, env) -> Any:
    result = runner.invoke(dlq_app, [*args, "--output", "json"], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def window(night: dt.datetime) -> list[str]:
    return ["--since", night.isoformat(), "--until", (night + dt.timedelta(hours=12)).isoformat()]


def test_show_masks_personal_data_and_prints_one_block_per_message_within_80_columns(channel, topology, amqp_url,
                                                                                      night):
    body = {"certificate": factories.certificate_json(id="c-masked", patient_id=PATIENT)}
    mid = failed(channel, dlq("intyg.registration"), "certificate.register", "INVALID_MESSAGE", night, body)
    runner, env = CliRunner(), {"AMQP_URL": amqp_url}

    shown = runner.invoke(dlq_app, ["show", "intyg.registration", *window(night)], env=env)
    assert shown.exit_code == 0, shown.output
    text = shown.stdout
    assert PATIENT not in text and "Ajla Doktor" not in text and factories.DOCUMENT["content"] not in text
    assert mid in text and '"id": "c-masked"' in text and "INVALID_MESSAGE: invalid_message for a test" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert shown.stderr == ""  # nothing revealed, nothing to record

    [as_json] = cli_json(runner, "show", "intyg.registration", *window(night), env=env)
    assert PATIENT not in json.dumps(as_json) and "body" not in as_json
    assert (as_json["message_id"], as_json["code"], as_json["dead_lettered_by"]) == (mid, "INVALID_MESSAGE",
                                                                                    "service")
    assert json.loads(as_json["body_masked"])["certificate"]["patient_id"] == ops.MASK


def test_a_body_is_shown_only_on_request_and_that_access_is_logged(channel, topology, amqp_url, night):
    body = {"certificate_id": "c-1", "patient_id": PATIENT, "recipient_id": "FKASSA", "sent_by": "CITIZEN"}
    mids = [failed(channel, dlq("intyg.status"), "certificate.send", "UNAVAILABLE", night, body) for _ in range(2)]
    mids.append(failed(channel, dlq("intyg.status"), "certificate.send", "UNAVAILABLE", night, body,
                       message_id="m-4bf92f35-77b3-4a3c-9e4f-201212121212"))  # an access record names it exactly
    runner, env = CliRunner(), {"AMQP_URL": amqp_url}

    shown = runner.invoke(dlq_app, ["show", "intyg.status", "--body", *window(night)], env=env)
    assert shown.exit_code == 0, shown.output
    assert PATIENT in shown.stdout
    [access] = [json.loads(line) for line in shown.stderr.splitlines()]
    assert access["event"] == "dead-letter bodies shown" and access["level"] == "warning"
    assert access["broker_user"] == pika.URLParameters(amqp_url).credentials.username
    assert (access["queue"], access["message_ids"]) == ("intyg.status.dlq", mids)
    assert access["timestamp"].endswith("Z") and "os_user" in access

    revealed = runner.invoke(dlq_app, ["show", "intyg.status", "--body", "-o", "json", *window(night)], env=env)
    assert [json.loads(letter["body"]) for letter in json.loads(revealed.stdout)] == [body] * 3
    assert json.loads(revealed.stderr)["message_ids"] == mids

    one = runner.invoke(dlq_app, ["show", "intyg.status", "--id", mids[1], "--body"], env=env)
    assert one.stdout.count(PATIENT) == 1 and json.loads(one.stderr)["message_ids"] == [mids[1]]


def test_summary_groups_by_code_and_replay_by_code_and_since_takes_exactly_that_group(channel, topology, amqp_url,
                                                                                      tag, night):
    queue = dlq("intyg.status")
    observer = channel.queue_declare("", exclusive=True).method.queue
    send, body = f"{tag}.certificate.send", {"certificate_id": "c-1"}
    channel.queue_bind(observer, COMMANDS_EXCHANGE, routing_key=send)
    earlier = failed(channel, queue, send, "UNAVAILABLE", night - dt.timedelta(hours=1), body)
    tonight = [failed(channel, queue, send, "UNAVAILABLE", night + dt.timedelta(minutes=m), body) for m in (5, 95)]
    failed(channel, queue, f"{tag}.certificate.revoke", "NOT_FOUND", night + dt.timedelta(minutes=30), body)
    poison = poisoned(channel, tag, f"{tag}.certificate.poison", queue)
    runner, env = CliRunner(), {"AMQP_URL": amqp_url}

    groups = cli_json(runner, "summary", "intyg.status", *window(night), env=env)
    assert [(g["code"], g["count"]) for g in groups] == [("UNAVAILABLE", 2), ("NOT_FOUND", 1)]
    assert groups[0]["types"] == {send: 2}
    assert [g["types"][f"{tag}.certificate.poison"] for g in cli_json(runner, "summary", "intyg.status", env=env)
            if g["code"] == "broker:delivery_limit"] == [1]
    [shown] = cli_json(runner, "show", "intyg.status", "--code", "broker:delivery_limit", env=env)[-1:]
    assert (shown["message_id"], shown["dead_lettered_by"], shown["broker_reason"]) == (poison, "broker",
                                                                                        "delivery_limit")
    text = runner.invoke(dlq_app, ["show", "intyg.status", "--code", "broker:delivery_limit"], env=env).stdout
    assert "dead-lettered by the broker, not by the service" in text

    since = night.isoformat()
    replayed = runner.invoke(dlq_app, ["replay", "intyg.status", "--code", "UNAVAILABLE", *window(night)], env=env)
    assert replayed.exit_code == 0, replayed.output
    assert "replayed 2 of" in replayed.stdout
    republished = drain(channel, observer)
    assert sorted(p.message_id for _, p, _ in republished) == sorted(tonight)
    for _, props, _ in republished:  # the signed bookkeeping travels unchanged
        assert props.headers[retry.H_SIGNATURE] and H_ERROR_CODE not in props.headers
    assert cli_json(runner, "show", "intyg.status", "--code", "UNAVAILABLE", *window(night), env=env) == []
    remaining = {g["code"]: g["count"] for g in cli_json(
        runner, "summary", "intyg.status", "--since", (night - dt.timedelta(hours=2)).isoformat(), "--until",
        (night + dt.timedelta(hours=12)).isoformat(), env=env)}
    assert remaining == {"UNAVAILABLE": 1, "NOT_FOUND": 1}  # the earlier one and the other code stay
    assert earlier in {letter["message_id"] for letter in cli_json(runner, "show", "intyg.status", "--code",
                                                                   "UNAVAILABLE", env=env)}

    purged = runner.invoke(dlq_app, ["purge", "intyg.status", "--yes", "--since",
                                     (night - dt.timedelta(hours=2)).isoformat(), "--until", since], env=env)
    assert purged.exit_code == 0 and "purged 1 of" in purged.stdout  # the earlier one
    assert earlier not in {letter["message_id"] for letter in cli_json(runner, "show", "intyg.status", env=env)}


def test_replay_refuses_ids_together_with_a_filter(amqp_url):
    refused = CliRunner().invoke(dlq_app, ["replay", "intyg.status", "--id", "m-1", "--code", "UNAVAILABLE"],
                                 env={"AMQP_URL": amqp_url})
    assert refused.exit_code == 2
