"""The emulator against misbehaving clients, at the byte level, and under many clients.

A raw client (``Peer``) writes hand-built AMQP frames over a real loopback socket and reads
what the emulator answers; a real azure-servicebus client then proves everyone else is
still served. Durations are real but short.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from azure.servicebus import ServiceBusClient, ServiceBusMessage

from trio_sessions import MemoryBroker, Message
from trio_sessions.emulator import Emulator, serve_emulator

proton = pytest.importorskip("proton")

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
OPEN, BEGIN, ATTACH, FLOW, TRANSFER, DETACH, CLOSE = 0x10, 0x11, 0x12, 0x13, 0x14, 0x16, 0x18
SOURCE, TARGET = 0x28, 0x29
SESSION_FILTER = "com.microsoft:session-filter"


def frame(performative: int, fields: list[Any], channel: int = 0) -> bytes:
    """One AMQP frame (type 0) carrying ``performative`` with ``fields``."""
    data = proton.Data()
    data.put_object(proton.Described(proton.ulong(performative), fields))
    body: bytes = data.encode()
    return struct.pack(">IBBH", 8 + len(body), 2, 0, channel) + body


def open_frame(*, idle_ms: int | None = None) -> bytes:
    idle = None if idle_ms is None else proton.uint(idle_ms)
    return frame(OPEN, ["raw-client", "127.0.0.1", None, None, idle])


EMPTY_FRAME = struct.pack(">IBBH", 8, 2, 0, 0)


class Peer:
    """A raw AMQP client: writes bytes, reads the emulator's frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    @classmethod
    async def connect(cls, emulator: Emulator) -> Peer:
        return cls(await trio.open_tcp_stream(emulator.host, emulator.port))

    async def __aenter__(self) -> Peer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stream.aclose()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _read(self, count: int) -> bytes | None:
        while len(self._buffer) < count:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:  # reset by the emulator
                data = b""
            if not data:
                return None
            self._buffer += data
        out = bytes(self._buffer[:count])
        del self._buffer[:count]
        return out

    async def header(self) -> bytes | None:
        return await self._read(8)

    async def frame(self) -> tuple[int | None, list[Any]] | None:
        """The next frame's performative code and fields ((None, []) if empty), None at EOF."""
        head = await self._read(8)
        if head is None:
            return None
        size, doff = struct.unpack(">IB", head[:5])
        body = await self._read(size - 8)
        assert body is not None, "the emulator cut a frame short"
        body = body[doff * 4 - 8 :]
        if not body:
            return None, []
        data = proton.Data()
        data.decode(body)
        data.rewind()
        data.next()
        described = data.get_object()
        return int(described.descriptor), list(described.value)

    async def open(self, *, idle_ms: int | None = None) -> list[Any]:
        """Header and open; returns the emulator's open fields."""
        await self.send(AMQP_HEADER + open_frame(idle_ms=idle_ms))
        assert await self.header() == AMQP_HEADER
        reply = await self.frame()
        assert reply is not None
        assert reply[0] == OPEN
        return reply[1]

    async def until_closed(self) -> tuple[str, str] | None:
        """Read up to EOF; return the close frame's (condition, description), if one came."""
        error = None
        while (received := await self.frame()) is not None:
            code, fields = received
            if code == CLOSE and fields and fields[0] is not None:
                condition, description = fields[0].value[:2]
                error = (str(condition), str(description))
        return error

    async def eof(self) -> bool:
        """True if the emulator closed the connection without sending anything more."""
        return await self._read(1) is None

    async def begin(self) -> None:
        window = proton.uint(2**31 - 1)
        await self.send(frame(BEGIN, [None, proton.uint(0), window, window], channel=1))
        reply = await self.frame()
        assert reply is not None
        assert reply[0] == BEGIN

    async def receive_session(self, entity: str, session_id: str, credit: int) -> None:
        """Attach a peek-lock session receiver on the begun session and grant it credit."""
        source = proton.Described(
            proton.ulong(SOURCE),
            [
                entity,
                None,
                None,
                None,
                None,
                None,
                None,
                {proton.symbol(SESSION_FILTER): session_id},
            ],
        )
        target = proton.Described(proton.ulong(TARGET), [None])
        attach = ["raw-receiver", proton.uint(0), True, None, None, source, target]
        window = proton.uint(2**31 - 1)
        flow = [proton.uint(0), window, proton.uint(0), window, proton.uint(0), proton.uint(0)]
        await self.send(frame(ATTACH, attach, 1) + frame(FLOW, [*flow, proton.uint(credit)], 1))
        await self.expect(ATTACH)

    async def expect(self, code: int) -> list[Any]:
        """Skip frames up to the next ``code`` performative; return its fields."""
        while (received := await self.frame()) is not None:
            if received[0] == code:
                return received[1]
        raise AssertionError(f"the connection closed before performative 0x{code:02x}")


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    broker = MemoryBroker()
    broker.create_queue("q")
    async with serve_emulator(broker) as running:
        yield running


