"""The session actor's own structure (issue #8), in virtual time on the MemoryBroker.

The actor has no nursery of its own: its service task runs in the manager's supervisor
nursery. These tests check what that nursery used to guarantee: the service task never
outlives its actor, and the link is closed only once the service task has stopped.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import trio
import trio.testing

from trio_sessions import (
    ErrorContext,
    ErrorSource,
    MemoryBroker,
    Message,
    ReceivedMessage,
    ServiceBusConnectionError,
    SessionContext,
    SessionLockLostError,
    SessionManagerOptions,
    open_session_manager,
)
from trio_sessions.backends._abc import SessionLink

Q = "q"


class Boom(BaseException):
    """Not an Exception: handlers' errors of this kind end the actor, as a bug would."""


class _WatchedLink:
    """A MemoryBroker link whose ``get_state`` blocks until cancelled, and which records
    whether that call was still running when the link was closed."""

    def __init__(self, inner: SessionLink, watch: Watch) -> None:
        self._inner = inner
        self._watch = watch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def get_state(self) -> bytes | None:
        self._watch.in_get_state = True
        self._watch.get_state_started.set()
        try:
            await trio.sleep_forever()
        finally:
            self._watch.in_get_state = False

    async def aclose(self) -> None:
        self._watch.closed_during_get_state.append(self._watch.in_get_state)
        await self._inner.aclose()


class Watch:
    def __init__(self) -> None:
        self.in_get_state = False
        self.get_state_started = trio.Event()
        self.closed_during_get_state: list[bool] = []


class WatchedBroker:
    """A MemoryBroker whose links are `_WatchedLink` s."""

    def __init__(self, watch: Watch) -> None:
        self.broker = MemoryBroker()
        self.watch = watch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.broker, name)

    async def accept_session(self, *args: Any, **kwargs: Any) -> SessionLink:
        link = await self.broker.accept_session(*args, **kwargs)
        return _WatchedLink(link, self.watch)


def _task_names() -> set[str]:
    names: set[str] = set()
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        assert task is not None
        names.add(task.name)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


async def test_an_actor_ending_by_an_error_stops_its_service_task_before_closing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watch = Watch()
    broker = WatchedBroker(watch)
    broker.create_queue(Q)
    await broker.send(Q, [Message(b"1", session_id="a"), Message(b"2", session_id="a")])

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.body == b"1":
            await context.get_state()  # blocks in the service task
        else:
            await watch.get_state_started.wait()
            raise Boom

    options = SessionManagerOptions(max_concurrent_calls_per_session=2)
    with pytest.RaisesGroup(Boom, flatten_subgroups=True):
        async with open_session_manager(broker, queue_name=Q, options=options) as manager:
            await manager.subscribe(handle)
    # Closed (perhaps again, by an actor for its redelivery before the error stopped the
    # manager), never while the service task was in get_state.
    assert watch.closed_during_get_state
    assert not any(watch.closed_during_get_state)
    assert "session a service" not in _task_names()


