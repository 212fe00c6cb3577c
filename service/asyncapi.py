"""The contract as an AsyncAPI 3.0 document (`intygstjanst asyncapi`, committed as `docs/asyncapi.yaml`).

Nothing here names a message, a queue or a reply code: everything comes from what the code itself routes,
declares and publishes, so that the published contract cannot drift from it:

- commands and queries: `consumers.routes.ROUTES` (model, roles, query or not), one channel per routing key
  that `service.topology.planned` binds on `intyg.commands`, with the quorum queue it lands in;
- every other queue `planned` declares (dead-letter, recipient and whatever queues come next) is a channel of
  its own, carrying the events whose routing keys its bindings match, or the dead letters of its queue;
- events: `contracts.registry.EVENTS`; those that no declared queue collects are broadcasts on `intyg.events`;
- replies: `contracts.replies` (codes, their error ids and meanings); properties and dead-letter headers:
  `contracts.properties`; examples: `service.testdata.wire_example`, i.e. the tests' fixtures.

It describes the service with its default settings (recipients and retry delays are configuration).
Operations are the service's view: it *receives* what clients send and *sends* what clients receive.
"""
from __future__ import annotations

import inspect
import json
from typing import Any
from urllib.parse import urlsplit

import pika
import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from consumers.routes import CARE, CITIZEN, OPERATOR, ROUTES
from contracts import CONTRACT_VERSION
from contracts.certificate import StoredCertificate
from contracts.properties import DeadLetterHeaders, EventProperties, ReplyProperties, RequestProperties
from contracts.registry import EVENTS
from contracts.replies import ERROR_IDS, INFO_CODES, MEANINGS, Code, ErrorId, Reply, Result
from contracts.topology import CLIENT_HEADERS_KEPT, CONSUMED_QUEUES, EVENTS_EXCHANGE, dlq
from service.settings import Settings
from service.testdata import EXAMPLE_VALUES, SIGNED_AT, wire_example
from service.topology import DeclaredQueue, Summary, planned

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING = "0.3.0"
JSON = "application/json"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
RECIPIENT = "recipientId"  # the channel parameter that stands for every configured recipient
SCHEMAS = "#/components/schemas/"
FORMATS = ("yaml", "json")
REPLY = {  # AsyncAPI 3's request/reply: the address is the request's reply_to
    "address": {"description": "The request's reply_to, on the default exchange.",
                "location": "$message.header#/reply_to"},
    "channel": {"$ref": "#/channels/reply"},
    "messages": [{"$ref": "#/channels/reply/messages/reply"}],
}

ROLES = {
    CARE: "A broker user that `ROLES` maps to `care` (a care system), optionally limited to some care givers.",
    CITIZEN: "A broker user that `ROLES` maps to `citizen-portal` (a citizen portal acting for the patient).",
    OPERATOR: "A broker user that `ROLES` maps to `operator`: may send every message type, and replays dead "
              "letters.",
}
KINDS = {
    "command": "Changes something; the reply (when `reply_to` is set) comes once it is committed.",
    "query": "Reads; `reply_to` is required.",
    "event": "Published by the service on `intyg.events` once the change is committed.",
    "delivery": "Published by the service into a queue it declares.",
    "dead-letter": "What the service could not handle, kept for an operator.",
}


def document(settings: Settings | None = None) -> dict[str, Any]:
    """The AsyncAPI document of the service as `settings` (default: the default settings) declare it."""
    return _Builder(settings or Settings.model_construct()).build()


def render(doc: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if fmt == "yaml":
        return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1_000_000)
    raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


