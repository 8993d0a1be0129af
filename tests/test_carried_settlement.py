"""Auto-settlements carried by the next receive (issue #8), in virtual time.

With one call per session, where the link has `settle_and_receive`, the actor settles the
message it has just handled in the same link call that receives the next: one checkpoint
per message on the MemoryBroker, one bridge crossing on the Azure backend.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
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
from trio_sessions._messages import Complete, Settlement
from trio_sessions.backends._abc import SessionLink
from trio_sessions.backends._memory import MemorySessionLink

Q = "q"


@pytest.fixture
def link_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the manager's calls of MemorySessionLink's receive and settle methods (not
    the link's calls of its own methods)."""
    calls: Counter[str] = Counter()
    depth = 0
    for name in ("receive", "settle", "settle_and_receive"):
        original = getattr(MemorySessionLink, name)

        async def wrapper(
            self: MemorySessionLink,
            *args: Any,
            __original: Callable[..., Any] = original,
            __name: str = name,
        ) -> Any:
            nonlocal depth
            if depth == 0:
                calls[__name] += 1
            depth += 1
            try:
                return await __original(self, *args)
            finally:
                depth -= 1

        monkeypatch.setattr(MemorySessionLink, name, wrapper)
    return calls


async def _run(
    broker: MemoryBroker,
    options: SessionManagerOptions,
    handled: list[str],
    errors: list[ErrorContext] | None = None,
) -> None:
    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        handled.append(message.text())

    async def on_error(context: ErrorContext) -> None:
        if errors is not None:
            errors.append(context)

    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        with trio.move_on_after(30):
            await manager.subscribe(handle, process_error=on_error)


async def test_each_completion_rides_on_the_next_receive(
    autojump_clock: trio.testing.MockClock, link_calls: Counter[str]
) -> None:
    """One link call per message: the first receive carries nothing, each later one the
    completion of the message before it, and the last is carried by the idle wait."""
    broker = MemoryBroker(record_completed=True)
    broker.create_queue(Q, requires_session=True)
    await broker.send(Q, [Message(f"m{i}", session_id="a") for i in range(5)])
    handled: list[str] = []
    await _run(broker, SessionManagerOptions(session_idle_timeout=1), handled)
    assert handled == [f"m{i}" for i in range(5)]
    assert broker.active_message_count(Q) == 0
    assert [m.text() for m in broker.completed_messages(Q)] == handled
    assert link_calls == Counter(settle_and_receive=6)


async def test_prefetched_messages_are_settled_before_the_next_runs(
    autojump_clock: trio.testing.MockClock, link_calls: Counter[str]
) -> None:
    """With a buffer, each message is settled before the next buffered one is handled
    (a failed settlement must stop the session's later messages); only the last of a
    batch rides on the receive that follows."""
    broker = MemoryBroker()
    broker.create_queue(Q, requires_session=True)
    await broker.send(Q, [Message(f"m{i}", session_id="a") for i in range(4)])
    handled: list[str] = []
    options = SessionManagerOptions(session_idle_timeout=1, prefetch_count=3)
    await _run(broker, options, handled)
    assert handled == [f"m{i}" for i in range(4)]
    assert broker.active_message_count(Q) == 0
    # One receive of all four (prefetch 3 + 1 call), three settles, the last carried by
    # the idle wait.
    assert link_calls == Counter(settle=3, settle_and_receive=2)


async def test_a_failed_carried_completion_keeps_the_order(
    autojump_clock: trio.testing.MockClock, link_calls: Counter[str]
) -> None:
    """A carried completion that fails is reported (source COMPLETE), the session given
    back, and the message handled again before the session's later messages."""
    broker = MemoryBroker()
    broker.create_queue(Q, requires_session=True)
    await broker.send(Q, [Message(f"m{i}", session_id="a") for i in range(3)])
    broker.fail_next("complete", ServiceBusConnectionError("flaky"))
    handled: list[str] = []
    errors: list[ErrorContext] = []
    await _run(broker, SessionManagerOptions(session_idle_timeout=1), handled, errors)
    assert handled == ["m0", "m0", "m1", "m2"]
    assert [(type(e.error), e.source) for e in errors] == [
        (ServiceBusConnectionError, ErrorSource.COMPLETE)
    ]
    assert broker.active_message_count(Q) == 0
    assert link_calls["settle_and_receive"] >= 3


