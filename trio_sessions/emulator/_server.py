"""The emulator's server: python-qpid-proton's AMQP 1.0 engine, driven sans-IO on Trio sockets.

One task per TCP connection reads bytes into a proton ``Transport``, handles the events the
``Collector`` reports, and writes what the transport produces. Proton does the framing,
SASL and AMQP state machines; this module decides what each frame means for the
`MemoryBroker` (it translates, it does not re-implement broker semantics).

Status (first step of the emulator issue): SASL ANONYMOUS, CBS put-token with SAS
validation, and sender links that enqueue single messages. Batches, receivers,
settlement and ``$management`` come next.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import hmac
import importlib
import math
import secrets
import socket
import time
import types
import urllib.parse
import uuid
from collections import deque
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._errors import (
    EntityNotFoundError,
    MessageAlreadySettledError,
    MessageLockLostError,
    MessageNotFoundError,
    MessageSizeExceededError,
    OperationTimeoutError,
    ServiceBusConnectionError,
    SessionCannotBeLockedError,
    SessionLockLostError,
    SessionsNotEnabledError,
)
from .._messages import Abandon, Complete, DeadLetter, Defer, EntityPath, Message, Settlement
from .._options import ReceiveMode
from .._redact import library_logger
from ..backends._memory import MemoryReceiver
from . import _codec

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ..backends._memory import MemoryBroker

__all__ = ["Emulator", "serve_emulator"]

logger = library_logger("trio_sessions.emulator")

#: Largest frame we accept and announce (Service Bus Standard uses 256 KiB).
MAX_FRAME_SIZE = 262144
#: Largest message we accept on a sender link (Service Bus Standard: 256 KiB).
MAX_MESSAGE_SIZE = 262144
#: .NET ticks (100 ns since 0001-01-01) at the Unix epoch: locked-until-utc is in ticks.
TICKS_AT_EPOCH = 621355968000000000
#: Server-side wait for a next-available session when the client names none (ms).
DEFAULT_ACCEPT_WAIT_MS = 60000
SESSION_FILTER = "com.microsoft:session-filter"
#: ``$management`` operations on an entity, served without a receiver's lock.
ENTITY_OPERATIONS = frozenset(
    {
        "com.microsoft:peek-message",
        "com.microsoft:schedule-message",
        "com.microsoft:cancel-scheduled-message",
    }
)
#: How long closing a broker link may take when a client goes away (it is shielded).
CLOSE_TIMEOUT = 5.0
#: Link credit granted to clients' senders, refilled below half.
CREDIT = 1000
#: Seconds of silence after which a client is dropped (it is told half: AMQP 1.0 §2.4.5).
DEFAULT_IDLE_TIMEOUT = 240.0
#: Seconds a write to a client may make no progress before the client is dropped.
DEFAULT_WRITE_TIMEOUT = 30.0
#: Bytes produced for one client and not yet written to its socket above which the
#: emulator stops taking deliveries for it from the broker and stops reading its requests.
OUTPUT_LIMIT = 1 << 20
#: Messages taken from the broker at once for one receiver link (bounds the output overshoot).
DELIVERY_BATCH = 32
#: Seconds spent discarding a client's last input after our close, so it reads our close
#: frame instead of a connection reset.
LINGER = 2.0
AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
#: First-section descriptor codes of an encoded AMQP message (header .. footer).
_SECTION_CODES = frozenset(bytes([code]) for code in range(0x70, 0x79))
#: How an encoded AMQP message starts: a described section with one of those codes.
_BATCH_BODY_STARTS = frozenset(b"\x00\x53" + code for code in _SECTION_CODES)


@functools.cache
def _proton() -> Any:
    try:
        import proton
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise RuntimeError(
            'the emulator needs python-qpid-proton: pip install "trio-sessions[emulator]"'
        ) from exc
    return proton


@functools.cache
def _cproton() -> Any:
    """proton's C API (python-qpid-proton's ``cproton`` module, 0.39 and later)."""
    _proton()
    return importlib.import_module("cproton")


@functools.cache
def _event_kinds() -> types.SimpleNamespace:
    """proton's event types by name (``DELIVERY``, ...), as the numbers the C API reports."""
    proton = _proton()
    return types.SimpleNamespace(
        **{
            name: kind.number
            for name, kind in vars(proton.Event).items()
            if isinstance(kind, proton.EventType)
        }
    )


def _accept(delivery: Any) -> None:
    """``delivery.update(ACCEPTED)``, without proton's copying of the local disposition's
    data, annotations and condition first (an accepted outcome has none): the emulator
    accepts every message sent and echoes most settlements so."""
    c = _cproton()
    c.pn_delivery_update(delivery._impl, c.PN_ACCEPTED)


class _Event:
    """A proton event seen through the C API, wrapping only what a handler asks for.

    proton's own ``Event`` builds wrappers for the delivery, link, session, connection and
    transport of every event, a good part of the emulator's time per message.
    """

    __slots__ = ("_impl",)

    def __init__(self, impl: Any) -> None:
        self._impl = impl

    @property
    def delivery(self) -> Any:
        return _proton().Delivery.wrap(_cproton().pn_event_delivery(self._impl))

    @property
    def link(self) -> Any:
        return _proton().Link.wrap(_cproton().pn_event_link(self._impl))

    @property
    def session(self) -> Any:
        return _proton().Session.wrap(_cproton().pn_event_session(self._impl))


def sas_token_valid(token: str, *, audience: str, keys: dict[str, str], now: float) -> str | None:
    """Check a ``SharedAccessSignature`` token; return None if valid, else why not."""
    prefix = "SharedAccessSignature "
    if not token.startswith(prefix):
        return "not a SharedAccessSignature token"
    parts = dict(part.split("=", 1) for part in token[len(prefix) :].split("&") if "=" in part)
    try:
        resource, signature, expiry, key_name = (parts[k] for k in ("sr", "sig", "se", "skn"))
    except KeyError as missing:
        return f"the token has no {missing.args[0]} field"
    key = keys.get(urllib.parse.unquote_plus(key_name))
    if key is None:
        return "unknown key name"
    expected = base64.b64encode(
        hmac.new(key.encode(), f"{resource}\n{expiry}".encode(), hashlib.sha256).digest()
    ).decode()
    if not hmac.compare_digest(expected, urllib.parse.unquote_plus(signature)):
        return "invalid signature"
    if not expiry.isdigit() or int(expiry) <= now:
        return "the token expired"
    if not audience.startswith(urllib.parse.unquote_plus(resource).rstrip("/")):
        return "the token is for another resource"
    return None


def entity_from_address(address: str | None) -> str:
    """``amqps://host:port/<entity>`` or ``<entity>`` → the broker's entity path."""
    path = address or ""
    if "://" in path:
        path = path.split("://", 1)[1].split("/", 1)[1] if "/" in path.split("://", 1)[1] else ""
    parts = path.split("/")
    if len(parts) == 3 and parts[1].lower() == "subscriptions":
        return f"{parts[0]}/subscriptions/{parts[2]}"
    return path


