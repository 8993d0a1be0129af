"""When to renew a session lock, and when to give the session back.

Service Bus (like .NET's processor) renews a lock a margin before it expires: half the
lock duration, at most 10 seconds. Renewal goes on until ``max_auto_lock_renewal_duration``
after accept; after that the actor works on under the current lock and releases the
session once less than the margin is left, so a quiet session ends without error.
"""

from __future__ import annotations

import heapq
import math
import weakref
from typing import Protocol

import trio

__all__ = ["MAX_RENEWAL_MARGIN", "LockTimers", "next_lock_action", "renewal_margin"]

#: The largest margin kept before a lock expires (seconds), as .NET does.
MAX_RENEWAL_MARGIN = 10.0


def renewal_margin(lock_duration: float) -> float:
    """Seconds before expiry at which a lock of ``lock_duration`` seconds is renewed."""
    return min(lock_duration / 2, MAX_RENEWAL_MARGIN)


def next_lock_action(
    locked_until: float, lock_duration: float, give_up_at: float
) -> tuple[float, bool]:
    """Return ``(when, renew)``: renew the lock at ``when``, or (``renew`` False) release then.

    All times are Trio-clock deadlines; ``give_up_at`` is when renewal stops.
    """
    when = locked_until - renewal_margin(lock_duration)
    return when, when < give_up_at


class _TimerTarget(Protocol):
    def lock_timer_due(self) -> None: ...


class _Timer(weakref.ref):  # type: ignore[type-arg]
    """A heap entry: a weak reference to its actor that orders by when it is due.

    One object per entry, not a tuple of time, sequence number and reference (issue #8:
    that was 180 B per idle session, this is 100).
    """

    __slots__ = ("when",)

    def __new__(cls, target: _TimerTarget, when: float) -> _Timer:
        return super().__new__(cls, target)

    def __init__(self, target: _TimerTarget, when: float) -> None:
        # (weakref.ref's own __init__ only checks its arguments again: __new__ made it.)
        self.when = when

    def __lt__(self, other: _Timer) -> bool:
        return self.when < other.when


class LockTimers:
    """One task that holds the first lock timer of every session actor (internal).

    An actor's service task renews its lock; starting that task only when it is needed
    (the first command, or this timer) spares every short-lived or quiet session a
    second task (issue #8). The timer task lives in the supervisor nursery and ends when
    `finish` is called (accepting is over and no actor is left) or when it is cancelled.
    Entries hold their actors weakly: an actor that has ended is not kept alive until its
    timer is due (with many short sessions that would hold tens of thousands), and its
    entry then does nothing.
    """

    def __init__(self) -> None:
        self._heap: list[_Timer] = []
        self._scope: trio.CancelScope | None = None
        self._finished = False

    def schedule(self, target: _TimerTarget, when: float) -> None:
        """Call ``target.lock_timer_due()`` at Trio-clock time ``when``."""
        if when == math.inf:
            return
        heapq.heappush(self._heap, _Timer(target, when))
        if self._scope is not None and when < self._scope.deadline:
            self._scope.deadline = when

    def finish(self) -> None:
        """End the timer task: no actor can schedule a timer any more."""
        self._finished = True
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        """Fire the timers as they come due, until `finish`."""
        heap = self._heap
        while not self._finished:
            with trio.CancelScope(deadline=heap[0].when if heap else math.inf) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            while heap and heap[0].when <= now:
                target = heapq.heappop(heap)()
                if target is not None:
                    target.lock_timer_due()
