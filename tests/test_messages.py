"""Message (to send) and ReceivedMessage (delivered): conversions and clear errors."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from trio_sessions import Message, ReceivedMessage


def received(body: bytes, **kwargs: Any) -> ReceivedMessage:
    return ReceivedMessage(
        body=body,
        session_id="s",
        message_id=kwargs.pop("message_id", "m-1"),
        sequence_number=7,
        delivery_count=0,
        enqueued_time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        locked_until=None,
        lock_token=None,
        **kwargs,
    )


def test_message_bodies_and_properties() -> None:
    """A str body is UTF-8; bytearray is bytes; properties are copied to a dict."""
    props = {"k": 1}
    message = Message("héllo", session_id="s", application_properties=props, subject="x")
    props["k"] = 2
    assert message.body == "héllo".encode()
    assert message.application_properties == {"k": 1}
    assert Message(bytearray(b"ab")).body == b"ab"
    assert Message(b"x").session_id is None


def test_time_to_live() -> None:
    """time_to_live takes seconds or a timedelta, and must be positive."""
    assert Message(b"x", time_to_live=5).time_to_live == 5.0
    assert Message(b"x", time_to_live=dt.timedelta(minutes=1)).time_to_live == 60.0
    with pytest.raises(ValueError, match="time_to_live"):
        Message(b"x", time_to_live=0)
    with pytest.raises(TypeError, match="time_to_live"):
        Message(b"x", time_to_live="5")


@pytest.mark.parametrize(
    ("kwargs", "field", "error"),
    [
        ({"body": 5}, "body", TypeError),
        ({"body": None}, "body", TypeError),
        ({"body": b"", "session_id": 5}, "session_id", TypeError),
        ({"body": b"", "session_id": ""}, "session_id", ValueError),
        ({"body": b"", "message_id": 5}, "message_id", TypeError),
        ({"body": b"", "application_properties": [1]}, "application_properties", TypeError),
        ({"body": b"", "application_properties": {1: "x"}}, "application_properties", TypeError),
        ({"body": b"", "subject": b"x"}, "subject", TypeError),
    ],
)
def test_bad_messages_name_the_field(
    kwargs: dict[str, Any], field: str, error: type[Exception]
) -> None:
    """A bad field raises TypeError or ValueError naming it."""
    with pytest.raises(error, match=field):
        Message(**kwargs)


def test_text_and_json() -> None:
    """text() decodes the body; json() parses it."""
    message = received(b'{"a": [1, 2]}')
    assert message.text() == '{"a": [1, 2]}'
    assert message.json() == {"a": [1, 2]}


def test_invalid_json_names_the_message() -> None:
    """json() on a body that is not JSON raises ValueError naming the message id."""
    with pytest.raises(ValueError, match="'m-42'") as info:
        received(b"{not json", message_id="m-42").json()
    assert "sequence number 7" in str(info.value)


def test_received_messages_are_frozen_values() -> None:
    """ReceivedMessage is frozen and compares by value, ignoring raw."""
    import attrs

    a = received(b"x", raw=object())
    b = received(b"x", raw=object())
    assert a == b
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        a.body = b"y"  # type: ignore[misc]