async def test_cancelled_while_waiting_the_completion_stands(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelling the manager while the actor waits for more (the last completion carried
    by that wait) leaves the message completed: nothing is handled twice."""
    broker = MemoryBroker()
    broker.create_queue(Q, requires_session=True)
    await broker.send(Q, Message("only", session_id="a"))
    handled: list[str] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        handled.append(message.text())

    async with open_session_manager(broker, queue_name=Q) as manager:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(manager.subscribe, handle)
                await trio.testing.wait_all_tasks_blocked()
                assert handled == ["only"]
                assert manager.stats().messages_completed == 1  # counted before the wait
                scope.cancel()
    assert broker.active_message_count(Q) == 0
    assert broker.locked_sessions(Q) == []


async def test_lock_lost_found_by_a_carried_completion_is_reported_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lost lock found by the carried completion is reported once, source COMPLETE."""
    broker = MemoryBroker()
    broker.create_queue(Q, requires_session=True)
    await broker.send(Q, [Message("m0", session_id="a"), Message("m1", session_id="a")])
    handled: list[tuple[str, int]] = []
    errors: list[ErrorContext] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        handled.append((message.text(), message.delivery_count))
        if len(handled) == 1:
            broker.fail_next("complete", SessionLockLostError("lost, as the broker says"))

    async def on_error(context: ErrorContext) -> None:
        errors.append(context)

    options = SessionManagerOptions(session_idle_timeout=1)
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        with trio.move_on_after(30):
            await manager.subscribe(handle, process_error=on_error)
    assert [(type(e.error), e.source) for e in errors] == [
        (SessionLockLostError, ErrorSource.COMPLETE)
    ]
    assert handled == [("m0", 0), ("m0", 1), ("m1", 0)]
    assert broker.active_message_count(Q) == 0


class _PlainLink:
    """A `SessionLink` without `settle_and_receive`: what a third-party backend may be."""

    def __init__(self, link: SessionLink, calls: Counter[str]) -> None:
        self._link = link
        self._calls = calls
        self.session_id = link.session_id

    @property
    def locked_until(self) -> float:
        return self._link.locked_until

    @property
    def locked_until_utc(self) -> Any:
        return self._link.locked_until_utc

    async def receive(self, max_count: int) -> list[ReceivedMessage]:
        self._calls["receive"] += 1
        return await self._link.receive(max_count)

    async def settle(self, settlements: Sequence[Settlement]) -> list[BaseException | None]:
        self._calls["settle"] += 1
        return await self._link.settle(settlements)

    def __getattr__(self, name: str) -> Any:
        if name == "settle_and_receive":
            raise AttributeError(name)
        return getattr(self._link, name)


class _PlainBroker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    async def accept_session(self, *args: Any, **kwargs: Any) -> Any:
        link = await super().accept_session(*args, **kwargs)
        return _PlainLink(link, self.calls)


async def test_links_without_the_combined_call_settle_apart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A link without `settle_and_receive` gets a settle call per message, as before."""
    broker = _PlainBroker()
    broker.create_queue(Q, requires_session=True)
    await broker.send(Q, [Message(f"m{i}", session_id="a") for i in range(3)])
    handled: list[str] = []
    await _run(broker, SessionManagerOptions(session_idle_timeout=1), handled)
    assert handled == ["m0", "m1", "m2"]
    assert broker.active_message_count(Q) == 0
    assert broker.calls == Counter(receive=4, settle=3)


async def test_memory_link_settles_then_waits_until_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """MemorySessionLink.settle_and_receive: the settlements are applied and reported
    before the wait, even when the call is cancelled at once; with nothing to receive it
    returns an empty list at the deadline."""
    broker = MemoryBroker()
    broker.create_queue(Q, requires_session=True)
    await broker.send(Q, [Message("m0", session_id="a"), Message("m1", session_id="a")])
    link = await broker.accept_session(Q)  # type: ignore[arg-type]
    assert isinstance(link, MemorySessionLink)
    (first,) = await link.receive(1)
    reported: list[list[BaseException | None]] = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await link.settle_and_receive([Complete(first)], reported.append, 1)
    assert scope.cancelled_caught
    assert reported == [[None]]
    assert broker.active_message_count(Q) == 1  # m0 completed, m1 not taken

    (second,) = await link.settle_and_receive([], reported.append, 1)
    assert second.text() == "m1"
    start = trio.current_time()
    assert await link.settle_and_receive([Complete(second)], reported.append, 1, start + 5) == []
    assert trio.current_time() == start + 5
    assert reported == [[None], [], [None]]
    assert broker.active_message_count(Q) == 0
    await link.aclose()


async def test_links_without_the_combined_call_keep_the_idle_deadline_across_renewals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Without `settle_and_receive` the work scope is the idle clock: a renewal during the
    idle wait (at 5 s and 10 s, lock 10 s) moves the lock's deadline and keeps the idle
    one (12 s after the message), with no lock loss."""
    broker = _PlainBroker()
    broker.create_queue(Q, requires_session=True, lock_duration=10)
    await broker.send(Q, Message("m0", session_id="a"))
    handled: list[str] = []
    errors: list[ErrorContext] = []
    closed_at: list[float] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        handled.append(message.text())

    async def on_error(context: ErrorContext) -> None:
        errors.append(context)

    async def closing(context: SessionContext) -> None:
        closed_at.append(trio.current_time())

    start = trio.current_time()
    options = SessionManagerOptions(session_idle_timeout=12)
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        with trio.move_on_after(20):
            await manager.subscribe(handle, process_error=on_error, session_closing=closing)
        stats = manager.stats()
    assert handled == ["m0"]
    assert errors == []
    assert stats.lock_renewals == 2
    assert closed_at == [pytest.approx(start + 12)]
