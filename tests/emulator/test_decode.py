"""The emulator's own decoder of incoming messages reads what proton's reads, or leaves the
message to proton."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_sessions.emulator import _codec
from trio_sessions.emulator._server import _Connection, _Decoded

proton = pytest.importorskip("proton")

INT64 = st.integers(-(2**63), 2**63 - 1)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.uuids(),
    st.text(st.characters(max_codepoint=127)).map(proton.symbol),
    st.integers(-(2**40), 2**40).map(proton.timestamp),
    st.integers(-(2**31), 2**31 - 1).map(proton.int32),
    st.integers(0, 2**32 - 1).map(proton.uint),
    st.integers(0, 2**64 - 1).map(proton.ulong),
    st.integers(0, 255).map(proton.ubyte),
    st.integers(-(2**15), 2**15 - 1).map(proton.short),
    st.floats(width=32, allow_nan=False).map(proton.float32),
    st.text(max_size=1).filter(bool).map(proton.char),  # proton's decoder only
    st.lists(st.integers(-5, 5), max_size=2),  # likewise
)
IDS = st.one_of(
    st.none(),
    st.text(),
    st.uuids(),
    st.integers(0, 2**64 - 1).map(proton.ulong),  # proton's decoder only
    st.binary(max_size=4),  # likewise
)
# Proton's message fields are C strings, which end at a NUL (pyamqp and our decoder keep
# it), so the reference cannot say what such a field should give: none is generated.
TEXT = st.one_of(
    st.none(),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=300),
)
SYMBOLS = st.text(st.characters(max_codepoint=127), min_size=1).map(proton.symbol)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A message as proton encodes it (its body an amqp-value section, if any)."""
    message = proton.Message()
    message.id, message.correlation_id = draw(IDS), draw(IDS)
    message.address, message.subject, message.reply_to = draw(TEXT), draw(TEXT), draw(TEXT)
    message.group_id, message.reply_to_group_id = draw(TEXT), draw(TEXT)
    content_type = draw(st.none() | st.text(st.characters(max_codepoint=127)))
    if content_type is not None:
        message.content_type = content_type
    message.ttl = draw(st.integers(0, 2**32 - 1)) / 1000
    message.durable = draw(st.booleans())
    message.properties = draw(st.none() | st.dictionaries(st.text(), VALUES, max_size=20))
    message.annotations = draw(st.none() | st.dictionaries(SYMBOLS, VALUES, max_size=5))
    message.body = draw(st.none() | st.binary(max_size=600) | st.text(max_size=300))
    return bytes(message.encode())


@st.composite
def sdk_messages(draw: st.DrawFn) -> bytes:
    """A message as the SDKs send one: properties, then data sections (a batch has several)."""
    fields = [draw(IDS), None, draw(TEXT), draw(TEXT), draw(TEXT), draw(IDS)]
    fields += [draw(st.none() | SYMBOLS), None, None, None, draw(TEXT), None, draw(TEXT)]
    annotations = draw(st.dictionaries(SYMBOLS, VALUES, max_size=3))
    bodies = draw(st.lists(st.binary(max_size=300), min_size=1, max_size=3))
    return (
        (_codec.message_annotations(annotations) if annotations else b"")
        + _codec.properties(fields)
        + _codec.application_properties(draw(st.dictionaries(st.text(), VALUES, max_size=20)))
        + b"".join(_codec.data(body) for body in bodies)
    )


def by_proton(encoded: bytes) -> Any:
    message = proton.Message()
    message.decode(encoded)
    return _Connection._to_message(message)


@given(messages() | sdk_messages())
def test_the_same_message_as_through_proton(encoded: bytes) -> None:
    try:
        decoded = _Decoded(_codec.sections(bytearray(encoded)))  # as proton hands it over
    except _codec.Unsupported:
        return  # proton's decoder reads it
    assert _Connection._to_message(decoded) == by_proton(encoded)


def test_what_the_sdks_send_is_read_without_proton() -> None:
    encoded = (
        _codec.message_annotations({"x-opt-partition-key": "p"})
        + _codec.properties([str(uuid.UUID(int=1)), None, None, "subject", None, "c"])
        + _codec.application_properties({"n": proton.int32(3), "t": proton.timestamp(0)})
        + _codec.data(b"body")
    )
    message = _Connection._to_message(_Decoded(_codec.sections(encoded)))
    assert message == by_proton(encoded)
    assert (message.body, message.partition_key, message.subject) == (b"body", "p", "subject")


@pytest.mark.parametrize(
    "encoded",
    [
        b"\x00\x53\x71\xc1\x01\x00" + _codec.data(b"x"),  # delivery annotations
        _codec.data(b"x") + _codec.properties(["id"]),  # sections out of order
        _codec.properties([proton.ulong(7)]) + _codec.data(b"x"),  # a ulong message-id
        _codec.application_properties({"d": proton.char("c")}),  # a char
        _codec.application_properties({"l": [1]}),  # a list value
        _codec.data(b"x")[:-1],  # truncated
        b"\x00\x53\x75\xa1\x01x",  # a data section that is not binary
        b"\x00\x80" + bytes(7) + b"\x75\xa0\x00",  # a ulong descriptor
    ],
)
def test_anything_else_is_left_to_proton(encoded: bytes) -> None:
    with pytest.raises(_codec.Unsupported):
        _Decoded(_codec.sections(encoded))
