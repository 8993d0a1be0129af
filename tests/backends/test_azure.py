"""What only the Azure backend has: connection strings, the bridge, cancellation, errors.

Everything runs the real azure-servicebus asyncio SDK against the emulator over loopback
(real time), except the connection-string checks, which make no connection at all.
"""

from __future__ import annotations

import functools
import socket
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
import trio_asyncio
from azure.servicebus.aio import ServiceBusReceiver, ServiceBusSession

from trio_sessions import (
    AuthenticationError,
    AzureServiceBus,
    ErrorContext,
    ErrorSource,
    MemoryBroker,
    Message,
    MessageSizeExceededError,
    OperationTimeoutError,
    ReceivedMessage,
    RetryPolicy,
    ServiceBusConnectionError,
    SessionCannotBeLockedError,
    SessionContext,
    SessionLockLostError,
    SessionManagerOptions,
    open_session_manager,
)
from trio_sessions._messages import Complete, EntityPath
from trio_sessions.backends import _azure
from trio_sessions.backends._azure import _body_bytes, _property_value, parse_connection_string
from trio_sessions.emulator import Emulator, serve_emulator

Q = "q"
KEY = "s3cr3t-key-value"
GOOD = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen;SharedAccessKey=" + KEY


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    broker = MemoryBroker(record_completed=True)
    broker.create_queue(Q, lock_duration=4.0)
    async with serve_emulator(broker, key=KEY) as emulator:
        yield emulator


def receivers(emulator: Emulator) -> int:
    """How many receiver links the emulator serves now."""
    return sum(len(connection._receivers) for connection in emulator._connections)


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (a bounded time) until the emulator has caught up with what the client did."""
    with trio.fail_after(10):
        while not condition():
            await trio.testing.wait_all_tasks_blocked(0.01)


# ------------------------------------------------------------------------- connection strings


@pytest.mark.parametrize(
    ("conn_str", "names"),
    [
        ("", "empty"),
        ("SharedAccessKeyName=a;SharedAccessKey=b", "no Endpoint part"),
        ("Endpoint=https://ns/;SharedAccessKeyName=a;SharedAccessKey=b", "sb://<host>/"),
        ("Endpoint=sb://;SharedAccessKeyName=a;SharedAccessKey=b", "sb://<host>/"),
        ("Endpoint=sb://ns/;SharedAccessKey=" + KEY, "no SharedAccessKeyName part"),
        ("Endpoint=sb://ns/;SharedAccessKeyName=a", "no SharedAccessKey part"),
        ("Endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=", "no SharedAccessKey part"),
        ("Endpoint=sb://ns/;SharedAccessSignature=", "SharedAccessSignature part is empty"),
        ("Endpoint=sb://ns/;junk;SharedAccessKey=" + KEY, "without 'name=value'"),
        (GOOD + ";UseDevelopmentEmulator=maybe", "'true' or 'false'"),
    ],
)
def test_malformed_connection_strings(conn_str: str, names: str) -> None:
    """A malformed string raises ValueError naming the bad part, and never shows the key."""
    with pytest.raises(ValueError, match=names) as caught:
        AzureServiceBus.from_connection_string(conn_str)
    assert KEY not in str(caught.value)


def test_connection_string_parts() -> None:
    """A good string is accepted with or without the emulator flag, a port, or a SAS token."""
    assert parse_connection_string(GOOD)["host"] == "ns.servicebus.windows.net"
    parts = parse_connection_string(
        "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=a;SharedAccessKey=b;"
        "UseDevelopmentEmulator=true"
    )
    assert parts["host"] == "127.0.0.1:5672"
    sas = "Endpoint=sb://ns/;SharedAccessSignature=SharedAccessSignature sr=x&sig=y&se=1"
    assert parse_connection_string(sas)["sharedaccesssignature"].startswith("SharedAccess")
    backend = AzureServiceBus.from_connection_string(GOOD)
    assert backend.fully_qualified_namespace == "ns.servicebus.windows.net"
    assert KEY not in repr(backend)
    with pytest.raises(TypeError, match="must be a str"):
        parse_connection_string(None)


@pytest.mark.parametrize("namespace", ["", "sb://ns.servicebus.windows.net", "ns/queue", 3])
def test_bad_namespace(namespace: Any) -> None:
    """The namespace must be a bare host name."""
    with pytest.raises(ValueError, match="fully_qualified_namespace"):
        AzureServiceBus(namespace, credential=object())


async def test_not_open() -> None:
    """Using the backend outside its async with block says how to open it."""
    backend = AzureServiceBus.from_connection_string(GOOD)
    with pytest.raises(RuntimeError, match="async with"):
        await backend.send(Q, Message("x", session_id="s"))
    with pytest.raises(RuntimeError, match="async with"):
        await backend.accept_session(EntityPath(Q))


# --------------------------------------------------------------------------- conversions


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"x", b"x"),
        ("\u00e9", "\u00e9".encode()),
        (None, b""),
        (iter([b"a", bytearray(b"b")]), b"ab"),  # data sections, as the SDK yields them
        (7, b"7"),  # an AMQP value body
        ([1, 2], b"[1, 2]"),  # an AMQP sequence body
    ],
)
def test_bodies_become_bytes(body: object, expected: bytes) -> None:
    """Data, value and sequence bodies all reach handlers as bytes."""
    assert _body_bytes(types.SimpleNamespace(body=body)) == expected


def test_property_values() -> None:
    """pyamqp's bytes strings come back as str; binary that is not text stays bytes."""
    assert _property_value(b"edit") == "edit"
    assert _property_value(b"\xff\x00") == b"\xff\x00"
    assert _property_value(3) == 3


