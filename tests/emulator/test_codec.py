"""The emulator's own AMQP encoder agrees with proton's decoder, value by value."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_sessions.emulator import _codec

proton = pytest.importorskip("proton")

INT64 = st.integers(-(2**63), 2**63 - 1)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    st.integers(2**63, 2**64 - 1).map(proton.ulong),  # beyond a long: proton's fallback
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.uuids(),
    st.text(st.characters(max_codepoint=127)).map(proton.symbol),
    INT64.map(proton.timestamp),
    st.integers(-(2**31), 2**31 - 1).map(proton.int32),
    st.integers(0, 2**32 - 1).map(proton.uint),
    st.integers(0, 2**64 - 1).map(proton.ulong),
    st.integers(0, 255).map(proton.ubyte),  # no fast path: proton's Data encodes it
)


def decoded(encoded: bytes) -> Any:
    data = proton.Data()
    data.decode(encoded)
    data.rewind()
    data.next()
    value = data.get_object()
    return bytes(value) if isinstance(value, memoryview) else value  # a view into data


@given(VALUES)
def test_each_value_decodes_to_itself_with_its_type(value: Any) -> None:
    back = decoded(_codec.amqp_value(value))
    assert back == value
    assert type(back) is type(value)


@given(st.dictionaries(st.text(), VALUES, max_size=40))
def test_application_properties_of_any_size(properties: dict[str, Any]) -> None:
    """Small maps use one-byte sizes, large ones four; empty ones are left out."""
    encoded = _codec.application_properties(properties)
    if not properties:
        assert encoded == b""
        return
    message = proton.Message()
    message.decode(_codec.data(b"") + encoded)
    assert message.properties == properties


def test_a_whole_message() -> None:
    """Annotations, properties (trailing fields left out), application properties and a
    body of more than 255 bytes read back as proton reads messages."""
    body = bytes(range(256)) * 2
    encoded = (
        _codec.message_annotations({"x-opt-sequence-number": 7, "x-opt-a": proton.int32(1)})
        + _codec.properties(["id", None, None, "subject", None, "corr", proton.symbol("t/x")])
        + _codec.application_properties({"k": "v", "u": uuid.UUID(int=5)})
        + _codec.data(body)
    )
    message = proton.Message()
    message.decode(encoded)
    assert message.annotations == {"x-opt-sequence-number": 7, "x-opt-a": 1}
    assert (message.id, message.subject, message.correlation_id) == ("id", "subject", "corr")
    assert (message.content_type, message.group_id) == ("t/x", None)
    assert message.properties == {"k": "v", "u": uuid.UUID(int=5)}
    assert message.body == body
    assert _codec.properties([None, None]) == b""


@given(st.dictionaries(st.text(st.characters(max_codepoint=127)), VALUES, max_size=40))
def test_annotations_from_encoded_values(annotations: dict[str, Any]) -> None:
    """The section from values encoded one by one is the section `message_annotations` writes."""
    entries = [(key, _codec.amqp_value(value)) for key, value in annotations.items()]
    assert _codec.encoded_annotations(entries) == _codec.message_annotations(annotations)


@given(INT64)
def test_a_timestamp(milliseconds: int) -> None:
    assert _codec.timestamp(milliseconds) == _codec.amqp_value(proton.timestamp(milliseconds))
