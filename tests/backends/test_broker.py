"""The MemoryBroker used directly: entities, sending, accepting, locks, expiry, inspection."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import trio
import trio.testing

from trio_sessions import (
    EntityNotFoundError,
    MemoryBroker,
    Message,
    MessageAlreadySettledError,
    MessageNotFoundError,
    OperationTimeoutError,
    ReceiveMode,
    ServiceBusConnectionError,
    SessionCannotBeLockedError,
    SessionLockLostError,
    SessionsNotEnabledError,
)
from trio_sessions._messages import Complete, EntityPath

Q = EntityPath(queue_name="q")


async def broker_with(*messages: tuple[str, str], **queue_kwargs: Any) -> MemoryBroker:
    broker = MemoryBroker()
    broker.create_queue("q", **queue_kwargs)
    for session_id, body in messages:
        await broker.send("q", Message(body, session_id=session_id))
    return broker


async def test_broker_is_a_no_op_async_context_manager() -> None:
    """async with MemoryBroker() gives the broker itself."""
    async with MemoryBroker() as broker:
        assert isinstance(broker, MemoryBroker)


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"lock_duration": 0}, ValueError, "lock_duration"),
        ({"lock_duration": "1"}, TypeError, "lock_duration"),
        ({"max_delivery_count": 0}, ValueError, "max_delivery_count"),
        ({"max_delivery_count": 1.5}, TypeError, "max_delivery_count"),
        ({"requires_session": 1}, TypeError, "requires_session"),
        ({"default_message_time_to_live": -1}, ValueError, "default_message_time_to_live"),
        ({"dead_lettering_on_message_expiration": "yes"}, TypeError, "dead_lettering"),
    ],
)
def test_bad_entity_settings_name_the_field(
    kwargs: dict[str, Any], error: type[Exception], field: str
) -> None:
    """Entity settings are checked, naming the field."""
    broker = MemoryBroker()
    with pytest.raises(error, match=field):
        broker.create_queue("q", **kwargs)
    broker.create_topic("t")
    with pytest.raises(error, match=field):
        broker.create_subscription("t", "s", **kwargs)


def test_entity_names() -> None:
    """Names must be new, non-empty and without '/'; subscriptions need their topic."""
    broker = MemoryBroker()
    broker.create_queue("q")
    broker.create_topic("t")
    broker.create_subscription("t", "s")
    with pytest.raises(ValueError, match="exists already"):
        broker.create_queue("q")
    with pytest.raises(ValueError, match="exists already"):
        broker.create_topic("q")
    with pytest.raises(ValueError, match="exists already"):
        broker.create_queue("t")
    with pytest.raises(ValueError, match="has a subscription named"):
        broker.create_subscription("t", "s")
    with pytest.raises(ValueError, match="queue name"):
        broker.create_queue("a/b")
    with pytest.raises(ValueError, match="topic name"):
        broker.create_topic("")
    with pytest.raises(EntityNotFoundError, match="no topic"):
        broker.create_subscription("nope", "s")


async def test_send_checks_the_whole_batch_first() -> None:
    """A bad batch stores nothing; unknown entities and subscriptions are refused."""
    broker = MemoryBroker()
    broker.create_queue("q")
    broker.create_topic("t")
    with pytest.raises(TypeError, match="Message objects"):
        await broker.send("q", [Message(b"ok", session_id="a"), b"raw"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="requires sessions"):
        await broker.send("q", [Message(b"ok", session_id="a"), Message(b"no session")])
    assert broker.active_message_count("q") == 0
    with pytest.raises(EntityNotFoundError, match="no queue or topic"):
        await broker.send("nope", Message(b"x"))
    with pytest.raises(EntityNotFoundError, match="send to its topic"):
        await broker.send("t/subscriptions/s", Message(b"x"))
    with pytest.raises(EntityNotFoundError, match="is a topic"):
        broker.active_message_count("t")
    with pytest.raises(EntityNotFoundError, match="no queue or subscription"):
        broker.dead_letter_messages("nope")


async def test_topics_fan_out_to_each_subscription() -> None:
    """Each subscription gets its own copy, with its own sequence numbers."""
    broker = MemoryBroker()
    broker.create_topic("t")
    broker.create_subscription("t", "a")
    broker.create_subscription("t", "b", requires_session=False)
    await broker.send("t", [Message(b"1", session_id="s"), Message(b"2")])
    [one] = broker.active_messages("t/subscriptions/a")
    assert one.body == b"1"
    [dead] = broker.dead_letter_messages("t/subscriptions/a")
    assert dead.dead_letter_reason == "SessionIdIsMissing"
    assert [m.body for m in broker.active_messages("t/subscriptions/b")] == [b"1", b"2"]


async def test_accept_waits_and_times_out(autojump_clock: trio.testing.MockClock) -> None:
    """Next-available accept waits on the Trio clock, then raises OperationTimeoutError."""
    broker = await broker_with()
    with pytest.raises(OperationTimeoutError, match="within 5"):
        await broker.accept_session(Q, max_wait_time=5)
    assert trio.current_time() == pytest.approx(5)

    async def send_later() -> None:
        await trio.sleep(2)
        await broker.send("q", Message(b"x", session_id="late"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_later)
        link = await broker.accept_session(Q)
    assert link.session_id == "late"
    assert trio.current_time() == pytest.approx(7)


async def test_sessions_are_offered_oldest_message_first() -> None:
    """Next-available accept hands out sessions in order of their oldest ready message."""
    broker = await broker_with(("b", "1"), ("a", "2"), ("c", "3"), ("a", "4"))
    order = [(await broker.accept_session(Q)).session_id for _ in range(3)]
    assert order == ["b", "a", "c"]


async def test_empty_or_deferred_only_sessions_need_their_id(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A session with nothing ready is accepted only by id."""
    broker = await broker_with(("a", "1"))
    link = await broker.accept_session(Q)
    [message] = await link.receive(1)
    await link.defer(message)
    await link.aclose()
    with pytest.raises(OperationTimeoutError):
        await broker.accept_session(Q, max_wait_time=1)
    again = await broker.accept_session(Q, "a")
    [back] = await again.receive_deferred([message.sequence_number])
    assert back.body == b"1"
    empty = await broker.accept_session(Q, "never-used")
    assert await empty.get_state() is None


