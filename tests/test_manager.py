"""The session manager on the MemoryBroker: DESIGN §3, behaviour by behaviour, in virtual time."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from trio_sessions import (
    EntityNotFoundError,
    ErrorContext,
    ErrorSource,
    MemoryBroker,
    Message,
    MessageAlreadySettledError,
    MessageNotFoundError,
    ReceivedMessage,
    ReceiveMode,
    RetryPolicy,
    ServiceBusConnectionError,
    SessionCannotBeLockedError,
    SessionContext,
    SessionLockLostError,
    SessionManager,
    SessionManagerOptions,
    SessionsNotEnabledError,
    open_session_manager,
)

Q = "q"
Handler = Callable[[ReceivedMessage, SessionContext], Awaitable[None]]


async def fill(broker: MemoryBroker, sessions: int, per_session: int, entity: str = Q) -> None:
    """Send ``per_session`` messages to each of ``sessions`` sessions, interleaved."""
    for i in range(per_session):
        for s in range(sessions):
            await broker.send(entity, Message(f"s{s}-{i}", session_id=f"s{s}"))


def make_broker(**queue_kwargs: object) -> MemoryBroker:
    broker = MemoryBroker()
    broker.create_queue(Q, **queue_kwargs)  # type: ignore[arg-type]
    return broker


class Errors:
    """Collects what process_error is given."""

    def __init__(self) -> None:
        self.seen: list[ErrorContext] = []

    async def __call__(self, context: ErrorContext) -> None:
        self.seen.append(context)

    def kinds(self) -> list[tuple[type[BaseException], ErrorSource]]:
        return [(type(c.error), c.source) for c in self.seen]


@asynccontextmanager
async def running(
    broker: MemoryBroker,
    handler: Handler,
    options: SessionManagerOptions | None = None,
    errors: Errors | None = None,
    **kwargs: object,
) -> AsyncIterator[SessionManager]:
    """A manager running ``subscribe(handler)`` in the background until the block ends."""
    async with open_session_manager(
        broker,
        queue_name=Q,
        options=options or SessionManagerOptions(),
        **kwargs,  # type: ignore[arg-type]
    ) as manager:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: manager.subscribe(
                    handler, process_error=errors, task_status=task_status
                )
            )
            yield manager
            manager.stop()


async def test_every_message_is_completed_in_session_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each session's messages reach the handler in send order and are all completed."""
    broker = make_broker()
    await fill(broker, sessions=20, per_session=5)
    seen: dict[str, list[str]] = {}

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        assert message.session_id == context.session_id
        seen.setdefault(context.session_id, []).append(message.text())

    options = SessionManagerOptions(session_idle_timeout=0.5)
    async with running(broker, handle, options) as manager:
        await trio.sleep(10)
        assert broker.active_message_count(Q) == 0
    assert seen == {f"s{s}": [f"s{s}-{i}" for i in range(5)] for s in range(20)}
    stats = manager.stats()
    assert stats.messages_received == stats.messages_completed == 100
    assert stats.sessions_accepted == stats.sessions_closed == 20
    assert stats.active_sessions == 0


async def test_quiet_session_is_released(autojump_clock: trio.testing.MockClock) -> None:
    """A session with no traffic for session_idle_timeout seconds gives its lock back."""
    broker = make_broker()
    await broker.send(Q, Message(b"created", session_id="order-1"))
    seen: list[bytes] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        seen.append(message.body)

    options = SessionManagerOptions(session_idle_timeout=30)
    async with running(broker, handle, options) as manager:
        await trio.sleep(29)
        assert manager.stats().active_sessions == 1
        assert broker.locked_sessions(Q) == ["order-1"]
        await trio.sleep(2)
        assert manager.stats().active_sessions == 0
        assert broker.locked_sessions(Q) == []
    assert seen == [b"created"]


async def test_handler_time_never_counts_as_idle(autojump_clock: trio.testing.MockClock) -> None:
    """The idle clock starts when the handler returns, not when the message arrived."""
    broker = make_broker()
    await broker.send(Q, Message(b"slow", session_id="a"))
    handled = trio.Event()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        await trio.sleep(100)
        handled.set()

    options = SessionManagerOptions(session_idle_timeout=30)
    async with running(broker, handle, options) as manager:
        await handled.wait()
        start = trio.current_time()
        await trio.sleep(29)
        assert manager.stats().active_sessions == 1
        await trio.sleep(2)
        assert manager.stats().active_sessions == 0
        assert start == pytest.approx(100, abs=1)


async def test_a_new_message_restarts_the_idle_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A message arriving before the idle timeout keeps the same session open."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    seen: list[bytes] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        seen.append(message.body)

    options = SessionManagerOptions(session_idle_timeout=30)
    async with running(broker, handle, options) as manager:
        await trio.sleep(20)
        await broker.send(Q, Message(b"2", session_id="a"))
        await trio.sleep(20)
        assert manager.stats().active_sessions == 1
        assert manager.stats().sessions_accepted == 1
    assert seen == [b"1", b"2"]


async def test_never_more_sessions_than_allowed(autojump_clock: trio.testing.MockClock) -> None:
    """At most max_concurrent_sessions sessions are held at once, yet all are processed."""
    broker = make_broker()
    await fill(broker, sessions=12, per_session=3)
    held: set[str] = set()
    peak = 0

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        nonlocal peak
        held.add(context.session_id)
        peak = max(peak, len(broker.locked_sessions(Q)))
        await trio.sleep(1)

    options = SessionManagerOptions(max_concurrent_sessions=3, session_idle_timeout=0.5)
    async with running(broker, handle, options) as manager:
        await trio.sleep(200)
        assert manager.stats().messages_completed == 36
    assert peak == 3
    assert len(held) == 12


async def test_one_call_per_session_at_a_time_by_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With max_concurrent_calls_per_session=1 a session's handler calls never overlap."""
    broker = make_broker()
    await fill(broker, sessions=3, per_session=4)
    in_flight: dict[str, int] = {}
    worst = 0

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        nonlocal worst
        in_flight[context.session_id] = in_flight.get(context.session_id, 0) + 1
        worst = max(worst, in_flight[context.session_id])
        await trio.sleep(1)
        in_flight[context.session_id] -= 1

    async with running(broker, handle) as manager:
        await trio.sleep(10)
        assert manager.stats().messages_completed == 12
    assert worst == 1


