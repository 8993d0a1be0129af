"""MemoryBroker entities without sessions: a receiver that locks each message on its own."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_sessions import (
    MemoryBroker,
    Message,
    MessageAlreadySettledError,
    MessageLockLostError,
    MessageNotFoundError,
    ReceiveMode,
)
from trio_sessions._messages import Abandon, Complete, DeadLetter, Defer

Q = "plain"


def plain_broker(**kwargs: object) -> MemoryBroker:
    broker = MemoryBroker(record_completed=True)
    broker.create_queue(Q, requires_session=False, **kwargs)  # type: ignore[arg-type]
    return broker


async def test_messages_without_sessions_are_received_in_order() -> None:
    """Messages sent without a session id come out oldest first, up to max_count."""
    broker = plain_broker()
    await broker.send(Q, [Message(f"m{i}") for i in range(5)])
    receiver = broker.open_receiver(Q)
    first = await receiver.receive(3)
    second = await receiver.receive(10)
    assert [m.text() for m in first + second] == [f"m{i}" for i in range(5)]
    for message in first + second:
        await receiver.settle(Complete(message))
    assert broker.active_message_count(Q) == 0
    assert len(broker.completed_messages(Q)) == 5


async def test_receive_waits_and_times_out(autojump_clock: trio.testing.MockClock) -> None:
    """receive waits on the Trio clock for a message, or returns [] after max_wait_time."""
    broker = plain_broker()
    receiver = broker.open_receiver(Q)
    assert await receiver.receive(max_wait_time=5) == []
    assert trio.current_time() == pytest.approx(5)

    async def send_later() -> None:
        await trio.sleep(3)
        await broker.send(Q, Message(b"late"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_later)
        [message] = await receiver.receive()
    assert message.body == b"late"
    assert trio.current_time() == pytest.approx(8)


async def test_message_locks_expire_and_can_be_renewed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A message lock lapses after lock_duration unless renewed; then settling fails."""
    broker = plain_broker(lock_duration=10)
    await broker.send(Q, [Message(b"a"), Message(b"b")])
    receiver = broker.open_receiver(Q)
    a, b = await receiver.receive(2)
    await trio.sleep(8)
    deadline = await receiver.renew_message_lock(a)
    assert deadline == pytest.approx(18)
    await trio.sleep(4)
    await receiver.settle(Complete(a))
    with pytest.raises(MessageLockLostError):
        await receiver.settle(Complete(b))
    [again] = await receiver.receive()
    assert (again.body, again.delivery_count) == (b"b", 1)


async def test_two_receivers_share_an_entity(autojump_clock: trio.testing.MockClock) -> None:
    """A message locked by one receiver is not delivered to another until its lock ends."""
    broker = plain_broker(lock_duration=10)
    await broker.send(Q, Message(b"only"))
    one, two = broker.open_receiver(Q), broker.open_receiver(Q)
    [held] = await one.receive()
    assert await two.receive(max_wait_time=5) == []
    with pytest.raises(MessageLockLostError):
        await two.settle(Complete(held))  # not its lock
    [again] = await two.receive(max_wait_time=60)  # wakes when the lock expires at 10 s
    assert trio.current_time() == pytest.approx(10)
    assert again.delivery_count == 1


async def test_settlements_and_deferral() -> None:
    """Abandon, dead-letter and defer work per message; deferred come back by number."""
    broker = plain_broker(max_delivery_count=2)
    await broker.send(Q, [Message(b"abandon"), Message(b"dead"), Message(b"defer")])
    receiver = broker.open_receiver(Q)
    a, d, f = await receiver.receive(3)
    await receiver.settle(Abandon(a))
    await receiver.settle(DeadLetter(d, "bad", "very"))
    await receiver.settle(Defer(f))
    with pytest.raises(MessageLockLostError):
        await receiver.settle(Complete(f))
    [a2] = await receiver.receive()
    assert a2.delivery_count == 1
    await receiver.settle(Abandon(a2))  # second failed delivery: dead-lettered
    assert [m.dead_letter_reason for m in broker.dead_letter_messages(Q)] == [
        "bad",
        "MaxDeliveryCountExceeded",
    ]
    with pytest.raises(MessageNotFoundError):
        await receiver.receive_deferred([999])
    [f2] = await receiver.receive_deferred([f.sequence_number])
    with pytest.raises(MessageNotFoundError):
        await receiver.receive_deferred([f.sequence_number])  # locked already
    await receiver.settle(Complete(f2))
    assert broker.active_message_count(Q) == 0


async def test_closing_returns_held_messages() -> None:
    """aclose returns what the receiver still holds; a closed receiver refuses work."""
    broker = plain_broker()
    await broker.send(Q, [Message(b"1"), Message(b"2")])
    receiver = broker.open_receiver(Q)
    held = await receiver.receive(2)
    await receiver.aclose()
    await receiver.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await receiver.receive()
    with pytest.raises(trio.ClosedResourceError):
        await receiver.settle(Complete(held[0]))
    assert [m.delivery_count for m in broker.active_messages(Q)] == [1, 1]


async def test_receive_and_delete_without_sessions() -> None:
    """In RECEIVE_AND_DELETE mode messages are gone on receipt and cannot be settled."""
    broker = plain_broker()
    await broker.send(Q, Message(b"1"))
    receiver = broker.open_receiver(Q, receive_mode=ReceiveMode.RECEIVE_AND_DELETE)
    [message] = await receiver.receive()
    assert message.lock_token is None
    with pytest.raises(MessageAlreadySettledError):
        await receiver.settle(Complete(message))
    assert broker.active_message_count(Q) == 0


async def test_receiver_arguments_are_checked() -> None:
    """A session entity, a bad mode or a bad count is refused with a clear error."""
    broker = plain_broker()
    broker.create_queue("sessions")
    with pytest.raises(ValueError, match="requires sessions"):
        broker.open_receiver("sessions")
    with pytest.raises(TypeError, match="receive_mode"):
        broker.open_receiver(Q, receive_mode="peeklock")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_count"):
        await broker.open_receiver(Q).receive(0)
    assert "plain" in repr(broker.open_receiver(Q))