class _Dumper(yaml.SafeDumper):
    """Text of several lines as a literal block, so that a change of a description reads as one in review; no
    anchors and aliases for values that happen to be shared."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def topic_matches(binding_key: str, routing_key: str) -> bool:
    """AMQP topic matching: `*` is one word, `#` zero or more."""
    def match(pattern: list[str], words: list[str]) -> bool:
        if not pattern:
            return not words
        if pattern[0] == "#":
            return any(match(pattern[1:], words[i:]) for i in range(len(words) + 1))
        return bool(words) and pattern[0] in ("*", words[0]) and match(pattern[1:], words[1:])
    return match(binding_key.split("."), routing_key.split("."))


def _doc(model: type[BaseModel]) -> str:
    return inspect.cleandoc(model.__doc__ or "")


def _summary(model: type[BaseModel]) -> str:
    """The first sentence of the model's docstring (the whole of it is the payload's description)."""
    return _doc(model).split(". ")[0].rstrip(".") + "."


def _ref(path: str) -> dict[str, str]:
    return {"$ref": path}


def _binding(**fields: Any) -> dict[str, Any]:
    """An AMQP binding object; `is_` stands for its `is` field."""
    return {"amqp": {("is" if k == "is_" else k): v for k, v in fields.items()} | {"bindingVersion": AMQP_BINDING}}


class _Builder:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology: Summary = planned(settings)
        self.exchanges = {e.name: e for e in self.topology.exchanges}
        self.recipient_ids = [r.id for r in settings.recipients]
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        models = [r.model for r in ROUTES.values()] + list(EVENTS.values()) + [
            Reply, StoredCertificate, RequestProperties, ReplyProperties, EventProperties, DeadLetterHeaders]
        refs, definitions = models_json_schema([(m, "validation") for m in models],
                                               ref_template=SCHEMAS + "{model}")
        self.schemas: dict[str, Any] = definitions["$defs"]
        self.schema_ref = {model: refs[(model, "validation")] for model in models}

    def build(self) -> dict[str, Any]:
        self._reply_channel()
        queues = [q for q in self.topology.queues if q.role != "retry"]
        routed = {q.name for q in queues if q.bindings and all(self._route_of(b) for b in q.bindings)}
        for queue in queues:
            if queue.name in routed:
                for binding in queue.bindings:
                    self._command_channel(self._route_of(binding), binding, queue)
        collected: set[str] = set()
        for queue in self._queue_channels(queues, routed):
            collected |= self._queue_channel(queue, queues)
        for key, model in EVENTS.items():
            if key not in collected:
                self._broadcast_channel(key, model)
        return {
            "asyncapi": ASYNCAPI_VERSION,
            "info": self._info(),
            "defaultContentType": JSON,
            "servers": self._servers(),
            "channels": self.channels,
            "operations": self.operations,
            "components": {
                "schemas": self.schemas,
                "messages": self.messages,
                "securitySchemes": {role: {"type": "userPassword", "description": text}
                                    for role, text in ROLES.items()},
                "tags": {name: {"name": name, "description": text} for name, text in {**ROLES, **KINDS}.items()},
            },
        }

    # --- what the code declares ------------------------------------------------------------------------------

    def _route_of(self, binding: str) -> str | None:
        key = binding.split(": ", 1)[1]
        return key if key in ROUTES else None

    def _queue_channels(self, queues: list[DeclaredQueue], routed: set[str]) -> list[DeclaredQueue]:
        """Every declared queue that the command channels do not stand for; recipient queues as one."""
        out: list[DeclaredQueue] = []
        for queue in queues:
            if queue.name in routed or (queue.role == "recipient" and any(q.role == "recipient" for q in out)):
                continue
            out.append(queue)
        return out

    # --- servers and info ------------------------------------------------------------------------------------

    def _servers(self) -> dict[str, Any]:
        url = urlsplit(Settings.model_fields["amqp_url"].default)
        vhost = url.path.lstrip("/")

        def server(protocol: str, port: int, what: str) -> dict[str, Any]:
            return {
                "host": "{host}:{port}",
                "pathname": "/{vhost}",
                "protocol": protocol,
                "protocolVersion": "0-9-1",
                "title": f"RabbitMQ ({what})",
                "description": f"RabbitMQ 3.10 or newer, one node or a cluster; `{protocol}://user:password@host:"
                               f"port/vhost`, as in `AMQP_URL`.",
                "variables": {
                    "host": {"default": url.hostname, "description": "A broker node."},
                    "port": {"default": str(port), "description": f"The {what} port."},
                    "vhost": {"default": vhost, "description": "The virtual host, URL-encoded (`%2F` is `/`)."},
                },
                "security": [_ref(f"#/components/securitySchemes/{role}") for role in ROLES],
            }
        return {"rabbitmq": server("amqp", pika.connection.Parameters.DEFAULT_PORT, "plain AMQP"),
                "rabbitmq-tls": server("amqps", pika.connection.Parameters.DEFAULT_SSL_PORT, "TLS")}

    def _info(self) -> dict[str, Any]:
        return {
            "title": "Intygstjänsten (certificate service)",
            "version": CONTRACT_VERSION,
            "description": "\n".join([
                "The Swedish healthcare Certificate Service on RabbitMQ: care systems register medical "
                "certificates; citizens read, archive and send them to recipients such as Försäkringskassan; "
                "care reads, revokes and removes its copy; the citizen's consent decides what is deleted for good.",
                "",
                f"This is wire contract v{CONTRACT_VERSION} as the code implements it, generated from the code by "
                "`intygstjanst asyncapi` (do not edit by hand). Operations are the **service's** view: it "
                "*receives* the commands and queries you send (exchange `intyg.commands`, routing key = message "
                "type) and *sends* the replies, events and deliveries you receive.",
                "",
                "- Every message to the service needs a `message_id` (AMQP property): the service applies each "
                "`message_id` at most once, and a message sent again gets the same reply again.",
                "- The message headers below are AMQP basic properties (`message_id`, `reply_to`, ...), except "
                "the `x-intyg-*` headers of dead letters, which are application headers.",
                "- Bodies are UTF-8 JSON objects; unknown fields are rejected (`INVALID_MESSAGE`).",
                "- Who may send what: the security schemes (broker users mapped to a role) of each operation; "
                "checked when `ENFORCE_ROLES` is on.",
                "- The service's own retry/delay queues (`Q.retry.<ms>ms`) are internal and left out.",
            ]),
        }

    # --- replies ---------------------------------------------------------------------------------------------

    def _reply_channel(self) -> None:
        self.messages["reply"] = {
            "name": "reply",
            "title": "Reply",
            "summary": "The one reply to every message that carries reply_to (again, identical, on redelivery).",
            "description": _reply_codes_table(),
            "contentType": JSON,
            "headers": self.schema_ref[ReplyProperties],
            "payload": self.schema_ref[Reply],
            "correlationId": {"description": "The request's correlation_id, or its message_id when it had none.",
                              "location": "$message.header#/correlation_id"},
            "examples": _reply_examples(),
        }
        self.channels["reply"] = {
            "address": None,
            "title": "Replies",
            "description": "Each reply goes to the default exchange with the request's `reply_to` as routing "
                           f"key (`{DIRECT_REPLY_TO}` works).",
            "messages": {"reply": _ref("#/components/messages/reply")},
            "bindings": _binding(is_="routingKey", exchange={"name": "", "type": "default"}),
        }

    # --- commands and queries --------------------------------------------------------------------------------

    def _command_channel(self, key: str, binding: str, queue: DeclaredQueue) -> None:
        route = ROUTES[key]
        exchange = binding.split(": ", 1)[0]
        kind = "query" if route.query else "command"
        self.messages[key] = {
            "name": key,
            "title": key,
            "summary": _summary(route.model),
            "contentType": JSON,
            "headers": self.schema_ref[RequestProperties],
            "payload": self.schema_ref[route.model],
            "correlationId": {"description": "Copied to the reply.", "location": "$message.header#/correlation_id"},
            "bindings": _binding(messageType=key),
            "examples": [{"name": key, "summary": "From the tests' fixtures",
                          "headers": {"message_id": EXAMPLE_VALUES["request_id"], "reply_to": DIRECT_REPLY_TO,
                                      "content_type": JSON, "type": key},
                          "payload": wire_example(route.model)}],
        }
        dead_letters = dlq(queue.name) if any(q.name == dlq(queue.name) for q in self.topology.queues) else None
        lands = f"The broker routes it to the {queue.kind} queue `{queue.name}`" + (
            f" (dead letters: `{dead_letters}`)." if dead_letters else ".")
        self.channels[key] = {
            "address": key,
            "title": key,
            "description": f"Publish to exchange `{exchange}` with routing key `{key}`. {lands}"
                           + self._declare_note(exchange),
            "messages": {key: _ref(f"#/components/messages/{key}")},
            "bindings": self._exchange_binding(exchange, **{"x-intyg-queue": {
                "name": queue.name, "type": queue.kind, "durable": True, "deadLetterQueue": dead_letters,
                "arguments": queue.arguments}}),
        }
        self.operations[key] = {
            "action": "receive",
            "channel": _ref(f"#/channels/{key}"),
            "title": key,
            "description": f"{_doc(route.model)}\n\nSent by: {', '.join(sorted(route.roles))}. " + (
                "`reply_to` is required." if route.query else "With `reply_to` set, the reply comes once the "
                                                               "change is committed."),
            "security": [_ref(f"#/components/securitySchemes/{role}") for role in sorted(route.roles)],
            "tags": [_ref(f"#/components/tags/{name}") for name in (kind, *sorted(route.roles))],
            "bindings": _binding(ack=True),
            "messages": [_ref(f"#/channels/{key}/messages/{key}")],
            "reply": REPLY,
        }

    def _exchange(self, name: str) -> dict[str, Any]:
        return {"name": name, "type": self.exchanges[name].kind, "durable": True, "autoDelete": False}

    def _exchange_binding(self, name: str, **extensions: Any) -> dict[str, Any]:
        """A routing-key channel's binding; the exchange's declared arguments as `x-intyg-exchange-arguments`."""
        arguments = self.exchanges[name].arguments
        extra = {"x-intyg-exchange-arguments": arguments} if arguments else {}
        return _binding(is_="routingKey", exchange=self._exchange(name), **extra, **extensions)

    def _declare_note(self, name: str) -> str:
        arguments = self.exchanges[name].arguments
        if not arguments:
            return ""
        listed = ", ".join(f"`{k} = {v}`" for k, v in arguments.items())
        return (f" The service declares `{name}` with {listed}: a client that declares it must pass the same, or "
                "declare it passively.")

    # --- events ----------------------------------------------------------------------------------------------

    def _event_message(self, key: str, model: type[BaseModel]) -> str:
        """The message of an event; its id is the routing key with `R` for the recipient."""
        message_id = key.replace("{recipient_id}", "R")
        routing_key = key.format(recipient_id=EXAMPLE_VALUES["recipient_id"])
        payload = wire_example(model, type=routing_key)
        self.messages[message_id] = {
            "name": message_id,
            "title": message_id,
            "summary": _summary(model),
            "contentType": JSON,
            "headers": self.schema_ref[EventProperties],
            "payload": self.schema_ref[model],
            "bindings": _binding(messageType=key.replace("{recipient_id}", "{" + RECIPIENT + "}")),
            "examples": [{"name": message_id, "summary": "From the tests' fixtures",
                          "headers": {"message_id": payload["event_id"], "type": routing_key, "content_type": JSON,
                                      "delivery_mode": 2},
                          "payload": payload}],
        }
        return message_id

    def _broadcast_channel(self, key: str, model: type[BaseModel]) -> None:
        message_id = self._event_message(key, model)
        self.channels[key] = {
            "address": key,
            "title": key,
            "description": f"Bind a queue of your own to exchange `{EVENTS_EXCHANGE}` with `{key}` (or a pattern "
                           "such as `certificate.#`). Broadcast events carry no patient id and no document; the "
                           "events of one certificate are published in the order they happened.",
            "messages": {message_id: _ref(f"#/components/messages/{message_id}")},
            "bindings": self._exchange_binding(EVENTS_EXCHANGE),
        }
        self.operations[key] = {
            "action": "send",
            "channel": _ref(f"#/channels/{key}"),
            "title": key,
            "summary": self.messages[message_id]["summary"],
            "tags": [_ref("#/components/tags/event")],
            "bindings": _binding(deliveryMode=2, mandatory=True),
            "messages": [_ref(f"#/channels/{key}/messages/{message_id}")],
        }

    # --- queues of their own: deliveries, dead letters, and whatever else is declared ------------------------

    def _queue_channel(self, queue: DeclaredQueue, queues: list[DeclaredQueue]) -> set[str]:
        """A channel for one declared queue; returns the event routing keys it collects."""
        per_recipient = queue.role == "recipient"
        name = self._parametrised(queue.name) if per_recipient else queue.name
        bindings = [self._parametrised(b) for b in queue.bindings] if per_recipient else list(queue.bindings)
        channel_id = name.replace("{" + RECIPIENT + "}", "R")
        source = next((q for q in queues if dlq(q.name) == queue.name), None)
        collected: set[str] = set()
        messages: dict[str, Any] = {}
        if source is not None:
            message_id = self._dead_letter_message(source)
            messages[message_id] = _ref(f"#/components/messages/{message_id}")
            self._send(channel_id, message_id, "dead-letter", f"Dead-letters what `{source.name}` could not handle.",
                       None)
        for key, model in EVENTS.items():
            routing_key = key.replace("{recipient_id}", "{" + RECIPIENT + "}")
            if any(self._matches(b, routing_key) for b in bindings):
                collected.add(key)
                message_id = self._event_message(key, model)
                messages[message_id] = _ref(f"#/components/messages/{message_id}")
                self._send(channel_id, message_id, "delivery",
                           f"Published on `{EVENTS_EXCHANGE}` with routing key `{routing_key}`.", routing_key)
        bound = "; ".join(self._bound(b) for b in bindings)
        what = f"Dead letters of `{source.name}`." if source else ""
        channel: dict[str, Any] = {
            "address": name,
            "title": name,
            "description": " ".join(p for p in [f"Durable {queue.kind} queue `{name}`" + (f", {bound}." if bound
                                                                                         else "."), what,
                                                _per_recipient(self.recipient_ids) if per_recipient else ""] if p),
            "messages": messages,
            "bindings": _binding(is_="queue", queue={"name": name, "durable": True, "exclusive": False,
                                                     "autoDelete": False},
                                 **{"x-intyg-queue-type": queue.kind, "x-intyg-queue-arguments": queue.arguments,
                                    "x-intyg-bindings": bindings}),
        }
        if per_recipient:
            channel["parameters"] = {RECIPIENT: {"description": "A configured recipient's id.",
                                                 "examples": self.recipient_ids}}
        self.channels[channel_id] = channel
        if queue.name in CONSUMED_QUEUES:
            self._consumed(channel_id, messages)
        return collected

    def _consumed(self, channel_id: str, messages: dict[str, Any]) -> None:
        """The service consumes this queue itself and answers what it finds there."""
        self.operations[f"{channel_id}.receive"] = {
            "action": "receive",
            "channel": _ref(f"#/channels/{channel_id}"),
            "title": channel_id,
            "description": "The service consumes this queue and answers each message (when `reply_to` is set), "
                           "then dead-letters it.",
            "bindings": _binding(ack=True),
            "messages": [_ref(f"#/channels/{channel_id}/messages/{m}") for m in messages],
            "reply": REPLY,
        }

    def _bound(self, binding: str) -> str:
        exchange, key = binding.split(": ", 1)
        alternate_of = [e.name for e in self.exchanges.values() if e.arguments.get("alternate-exchange") == exchange]
        return f"bound to `{exchange}`" + (f" with `{key}`" if key else "") + "".join(
            f" (what `{name}` cannot route)" for name in alternate_of)

    def _parametrised(self, text: str) -> str:
        """A recipient queue's name or binding, with the recipient's id as the channel parameter."""
        first = self.recipient_ids[0]
        return text.replace(f".{first}.", ".{" + RECIPIENT + "}.").replace(f".{first}", ".{" + RECIPIENT + "}")

    def _matches(self, binding: str, routing_key: str) -> bool:
        exchange, pattern = binding.split(": ", 1)
        if exchange != EVENTS_EXCHANGE:
            return False
        kind = self.exchanges[exchange].kind
        return kind == "fanout" or (kind == "topic" and topic_matches(pattern, routing_key)) or pattern == routing_key

    def _send(self, channel_id: str, message_id: str, kind: str, description: str, routing_key: str | None) -> None:
        operation_id = message_id if kind != "dead-letter" else f"{channel_id}.dead-letter"
        extra = {"cc": [routing_key]} if routing_key else {}
        self.operations[operation_id] = {
            "action": "send",
            "channel": _ref(f"#/channels/{channel_id}"),
            "title": message_id,
            "summary": self.messages[message_id]["summary"],
            "description": description,
            "tags": [_ref(f"#/components/tags/{kind}")],
            "bindings": _binding(deliveryMode=2, mandatory=True, **extra),
            "messages": [_ref(f"#/channels/{channel_id}/messages/{message_id}")],
        }

    def _dead_letter_message(self, source: DeclaredQueue) -> str:
        message_id = f"{source.name}.dead-letter"
        keys = [k for k in (self._route_of(b) for b in source.bindings) if k]
        payload: dict[str, Any] = {"description": "The body exactly as it arrived: normally one of the messages "
                                                  "routed to the queue; whatever was sent for INVALID_MESSAGE."}
        if keys:
            payload["anyOf"] = [self.schema_ref[ROUTES[k].model] for k in keys] + [
                {"description": "anything else (an INVALID_MESSAGE)"}]
        example: dict[str, Any] = {"name": message_id, "summary": "Given up on after its retries",
                                   "headers": DeadLetterHeaders(
                                       error_code=Code.UNAVAILABLE, error="the database is unavailable",
                                       attempts=len(self.settings.retry_delays_s) + 1,
                                       original_routing_key=keys[0] if keys else "",
                                       first_attempt_at=SIGNED_AT, dead_lettered_at=SIGNED_AT,
                                   ).model_dump(mode="json", by_alias=True, exclude_none=True)}
        if keys:
            example["payload"] = wire_example(ROUTES[keys[0]].model)
        self.messages[message_id] = {
            "name": message_id,
            "title": f"Dead letter of {source.name}",
            "summary": f"A message `{source.name}` could not handle, with why.",
            "description": "Invalid messages are dead-lettered at once (after their INVALID_MESSAGE reply); "
                           "transient faults after the retries (UNAVAILABLE). Body, properties and message_id "
                           "are kept; of the sender's headers only "
                           + ", ".join(f"`{h}`" for h in CLIENT_HEADERS_KEPT) + ". `intygstjanst dlq replay` "
                           "republishes it to its original routing key, and the message_id rule makes sure nothing "
                           "is applied twice.",
            "contentType": JSON,
            "headers": self.schema_ref[DeadLetterHeaders],
            "payload": payload,
            "examples": [example],
        }
        return message_id


def _per_recipient(recipient_ids: list[str]) -> str:
    return (f"One per configured recipient (by default {', '.join(recipient_ids)}), declared by the service so "
            "that nothing sent to a recipient is lost before it connects.")


def _reply_codes_table() -> str:
    rows = ["| result | error_id | code | when |", "|---|---|---|---|",
            f"| {Result.OK.value} | – | – | done; `data` as the operation says |"]
    for code in Code:
        result = Result.INFO if code in INFO_CODES else Result.ERROR
        error_id = ERROR_IDS[code].value if code in ERROR_IDS else "–"
        rows.append(f"| {result.value} | {error_id} | `{code.value}` | {MEANINGS[code]} |")
    retry = ", ".join(e.value for e in ErrorId if e is not ErrorId.TECHNICAL_ERROR)
    return "\n".join([f"`error_id` follows RIV-TA: {retry} mean *do not resend*; "
                      f"{ErrorId.TECHNICAL_ERROR.value} means a resend later may succeed. `message` is for people "
                      "and never contains a personnummer.", "", *rows])


def _reply_examples() -> list[dict[str, Any]]:
    """OK, the first INFO code, and the first code of each error id."""
    request_id = EXAMPLE_VALUES["request_id"]
    codes = [next(c for c in Code if c in INFO_CODES)]
    codes += [next(c for c in Code if ERROR_IDS.get(c) is e) for e in ErrorId]
    replies = [Reply.ok(request_id)] + [Reply.for_code(c, request_id, MEANINGS[c]) for c in codes]
    return [{"name": reply.code.value if reply.code else reply.result.value,
             "headers": {"message_id": f"reply-{request_id}", "correlation_id": request_id, "content_type": JSON},
             "payload": reply.model_dump(mode="json")} for reply in replies]
