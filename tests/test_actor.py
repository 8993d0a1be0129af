"""The session actor's own structure (issue #8), in virtual time on the MemoryBroker.

The actor has no nursery of its own: its service task runs in the manager's supervisor
nursery. These tests check what that nursery used to guarantee: the service task never
outlives its actor, and the link is closed only once the service task has stopped.
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
    SessionContext,
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