async def test_concurrent_calls_per_session(autojump_clock: trio.testing.MockClock) -> None:
    """max_concurrent_calls_per_session=3 runs three calls of one session at once."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=9)
    in_flight = 0
    worst = 0

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        nonlocal in_flight, worst
        in_flight += 1
        worst = max(worst, in_flight)
        await trio.sleep(1)
        in_flight -= 1

    options = SessionManagerOptions(max_concurrent_calls_per_session=3, session_idle_timeout=5)
    async with running(broker, handle, options) as manager:
        await trio.sleep(3.5)
        assert manager.stats().messages_completed == 9
        await trio.sleep(10)
        assert manager.stats().active_sessions == 0  # idle once nothing is in flight
    assert worst == 3


async def test_prefetch_bounds_unsettled_messages(autojump_clock: trio.testing.MockClock) -> None:
    """At most calls + prefetch messages of a session are received and unsettled at once."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=10)
    worst = 0

    def unsettled(manager: SessionManager) -> int:
        s = manager.stats()
        return s.messages_received - s.messages_completed - s.messages_abandoned

    holder: list[SessionManager] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        nonlocal worst
        worst = max(worst, unsettled(holder[0]))
        await trio.sleep(1)

    options = SessionManagerOptions(prefetch_count=2)
    async with running(broker, handle, options) as manager:
        holder.append(manager)
        await trio.sleep(0.5)
        assert unsettled(manager) == 3
        await trio.sleep(20)
    assert worst == 3


