"""An actor ended by a cancellation while its service task is in a slow link call.

The service task is stopped and waited for first (as the actor's own nursery did), and
only then is the link closed, with a time limit of its own: it is never left open, nor
closed while the service task still uses it."""

from __future__ import annotations

import pytest
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
from trio_sessions.backends._memory import MemorySessionLink

Q = "q"


async def test_the_link_closes_after_a_slow_service_task_stops(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[float, str]] = []
    original_renew = MemorySessionLink.renew_lock
    original_close = MemorySessionLink.aclose

    async def slow_renew(self: MemorySessionLink) -> float:
        events.append((trio.current_time(), "renew start"))
        with trio.CancelScope(shield=True):
            await trio.sleep(12)  # a stop longer than CLOSE_TIMEOUT (e.g. _Call._stop + guard cut)
        events.append((trio.current_time(), "renew end"))
        return await original_renew(self)

    async def aclose(self: MemorySessionLink) -> None:
        events.append((trio.current_time(), "aclose"))
        await original_close(self)

    monkeypatch.setattr(MemorySessionLink, "renew_lock", slow_renew)
    monkeypatch.setattr(MemorySessionLink, "aclose", aclose)
    broker = MemoryBroker()
    broker.create_queue(Q, requires_session=True, lock_duration=20)
    await broker.send(Q, [Message("m0", session_id="a")])

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        await trio.sleep_forever()

    async with open_session_manager(
        broker, queue_name=Q, options=SessionManagerOptions(session_idle_timeout=100)
    ) as manager:
        with trio.move_on_after(11):  # cancelled while the renewal (at 10) runs
            await manager.subscribe(handle)
    names = [e for _, e in events]
    assert "aclose" in names, "the link was never closed"
    assert names.index("aclose") > names.index("renew end"), "closed while in use"
