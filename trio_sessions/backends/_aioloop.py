"""The Azure backend's asyncio loop: trio-asyncio's loop, run the way asyncio runs its own.

trio-asyncio 0.16 runs each asyncio callback in a pass of Trio's scheduler of its own
(every callback goes through a memory channel), hands every timer to the loop through
that channel too, checks every callback with ``inspect`` (asyncio does that in debug
mode only), never drops cancelled timers before they are due, and after each readiness
callback of a socket waits for a round trip through the loop (``synchronize``) before it
waits on the socket again. The SDK schedules about fifteen callbacks and six timers per
message, so most of what the Azure path cost on top of the SDK was that (issue #8, P7).

`adopt` gives a loop that `trio_asyncio.open_loop` opened the shape of asyncio's own
``BaseEventLoop._run_once``:

- ready callbacks wait in a deque; each pass runs those that were ready when it started
  (the callbacks they schedule run in the next pass), then yields to Trio once;
- timers go straight into the heap; cancelled ones are counted and the heap is rebuilt
  when they are more than half of it (asyncio's rule);
- the loop's Trio task parks only when nothing is ready, until the next timer is due or
  something is scheduled: only then does scheduling wake it, through trio-asyncio's
  channel (which still carries whatever trio-asyncio itself puts there);
- thread-safe calls and signal handlers come in through Trio's ``run_sync_soon`` into
  the deque (trio-asyncio put them in its channel, which this loop reads only when it
  parks), and are dropped once the loop is closed, as trio-asyncio drops them;
- a socket's reader or writer task runs its callback and waits on the socket again.

Everything else (opening, stopping, closing, the Trio-task bridges, subprocesses)
stays trio-asyncio's. The loop's life cycle is unchanged: `adopt` is
called on a running loop, and its first pass under the new shape begins with the next
wake-up.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import math
from typing import Any

import sniffio
import trio
import trio_asyncio
from trio_asyncio._handles import AsyncHandle

#: asyncio's rule for rebuilding the timer heap: at least this many timers, more than
#: this fraction of them cancelled (``asyncio.base_events``).
_MIN_TIMERS_TO_PRUNE = 100
_CANCELLED_FRACTION_TO_PRUNE = 0.5


class _BackendLoop(trio_asyncio.TrioEventLoop):  # type: ignore[misc]
    """A `trio_asyncio.TrioEventLoop` whose callbacks and timers are kept as asyncio keeps them.

    Never built directly: `adopt` turns a loop opened by `trio_asyncio.open_loop` into one.
    """

    # Set by `adopt`, before the class is switched.
    _ts_ready: collections.deque[asyncio.Handle]
    _ts_parked: bool
    _ts_cancelled_timers: int
    _timers: list[Any]  # trio-asyncio's heap of asyncio.TimerHandle

    # -- scheduling ----------------------------------------------------------------------

    def _queue_handle(self, handle: Any) -> Any:
        self._check_closed()
        if isinstance(handle, asyncio.TimerHandle):
            timers = self._timers
            handle._scheduled = True  # type: ignore[attr-defined] # cancel() then reports back
            heapq.heappush(timers, handle)
            if self._ts_parked and timers[0] is handle:  # due before the parked pass wakes
                self._ts_wake()
        else:
            self._ts_ready.append(handle)
            if self._ts_parked:
                self._ts_wake()
        return handle

    def _ts_wake(self) -> None:
        self._ts_parked = False
        self._q_send.send_nowait(None)

    def call_soon(self, callback: Any, *args: Any, context: Any = None) -> Any:
        if self._debug:
            self._check_callback(callback, "call_soon")
        return self._queue_handle(asyncio.Handle(callback, args, self, context))

    def call_at(self, when: float, callback: Any, *args: Any, context: Any = None) -> Any:
        if self._debug:
            self._check_callback(callback, "call_at")
        return self._queue_handle(asyncio.TimerHandle(when, callback, args, self, context))

    def call_later(self, delay: float, callback: Any, *args: Any, context: Any = None) -> Any:
        return self.call_at(self.time() + delay, callback, *args, context=context)

    def call_soon_threadsafe(self, callback: Any, *args: Any, context: Any = None) -> Any:
        self._check_callback(callback, "call_soon_threadsafe")
        self._check_closed()
        handle = asyncio.Handle(callback, args, self, context)
        self._token.run_sync_soon(self._ts_deliver, handle)
        return handle

    def _handle_sig(self, sig: int, _: object) -> None:
        # trio-asyncio sends a signal's handler into its channel, which this loop reads
        # only when it parks: a busy loop would never run it.
        self._token.run_sync_soon(self._ts_deliver, self._signal_handlers[sig])

    def _ts_deliver(self, handle: Any) -> None:
        """Queue ``handle`` from Trio's ``run_sync_soon``: dropped once the loop is closed,
        as trio-asyncio drops what reaches its channel then (raising there would be a
        `trio.TrioInternalError`)."""
        if not self._closed:
            self._queue_handle(handle)

    def _timer_handle_cancelled(self, handle: Any) -> None:
        if handle._scheduled:
            self._ts_cancelled_timers += 1

    def _ts_route(self, obj: object) -> None:
        """Take what arrived through trio-asyncio's channel (None is only a wake-up)."""
        if isinstance(obj, asyncio.Handle):
            self._queue_handle(obj)

    # -- the loop's pass -----------------------------------------------------------------

    def _ts_take_due_timers(self) -> None:
        timers = self._timers
        if (
            len(timers) >= _MIN_TIMERS_TO_PRUNE
            and self._ts_cancelled_timers > _CANCELLED_FRACTION_TO_PRUNE * len(timers)
        ):
            kept = []
            for timer in timers:
                if timer._cancelled:
                    timer._scheduled = False
                else:
                    kept.append(timer)
            heapq.heapify(kept)
            self._timers = timers = kept
            self._ts_cancelled_timers = 0
        now = self.time()
        ready = self._ts_ready
        while timers and timers[0]._when <= now:
            timer = heapq.heappop(timers)
            timer._scheduled = False
            if timer._cancelled:
                self._ts_cancelled_timers -= 1
            else:
                ready.append(timer)

    async def _main_loop_one(self, no_wait: bool = False) -> None:
        """One pass: run what is ready, or park until something is (see the module)."""
        if self._timers:
            self._ts_take_due_timers()
        ready = self._ts_ready
        if not ready:
            if no_wait:  # draining at exit: trio.WouldBlock once nothing is left
                self._ts_route(self._q_recv.receive_nowait())
                return
            await self._ts_park()
            return
        previous, sniffio.thread_local.name = sniffio.thread_local.name, "asyncio"
        try:
            for _ in range(len(ready)):
                handle = ready.popleft()
                if isinstance(handle, AsyncHandle):
                    # A Trio task to start, as trio-asyncio does: even a cancelled one,
                    # which resolves its future as cancelled. Trio code runs meanwhile,
                    # and sniffio's name is per thread: Trio's while the batch waits.
                    sniffio.thread_local.name = previous
                    handle._context.run(
                        self._nursery.start_soon, handle._run, name=handle._callback
                    )
                    await handle._started.wait()
                    sniffio.thread_local.name = "asyncio"
                elif not handle._cancelled:
                    # A TrioAsyncioExit (stop) leaves here; the rest stay queued.
                    handle._run()
        finally:
            sniffio.thread_local.name = previous
        if ready or no_wait:
            await trio.lowlevel.checkpoint()
        else:
            await self._ts_park()  # a yield too, and no pass of its own to find nothing

    async def _ts_park(self) -> None:
        deadline = self._timers[0]._when if self._timers else math.inf
        self._ts_parked = True
        try:
            if deadline == math.inf:
                obj = await self._q_recv.receive()
            else:
                obj = None
                with trio.CancelScope(deadline=deadline):
                    obj = await self._q_recv.receive()
        finally:
            self._ts_parked = False
        self._ts_route(obj)

    # -- sockets -------------------------------------------------------------------------

    async def _io_task(self, fd: int, handle: Any, wait_ready: Any) -> None:
        """Run ``handle`` each time ``fd`` is ready, as trio-asyncio does, without the round
        trip through the loop (``synchronize``) after each run: the transport's callback
        reads or writes the socket itself, and what it schedules runs in the loop's next pass.
        """
        with handle._scope:
            try:
                while not handle._cancelled:
                    try:
                        await wait_ready(fd)
                    except OSError:
                        # The handle may have been cancelled and the socket closed meanwhile.
                        if handle._cancelled:
                            break
                        raise
                    if handle._cancelled:
                        break
                    handle._run()
            except Exception as exc:
                handle._raise(exc)


