"""The contract suite: the same behaviours on every backend.

Each test runs on the MemoryBroker (in virtual time, under the autojump clock) and on
`AzureServiceBus` driving the real azure-servicebus asyncio SDK against the emulator
(real time, over loopback; the emulator serves a MemoryBroker, which the tests inspect).
Durations are short so that the Azure runs stay quick; the autojump clock makes them
instant on the MemoryBroker. With ``-m azure`` and ``SERVICEBUS_CONNECTION_STR`` set, the
suite also runs against a live namespace (see `tests/backends/test_live.py`).

Each test takes the ``clock`` fixture so that pytest-trio sees the MockClock (it only
looks at a test's own arguments); on the Azure backend ``clock`` is None.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trio_asyncio

from trio_sessions import (
    AzureServiceBus,
    EntityNotFoundError,
    ErrorContext,
    ErrorSource,
    MemoryBroker,
    Message,
    MessageNotFoundError,
    OperationTimeoutError,
    ReceivedMessage,
    ReceiveMode,
    SessionCannotBeLockedError,
    SessionContext,
    SessionLockLostError,
    SessionManager,
    SessionManagerOptions,
    SessionsNotEnabledError,
    open_session_manager,
)
from trio_sessions._messages import EntityPath
from trio_sessions.emulator import serve_emulator

#: Entity names; with ``-m azure`` they must exist in the live namespace (see
#: docs/howto/testing), and the environment can rename them.
Q = os.environ.get("TRIO_SESSIONS_TEST_QUEUE", "trio-sessions-contract")
PLAIN = os.environ.get("TRIO_SESSIONS_TEST_PLAIN_QUEUE", "trio-sessions-contract-plain")
TOPIC = os.environ.get("TRIO_SESSIONS_TEST_TOPIC", "trio-sessions-contract-topic")
SUB = os.environ.get("TRIO_SESSIONS_TEST_SUBSCRIPTION", "sessions")
#: The session entities' lock duration: short enough for real-time runs, long enough for
#: a loaded 2-core machine (a live namespace allows 5 s at the least).
LOCK = float(os.environ.get("TRIO_SESSIONS_TEST_LOCK_DURATION", "4"))
IDLE = 0.4
#: A ceiling on every test body: a hang fails at once under autojump, and in 60 s on Azure.
CEILING = 60
LIVE_CONN_STR = "SERVICEBUS_CONNECTION_STR"


@attrs.define
class Harness:
    """One backend under test, and a way to look at the entities behind it.

    On the MemoryBroker and the emulator, inspection reads the MemoryBroker; on a live
    namespace it goes through the SDK (peek, the dead-letter queue, session state), and
    what only a MemoryBroker can do (list locks, expire one) skips the test.
    """

    kind: str
    backend: Any
    broker: MemoryBroker | None
    sessions: set[str] = attrs.field(factory=set)

    async def send(self, *messages: Message, entity: str = Q) -> None:
        self.sessions.update(m.session_id for m in messages if m.session_id is not None)
        await self.backend.send(entity, list(messages))

    def locked_sessions(self, entity: str) -> list[str]:
        if self.broker is None:
            pytest.skip("a live namespace does not list session locks")
        return self.broker.locked_sessions(entity)

    def expire_session_lock(self, entity: str, session_id: str) -> None:
        if self.broker is None:
            pytest.skip("a live namespace has no fault injection")
        self.broker.expire_session_lock(entity, session_id)

    async def active_messages(self, entity: str) -> list[ReceivedMessage]:
        if self.broker is not None:
            return self.broker.active_messages(entity)
        found: list[ReceivedMessage] = []
        for session_id in sorted(self.sessions):
            found.extend(await _live_peek(self.backend, entity, session_id))
        return found

    async def active_message_count(self, entity: str) -> int:
        if self.broker is not None:
            return self.broker.active_message_count(entity)
        return len(await self.active_messages(entity))

    async def dead_letter_messages(self, entity: str) -> list[ReceivedMessage]:
        if self.broker is not None:
            return self.broker.dead_letter_messages(entity)
        return await _live_dead_letters(self.backend, entity)

    async def session_state(self, entity: str, session_id: str) -> bytes | None:
        if self.broker is not None:
            return self.broker.session_state(entity, session_id)
        link = await self.backend.accept_session(_entity(entity), session_id, max_wait_time=5)
        try:
            state: bytes | None = await link.get_state()
            return state
        finally:
            await link.aclose()


@pytest.fixture(params=["memory", "azure", pytest.param("live", marks=pytest.mark.azure)])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "live" and not os.environ.get(LIVE_CONN_STR):
        pytest.skip(f"set {LIVE_CONN_STR} to run the contract suite on a live namespace")
    return str(request.param)


@pytest.fixture
def clock(kind: str) -> trio.testing.MockClock | None:
    return trio.testing.MockClock(autojump_threshold=0) if kind == "memory" else None


@pytest.fixture
async def harness(kind: str) -> AsyncIterator[Harness]:
    if kind == "live":
        async with AzureServiceBus.from_connection_string(os.environ[LIVE_CONN_STR]) as sb:
            await _live_purge(sb)
            yield Harness(kind, sb, None)
        return
    broker = MemoryBroker()
    broker.create_queue(Q, lock_duration=LOCK, max_delivery_count=5)
    broker.create_queue(PLAIN, requires_session=False)
    broker.create_topic(TOPIC)
    broker.create_subscription(TOPIC, SUB, lock_duration=LOCK)
    if kind == "memory":
        yield Harness(kind, broker, broker)
        return
    async with serve_emulator(broker) as emulator:
        async with AzureServiceBus.from_connection_string(
            emulator.connection_string, retry_total=0
        ) as sb:
            yield Harness(kind, sb, broker)


# -- live-namespace inspection, through the SDK (only with -m azure) --------------------------


def _entity(path: str) -> EntityPath:
    topic, sep, sub = path.partition("/subscriptions/")
    return EntityPath(topic_name=topic, subscription_name=sub) if sep else EntityPath(path)


async def _live_peek(backend: Any, entity: str, session_id: str) -> list[ReceivedMessage]:
    """The messages left in one session of a live entity (peeked, not locked)."""
    from trio_sessions.backends._azure import _message_from_sdk

    try:
        link = await backend.accept_session(_entity(entity), session_id, max_wait_time=5)
    except OperationTimeoutError:
        return []
    try:
        raw = await backend._call(link._receiver.peek_messages, max_message_count=100)
        return [_message_from_sdk(m, None) for m in raw]
    finally:
        await link.aclose()


async def _live_dead_letters(backend: Any, entity: str) -> list[ReceivedMessage]:
    """A live entity's dead-letter queue, peeked."""
    from azure.servicebus import ServiceBusSubQueue

    from trio_sessions.backends._azure import _message_from_sdk

    client = backend._require_client()
    path = _entity(entity)
    if path.queue_name is not None:
        receiver = client.get_queue_receiver(
            path.queue_name, sub_queue=ServiceBusSubQueue.DEAD_LETTER
        )
    else:
        receiver = client.get_subscription_receiver(
            path.topic_name, path.subscription_name, sub_queue=ServiceBusSubQueue.DEAD_LETTER
        )
    async with trio_asyncio.aio_as_trio(receiver):
        raw = await backend._call(receiver.peek_messages, max_message_count=100)
    return [_message_from_sdk(m, None) for m in raw]


