"""AMQP 1.0 encoding of the messages the emulator delivers, written out directly.

Building each outgoing message through proton's ``Message`` (a wrapper per field, a
``Data`` tree per section, an encode loop that doubles its buffer from 16 bytes) was the
largest part of the emulator's CPU per delivered message. A Service Bus message has few
sections of simple values, so they are encoded here; a value of a type without a fast path
(a proton ``decimal128``, a list, ...) goes through proton's ``Data``, so every type proton
can encode still can be sent.
"""

from __future__ import annotations

import struct
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

__all__ = ["amqp_value", "application_properties", "data", "message_annotations", "properties"]

_LONG = struct.Struct(">q")
_DOUBLE = struct.Struct(">d")
_ULONG = struct.Struct(">Q")
_UINT = struct.Struct(">I")
_INT = struct.Struct(">i")


def _variable(small: int, large: int, payload: bytes) -> bytes:
    """A binary, string or symbol: one-byte length up to 255 bytes, else four."""
    size = len(payload)
    if size <= 255:
        return bytes((small, size)) + payload
    return bytes((large,)) + _UINT.pack(size) + payload


def _string(value: str) -> bytes:
    return _variable(0xA1, 0xB1, value.encode())


def _symbol(value: str) -> bytes:
    return _variable(0xA3, 0xB3, value.encode("ascii"))


def _binary(value: bytes) -> bytes:
    return _variable(0xA0, 0xB0, value)


def _long(value: int) -> bytes:
    if -128 <= value <= 127:
        return bytes((0x55, value & 0xFF))  # smalllong
    return b"\x81" + _LONG.pack(value)


def _ulong(value: int) -> bytes:
    if value == 0:
        return b"\x44"
    if value <= 255:
        return bytes((0x53, value))  # smallulong
    return b"\x80" + _ULONG.pack(value)


def _uint(value: int) -> bytes:
    if value == 0:
        return b"\x43"
    if value <= 255:
        return bytes((0x52, value))  # smalluint
    return b"\x70" + _UINT.pack(value)


def _int(value: int) -> bytes:
    if -128 <= value <= 127:
        return bytes((0x54, value & 0xFF))  # smallint
    return b"\x71" + _INT.pack(value)


def _compound(small: int, large: int, count: int, body: bytes) -> bytes:
    """A list or map: size (which counts the count field) and count, one byte or four."""
    if len(body) + 1 <= 255 and count <= 255:
        return bytes((small, len(body) + 1, count)) + body
    return bytes((large,)) + _UINT.pack(len(body) + 4) + _UINT.pack(count) + body


_ENCODERS: dict[type, Callable[[Any], bytes]] = {}


def _encoders() -> dict[type, Callable[[Any], bytes]]:
    """The fast paths, by exact type (proton's types are subclasses of int and str)."""
    import proton

    _ENCODERS.update(
        {
            bool: lambda value: b"\x41" if value else b"\x42",
            int: lambda value: _long(value) if -(2**63) <= value < 2**63 else _fallback(value),
            float: lambda value: b"\x82" + _DOUBLE.pack(value),
            str: _string,
            bytes: _binary,
            uuid.UUID: lambda value: b"\x98" + value.bytes,
            proton.symbol: _symbol,
            proton.timestamp: lambda value: b"\x83" + _LONG.pack(value),
            proton.int32: _int,
            proton.uint: _uint,
            proton.ulong: _ulong,
        }
    )
    return _ENCODERS


def _fallback(value: Any) -> bytes:
    import proton

    encoder = proton.Data()
    encoder.put_object(value)
    return bytes(encoder.encode())


def amqp_value(value: Any) -> bytes:
    """One AMQP value, as proton would type it (a Python int is a long, a str a string)."""
    if value is None:
        return b"\x40"
    encoder = (_ENCODERS or _encoders()).get(type(value))
    return _fallback(value) if encoder is None else encoder(value)


def _section(code: int, value: bytes) -> bytes:
    return bytes((0x00, 0x53, code)) + value


def _map(mapping: Mapping[Any, Any], key: Callable[[Any], bytes]) -> bytes:
    body = b"".join([key(k) + amqp_value(v) for k, v in mapping.items()])
    return _compound(0xC1, 0xD1, 2 * len(mapping), body)


_SYMBOLS: dict[str, bytes] = {}


def _symbol_key(name: str) -> bytes:
    """An annotation key: the same few names on every message, so encoded once each."""
    encoded = _SYMBOLS.get(name)
    if encoded is None:
        encoded = _SYMBOLS[name] = _symbol(name)
    return encoded


def message_annotations(annotations: Mapping[str, Any]) -> bytes:
    """The message-annotations section: symbol keys."""
    return _section(0x72, _map(annotations, _symbol_key))


def properties(fields: Sequence[Any]) -> bytes:
    """The properties section from its fields in order (message-id, user-id, to, subject,
    reply-to, correlation-id, content-type, ...); trailing Nones are left out, and so is
    the whole section when every field is None. Give each field the AMQP type it must
    have (a content type is a ``proton.symbol``)."""
    count = len(fields)
    while count and fields[count - 1] is None:
        count -= 1
    if not count:
        return b""
    body = b"".join([b"\x40" if field is None else amqp_value(field) for field in fields[:count]])
    return _section(0x73, _compound(0xC0, 0xD0, count, body))


def application_properties(mapping: Mapping[str, Any]) -> bytes:
    """The application-properties section (string keys), or nothing when empty."""
    return _section(0x74, _map(mapping, _string)) if mapping else b""


def data(body: bytes) -> bytes:
    """A data section: the body as binary."""
    return _section(0x75, _binary(body))