def _optional_seconds(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{attribute.name} must be None or seconds > 0, got {value!r}")


@attrs.define(eq=False)
class Emulator:
    """A running emulator: where it listens and how to connect.

    ``idle_timeout`` (seconds, None for never) is how long a client may stay silent before
    the emulator closes its connection with ``amqp:resource-limit-exceeded``; the open frame
    announces half of it, so clients that honour it send empty frames in time. A client
    that has not sent its AMQP open within ``idle_timeout`` of connecting is dropped too.
    It applies to connections opened after it is set.

    ``write_timeout`` (seconds, None for never): a client that stops reading, so that a
    write to it makes no progress for that long, is dropped. Before that, once more than
    ``OUTPUT_LIMIT`` bytes (1 MiB) made for a client wait to be written, the emulator stops
    taking deliveries for it from the broker and stops reading its requests, so a client
    that does not read costs bounded memory and never holds up other connections.
    """

    broker: MemoryBroker
    host: str
    port: int
    key_name: str
    key: str = attrs.field(repr=False)
    idle_timeout: float | None = attrs.field(
        default=DEFAULT_IDLE_TIMEOUT, validator=_optional_seconds, kw_only=True
    )
    write_timeout: float | None = attrs.field(
        default=DEFAULT_WRITE_TIMEOUT, validator=_optional_seconds, kw_only=True
    )
    _reply_delay: float = attrs.field(default=0.0, init=False, repr=False)
    _connections: set[_Connection] = attrs.field(factory=set, init=False, repr=False)

    @property
    def connections(self) -> int:
        """How many client connections are open now."""
        return len(self._connections)

    @property
    def container_ids(self) -> list[str]:
        """The container-id each open client connection announced (sorted; '' before its
        open). The Python SDK sends ``SBSender-<uuid>``/``SBReceiver-<uuid>``, or the
        ``client_identifier`` it was given."""
        return sorted(c.container_id for c in self._connections)

    def drop_connections(
        self,
        *,
        container_id: str | None = None,
        session_id: str | None = None,
        keep_locks: bool = False,
    ) -> int:
        """Fault injection: cut client connections now, as a network failure would.

        With no argument every connection is cut; ``container_id`` cuts only the connections
        that announced it (see `container_ids`), ``session_id`` only those whose receivers
        hold that session's lock; both given, a connection must match both. The sessions the
        cut clients held are released at once (unsettled messages come back with
        delivery_count + 1); the clients see their connection fail. Returns how many
        connections were cut.

        With ``keep_locks=True`` the cut is one the broker does not see (a network
        partition rather than a client that closed or crashed): the sessions and message
        locks the clients held stay locked until their lock duration runs out, as Service
        Bus keeps a vanished client's locks, so nobody else takes them meanwhile.
        """
        dropped = [
            connection
            for connection in self._connections
            if (container_id is None or connection.container_id == container_id)
            and (session_id is None or session_id in connection.session_ids())
        ]
        for connection in dropped:
            connection.drop(keep_locks=keep_locks)
        return len(dropped)

    def delay_replies(self, seconds: float) -> None:
        """Fault injection: hold back everything the emulator sends by ``seconds``.

        Replies to CBS ``put-token`` and ``$management`` requests, attach, flow and
        disposition echoes, deliveries and empty frames all leave that much later than they
        were produced, on every connection, as over a slow network; their order is kept.
        It applies to what is produced from now on; ``delay_replies(0)`` ends it. A delay
        above half a client's idle-time-out can make that client give up (as it should).

        Raises:
            ValueError: ``seconds`` is not a finite number >= 0.
        """
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 <= seconds < math.inf
        ):
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        self._reply_delay = float(seconds)

    @property
    def connection_string(self) -> str:
        """A connection string the Service Bus SDKs accept (``UseDevelopmentEmulator=true``)."""
        return (
            f"Endpoint=sb://{self.host}:{self.port};SharedAccessKeyName={self.key_name};"
            f"SharedAccessKey={self.key};UseDevelopmentEmulator=true"
        )


@attrs.define(eq=False)
class _Receiving:
    """A client's session receiver link, served by its own task."""

    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    flow: trio.Event = attrs.field(factory=trio.Event)
    link: Any = None  # the MemorySessionLink, once accepted
    #: The pump's wait for messages; a drain request cancels it (nothing to send now).
    waiting: trio.CancelScope | None = None


def _header(delivery_count: int, ttl_ms: int | None = None) -> bytes:
    """A message header with every field written out.

    proton elides trailing default fields, and pyamqp does not pad message sections, so
    a ``delivery-count`` of 0 left to proton reaches the SDK as None (spec §5.4).
    ``ttl_ms`` is the time to live in milliseconds (a uint, so at most 2**32 - 1).
    """
    first_acquirer = 0x41 if delivery_count == 0 else 0x42
    ttl = b"\x40" if ttl_ms is None else b"\x70" + min(ttl_ms, 2**32 - 1).to_bytes(4, "big")
    fields = (
        bytes([0x42, 0x50, 0x04])  # durable false, priority 4 (ubyte)
        + ttl
        + bytes([first_acquirer, 0x70])
        + delivery_count.to_bytes(4, "big")  # delivery-count (uint)
    )
    # header: list8 of 5 fields; the size byte counts the count byte and the fields
    return bytes([0x00, 0x53, 0x70, 0xC0, len(fields) + 1, 0x05]) + fields