# -------------------------------------------------------------------------------- the loop


async def test_reuses_a_running_loop(emulator: Emulator) -> None:
    """Inside an application's own trio-asyncio loop, the backend uses that loop."""
    async with trio_asyncio.open_loop() as loop:
        async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
            assert sb._loop is loop
            await sb.send(Q, Message("x", session_id="s"))
        assert not loop.is_closed()
    assert emulator.broker.active_message_count(Q) == 1


async def test_body_errors_leave_as_themselves(emulator: Emulator) -> None:
    """An exception raised in the block leaves it as itself, not in an ExceptionGroup."""
    with pytest.raises(KeyError, match="mine"):
        async with AzureServiceBus.from_connection_string(emulator.connection_string):
            raise KeyError("mine")
    await eventually(lambda: emulator.connections == 0)


async def test_closing_closes_everything(emulator: Emulator) -> None:
    """Leaving the block closes open links, senders and the client; the sessions unlock."""
    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        await sb.send(Q, [Message("a", session_id="s"), Message("b", session_id="t")])
        link = await sb.accept_session(EntityPath(Q), "s", max_wait_time=5)
        assert link.session_id == "s"
        assert emulator.broker.locked_sessions(Q) == ["s"]
    await eventually(lambda: emulator.connections == 0)
    assert emulator.broker.locked_sessions(Q) == []
    async with sb:
        with pytest.raises(RuntimeError, match="already open"):
            await sb.__aenter__()


# -------------------------------------------------------------------------- cancellation


async def test_cancelled_accept_detaches_its_link(emulator: Emulator) -> None:
    """Cancelling a task waiting in accept cancels the SDK call; the link is gone."""
    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        with trio.move_on_after(0.3) as scope:
            await sb.accept_session(EntityPath(Q), max_wait_time=30)
        assert scope.cancelled_caught
        await eventually(lambda: receivers(emulator) == 0 and emulator.connections == 0)


