"""A link that cannot start a settle_and_receive call (the Azure link, when another
call held it past CLOSE_TIMEOUT) calls on_settled([error]) and raises that same error:
it is reported once, as a settlement error, with no receive backoff."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest
import trio
import trio.testing

from trio_sessions import (
    ErrorContext,
    MemoryBroker,
    Message,
    ReceivedMessage,
    ServiceBusConnectionError,
    SessionContext,
    SessionManagerOptions,
    open_session_manager,
)
from trio_sessions._messages import Settlement
from trio_sessions.backends._memory import MemorySessionLink

Q = "q"


async def test_a_link_refusing_the_call_reports_the_settlement_once(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = MemorySessionLink.settle_and_receive
    fired: list[int] = []

    def late(
        self: MemorySessionLink,
        settlements: Sequence[Settlement],
        on_settled: Callable[[list[BaseException | None]], None],
        max_count: int,
        deadline: float = float("inf"),
    ) -> Coroutine[Any, Any, list[ReceivedMessage]]:
        if settlements and not fired:
            fired.append(1)
            error = ServiceBusConnectionError("another call held the session for 10 s")
            on_settled([error] * len(settlements))

            async def raise_it() -> list[ReceivedMessage]:
                raise error

            return raise_it()
        return original(self, settlements, on_settled, max_count, deadline)

    monkeypatch.setattr(MemorySessionLink, "settle_and_receive", late)
    broker = MemoryBroker()
    broker.create_queue(Q, requires_session=True)
    await broker.send(Q, [Message(f"m{i}", session_id="a") for i in range(2)])
    errors: list[ErrorContext] = []
    handled: list[str] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        handled.append(message.text())

    async def on_error(context: ErrorContext) -> None:
        errors.append(context)

    async with open_session_manager(
        broker, queue_name=Q, options=SessionManagerOptions(session_idle_timeout=1)
    ) as manager:
        with trio.move_on_after(30):
            await manager.subscribe(handle, process_error=on_error)
    assert handled == ["m0", "m0", "m1"]
    assert len(errors) == 1, "one failure, reported once"
