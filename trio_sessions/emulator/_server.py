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
import functools
import hashlib
import hmac
import importlib
import logging
import secrets
import time
import types
import urllib.parse
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._errors import (
    EntityNotFoundError,
    MessageAlreadySettledError,
    MessageLockLostError,
    MessageNotFoundError,
    OperationTimeoutError,
    SessionCannotBeLockedError,
    SessionLockLostError,
    SessionsNotEnabledError,
)
from .._messages import Abandon, Complete, DeadLetter, Defer, EntityPath, Message, Settlement
from .._options import ReceiveMode
from ..backends._memory import MemoryReceiver
from . import _codec

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import AsyncIterator

    from ..backends._memory import MemoryBroker

__all__ = ["Emulator", "serve_emulator"]

logger = logging.getLogger("trio_sessions.emulator")

#: Largest frame we accept and announce (Service Bus Standard uses 256 KiB).
MAX_FRAME_SIZE = 262144
#: Largest message we accept on a sender link (Service Bus Standard: 256 KiB).
MAX_MESSAGE_SIZE = 262144
#: .NET ticks (100 ns since 0001-01-01) at the Unix epoch: locked-until-utc is in ticks.
TICKS_AT_EPOCH = 621355968000000000
#: Server-side wait for a next-available session when the client names none (ms).
DEFAULT_ACCEPT_WAIT_MS = 60000
SESSION_FILTER = "com.microsoft:session-filter"
#: How long closing a broker link may take when a client goes away (it is shielded).
CLOSE_TIMEOUT = 5.0
#: Link credit granted to clients' senders, refilled below half.
CREDIT = 1000
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


@attrs.define(eq=False)
class Emulator:
    """A running emulator: where it listens and how to connect."""

    broker: MemoryBroker
    host: str
    port: int
    key_name: str
    key: str = attrs.field(repr=False)
    _connections: set[_Connection] = attrs.field(factory=set, init=False, repr=False)

    @property
    def connections(self) -> int:
        """How many client connections are open now."""
        return len(self._connections)

    def drop_connections(self) -> int:
        """Fault injection: cut every client connection now, as a network failure would.

        The sessions those clients held are released at once (unsettled messages come back
        with delivery_count + 1); the clients see their connection fail. Returns how many
        connections were cut.
        """
        dropped = list(self._connections)
        for connection in dropped:
            connection.drop()
        return len(dropped)

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


def _header(delivery_count: int) -> bytes:
    """A message header with every field written out.

    proton elides trailing default fields, and pyamqp does not pad message sections, so
    a ``delivery-count`` of 0 left to proton reaches the SDK as None (spec §5.4).
    """
    first_acquirer = 0x41 if delivery_count == 0 else 0x42
    return (
        bytes([0x00, 0x53, 0x70, 0xC0, 0x0B, 0x05])  # header: list8, 11 bytes, 5 fields
        + bytes([0x42, 0x50, 0x04, 0x40, first_acquirer, 0x70])  # durable, priority, ttl, ...
        + delivery_count.to_bytes(4, "big")  # delivery-count (uint)
    )