async def test_locks_are_exclusive_and_expire(autojump_clock: trio.testing.MockClock) -> None:
    """A held session cannot be accepted; once its lock lapses, another receiver gets it."""
    broker = await broker_with(("a", "1"), lock_duration=10)
    first = await broker.accept_session(Q)
    [message] = await first.receive(1)
    with pytest.raises(SessionCannotBeLockedError):
        await broker.accept_session(Q, "a")
    assert first.locked_until == pytest.approx(10)
    assert broker.locked_sessions("q") == ["a"]
    second = await broker.accept_session(Q, max_wait_time=60)  # waits for the expiry
    assert trio.current_time() == pytest.approx(10)
    with pytest.raises(SessionLockLostError):
        await first.complete(message)
    [again] = await second.receive(1)
    assert again.delivery_count == 1


async def test_renewal_moves_the_lock(autojump_clock: trio.testing.MockClock) -> None:
    """renew_lock returns the new deadline; locked_until_utc follows virtual time."""
    broker = await broker_with(("a", "1"), lock_duration=10)
    link = await broker.accept_session(Q)
    [message] = await link.receive(1)
    assert message.locked_until == link.locked_until_utc
    await trio.sleep(8)
    assert await link.renew_lock() == pytest.approx(18)
    assert (link.locked_until_utc - message.locked_until) == dt.timedelta(seconds=8)
    assert message.enqueued_time.tzinfo is dt.UTC
    await trio.sleep(9)
    await link.complete(message)
    assert broker.active_message_count("q") == 0


