"""Messages: what is sent (`Message`), what is received (`ReceivedMessage`), and the
settlement commands a `SessionContext` sends to its session's actor."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "Abandon",
    "Complete",
    "DeadLetter",
    "Defer",
    "EntityPath",
    "Message",
    "ReceivedMessage",
    "Settlement",
]


def _body_to_bytes(value: object) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"Message.body must be bytes or str, not {type(value).__name__}")


def _optional_str(name: str) -> Any:
    def validate(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None and not isinstance(value, str):
            raise TypeError(f"Message.{name} must be a str or None, not {value!r}")

    return validate


def _to_properties(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"Message.application_properties must be a mapping with str keys, not {value!r}"
        )
    for key in value:
        if not isinstance(key, str):
            raise TypeError(f"Message.application_properties keys must be str, not {key!r}")
    return dict(value)


def _to_ttl(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"Message.time_to_live must be seconds (int or float), a timedelta or None, "
            f"not {value!r}"
        )
    if math.isnan(value) or value <= 0:
        raise ValueError(f"Message.time_to_live must be > 0 seconds, got {value!r}")
    return float(value)


@attrs.frozen
class Message:
    """A message to send with `MemoryBroker.send` or `AzureServiceBus.send`.

    Args:
        body: the payload; a str is encoded as UTF-8.
        session_id: the session (FIFO stream) the message belongs to; required by
            entities that require sessions.
        message_id: an id of the sender's choosing (Service Bus duplicate detection
            uses it); the broker makes one up when it is None.
        application_properties: user properties, str keys.
        content_type, correlation_id, subject: the standard Service Bus properties.
        time_to_live: seconds (or a `datetime.timedelta`) after which an undelivered
            message expires.
    """

    body: bytes = attrs.field(converter=_body_to_bytes)
    session_id: str | None = attrs.field(default=None, validator=_optional_str("session_id"))
    message_id: str | None = attrs.field(
        default=None, kw_only=True, validator=_optional_str("message_id")
    )
    application_properties: dict[str, Any] | None = attrs.field(
        default=None, kw_only=True, converter=_to_properties
    )
    content_type: str | None = attrs.field(
        default=None, kw_only=True, validator=_optional_str("content_type")
    )
    correlation_id: str | None = attrs.field(
        default=None, kw_only=True, validator=_optional_str("correlation_id")
    )
    subject: str | None = attrs.field(
        default=None, kw_only=True, validator=_optional_str("subject")
    )
    time_to_live: float | None = attrs.field(default=None, kw_only=True, converter=_to_ttl)

    @session_id.validator
    def _non_empty_session(self, attribute: attrs.Attribute[str | None], value: str | None) -> None:
        if value is not None and not value:
            raise ValueError("Message.session_id must be a non-empty str or None")


@attrs.frozen(kw_only=True)
class ReceivedMessage:
    """A message as delivered to a handler.

    ``delivery_count`` is the number of earlier deliveries of this message that ended
    without settlement (abandon, lock loss, release): 0 on the first delivery.
    ``locked_until`` is the lock's expiry at delivery and is not updated; see
    `SessionContext.locked_until` for the current one. ``raw`` is the backend's own
    object (the SDK's ``ServiceBusReceivedMessage`` on Azure), or None.
    """

    body: bytes
    session_id: str | None
    message_id: str | None
    sequence_number: int
    delivery_count: int
    enqueued_time: dt.datetime
    locked_until: dt.datetime | None
    lock_token: str | None
    application_properties: dict[str, Any] = attrs.field(factory=dict)
    content_type: str | None = None
    correlation_id: str | None = None
    subject: str | None = None
    dead_letter_reason: str | None = None
    dead_letter_error_description: str | None = None
    raw: object = attrs.field(default=None, repr=False, eq=False)

    def text(self, encoding: str = "utf-8") -> str:
        """The body decoded as text."""
        return self.body.decode(encoding)

    def json(self) -> Any:
        """The body parsed as JSON.

        Raises:
            ValueError: the body is not valid JSON (the message names the message id).
        """
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise ValueError(
                f"message {self.message_id!r} (sequence number {self.sequence_number}) "
                f"has a body that is not valid JSON: {exc}"
            ) from exc


@attrs.frozen
class EntityPath:
    """Where sessions are read from: a queue, or a topic's subscription."""

    queue_name: str | None = None
    topic_name: str | None = None
    subscription_name: str | None = None

    @property
    def path(self) -> str:
        """``"<queue>"`` or ``"<topic>/subscriptions/<subscription>"``."""
        if self.queue_name is not None:
            return self.queue_name
        return f"{self.topic_name}/subscriptions/{self.subscription_name}"

    def __str__(self) -> str:
        return self.path


@attrs.frozen
class Complete:
    """Settle the message as processed: it is removed from the entity."""

    message: ReceivedMessage


@attrs.frozen
class Abandon:
    """Give the message back: it is delivered again, first, with delivery_count + 1."""

    message: ReceivedMessage


@attrs.frozen
class DeadLetter:
    """Move the message to the entity's dead-letter queue."""

    message: ReceivedMessage
    reason: str | None = None
    error_description: str | None = None


@attrs.frozen
class Defer:
    """Set the message aside: it is then only received by its sequence number."""

    message: ReceivedMessage


Settlement = Complete | Abandon | DeadLetter | Defer
