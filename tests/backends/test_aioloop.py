"""The Azure backend's asyncio loop (`_aioloop`): trio-asyncio's loop in asyncio's own shape.

Each test runs asyncio code on a loop that `trio_asyncio.open_loop` opened and `adopt`
reshaped, and checks an asyncio behaviour the SDK relies on: callback order, timers (in
virtual time), sockets, threads, Trio tasks started from asyncio, errors, and shutdown.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import sniffio
import trio
import trio.testing
import trio_asyncio

from trio_sessions.backends import _aioloop


@asynccontextmanager
async def backend_loop() -> AsyncIterator[Any]:
    async with trio_asyncio.open_loop() as loop:
        assert _aioloop.adopt(loop)
        assert type(loop) is _aioloop._BackendLoop
        yield loop


def in_asyncio(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run the asyncio coroutine function ``fn`` from Trio, in the current loop."""
    return trio_asyncio.aio_as_trio(fn)  # type: ignore[no-any-return]


async def test_callbacks_scheduled_by_a_pass_run_in_the_next() -> None:
    """As in asyncio: a pass runs what was ready when it began, in order; what those
    callbacks schedule runs after them."""
    order: list[str] = []
    async with backend_loop() as loop:
        done = trio.Event()

        def scheduled_by_first() -> None:
            order.append("scheduled by first")
            done.set()

        def first() -> None:
            order.append("first")
            loop.call_soon(scheduled_by_first)

        loop.call_soon(first)
        loop.call_soon(order.append, "second")
        loop.call_soon(order.append, "third")
        await done.wait()
    assert order == ["first", "second", "third", "scheduled by first"]


async def test_a_busy_asyncio_task_does_not_starve_trio() -> None:
    """A pass yields to Trio once it has run its batch: Trio tasks go on meanwhile."""
    async with backend_loop():
        trio_steps = 0
        done = trio.Event()

        async def busy() -> int:
            for _ in range(200):
                await asyncio.sleep(0)
            return trio_steps

        async def trio_side() -> None:
            nonlocal trio_steps
            while not done.is_set():
                trio_steps += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio_side)
            seen = await in_asyncio(busy)()
            done.set()
    assert seen >= 150  # about one Trio step per asyncio step


async def test_timers_fire_in_order_on_trios_clock(autojump_clock: trio.testing.MockClock) -> None:
    fired: list[tuple[str, float]] = []
    async with backend_loop() as loop:
        assert loop.time() == trio.current_time()

        async def timers() -> None:
            start = loop.time()
            loop.call_later(3, lambda: fired.append(("later 3", loop.time() - start)))
            loop.call_at(start + 1, lambda: fired.append(("at 1", loop.time() - start)))
            cancelled = loop.call_later(2, lambda: fired.append(("cancelled", 0)))
            cancelled.cancel()
            await asyncio.sleep(5)
            fired.append(("slept 5", loop.time() - start))

        await in_asyncio(timers)()
    assert fired == [("at 1", 1), ("later 3", 3), ("slept 5", 5)]


async def test_an_earlier_timer_wakes_a_parked_loop(autojump_clock: trio.testing.MockClock) -> None:
    """The loop parks until its first timer; a timer due sooner, set from Trio, wakes it."""
    fired = trio.Event()
    async with backend_loop() as loop:
        loop.call_later(100, lambda: None)
        await trio.testing.wait_all_tasks_blocked()  # the loop is parked until t=100
        start = trio.current_time()
        loop.call_later(1, fired.set)
        await fired.wait()
        assert trio.current_time() - start == 1


async def test_wait_for_times_out_and_cancelled_timers_are_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The SDK wraps its waits in wait_for: the timeouts fire, and the timers of waits
    that ended early leave the heap once they are most of it (asyncio's rule)."""
    async with backend_loop() as loop:

        async def waits() -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.sleep(10), timeout=1)
            for _ in range(300):  # each leaves a cancelled 30 s timer behind
                await asyncio.wait_for(asyncio.sleep(0), timeout=30)

        await in_asyncio(waits)()
        await in_asyncio(asyncio.sleep)(0)
        # trio-asyncio's own loop keeps all 300 until they are due.
        assert len(loop._timers) <= 2 * _aioloop._MIN_TIMERS_TO_PRUNE


async def test_sockets_carry_data_both_ways() -> None:
    """Readers and writers: a megabyte each way through a socket pair (full buffers too)."""
    one, other = socket.socketpair()
    payload = bytes(range(256)) * 4096
    async with backend_loop():

        async def exchange() -> tuple[bytes, bytes]:
            reader_a, writer_a = await asyncio.open_connection(sock=one)
            reader_b, writer_b = await asyncio.open_connection(sock=other)
            writer_a.write(payload)
            writer_b.write(payload[::-1])
            got_b, got_a = await asyncio.gather(
                reader_b.readexactly(len(payload)), reader_a.readexactly(len(payload))
            )
            await asyncio.gather(writer_a.drain(), writer_b.drain())
            writer_a.close()
            writer_b.close()
            await asyncio.gather(writer_a.wait_closed(), writer_b.wait_closed())
            return got_a, got_b

        got_a, got_b = await in_asyncio(exchange)()
    assert got_b == payload
    assert got_a == payload[::-1]


async def test_call_soon_threadsafe_from_another_thread() -> None:
    async with backend_loop() as loop:
        called = trio.Event()
        handle = await trio.to_thread.run_sync(loop.call_soon_threadsafe, called.set)
        assert isinstance(handle, asyncio.Handle)
        await called.wait()


