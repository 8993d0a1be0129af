"""What the JavaScript SDK (rhea) does on the wire that the Python SDK does not.

The Python SDK never drains a link and sends batches in a different envelope, so these
tests speak AMQP with proton's engine on a Trio socket. Drain: grant credit with the drain
flag set, and the emulator must send what it has, then hand the rest of the credit back in
a flow (credit 0, delivery-count advanced). Batches: the JS SDK copies the first message's
properties and application properties onto the envelope.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing

from trio_sessions import MemoryBroker, Message
from trio_sessions.emulator import Emulator, serve_emulator

proton = pytest.importorskip("proton")


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    broker = MemoryBroker()
    broker.create_queue("q")
    broker.create_queue("plain", requires_session=False)
    async with serve_emulator(broker) as running:
        yield running


class Client:
    """An AMQP client: proton's engine, with this test's task moving the bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.transport = proton.Transport()
        self.transport.sasl().allowed_mechs("ANONYMOUS")
        self.connection = proton.Connection()
        self.transport.bind(self.connection)
        self.collector = proton.Collector()
        self.connection.collect(self.collector)
        self.received: list[Any] = []  # decoded proton Messages, in arrival order
        self.connection.open()
        self.session = self.connection.session()
        self.session.open()

    def _on_events(self) -> None:
        while (event := self.collector.peek()) is not None:
            delivery = event.delivery
            if (
                event.type == proton.Event.DELIVERY
                and delivery.link.is_receiver
                and delivery.readable
                and not delivery.partial
            ):
                message = proton.Message()
                message.decode(delivery.link.recv(delivery.pending))
                delivery.link.advance()
                self.received.append(message)
            self.collector.pop()

    async def until(self, done: Callable[[], bool]) -> None:
        """Exchange bytes with the emulator until ``done()`` holds."""
        with trio.fail_after(10):
            while True:
                self._on_events()
                if (pending := self.transport.pending()) > 0:
                    await self.stream.send_all(self.transport.peek(pending))
                    self.transport.pop(pending)
                    continue
                if done():
                    return
                data = await self.stream.receive_some(65536)
                assert data, "the emulator closed the connection"
                self.transport.push(data)

    async def send(self, address: str, payload: bytes) -> Any:
        """Send one transfer on a new link; return the emulator's outcome."""
        link = self.session.sender(f"sender-{address}")
        link.target.address = address
        link.open()
        await self.until(lambda: link.credit > 0)
        delivery = link.delivery(b"1")
        link.send(payload)
        link.advance()
        await self.until(lambda: delivery.remote_state != 0)
        return delivery.remote_state

    async def receiver(self, address: str, session_id: str | None = None) -> Any:
        link = self.session.receiver(f"receiver-{address}")
        link.source.address = address
        if session_id is not None:
            link.source.filter.put_dict({proton.symbol("com.microsoft:session-filter"): session_id})
        link.open()
        await self.until(lambda: link.remote_source.address is not None)
        return link


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[Client]:
    async with await trio.open_tcp_stream(emulator.host, emulator.port) as stream:
        yield Client(stream)


def bodies(messages: list[Any]) -> list[Any]:
    return [message.body for message in messages]


async def test_drain_sends_what_there_is_and_returns_the_rest(
    emulator: Emulator, client: Client
) -> None:
    """Credit 5 with drain, 2 messages: both arrive, then a flow hands back 3 credits."""
    await emulator.broker.send("plain", [Message(b"a"), Message(b"b")])
    link = await client.receiver("plain")
    link.drain(5)
    await client.until(lambda: link.credit == 0)
    assert bodies(client.received) == [b"a", b"b"]
    assert link.drained() == 3


async def test_drain_ends_a_wait_and_the_link_keeps_working(
    emulator: Emulator, client: Client
) -> None:
    """Draining a receiver that waits for messages returns all its credit; new credit later
    still brings the next message (nothing was taken while draining)."""
    link = await client.receiver("q", "s")
    link.flow(3)
    await client.until(lambda: True)  # send the credit
    await trio.testing.wait_all_tasks_blocked()  # the emulator waits for messages now
    link.drain(0)
    await client.until(lambda: link.credit == 0)
    assert link.drained() == 3
    assert client.received == []

    await emulator.broker.send("q", [Message(b"late", session_id="s")])
    link.drain_mode = False
    link.flow(1)
    await client.until(lambda: len(client.received) == 1)
    assert bodies(client.received) == [b"late"]


@pytest.mark.parametrize(("queue", "session_id"), [("q", "s"), ("plain", None)])
async def test_drain_keeps_back_a_credit_for_its_answer(
    emulator: Emulator, client: Client, queue: str, session_id: str | None
) -> None:
    """Drain with 2 credits and 3 messages: one message and a flow returning 1 credit (a
    flow is proton's only drain answer); the other two stay, undelivered, for later."""
    await emulator.broker.send(
        queue, [Message(b, session_id=session_id) for b in (b"1", b"2", b"3")]
    )
    link = await client.receiver(queue, session_id)
    link.drain(2)
    await client.until(lambda: link.credit == 0)
    assert bodies(client.received) == [b"1"]
    assert link.drained() == 1

    link.drain_mode = False
    link.flow(5)
    await client.until(lambda: len(client.received) == 3)
    assert bodies(client.received) == [b"1", b"2", b"3"]
    assert [m.delivery_count for m in client.received] == [0, 0, 0]


def data_section(payload: bytes) -> bytes:
    return b"\x00\x53\x75\xb0" + len(payload).to_bytes(4, "big") + payload


def encoded(body: bytes, **fields: Any) -> bytes:
    message = proton.Message(body=body, **fields)
    message.inferred = True  # bytes travel as a data section
    return bytes(message.encode())


async def test_a_batch_with_the_first_messages_properties_on_its_envelope(
    emulator: Emulator, client: Client
) -> None:
    """The JS SDK's batch envelope repeats the first message's properties and application
    properties; the emulator still enqueues each message of the batch."""
    first = {"id": "m-1", "group_id": "s", "properties": {"n": proton.int32(1)}}
    envelope = proton.Message(**first).encode()  # header, properties, application-properties
    batch = bytes(envelope) + data_section(encoded(b"one", **first))
    batch += data_section(encoded(b"two", id="m-2", group_id="s"))
    assert await client.send("q", batch) == proton.Delivery.ACCEPTED
    messages = emulator.broker.active_messages("q")
    assert [(m.body, m.message_id, m.application_properties) for m in messages] == [
        (b"one", "m-1", {"n": 1}),
        (b"two", "m-2", {}),
    ]


async def test_a_message_with_other_properties_than_its_body_is_not_a_batch(
    emulator: Emulator, client: Client
) -> None:
    """A plain message whose body happens to be an encoded message stays one message when
    its application properties differ from the inner message's."""
    inner = encoded(b"inner", id="inner", group_id="s")
    outer = bytes(proton.Message(id="outer", group_id="s", properties={"k": "v"}).encode())
    assert await client.send("q", outer + data_section(inner)) == proton.Delivery.ACCEPTED
    [message] = emulator.broker.active_messages("q")
    assert (message.body, message.message_id) == (inner, "outer")
