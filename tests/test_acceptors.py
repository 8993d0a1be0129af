"""The pool of next-available acceptors follows the supply of sessions (virtual time).

On Azure an accept takes about half a second, so how many are in flight decides how
fast sessions are acquired. A backend wrapper gives each accept that delay and counts
the accepts in flight.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from trio_sessions import (
    MemoryBroker,
    Message,
    ReceivedMessage,
    ServiceBusConnectionError,
    SessionContext,
    SessionManagerOptions,
    open_session_manager,
)
from trio_sessions._manager import ACCEPTORS, MAX_ACCEPTORS

Q = "q"
ACCEPT_DELAY = 0.5


class SlowAccepts:
    """The MemoryBroker, with ``ACCEPT_DELAY`` before each accept and accepts counted."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.in_flight = 0
        self.peak = 0
        self.accepts = 0

    async def accept_session(self, *args: Any, **kwargs: Any) -> Any:
        self.in_flight += 1
        self.accepts += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await trio.sleep(ACCEPT_DELAY)
            return await self.broker.accept_session(*args, **kwargs)
        finally:
            self.in_flight -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.broker, name)


def new_broker() -> MemoryBroker:
    broker = MemoryBroker()
    broker.create_queue(Q, requires_session=True)
    return broker


async def send_sessions(broker: MemoryBroker, count: int, prefix: str = "s") -> None:
    for i in range(count):
        await broker.send(Q, Message(b"x", session_id=f"{prefix}{i}"))


async def run_until(
    backend: SlowAccepts,
    options: SessionManagerOptions,
    body: Any,
    errors: list[BaseException] | None = None,
) -> dict[str, float]:
    """Subscribe a handler that records when each session's first message arrived."""
    first: dict[str, float] = {}

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        first.setdefault(context.session_id, trio.current_time())

    async def on_error(context: Any) -> None:
        if errors is not None:
            errors.append(context.error)

    async with open_session_manager(backend, queue_name=Q, options=options) as manager:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: manager.subscribe(
                    handle, process_error=on_error, task_status=task_status
                )
            )
            await body(manager)
            manager.stop()
    return first


async def test_waiting_sessions_are_acquired_in_one_round_of_accepts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Ten sessions waiting and ten slots: ten accepts at once, all done by one delay."""
    broker = new_broker()
    await send_sessions(broker, 10)
    backend = SlowAccepts(broker)
    options = SessionManagerOptions(max_concurrent_sessions=10, session_idle_timeout=60)

    async def body(manager: Any) -> None:
        await trio.sleep(ACCEPT_DELAY + 0.1)

    first = await run_until(backend, options, body)
    assert sorted(first) == [f"s{i}" for i in range(10)]
    assert max(first.values()) - min(first.values()) < 0.01
    assert backend.peak == 10


async def test_accepts_in_flight_never_exceed_the_free_slots_or_the_cap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for slots in (3, 50):
        broker = new_broker()
        backend = SlowAccepts(broker)
        options = SessionManagerOptions(
            max_concurrent_sessions=slots, accept_timeout=5, session_idle_timeout=1
        )

        async def body(manager: Any, broker: MemoryBroker = broker) -> None:
            await send_sessions(broker, 100)
            await trio.sleep(100)

        first = await run_until(backend, options, body)
        assert len(first) == 100
        assert backend.peak == min(slots, MAX_ACCEPTORS)


async def test_with_no_session_free_only_the_standing_acceptors_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The pool starts full and shrinks to ACCEPTORS once accepts find nothing."""
    broker = new_broker()
    backend = SlowAccepts(broker)
    options = SessionManagerOptions(max_concurrent_sessions=100, accept_timeout=5)
    in_flight: list[int] = []

    async def body(manager: Any) -> None:
        await trio.testing.wait_all_tasks_blocked()
        in_flight.append(backend.in_flight)
        await trio.sleep(20)
        in_flight.append(backend.in_flight)
        accepts_before = backend.accepts
        await trio.sleep(ACCEPT_DELAY + 5)  # one more accept round
        in_flight.append(backend.accepts - accepts_before)

    await run_until(backend, options, body)
    assert in_flight == [MAX_ACCEPTORS, ACCEPTORS, ACCEPTORS]


async def test_the_pool_grows_again_when_sessions_come(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After shrinking, each accept that finds a session starts one more acceptor."""
    broker = new_broker()
    backend = SlowAccepts(broker)
    options = SessionManagerOptions(
        max_concurrent_sessions=100, accept_timeout=5, session_idle_timeout=600
    )
    started: list[float] = []

    async def body(manager: Any) -> None:
        await trio.sleep(20)  # shrunk to the standing acceptors
        started.append(trio.current_time())
        backend.peak = backend.in_flight
        await send_sessions(broker, 60)
        await trio.sleep(30)

    first = await run_until(backend, options, body)
    assert len(first) == 60
    assert backend.peak == MAX_ACCEPTORS
    # The four waiting accepts take four sessions at once; then 8, 16, 16 and 16 accepts
    # a round: all 60 after four accept delays, where four acceptors would need 14.
    assert max(first.values()) - started[0] == pytest.approx(4 * ACCEPT_DELAY)


async def test_transient_accept_errors_are_retried_by_the_standing_acceptors_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broker = new_broker()
    for _ in range(MAX_ACCEPTORS):
        broker.fail_next("accept_session", ServiceBusConnectionError)
    backend = SlowAccepts(broker)
    options = SessionManagerOptions(max_concurrent_sessions=100, accept_timeout=5)
    errors: list[BaseException] = []
    in_flight: list[int] = []

    async def body(manager: Any) -> None:
        await trio.sleep(ACCEPT_DELAY + 0.1)  # every first accept failed
        in_flight.append(manager._acceptors)
        await send_sessions(broker, 1)
        await trio.sleep(30)

    first = await run_until(backend, options, body, errors)
    assert [type(e) for e in errors] == [ServiceBusConnectionError] * MAX_ACCEPTORS
    assert in_flight == [ACCEPTORS]
    assert list(first) == ["s0"]


async def test_fewer_slots_than_standing_acceptors(autojump_clock: trio.testing.MockClock) -> None:
    """With one slot, one acceptor: it never ends for finding nothing."""
    broker = new_broker()
    backend = SlowAccepts(broker)
    options = SessionManagerOptions(
        max_concurrent_sessions=1, accept_timeout=5, session_idle_timeout=1
    )

    async def body(manager: Any) -> None:
        await trio.sleep(60)
        assert manager._acceptors == 1
        await send_sessions(broker, 3)
        await trio.sleep(60)

    first = await run_until(backend, options, body)
    assert backend.peak == 1
    assert len(first) == 3