async def test_without_prefetch_a_message_is_received_only_when_a_call_is_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """prefetch_count=0 receives one message at a time per handler call."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=5)
    holder: list[SessionManager] = []
    observed: list[int] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        s = holder[0].stats()
        observed.append(s.messages_received - s.messages_completed)
        assert broker.active_message_count(Q) == 5 - len(observed) + 1
        await trio.sleep(1)

    async with running(broker, handle) as manager:
        holder.append(manager)
        await trio.sleep(20)
    assert observed == [1, 1, 1, 1, 1]


async def test_lock_is_renewed_while_a_handler_runs(autojump_clock: trio.testing.MockClock) -> None:
    """A handler slower than the lock keeps it: the actor renews ahead of expiry."""
    broker = make_broker(lock_duration=10)
    await broker.send(Q, Message(b"slow", session_id="a"))
    locks: list[object] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        locks.append(context.locked_until)
        await trio.sleep(100)
        locks.append(context.locked_until)

    errors = Errors()
    async with running(broker, handle, errors=errors) as manager:
        await trio.sleep(101)
        stats = manager.stats()
    assert errors.seen == []
    assert stats.messages_completed == 1
    assert stats.lock_renewals >= 19  # every 5 s (half of a 10 s lock)
    assert locks[1] > locks[0]  # type: ignore[operator]


def task_names() -> list[str]:
    """The names of every task of this run."""
    names: list[str] = []
    root = trio.lowlevel.current_root_task()
    assert root is not None
    todo = [root]
    while todo:
        task = todo.pop()
        names.append(task.name)
        todo.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return names


async def test_quiet_session_holds_one_task_until_its_lock_needs_renewing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An idle session's service task starts only when its first renewal is due, and renews."""
    broker = make_broker(lock_duration=10)
    await broker.send(Q, Message(b"1", session_id="a"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        pass

    options = SessionManagerOptions(session_idle_timeout=1000)
    async with running(broker, handle, options) as manager:
        await trio.sleep(4.9)  # the first renewal is due at 5 s (half of a 10 s lock)
        assert manager.stats().messages_completed == 1
        assert "session a" in task_names()
        assert "session a service" not in task_names()
        await trio.sleep(0.2)
        assert "session a service" in task_names()
        assert manager.stats().lock_renewals == 1
        await trio.sleep(20)
        assert manager.stats().lock_renewals == 5
        assert manager.stats().active_sessions == 1


async def test_renewal_end_releases_a_quiet_session_without_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With renewal over, the session is released a margin before its lock expires."""
    broker = make_broker(lock_duration=30)
    await broker.send(Q, Message(b"1", session_id="a"))
    errors = Errors()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        pass

    options = SessionManagerOptions(max_auto_lock_renewal_duration=0, session_idle_timeout=1000)
    async with running(broker, handle, options, errors) as manager:
        await trio.sleep(19.5)
        assert manager.stats().active_sessions == 1
        await trio.sleep(1)  # 30 s lock - 10 s margin = released at 20 s
        assert manager.stats().active_sessions == 0
        assert manager.stats().lock_renewals == 0
    assert errors.seen == []


async def test_renewal_stops_after_max_duration(autojump_clock: trio.testing.MockClock) -> None:
    """Renewal goes on only for max_auto_lock_renewal_duration after accept."""
    broker = make_broker(lock_duration=20)
    await broker.send(Q, Message(b"1", session_id="a"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        pass

    options = SessionManagerOptions(max_auto_lock_renewal_duration=35, session_idle_timeout=1000)
    async with running(broker, handle, options) as manager:
        await trio.sleep(100)
        stats = manager.stats()
    # renewals at 10 and 20 (margin 10); at 30 the next renewal time (30) is not before 35?
    # it is, so a third at 30; at 40 renewal is over: released then, before expiry at 50.
    assert stats.lock_renewals == 3
    assert stats.active_sessions == 0
    assert stats.errors == 0


async def test_handler_running_past_the_lock_is_a_lock_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A handler still running as the lock lapses is cancelled, before the lapse (half the
    renewal margin, 5 s of a 30 s lock: no other receiver can hold the session yet), and
    the loss is reported."""
    broker = make_broker(lock_duration=30)
    await broker.send(Q, Message(b"1", session_id="a"))
    cancelled_at: list[float] = []
    deliveries: list[int] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        deliveries.append(message.delivery_count)
        if message.delivery_count == 0:
            try:
                await trio.sleep(100)
            except trio.Cancelled:
                cancelled_at.append(trio.current_time())
                raise

    errors = Errors()
    options = SessionManagerOptions(max_auto_lock_renewal_duration=0)
    async with running(broker, handle, options, errors) as manager:
        await trio.sleep(40)
        stats = manager.stats()
    assert cancelled_at == [pytest.approx(25)]
    assert errors.kinds() == [(SessionLockLostError, ErrorSource.RENEW_LOCK)]
    assert deliveries == [0, 1]
    assert stats.messages_completed == 1
    assert stats.handler_errors == 0


async def test_expired_lock_found_by_a_settlement_is_reported_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lock lost under a handler is reported once, with the source that found it."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    raised: list[BaseException] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.delivery_count == 0:
            broker.fail_next("complete", SessionLockLostError("lost, as the broker says"))
            try:
                await context.complete(message)
            except SessionLockLostError as exc:
                raised.append(exc)
                raise

    errors = Errors()
    async with running(broker, handle, errors=errors) as manager:
        await trio.sleep(5)
        stats = manager.stats()
    assert len(raised) == 1
    assert errors.kinds() == [(SessionLockLostError, ErrorSource.COMPLETE)]
    assert stats.handler_errors == 0
    assert stats.messages_completed == 1  # the redelivery
    assert broker.active_message_count(Q) == 0


async def test_lock_lost_at_the_broker_cancels_handlers_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lock the broker takes away early cancels the session's handlers before anyone
    else can take the session, so no two handlers of it ever overlap."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    events: list[tuple[str, int]] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        events.append(("start", message.delivery_count))
        try:
            if message.delivery_count == 0:
                broker.expire_session_lock(Q, "a")
                await trio.sleep(5)
        finally:
            events.append(("end", message.delivery_count))

    errors = Errors()
    async with running(broker, handle, errors=errors) as manager:
        await trio.sleep(1)
        assert manager.stats().messages_completed == 1
    assert events == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
    assert errors.kinds() == [(SessionLockLostError, ErrorSource.RENEW_LOCK)]


async def test_failed_renewal_is_a_lock_loss(autojump_clock: trio.testing.MockClock) -> None:
    """A renewal refused with SessionLockLostError cancels the handler and is reported."""
    broker = make_broker(lock_duration=10)
    await broker.send(Q, Message(b"1", session_id="a"))
    broker.fail_next("renew_lock", SessionLockLostError)
    cancelled = trio.Event()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.delivery_count == 0:
            try:
                await trio.sleep(100)
            except trio.Cancelled:
                cancelled.set()
                raise

    errors = Errors()
    async with running(broker, handle, errors=errors) as manager:
        await cancelled.wait()
        assert trio.current_time() == pytest.approx(5)
        await trio.sleep(5)
        assert manager.stats().messages_completed == 1
    assert errors.kinds() == [(SessionLockLostError, ErrorSource.RENEW_LOCK)]


async def test_transient_renewal_errors_are_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A transient renewal error is reported and retried with backoff; the lock survives."""
    broker = make_broker(lock_duration=10)
    await broker.send(Q, Message(b"1", session_id="a"))
    broker.fail_next("renew_lock", ServiceBusConnectionError)

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        await trio.sleep(30)

    errors = Errors()
    async with running(broker, handle, errors=errors) as manager:
        await trio.sleep(31)
        stats = manager.stats()
    assert errors.kinds() == [(ServiceBusConnectionError, ErrorSource.RENEW_LOCK)]
    assert stats.messages_completed == 1
    assert stats.lock_renewals >= 5


async def test_handler_error_abandons_and_redelivers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A handler exception is reported, the message abandoned and delivered again first."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=2)
    seen: list[tuple[str, int]] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        seen.append((message.text(), message.delivery_count))
        if message.text() == "s0-0" and message.delivery_count == 0:
            raise KeyError("boom")

    errors = Errors()
    async with running(broker, handle, errors=errors) as manager:
        await trio.sleep(1)
        stats = manager.stats()
    assert seen == [("s0-0", 0), ("s0-0", 1), ("s0-1", 0)]
    assert errors.kinds() == [(KeyError, ErrorSource.PROCESS_MESSAGE)]
    assert errors.seen[0].session_id == "s0"
    assert errors.seen[0].entity_path == Q
    assert stats.handler_errors == 1
    assert stats.errors == 0
    assert stats.messages_abandoned == 1
    assert stats.messages_completed == 2


async def test_max_delivery_count_dead_letters(autojump_clock: trio.testing.MockClock) -> None:
    """A message that keeps failing is dead-lettered when delivery_count reaches the max."""
    broker = make_broker(max_delivery_count=3)
    await broker.send(Q, Message(b"poison", session_id="a"))
    counts: list[int] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        counts.append(message.delivery_count)
        raise ValueError("always")

    async with running(broker, handle) as manager:
        await trio.sleep(1)
        assert manager.stats().handler_errors == 3
    assert counts == [0, 1, 2]
    [dead] = broker.dead_letter_messages(Q)
    assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
    assert broker.active_message_count(Q) == 0


async def test_without_auto_complete_messages_stay_unsettled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """auto_complete=False settles nothing: unsettled messages come back after the session."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=2)
    seen: list[tuple[str, int]] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        seen.append((message.text(), message.delivery_count))
        if message.delivery_count > 0:
            await context.complete(message)

    options = SessionManagerOptions(auto_complete=False, session_idle_timeout=5)
    async with running(broker, handle, options) as manager:
        await trio.sleep(20)
        stats = manager.stats()
    assert seen == [("s0-0", 0), ("s0-1", 0), ("s0-0", 1), ("s0-1", 1)]
    assert stats.messages_completed == 2
    assert broker.active_message_count(Q) == 0


async def test_explicit_settlements(autojump_clock: trio.testing.MockClock) -> None:
    """complete, abandon, dead_letter and defer each settle once; twice raises."""
    broker = make_broker()
    for body in ["complete", "abandon", "dead", "defer"]:
        await broker.send(Q, Message(body, session_id="a"))
    twice: list[type[BaseException]] = []
    deferred: list[int] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        text = message.text()
        if message.delivery_count:
            await context.complete(message)
            return
        if text == "complete":
            await context.complete(message)
        elif text == "abandon":
            await context.abandon(message)
        elif text == "dead":
            await context.dead_letter(message, reason="bad", error_description="very bad")
        else:
            await context.defer(message)
            deferred.append(message.sequence_number)
        with pytest.raises(MessageAlreadySettledError) as info:
            await context.complete(message)
        twice.append(info.type)

    async with running(broker, handle) as manager:
        await trio.sleep(1)
        stats = manager.stats()
    assert len(twice) == 4
    assert stats.messages_completed == 2  # "complete" and the redelivered "abandon"
    assert stats.messages_abandoned == 1
    assert stats.messages_dead_lettered == 1
    assert stats.messages_deferred == 1
    [dead] = broker.dead_letter_messages(Q)
    assert (dead.dead_letter_reason, dead.dead_letter_error_description) == ("bad", "very bad")
    assert dead.application_properties["DeadLetterReason"] == "bad"
    assert [m.sequence_number for m in broker.active_messages(Q)] == deferred


async def test_deferred_messages_by_sequence_number(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Deferred messages come back by sequence number and are never auto-completed."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=3)
    got: list[str] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.text() != "s0-2":
            await context.defer(message)
            return
        with pytest.raises(MessageNotFoundError):
            await context.receive_deferred_messages([message.sequence_number + 100])
        back = await context.receive_deferred_messages([1, 2])
        got.extend(m.text() for m in back)
        await context.complete(back[0])  # back[1] is left: auto_complete must not touch it

    options = SessionManagerOptions(session_idle_timeout=5)
    async with running(broker, handle, options) as manager:
        await trio.sleep(10)
        stats = manager.stats()
    assert got == ["s0-0", "s0-1"]
    assert stats.messages_completed == 2  # s0-2 (auto) and s0-0 (explicit)
    [left] = broker.active_messages(Q)
    assert left.text() == "s0-1"
    assert left.delivery_count == 1  # its lock ended with the session, unsettled


async def test_messages_of_another_session_are_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Settling a message through another session's context is a ValueError."""
    broker = make_broker()
    await fill(broker, sessions=2, per_session=1)
    contexts: dict[str, SessionContext] = {}
    messages: dict[str, ReceivedMessage] = {}
    both = trio.Event()
    failures: list[BaseException] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        contexts[context.session_id] = context
        messages[context.session_id] = message
        if len(contexts) == 2:
            both.set()
        await both.wait()
        if context.session_id == "s0":
            try:
                await context.complete(messages["s1"])
            except ValueError as exc:
                failures.append(exc)

    async with running(broker, handle) as manager:
        await trio.sleep(1)
        assert manager.stats().messages_completed == 2
    assert len(failures) == 1


async def test_settlement_after_transient_failure_can_be_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A settlement that failed transiently is not marked settled: it can be tried again."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    broker.fail_next("complete", ServiceBusConnectionError)
    outcomes: list[str] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        try:
            await context.complete(message)
        except ServiceBusConnectionError:
            outcomes.append("failed")
            await context.complete(message)
            outcomes.append("retried")

    async with running(broker, handle) as manager:
        await trio.sleep(1)
        assert manager.stats().messages_completed == 1
    assert outcomes == ["failed", "retried"]
    assert broker.active_message_count(Q) == 0


async def test_failed_auto_complete_is_reported(autojump_clock: trio.testing.MockClock) -> None:
    """An auto-complete that fails is reported with source COMPLETE; the message comes back."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    broker.fail_next("complete", ServiceBusConnectionError)
    deliveries: list[int] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        deliveries.append(message.delivery_count)

    errors = Errors()
    options = SessionManagerOptions(session_idle_timeout=1)
    async with running(broker, handle, options, errors) as manager:
        await trio.sleep(10)
        assert manager.stats().messages_completed == 1
    assert errors.kinds() == [(ServiceBusConnectionError, ErrorSource.COMPLETE)]
    assert deliveries == [0, 1]


async def test_failed_auto_complete_keeps_the_session_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After a failed auto-complete the session is given back, so its next messages are
    not handled before the unsettled one comes back."""
    broker = make_broker()
    await broker.send(Q, [Message(b"1", session_id="a"), Message(b"2", session_id="a")])
    broker.fail_next("complete", ServiceBusConnectionError)
    handled: list[tuple[bytes, int]] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        handled.append((message.body, message.delivery_count))

    options = SessionManagerOptions(session_idle_timeout=1)
    async with running(broker, handle, options, Errors()) as manager:
        await trio.sleep(10)
        assert manager.stats().messages_completed == 2
    assert handled == [(b"1", 0), (b"1", 1), (b"2", 0)]


async def test_transient_receive_errors_are_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A transient receive error is reported with source RECEIVE and the receive retried."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    broker.fail_next("receive", ServiceBusConnectionError)
    errors = Errors()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        pass

    async with running(broker, handle, errors=errors) as manager:
        await trio.sleep(5)
        assert manager.stats().messages_completed == 1
    assert errors.kinds() == [(ServiceBusConnectionError, ErrorSource.RECEIVE)]


async def test_transient_accept_errors_back_off(autojump_clock: trio.testing.MockClock) -> None:
    """Transient accept errors are reported and retried after growing, jittered delays."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    for _ in range(3):
        broker.fail_next("accept_session", ServiceBusConnectionError)
    times: list[float] = []
    handled = trio.Event()

    async def on_error(context: ErrorContext) -> None:
        times.append(trio.current_time())

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        times.append(trio.current_time())
        handled.set()

    retry = RetryPolicy(initial_delay=1, multiplier=3, jitter=0)
    options = SessionManagerOptions(max_concurrent_sessions=1, retry=retry)
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: manager.subscribe(handle, process_error=on_error))
            await handled.wait()
            manager.stop()
    assert times == [pytest.approx(t) for t in (0, 1, 4, 13)]  # delays 1, 3, 9
    assert manager.stats().errors == 3


async def test_no_session_within_accept_timeout_is_not_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Accepts that find nothing are retried silently; a later message is processed."""
    broker = make_broker()
    seen: list[bytes] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        seen.append(message.body)

    errors = Errors()
    options = SessionManagerOptions(accept_timeout=5)
    async with running(broker, handle, options, errors) as manager:
        await trio.sleep(60)
        await broker.send(Q, Message(b"late", session_id="a"))
        await trio.sleep(1)
        stats = manager.stats()
    assert seen == [b"late"]
    assert errors.seen == []
    assert stats.errors == 0


async def test_stop_lets_in_flight_handlers_finish(autojump_clock: trio.testing.MockClock) -> None:
    """stop() waits for running handlers within shutdown_timeout; their settlements work."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    started = trio.Event()
    finished: list[float] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        started.set()
        await trio.sleep(5)
        await context.set_state(b"done")
        finished.append(trio.current_time())

    options = SessionManagerOptions(shutdown_timeout=30)
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.subscribe, handle)
            await started.wait()
            manager.stop()
        returned = trio.current_time()
    assert finished == [pytest.approx(5)]
    assert returned == pytest.approx(5)
    assert manager.stats().messages_completed == 1
    assert broker.session_state(Q, "a") == b"done"
    assert broker.active_message_count(Q) == 0


async def test_stop_cancels_handlers_after_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Handlers still running when shutdown_timeout ends are cancelled; nothing is lost."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    started = trio.Event()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        started.set()
        await trio.sleep(100)

    options = SessionManagerOptions(shutdown_timeout=10)
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.subscribe, handle)
            await started.wait()
            manager.stop()
        assert trio.current_time() == pytest.approx(10)
    [back] = broker.active_messages(Q)
    assert back.delivery_count == 1
    assert broker.locked_sessions(Q) == []


async def test_stop_abandons_prefetched_messages(autojump_clock: trio.testing.MockClock) -> None:
    """Buffered messages never handed to a handler are abandoned on stop."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=4)
    started = trio.Event()
    seen: list[str] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        seen.append(message.text())
        started.set()
        await trio.sleep(1)

    options = SessionManagerOptions(prefetch_count=3)
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.subscribe, handle)
            await started.wait()
            manager.stop()
    stats = manager.stats()
    assert seen == ["s0-0"]
    assert stats.messages_completed == 1
    assert stats.messages_abandoned == 3
    assert [(m.text(), m.delivery_count) for m in broker.active_messages(Q)] == [
        ("s0-1", 1),
        ("s0-2", 1),
        ("s0-3", 1),
    ]


async def test_stop_is_final(autojump_clock: trio.testing.MockClock) -> None:
    """After stop(), subscribe returns at once without accepting anything."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        raise AssertionError("not reached")

    async with open_session_manager(broker, queue_name=Q) as manager:
        manager.stop()
        manager.stop()
        await manager.subscribe(handle)
        await manager.subscribe_sessions(lambda_session)
        assert manager.stats().sessions_accepted == 0
    assert broker.active_message_count(Q) == 1


async def lambda_session(session: SessionContext) -> None:
    raise AssertionError("not reached")


async def test_only_one_subscribe_at_a_time(autojump_clock: trio.testing.MockClock) -> None:
    """A second subscribe while one runs raises RuntimeError."""
    broker = make_broker()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        pass

    async with running(broker, handle) as manager:
        with pytest.raises(RuntimeError, match="running"):
            await manager.subscribe(handle)
        with pytest.raises(RuntimeError, match="running"):
            await manager.subscribe_sessions(lambda_session)


async def test_leaving_the_block_stops_and_waits_for_subscribe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Leaving async with stops the manager and waits for a subscribe running elsewhere."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    started = trio.Event()
    finished = trio.Event()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        started.set()
        await trio.sleep(3)
        finished.set()

    async with trio.open_nursery() as nursery:
        # The manager closes before the nursery on purpose: leaving its block must wait.
        async with open_session_manager(broker, queue_name=Q) as manager:
            nursery.start_soon(manager.subscribe, handle)  # noqa: ASYNC111
            await started.wait()
        assert finished.is_set()
        assert trio.current_time() == pytest.approx(3)
    assert broker.active_message_count(Q) == 0


@pytest.mark.parametrize(
    "bad",
    [
        "not a function",
        lambda message, context: None,
        print,
    ],
)
async def test_handler_must_be_async(bad: object, autojump_clock: trio.testing.MockClock) -> None:
    """A handler that is not an async function is a TypeError before any session is accepted."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    async with open_session_manager(broker, queue_name=Q) as manager:
        with pytest.raises(TypeError, match="process_message must be an async function"):
            await manager.subscribe(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="process_session must be an async function"):
            await manager.subscribe_sessions(bad)  # type: ignore[arg-type]

        async def ok(message: ReceivedMessage, context: SessionContext) -> None:
            pass

        with pytest.raises(TypeError, match="process_error must be an async function"):
            await manager.subscribe(ok, process_error=bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="session_closing must be an async function"):
            await manager.subscribe(ok, session_closing=bad)  # type: ignore[arg-type]
        assert manager.stats().sessions_accepted == 0
    assert broker.locked_sessions(Q) == []
    assert broker.active_message_count(Q) == 1


async def test_async_callable_objects_and_partials_are_accepted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Objects with an async __call__ and functools.partial of async functions are handlers."""
    import functools

    broker = make_broker()
    await fill(broker, sessions=2, per_session=1)
    seen: list[str] = []

    class Handler:
        async def __call__(self, message: ReceivedMessage, context: SessionContext) -> None:
            seen.append(message.text())

    async def tagged(tag: str, message: ReceivedMessage, context: SessionContext) -> None:
        seen.append(tag + message.text())

    async with running(broker, Handler()) as manager:
        await trio.sleep(1)
        assert manager.stats().messages_completed == 2
    await fill(broker, sessions=1, per_session=1)
    async with running(broker, functools.partial(tagged, "p:")) as manager:
        await trio.sleep(1)
    assert sorted(seen) == ["p:s0-0", "s0-0", "s1-0"]


async def test_unknown_entity_is_fatal_and_raised_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """subscribe on an unknown entity raises EntityNotFoundError itself, not a group."""
    broker = MemoryBroker()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        pass

    errors = Errors()
    with pytest.raises(EntityNotFoundError, match="nowhere"):
        async with open_session_manager(broker, queue_name="nowhere") as manager:
            await manager.subscribe(handle, process_error=errors)
    assert errors.seen == []  # fatal errors are raised, not reported


async def test_entity_without_sessions_is_fatal(autojump_clock: trio.testing.MockClock) -> None:
    """subscribe on an entity that does not require sessions raises SessionsNotEnabledError."""
    broker = MemoryBroker()
    broker.create_queue("plain", requires_session=False)

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        pass

    with pytest.raises(SessionsNotEnabledError, match="plain"):
        async with open_session_manager(broker, queue_name="plain") as manager:
            await manager.subscribe(handle)


async def test_fatal_error_drains_running_sessions(autojump_clock: trio.testing.MockClock) -> None:
    """A fatal accept error stops the manager gracefully, then subscribe raises it."""
    broker = make_broker()
    await fill(broker, sessions=2, per_session=1)
    started = trio.Event()
    finished: list[str] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        started.set()
        await trio.sleep(2)
        finished.append(message.text())

    async with open_session_manager(
        broker, queue_name=Q, options=SessionManagerOptions(max_concurrent_sessions=1)
    ) as manager:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                with pytest.raises(EntityNotFoundError):
                    await manager.subscribe(handle)

            nursery.start_soon(run)
            await started.wait()
            broker.fail_next("accept_session", EntityNotFoundError("gone"))
    assert finished == ["s0-0"]
    assert manager.stats().sessions_accepted == 1
    assert broker.active_message_count(Q) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"queue_name": Q, "topic_name": "t", "subscription_name": "s"},
        {"topic_name": "t"},
        {"subscription_name": "s"},
        {"queue_name": Q, "topic_name": "t"},
    ],
)
async def test_exactly_one_entity(kwargs: dict[str, Any]) -> None:
    """open_session_manager needs a queue, or a topic with a subscription, not both."""
    with pytest.raises(ValueError, match="exactly one of queue_name"):
        async with open_session_manager(MemoryBroker(), **kwargs):
            raise AssertionError("not reached")


async def test_bad_manager_arguments() -> None:
    """Wrong types for the entity, receive mode, options or backend are TypeErrors."""
    broker = MemoryBroker()
    cases: list[tuple[dict[str, object], str]] = [
        ({"queue_name": 5}, "queue_name"),
        ({"queue_name": Q, "receive_mode": "peeklock"}, "receive_mode"),
        ({"queue_name": Q, "options": {"max_concurrent_sessions": 2}}, "options"),
    ]
    for kwargs, field in cases:
        with pytest.raises(TypeError, match=field):
            async with open_session_manager(broker, **kwargs):  # type: ignore[arg-type]
                raise AssertionError("not reached")
    with pytest.raises(TypeError, match="backend"):
        async with open_session_manager(object(), queue_name=Q):  # type: ignore[arg-type]
            raise AssertionError("not reached")


async def test_receive_and_delete(autojump_clock: trio.testing.MockClock) -> None:
    """In RECEIVE_AND_DELETE mode messages are gone on receipt and cannot be settled."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=2)
    refused: list[BaseException] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        assert message.lock_token is None
        try:
            await context.complete(message)
        except MessageAlreadySettledError as exc:
            refused.append(exc)
        raise RuntimeError("not redelivered anyway")

    async with running(broker, handle, receive_mode=ReceiveMode.RECEIVE_AND_DELETE) as manager:
        await trio.sleep(1)
        stats = manager.stats()
    assert len(refused) == 2
    assert stats.messages_received == 2
    assert stats.messages_abandoned == stats.messages_completed == 0
    assert broker.active_message_count(Q) == 0


async def test_receive_and_delete_refuses_prefetch() -> None:
    """prefetch_count > 0 with RECEIVE_AND_DELETE is refused: a stop would lose the buffer."""
    with pytest.raises(ValueError, match="prefetch_count"):
        async with open_session_manager(
            MemoryBroker(),
            queue_name=Q,
            receive_mode=ReceiveMode.RECEIVE_AND_DELETE,
            options=SessionManagerOptions(prefetch_count=1),
        ):
            raise AssertionError("not reached")


async def test_release_hands_back_the_session(autojump_clock: trio.testing.MockClock) -> None:
    """release() stops delivery to user code, abandons the buffer and closes the session."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=4)
    seen: list[tuple[str, int]] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        seen.append((message.text(), message.delivery_count))
        if len(seen) == 1:
            context.release()
            context.release()

    options = SessionManagerOptions(prefetch_count=2)
    async with running(broker, handle, options) as manager:
        await trio.sleep(1)
        stats = manager.stats()
    assert seen[:2] == [("s0-0", 0), ("s0-1", 1)]  # released, then accepted again
    assert [text for text, _ in seen] == ["s0-0", "s0-1", "s0-2", "s0-3"]
    assert stats.sessions_accepted == 2
    assert stats.messages_abandoned == 2


async def test_session_ids_limit_the_sessions_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With session_ids only those sessions are accepted, even empty ones."""
    broker = make_broker()
    await fill(broker, sessions=4, per_session=2)
    seen: set[str] = set()
    initialized: list[str] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        seen.add(context.session_id)

    async def init(context: SessionContext) -> None:
        initialized.append(context.session_id)

    options = SessionManagerOptions(session_ids=("s1", "s3", "empty"), session_idle_timeout=5)
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: manager.subscribe(handle, session_initializing=init))
            await trio.sleep(1)
            assert sorted(broker.locked_sessions(Q)) == ["empty", "s1", "s3"]
            await trio.sleep(10)
            manager.stop()
    assert seen == {"s1", "s3"}
    assert broker.active_message_count(Q) == 4
    assert initialized.count("empty") >= 2  # idle, released, accepted again by id


async def test_session_ids_held_elsewhere_are_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A listed session held by another receiver is reported and tried again later."""
    from trio_sessions._messages import EntityPath

    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    other = await broker.accept_session(EntityPath(queue_name=Q), "a")
    seen: list[bytes] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        seen.append(message.body)

    errors = Errors()
    options = SessionManagerOptions(session_ids=["a"])
    async with running(broker, handle, options, errors) as manager:
        await trio.sleep(2)
        assert seen == []
        await other.aclose()
        await trio.sleep(60)
        assert seen == [b"1"]
        assert manager.stats().errors >= 1
    assert {k for k in errors.kinds()} == {(SessionCannotBeLockedError, ErrorSource.ACCEPT_SESSION)}


async def test_state_by_session_id(autojump_clock: trio.testing.MockClock) -> None:
    """get_state/set_state work before, during (through the actor) and after subscribe."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    inside = trio.Event()
    leave = trio.Event()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        inside.set()
        await leave.wait()
        assert await context.get_state() == b"during"

    async with open_session_manager(broker, queue_name=Q) as manager:
        assert await manager.get_state("a") is None
        await manager.set_state("a", "before")
        assert broker.session_state(Q, "a") == b"before"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.subscribe, handle)
            await inside.wait()
            assert broker.locked_sessions(Q) == ["a"]
            assert await manager.get_state("a") == b"before"  # routed to the actor
            await manager.set_state("a", b"during")
            leave.set()
            await trio.sleep(1)
            manager.stop()
        await manager.set_state("a", None)
        assert await manager.get_state("a") is None
        with pytest.raises(TypeError, match="session state"):
            await manager.set_state("a", 5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="session_id"):
            await manager.get_state("")
    with pytest.raises(RuntimeError, match="closed"):
        await manager.get_state("a")


