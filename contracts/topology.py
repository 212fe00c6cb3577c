"""Names on the broker (CONTRACT.md §1): the one place that knows them."""
from __future__ import annotations

COMMANDS_EXCHANGE = "intyg.commands"
EVENTS_EXCHANGE = "intyg.events"
# What `intyg.commands` cannot route (an unknown message type) goes to this fanout exchange, declared as the
# commands exchange's alternate exchange, and from there to the queue of the same name (§1).
UNROUTED = "intyg.unrouted"

SERVICE_QUEUES: dict[str, tuple[str, ...]] = {
    "intyg.registration": ("certificate.register",),
    "intyg.status": ("certificate.revoke", "certificate.remove-care-copy", "care-giver.remove-care-copies",
                     "certificate.set-status", "certificate.send"),
    "intyg.consent": ("consent.set",),
    "intyg.query": ("certificate.get", "certificate.list", "certificate.get-for-care",
                    "certificate.list-for-care", "consent.get", "recipient.list", "access-log.list"),
}

# Every queue the service consumes: the service queues, and the unrouted queue (answered INVALID_MESSAGE).
CONSUMED_QUEUES: tuple[str, ...] = (*SERVICE_QUEUES, UNROUTED)

# §9: every access log entry goes to this queue (durable, quorum) for the national log service.
ACCESS_LOG_QUEUE = "intyg.access-log"
ACCESS_LOGGED = "access.logged"

# Headers the service puts on dead letters and retries (CONTRACT.md §8). A client's x-intyg-* headers are never
# read and never copied (§2).
H_ERROR_CODE = "x-intyg-error-code"
H_ERROR = "x-intyg-error"
H_ATTEMPTS = "x-intyg-attempts"
H_ORIGINAL_ROUTING_KEY = "x-intyg-original-routing-key"
H_DEAD_LETTERED_AT = "x-intyg-dead-lettered-at"
H_FIRST_ATTEMPT_AT = "x-intyg-first-attempt-at"
# A replay by an operator cannot carry the original `user_id` (the broker checks it against the
# publisher), so the original sender travels in this header and counts only when an operator publishes.
H_ORIGINAL_USER_ID = "x-intyg-original-user-id"
# HMAC of the service's own bookkeeping (message id, original user, original routing key, attempts), so that a copy
# whose bookkeeping the service did not write is recognised even if it comes in through the service's own user.
H_SIGNATURE = "x-intyg-signature"
# The only client headers the service copies onto what it republishes (retry copies, dead letters): W3C trace
# context, so a trace survives a retry. Anything else a client sends (CC, BCC, x-intyg-*, ...) is dropped.
CLIENT_HEADERS_KEPT = ("traceparent", "tracestate")


# Every queue the service declares starts with one of these; a reply_to naming one would make the service publish
# its reply into its own or a recipient's queue.
OWN_QUEUE_PREFIXES = ("intyg.", "recipient.")


def dlq(queue: str) -> str:
    return f"{queue}.dlq"


def recipient_queue(recipient_id: str) -> str:
    return f"recipient.{recipient_id}"


def recipient_binding(recipient_id: str) -> str:
    return f"recipient.{recipient_id}.#"


def recipient_routing_key(recipient_id: str, what: str) -> str:
    return f"recipient.{recipient_id}.certificate.{what}"

