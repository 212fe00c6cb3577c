"""The AMQP properties and headers of the contract's messages (CONTRACT.md §2, §3, §7, §8), as models so that
the published contract (`intygstjanst asyncapi`) describes them from one place. These are AMQP basic
properties (`message_id`, `reply_to`, ...) except `DeadLetterHeaders`, which are application headers."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.base import Timestamp
from contracts.replies import Code
from contracts.topology import (
    H_ATTEMPTS,
    H_DEAD_LETTERED_AT,
    H_ERROR,
    H_ERROR_CODE,
    H_FIRST_ATTEMPT_AT,
    H_ORIGINAL_ROUTING_KEY,
    H_ORIGINAL_USER_ID,
    H_SIGNATURE,
    OWN_QUEUE_PREFIXES,
)

MESSAGE_ID_MAX_LENGTH = 128
SHORT_TEXT_MAX_LENGTH = 255  # an AMQP short string
JSON = "application/json"


class Properties(BaseModel):
    """What the service sets or reads; anything else a message carries is neither forbidden nor read."""

    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)


class RequestProperties(Properties):
    """AMQP properties of a command or query sent to the service: UTF-8 text without NUL, or the message is
    INVALID_MESSAGE."""

    message_id: str = Field(min_length=1, max_length=MESSAGE_ID_MAX_LENGTH,
                            description="Required. The service applies each message_id at most once: a message "
                                        "with a message_id already handled gets the same reply again and causes "
                                        "nothing else.")
    reply_to: str | None = Field(None, max_length=SHORT_TEXT_MAX_LENGTH,
                                 description="Where the reply goes (default exchange, this routing key; "
                                             "amq.rabbitmq.reply-to works). Optional for commands, required for "
                                             "queries. Never a queue whose name starts with "
                                             + " or ".join(f"`{p}`" for p in OWN_QUEUE_PREFIXES) + ".")
    correlation_id: str | None = Field(None, max_length=SHORT_TEXT_MAX_LENGTH,
                                       description="Copied to the reply; when absent the reply carries the "
                                                   "request's message_id.")
    content_type: Literal["application/json"] | None = Field(None, description="Absent means JSON.")
    type: str | None = Field(None, max_length=SHORT_TEXT_MAX_LENGTH,
                             description="When present it must equal the routing key.")
    user_id: str | None = Field(None, description="The publishing broker user (RabbitMQ checks it); its role "
                                                  "decides what it may send when roles are enforced.")


class ReplyProperties(Properties):
    """AMQP properties of a reply."""

    message_id: str = Field(description="`reply-` followed by the request's message_id.")
    correlation_id: str = Field(description="The request's correlation_id, or its message_id when it had none.")
    content_type: Literal["application/json"] = JSON


class EventProperties(Properties):
    """AMQP properties of an event or a recipient delivery (persistent)."""

    message_id: str = Field(description="The event_id: unique, and the same when the event is published again.")
    type: str = Field(description="The routing key.")
    content_type: Literal["application/json"] = JSON
    delivery_mode: Literal[2] = Field(2, description="Persistent.")


class DeadLetterHeaders(Properties):
    """Headers the service sets on a dead letter; body, properties and message_id stay as they arrived."""

    error_code: Code = Field(alias=H_ERROR_CODE, description="The reply code of why it was dead-lettered.")
    error: str = Field(alias=H_ERROR, max_length=500, description="What went wrong, for an operator.")
    attempts: int = Field(alias=H_ATTEMPTS, ge=1, description="How many times the service tried it.")
    original_routing_key: str = Field(alias=H_ORIGINAL_ROUTING_KEY,
                                      description="The routing key it was sent with; a replay uses it.")
    first_attempt_at: Timestamp = Field(alias=H_FIRST_ATTEMPT_AT, description="When the service first tried it.")
    dead_lettered_at: Timestamp = Field(alias=H_DEAD_LETTERED_AT, description="When it was dead-lettered.")
    original_user_id: str | None = Field(None, alias=H_ORIGINAL_USER_ID,
                                         description="The broker user that sent it; trusted only when an "
                                                     "operator replays the dead letter.")
    signature: str | None = Field(None, alias=H_SIGNATURE,
                                  description="The service's signature over its own bookkeeping headers, so that "
                                              "bookkeeping it did not write is recognised.")
