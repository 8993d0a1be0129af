"""The emulator's fault injection, seen by the real azure-servicebus sync client.

Each test runs the SDK in a worker thread with retries off (real time, short waits).
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing
from azure.servicebus import ServiceBusClient
from azure.servicebus import exceptions as sb_errors

from trio_sessions import MemoryBroker, Message
from trio_sessions.emulator import Emulator, serve_emulator

pytest.importorskip("proton")


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    broker = MemoryBroker()
    broker.create_queue("q", lock_duration=30)
    async with serve_emulator(broker) as running:
        yield running


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(fn, *args)


def client(emulator: Emulator) -> ServiceBusClient:
    return ServiceBusClient.from_connection_string(emulator.connection_string, retry_total=0)


# The SDK does not close its own socket when its connection is cut under it; the
# ResourceWarning for that client-side socket is the SDK's, not the emulator's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("by", ["container_id", "session_id"])
async def test_drop_one_chosen_connection(emulator: Emulator, by: str) -> None:
    """Only the chosen client loses its connection and its session; the other completes."""
    await emulator.broker.send("q", [Message("a", session_id="a"), Message("b", session_id="b")])
    holding = trio.Semaphore(0)
    go = trio.Event()

    def hold(name: str, session_id: str) -> str:
        with client(emulator) as sb:
            with sb.get_queue_receiver(
                "q", session_id=session_id, max_wait_time=1, client_identifier=name
            ) as receiver:
                [message] = receiver.receive_messages(max_wait_time=1)
                trio.from_thread.run_sync(holding.release)
                trio.from_thread.run(go.wait)
                try:
                    receiver.complete_message(message)
                except (sb_errors.ServiceBusConnectionError, sb_errors.SessionLockLostError) as exc:
                    return type(exc).__name__
                return "completed"

    outcomes: dict[str, str] = {}

    async def run(name: str, session_id: str) -> None:
        outcomes[name] = await in_thread(hold, name, session_id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "cut", "a")
        nursery.start_soon(run, "keep", "b")
        for _ in range(2):
            await holding.acquire()
        assert {"cut", "keep"} <= set(emulator.container_ids)
        nobody: dict[str, Any] = {by: "nobody"}
        chosen: dict[str, Any] = {by: "cut" if by == "container_id" else "a"}
        assert emulator.drop_connections(**nobody) == 0
        assert emulator.drop_connections(**chosen) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert emulator.broker.locked_sessions("q") == ["b"]
        assert "cut" not in emulator.container_ids
        go.set()
    assert outcomes["keep"] == "completed"
    assert outcomes["cut"] in {"ServiceBusConnectionError", "SessionLockLostError"}
    [back] = emulator.broker.active_messages("q")
    assert (back.text(), back.delivery_count) == ("a", 1)
    gc.collect()  # collect the SDK's leaked socket here, where its warning is expected


async def test_expired_session_lock_reaches_the_receiver(emulator: Emulator) -> None:
    """After broker.expire_session_lock, settling and receiving raise SessionLockLostError."""
    await emulator.broker.send("q", [Message("x", session_id="s"), Message("y", session_id="s")])

    def after_expiry() -> list[str]:
        outcomes = []
        with client(emulator) as sb:
            with sb.get_queue_receiver("q", session_id="s", max_wait_time=1) as receiver:
                [message] = receiver.receive_messages(max_wait_time=1)
                trio.from_thread.run_sync(emulator.broker.expire_session_lock, "q", "s")
                for operation in (
                    lambda: receiver.complete_message(message),
                    lambda: receiver.receive_messages(max_wait_time=1),
                ):
                    try:
                        operation()
                    except sb_errors.SessionLockLostError as exc:
                        outcomes.append(type(exc).__name__)
        return outcomes

    assert await in_thread(after_expiry) == ["SessionLockLostError"] * 2
    back = emulator.broker.active_messages("q")
    assert [(m.text(), m.delivery_count) for m in back] == [("x", 1), ("y", 0)]
    assert emulator.broker.locked_sessions("q") == []


async def test_delayed_replies(emulator: Emulator) -> None:
    """Delayed replies slow $management and deliveries; a timeout shorter than the delay
    gives the SDK's OperationTimeoutError, and the late reply harms nothing after."""
    delay = 0.5
    await emulator.broker.send("q", [Message("x", session_id="s")])

    def slow_session() -> list[Any]:
        with client(emulator) as sb:
            with sb.get_queue_receiver("q", session_id="s", max_wait_time=1) as receiver:
                trio.from_thread.run_sync(emulator.delay_replies, delay)
                start = time.monotonic()
                state = receiver.session.get_state()
                seen: list[Any] = [state, time.monotonic() - start >= delay]
                start = time.monotonic()
                [message] = receiver.receive_messages(max_wait_time=5)
                seen.append(time.monotonic() - start >= delay)
                try:
                    receiver.session.set_state("late", timeout=delay / 4)
                except sb_errors.OperationTimeoutError as exc:
                    seen.append(type(exc).__name__)
                trio.from_thread.run_sync(emulator.delay_replies, 0)
                seen.append(receiver.session.get_state())
                receiver.complete_message(message)
                return seen

    assert await in_thread(slow_session) == [None, True, True, "OperationTimeoutError", b"late"]
    assert emulator.broker.active_message_count("q") == 0


async def test_delay_replies_is_validated(emulator: Emulator) -> None:
    """A delay that is negative, infinite or not a number is refused, naming the argument."""
    for bad in (-1, float("inf"), float("nan"), "1", True):
        with pytest.raises(ValueError, match=r"seconds must be a finite number >= 0, got"):
            emulator.delay_replies(bad)  # type: ignore[arg-type]