async def test_receive_wakes_on_a_new_message_and_on_lock_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A waiting receive returns when a message arrives, and raises when the lock goes."""
    broker = await broker_with(("a", "1"), lock_duration=30)
    link = await broker.accept_session(Q)
    await link.receive(5)

    async def send_later() -> None:
        await trio.sleep(1)
        await broker.send("q", Message(b"2", session_id="a"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_later)
        [second] = await link.receive(5)
    assert second.body == b"2"
    with pytest.raises(SessionLockLostError):
        await link.receive(1)  # nothing more: waits until the lock lapses at 30 s
    assert trio.current_time() == pytest.approx(30)


async def test_settlement_errors() -> None:
    """Settling twice, on a closed link, or in receive-and-delete mode is refused."""
    broker = await broker_with(("a", "1"), ("a", "2"))
    link = await broker.accept_session(Q)
    first, second = await link.receive(2)
    await link.complete(first)
    with pytest.raises(MessageAlreadySettledError):
        await link.abandon(first)
    results = await link.settle([Complete(first), Complete(second)])
    assert isinstance(results[0], MessageAlreadySettledError)
    assert results[1] is None
    with pytest.raises(MessageNotFoundError):
        await link.receive_deferred([12345])
    with pytest.raises(ValueError, match="max_count"):
        await link.receive(0)
    with pytest.raises(TypeError, match="bytes or None"):
        await link.set_state("text")  # type: ignore[arg-type]
    await link.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await link.get_state()
    await broker.send("q", Message(b"3", session_id="b"))
    deleting = await broker.accept_session(Q, receive_mode=ReceiveMode.RECEIVE_AND_DELETE)
    [gone] = await deleting.receive(1)
    with pytest.raises(MessageAlreadySettledError):
        await deleting.complete(gone)
    with pytest.raises(MessageAlreadySettledError):
        await deleting.receive_deferred([1])
    assert broker.active_message_count("q") == 0


async def test_accept_refuses_bad_entities_and_modes() -> None:
    """Accepting needs an existing session entity and a ReceiveMode."""
    broker = MemoryBroker()
    broker.create_queue("plain", requires_session=False)
    broker.create_queue("q")
    with pytest.raises(EntityNotFoundError):
        await broker.accept_session(EntityPath(queue_name="nope"))
    with pytest.raises(SessionsNotEnabledError, match="plain"):
        await broker.accept_session(EntityPath(queue_name="plain"))
    with pytest.raises(TypeError, match="receive_mode"):
        await broker.accept_session(Q, receive_mode="peeklock")  # type: ignore[arg-type]


async def test_time_to_live(autojump_clock: trio.testing.MockClock) -> None:
    """Expired messages are dropped, or dead-lettered when the entity says so."""
    broker = MemoryBroker()
    broker.create_queue("q", default_message_time_to_live=10)
    broker.create_queue("dlq", dead_lettering_on_message_expiration=True)
    await broker.send(
        "q",
        [Message(b"short", session_id="a", time_to_live=1), Message(b"default", session_id="a")],
    )
    await broker.send("dlq", Message(b"x", session_id="a", time_to_live=1))
    await trio.sleep(2)
    assert [m.body for m in broker.active_messages("q")] == [b"default"]
    assert [m.body for m in broker.expired_messages("q")] == [b"short"]
    assert broker.active_message_count("dlq") == 0
    assert broker.dead_letter_messages("dlq")[0].dead_letter_reason == "TTLExpiredException"
    await trio.sleep(10)
    with pytest.raises(OperationTimeoutError):
        await broker.accept_session(Q, max_wait_time=1)
    assert len(broker.expired_messages("q")) == 2


async def test_expired_head_is_skipped_on_delivery(autojump_clock: trio.testing.MockClock) -> None:
    """A locked session never delivers a message that expired while waiting."""
    broker = MemoryBroker()
    broker.create_queue("q", lock_duration=100)
    await broker.send(
        "q", [Message(b"old", session_id="a", time_to_live=1), Message(b"new", session_id="a")]
    )
    link = await broker.accept_session(EntityPath(queue_name="q"), "a")
    await trio.sleep(2)
    assert [m.body for m in await link.receive(5)] == [b"new"]


async def test_fault_injection(autojump_clock: trio.testing.MockClock) -> None:
    """fail_next makes the next named operations fail, in order; bad names are refused."""
    broker = await broker_with(("a", "1"))
    broker.fail_next("accept_session", ServiceBusConnectionError)
    broker.fail_next("accept_session", OperationTimeoutError("slow"))
    with pytest.raises(ServiceBusConnectionError, match="injected failure of accept_session"):
        await broker.accept_session(Q)
    with pytest.raises(OperationTimeoutError, match="slow"):
        await broker.accept_session(Q)
    link = await broker.accept_session(Q)
    broker.fail_next("get_state", ServiceBusConnectionError)
    with pytest.raises(ServiceBusConnectionError):
        await link.get_state()
    broker.fail_next("send", ServiceBusConnectionError)
    with pytest.raises(ServiceBusConnectionError):
        await broker.send("q", Message(b"x", session_id="a"))
    with pytest.raises(ValueError, match="operation must be one of"):
        broker.fail_next("explode", ValueError)
    broker.expire_session_lock("q", "nobody")  # not locked: nothing happens
    assert "MemorySessionLink q/a" in repr(link)


async def test_completed_messages_need_recording() -> None:
    """completed_messages is available only when the broker records completions."""
    broker = await broker_with(("a", "1"))
    with pytest.raises(RuntimeError, match="record_completed"):
        broker.completed_messages("q")
    assert broker.session_state("q", "nobody") is None