async def test_cancelled_receive_is_prompt_and_the_link_stays(emulator: Emulator) -> None:
    """A cancelled receive returns at once; the link still settles, then closes cleanly."""
    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        await sb.send(Q, Message("a", session_id="s"))
        link = await sb.accept_session(EntityPath(Q), "s", max_wait_time=5)
        (message,) = await link.receive(1)
        with trio.move_on_after(0.05) as scope:
            await link.receive(1)
        assert scope.cancelled_caught
        await link.complete(message)
        assert emulator.broker.active_message_count(Q) == 0
        await link.aclose()
        await eventually(lambda: receivers(emulator) == 0)
        assert emulator.broker.locked_sessions(Q) == []


async def test_cancelling_subscribe_releases_every_session(emulator: Emulator) -> None:
    """Cancelling the manager's task closes every SDK receiver; sessions come back."""
    started = trio.Event()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        started.set()
        await trio.sleep_forever()

    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        await sb.send(Q, [Message(f"{i}", session_id=f"s{i}") for i in range(3)])
        options = SessionManagerOptions(accept_timeout=1, shutdown_timeout=0.2)
        async with open_session_manager(sb, queue_name=Q, options=options) as manager:
            with trio.move_on_after(20) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(manager.subscribe, handle)
                    await started.wait()
                    nursery.cancel_scope.cancel()
            assert not scope.cancelled_caught
        await eventually(lambda: receivers(emulator) == 0)
    assert emulator.broker.locked_sessions(Q) == []
    assert emulator.broker.active_message_count(Q) == 3


async def test_no_receiver_is_used_by_two_tasks_at_once(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Receives, settlements, renewals and state calls on one SDK receiver never overlap."""
    in_flight: dict[int, int] = {}
    peak = 0

    def exclusive(method: Callable[..., Awaitable[Any]], owner: Callable[[Any], object]) -> Any:
        @functools.wraps(method)
        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal peak
            key = id(owner(self))
            in_flight[key] = in_flight.get(key, 0) + 1
            peak = max(peak, in_flight[key])
            try:
                return await method(self, *args, **kwargs)
            finally:
                in_flight[key] -= 1

        return wrapper

    for name in ("receive_messages", "complete_message", "abandon_message"):
        monkeypatch.setattr(
            ServiceBusReceiver, name, exclusive(getattr(ServiceBusReceiver, name), lambda r: r)
        )
    for name in ("renew_lock", "get_state", "set_state"):
        monkeypatch.setattr(
            ServiceBusSession,
            name,
            exclusive(getattr(ServiceBusSession, name), lambda s: s._receiver),
        )
    emulator.broker.create_queue("short", lock_duration=1.0)
    handled = 0
    done = trio.Event()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        nonlocal handled
        await context.set_state(message.body)
        await trio.sleep(0.05 if message.text().endswith("0") else 0)
        if message.delivery_count == 0 and message.text().endswith("3"):
            raise RuntimeError("abandon this one once")
        handled += 1
        if handled == 24:
            done.set()

    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        await sb.send("short", [Message(f"{i}", session_id=f"s{i % 2}") for i in range(24)])
        options = SessionManagerOptions(
            max_concurrent_calls_per_session=4, prefetch_count=2, session_idle_timeout=0.5
        )
        async with open_session_manager(sb, queue_name="short", options=options) as manager:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(manager.subscribe, handle)
                with trio.fail_after(30):
                    await done.wait()
                manager.stop()
    assert peak == 1
    assert emulator.broker.active_message_count("short") == 0


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)  # the SDK's cut socket
async def test_a_partition_keeps_locks_until_they_expire() -> None:
    """drop_connections(keep_locks=True): the cut client's session stays locked until its
    lock duration runs out, as Service Bus keeps a vanished client's lock."""
    broker = MemoryBroker()
    broker.create_queue("short", lock_duration=1.0)
    async with serve_emulator(broker) as emulator:
        async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
            await sb.send("short", Message("m", session_id="s"))
            link = await sb.accept_session(EntityPath("short"), "s", max_wait_time=5)
            (message,) = await link.receive(1)
            cut_at = trio.current_time()
            assert emulator.drop_connections(keep_locks=True) >= 1
            assert broker.locked_sessions("short") == ["s"]
            with pytest.raises(SessionCannotBeLockedError):
                await sb.accept_session(EntityPath("short"), "s", max_wait_time=0.2)
            with trio.fail_after(20):
                again = await sb.accept_session(EntityPath("short"), None, max_wait_time=10)
            assert trio.current_time() - cut_at >= 0.5  # not before the lock ran out
            (redelivered,) = await again.receive(1)
            assert (redelivered.message_id, redelivered.delivery_count) == (message.message_id, 1)
            await again.complete(redelivered)
    assert broker.active_message_count("short") == 0


async def test_a_lock_lost_unseen_never_overlaps_in_one_manager(emulator: Emulator) -> None:
    """The broker takes a lock while its handler runs (no I/O, so the SDK cannot see it)
    and gives the session to the same manager again: the old handler is cancelled before
    the new actor starts, so the two never run at once."""
    calls: list[tuple[int, float, float | None]] = []
    started = trio.Event()
    done = trio.Event()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        calls.append((message.delivery_count, trio.current_time(), None))
        index = len(calls) - 1
        try:
            if message.delivery_count == 0:
                started.set()
                await trio.sleep_forever()
            done.set()
        finally:
            count, start, _ = calls[index]
            calls[index] = (count, start, trio.current_time())

    errors: list[ErrorContext] = []

    async def on_error(context: ErrorContext) -> None:
        errors.append(context)

    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        await sb.send(Q, Message("m", session_id="s"))
        options = SessionManagerOptions(max_concurrent_sessions=2, accept_timeout=1)
        async with open_session_manager(sb, queue_name=Q, options=options) as manager:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(manager.subscribe, handle, process_error=on_error)
                )
                with trio.fail_after(30):
                    await started.wait()
                    emulator.broker.expire_session_lock(Q, "s")
                    await done.wait()
                manager.stop()
    (first, second) = calls
    assert (first[0], second[0]) == (0, 1)
    assert first[2] is not None
    assert first[2] <= second[1]  # the first ended before the second began
    assert any(isinstance(e.error, SessionLockLostError) for e in errors)
    assert emulator.broker.active_message_count(Q) == 0