def _from_amqp(value: Any) -> Any:
    """An application property value as proton decoded it → a plain Python value.

    AMQP timestamps become aware UTC datetimes, binaries bytes, symbols and chars str,
    and proton's int and float subclasses (int32, ulong, float32, ...) plain numbers.
    """
    proton = _proton()
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    if isinstance(value, proton.timestamp):
        try:
            return dt.datetime.fromtimestamp(int(value) / 1000, dt.UTC)
        except (OverflowError, ValueError, OSError):  # beyond datetime's range
            return int(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value  # uuid.UUID, decimal.Decimal


def _to_amqp(value: Any) -> Any:
    """A plain Python application property value → what proton should encode.

    An int goes as AMQP int when it fits, else long (else ulong); a datetime as a
    timestamp. The SDKs read int and long alike.
    """
    proton = _proton()
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return proton.int32(value)
        if -(2**63) <= value < 2**63:
            return int(value)
        return proton.ulong(value)
    if isinstance(value, dt.datetime):
        return proton.timestamp(round(value.timestamp() * 1000))
    return value


def _ticks(moment: dt.datetime) -> int:
    return TICKS_AT_EPOCH + round(moment.timestamp() * 10_000_000)


#: What each field of a message's header and properties sections may be for `_Decoded`:
#: the types the SDKs send; anything else is left to proton's decoder.
_HEADER_TYPES: tuple[tuple[type, ...], ...] = ((bool,), (int,), (int,), (bool,), (int,))
_PROPERTY_TYPES: tuple[tuple[type, ...], ...] = (
    (str, uuid.UUID),  # message-id (a ulong or binary id goes through proton)
    (bytes,),  # user-id
    (str,),  # to
    (str,),  # subject
    (str,),  # reply-to
    (str, uuid.UUID),  # correlation-id
    (str,),  # content-type
    (str,),  # content-encoding
    (int,),  # absolute-expiry-time (a proton.timestamp)
    (int,),  # creation-time
    (str,),  # group-id
    (int,),  # group-sequence
    (str,),  # reply-to-group-id
)
#: Application property and annotation values `_Decoded` takes (no lists or maps).
_SIMPLE_TYPES = (bool, int, float, str, bytes, uuid.UUID)


def _checked(fields: Any, types: tuple[tuple[type, ...], ...]) -> list[Any]:
    """A header or properties list, each field None or of its type, padded with None."""
    if not isinstance(fields, list) or len(fields) > len(types):
        raise _codec.Unsupported("a header or properties section of another shape")
    for field, allowed in zip(fields, types, strict=False):
        if field is not None and (
            not isinstance(field, allowed) or (type(field) is bool and bool not in allowed)
        ):
            raise _codec.Unsupported("a header or property field of another type")
    return fields + [None] * (len(types) - len(fields))


def _simple_map(value: Any) -> dict[Any, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str | int) and (v is None or isinstance(v, _SIMPLE_TYPES))
        for k, v in value.items()
    ):
        raise _codec.Unsupported("a map of other keys or values")
    return value


class _Decoded:
    """An incoming message read by `_codec.sections`, with the attributes of proton's
    ``Message`` that `_Connection._to_message` reads, of the same values.

    Decoding a transfer through proton's ``Message`` (a ``Data`` tree per section, a
    wrapper per value) was a large part of the emulator's CPU per message sent. Raises
    `_codec.Unsupported` for anything outside what the SDKs send; the caller then uses
    proton's decoder, so every message proton reads is still read the same.
    """

    __slots__ = (
        "address",
        "annotations",
        "body",
        "content_type",
        "correlation_id",
        "group_id",
        "id",
        "properties",
        "reply_to",
        "reply_to_group_id",
        "subject",
        "ttl",
    )

    def __init__(self, found: dict[int, Any]) -> None:
        header = _checked(found.get(0x70, []), _HEADER_TYPES)
        fields = _checked(found.get(0x73, []), _PROPERTY_TYPES)
        self.annotations = _simple_map(found.get(0x72))
        self.properties = _simple_map(found.get(0x74))
        body = found.get(0x75, found.get(0x77))
        if body is not None and not isinstance(body, bytes | str):
            raise _codec.Unsupported("a body of another type")
        self.body = body
        self.ttl = (header[2] or 0) / 1000  # proton: seconds, 0 when absent
        (self.id, _, self.address, self.subject, self.reply_to, self.correlation_id) = fields[:6]
        self.content_type = fields[6]
        self.group_id, _, self.reply_to_group_id = fields[10:]


def _data_object(data: Any) -> Any:
    """The first value held by a proton ``Data`` (a terminus filter), or None."""
    data.rewind()
    return data.get_object() if data.next() else None


