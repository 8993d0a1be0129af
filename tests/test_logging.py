"""What the library logs: session lifecycle at INFO, per-message events at DEBUG, errors."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from trio_sessions import (
    ErrorContext,
    MemoryBroker,
    Message,
    ReceivedMessage,
    ServiceBusConnectionError,
    SessionContext,
    SessionManagerOptions,
    open_session_manager,
)
from trio_sessions._redact import MASK

Q = "q"
KEY = "c2VjcmV0LWtleS1mb3ItbG9nLXRlc3Rz"
CONN_STR = f"Endpoint=sb://ns/;SharedAccessKeyName=k;SharedAccessKey={KEY}"


def sid(record: logging.LogRecord) -> str | None:
    """The record's ``session_id`` extra (every record of the library has one)."""
    value = record.__dict__["session_id"]
    assert value is None or isinstance(value, str)
    return value


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("trio_sessions")]


def closed_reasons(caplog: pytest.LogCaptureFixture) -> dict[str | None, str]:
    """session id → the reason in its "closed (...)" record."""
    return {
        sid(r): r.getMessage().rpartition("(")[2].rstrip(")")
        for r in ours(caplog)
        if " closed (" in r.getMessage()
    }


def test_library_logger_has_a_null_handler() -> None:
    """Importing the library configures no output, only a NullHandler on its top logger."""
    top = logging.getLogger("trio_sessions")
    assert any(isinstance(h, logging.NullHandler) for h in top.handlers)
    assert [type(h) for h in top.handlers] == [logging.NullHandler]