async def test_heartbeats_honour_the_clients_idle_timeout(emulator: Emulator) -> None:
    """A client announcing idle-time-out gets empty frames at half of it (AMQP 1.0 §2.4.5)."""
    async with await Peer.connect(emulator) as peer:
        opened = await peer.open(idle_ms=200)
        assert emulator.idle_timeout is not None
        assert opened[4] == int(emulator.idle_timeout * 1000 / 2)  # the emulator announces half
        with trio.fail_after(5):  # about 0.3 s: a heartbeat every 100 ms
            start = trio.current_time()
            for _ in range(3):
                assert await peer.frame() == (None, [])
            assert trio.current_time() - start >= 0.2  # not a burst


async def test_idle_and_silent_clients_are_dropped() -> None:
    """Silence for idle_timeout ends a connection; a client that sends empty frames stays."""
    broker = MemoryBroker()
    broker.create_queue("q")
    async with serve_emulator(broker, idle_timeout=0.5) as emulator:
        async with (
            await Peer.connect(emulator) as silent,
            await Peer.connect(emulator) as mute,  # never even sends the protocol header
            await Peer.connect(emulator) as alive,
        ):
            assert (await silent.open())[4] == 250
            await alive.open()
            closed = trio.Event()

            async def keep_alive() -> None:
                while not closed.is_set():
                    await alive.send(EMPTY_FRAME)
                    with trio.move_on_after(0.1):
                        await closed.wait()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_alive)
                with trio.fail_after(5):
                    assert await silent.until_closed() == (
                        "amqp:resource-limit-exceeded",
                        "local-idle-timeout expired",
                    )
                    assert await mute.eof()
                closed.set()
            begin = [None, proton.uint(0), proton.uint(10), proton.uint(10)]
            await alive.send(frame(BEGIN, begin, channel=1))
            with trio.fail_after(5):
                reply = await alive.frame()
            assert reply is not None
            assert reply[0] == BEGIN
            assert emulator.connections == 1


async def test_timeouts_are_validated() -> None:
    """A bad idle_timeout or write_timeout is refused with its name and the allowed values;
    None turns the idle timeout off."""
    with pytest.raises(ValueError, match=r"idle_timeout must be None or seconds > 0, got 0"):
        async with serve_emulator(MemoryBroker(), idle_timeout=0):
            pass  # pragma: no cover
    async with serve_emulator(MemoryBroker(), idle_timeout=None) as emulator:
        with pytest.raises(ValueError, match="idle_timeout"):
            emulator.idle_timeout = -1
        with pytest.raises(ValueError, match=r"write_timeout must be None or seconds > 0"):
            emulator.write_timeout = float("nan")
        async with await Peer.connect(emulator) as peer:
            opened = await peer.open()
            assert opened[4:5] in ([], [None])  # no idle-time-out announced (trailing nulls elided)