async def test_signal_handlers_come_through_trio_asyncios_channel() -> None:
    """trio-asyncio hands a signal's handler to the loop through its own channel."""
    async with backend_loop() as loop:
        got = trio.Event()
        loop.add_signal_handler(signal.SIGUSR1, got.set)
        try:
            await trio.testing.wait_all_tasks_blocked()  # the loop is parked on the channel
            os.kill(os.getpid(), signal.SIGUSR1)
            with trio.fail_after(5):
                await got.wait()
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)


async def test_signal_handlers_run_while_the_loop_is_busy() -> None:
    """A signal's handler runs although the loop never parks (always something ready)."""
    async with backend_loop() as loop:
        got = trio.Event()
        stop = False
        loop.add_signal_handler(signal.SIGUSR1, got.set)

        async def busy() -> None:
            while not stop:  # noqa: ASYNC110 - busy on purpose: the loop never parks
                await asyncio.sleep(0)

        task = loop.create_task(busy())
        os.kill(os.getpid(), signal.SIGUSR1)
        with trio.move_on_after(5):
            await got.wait()
        stop = True
        loop.remove_signal_handler(signal.SIGUSR1)
        await trio_asyncio.run_aio_future(task)
        assert got.is_set(), "the handler did not run while the loop was busy"


async def test_call_soon_threadsafe_delivered_after_the_loop_closed_is_dropped() -> None:
    """A call accepted while the loop is open and delivered (by Trio's run_sync_soon)
    after it closed is dropped, as trio-asyncio drops it, instead of crashing Trio."""
    async with trio.open_nursery() as nursery:
        async with backend_loop() as loop:

            async def producer() -> None:
                while True:
                    try:
                        loop.call_soon_threadsafe(lambda: None)
                    except RuntimeError:  # closed: the call is refused up front
                        return
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(producer)
            for _ in range(20):
                await trio.lowlevel.checkpoint()
    assert loop.is_closed()
    # What such a late delivery does, without waiting for the race: nothing.
    loop._ts_deliver(asyncio.Handle(lambda: None, (), loop))


async def test_trio_code_called_from_asyncio() -> None:
    """trio_as_aio starts a Trio task from the loop (trio-asyncio's AsyncHandle)."""
    async with backend_loop():

        async def trio_part(x: int) -> tuple[int, str]:
            library = sniffio.current_async_library()
            await trio.lowlevel.checkpoint()
            return x * 2, library

        async def asyncio_part() -> tuple[int, str]:
            return await trio_asyncio.trio_as_aio(trio_part)(21)  # type: ignore[no-any-return]

        # The Trio task sees Trio, though the loop started it in the middle of a pass.
        assert await in_asyncio(asyncio_part)() == (42, "trio")


async def test_a_trio_task_cancelled_before_it_starts_is_still_started() -> None:
    """As trio-asyncio's own loop does, a cancelled Trio-task handle is started anyway:
    its ``_run`` ends at once, and (trio-asyncio 0.16 and later) resolves the future of
    a ``trio_as_future`` as cancelled. Skipped, that future would stay pending."""
    async with backend_loop() as loop:

        async def never_run() -> None:
            raise AssertionError("a cancelled Trio task must not run")

        async def asyncio_part() -> bool:
            handle = loop.run_trio_task(never_run)
            handle.cancel()
            for _ in range(10):  # a few passes
                await asyncio.sleep(0)
            return bool(handle._started.is_set())

        assert await in_asyncio(asyncio_part)()


async def test_callbacks_see_asyncio_and_trio_sees_trio() -> None:
    seen: list[str] = []
    async with backend_loop() as loop:
        done = trio.Event()

        def callback() -> None:
            seen.append(sniffio.current_async_library())
            done.set()

        loop.call_soon(callback)
        await done.wait()
        seen.append(sniffio.current_async_library())
    assert seen == ["asyncio", "trio"]


async def test_a_failing_callback_goes_to_the_exception_handler() -> None:
    """The failure is reported as asyncio reports it, and the loop goes on."""
    reported: list[BaseException] = []
    async with backend_loop() as loop:
        loop.set_exception_handler(lambda _, context: reported.append(context["exception"]))
        after = trio.Event()

        def fail() -> None:
            raise ValueError("from a callback")

        loop.call_soon(fail)
        loop.call_soon(after.set)
        await after.wait()
    assert [type(e) for e in reported] == [ValueError]


async def test_what_is_scheduled_before_leaving_runs() -> None:
    ran: list[str] = []
    async with backend_loop() as loop:
        loop.call_soon(ran.append, "scheduled last")
    assert ran == ["scheduled last"]


async def test_stopping_with_tasks_still_waiting() -> None:
    """Leaving the loop's block cancels asyncio tasks still waiting, and ends."""
    cancelled = []
    async with backend_loop() as loop:

        async def waiting() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        tasks = [loop.create_task(waiting()) for _ in range(10)]
        await in_asyncio(asyncio.sleep)(0)
    assert all(task.cancelled() for task in tasks)
    assert cancelled == [True] * 10


async def test_what_was_queued_before_adopting_still_runs() -> None:
    ran = trio.Event()
    async with trio_asyncio.open_loop() as loop:
        loop.call_soon(ran.set)
        assert _aioloop.adopt(loop)
        await ran.wait()


def test_adopt_leaves_other_loops_alone() -> None:
    loop = asyncio.SelectorEventLoop()
    try:
        assert not _aioloop.adopt(loop)
        assert type(loop) is not _aioloop._BackendLoop
    finally:
        loop.close()