def adopt(loop: Any) -> bool:
    """Give ``loop`` (running, opened by `trio_asyncio.open_loop`) the `_BackendLoop` shape.

    Returns False, changing nothing, for any other kind of loop (one the application
    opened in a way this does not know), and for a trio-asyncio whose internals differ.
    """
    if type(loop) is not trio_asyncio.TrioEventLoop or not all(
        hasattr(loop, name)
        for name in ("_q_send", "_q_recv", "_timers", "_nursery", "_token", "_signal_handlers")
    ):
        return False
    if loop._q_send.statistics().max_buffer_size != math.inf:
        return False  # a bounded queue (open_loop(queue_len=...)): wake-ups could not wait
    ready: collections.deque[asyncio.Handle] = collections.deque()
    loop._ts_ready = ready
    loop._ts_parked = False
    loop._ts_cancelled_timers = 0
    # What is waiting in the channel now is moved to the deque and the heap: from here on
    # the channel carries wake-ups only (and what trio-asyncio sends into it directly).
    pending = []
    while True:
        try:
            pending.append(loop._q_recv.receive_nowait())
        except trio.WouldBlock:
            break
    for timer in loop._timers:
        timer._scheduled = True  # as _queue_handle marks them: cancel() then reports back
    loop.__class__ = _BackendLoop
    for obj in pending:
        loop._ts_route(obj)
    # The loop's task may be parked in trio-asyncio's own pass, on the channel: one
    # wake-up ends that pass (a None is "the wait timed out"), and the next is ours.
    loop._q_send.send_nowait(None)
    return True