async def sdk_round_trip(emulator: Emulator, session_id: str = "check") -> str:
    """Send and receive one message with the real SDK (proves the emulator still serves)."""

    def run() -> str:
        conn_str = emulator.connection_string
        with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            with client.get_queue_sender("q") as sender:
                sender.send_messages(ServiceBusMessage("ok", session_id=session_id))
            with client.get_queue_receiver("q", session_id=session_id) as receiver:
                [message] = receiver.receive_messages(max_wait_time=5)
                receiver.complete_message(message)
                return str(message)

    with trio.fail_after(30):
        return await trio.to_thread.run_sync(run)


async def sdk_send(emulator: Emulator, session_id: str = "check") -> None:
    """Send one message with the real SDK and see it reach the broker."""

    def run() -> None:
        conn_str = emulator.connection_string
        with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            with client.get_queue_sender("q") as sender:
                sender.send_messages(ServiceBusMessage("ok", session_id=session_id))

    before = emulator.broker.active_message_count("q")
    with trio.fail_after(30):
        await trio.to_thread.run_sync(run)
    assert emulator.broker.active_message_count("q") == before + 1


async def test_sdk_still_served_with_short_idle_timeout() -> None:
    """The Python SDK keeps working against an emulator that announces an idle timeout."""
    broker = MemoryBroker()
    broker.create_queue("q")
    async with serve_emulator(broker, idle_timeout=10) as emulator:
        assert await sdk_round_trip(emulator) == "ok"


async def test_expired_session_lock_detaches_the_link(emulator: Emulator) -> None:
    """broker.expire_session_lock detaches the client's link at once (session-lock-lost),
    even while the client grants no credit."""
    await emulator.broker.send("q", [Message("x", session_id="s")])
    async with await Peer.connect(emulator) as peer:
        await peer.open()
        await peer.begin()
        await peer.receive_session("q", "s", credit=1)
        with trio.fail_after(10):
            await peer.expect(TRANSFER)
            emulator.broker.expire_session_lock("q", "s")
            _, closed, error = (await peer.expect(DETACH))[:3]
        assert closed is True
        assert str(error.value[0]) == "com.microsoft:session-lock-lost"


# -- malformed input ---------------------------------------------------------------------

FRAMING_ERROR = "amqp:connection:framing-error"
UNDECODABLE = struct.pack(">IBBH", 16, 2, 0, 0) + b"\xff" * 8
OVERSIZED = struct.pack(">IBBH", 300_000, 2, 0, 0) + bytes(300_000 - 8)  # max is 262144


@pytest.mark.parametrize(
    ("opens", "payload", "condition"),
    [
        pytest.param(False, b"GET / HTTP/1.1\r\n\r\n", FRAMING_ERROR, id="garbage"),
        pytest.param(False, b"AMQP\x00\x02\x00\x00", FRAMING_ERROR, id="wrong-version"),
        pytest.param(False, b"AMQP\x02\x01\x00\x00", None, id="tls-header"),
        pytest.param(True, OVERSIZED, FRAMING_ERROR, id="oversized-frame"),
        pytest.param(True, UNDECODABLE, "amqp:decode-error", id="undecodable-frame"),
        pytest.param(True, b"\x00\x00\x00\x04\x02\x00\x00\x00", FRAMING_ERROR, id="short-frame"),
    ],
)
async def test_malformed_input_ends_only_that_connection(
    emulator: Emulator, opens: bool, payload: bytes, condition: str | None
) -> None:
    """Bad bytes get our protocol header (AMQP 1.0 §2.2) or a close with an AMQP error, then
    the socket closes; another open connection and new SDK clients are unaffected."""
    async with await Peer.connect(emulator) as bystander, await Peer.connect(emulator) as bad:
        await bystander.open()
        with trio.fail_after(10):
            if opens:
                await bad.open()
            async with trio.open_nursery() as nursery:
                # the emulator reads the oversized frame to its end only after our close
                nursery.start_soon(bad.send, payload)
                if not opens:
                    assert await bad.header() == AMQP_HEADER
                if condition is None:
                    assert await bad.eof()
                else:
                    error = await bad.until_closed()
                    assert error is not None
                    assert error[0] == condition
            await bystander.begin()
        assert emulator.connections == 1
    await sdk_send(emulator)