async def test_state_of_a_session_held_elsewhere(autojump_clock: trio.testing.MockClock) -> None:
    """get_state of a session another receiver holds raises SessionCannotBeLockedError."""
    from trio_sessions._messages import EntityPath

    broker = make_broker()
    link = await broker.accept_session(EntityPath(queue_name=Q), "busy")
    async with open_session_manager(broker, queue_name=Q) as manager:
        with pytest.raises(SessionCannotBeLockedError):
            await manager.get_state("busy")
    await link.aclose()


async def test_session_state_through_the_context(autojump_clock: trio.testing.MockClock) -> None:
    """The context reads and writes state; bad state types are TypeErrors."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=3)
    states: list[bytes | None] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        states.append(await context.get_state())
        await context.set_state((states[-1] or b"") + message.body[-1:])
        with pytest.raises(TypeError, match="bytes, str or None"):
            await context.set_state(1.5)  # type: ignore[arg-type]

    async with running(broker, handle):
        await trio.sleep(1)
    assert states == [None, b"0", b"01"]
    assert broker.session_state(Q, "s0") == b"012"


async def test_initializing_and_closing_callbacks(autojump_clock: trio.testing.MockClock) -> None:
    """session_initializing runs before the first message, session_closing before release."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=2)
    events: list[str] = []

    async def init(context: SessionContext) -> None:
        events.append(f"init {context.session_id}")

    async def close(context: SessionContext) -> None:
        events.append(f"close {context.session_id}")
        await context.set_state(b"closed cleanly")

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        events.append(message.text())

    options = SessionManagerOptions(session_idle_timeout=5)
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: manager.subscribe(handle, session_initializing=init, session_closing=close)
            )
            await trio.sleep(10)
            manager.stop()
    assert events == ["init s0", "s0-0", "s0-1", "close s0"]
    assert broker.session_state(Q, "s0") == b"closed cleanly"