async def _live_purge(backend: Any) -> None:
    """Empty the live session entities and their dead-letter queues before a test."""
    from azure.servicebus import ServiceBusReceiveMode, ServiceBusSubQueue

    client = backend._require_client()
    for path in (Q, f"{TOPIC}/subscriptions/{SUB}"):
        while True:
            try:
                link = await backend.accept_session(
                    _entity(path),
                    None,
                    receive_mode=ReceiveMode.RECEIVE_AND_DELETE,
                    max_wait_time=2,
                )
            except OperationTimeoutError:
                break
            try:
                with trio.move_on_after(2):
                    while await link.receive(100):
                        pass
                await link.set_state(None)
            finally:
                await link.aclose()
        link = await backend.accept_session(_entity(path), "s", max_wait_time=5)
        try:
            await link.set_state(None)  # the state test starts from none
        finally:
            await link.aclose()
        entity = _entity(path)
        if entity.queue_name is not None:
            dlq = client.get_queue_receiver(
                entity.queue_name,
                sub_queue=ServiceBusSubQueue.DEAD_LETTER,
                receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE,
            )
        else:
            dlq = client.get_subscription_receiver(
                entity.topic_name,
                entity.subscription_name,
                sub_queue=ServiceBusSubQueue.DEAD_LETTER,
                receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE,
            )
        async with trio_asyncio.aio_as_trio(dlq):
            while await backend._call(dlq.receive_messages, max_message_count=100, max_wait_time=1):
                pass


