"""Review tests for the issue-#8 actor changes (virtual time, MemoryBroker)."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from trio_sessions import (
    ErrorContext,
    MemoryBroker,
    Message,
    ReceivedMessage,
    ServiceBusConnectionError,
    SessionContext,
    SessionLockLostError,
    SessionManager,
    SessionManagerOptions,
    open_session_manager,
)
from trio_sessions._options import RetryPolicy

Q = "q"


def _holders(ids: list[int]) -> list[str]:
    """What still refers to the `ReceivedMessage` objects whose ids are given: coroutines
    and frames, directly or through a list, and any other object by its type."""
    gc.collect()
    found: list[str] = []
    for obj in gc.get_objects():
        if not (isinstance(obj, ReceivedMessage) and id(obj) in ids):
            continue
        for ref in gc.get_referrers(obj):
            if hasattr(ref, "cr_code"):
                found.append(f"coroutine {ref.cr_code.co_name}")
            elif isinstance(ref, list):
                for holder in gc.get_referrers(ref):
                    if hasattr(holder, "cr_code"):
                        found.append(f"list held by coroutine {holder.cr_code.co_name}")
                    elif type(holder).__name__ == "frame":
                        found.append(f"list in frame {holder.f_code.co_name}")
            else:
                found.append(type(ref).__name__)
    return found


async def test_a_renewal_after_the_safe_deadline_is_still_a_lock_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Lock 60 s: renewal due at 50 fails (transient), retried at 55.5; the safe deadline
    (55) cancels the handler, whose shielded cleanup runs to 56. The retry succeeds during
    the cleanup and moves the lock deadline: the handler was cancelled by the lock, and
    that is still reported as a lock loss (not read as an idle close)."""
    broker = MemoryBroker()
    broker.create_queue(Q, requires_session=True, lock_duration=60)
    await broker.send(Q, [Message("m0", session_id="a")])
    broker.fail_next("renew_lock", ServiceBusConnectionError("flaky"))
    errors: list[ErrorContext] = []
    cancelled_at: list[float] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.delivery_count > 1:
            return
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled_at.append(trio.current_time())
            with trio.CancelScope(shield=True):
                await trio.sleep(1)  # cleanup
            raise

    async def on_error(context: ErrorContext) -> None:
        errors.append(context)

    options = SessionManagerOptions(
        session_idle_timeout=1,
        retry=RetryPolicy(initial_delay=5.5, multiplier=1, jitter=0),
    )
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        with trio.move_on_after(200):
            await manager.subscribe(handle, process_error=on_error)
    assert cancelled_at, "handler was cancelled by the lock's safe deadline"
    assert any(isinstance(e.error, SessionLockLostError) for e in errors), (
        "handler cancelled by the lock deadline, but no lock loss was reported"
    )


async def _holders_while_idle(
    subscribe: Callable[[SessionManager, list[int]], Awaitable[None]],
) -> tuple[MemoryBroker, list[str]]:
    """Run ``subscribe(manager, seen)`` on one session with one message; 5 s later, with
    the session idle (idle timeout 100), what still holds the messages ``seen`` lists."""
    broker = MemoryBroker()
    broker.create_queue(Q, requires_session=True)
    await broker.send(Q, [Message("m0", session_id="a")])
    seen: list[int] = []
    holders: list[str] = []

    async def probe() -> None:
        await trio.sleep(5)
        holders.extend(_holders(seen))
        manager.stop()

    options = SessionManagerOptions(session_idle_timeout=100)
    async with open_session_manager(broker, queue_name=Q, options=options) as manager:
        async with trio.open_nursery() as n:
            n.start_soon(probe)
            await subscribe(manager, seen)
    return broker, holders


async def test_an_idle_session_holds_no_settled_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After one message is handled and settled, the session waits idle; the message
    is not kept alive by the waiting actor (no local of the inline loop holds it)."""

    async def subscribe(manager: SessionManager, seen: list[int]) -> None:
        async def handle(message: ReceivedMessage, context: SessionContext) -> None:
            seen.append(id(message))

        await manager.subscribe(handle)

    broker, holders = await _holders_while_idle(subscribe)
    assert broker.active_message_count(Q) == 0
    assert not holders, f"idle session still references its settled message: {holders}"


async def test_the_actor_form_holds_no_settled_message_while_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Same for the actor form: next_message holds no settled message through the wait."""

    async def subscribe(manager: SessionManager, seen: list[int]) -> None:
        async def session(context: SessionContext) -> None:
            async for message in context:
                seen.append(id(message))
                del message

        await manager.subscribe_sessions(session)

    _, holders = await _holders_while_idle(subscribe)
    assert not holders, f"idle session still references its settled message: {holders}"