class _Connection:
    """One client connection: a proton transport between a Trio stream and the broker."""

    def __init__(self, emulator: Emulator, stream: trio.SocketStream) -> None:
        proton = _proton()
        self._p = proton
        self._emulator = emulator
        self._stream = stream
        self._keep_locks = False  # see Emulator.drop_connections
        self._connection = proton.Connection()
        self._transport = proton.Transport(proton.Transport.SERVER)
        self._transport.max_frame_size = MAX_FRAME_SIZE
        if emulator.idle_timeout is not None:
            self._transport.idle_timeout = emulator.idle_timeout
        self._opened = trio.Event()
        self.container_id = ""
        # chunks taken from proton, each with the time it may be written (delay_replies)
        self._outbox: deque[tuple[float, bytes]] = deque()
        self._outbox_bytes = 0
        self._written = 0
        sasl = self._transport.sasl()
        sasl.allowed_mechs("ANONYMOUS")
        self._transport.bind(self._connection)
        self._collector = proton.Collector()
        self._connection.collect(self._collector)
        self._tags = 0
        self._work = trio.Event()
        self._drained = trio.Event()
        self._receivers: dict[str, _Receiving] = {}
        self._nursery: trio.Nursery | None = None
        # The write loop's one timer (heartbeat, idle time-out, delayed reply), moved
        # rather than made anew for each wait; `_timer_task` wakes the loop when it fires.
        self._timer = trio.CancelScope()
        self._writer_idle = False  # the write loop waits for work (see `_write_now`)
        # The stream's socket, duplicated for non-blocking calls: trio's socket methods
        # take a scheduling round-trip (and a cancel scope for the write timeout) each.
        raw = stream.socket
        self._sock = socket.fromfd(raw.fileno(), raw.family, raw.type)
        self._sock.setblocking(False)

    async def serve(self) -> None:
        self._emulator._connections.add(self)
        try:
            finished = False
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read)
                nursery.start_soon(self._expect_open)
                nursery.start_soon(self._timer_task)
                try:
                    finished = await self._write_loop()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._emulator._connections.discard(self)
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        if finished:
            await self._linger()

    def session_ids(self) -> set[str]:
        """The sessions this connection's receivers hold locked."""
        return {
            receiving.link.session_id
            for receiving in self._receivers.values()
            if receiving.link is not None and not isinstance(receiving.link, MemoryReceiver)
        }

    def drop(self, *, keep_locks: bool = False) -> None:
        """End this connection without a goodbye; its tasks release what it held, or with
        ``keep_locks`` leave it locked until the locks expire."""
        self._keep_locks = keep_locks
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _expect_open(self) -> None:
        """Drop a client that connects and never opens (proton times out only open ones)."""
        timeout = self._emulator.idle_timeout
        if timeout is None:
            return
        with trio.move_on_after(timeout):
            await self._opened.wait()
            return
        logger.info("dropping a client that sent no AMQP open within %s s", timeout)
        self.drop()

    async def _read(self) -> None:
        transport = self._transport
        while True:
            await self._output_room()  # a client that does not read its replies is not read
            data = await self._receive()
            if not data:
                transport.close_tail()
                self._work.set()
                return
            while data:
                capacity = transport.capacity()
                if capacity < 0:  # the transport is closed for input
                    self._work.set()
                    return
                if capacity == 0:  # input is full until our output drains: wait for the writer
                    self._work.set()
                    await self._drained.wait()
                    continue
                transport.push(data[:capacity])
                data = data[capacity:]
                self._handle_events()
            self._write_now()

    async def _receive(self) -> bytes:
        """What the client sent next (b"" at its end, or if the connection failed)."""
        sock = self._sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(65536)
            except BlockingIOError:  # a spurious wake-up
                continue
            except OSError:  # reset by the client: as its end
                return b""

    def _backlog(self) -> int:
        """Bytes made for the client and not yet written to its socket."""
        c = _cproton()
        buffered = 0
        session = c.pn_session_head(self._connection._impl, 0)
        while not c.isnull(session):  # through the C API: no wrapper per session and read
            buffered += c.pn_session_outgoing_bytes(session)  # deliveries not framed yet
            session = c.pn_session_next(session, 0)
        pending: int = c.pn_transport_pending(self._transport._impl)
        return self._outbox_bytes + max(pending, 0) + buffered

    async def _output_room(self) -> None:
        """Wait while more than OUTPUT_LIMIT bytes wait to be written to the client."""
        while self._backlog() > OUTPUT_LIMIT:
            self._work.set()  # the writer takes what proton holds
            await self._drained.wait()

    def _wake_drained(self) -> None:
        self._drained.set()
        self._drained = trio.Event()

    async def _write_loop(self) -> bool:
        """Write what proton produces, each chunk held back by `Emulator.delay_replies`.

        Returns True when the AMQP connection is over (closed, or ended by a protocol
        error), False when the client is gone or stopped reading.
        """
        transport = self._transport
        outbox = self._outbox
        while True:
            self._handle_events()
            # tick first: it may produce an empty frame (heartbeat) or an idle-timeout close
            deadline = transport.tick(time.monotonic())
            pending = transport.pending()
            now = trio.current_time()
            if pending > 0:
                outbox.append((now + self._emulator._reply_delay, transport.peek(pending)))
                transport.pop(pending)
                self._outbox_bytes += pending
            if outbox and outbox[0][0] <= now:
                chunk = outbox.popleft()[1]
                sent = await self._send(chunk)
                self._outbox_bytes -= len(chunk)
                self._wake_drained()
                if not sent:
                    return False
                continue
            if pending < 0 and not outbox:  # the transport is done for output
                if transport.condition is not None:
                    logger.info("closing a client connection: %s", transport.condition)
                if not self._written:  # e.g. a TLS header: answer ours (AMQP 1.0 §2.2)
                    await self._send(AMQP_HEADER)
                return True
            wake = math.inf if not deadline else now + deadline - time.monotonic()
            if outbox:
                wake = min(wake, outbox[0][0])
            if wake < self._timer.deadline:  # it fires early at worst: the loop looks again
                self._timer.deadline = wake
            self._work = trio.Event()
            self._writer_idle = True
            try:
                await self._work.wait()
            finally:
                self._writer_idle = False

    def _write_now(self) -> None:
        """Have what proton made for the client written: from this task at once if the
        write loop waits and holds nothing back (it saves a wake-up of the write loop per
        message), else by the write loop."""
        if not self._writer_idle or self._outbox or self._emulator._reply_delay:
            self._work.set()
            return
        transport = self._transport
        deadline = transport.tick(time.monotonic())
        pending = transport.pending()
        if pending < 0:  # the transport is done for output: the write loop ends it
            self._work.set()
            return
        if pending:
            chunk = transport.peek(pending)
            transport.pop(pending)
            try:
                sent = self._sock.send(chunk)
            except OSError:  # the socket is full (or broken): the write loop waits (or sees)
                sent = 0
            self._written += sent
            if sent < pending:
                self._outbox.append((trio.current_time(), chunk[sent:]))
                self._outbox_bytes += pending - sent
                self._work.set()
                return
            self._wake_drained()
            if transport.pending() < 0:  # that was the last: the write loop ends it
                self._work.set()
                return
        if deadline:  # as the write loop would set its timer
            wake = trio.current_time() + deadline - time.monotonic()
            if wake < self._timer.deadline:
                self._timer.deadline = wake

    async def _timer_task(self) -> None:
        """Wake the write loop when its timer (`_timer`'s deadline) comes."""
        while True:
            with self._timer:
                await trio.sleep_forever()
            self._timer = trio.CancelScope()  # no deadline until the write loop sets one
            self._work.set()

    async def _send(self, chunk: bytes) -> bool:
        """Write ``chunk``; False if the client is gone or read nothing for write_timeout."""
        timeout = self._emulator.write_timeout
        sock = self._sock
        view = memoryview(chunk)
        try:
            while view:
                try:
                    view = view[sock.send(view) :]
                    continue
                except BlockingIOError:  # the client's window is full: wait for progress
                    pass
                with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
                    await trio.lowlevel.wait_writable(sock)
                if scope.cancelled_caught:
                    logger.warning("dropping a client that read nothing for %s s", timeout)
                    return False
        except OSError:  # the client is gone
            return False
        self._written += len(chunk)
        return True

    async def _linger(self) -> None:
        """After the last frame: half-close and discard the client's remaining input for a
        while, so that it reads our close frame rather than a reset."""
        with trio.move_on_after(LINGER):
            try:
                await self._stream.send_eof()
                while await self._stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # -- events --------------------------------------------------------------------------

    def _handle_events(self) -> None:
        event_type = _event_kinds()
        c = _cproton()
        collector = self._collector._impl
        while not c.isnull(impl := c.pn_collector_peek(collector)):
            kind = c.pn_event_type(impl)
            if kind == event_type.TRANSPORT:  # output pending: the commonest, nothing to do
                c.pn_collector_pop(collector)
                continue
            event = _Event(impl)
            if kind == event_type.CONNECTION_REMOTE_OPEN:
                self._connection.container = "trio-sessions-emulator"
                self._connection.open()
                self.container_id = self._connection.remote_container or ""
                self._opened.set()
            elif kind == event_type.SESSION_REMOTE_OPEN:
                event.session.incoming_capacity = 2**30
                event.session.open()
            elif kind == event_type.LINK_REMOTE_OPEN:
                self._on_attach(event.link)
            elif kind == event_type.DELIVERY:
                self._on_delivery(event.delivery)
            elif kind == event_type.LINK_FLOW:
                receiving = self._receivers.get(event.link.name)
                if receiving is not None:
                    receiving.flow.set()
                    if receiving.waiting is not None and event.link.drain_mode:
                        receiving.waiting.cancel()
            elif kind in (event_type.LINK_REMOTE_CLOSE, event_type.LINK_REMOTE_DETACH):
                receiving = self._receivers.get(event.link.name)
                if receiving is not None:
                    receiving.scope.cancel()  # its task closes the broker link
                event.link.close()
            elif kind == event_type.SESSION_REMOTE_CLOSE:
                event.session.close()
            elif kind == event_type.CONNECTION_REMOTE_CLOSE:
                self._connection.close()
            elif kind == event_type.TRANSPORT_TAIL_CLOSED:
                self._on_input_closed()
            c.pn_collector_pop(collector)

    def _on_input_closed(self) -> None:
        """proton stops reading at a frame it cannot decode, silently: say so and close.

        (At EOF or a framing error it has set its own condition, and after the client's
        close ours is under way.)
        """
        if self._transport.condition is None and not (
            self._connection.state & self._p.Endpoint.LOCAL_CLOSED
        ):
            self._connection.condition = self._condition(
                "amqp:decode-error", "the emulator could not decode a frame"
            )
            self._connection.close()

    def _on_attach(self, link: Any) -> None:
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        if link.is_receiver:  # the client sends on it
            address = link.remote_target.address
            if address != "$cbs" and not address.endswith("$management"):
                link.max_message_size = MAX_MESSAGE_SIZE
                try:
                    self._emulator.broker._send_targets(entity_from_address(address))
                except EntityNotFoundError as exc:
                    self._refuse(link, "amqp:not-found", str(exc))
                    return
            link.open()
            link.flow(CREDIT)
        elif link.remote_source.address == "$cbs" or link.remote_source.address.endswith(
            "$management"
        ):
            link.open()
        else:
            self._attach_receiver(link)

    def _attach_receiver(self, link: Any) -> None:
        """A client's receiver: find the entity, then accept its session in a task."""
        p = self._p
        entity = entity_from_address(link.remote_source.address)
        try:
            target = self._emulator.broker._entity(entity)
        except EntityNotFoundError:
            self._refuse(
                link,
                "amqp:not-found",
                f"The messaging entity 'sb://{self._emulator.host}/{entity}' could not be found.",
            )
            return
        filters = _data_object(link.remote_source.filter) or {}
        mode = (
            ReceiveMode.RECEIVE_AND_DELETE
            if link.remote_snd_settle_mode == p.Link.SND_SETTLED
            else ReceiveMode.PEEK_LOCK
        )
        if not target.requires_session and SESSION_FILTER not in filters:
            receiving = _Receiving(
                link=self._emulator.broker.open_receiver(entity, receive_mode=mode)
            )
            self._receivers[link.name] = receiving
            link.open()
            assert self._nursery is not None
            self._nursery.start_soon(self._serve_plain_receiver, link, receiving, mode)
            return
        if not target.requires_session or SESSION_FILTER not in filters:
            self._refuse(
                link,
                "amqp:not-allowed",
                f"entity {entity!r} "
                + (
                    "does not require sessions"
                    if not target.requires_session
                    else "requires a session receiver"
                ),
            )
            return
        session_id = filters[SESSION_FILTER]
        properties = link.remote_properties or {}
        wait_ms = properties.get(p.symbol("com.microsoft:timeout"), DEFAULT_ACCEPT_WAIT_MS)
        receiving = _Receiving()
        self._receivers[link.name] = receiving
        assert self._nursery is not None
        self._nursery.start_soon(
            self._serve_receiver,
            link,
            receiving,
            entity,
            None if session_id is None else str(session_id),
            int(wait_ms) / 1000,
            mode,
        )

    async def _serve_receiver(
        self,
        link: Any,
        receiving: _Receiving,
        entity: str,
        session_id: str | None,
        wait: float,
        mode: ReceiveMode,
    ) -> None:
        p = self._p
        broker = self._emulator.broker
        try:
            with receiving.scope:
                try:
                    memlink = await broker.accept_session(
                        EntityPath(queue_name=entity),
                        session_id,
                        receive_mode=mode,
                        max_wait_time=wait,
                    )
                except OperationTimeoutError as exc:
                    self._refuse(link, "com.microsoft:timeout", str(exc))
                    return
                except SessionCannotBeLockedError as exc:
                    self._refuse(link, "com.microsoft:session-cannot-be-locked", str(exc))
                    return
                except SessionsNotEnabledError as exc:
                    self._refuse(link, "amqp:not-allowed", str(exc))
                    return
                receiving.link = memlink
                memlink.on_lock_lost(lambda exc: self._detach_lost(link, receiving, exc))
                link.source.filter.clear()
                link.source.filter.put_dict({p.symbol(SESSION_FILTER): memlink.session_id})
                link.properties = {
                    p.symbol("com.microsoft:locked-until-utc"): _ticks(memlink.locked_until_utc)
                }
                link.open()
                self._work.set()
                await self._pump(link, receiving, mode)
        except SessionLockLostError as exc:
            link.condition = self._condition("com.microsoft:session-lock-lost", str(exc))
            link.close()
        finally:
            with trio.CancelScope(deadline=trio.current_time() + CLOSE_TIMEOUT, shield=True):
                await self._forget(link, receiving)

    def _detach_lost(self, link: Any, receiving: _Receiving, exc: SessionLockLostError) -> None:
        """The broker took the session's lock away: detach the link now, as Service Bus does,
        rather than when the client next grants credit."""
        link.condition = self._condition("com.microsoft:session-lock-lost", str(exc))
        link.close()
        receiving.scope.cancel()
        self._work.set()

    async def _serve_plain_receiver(
        self, link: Any, receiving: _Receiving, mode: ReceiveMode
    ) -> None:
        """A receiver of an entity without sessions: messages are locked one by one."""
        try:
            with receiving.scope:
                await self._pump(link, receiving, mode)
        finally:
            with trio.CancelScope(deadline=trio.current_time() + CLOSE_TIMEOUT, shield=True):
                await self._forget(link, receiving)

    async def _pump(self, link: Any, receiving: _Receiving, mode: ReceiveMode) -> None:
        """Deliver the broker link's messages as fast as the client grants credit.

        A client may ask to drain (the JS SDK does when its wait ends): the messages
        available now go out, and the credit left is handed back in a flow with drain set
        (delivery-count advanced, credit 0), which is what the client waits for. proton
        sends that flow only if some credit is left, so a drain does not spend the last
        of several credits on a locked message: one the broker handed over beyond that is
        released to it again, undelivered.
        """
        while True:
            while link.credit <= 0:
                receiving.flow = trio.Event()
                await receiving.flow.wait()
            await self._output_room()
            batch = min(link.credit, DELIVERY_BATCH)
            if link.drain_mode:
                messages = await self._available(receiving.link, batch)
            else:
                messages = []
                with trio.CancelScope() as receiving.waiting:
                    messages = await receiving.link.receive(batch)
                receiving.waiting = None
                if not messages:  # a drain request cancelled the wait
                    continue
            if link.drain_mode and mode is ReceiveMode.PEEK_LOCK and link.credit > 1:
                for message in messages[link.credit - 1 :]:
                    receiving.link._release(message)
                messages = messages[: link.credit - 1]
            for message in messages:
                self._deliver(link, receiving, message, mode)
            if link.drain_mode and len(messages) < batch:  # all there is went out
                link.drained()
            self._write_now()

    @staticmethod
    async def _available(memlink: Any, count: int) -> list[Any]:
        """Up to ``count`` messages the broker link has now, without waiting for more."""
        if isinstance(memlink, MemoryReceiver):
            return await memlink.receive(count, max_wait_time=0)
        return memlink._receive_now(count)  # type: ignore[no-any-return]

    async def _forget(self, link: Any, receiving: _Receiving) -> None:
        """The client's receiver is gone: release what its broker link holds.

        Callers shield it (with a deadline): skipping it would strand a session lock.
        """
        self._receivers.pop(link.name, None)
        if receiving.link is not None and not self._keep_locks:
            await receiving.link.aclose()
        self._work.set()

    def _encode(self, message: Any, *, state: int = 0) -> bytes:
        """A broker message as the SDK expects it on the wire (spec §5.4, §6).

        ``state`` is Service Bus's message state: 0 active, 1 deferred, 2 scheduled.
        """
        p = self._p
        timestamp = _codec.timestamp
        annotations = [
            ("x-opt-sequence-number", _codec.amqp_value(message.sequence_number)),  # a long
            ("x-opt-enqueued-time", timestamp(int(message.enqueued_time.timestamp() * 1000))),
        ]
        if message.locked_until is not None:
            locked_until = int(message.locked_until.timestamp() * 1000)
            annotations.append(("x-opt-locked-until", timestamp(locked_until)))
        if message.scheduled_enqueue_time is not None:
            scheduled = round(message.scheduled_enqueue_time.timestamp() * 1000)
            annotations.append(("x-opt-scheduled-enqueue-time", timestamp(scheduled)))
        if message.partition_key is not None:
            annotations.append(("x-opt-partition-key", _codec.amqp_value(message.partition_key)))
        if state:
            annotations.append(("x-opt-message-state", _codec.amqp_value(p.int32(state))))
        content_type = message.content_type
        fields = [message.message_id, None, message.to, message.subject, message.reply_to]
        fields += [message.correlation_id, None if content_type is None else p.symbol(content_type)]
        fields += [None, None, None, message.session_id, None, message.reply_to_session_id]
        properties = message.application_properties
        ttl = message.time_to_live
        return (
            _header(message.delivery_count, None if ttl is None else round(ttl * 1000))
            + _codec.encoded_annotations(annotations)
            + _codec.properties(fields)  # ..., group-id, group-sequence, reply-to-group-id
            + _codec.application_properties(
                {k: _to_amqp(v) for k, v in properties.items()} if properties else {}
            )
            + _codec.data(message.body)  # a bytes body travels as a data section
        )

    def _deliver(self, link: Any, receiving: _Receiving, message: Any, mode: ReceiveMode) -> None:
        """Send one broker message on a receiver link, tagged with its lock token (spec §6)."""
        if message.lock_token is not None:
            tag = uuid.UUID(message.lock_token).bytes_le
        else:
            self._tags += 1
            tag = self._tags.to_bytes(16, "big")
        delivery = link.delivery(tag)
        link.send(self._encode(message))
        link.advance()
        if mode is ReceiveMode.RECEIVE_AND_DELETE:
            delivery.settle()
        else:
            # proton decodes delivery.tag as text, which a binary lock token is not; its
            # wrappers keep attributes on the native object, so the message rides along.
            delivery.received_message = message

    def _on_settlement(self, delivery: Any, link_name: str) -> None:
        """A client settled a message it received on link ``link_name``: apply it, then
        echo the outcome (spec §8)."""
        p = self._p
        receiving = self._receivers.get(link_name)
        message = getattr(delivery, "received_message", None)
        if receiving is None or message is None or receiving.link is None:
            if not delivery.link.state & p.Endpoint.LOCAL_CLOSED:
                delivery.settle()
            # else: the link is detached (lock lost) and the settlement moot; an echo without
            # state would only confuse pyamqp, which matches it to its own delivery ids
            return
        state = delivery.remote_state
        settlement: Settlement | None
        if state == p.Delivery.ACCEPTED:
            settlement = Complete(message)
        elif state == p.Delivery.REJECTED:
            remote = delivery.remote
            # The info map carries the reason and description; any other keys (JS puts
            # them there) are properties to modify.
            info = _str_keys((remote.condition.info if remote.condition else None) or {})
            reason = info.pop("DeadLetterReason", None)
            description = info.pop("DeadLetterErrorDescription", None)
            settlement = DeadLetter(
                message,
                None if reason is None else str(reason),
                None if description is None else str(description),
                properties_to_modify=info or None,
            )
        elif state == p.Delivery.MODIFIED:
            remote = delivery.remote
            # modified's message-annotations are the properties to modify (spec §8.2)
            modify = _str_keys(remote.annotations or {}) or None
            settlement = (
                Defer(message, properties_to_modify=modify)
                if remote.undeliverable
                else Abandon(message, properties_to_modify=modify)
            )
        else:  # released: the client never handed it to user code; no delivery counted
            settlement = None
        try:
            if settlement is None:
                receiving.link._release(message)
            else:
                receiving.link._settle_one(settlement)
        except SessionLockLostError as exc:
            delivery.local.condition = self._condition("com.microsoft:session-lock-lost", str(exc))
            state = p.Delivery.REJECTED
        except (MessageAlreadySettledError, MessageLockLostError) as exc:
            delivery.local.condition = self._condition("com.microsoft:message-lock-lost", str(exc))
            state = p.Delivery.REJECTED
        if delivery.settled:  # settled by the client (released): no echo wanted
            pass
        elif state == p.Delivery.ACCEPTED:
            _accept(delivery)
        else:
            delivery.update(state)
        delivery.settle()  # the task handling events has the echo written

    def _session_management(
        self, memlink: Any, operation: str, body: dict[Any, Any]
    ) -> dict[str, Any]:
        """``$management`` operations of a session receiver (spec §9.4)."""
        p = self._p
        if operation == "com.microsoft:renew-session-lock":
            memlink._renew_now()
            return {"expiration": p.timestamp(memlink.locked_until_utc.timestamp() * 1000)}
        if operation == "com.microsoft:get-session-state":
            return {"session-state": memlink._get_state_now()}
        if operation == "com.microsoft:set-session-state":
            state = body.get("session-state")
            memlink._set_state_now(None if state is None else bytes(state))
            return {}
        if operation == "com.microsoft:receive-by-sequence-number":
            numbers = [int(n) for n in body.get("sequence-numbers", [])]
            return {
                "messages": [
                    {
                        "lock-token": uuid.UUID(m.lock_token),
                        "message": self._encode(m, state=1),
                    }
                    for m in memlink._receive_deferred_now(numbers)
                ]
            }
        if operation == "com.microsoft:update-disposition":
            self._update_disposition(memlink, body)
            return {}
        raise NotImplementedError(operation)

    def _plain_management(
        self, receiver: MemoryReceiver, operation: str, body: dict[Any, Any]
    ) -> dict[str, Any]:
        """``$management`` operations of a receiver without sessions."""
        p = self._p
        if operation == "com.microsoft:renew-lock":
            expirations = [
                p.timestamp(receiver._renew_token_now(str(token)).timestamp() * 1000)
                for token in body.get("lock-tokens", [])
            ]
            return {"expirations": expirations}
        if operation == "com.microsoft:receive-by-sequence-number":
            numbers = [int(n) for n in body.get("sequence-numbers", [])]
            return {
                "messages": [
                    {"lock-token": uuid.UUID(m.lock_token), "message": self._encode(m, state=1)}
                    for m in receiver._receive_deferred_now(numbers)
                ]
            }
        if operation == "com.microsoft:update-disposition":
            self._update_disposition(receiver, body)
            return {}
        raise NotImplementedError(operation)

    def _entity_management(
        self, entity: str, operation: str, body: dict[Any, Any]
    ) -> dict[str, Any] | None:
        """``$management`` operations on the entity itself, needing no receiver's lock:
        peek, schedule and cancel (spec §9.4). None means "nothing" (status 204)."""
        p = self._p
        broker = self._emulator.broker
        if operation == "com.microsoft:peek-message":
            session_id = body.get("session-id")
            count = int(body.get("message-count", 1))
            if count < 1:  # the Python SDK lets peek_messages(0) through: nothing to show
                return None
            peeked = broker._peek_now(
                entity,
                int(body.get("from-sequence-number", 1)),
                count,
                None if session_id is None else str(session_id),
            )
            if not peeked:
                return None
            return {"messages": [{"message": self._encode(m, state=st)} for m, st in peeked]}
        if operation == "com.microsoft:schedule-message":
            messages = []
            for item in body.get("messages", []):
                decoded = p.Message()
                decoded.decode(bytes(item["message"]))
                messages.append(self._to_message(decoded))
            numbers = broker._send_now(entity, messages)
            return {"sequence-numbers": p.Array(p.UNDESCRIBED, p.Data.LONG, *numbers)}
        if operation == "com.microsoft:cancel-scheduled-message":
            broker._cancel_scheduled_now(entity, [int(n) for n in body.get("sequence-numbers", [])])
            return {}
        raise NotImplementedError(operation)

    def _update_disposition(self, memlink: Any, body: dict[Any, Any]) -> None:
        """Settle messages by lock token (deferred ones, and the SDK's fallback, spec §8.3).

        ``memlink`` is a session link or a receiver without sessions: both settle by token.
        """
        status = str(body["disposition-status"])
        modify = _str_keys(body.get("properties-to-modify") or {}) or None
        for token in body.get("lock-tokens", []):
            lock_token = str(token)
            if status == "completed":
                memlink._settle_by_token(lock_token, Complete)
            elif status == "abandoned":
                memlink._settle_by_token(lock_token, Abandon, properties_to_modify=modify)
            elif status == "defered":  # sic: the SDKs' spelling
                memlink._settle_by_token(lock_token, Defer, properties_to_modify=modify)
            elif status == "suspended":  # dead-letter
                memlink._settle_by_token(
                    lock_token,
                    DeadLetter,
                    reason=body.get("deadletter-reason") or None,
                    error_description=body.get("deadletter-description") or None,
                    properties_to_modify=modify,
                )
            else:
                raise ValueError(
                    f"unknown disposition-status {status!r}: expected completed, abandoned, "
                    "defered or suspended"
                )

    def _refuse(self, link: Any, condition: str, description: str) -> None:
        p = self._p
        link.source.type = p.Terminus.UNSPECIFIED
        link.open()
        link.condition = self._condition(condition, description)
        link.close()

    def _on_delivery(self, delivery: Any) -> None:
        c = _cproton()
        link_impl = c.pn_delivery_link(delivery._impl)
        if c.pn_link_is_sender(link_impl):  # no Link wrapper for each settlement
            if delivery.updated and delivery.remote_state:
                self._on_settlement(delivery, c.pn_link_name(link_impl))
            return
        link = delivery.link
        if not delivery.readable or delivery.partial:
            return
        data = link.recv(delivery.pending)
        link.advance()
        # kept on the link (proton keeps attributes on the native object): reading it anew
        # builds a Terminus wrapper per message
        address = getattr(link, "target_address", None)
        if address is None:
            address = link.target_address = link.target.address
        if address == "$cbs" or address.endswith("$management"):
            request = self._p.Message()
            request.decode(data)
            if address == "$cbs":
                self._on_put_token(link, request)
            else:
                self._on_management(link, request)
            delivery.update(self._p.Delivery.ACCEPTED)
        else:
            entity = entity_from_address(address)
            message: Any
            try:
                message = _Decoded(_codec.sections(data))
            except _codec.Unsupported:
                message = self._p.Message()
                message.decode(data)
            messages = [message]
            body = message.body
            # proton (and _Decoded) read the last data section as the body: only then look closer
            if isinstance(body, bytes | memoryview) and bytes(body[:3]) in _BATCH_BODY_STARTS:
                messages = self._decode_batch(data) or messages
            try:
                self._emulator.broker._send_now(entity, [self._to_message(m) for m in messages])
            except (ValueError, TypeError, EntityNotFoundError) as exc:
                if isinstance(exc, EntityNotFoundError):
                    condition = "amqp:not-found"
                elif isinstance(exc, MessageSizeExceededError):
                    condition = "amqp:link:message-size-exceeded"  # the SDK's own error
                else:
                    condition = "amqp:not-allowed"
                delivery.local.condition = self._condition(condition, str(exc))
                delivery.update(self._p.Delivery.REJECTED)
            else:
                _accept(delivery)
        delivery.settle()
        if link.credit < CREDIT // 2:
            link.flow(CREDIT - link.credit)

    def _decode_batch(self, data: bytes) -> list[Any] | None:
        """The messages of a batch, or None if ``data`` is one plain message.

        A batch (message-format 0x80013700) carries one data section per message, each a
        whole encoded AMQP message. proton's Python binding does not expose a transfer's
        message-format, so a batch is recognised by that shape: an envelope whose data
        sections all decode as AMQP messages, and whose application properties, if any,
        are the first message's (the JS SDK copies them; the Python SDK sets none).
        """
        p = self._p
        sections = p.Data()
        while data:
            data = data[sections.decode(data) :]
        sections.rewind()
        messages = []
        envelope_properties = None
        while sections.next():
            sections.enter()
            sections.next()
            descriptor = sections.get_ulong()
            sections.next()
            if descriptor == 0x74:  # application-properties
                envelope_properties = sections.get_object()
            if descriptor == 0x75:
                payload = bytes(sections.get_binary())
                if payload[:2] != b"\x00\x53" or payload[2:3] not in _SECTION_CODES:
                    return None
                message = p.Message()
                try:
                    message.decode(payload)
                except p.MessageException:
                    return None
                messages.append(message)
            sections.exit()
        if not messages or envelope_properties not in (None, messages[0].properties):
            return None
        return messages

    def _condition(self, condition: str, description: str) -> Any:
        """An AMQP error with all three fields: pyamqp indexes them blindly (spec §12.1)."""
        p = self._p
        return p.Condition(
            condition, description, {p.symbol("com.microsoft:tracking-id"): str(uuid.uuid4())}
        )

    @staticmethod
    def _to_message(message: Any) -> Message:
        """A decoded incoming message (proton's ``Message`` or a `_Decoded`) for the broker."""
        body = message.body
        if isinstance(body, memoryview):
            body = bytes(body)
        if body is None:
            body = b""
        properties = {str(k): _from_amqp(v) for k, v in (message.properties or {}).items()}
        # proton reads an absent content type as symbol("None")
        content_type = message.content_type
        content_type = None if content_type in (None, "", "None") else str(content_type)
        annotations = {str(k): v for k, v in (message.annotations or {}).items()}
        scheduled = _from_amqp(annotations.get("x-opt-scheduled-enqueue-time"))
        partition_key = annotations.get("x-opt-partition-key")
        return Message(
            body if isinstance(body, bytes) else str(body),
            session_id=message.group_id or None,
            message_id=None if message.id is None else str(message.id),
            application_properties=properties or None,
            content_type=content_type,
            correlation_id=None if message.correlation_id is None else str(message.correlation_id),
            subject=message.subject or None,
            time_to_live=message.ttl or None,  # proton: seconds; 0 when absent
            to=message.address or None,
            reply_to=message.reply_to or None,
            reply_to_session_id=message.reply_to_group_id or None,
            scheduled_enqueue_time=scheduled if isinstance(scheduled, dt.datetime) else None,
            partition_key=None if partition_key is None else str(partition_key),
        )

    def _on_put_token(self, request_link: Any, request: Any) -> None:
        p = self._p
        props = request.properties or {}
        audience = str(props.get("name", ""))
        problem = sas_token_valid(
            str(request.body),
            audience=audience,
            keys={self._emulator.key_name: self._emulator.key},
            now=time.time(),
        )
        status, description = (202, "Accepted") if problem is None else (401, problem)
        if problem is not None:
            # The reason only: the token (its signature) never reaches a log or the client.
            logger.info("refused a SAS token for %s: %s", audience, problem)
        response = p.Message(
            correlation_id=request.id,
            properties={"status-code": p.int32(status), "status-description": description},
        )
        self._reply(request_link, response)

    def _reply(self, request_link: Any, response: Any) -> None:
        """Answer on the client's response link: same session, same node address (spec §9.2)."""
        address = request_link.target.address
        reply = next(
            (
                link
                for link in _links(request_link.session)
                if link.is_sender and link.source.address == address
            ),
            None,
        )
        if reply is None:
            logger.warning("a request to %s without a response link", address)
            return
        self._tags += 1
        out = reply.delivery(str(self._tags).encode())
        reply.send(response.encode())
        reply.advance()
        out.settle()  # the client never settles responses

    def _on_management(self, request_link: Any, request: Any) -> None:
        """A ``$management`` request of a session receiver (spec §9.4)."""
        p = self._p
        props = request.properties or {}
        operation = str(props.get("operation", ""))
        body = request.body if isinstance(request.body, dict) else {}
        receiving = self._receivers.get(str(props.get("associated-link-name", "")))
        memlink = None if receiving is None else receiving.link
        status, condition, description = 200, None, "OK"
        result: dict[str, Any] | None = {}
        node = str(request_link.target.address)
        entity = entity_from_address(node[: -len("/$management")])
        try:
            if operation in ENTITY_OPERATIONS:
                result = self._entity_management(entity, operation, body)
                if result is None:
                    status, description, result = 204, "No Content", {}
            elif isinstance(memlink, MemoryReceiver):
                result = self._plain_management(memlink, operation, body)
            elif memlink is None or str(body.get("session-id", memlink.session_id)) != (
                memlink.session_id
            ):
                raise SessionLockLostError("the session is not locked by a receiver of this client")
            else:
                result = self._session_management(memlink, operation, body)
        except NotImplementedError:
            status, condition = 501, "amqp:not-implemented"
            description = f"the emulator does not implement {operation!r} yet"
        except SessionLockLostError as exc:
            status, condition, description = 410, "com.microsoft:session-lock-lost", str(exc)
        except MessageNotFoundError as exc:
            status, condition, description = 404, "com.microsoft:message-not-found", str(exc)
        except EntityNotFoundError as exc:
            status, condition, description = 404, "amqp:not-found", str(exc)
        except (MessageAlreadySettledError, MessageLockLostError) as exc:
            status, condition, description = 410, "com.microsoft:message-lock-lost", str(exc)
        except (ServiceBusConnectionError, OperationTimeoutError) as exc:
            # A transient broker failure (fault injection: MemoryBroker.fail_next) is an
            # error reply, as Service Bus sends one; it must not end the client's
            # connection, which would release its sessions while their handlers run.
            status, condition, description = 503, "com.microsoft:server-busy", str(exc)
        except (KeyError, ValueError, TypeError) as exc:
            status, condition = 400, "amqp:invalid-field"
            description = f"bad {operation!r} request: {exc!r}"
        properties: dict[str, Any] = {
            "statusCode": p.int32(status),
            "statusDescription": description,
        }
        if condition is not None:
            properties["errorCondition"] = p.symbol(condition)
        self._reply(
            request_link,
            p.Message(correlation_id=request.id, properties=properties, body=result),
        )