async def test_failing_initializer_releases_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An initializer error is reported and the session released unprocessed."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    calls = 0

    async def init(context: SessionContext) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("no database")

    async def close(context: SessionContext) -> None:
        raise LookupError("closing failed")

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        pass

    errors = Errors()
    async with open_session_manager(broker, queue_name=Q) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: manager.subscribe(
                    handle, process_error=errors, session_initializing=init, session_closing=close
                )
            )
            await trio.sleep(1)
            manager.stop()
    assert errors.kinds() == [
        (OSError, ErrorSource.ACCEPT_SESSION),
        (LookupError, ErrorSource.CLOSE_SESSION),
        (LookupError, ErrorSource.CLOSE_SESSION),
    ]
    assert manager.stats().messages_completed == 1
    assert manager.stats().messages_received == 1  # the first session received nothing


async def test_process_error_failures_are_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in process_error is logged and never stops the manager."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=2)

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.delivery_count == 0:
            raise ValueError("handler failed")

    async def on_error(context: ErrorContext) -> None:
        raise RuntimeError("error handler failed")

    with caplog.at_level(logging.ERROR, logger="trio_sessions"):
        async with open_session_manager(broker, queue_name=Q) as manager:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: manager.subscribe(handle, process_error=on_error))
                await trio.sleep(1)
                manager.stop()
    assert manager.stats().messages_completed == 2
    assert manager.stats().handler_errors == 2
    assert "process_error raised" in caplog.text