def _ticks(moment: dt.datetime) -> int:
    return TICKS_AT_EPOCH + round(moment.timestamp() * 10_000_000)


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
        self._connection = proton.Connection()
        self._transport = proton.Transport(proton.Transport.SERVER)
        self._transport.max_frame_size = MAX_FRAME_SIZE
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

    async def serve(self) -> None:
        self._emulator._connections.add(self)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read)
                try:
                    await self._write_loop()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._emulator._connections.discard(self)

    def drop(self) -> None:
        """End this connection without a goodbye; its tasks release what it held."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _read(self) -> None:
        transport = self._transport
        while True:
            try:
                data = await self._stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
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
                    self._drained = trio.Event()
                    self._work.set()
                    await self._drained.wait()
                    continue
                transport.push(data[:capacity])
                data = data[capacity:]
                self._handle_events()
            self._work.set()

    async def _write_loop(self) -> None:
        transport = self._transport
        while True:
            self._handle_events()
            pending = transport.pending()
            if pending < 0:  # the transport is done for output
                return
            if pending:
                chunk = transport.peek(pending)
                transport.pop(pending)
                try:
                    await self._stream.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                self._drained.set()
                continue
            deadline = transport.tick(time.monotonic())
            self._work = trio.Event()
            if not deadline:  # no heartbeat or idle time-out to keep: wait without a timer
                await self._work.wait()
                continue
            with trio.move_on_at(trio.current_time() + (deadline - time.monotonic())):
                await self._work.wait()

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
            c.pn_collector_pop(collector)

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
            if link.drain_mode:
                messages = await self._available(receiving.link, link.credit)
            else:
                messages = []
                with trio.CancelScope() as receiving.waiting:
                    messages = await receiving.link.receive(link.credit)
                receiving.waiting = None
                if not messages:  # a drain request cancelled the wait
                    continue
            if link.drain_mode and mode is ReceiveMode.PEEK_LOCK and link.credit > 1:
                for message in messages[link.credit - 1 :]:
                    receiving.link._release(message)
                messages = messages[: link.credit - 1]
            for message in messages:
                self._deliver(link, receiving, message, mode)
            if link.drain_mode:
                link.drained()
            self._work.set()

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
        if receiving.link is not None:
            await receiving.link.aclose()
        self._work.set()

    def _encode(self, message: Any, *, deferred: bool = False) -> bytes:
        """A broker message as the SDK expects it on the wire (spec §5.4, §6)."""
        p = self._p
        annotations = {
            "x-opt-sequence-number": message.sequence_number,  # int encodes as long
            "x-opt-enqueued-time": p.timestamp(message.enqueued_time.timestamp() * 1000),
        }
        if message.locked_until is not None:
            annotations["x-opt-locked-until"] = p.timestamp(message.locked_until.timestamp() * 1000)
        if deferred:
            annotations["x-opt-message-state"] = p.int32(1)
        content_type = message.content_type
        fields = [message.message_id, None, None, message.subject, None, message.correlation_id]
        fields += [None if content_type is None else p.symbol(content_type), None, None, None]
        fields.append(message.session_id)  # group-id
        return (
            _header(message.delivery_count)
            + _codec.message_annotations(annotations)
            + _codec.properties(fields)
            + _codec.application_properties(message.application_properties)
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

    def _on_settlement(self, delivery: Any, link: Any) -> None:
        """A client settled a message it received on ``link``: apply it, then echo the
        outcome (spec §8)."""
        p = self._p
        receiving = self._receivers.get(link.name)
        message = getattr(delivery, "received_message", None)
        if receiving is None or message is None or receiving.link is None:
            delivery.settle()
            return
        state = delivery.remote_state
        remote = delivery.remote
        settlement: Settlement | None
        if state == p.Delivery.ACCEPTED:
            settlement = Complete(message)
        elif state == p.Delivery.REJECTED:
            info = (remote.condition.info if remote.condition else None) or {}
            reason = info.get(p.symbol("DeadLetterReason"), info.get("DeadLetterReason"))
            description = info.get(
                p.symbol("DeadLetterErrorDescription"), info.get("DeadLetterErrorDescription")
            )
            settlement = DeadLetter(
                message,
                None if reason is None else str(reason),
                None if description is None else str(description),
            )
        elif state == p.Delivery.MODIFIED:
            settlement = Defer(message) if remote.undeliverable else Abandon(message)
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
        except MessageAlreadySettledError as exc:
            delivery.local.condition = self._condition("com.microsoft:message-lock-lost", str(exc))
            state = p.Delivery.REJECTED
        if delivery.settled:  # settled by the client (released): no echo wanted
            pass
        elif state == p.Delivery.ACCEPTED:
            _accept(delivery)
        else:
            delivery.update(state)
        delivery.settle()
        self._work.set()

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
                        "message": self._encode(m, deferred=True),
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
        raise NotImplementedError(operation)

    def _update_disposition(self, memlink: Any, body: dict[Any, Any]) -> None:
        """Settle messages by lock token (deferred ones, and the SDK's fallback, spec §8.3)."""
        status = str(body["disposition-status"])
        for token in body.get("lock-tokens", []):
            lock_token = str(token)
            if status == "completed":
                memlink._settle_by_token(lock_token, Complete)
            elif status == "abandoned":
                memlink._settle_by_token(lock_token, Abandon)
            elif status == "defered":  # sic: the SDKs' spelling
                memlink._settle_by_token(lock_token, Defer)
            elif status == "suspended":  # dead-letter
                memlink._settle_by_token(
                    lock_token,
                    DeadLetter,
                    reason=body.get("deadletter-reason") or None,
                    error_description=body.get("deadletter-description") or None,
                )
            else:
                raise ValueError(f"unknown disposition-status {status!r}")

    def _refuse(self, link: Any, condition: str, description: str) -> None:
        p = self._p
        link.source.type = p.Terminus.UNSPECIFIED
        link.open()
        link.condition = self._condition(condition, description)
        link.close()

    def _on_delivery(self, delivery: Any) -> None:
        link = delivery.link
        if link.is_sender:
            if delivery.updated and delivery.remote_state:
                self._on_settlement(delivery, link)
            return
        if not delivery.readable or delivery.partial:
            return
        data = link.recv(delivery.pending)
        link.advance()
        # kept on the link (proton keeps attributes on the native object): reading it anew
        # builds a Terminus wrapper per message
        address = getattr(link, "target_address", None)
        if address is None:
            address = link.target_address = link.target.address
        message = self._p.Message()
        message.decode(data)
        if address == "$cbs":
            self._on_put_token(link, message)
            delivery.update(self._p.Delivery.ACCEPTED)
        elif address.endswith("$management"):
            self._on_management(link, message)
            delivery.update(self._p.Delivery.ACCEPTED)
        else:
            entity = entity_from_address(address)
            messages = [message]
            body = message.body
            # proton reads a batch's first data section as the body: only then look closer
            if isinstance(body, bytes | memoryview) and bytes(body[:3]) in _BATCH_BODY_STARTS:
                messages = self._decode_batch(data) or messages
            try:
                self._emulator.broker._send_now(entity, [self._to_message(m) for m in messages])
            except (ValueError, TypeError, EntityNotFoundError) as exc:
                delivery.local.condition = self._condition(
                    "amqp:not-found"
                    if isinstance(exc, EntityNotFoundError)
                    else "amqp:not-allowed",
                    str(exc),
                )
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

    def _to_message(self, message: Any) -> Message:
        body = message.body
        if isinstance(body, memoryview):
            body = bytes(body)
        if body is None:
            body = b""
        properties = {str(k): v for k, v in (message.properties or {}).items()}
        # proton reads an absent content type as symbol("None")
        content_type = message.content_type
        content_type = None if content_type in (None, "", "None") else str(content_type)
        return Message(
            body if isinstance(body, bytes) else str(body),
            session_id=message.group_id or None,
            message_id=None if message.id is None else str(message.id),
            application_properties=properties or None,
            content_type=content_type,
            correlation_id=None if message.correlation_id is None else str(message.correlation_id),
            subject=message.subject or None,
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
        result: dict[str, Any] = {}
        try:
            if isinstance(memlink, MemoryReceiver):
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
        except (MessageAlreadySettledError, MessageLockLostError) as exc:
            status, condition, description = 410, "com.microsoft:message-lock-lost", str(exc)
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
) -> AsyncIterator[Emulator]:
    """Serve ``broker`` over AMQP 1.0 on ``host:port`` (0: a free port) while the block runs."""
    _proton()
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = listeners[0].socket.getsockname()[1]
    emulator = Emulator(broker, host, bound_port, key_name, key or secrets.token_urlsafe(32))

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
