"""Names on the broker (CONTRACT.md §1): the one place that knows them."""
from __future__ import annotations

COMMANDS_EXCHANGE = "intyg.commands"
EVENTS_EXCHANGE = "intyg.events"

SERVICE_QUEUES: dict[str, tuple[str, ...]] = {
    "intyg.registration": ("certificate.register",),
    "intyg.status": ("certificate.revoke", "certificate.remove-care-copy", "care-giver.remove-care-copies",
                     "certificate.set-status", "certificate.send"),
    "intyg.consent": ("consent.set",),
    "intyg.query": ("certificate.get", "certificate.list", "certificate.get-for-care",
                    "certificate.list-for-care", "consent.get", "recipient.list"),
}

# Headers the service puts on dead letters and retries (CONTRACT.md §8).
H_ERROR_CODE = "x-intyg-error-code"
H_ERROR = "x-intyg-error"
H_ATTEMPTS = "x-intyg-attempts"
H_ORIGINAL_ROUTING_KEY = "x-intyg-original-routing-key"
H_DEAD_LETTERED_AT = "x-intyg-dead-lettered-at"
H_FIRST_ATTEMPT_AT = "x-intyg-first-attempt-at"
# A replay by an operator cannot carry the original `user_id` (the broker checks it against the
# publisher), so the original sender travels in this header and counts only when an operator publishes.
H_ORIGINAL_USER_ID = "x-intyg-original-user-id"


def dlq(queue: str) -> str:
    return f"{queue}.dlq"


def recipient_queue(recipient_id: str) -> str:
    return f"recipient.{recipient_id}"


def recipient_binding(recipient_id: str) -> str:
    return f"recipient.{recipient_id}.#"


def recipient_routing_key(recipient_id: str, what: str) -> str:
    return f"recipient.{recipient_id}.certificate.{what}"