async def test_lifecycle_is_logged_at_info_with_the_session_id(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Accept and close (with the reason) at INFO; nothing per message at INFO."""
    broker = MemoryBroker()
    broker.create_queue(Q)
    for session_id in ("idle", "released", "stopped"):
        await broker.send(Q, Message(b"x", session_id=session_id))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if context.session_id == "released":
            context.release()
        if context.session_id == "stopped":
            await trio.sleep(100)  # still held when the manager stops

    options = SessionManagerOptions(session_idle_timeout=5, shutdown_timeout=200)
    with caplog.at_level(logging.INFO, logger="trio_sessions"):
        async with open_session_manager(broker, queue_name=Q, options=options) as manager:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(manager.subscribe, handle)
                await trio.sleep(10)
                manager.stop()
    records = ours(caplog)
    assert {r.levelno for r in records} == {logging.INFO}
    assert {r.name for r in records} == {"trio_sessions.session"}
    assert all(r.__dict__["entity_path"] == Q for r in records)
    assert sorted(r.getMessage() for r in records if "accepted" in r.getMessage()) == [
        "session idle of q accepted",
        "session released of q accepted",
        "session stopped of q accepted",
    ]
    assert closed_reasons(caplog) == {"idle": "idle", "released": "released", "stopped": "stopped"}
    for record in records:
        assert f"session {sid(record)} " in record.getMessage()


async def test_lock_loss_and_renewal_end_are_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A lost lock and the end of lock renewal are lifecycle events, with their reasons."""
    broker = MemoryBroker()
    broker.create_queue(Q, lock_duration=10)
    await broker.send(Q, Message(b"x", session_id="lost"))
    await broker.send(Q, Message(b"x", session_id="renewed"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if context.session_id == "lost":
            broker.expire_session_lock(Q, "lost")
            await trio.sleep_forever()

    async def on_error(context: ErrorContext) -> None:
        pass

    options = SessionManagerOptions(session_idle_timeout=60, max_auto_lock_renewal_duration=20)
    with caplog.at_level(logging.DEBUG, logger="trio_sessions"):
        async with open_session_manager(broker, queue_name=Q, options=options) as manager:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: manager.subscribe(handle, process_error=on_error, session_closing=None)
                )
                await trio.sleep(40)
                manager.stop()
    assert closed_reasons(caplog) == {"lost": "lock lost", "renewed": "lock renewal ended"}
    info = [r.getMessage() for r in ours(caplog) if r.levelno == logging.INFO]
    assert any(m.startswith("session lost lost its lock: ") for m in info)
    assert "releasing session renewed: lock renewal ended after 20 s" in info
    renewals = [r for r in ours(caplog) if "lock renewed until" in r.getMessage()]
    assert renewals
    assert {(r.levelno, sid(r)) for r in renewals} == {(logging.DEBUG, "renewed")}


async def test_actor_form_close_reasons(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """process_session returning early, or raising, is the reason a session closes."""
    broker = MemoryBroker()
    broker.create_queue(Q)
    for session_id in ("returns", "raises"):
        await broker.send(Q, Message(b"x", session_id=session_id))

    async def process_session(session: SessionContext) -> None:
        async for _ in session:
            if session.session_id == "raises":
                raise ValueError("no")
            return

    async def on_error(context: ErrorContext) -> None:
        pass

    with caplog.at_level(logging.INFO, logger="trio_sessions"):
        async with open_session_manager(broker, queue_name=Q) as manager:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: manager.subscribe_sessions(process_session, process_error=on_error)
                )
                await trio.sleep(1)
                manager.stop()
    reasons = closed_reasons(caplog)
    assert reasons["returns"] == "process_session returned"
    # The abandoned message comes back; its second run returns nothing new, so the
    # second session close of "raises" may be for another reason: the first one counts.
    first = next(
        r.getMessage() for r in ours(caplog) if sid(r) == "raises" and "closed" in r.getMessage()
    )
    assert first.endswith("(process_session raised)")


async def test_cancelled_subscribe_logs_the_sessions_as_cancelled(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelling subscribe closes every session; the log says so."""
    broker = MemoryBroker()
    broker.create_queue(Q)
    await broker.send(Q, Message(b"x", session_id="a"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        await trio.sleep_forever()

    with caplog.at_level(logging.INFO, logger="trio_sessions"):
        async with open_session_manager(broker, queue_name=Q) as manager:
            with trio.move_on_after(5):
                await manager.subscribe(handle)
    assert closed_reasons(caplog) == {"a": "cancelled"}


async def test_per_message_events_at_debug(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Each received message and each settlement with its disposition, at DEBUG."""
    broker = MemoryBroker()
    broker.create_queue(Q)
    for body in (b"ok", b"fail", b"later", b"bad"):
        await broker.send(Q, Message(body, session_id="a", message_id=body.decode()))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.body == b"fail" and message.delivery_count == 0:
            raise ValueError("first try fails")
        if message.body == b"later":
            await context.defer(message)
        if message.body == b"bad":
            await context.dead_letter(message, reason="bad")

    async def on_error(context: ErrorContext) -> None:
        pass

    options = SessionManagerOptions(session_idle_timeout=1)
    with caplog.at_level(logging.DEBUG, logger="trio_sessions"):
        async with open_session_manager(broker, queue_name=Q, options=options) as manager:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: manager.subscribe(handle, process_error=on_error))
                await trio.sleep(5)
                manager.stop()
    debug = [r for r in ours(caplog) if r.levelno == logging.DEBUG]
    received = [r.getMessage() for r in debug if "received message" in r.getMessage()]
    assert received == [
        "session a: received message ok (sequence number 1, delivery count 0)",
        "session a: received message fail (sequence number 2, delivery count 0)",
        "session a: received message fail (sequence number 2, delivery count 1)",
        "session a: received message later (sequence number 3, delivery count 0)",
        "session a: received message bad (sequence number 4, delivery count 0)",
    ]
    settled = [r.getMessage() for r in debug if "settled message" in r.getMessage()]
    assert settled == [
        "session a: settled message ok (sequence number 1): complete",
        "session a: settled message fail (sequence number 2): abandon",
        "session a: settled message fail (sequence number 2): complete",
        "session a: settled message later (sequence number 3): defer",
        "session a: settled message bad (sequence number 4): dead_letter",
    ]
    assert all(sid(r) == "a" for r in debug if "message" in r.getMessage())
    errors = [(r.levelno, r.getMessage()) for r in ours(caplog) if r.levelno > logging.INFO]
    assert errors == [
        (logging.ERROR, "process_message error in session a of q: ValueError('first try fails')")
    ]
    (error_record,) = [r for r in ours(caplog) if r.levelno == logging.ERROR]
    assert error_record.exc_info is None  # process_error has the traceback


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG], ids=["info", "debug"])
async def test_per_message_logging_costs_no_call_when_debug_is_off(
    level: int,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With DEBUG off the per-message paths do not even call logger.debug."""
    broker = MemoryBroker()
    broker.create_queue(Q)
    for i in range(10):
        await broker.send(Q, Message(b"x", session_id="a", message_id=str(i)))
    logger = logging.getLogger("trio_sessions.session")
    calls: list[str] = []
    real_debug = logger.debug

    def counting_debug(msg: str, *args: object, **kwargs: object) -> None:
        calls.append(msg)
        real_debug(msg, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(logger, "debug", counting_debug)
    with caplog.at_level(level, logger="trio_sessions"):
        async with open_session_manager(broker, queue_name=Q) as manager:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(manager.subscribe, _complete)
                await trio.sleep(1)
                manager.stop()
    assert manager.stats().messages_completed == 10
    per_message = [c for c in calls if "message %s" in c]
    assert len(per_message) == (0 if level == logging.INFO else 20)


async def _complete(message: ReceivedMessage, context: SessionContext) -> None:
    pass


async def test_handler_errors_without_process_error_are_logged_with_traceback_and_masked(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody else sees them: ERROR with the traceback; a key in the message is masked."""
    broker = MemoryBroker()
    broker.create_queue(Q)
    await broker.send(Q, Message(b"x", session_id="a"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.delivery_count == 0:
            raise RuntimeError(f"could not connect with {CONN_STR}")

    with caplog.at_level(logging.WARNING, logger="trio_sessions"):
        async with open_session_manager(broker, queue_name=Q) as manager:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(manager.subscribe, handle)
                await trio.sleep(1)
                manager.stop()
    (record,) = ours(caplog)
    assert record.levelno == logging.ERROR
    assert record.name == "trio_sessions.manager"
    assert sid(record) == "a"
    assert record.exc_info is not None
    assert KEY not in caplog.text
    assert f"SharedAccessKey={MASK}" in caplog.text
    assert "Traceback (most recent call last)" in caplog.text
    assert "in handle" in caplog.text


async def test_retried_errors_and_lost_locks_are_warnings(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """What recovers by itself is a WARNING, even with a process_error that handles it."""
    broker = MemoryBroker()
    broker.create_queue(Q)
    await broker.send(Q, Message(b"x", session_id="a"))
    broker.fail_next("receive", ServiceBusConnectionError)

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.delivery_count == 0:
            broker.expire_session_lock(Q, "a")
            await trio.sleep_forever()

    async def on_error(context: ErrorContext) -> None:
        pass

    with caplog.at_level(logging.WARNING, logger="trio_sessions"):
        async with open_session_manager(broker, queue_name=Q) as manager:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: manager.subscribe(handle, process_error=on_error))
                await trio.sleep(5)
                manager.stop()
    assert [(r.levelno, r.getMessage().partition(":")[0]) for r in ours(caplog)] == [
        (logging.WARNING, "receive error in session a of q"),
        (logging.WARNING, "renew_lock error in session a of q"),
    ]
    assert "SessionLockLostError" in caplog.records[-1].getMessage()


async def test_failing_process_error_is_logged_masked(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """process_error raising is logged at ERROR, secrets in either error masked."""
    broker = MemoryBroker()
    broker.create_queue(Q)
    await broker.send(Q, Message(b"x", session_id="a"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.delivery_count == 0:
            raise RuntimeError(f"handler saw {CONN_STR}")

    async def on_error(context: ErrorContext) -> None:
        raise RuntimeError(f"alerting failed for {CONN_STR}")

    with caplog.at_level(logging.WARNING, logger="trio_sessions"):
        async with open_session_manager(broker, queue_name=Q) as manager:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: manager.subscribe(handle, process_error=on_error))
                await trio.sleep(1)
                manager.stop()
    reported, failed = ours(caplog)
    assert reported.getMessage().startswith("process_message error in session a of q: ")
    assert failed.levelno == logging.ERROR
    assert failed.getMessage().startswith("process_error raised while handling RuntimeError(")
    assert "alerting failed for" in caplog.text
    assert KEY not in caplog.text