async def test_a_transient_broker_error_is_an_error_reply(emulator: Emulator) -> None:
    """A transient failure in a $management request (here an injected one) reaches the
    caller as ServiceBusConnectionError; the connection and the session lock stay."""
    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        await sb.send(Q, Message("x", session_id="s"))
        link = await sb.accept_session(EntityPath(Q), "s", max_wait_time=5)
        connections = emulator.connections
        emulator.broker.fail_next("renew_lock", ServiceBusConnectionError)
        with pytest.raises(ServiceBusConnectionError):
            await link.renew_lock()
        assert await link.renew_lock() > trio.current_time()
        assert emulator.connections == connections
        assert emulator.broker.locked_sessions(Q) == ["s"]


# ----------------------------------------------------------------------------------- errors


async def test_wrong_key_is_fatal(emulator: Emulator) -> None:
    """A wrong key makes subscribe raise AuthenticationError, once, without the key in it."""
    wrong = emulator.connection_string.replace(KEY, "not-the-key")
    errors: list[ErrorContext] = []

    async def on_error(context: ErrorContext) -> None:
        errors.append(context)

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        raise AssertionError("never called")  # pragma: no cover

    async with AzureServiceBus.from_connection_string(wrong, retry_total=0) as sb:
        async with open_session_manager(sb, queue_name=Q) as manager:
            with trio.fail_after(20), pytest.raises(AuthenticationError) as caught:
                await manager.subscribe(handle, process_error=on_error)
    assert errors == []
    assert "not-the-key" not in str(caught.value)
    assert KEY not in str(caught.value)


