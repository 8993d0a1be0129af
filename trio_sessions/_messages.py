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


def _to_enqueue_time(value: object) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        raise TypeError(f"Message.scheduled_enqueue_time must be a datetime or None, not {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            "Message.scheduled_enqueue_time must be timezone-aware (e.g. tzinfo=datetime.UTC), "
            f"got {value!r}"
        )
    return value.astimezone(dt.UTC)


def _to_properties_to_modify(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise TypeError(f"properties_to_modify must be a mapping with str keys, not {value!r}")
    return dict(value)


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
        to, reply_to, reply_to_session_id: addressing properties, carried unchanged.
        scheduled_enqueue_time: a timezone-aware time before which the message is not
            delivered (Service Bus scheduled messages); None sends it at once.
        partition_key: carried unchanged (the MemoryBroker has no partitions).
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
    to: str | None = attrs.field(default=None, kw_only=True, validator=_optional_str("to"))
    reply_to: str | None = attrs.field(
        default=None, kw_only=True, validator=_optional_str("reply_to")
    )
    reply_to_session_id: str | None = attrs.field(
        default=None, kw_only=True, validator=_optional_str("reply_to_session_id")
    )
    scheduled_enqueue_time: dt.datetime | None = attrs.field(
        default=None, kw_only=True, converter=_to_enqueue_time
    )
    partition_key: str | None = attrs.field(
        default=None, kw_only=True, validator=_optional_str("partition_key")
    )

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
    ``time_to_live`` is the message's effective time to live in seconds (its own, else
    the entity's default), None if it never expires.
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
    to: str | None = None
    reply_to: str | None = None
    reply_to_session_id: str | None = None
    time_to_live: float | None = None
    scheduled_enqueue_time: dt.datetime | None = None
    partition_key: str | None = None
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
    """Give the message back: it is delivered again, first, with delivery_count + 1.

    ``properties_to_modify`` are merged into the message's application properties
    (Service Bus's ``propertiesToModify``).
    """

    message: ReceivedMessage
    properties_to_modify: dict[str, Any] | None = attrs.field(
        default=None, kw_only=True, converter=_to_properties_to_modify
    )


@attrs.frozen
class DeadLetter:
    """Move the message to the entity's dead-letter queue.

    ``properties_to_modify`` are merged into the message's application properties.
    """

    message: ReceivedMessage
    reason: str | None = None
    error_description: str | None = None
    properties_to_modify: dict[str, Any] | None = attrs.field(
        default=None, kw_only=True, converter=_to_properties_to_modify
    )


@attrs.frozen
class Defer:
    """Set the message aside: it is then only received by its sequence number.

    ``properties_to_modify`` are merged into the message's application properties.
    """

    message: ReceivedMessage
    properties_to_modify: dict[str, Any] | None = attrs.field(
        default=None, kw_only=True, converter=_to_properties_to_modify
    )


Settlement = Complete | Abandon | DeadLetter | Defer
