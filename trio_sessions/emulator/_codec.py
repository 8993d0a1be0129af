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

__all__ = [
    "Unsupported",
    "amqp_value",
    "application_properties",
    "data",
    "encoded_annotations",
    "message_annotations",
    "properties",
    "sections",
    "timestamp",
]

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


def encoded_annotations(entries: Sequence[tuple[str, bytes]]) -> bytes:
    """The message-annotations section from its symbol keys and their values, each value
    encoded already (`amqp_value`, `timestamp`): what `message_annotations` writes, without
    a proton value to make and type-dispatch for each."""
    body = b"".join([_symbol_key(key) + value for key, value in entries])
    return _section(0x72, _compound(0xC1, 0xD1, 2 * len(entries), body))


def timestamp(milliseconds: int) -> bytes:
    """An AMQP timestamp: milliseconds since the Unix epoch."""
    return b"\x83" + _LONG.pack(milliseconds)


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


# -- decoding ------------------------------------------------------------------------------

_USHORT = struct.Struct(">H")
_SHORT = struct.Struct(">h")
_FLOAT = struct.Struct(">f")
_UINT_PAIR = struct.Struct(">II")


class Unsupported(Exception):
    """The input has something the fast decoder leaves to proton (a type or a shape)."""


def _fixed(width: int, convert: Callable[[bytes], Any]) -> Callable[[bytes, int], tuple[Any, int]]:
    def read(data: bytes, at: int) -> tuple[Any, int]:
        end = at + width
        if end > len(data):
            raise Unsupported("truncated")
        return convert(data[at:end]), end

    return read


def _sized(width: int, convert: Callable[[bytes], Any]) -> Callable[[bytes, int], tuple[Any, int]]:
    """A binary, string or symbol with a ``width``-byte length."""

    def read(data: bytes, at: int) -> tuple[Any, int]:
        start = at + width
        end = start + int.from_bytes(data[at:start], "big")
        if start > len(data) or end > len(data):
            raise Unsupported("truncated")
        return convert(data[start:end]), end

    return read


def _compound_reader(width: int, kind: str) -> Callable[[bytes, int], tuple[Any, int]]:
    """A list or map: size, count (``width`` bytes each), then the items."""

    def read(data: bytes, at: int) -> tuple[Any, int]:
        if width == 1:
            if at + 2 > len(data):
                raise Unsupported("truncated")
            size, count = data[at], data[at + 1]
        else:
            if at + 8 > len(data):
                raise Unsupported("truncated")
            size, count = _UINT_PAIR.unpack_from(data, at)
        end = at + width + size
        if size < width or end > len(data):
            raise Unsupported("bad size")
        items = []
        position = at + 2 * width
        for _ in range(count):
            item, position = _value(data, position)
            items.append(item)
        if position != end:
            raise Unsupported("the size disagrees with the items")
        if kind == "map":
            if count % 2:
                raise Unsupported("a map of an odd count")
            return dict(zip(items[::2], items[1::2], strict=True)), end
        return items, end

    return read


def _timestamp(raw: bytes) -> Any:
    import proton

    return proton.timestamp(_LONG.unpack(raw)[0])


def _readers() -> dict[int, Callable[[bytes, int], tuple[Any, int]]]:
    """Readers by constructor byte: the primitive types and the lists and maps of them;
    any other type (decimals, chars, arrays, described values) is `Unsupported`."""
    if _READERS:
        return _READERS

    def constant(value: Any) -> Callable[[bytes, int], tuple[Any, int]]:
        return lambda data, at: (value, at)

    def boolean(raw: bytes) -> bool:
        if raw[0] > 1:
            raise Unsupported("a boolean of neither 0 nor 1")
        return raw[0] == 1

    def text(raw: bytes) -> str:
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise Unsupported("not UTF-8") from exc

    def symbol(raw: bytes) -> str:
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise Unsupported("not ASCII") from exc

    def signed(raw: bytes) -> int:
        return int.from_bytes(raw, "big", signed=True)

    def unsigned(raw: bytes) -> int:
        return int.from_bytes(raw, "big")

    _READERS.update(
        {
            0x40: constant(None),
            0x41: constant(True),
            0x42: constant(False),
            0x43: constant(0),
            0x44: constant(0),
            0x45: constant([]),
            0x56: _fixed(1, boolean),
            0x50: _fixed(1, unsigned),
            0x52: _fixed(1, unsigned),
            0x53: _fixed(1, unsigned),
            0x60: _fixed(2, unsigned),
            0x70: _fixed(4, unsigned),
            0x80: _fixed(8, unsigned),
            0x51: _fixed(1, signed),
            0x54: _fixed(1, signed),
            0x55: _fixed(1, signed),
            0x61: _fixed(2, signed),
            0x71: _fixed(4, signed),
            0x81: _fixed(8, signed),
            0x72: _fixed(4, lambda raw: _FLOAT.unpack(raw)[0]),
            0x82: _fixed(8, lambda raw: _DOUBLE.unpack(raw)[0]),
            0x83: _fixed(8, _timestamp),
            0x98: _fixed(16, lambda raw: uuid.UUID(bytes=raw)),
            0xA0: _sized(1, bytes),
            0xB0: _sized(4, bytes),
            0xA1: _sized(1, text),
            0xB1: _sized(4, text),
            0xA3: _sized(1, symbol),
            0xB3: _sized(4, symbol),
            0xC0: _compound_reader(1, "list"),
            0xD0: _compound_reader(4, "list"),
            0xC1: _compound_reader(1, "map"),
            0xD1: _compound_reader(4, "map"),
        }
    )
    return _READERS


_READERS: dict[int, Callable[[bytes, int], tuple[Any, int]]] = {}


def _value(data: bytes, at: int) -> tuple[Any, int]:
    """The value at ``at`` and where the next one starts. Integers of every width come
    back as int, symbols as str, timestamps as ``proton.timestamp``."""
    if at >= len(data):
        raise Unsupported("truncated")
    reader = (_READERS or _readers()).get(data[at])
    if reader is None:
        raise Unsupported(f"constructor 0x{data[at]:02x}")
    return reader(data, at + 1)


#: The sections `sections` reads, by descriptor code: header, message-annotations,
#: properties, application-properties, data, amqp-value (in this order, as in §3.2).
_ORDER = {0x70: 0, 0x72: 1, 0x73: 2, 0x74: 3, 0x75: 4, 0x77: 4}


def sections(data: bytes | bytearray) -> dict[int, Any]:
    """The sections of an encoded AMQP message, by descriptor code, each decoded.

    Of several data sections (a batch's envelope) the last is kept, as proton does. Delivery
    annotations, sequences, footers, an unusual descriptor or value, a section out of
    order or anything malformed raise `Unsupported`: proton's decoder is the judge there.
    """
    data = bytes(data)  # proton hands a transfer's payload over as a bytearray
    found: dict[int, Any] = {}
    at, end, rank = 0, len(data), -1
    while at < end:
        if data[at : at + 2] != b"\x00\x53" or at + 3 > end:
            raise Unsupported("not a section with a small descriptor")
        code = data[at + 2]
        order = _ORDER.get(code)
        if order is None or order < rank or (order == rank and (code != 0x75 or code not in found)):
            raise Unsupported(f"section 0x{code:02x} here")
        rank = order
        value, at = _value(data, at + 3)
        if code == 0x75 and not isinstance(value, bytes):
            raise Unsupported("a data section that is not binary")
        found[code] = value
    return found