async def test_errors_without_process_error_are_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Without process_error, reported errors go to the trio_sessions logger."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.delivery_count == 0:
            raise ValueError("handler failed")

    with caplog.at_level(logging.WARNING, logger="trio_sessions"):
        async with running(broker, handle):
            await trio.sleep(1)
    assert "process_message error in session a" in caplog.text


async def test_user_exceptions_leave_the_block_as_themselves() -> None:
    """An exception raised in the async with body is not wrapped in an ExceptionGroup."""
    with pytest.raises(KeyError):
        async with open_session_manager(MemoryBroker(), queue_name=Q):
            raise KeyError("mine")


async def test_cancelling_subscribe_closes_every_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelling subscribe cancels handlers at once; messages are delivered again later."""
    broker = make_broker()
    await fill(broker, sessions=3, per_session=1)

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        await trio.sleep(100)

    async with open_session_manager(broker, queue_name=Q) as manager:
        with trio.move_on_after(5):
            await manager.subscribe(handle)
        assert trio.current_time() == pytest.approx(5)
    assert broker.locked_sessions(Q) == []
    assert [m.delivery_count for m in broker.active_messages(Q)] == [1, 1, 1]


async def test_topic_subscription(autojump_clock: trio.testing.MockClock) -> None:
    """A manager reads a topic's subscription; errors name "<topic>/subscriptions/<sub>"."""
    broker = MemoryBroker()
    broker.create_topic("t")
    broker.create_subscription("t", "one")
    broker.create_subscription("t", "two")
    await broker.send("t", Message(b"x", session_id="a"))
    errors = Errors()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        assert context.entity_path == "t/subscriptions/one"
        raise ValueError("once")

    async with open_session_manager(broker, topic_name="t", subscription_name="one") as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: manager.subscribe(handle, process_error=errors))
            await trio.sleep(0.1)
            manager.stop()
    assert errors.seen[0].entity_path == "t/subscriptions/one"
    assert manager.entity_path == "t/subscriptions/one"
    assert broker.active_message_count("t/subscriptions/two") == 1


