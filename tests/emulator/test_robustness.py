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
from azure.servicebus import ServiceBusClient, ServiceBusMessage

from trio_sessions import MemoryBroker
from trio_sessions.emulator import Emulator, serve_emulator

proton = pytest.importorskip("proton")

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
OPEN, BEGIN, ATTACH, FLOW, CLOSE = 0x10, 0x11, 0x12, 0x13, 0x18
SOURCE, ERROR = 0x28, 0x1D


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


async def test_idle_timeout_is_validated() -> None:
    """A bad idle_timeout is refused with the field's name and the allowed values."""
    with pytest.raises(ValueError, match=r"idle_timeout must be None or seconds > 0, got 0"):
        async with serve_emulator(MemoryBroker(), idle_timeout=0):
            pass  # pragma: no cover
    async with serve_emulator(MemoryBroker(), idle_timeout=None) as emulator:
        with pytest.raises(ValueError, match="idle_timeout"):
            emulator.idle_timeout = -1


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


async def test_sdk_still_served_with_short_idle_timeout() -> None:
    """The Python SDK keeps working against an emulator that announces an idle timeout."""
    broker = MemoryBroker()
    broker.create_queue("q")
    async with serve_emulator(broker, idle_timeout=10) as emulator:
        assert await sdk_round_trip(emulator) == "ok"
