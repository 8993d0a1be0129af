"""Session receivers through the emulator, driven by the real azure-servicebus sync client.

Each test runs the SDK in a worker thread with retries off and short waits (real time).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing
from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusClient, ServiceBusReceiveMode
from azure.servicebus import exceptions as sb_errors

from trio_sessions import MemoryBroker, Message
from trio_sessions.emulator import Emulator, serve_emulator

pytest.importorskip("proton")


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    broker = MemoryBroker()
    broker.create_queue("q", lock_duration=30)
    broker.create_queue("plain", requires_session=False)
    async with serve_emulator(broker) as running:
        yield running


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(fn, *args)


def receive(
    conn_str: str,
    session_id: Any = NEXT_AVAILABLE_SESSION,
    settle: Callable[[Any, list[Any]], None] | None = None,
    **kwargs: Any,
) -> tuple[str, list[tuple[str, int | None, int | None]], Any]:
    """Open a session receiver, receive up to 10 messages, settle them, close."""
    with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
        with client.get_queue_receiver(
            "q", session_id=session_id, max_wait_time=1, **kwargs
        ) as receiver:
            messages = receiver.receive_messages(max_message_count=10, max_wait_time=1)
            if settle is not None:
                settle(receiver, messages)
            seen = [(str(m), m.delivery_count, m.sequence_number) for m in messages]
            return receiver.session.session_id, seen, receiver.session.locked_until_utc


async def send(emulator: Emulator, session_id: str, *bodies: str) -> None:
    await emulator.broker.send("q", [Message(body, session_id=session_id) for body in bodies])


async def test_next_available_session_in_order_then_complete(emulator: Emulator) -> None:
    """A receiver gets the oldest session's messages in order; completing removes them."""
    await send(emulator, "b", "b1")
    await send(emulator, "a", "a1", "a2")

    def complete_all(receiver: Any, messages: list[Any]) -> None:
        for message in messages:
            receiver.complete_message(message)

    session, seen, locked_until = await in_thread(
        receive, emulator.connection_string, NEXT_AVAILABLE_SESSION, complete_all
    )
    assert (session, seen) == ("b", [("b1", 0, 1)])
    assert locked_until is not None
    session, seen, _ = await in_thread(
        receive, emulator.connection_string, NEXT_AVAILABLE_SESSION, complete_all
    )
    assert (session, seen) == ("a", [("a1", 0, 2), ("a2", 0, 3)])
    assert emulator.broker.active_message_count("q") == 0
    assert emulator.broker.locked_sessions("q") == []


async def test_abandon_dead_letter_and_defer(emulator: Emulator) -> None:
    """Each link settlement reaches the broker; an abandoned message comes back counted."""
    await send(emulator, "s", "abandon", "dead", "defer")

    def settle(receiver: Any, messages: list[Any]) -> None:
        receiver.abandon_message(messages[0])
        receiver.dead_letter_message(messages[1], reason="bad", error_description="very bad")
        receiver.defer_message(messages[2])

    await in_thread(receive, emulator.connection_string, "s", settle)
    _, seen, _ = await in_thread(receive, emulator.connection_string, "s")
    assert seen == [("abandon", 1, 1)]
    [dead] = emulator.broker.dead_letter_messages("q")
    assert (dead.text(), dead.dead_letter_reason, dead.dead_letter_error_description) == (
        "dead",
        "bad",
        "very bad",
    )


async def test_closing_returns_unsettled_messages(emulator: Emulator) -> None:
    """Closing the receiver releases the session; unsettled messages come back counted."""
    await send(emulator, "s", "x")
    await in_thread(receive, emulator.connection_string, "s")
    assert emulator.broker.locked_sessions("q") == []
    [back] = emulator.broker.active_messages("q")
    assert back.delivery_count == 1


async def test_receive_and_delete(emulator: Emulator) -> None:
    """In RECEIVE_AND_DELETE mode messages are gone once delivered."""
    await send(emulator, "s", "x", "y")
    _, seen, _ = await in_thread(
        lambda: receive(
            emulator.connection_string, "s", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE
        )
    )
    assert [body for body, _, _ in seen] == ["x", "y"]
    assert emulator.broker.active_message_count("q") == 0


async def test_no_session_available_times_out(emulator: Emulator) -> None:
    """Next-available with nothing to offer ends in the SDK's OperationTimeoutError."""
    with pytest.raises(sb_errors.OperationTimeoutError):
        await in_thread(receive, emulator.connection_string)


async def test_session_locked_elsewhere(emulator: Emulator) -> None:
    """A session another receiver holds gives the SDK's SessionCannotBeLockedError."""
    from trio_sessions._messages import EntityPath

    holder = await emulator.broker.accept_session(EntityPath(queue_name="q"), "busy")
    with pytest.raises(sb_errors.SessionCannotBeLockedError):
        await in_thread(receive, emulator.connection_string, "busy")
    await holder.aclose()


async def test_session_receiver_on_a_plain_queue(emulator: Emulator) -> None:
    """A session receiver on an entity without sessions is refused with a ServiceBusError."""

    def open_plain() -> None:
        conn_str = emulator.connection_string
        with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            with client.get_queue_receiver("plain", session_id="s", max_wait_time=1) as receiver:
                receiver.receive_messages(max_wait_time=1)

    with pytest.raises(sb_errors.ServiceBusError, match="does not require sessions"):
        await in_thread(open_plain)