async def test_renew_lock_from_the_context(autojump_clock: trio.testing.MockClock) -> None:
    """context.renew_lock() renews now and moves context.locked_until forward."""
    broker = make_broker(lock_duration=60)
    await broker.send(Q, Message(b"1", session_id="a"))
    seen: list[object] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        first = context.locked_until
        assert first == message.locked_until
        await trio.sleep(7)
        renewed = await context.renew_lock()
        assert renewed == context.locked_until
        seen.append((renewed - first).total_seconds())

    async with running(broker, handle) as manager:
        await trio.sleep(10)
        assert manager.stats().lock_renewals == 1
    assert seen == [pytest.approx(7)]


async def test_context_after_the_session_closed(autojump_clock: trio.testing.MockClock) -> None:
    """A context kept after its session closed raises ClosedResourceError."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    kept: list[SessionContext] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        kept.append(context)

    options = SessionManagerOptions(session_idle_timeout=1)
    async with running(broker, handle, options):
        await trio.sleep(5)
    with pytest.raises(trio.ClosedResourceError):
        await kept[0].get_state()
    assert "a" in repr(kept[0])


async def test_callback_context_is_not_iterable(autojump_clock: trio.testing.MockClock) -> None:
    """Iterating the context is for subscribe_sessions only."""
    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))
    errors = Errors()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        async for _ in context:
            pass

    async with running(broker, handle, errors=errors):
        await trio.sleep(0.1)
    assert errors.kinds()[0] == (RuntimeError, ErrorSource.PROCESS_MESSAGE)


# -- the actor form -------------------------------------------------------------------------


async def test_actor_form_iterates_a_session(autojump_clock: trio.testing.MockClock) -> None:
    """process_session sees its session's messages in order; each is completed on next()."""
    broker = make_broker()
    await fill(broker, sessions=3, per_session=3)
    seen: dict[str, list[str]] = {}
    ended: list[float] = []

    async def process_session(session: SessionContext) -> None:
        async for message in session:
            seen.setdefault(session.session_id, []).append(message.text())
        ended.append(trio.current_time())

    options = SessionManagerOptions(session_idle_timeout=10)
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.subscribe_sessions, process_session)
            await trio.sleep(20)
            manager.stop()
    assert seen == {f"s{s}": [f"s{s}-{i}" for i in range(3)] for s in range(3)}
    assert ended == [pytest.approx(10)] * 3  # iteration ends when the session goes idle
    assert manager.stats().messages_completed == 9
    assert broker.active_message_count(Q) == 0


