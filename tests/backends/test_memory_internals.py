"""The MemoryBroker's internal bookkeeping, kept lean for many held sessions (issue #8).

These pin down the behaviour of the cheaper structures the broker uses in place of
general ones, where the public tests would not tell a subtle difference apart.
"""

from __future__ import annotations

import trio
import trio.testing

from trio_sessions.backends._memory import _Signal


async def test_signal_wakes_every_current_waiter() -> None:
    """set() wakes all tasks waiting at that moment, and only those."""
    signal = _Signal()
    woken: list[int] = []

    async def waiter(n: int) -> None:
        await signal.wait()
        woken.append(n)

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(waiter, n)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []
        assert signal.waiting() == 3
        signal.set()
        assert signal.waiting() == 0
    assert sorted(woken) == [0, 1, 2]


async def test_signal_does_not_remember_a_set_nobody_waited_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A set() with no waiter is not kept: a later wait waits for the next set()."""
    signal = _Signal()
    signal.set()
    with trio.move_on_after(1) as scope:
        await signal.wait()
    assert scope.cancelled_caught
    assert signal.waiting() == 0


async def test_signal_forgets_a_cancelled_waiter() -> None:
    """A wait that is cancelled leaves nothing behind for the next set() to wake."""
    signal = _Signal()
    woken = []

    async def waiter() -> None:
        await signal.wait()
        woken.append(True)

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()

            async def cancelled_waiter() -> None:
                with trio.CancelScope() as inner:
                    inner.cancel()
                    await signal.wait()

            await cancelled_waiter()
        assert not scope.cancelled_caught
        signal.set()  # wakes the one real waiter; the cancelled one is gone
    assert woken == [True]
    assert signal.waiting() == 0
