"""The measured workloads, shared by the throughput and latency scripts.

Each ``run_*`` function is a whole ``trio.run`` of its own (so no state leaks from one
measurement into the next): it prepares its input untimed, then times the work from the
start of processing until the last message's settlement has been carried out, and
returns that `Timing`. Teardown (closing sessions) is not timed, in any scenario.

* **floor**: raw Trio in the manager's task shape and no broker: one dispatcher task
  hands each message over a memory channel to its session's consumer task, which calls
  the handler and reports the settlement back over a channel to one settler task.
* **naive**: the loop a user writes by hand today (the proposal's sample, in Trio):
  ``S`` tasks, each holding a `trio.CapacityLimiter` token, accept a session of the
  `MemoryBroker` and receive from it with a cancel scope per receive (the idle
  timeout), awaiting ``complete`` for each message.
* **manager**: `open_session_manager` on the `MemoryBroker` with a no-op handler,
  ``auto_complete`` and ``max_concurrent_sessions = S`` (defaults otherwise, so
  ``prefetch_count=0``: one message received at a time per session);
  **manager_prefetch** is the same with ``prefetch_count=10`` (receives in batches).

As a diagnostic, the garbage collector's work inside each timed block is recorded in
`LAST_GC` (collections per generation and the CPU seconds they took): at 10 000 held
sessions most of the extra cost per message is full collections (issue #8, P3).
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import trio
import trio.testing
from _common import Timing
from _common import timed as _timed

from trio_sessions import (
    MemoryBroker,
    Message,
    ReceivedMessage,
    SessionContext,
    SessionManagerOptions,
    open_session_manager,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

QUEUE = "bench"

#: Long enough never to fire during a measurement; a session ends when the run is done.
IDLE_TIMEOUT = 600.0

#: The garbage collector's work in the last timed block: ``collections`` per generation
#: (0, 1, 2; 2 is a full pass) and ``cpu_s``, the process CPU seconds they took.
LAST_GC: dict[str, Any] = {"collections": [0, 0, 0], "cpu_s": 0.0}

_gc_recording: dict[str, Any] = {"on": False, "started": 0.0}


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if not _gc_recording["on"]:
        return
    if phase == "start":
        _gc_recording["started"] = time.process_time()
    else:
        LAST_GC["collections"][info["generation"]] += 1
        LAST_GC["cpu_s"] += time.process_time() - _gc_recording["started"]


gc.callbacks.append(_on_gc)


@contextmanager
def timed() -> Iterator[Timing]:
    """`_common.timed`, recording the collector's work in the block in `LAST_GC`."""
    with _timed() as timing:
        LAST_GC["collections"] = [0, 0, 0]
        LAST_GC["cpu_s"] = 0.0
        _gc_recording["on"] = True
        try:
            yield timing
        finally:
            _gc_recording["on"] = False


def loaded_broker(sessions: int, per_session: int) -> MemoryBroker:
    """A broker whose queue holds ``per_session`` messages in each of ``sessions``,
    interleaved (message ``i`` of every session before message ``i + 1`` of any)."""
    broker = MemoryBroker()
    broker.create_queue(QUEUE, lock_duration=300.0)
    batch = [Message(b"x", session_id=f"s{s}") for _ in range(per_session) for s in range(sessions)]
    trio.run(broker.send, QUEUE, batch)
    return broker


def _trio_run(fn: Callable[[], Awaitable[Timing]]) -> Timing:
    result: Timing = trio.run(fn)
    return result


# -- floor ------------------------------------------------------------------------------------


