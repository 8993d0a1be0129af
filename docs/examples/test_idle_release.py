"""Testing a processor in virtual time: idle timeouts take no real time."""

from __future__ import annotations

import trio
import trio.testing

from trio_sessions import (
    MemoryBroker,
    Message,
    ReceivedMessage,
    SessionContext,
    SessionManagerOptions,
    open_session_manager,
)


async def test_quiet_session_is_released(autojump_clock: trio.testing.MockClock) -> None:
    """A session with no traffic for session_idle_timeout seconds gives its lock back."""
    broker = MemoryBroker()
    broker.create_queue("orders")
    await broker.send("orders", Message(b"created", session_id="order-1"))
    seen: list[bytes] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        seen.append(message.body)

    options = SessionManagerOptions(session_idle_timeout=30)
    async with open_session_manager(broker, queue_name="orders", options=options) as manager:
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.subscribe, handle)
            await trio.sleep(31)  # virtual seconds: instant under autojump_clock
            assert manager.stats().active_sessions == 0
            assert broker.locked_sessions("orders") == []
            manager.stop()
    assert seen == [b"created"]