async def test_cancelling_subscribe_stops_the_service_task_before_closing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watch = Watch()
    broker = WatchedBroker(watch)
    broker.create_queue(Q)
    await broker.send(Q, Message(b"1", session_id="a"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        await context.get_state()

    async with open_session_manager(broker, queue_name=Q) as manager:
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(manager.subscribe, handle)
                await watch.get_state_started.wait()
                assert "session a service" in _task_names()
                nursery.cancel_scope.cancel()
    assert watch.closed_during_get_state == [False]
    assert broker.locked_sessions(Q) == []
    assert broker.active_message_count(Q) == 1  # not completed: delivered again later


# -- one scope for the lock and the shutdown grace ------------------------------------------
#
# The work runs in one cancel scope whose deadline is the earlier of the lock's and the
# grace's (and, in the inline loop, the idle clock's); which one fired is worked out after.


class _Errors:
    def __init__(self) -> None:
        self.seen: list[ErrorContext] = []

    async def __call__(self, context: ErrorContext) -> None:
        self.seen.append(context)


async def _stop_during_a_long_handler(
    *, lock_duration: float, shutdown_timeout: float
) -> tuple[float, list[ErrorContext], MemoryBroker]:
    """A handler that never returns; stop() at t=1. Returns when it was cancelled."""
    broker = MemoryBroker()
    broker.create_queue(Q, lock_duration=lock_duration)
    await broker.send(Q, Message(b"1", session_id="a"))
    cancelled_at: list[float] = []
    started = trio.Event()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled_at.append(trio.current_time())

    errors = _Errors()
    options = SessionManagerOptions(
        max_auto_lock_renewal_duration=0, shutdown_timeout=shutdown_timeout
    )
    start = trio.current_time()
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(manager.subscribe, handle, process_error=errors))
            await started.wait()
            await trio.sleep(1)
            manager.stop()
    return cancelled_at[0] - start, errors.seen, broker


async def test_a_lock_expiring_before_the_grace_ends_is_a_lock_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Lock 60 s: handlers are cancelled half the 10 s renewal margin before it expires.
    when, errors, broker = await _stop_during_a_long_handler(lock_duration=60, shutdown_timeout=100)
    assert when == pytest.approx(55)
    assert [(type(e.error), e.source) for e in errors] == [
        (SessionLockLostError, ErrorSource.RENEW_LOCK)
    ]
    assert broker.active_message_count(Q) == 1  # not settled: delivered again


async def test_the_grace_ending_before_the_lock_cancels_handlers_without_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    when, errors, broker = await _stop_during_a_long_handler(lock_duration=60, shutdown_timeout=5)
    assert when == pytest.approx(6)
    assert errors == []
    assert broker.active_message_count(Q) == 1  # abandoned by auto-complete


async def test_a_renewal_during_an_idle_wait_keeps_the_idle_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The idle deadline (12 s) lies beyond the first lock deadline (7.5 s): renewing the
    lock at 5 s must neither end the wait as a lock loss nor push the idle deadline out."""
    broker = MemoryBroker()
    broker.create_queue(Q, lock_duration=10)
    await broker.send(Q, Message(b"1", session_id="a"))
    errors = _Errors()
    closed_at: list[float] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        pass

    async def closing(context: SessionContext) -> None:
        closed_at.append(trio.current_time())

    options = SessionManagerOptions(session_idle_timeout=12)
    start = trio.current_time()
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    manager.subscribe, handle, process_error=errors, session_closing=closing
                )
            )
            await trio.sleep(20)
            stats = manager.stats()
            manager.stop()
    assert errors.seen == []
    assert stats.lock_renewals == 2  # at 5 s and 10 s
    assert stats.sessions_closed == 1
    assert closed_at[0] - start == pytest.approx(12)


async def test_a_lock_lapsing_during_an_idle_wait_is_a_lock_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Renewal keeps failing: the lock deadline, earlier than the idle one, ends the wait."""
    broker = MemoryBroker()
    broker.create_queue(Q, lock_duration=10)
    await broker.send(Q, Message(b"1", session_id="a"))
    errors = _Errors()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        for _ in range(20):
            broker.fail_next("renew_lock", ServiceBusConnectionError("down"))

    options = SessionManagerOptions(session_idle_timeout=100)
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(manager.subscribe, handle, process_error=errors))
            await trio.sleep(9)
            stats = manager.stats()
            manager.stop()
    kinds = [(type(e.error), e.source) for e in errors.seen]
    assert (SessionLockLostError, ErrorSource.RENEW_LOCK) in kinds
    assert kinds.count((SessionLockLostError, ErrorSource.RENEW_LOCK)) == 1
    assert stats.sessions_closed == 1
    assert stats.lock_renewals == 0


async def test_lock_timers_fire_in_order_of_their_times(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from trio_sessions._renewal import LockTimers

    fired: list[tuple[str, float]] = []

    class Target:
        def __init__(self, name: str) -> None:
            self.name = name

        def lock_timer_due(self) -> None:
            fired.append((self.name, trio.current_time()))

    timers = LockTimers()
    targets = [Target(name) for name in "abcd"]
    start = trio.current_time()
    for target, when in zip(targets, (30, 10, 20, 10), strict=True):
        timers.schedule(target, start + when)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        await trio.sleep(5)
        targets.append(Target("e"))  # held: timers hold their targets weakly
        timers.schedule(targets[-1], start + 15)  # earlier than the one waited for
        await trio.sleep(30)
        timers.finish()
    assert sorted(fired[:2]) == [("b", start + 10), ("d", start + 10)]
    assert fired[2:] == [("e", start + 15), ("c", start + 20), ("a", start + 30)]


async def test_locked_until_read_after_the_session_closed_is_its_own_lock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The actor reads locked_until from its link lazily; a context kept past the close
    still tells its own lock's expiry, not that of the session's next holder."""
    broker = MemoryBroker()
    broker.create_queue(Q, lock_duration=60)
    await broker.send(Q, Message(b"1", session_id="a"))
    kept: list[SessionContext] = []
    delivered: list[ReceivedMessage] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        kept.append(context)
        delivered.append(message)

    options = SessionManagerOptions(session_idle_timeout=1, max_auto_lock_renewal_duration=0)
    for _ in range(2):
        async with open_session_manager(broker, queue_name=Q, options=options) as manager:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(manager.subscribe, handle)
                await trio.sleep(5)
                assert manager.stats().sessions_closed == 1
                manager.stop()
        await broker.send(Q, Message(b"2", session_id="a"))
    first, second = kept
    assert first.locked_until == delivered[0].locked_until
    assert second.locked_until == delivered[1].locked_until
    assert first.locked_until < second.locked_until
