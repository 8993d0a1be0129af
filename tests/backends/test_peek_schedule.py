"""MemoryBroker peek, scheduled messages, properties to modify, and message fields."""

from __future__ import annotations

import datetime as dt

import pytest
import trio
import trio.testing

from trio_sessions import (
    EntityNotFoundError,
    MemoryBroker,
    Message,
    MessageNotFoundError,
)
from trio_sessions._messages import Abandon, Complete, DeadLetter, Defer, EntityPath

Q = EntityPath(queue_name="q")


def in_seconds(broker: MemoryBroker, seconds: float) -> dt.datetime:
    """A UTC time ``seconds`` from now on the broker's (Trio) clock."""
    return broker._utc(trio.current_time() + seconds)


async def test_peek_neither_locks_nor_counts() -> None:
    """Peek shows active, locked and deferred messages by sequence number, changing nothing."""
    broker = MemoryBroker()
    broker.create_queue("q")
    await broker.send("q", [Message(f"m{i}", session_id="a" if i % 2 else "b") for i in range(5)])
    link = await broker.accept_session(Q, "b")
    first, second, third = await link.receive(3)  # m0, m2, m4
    await link.settle([Defer(second), Complete(third)])

    peeked = broker.peek_messages("q", max_count=10)
    assert [(m.text(), m.sequence_number) for m in peeked] == [
        ("m0", 1),
        ("m1", 2),
        ("m2", 3),
        ("m3", 4),
    ]
    assert all(m.lock_token is None and m.delivery_count == 0 for m in peeked)
    assert [m.text() for m in broker.peek_messages("q", from_sequence_number=3, max_count=2)] == [
        "m2",
        "m3",
    ]
    assert [m.text() for m in broker.peek_messages("q", session_id="a", max_count=5)] == [
        "m1",
        "m3",
    ]
    assert broker.peek_messages("q", session_id="nobody") == []
    assert [m.text() for m in broker.peek_messages("q")] == ["m0"]
    # Nothing changed: the locked message is still settleable, the others still available.
    await link.complete(first)
    assert broker.locked_sessions("q") == ["b"]
    other = await broker.accept_session(Q)
    assert [m.delivery_count for m in await other.receive(5)] == [0, 0]


async def test_peek_checks_its_arguments() -> None:
    """A bad count or entity is refused, naming the problem."""
    broker = MemoryBroker()
    broker.create_queue("q", requires_session=False)
    with pytest.raises(ValueError, match="max_count"):
        broker.peek_messages("q", max_count=0)
    with pytest.raises(EntityNotFoundError):
        broker.peek_messages("nope")


async def test_scheduled_messages_wait_for_their_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A scheduled message is neither delivered nor active before its time; peek shows it."""
    broker = MemoryBroker()
    broker.create_queue("q")
    broker.create_queue("plain", requires_session=False)
    at = in_seconds(broker, 10)
    await broker.send("q", Message("later", session_id="s", scheduled_enqueue_time=at))
    [seq] = await broker.schedule_messages("plain", Message("later"), at)
    assert seq == 1
    assert broker.active_message_count("q") == 0
    assert [m.text() for m in broker.scheduled_messages("plain")] == ["later"]
    assert [m.text() for m in broker.peek_messages("q", session_id="s")] == ["later"]

    receiver = broker.open_receiver("plain")
    assert await receiver.receive(max_wait_time=5) == []
    link = await broker.accept_session(Q, max_wait_time=30)  # waits until the message is due
    assert trio.current_time() == pytest.approx(10)
    [message] = await link.receive(1)
    assert (message.text(), message.scheduled_enqueue_time) == ("later", at)
    assert message.enqueued_time == at
    [plain] = await receiver.receive(max_wait_time=1)
    assert plain.text() == "later"
    assert broker.scheduled_messages("plain") == []


async def test_a_waiting_session_receiver_wakes_for_a_scheduled_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A receiver holding the session gets its scheduled message at the scheduled time."""
    broker = MemoryBroker()
    broker.create_queue("q", lock_duration=60)
    link = await broker.accept_session(Q, "s")
    await broker.schedule_messages("q", Message("x", session_id="s"), in_seconds(broker, 20))
    [message] = await link.receive(1)
    assert message.text() == "x"
    assert trio.current_time() == pytest.approx(20)