# -- clients that stop reading -----------------------------------------------------------

BIG = 100_000  # bytes per message body


async def slow_reader(emulator: Emulator) -> Peer:
    """A raw client with a tiny receive buffer that takes a session, grants plenty of
    credit, and then reads nothing more."""
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect((emulator.host, emulator.port))
    peer = Peer(trio.SocketStream(sock))
    await peer.open()
    await peer.begin()
    await peer.receive_session("q", "s", credit=10_000)
    return peer


def locked_count(emulator: Emulator) -> int:
    return sum(m.lock_token is not None for m in emulator.broker.active_messages("q"))


async def test_a_client_that_stops_reading_costs_bounded_output(emulator: Emulator) -> None:
    """The emulator stops taking deliveries for a client whose socket is full; it goes on
    serving the others."""
    emulator.write_timeout = None
    count = 200  # 20 MB: far more than the socket buffers and the output bound hold
    await emulator.broker.send("q", [Message(bytes(BIG), session_id="s") for _ in range(count)])
    async with await slow_reader(emulator):
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)  # the socket is full
        taken = locked_count(emulator)
        assert 0 < taken < count
        assert emulator.connections == 1
        await sdk_send(emulator)
        assert locked_count(emulator) == taken  # still stalled, nothing more taken


async def test_a_client_that_stops_reading_is_dropped(emulator: Emulator) -> None:
    """After write_timeout without progress the client is dropped and its session freed."""
    from trio_sessions._messages import EntityPath

    emulator.write_timeout = 0.5
    count = 100
    await emulator.broker.send("q", [Message(bytes(BIG), session_id="s") for _ in range(count)])
    async with await slow_reader(emulator):
        with trio.fail_after(10):  # next-available: returns once the drop frees "s"
            link = await emulator.broker.accept_session(
                EntityPath(queue_name="q"), None, max_wait_time=10
            )
        assert link.session_id == "s"
        await link.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert emulator.connections == 0
    back = emulator.broker.active_messages("q")
    assert len(back) == count
    assert {m.delivery_count for m in back} == {0, 1}  # those delivered came back counted
    await sdk_send(emulator)


# -- many clients ------------------------------------------------------------------------


async def test_a_hundred_concurrent_sdk_connections(emulator: Emulator) -> None:
    """100 asyncio SDK receivers, each on its own connection, open at once; each receives
    and completes its own session's message."""
    import asyncio

    from azure.servicebus.aio import ServiceBusClient as AsyncClient

    clients = 100
    await emulator.broker.send("q", [Message(f"m{i}", session_id=f"s{i}") for i in range(clients)])
    peak: list[int] = []

    async def main() -> list[str]:
        conn_str = emulator.connection_string
        async with AsyncClient.from_connection_string(conn_str, retry_total=0) as client:
            receivers = [client.get_queue_receiver("q", session_id=f"s{i}") for i in range(clients)]
            await asyncio.gather(*(receiver.__aenter__() for receiver in receivers))
            peak.append(trio.from_thread.run_sync(lambda: emulator.connections))

            async def take(receiver: Any) -> str:
                [message] = await receiver.receive_messages(max_wait_time=10)
                await receiver.complete_message(message)
                await receiver.close()
                return str(message)

            return await asyncio.gather(*(take(receiver) for receiver in receivers))

    with trio.fail_after(120):
        bodies = await trio.to_thread.run_sync(_run_plain_asyncio, main())
    assert bodies == [f"m{i}" for i in range(clients)]
    assert peak[0] >= clients
    assert emulator.broker.active_message_count("q") == 0


def _run_plain_asyncio(coroutine: Any) -> Any:
    """Run in a plain asyncio loop, not trio-asyncio's (which asyncio.run gives once
    trio_asyncio is imported, as the Azure backend does)."""
    import asyncio

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(coroutine)