async def test_unreachable_endpoint_is_retried_until_stop() -> None:
    """With nothing listening, accepts fail with ServiceBusConnectionError, reported and retried."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conn_str = (
        f"Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=k;SharedAccessKey=v;"
        "UseDevelopmentEmulator=true"
    )
    errors: list[ErrorContext] = []
    twice = trio.Event()

    async def on_error(context: ErrorContext) -> None:
        errors.append(context)
        if len(errors) >= 2:
            twice.set()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        raise AssertionError("never called")  # pragma: no cover

    retry = RetryPolicy(initial_delay=0.05, max_delay=0.1, jitter=0)
    options = SessionManagerOptions(max_concurrent_sessions=1, retry=retry)
    async with AzureServiceBus.from_connection_string(conn_str, retry_total=0) as sb:
        async with open_session_manager(sb, queue_name=Q, options=options) as manager:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(manager.subscribe, handle, process_error=on_error)
                )
                with trio.fail_after(20):
                    await twice.wait()
                manager.stop()
    assert all(isinstance(e.error, ServiceBusConnectionError) for e in errors)
    assert {e.source for e in errors} == {ErrorSource.ACCEPT_SESSION}
    assert manager.stats().errors == len(errors)


async def test_no_session_available_times_out(emulator: Emulator) -> None:
    """An accept that finds no session within max_wait_time raises OperationTimeoutError."""
    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        with trio.fail_after(20), pytest.raises(OperationTimeoutError):
            await sb.accept_session(EntityPath(Q), max_wait_time=0.2)
    await eventually(lambda: receivers(emulator) == 0)


async def test_send_rejects_what_is_not_a_message(emulator: Emulator) -> None:
    """send() takes Message objects and a queue or topic name."""
    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        with pytest.raises(TypeError, match="Message objects"):
            await sb.send(Q, ["text"])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="entity"):
            await sb.send("", Message("x", session_id="s"))
        await sb.send(Q, [])
        with pytest.raises(MessageSizeExceededError):
            await sb.send(Q, Message(b"x" * 300_000, session_id="s"))
    assert emulator.broker.active_message_count(Q) == 0


# ------------------------------------------------------------------- settle_and_receive


async def test_settle_and_receive_reports_before_it_waits(emulator: Emulator) -> None:
    """One call settles, reports the results while the receive still waits, then receives."""
    reports: list[tuple[list[BaseException | None], int]] = []
    settled = trio.Event()

    def on_settled(results: list[BaseException | None]) -> None:
        reports.append((results, emulator.broker.active_message_count(Q)))
        settled.set()

    got: list[ReceivedMessage] = []
    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        await sb.send(Q, Message("a", session_id="s"))
        link = await sb.accept_session(EntityPath(Q), "s", max_wait_time=5)
        (first,) = await link.receive(1)

        async def settle_and_receive() -> None:
            got.extend(await link.settle_and_receive([Complete(first)], on_settled, 1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(settle_and_receive)
            with trio.fail_after(10):
                await settled.wait()
            assert got == []  # still waiting for a message
            await sb.send(Q, Message("b", session_id="s"))
        assert reports == [([None], 0)]
        assert [m.text() for m in got] == ["b"]
        # With nothing to settle it is a receive; on_settled still hears of it.
        await sb.send(Q, Message("c", session_id="s"))
        (third,) = await link.settle_and_receive([], on_settled, 1)
        assert third.text() == "c"
        assert reports[-1] == ([], 2)


async def test_settle_and_receive_cancelled(emulator: Emulator) -> None:
    """A cancellation before the settlement is done lets it finish, then raises Cancelled;
    one during the receive cuts it at once. Either way the link stays usable."""
    reports: list[list[BaseException | None]] = []
    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        await sb.send(Q, [Message(f"{i}", session_id="s") for i in range(3)])
        link = await sb.accept_session(EntityPath(Q), "s", max_wait_time=5)
        (first,) = await link.receive(1)
        with trio.CancelScope() as scope:
            scope.cancel()  # before the call even starts
            await link.settle_and_receive([Complete(first)], reports.append, 1)
        assert scope.cancelled_caught
        assert reports == [[None]]
        assert [m.message_id for m in emulator.broker.completed_messages(Q)] == [first.message_id]
        (second,) = await link.receive(1)

        def cancel_at_once(results: list[BaseException | None]) -> None:
            reports.append(results)
            cut.cancel()  # the receive has not begun: it must not wait

        with trio.fail_after(10), trio.CancelScope() as cut:
            await link.settle_and_receive([Complete(second)], cancel_at_once, 1)
        assert cut.cancelled_caught
        assert reports == [[None], [None]]
        assert len(emulator.broker.completed_messages(Q)) == 2
        (third,) = await link.receive(1)
        await link.complete(third)
        await link.aclose()
    assert emulator.broker.active_message_count(Q) == 0


async def test_settle_and_receive_lock_lost(emulator: Emulator) -> None:
    """A settlement that finds the session lock gone makes the call raise it too."""
    reports: list[list[BaseException | None]] = []
    lost: list[SessionLockLostError] = []
    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        await sb.send(Q, [Message("a", session_id="s"), Message("b", session_id="s")])
        link = await sb.accept_session(EntityPath(Q), "s", max_wait_time=5)
        link.on_lock_lost(lost.append)
        (first,) = await link.receive(1)
        emulator.broker.expire_session_lock(Q, "s")
        with trio.fail_after(10), pytest.raises(SessionLockLostError) as caught:
            await link.settle_and_receive([Complete(first)], reports.append, 1)
    assert reports == [[caught.value]]
    assert lost == [caught.value]


async def test_settle_and_receive_is_preempted_by_a_renewal(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal while the combined call waits for messages goes first (the receive is cut,
    not waited out), and the call then carries on receiving."""
    monkeypatch.setattr(_azure, "RECEIVE_SLICE", 60.0)  # unpreempted, a renewal waits 60 s
    settled = trio.Event()
    got: list[ReceivedMessage] = []
    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        await sb.send(Q, Message("a", session_id="s"))
        link = await sb.accept_session(EntityPath(Q), "s", max_wait_time=5)
        (first,) = await link.receive(1)

        async def settle_and_receive() -> None:
            got.extend(await link.settle_and_receive([Complete(first)], lambda _: settled.set(), 1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(settle_and_receive)
            with trio.fail_after(20):
                await settled.wait()
                before = link.locked_until
                assert await link.renew_lock() >= before
            assert got == []
            await sb.send(Q, Message("b", session_id="s"))
    assert [m.text() for m in got] == ["b"]
    assert [m.message_id for m in emulator.broker.completed_messages(Q)] == [first.message_id]


async def test_settle_and_receive_until_a_deadline(emulator: Emulator) -> None:
    """With no message before the deadline, the call settles, then returns an empty list."""
    reports: list[list[BaseException | None]] = []
    async with AzureServiceBus.from_connection_string(emulator.connection_string) as sb:
        await sb.send(Q, Message("a", session_id="s"))
        link = await sb.accept_session(EntityPath(Q), "s", max_wait_time=5)
        (first,) = await link.receive(1)
        deadline = trio.current_time() + 0.2
        with trio.fail_after(10):
            got = await link.settle_and_receive([Complete(first)], reports.append, 1, deadline)
        assert got == []
        assert trio.current_time() >= deadline
        assert reports == [[None]]
        assert emulator.broker.active_message_count(Q) == 0
        await sb.send(Q, Message("b", session_id="s"))
        with trio.fail_after(10):
            (second,) = await link.settle_and_receive(
                [], reports.append, 1, trio.current_time() + 5
            )
        assert second.text() == "b"  # the link is as usable as before