async def test_session_state_and_lock_renewal(emulator: Emulator) -> None:
    """get_state, set_state and renew_lock go through $management to the broker."""

    def use_session() -> list[Any]:
        conn_str = emulator.connection_string
        with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            with client.get_queue_receiver("q", session_id="s", max_wait_time=1) as receiver:
                session = receiver.session
                before = session.locked_until_utc
                assert before is not None
                seen: list[Any] = [session.get_state()]
                session.set_state("hello")
                seen.append(session.get_state())
                renewed = session.renew_lock()
                seen.append(renewed >= before and renewed == session.locked_until_utc)
                return seen

    assert await in_thread(use_session) == [None, b"hello", True]
    assert emulator.broker.session_state("q", "s") == b"hello"


async def test_management_after_lock_loss(emulator: Emulator) -> None:
    """A lock the broker took away makes renew_lock raise SessionLockLostError."""
    await send(emulator, "s", "x")

    def renew_after_loss() -> None:
        conn_str = emulator.connection_string
        with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            with client.get_queue_receiver("q", session_id="s", max_wait_time=1) as receiver:
                trio.from_thread.run_sync(emulator.broker.expire_session_lock, "q", "s")
                receiver.session.renew_lock()

    with pytest.raises(sb_errors.SessionLockLostError):
        await in_thread(renew_after_loss)
    [back] = emulator.broker.active_messages("q")
    assert back.body == b"x"


async def test_deferred_messages_by_sequence_number(emulator: Emulator) -> None:
    """Deferred messages come back by sequence number and settle through $management."""
    await send(emulator, "s", "later", "never")

    def defer_then_fetch() -> list[Any]:
        conn_str = emulator.connection_string
        with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            with client.get_queue_receiver("q", session_id="s", max_wait_time=1) as receiver:
                first, second = receiver.receive_messages(max_message_count=2, max_wait_time=1)
                receiver.defer_message(first)
                receiver.defer_message(second)
                assert first.sequence_number is not None
                [again] = receiver.receive_deferred_messages([first.sequence_number])
                receiver.complete_message(again)
                missing = ""
                try:
                    receiver.receive_deferred_messages([999])
                except sb_errors.MessageNotFoundError as exc:
                    missing = type(exc).__name__
                return [str(again), again.sequence_number, missing]

    assert await in_thread(defer_then_fetch) == ["later", 1, "MessageNotFoundError"]
    [left] = emulator.broker.active_messages("q")
    assert left.text() == "never"


# The SDK does not close its own socket when its connection is cut under it; the
# ResourceWarning for that client-side socket is the SDK's, not the emulator's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_dropped_connections_release_their_sessions(emulator: Emulator) -> None:
    """Cutting a client's connection frees its session at once and returns its messages."""
    await send(emulator, "s", "x")
    received = trio.Event()
    dropped = trio.Event()

    def hold_then_fail() -> str:
        conn_str = emulator.connection_string
        with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            with client.get_queue_receiver("q", session_id="s", max_wait_time=1) as receiver:
                [message] = receiver.receive_messages(max_message_count=1, max_wait_time=1)
                trio.from_thread.run_sync(received.set)
                trio.from_thread.run(dropped.wait)
                try:
                    receiver.complete_message(message)
                except (sb_errors.ServiceBusConnectionError, sb_errors.SessionLockLostError) as exc:
                    return type(exc).__name__
                return "completed"

    async with trio.open_nursery() as nursery:
        outcome: list[str] = []

        async def client() -> None:
            outcome.append(await in_thread(hold_then_fail))

        nursery.start_soon(client)
        await received.wait()
        assert emulator.broker.locked_sessions("q") == ["s"]
        assert emulator.drop_connections() >= 1
        await trio.testing.wait_all_tasks_blocked()
        assert emulator.broker.locked_sessions("q") == []
        [back] = emulator.broker.active_messages("q")
        assert back.delivery_count == 1
        dropped.set()
    assert outcome[0] in {"ServiceBusConnectionError", "SessionLockLostError"}
    gc.collect()  # collect the SDK's leaked socket here, where its warning is expected


async def test_receivers_without_sessions(emulator: Emulator) -> None:
    """A plain queue's receiver locks each message; settlement and renew-lock work."""
    await emulator.broker.send("plain", [Message(f"p{i}") for i in range(3)])

    def use_plain() -> list[Any]:
        conn_str = emulator.connection_string
        with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            with client.get_queue_receiver("plain", max_wait_time=1) as receiver:
                first, second, third = receiver.receive_messages(
                    max_message_count=3, max_wait_time=1
                )
                before = first.locked_until_utc
                assert before is not None
                renewed = receiver.renew_message_lock(first)
                extended = renewed >= before
                receiver.complete_message(first)
                receiver.abandon_message(second)
                receiver.dead_letter_message(third, reason="no")
                return [str(first), extended]

    assert await in_thread(use_plain) == ["p0", True]
    [back] = emulator.broker.active_messages("plain")
    assert (back.text(), back.delivery_count) == ("p1", 1)
    assert [m.dead_letter_reason for m in emulator.broker.dead_letter_messages("plain")] == ["no"]