async def test_actor_form_return_completes_and_raise_abandons(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Returning completes the last message; raising abandons it and reports the error."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=3)
    seen: list[tuple[str, int]] = []

    async def process_session(session: SessionContext) -> None:
        async for message in session:
            seen.append((message.text(), message.delivery_count))
            if message.text() == "s0-0":
                return  # completes s0-0, releases the session
            if message.text() == "s0-1" and message.delivery_count == 0:
                raise ValueError("abandon s0-1")

    errors = Errors()
    async with open_session_manager(broker, queue_name=Q) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: manager.subscribe_sessions(process_session, process_error=errors)
            )
            await trio.sleep(1)
            manager.stop()
    assert seen == [("s0-0", 0), ("s0-1", 0), ("s0-1", 1), ("s0-2", 0)]
    assert errors.kinds() == [(ValueError, ErrorSource.PROCESS_MESSAGE)]
    assert manager.stats().handler_errors == 1
    assert manager.stats().messages_completed == 3


async def test_actor_form_stop_ends_iteration(autojump_clock: trio.testing.MockClock) -> None:
    """stop() ends the iteration; buffered messages are abandoned, the current one completed."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=5)
    seen: list[str] = []
    got_one = trio.Event()

    async def process_session(session: SessionContext) -> None:
        async for message in session:
            seen.append(message.text())
            got_one.set()
            await trio.sleep(1)

    options = SessionManagerOptions(prefetch_count=2)
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.subscribe_sessions, process_session)
            await got_one.wait()
            manager.stop()
    assert seen == ["s0-0"]
    stats = manager.stats()
    assert (stats.messages_completed, stats.messages_abandoned) == (1, 2)
    assert broker.active_message_count(Q) == 4


async def test_actor_form_settles_explicitly(autojump_clock: trio.testing.MockClock) -> None:
    """A message settled in the loop body is not auto-completed again."""
    broker = make_broker()
    await fill(broker, sessions=1, per_session=2)

    async def process_session(session: SessionContext) -> None:
        async for message in session:
            await session.dead_letter(message, reason="no")

    async with open_session_manager(broker, queue_name=Q) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.subscribe_sessions, process_session)
            await trio.sleep(1)
            manager.stop()
    assert manager.stats().messages_dead_lettered == 2
    assert manager.stats().messages_completed == 0
    assert [m.dead_letter_reason for m in broker.dead_letter_messages(Q)] == ["no", "no"]


async def test_stats_snapshot_is_frozen(autojump_clock: trio.testing.MockClock) -> None:
    """stats() returns a frozen snapshot that does not change afterwards."""
    import attrs

    broker = make_broker()
    await broker.send(Q, Message(b"1", session_id="a"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        pass

    async with running(broker, handle) as manager:
        before = manager.stats()
        await trio.sleep(1)
        after = manager.stats()
    assert before.messages_completed == 0
    assert after.messages_completed == 1
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        after.errors = 5  # type: ignore[misc]
    assert math.isfinite(after.active_sessions)


async def test_lock_timers_do_not_keep_ended_actors_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A timer whose actor is gone neither keeps it in memory nor calls it."""
    import gc
    import weakref

    from trio_sessions._renewal import LockTimers

    calls: list[str] = []

    class Target:
        def __init__(self, name: str) -> None:
            self.name = name

        def lock_timer_due(self) -> None:
            calls.append(self.name)

    timers = LockTimers()
    kept, gone = Target("kept"), Target("gone")
    timers.schedule(kept, 10)
    timers.schedule(gone, 10)
    watch = weakref.ref(gone)
    del gone
    gc.collect()
    assert watch() is None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        await trio.sleep(11)
        timers.finish()
    assert calls == ["kept"]