async def test_a_session_holder_already_waiting_sees_a_new_schedule(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Scheduling wakes the session's waiting holder, so it wakes again when it is due
    (rather than at its lock's expiry)."""
    broker = MemoryBroker()
    broker.create_queue("q", lock_duration=60)
    link = await broker.accept_session(Q, "s")
    async with trio.open_nursery() as nursery:

        async def schedule() -> None:
            await trio.testing.wait_all_tasks_blocked()
            await broker.schedule_messages(
                "q", Message("s", session_id="s"), in_seconds(broker, 20)
            )

        nursery.start_soon(schedule)
        [message] = await link.receive(1)
    assert message.text() == "s"
    assert trio.current_time() == pytest.approx(20)


async def test_waiting_accepts_and_receivers_see_a_new_schedule(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Scheduling wakes waiting accepts and plain receivers to wait for the due time."""
    broker = MemoryBroker()
    broker.create_queue("q")
    broker.create_queue("plain", requires_session=False)
    receiver = broker.open_receiver("plain")
    got: dict[str, float] = {}

    async def plain_receive() -> None:
        await receiver.receive(max_wait_time=100)
        got["plain"] = trio.current_time()

    async def next_available() -> None:
        await broker.accept_session(Q, max_wait_time=100)
        got["accept"] = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(plain_receive)
        nursery.start_soon(next_available)
        await trio.testing.wait_all_tasks_blocked()
        at = in_seconds(broker, 20)
        await broker.schedule_messages("q", Message("t", session_id="t"), at)
        await broker.schedule_messages("plain", Message("p"), at)
    assert got == pytest.approx({"plain": 20, "accept": 20})


async def test_cancel_scheduled_messages() -> None:
    """Cancelled messages never arrive; unknown numbers cancel nothing and raise."""
    broker = MemoryBroker()
    broker.create_topic("t")
    broker.create_subscription("t", "one", requires_session=False)
    broker.create_subscription("t", "two", requires_session=False)
    at = in_seconds(broker, 60)
    first, second = await broker.schedule_messages("t", [Message("a"), Message("b")], at)
    with pytest.raises(MessageNotFoundError, match="99"):
        await broker.cancel_scheduled_messages("t", [first, 99])
    assert len(broker.scheduled_messages("t/subscriptions/one")) == 2
    await broker.cancel_scheduled_messages("t", [first])
    for path in ("t/subscriptions/one", "t/subscriptions/two"):
        assert [(m.text(), m.sequence_number) for m in broker.scheduled_messages(path)] == [
            ("b", second)
        ]
    with pytest.raises(EntityNotFoundError):
        await broker.cancel_scheduled_messages("nope", [1])


async def test_a_past_schedule_enqueues_at_once() -> None:
    """A scheduled time already past is the same as no schedule."""
    broker = MemoryBroker()
    broker.create_queue("q", requires_session=False)
    await broker.schedule_messages("q", [Message("now")], in_seconds(broker, -5))
    assert broker.active_message_count("q") == 1
    with pytest.raises(TypeError, match="Message"):
        await broker.schedule_messages("q", ["x"], in_seconds(broker, 5))  # type: ignore[list-item]


async def test_topic_copies_share_sequence_numbers() -> None:
    """Each subscription's copy of a topic message has the topic's sequence number."""
    broker = MemoryBroker()
    broker.create_topic("t")
    broker.create_subscription("t", "one", requires_session=False)
    broker.create_subscription("t", "two", requires_session=False)
    await broker.send("t", [Message("a"), Message("b")])
    for path in ("t/subscriptions/one", "t/subscriptions/two"):
        assert [m.sequence_number for m in broker.active_messages(path)] == [1, 2]


async def test_properties_to_modify() -> None:
    """Abandon, defer and dead-letter merge properties_to_modify into the message's."""
    broker = MemoryBroker()
    broker.create_queue("q", requires_session=False)
    await broker.send(
        "q", [Message(f"m{i}", application_properties={"keep": 1, "n": i}) for i in range(3)]
    )
    receiver = broker.open_receiver("q")
    abandoned, deferred, dead = await receiver.receive(3)
    await receiver.settle(Abandon(abandoned, properties_to_modify={"n": "changed", "new": True}))
    await receiver.settle(Defer(deferred, properties_to_modify={"why": "later"}))
    await receiver.settle(DeadLetter(dead, "bad", properties_to_modify={"n": None}))
    again, back = broker.active_messages("q")
    assert again.application_properties == {"keep": 1, "n": "changed", "new": True}
    assert back.application_properties == {"keep": 1, "n": 1, "why": "later"}
    [dlq] = broker.dead_letter_messages("q")
    assert dlq.application_properties == {"keep": 1, "n": None, "DeadLetterReason": "bad"}
    with pytest.raises(TypeError, match="properties_to_modify"):
        Abandon(again, properties_to_modify={1: "x"})


async def test_addressing_fields_and_time_to_live_are_kept() -> None:
    """to, reply_to, reply_to_session_id and partition_key arrive; time_to_live is effective."""
    broker = MemoryBroker()
    broker.create_queue("q", requires_session=False, default_message_time_to_live=300)
    await broker.send(
        "q",
        [
            Message(
                "x",
                to="dest",
                reply_to="replies",
                reply_to_session_id="rs",
                partition_key="pk",
                time_to_live=30,
            ),
            Message("y"),
        ],
    )
    first, second = broker.active_messages("q")
    assert (first.to, first.reply_to, first.reply_to_session_id, first.partition_key) == (
        "dest",
        "replies",
        "rs",
        "pk",
    )
    assert (first.time_to_live, second.time_to_live) == (30, 300)


@pytest.mark.parametrize(
    ("value", "error"),
    [("tomorrow", TypeError), (dt.datetime(2030, 1, 1), ValueError)],
)
def test_scheduled_enqueue_time_is_checked(value: object, error: type[Exception]) -> None:
    """The scheduled time must be a timezone-aware datetime."""
    with pytest.raises(error, match="scheduled_enqueue_time"):
        Message(b"x", scheduled_enqueue_time=value)