def opts(**kwargs: Any) -> SessionManagerOptions:
    base: dict[str, Any] = {"session_idle_timeout": IDLE, "accept_timeout": 1.0}
    return SessionManagerOptions(**{**base, **kwargs})


class Errors:
    """Collects what process_error is given."""

    def __init__(self) -> None:
        self.seen: list[ErrorContext] = []
        self.changed = trio.Event()

    async def __call__(self, context: ErrorContext) -> None:
        self.seen.append(context)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, kind: type[BaseException]) -> ErrorContext:
        while True:
            for context in self.seen:
                if isinstance(context.error, kind):
                    return context
            await self.changed.wait()


class Until:
    """Counts handled messages; ``reached`` is set once ``n`` were seen."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen: list[ReceivedMessage] = []
        self.reached = trio.Event()

    def add(self, message: ReceivedMessage) -> None:
        self.seen.append(message)
        if len(self.seen) >= self.n:
            self.reached.set()


@asynccontextmanager
async def running(
    harness: Harness,
    handler: Callable[[ReceivedMessage, SessionContext], Awaitable[None]],
    options: SessionManagerOptions,
    errors: Errors | None = None,
    *,
    closed: trio.Event | None = None,
    **manager_kwargs: Any,
) -> AsyncIterator[SessionManager]:
    """A manager subscribed with ``handler`` for the block; stopped when it ends.

    ``closed``, if given, is set when a session closes.
    """
    callbacks: dict[str, Any] = {}
    if closed is not None:

        async def session_closing(context: SessionContext) -> None:
            closed.set()

        callbacks["session_closing"] = session_closing
    if "queue_name" not in manager_kwargs and "topic_name" not in manager_kwargs:
        manager_kwargs["queue_name"] = Q
    with trio.fail_after(CEILING):
        async with open_session_manager(harness.backend, options=options, **manager_kwargs) as m:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(m.subscribe, handler, process_error=errors, **callbacks)
                )
                yield m
                m.stop()


async def test_sessions_in_order_each_completed_once(harness: Harness, clock: object) -> None:
    """Every message is handled once, in send order within its session, and completed."""
    await harness.send(*(Message(f"{i}", session_id=f"s{i % 3}") for i in range(12)))
    done = Until(12)
    held: list[int] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        assert message.session_id == context.session_id
        if harness.broker is not None:
            held.append(len(harness.broker.locked_sessions(Q)))
        done.add(message)

    async with running(harness, handle, opts(max_concurrent_sessions=2)) as manager:
        await done.reached.wait()
    by_session: dict[str, list[int]] = {}
    for message in done.seen:
        assert message.session_id is not None
        by_session.setdefault(message.session_id, []).append(int(message.text()))
    assert by_session == {f"s{k}": [i for i in range(12) if i % 3 == k] for k in range(3)}
    assert all(m.delivery_count == 0 for m in done.seen)
    assert max(held, default=0) <= 2
    assert await harness.active_message_count(Q) == 0
    stats = manager.stats()
    assert stats.messages_completed == 12
    assert stats.sessions_accepted >= 3


async def test_message_fields_round_trip(harness: Harness, clock: object) -> None:
    """Body, ids, content type, subject and application properties reach the handler."""
    await harness.send(
        Message(
            b"\x00body",
            session_id="s",
            message_id="m-1",
            application_properties={"kind": "edit", "n": 7, "ok": True},
            content_type="application/octet-stream",
            correlation_id="c-1",
            subject="edits",
            to="doc-service",
            reply_to="replies",
            reply_to_session_id="r-1",
            time_to_live=3600,
        )
    )
    done = Until(1)

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        done.add(message)

    async with running(harness, handle, opts()):
        await done.reached.wait()
    (message,) = done.seen
    assert message.body == b"\x00body"
    assert (message.session_id, message.message_id) == ("s", "m-1")
    assert message.application_properties == {"kind": "edit", "n": 7, "ok": True}
    assert message.content_type == "application/octet-stream"
    assert (message.correlation_id, message.subject) == ("c-1", "edits")
    assert (message.to, message.reply_to, message.reply_to_session_id) == (
        "doc-service",
        "replies",
        "r-1",
    )
    assert message.time_to_live == 3600
    assert message.sequence_number > 0
    assert message.enqueued_time.tzinfo is not None
    assert message.locked_until is not None
    assert message.locked_until.tzinfo is not None
    assert message.lock_token
    if harness.kind == "azure":
        assert message.raw is not None


async def test_raising_handler_abandons_and_redelivers(harness: Harness, clock: object) -> None:
    """A handler that raises abandons the message; it comes back first, delivery_count + 1."""
    await harness.send(Message("a", session_id="s"), Message("b", session_id="s"))
    done = Until(3)
    errors = Errors()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        done.add(message)
        if message.text() == "a" and message.delivery_count == 0:
            raise RuntimeError("first try fails")

    async with running(harness, handle, opts(), errors) as manager:
        await done.reached.wait()
    assert [(m.text(), m.delivery_count) for m in done.seen] == [("a", 0), ("a", 1), ("b", 0)]
    (error,) = errors.seen
    assert error.source is ErrorSource.PROCESS_MESSAGE
    assert (error.session_id, error.entity_path) == ("s", Q)
    assert manager.stats().messages_abandoned == 1
    assert manager.stats().handler_errors == 1
    assert await harness.active_message_count(Q) == 0


async def test_dead_letter_and_defer(harness: Harness, clock: object) -> None:
    """dead_letter keeps reason and description; a deferred message is received by number."""
    await harness.send(
        Message("poison", session_id="s"),
        Message("later", session_id="s"),
        Message("now", session_id="s"),
    )
    done = Until(3)
    deferred: list[int] = []
    late: list[str] = []
    missing: list[BaseException] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.text() == "poison":
            await context.dead_letter(message, reason="bad", error_description="unparseable")
        elif message.text() == "later":
            await context.defer(message)
            deferred.append(message.sequence_number)
        else:
            (again,) = await context.receive_deferred_messages(deferred)
            late.append(again.text())
            await context.complete(again)
            try:
                await context.receive_deferred_messages([10**9])
            except MessageNotFoundError as exc:
                missing.append(exc)
        done.add(message)

    async with running(harness, handle, opts(max_concurrent_sessions=1)) as manager:
        await done.reached.wait()
    assert late == ["later"]
    assert len(missing) == 1
    (dead,) = await harness.dead_letter_messages(Q)
    assert dead.text() == "poison"
    assert (dead.dead_letter_reason, dead.dead_letter_error_description) == ("bad", "unparseable")
    assert await harness.active_message_count(Q) == 0
    stats = manager.stats()
    assert (stats.messages_dead_lettered, stats.messages_deferred) == (1, 1)


async def test_session_state(harness: Harness, clock: object) -> None:
    """State set in a handler survives the lock; the manager reads and writes it by id."""
    await harness.send(Message("x", session_id="s"))
    done = Until(1)
    before: list[bytes | None] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        before.append(await context.get_state())
        await context.set_state(b"seen x")
        done.add(message)

    async with running(harness, handle, opts()) as manager:
        await done.reached.wait()
    assert before == [None]
    async with open_session_manager(harness.backend, queue_name=Q, options=opts()) as manager:
        with trio.fail_after(CEILING):
            assert await manager.get_state("s") == b"seen x"
            await manager.set_state("s", "next")
            assert await manager.get_state("s") == b"next"
    assert await harness.session_state(Q, "s") == b"next"


async def test_state_of_a_session_held_elsewhere(harness: Harness, clock: object) -> None:
    """get_state on a session another receiver holds raises SessionCannotBeLockedError."""
    other = await harness.backend.accept_session(_entity(Q), "busy", max_wait_time=1.0)
    try:
        async with open_session_manager(
            harness.backend, queue_name=Q, options=opts(accept_timeout=0.5)
        ) as manager:
            with trio.fail_after(CEILING), pytest.raises(SessionCannotBeLockedError):
                await manager.get_state("busy")
    finally:
        await other.aclose()


async def _settled(manager: SessionManager) -> None:
    """Wait until the manager holds no session (its closing callback ran already)."""
    with trio.fail_after(CEILING):
        while manager.stats().active_sessions:
            await trio.testing.wait_all_tasks_blocked(0.01)


async def test_quiet_session_is_released(harness: Harness, clock: object) -> None:
    """After session_idle_timeout without messages, the lock is given back."""
    await harness.send(Message("only", session_id="s"))
    done = Until(1)

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        done.add(message)

    closed = trio.Event()
    async with running(harness, handle, opts(), closed=closed) as manager:
        await done.reached.wait()
        await closed.wait()
        await _settled(manager)
        assert manager.stats().active_sessions == 0
        assert harness.locked_sessions(Q) == []


async def test_lock_is_renewed_while_a_handler_runs(harness: Harness, clock: object) -> None:
    """A handler longer than the lock keeps it: the actor renews it in time."""
    await harness.send(Message("slow", session_id="s"))
    done = Until(1)
    renewed: list[bool] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        first = context.locked_until
        await trio.sleep(LOCK * 1.5)
        renewed.append(context.locked_until > first)
        done.add(message)

    errors = Errors()
    async with running(harness, handle, opts(), errors) as manager:
        await done.reached.wait()
    assert renewed == [True]
    assert errors.seen == []
    assert manager.stats().lock_renewals >= 1
    assert manager.stats().messages_completed == 1
    assert await harness.active_message_count(Q) == 0


async def test_lock_loss_is_reported_and_the_message_redelivered(
    harness: Harness, clock: object
) -> None:
    """A lock the broker takes away is reported once; the message comes back, count + 1."""
    await harness.send(Message("m", session_id="s"))
    done = Until(2)
    started = trio.Event()
    go = trio.Event()

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        done.add(message)
        if message.delivery_count == 0:
            started.set()
            await go.wait()

    errors = Errors()
    async with running(harness, handle, opts(), errors) as manager:
        await started.wait()
        harness.expire_session_lock(Q, "s")
        go.set()
        lost = await errors.wait_for(SessionLockLostError)
        await done.reached.wait()
    assert lost.session_id == "s"
    assert lost.source in (ErrorSource.RENEW_LOCK, ErrorSource.COMPLETE)
    assert [m.delivery_count for m in done.seen] == [0, 1]
    assert sum(isinstance(e.error, SessionLockLostError) for e in errors.seen) == 1
    assert manager.stats().messages_completed == 1
    assert await harness.active_message_count(Q) == 0


async def test_session_ids_only(harness: Harness, clock: object) -> None:
    """With session_ids, only those sessions are read."""
    await harness.send(Message("a", session_id="a"), Message("b", session_id="b"))
    done = Until(1)

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        done.add(message)

    async with running(harness, handle, opts(session_ids=["b"])):
        await done.reached.wait()
    assert [m.session_id for m in done.seen] == ["b"]
    assert [m.session_id for m in await harness.active_messages(Q)] == ["a"]


async def test_receive_and_delete(harness: Harness, clock: object) -> None:
    """In RECEIVE_AND_DELETE mode messages are gone on receipt, even if the handler raises."""
    await harness.send(Message("a", session_id="s"), Message("b", session_id="s"))
    done = Until(2)

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        done.add(message)
        raise RuntimeError("not redelivered")

    errors = Errors()
    async with running(
        harness, handle, opts(), errors, receive_mode=ReceiveMode.RECEIVE_AND_DELETE
    ):
        await done.reached.wait()
    assert [m.text() for m in done.seen] == ["a", "b"]
    assert await harness.active_message_count(Q) == 0


async def test_concurrent_calls_and_prefetch(harness: Harness, clock: object) -> None:
    """Several calls per session with prefetch: everything is completed exactly once."""
    await harness.send(*(Message(f"{i}", session_id=f"s{i % 2}") for i in range(20)))
    done = Until(20)
    in_flight = 0
    peak = 0

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await trio.sleep(0.01)
        in_flight -= 1
        done.add(message)

    options = opts(max_concurrent_calls_per_session=3, prefetch_count=2)
    async with running(harness, handle, options) as manager:
        await done.reached.wait()
    assert sorted(int(m.text()) for m in done.seen) == list(range(20))
    assert peak <= 2 * 3
    assert manager.stats().messages_completed == 20
    assert await harness.active_message_count(Q) == 0


async def test_actor_form(harness: Harness, clock: object) -> None:
    """subscribe_sessions hands over whole sessions; iteration ends when they go idle."""
    await harness.send(*(Message(f"{i}", session_id=f"s{i % 2}") for i in range(6)))
    sessions: dict[str, list[str]] = {}
    finished = trio.Event()

    async def process_session(session: SessionContext) -> None:
        async for message in session:
            sessions.setdefault(session.session_id, []).append(message.text())
        if sum(map(len, sessions.values())) == 6:
            finished.set()

    with trio.fail_after(CEILING):
        async with open_session_manager(harness.backend, queue_name=Q, options=opts()) as m:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(m.subscribe_sessions, process_session)
                await finished.wait()
                m.stop()
    assert sessions == {"s0": ["0", "2", "4"], "s1": ["1", "3", "5"]}
    assert await harness.active_message_count(Q) == 0


async def test_topic_subscription(harness: Harness, clock: object) -> None:
    """A subscription's sessions are read like a queue's; its path is topic/subscriptions/sub."""
    await harness.send(Message("x", session_id="s"), entity=TOPIC)
    done = Until(1)
    paths: list[str] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        paths.append(context.entity_path)
        done.add(message)

    async with running(harness, handle, opts(), topic_name=TOPIC, subscription_name=SUB):
        await done.reached.wait()
    assert paths == [f"{TOPIC}/subscriptions/{SUB}"]
    assert await harness.active_message_count(f"{TOPIC}/subscriptions/{SUB}") == 0


async def test_stop_lets_in_flight_handlers_finish(harness: Harness, clock: object) -> None:
    """stop() stops accepting; a running handler finishes and its message is completed."""
    await harness.send(Message("a", session_id="s"), Message("b", session_id="s"))
    started = trio.Event()
    finished: list[str] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        started.set()
        await trio.sleep(0.2)
        finished.append(message.text())

    with trio.fail_after(CEILING):
        async with open_session_manager(harness.backend, queue_name=Q, options=opts()) as m:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(m.subscribe, handle)
                await started.wait()
                m.stop()
    assert finished == ["a"]
    assert [m.text() for m in await harness.active_messages(Q)] == ["b"]
    assert harness.locked_sessions(Q) == []


async def test_unknown_entity_is_fatal(harness: Harness, clock: object) -> None:
    """An entity that does not exist ends subscribe with EntityNotFoundError."""

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        raise AssertionError("never called")

    with trio.fail_after(CEILING):
        async with open_session_manager(harness.backend, queue_name="nope", options=opts()) as m:
            with pytest.raises(EntityNotFoundError):
                await m.subscribe(handle)


async def test_entity_without_sessions_is_fatal(harness: Harness, clock: object) -> None:
    """A queue without sessions ends subscribe with SessionsNotEnabledError."""

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        raise AssertionError("never called")

    with trio.fail_after(CEILING):
        async with open_session_manager(harness.backend, queue_name=PLAIN, options=opts()) as m:
            with pytest.raises(SessionsNotEnabledError):
                await m.subscribe(handle)


async def test_renewal_ends_and_the_session_is_released(harness: Harness, clock: object) -> None:
    """With max_auto_lock_renewal_duration=0 a quiet session is released before its lock lapses."""
    await harness.send(Message("a", session_id="s"))
    done = Until(1)

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        done.add(message)

    errors = Errors()
    options = opts(max_auto_lock_renewal_duration=0, session_idle_timeout=math.inf)
    closed = trio.Event()
    async with running(harness, handle, options, errors, closed=closed) as manager:
        await done.reached.wait()
        await closed.wait()
        await _settled(manager)
        assert harness.locked_sessions(Q) == []
    assert errors.seen == []
    assert manager.stats().lock_renewals == 0