def _str_keys(mapping: Any) -> dict[str, Any]:
    """An AMQP map (symbol or string keys) as application properties."""
    return {str(key): _from_amqp(value) for key, value in dict(mapping).items()}


def _links(session: Any) -> list[Any]:
    links = []
    link = session.connection.link_head(0)
    while link is not None:
        if link.session == session:  # proton makes a new wrapper per access
            links.append(link)
        link = link.next(0)
    return links


@asynccontextmanager
async def serve_emulator(
    broker: MemoryBroker,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    key_name: str = "RootManageSharedAccessKey",
    key: str | None = None,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    write_timeout: float | None = DEFAULT_WRITE_TIMEOUT,
) -> AsyncIterator[Emulator]:
    """Serve ``broker`` over AMQP 1.0 on ``host:port`` (0: a free port) while the block runs.

    ``idle_timeout``, ``write_timeout``: see `Emulator`.
    """
    _proton()
    emulator = Emulator(
        broker,
        host,
        port,
        key_name,
        key or secrets.token_urlsafe(32),
        idle_timeout=idle_timeout,
        write_timeout=write_timeout,
    )
    listeners = await trio.open_tcp_listeners(port, host=host)
    emulator.port = listeners[0].socket.getsockname()[1]

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await _Connection(emulator, stream).serve()
            except Exception:
                logger.exception("emulator connection failed")

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        try:
            yield emulator
        finally:
            nursery.cancel_scope.cancel()