def run_floor(sessions: int, per_session: int) -> Timing:
    """Raw Trio channels in the manager's shape: dispatcher → S consumers → settler."""
    total = sessions * per_session
    messages = [(s, i) for i in range(per_session) for s in range(sessions)]

    async def handler(message: tuple[int, int]) -> None:  # noqa: ASYNC124 - a handler is async
        return None

    async def consumer(
        inbox: trio.MemoryReceiveChannel[tuple[int, int]],
        reports: trio.MemorySendChannel[tuple[int, int]],
    ) -> None:
        async with inbox, reports:
            async for message in inbox:
                await handler(message)
                await reports.send(message)

    async def main() -> Timing:
        done = trio.Event()
        settled = 0
        reports_tx, reports_rx = trio.open_memory_channel[tuple[int, int]](sessions)

        async def settler() -> None:
            nonlocal settled
            async with reports_rx:
                async for _ in reports_rx:
                    settled += 1
                    if settled == total:
                        done.set()

        timing = Timing()
        async with trio.open_nursery() as nursery:
            with timed() as timing:
                nursery.start_soon(settler)
                inboxes = []
                async with reports_tx:
                    for _ in range(sessions):
                        tx, rx = trio.open_memory_channel[tuple[int, int]](0)
                        inboxes.append(tx)
                        nursery.start_soon(consumer, rx, reports_tx.clone())
                for session, index in messages:
                    await inboxes[session].send((session, index))
                await done.wait()
            for tx in inboxes:
                tx.close()
        return timing

    return _trio_run(main)


# -- naive ------------------------------------------------------------------------------------


def run_naive(sessions: int, per_session: int) -> Timing:
    """The hand-written loop: accept, receive under a cancel scope, await complete."""
    total = sessions * per_session
    broker = loaded_broker(sessions, per_session)

    async def handler(message: ReceivedMessage) -> None:  # noqa: ASYNC124 - a handler is async
        return None

    async def main() -> Timing:
        from trio_sessions._messages import EntityPath

        entity = EntityPath(queue_name=QUEUE)
        done = trio.Event()
        completed = 0
        limiter = trio.CapacityLimiter(sessions)

        async def session_loop() -> None:
            nonlocal completed
            while True:
                async with limiter:
                    link = await broker.accept_session(entity, max_wait_time=IDLE_TIMEOUT)
                    try:
                        while True:
                            with trio.move_on_after(IDLE_TIMEOUT):
                                batch = await link.receive(1)
                            for message in batch:
                                await handler(message)
                                await link.complete(message)
                                completed += 1
                                if completed == total:
                                    done.set()
                    finally:
                        with trio.CancelScope(shield=True):
                            await link.aclose()

        timing = Timing()
        async with trio.open_nursery() as nursery:
            with timed() as timing:
                for _ in range(sessions):
                    nursery.start_soon(session_loop)
                await done.wait()
            nursery.cancel_scope.cancel()
        return timing

    return _trio_run(main)


# -- manager ----------------------------------------------------------------------------------


def manager_options(sessions: int, **overrides: object) -> SessionManagerOptions:
    """The options every manager scenario uses, for ``sessions`` held at once."""
    fields: dict[str, object] = {
        "max_concurrent_sessions": sessions,
        "session_idle_timeout": IDLE_TIMEOUT,
        "accept_timeout": IDLE_TIMEOUT,
        **overrides,
    }
    return SessionManagerOptions(**fields)  # type: ignore[arg-type]


def run_manager(sessions: int, per_session: int, **overrides: object) -> Timing:
    """`open_session_manager` with a no-op handler and auto-complete."""
    total = sessions * per_session
    broker = loaded_broker(sessions, per_session)

    handled = 0
    all_handled = trio.Event()

    async def handler(message: ReceivedMessage, context: SessionContext) -> None:  # noqa: ASYNC124
        nonlocal handled
        handled += 1
        if handled == total:
            all_handled.set()

    async def main() -> Timing:
        timing = Timing()
        async with open_session_manager(
            broker, queue_name=QUEUE, options=manager_options(sessions, **overrides)
        ) as manager:
            async with trio.open_nursery() as nursery:
                with timed() as timing:
                    await nursery.start(manager.subscribe, handler)
                    await all_handled.wait()
                    # The last auto-complete runs once that handler returns: when every
                    # task is blocked again, it has been carried out.
                    await trio.testing.wait_all_tasks_blocked()
                assert manager.stats().messages_completed == total
                manager.stop()
        return timing

    return _trio_run(main)


#: prefetch_count of the supplementary manager series: receives in batches of 11.
PREFETCH = 10


def run_manager_prefetch(sessions: int, per_session: int) -> Timing:
    """As `run_manager`, with ``prefetch_count=PREFETCH``: batched receives."""
    return run_manager(sessions, per_session, prefetch_count=PREFETCH)


SCENARIOS: dict[str, Callable[[int, int], Timing]] = {
    "floor": run_floor,
    "naive": run_naive,
    "manager": run_manager,
    "manager_prefetch": run_manager_prefetch,
}
