"""The session actor: one task tree per locked session.

::

    actor task ─┬─ service task: executes commands (settlements in batches, state,
                │  deferred receives, renewals) and the lock timer
                └─ lock scope (deadline = lock expiry)
                    └─ grace scope (deadline = end of the shutdown grace)
                        ├─ max_concurrent_calls_per_session == 1: the actor task itself
                        │  receives (idle scope around the wait only) and runs the handler
                        └─ otherwise: the actor task pumps into a memory channel read by
                           that many long-lived worker tasks

Only the actor's tasks touch its `SessionLink`; handlers reach it through commands sent
with ``send_nowait`` over a bounded memory channel. An idle session in the default shape
holds two tasks. Lock loss cancels the lock scope: handlers are cancelled (Trio
cancellation, no token to check) and nothing more is settled on that lock.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import trio

from ._context import SessionContext
from ._errors import (
    TRANSIENT_ERRORS,
    ErrorSource,
    MessageAlreadySettledError,
    SessionLockLostError,
)
from ._messages import Abandon, Complete, DeadLetter, ReceivedMessage, Settlement
from ._options import ReceiveMode, SessionManagerOptions
from ._renewal import next_lock_action, renewal_margin

if TYPE_CHECKING:
    import datetime as dt

    from ._stats import Counters
    from .backends._abc import SessionLink

__all__ = ["ActorHooks", "SessionActor"]

logger = logging.getLogger("trio_sessions")

#: How long closing a link may take before it is abandoned (it is shielded).
CLOSE_TIMEOUT = 10.0

_SETTLE_SOURCES: dict[type, ErrorSource] = {
    Complete: ErrorSource.COMPLETE,
    Abandon: ErrorSource.ABANDON,
    DeadLetter: ErrorSource.DEAD_LETTER,
}

MessageHandler = Callable[[ReceivedMessage, SessionContext], Awaitable[object]]
SessionHandler = Callable[[SessionContext], Awaitable[object]]
Reporter = Callable[[BaseException, ErrorSource, "str | None", bool], Awaitable[None]]


def _settle_source(settlement: Settlement) -> ErrorSource:
    return _SETTLE_SOURCES.get(type(settlement), ErrorSource.DEFER)


class _Request:
    """A command for the service task, with room for its outcome."""

    __slots__ = ("done", "error", "kind", "payload", "result")

    def __init__(self, kind: str, payload: Any = None) -> None:
        self.kind = kind
        self.payload = payload
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result = result
        self.error = error
        self.done.set()


@attrs.frozen(kw_only=True)
class ActorHooks:
    """What an actor needs from its manager (internal): callbacks, counters, reporting."""

    options: SessionManagerOptions
    receive_mode: ReceiveMode
    entity_path: str
    counters: Counters
    report: Reporter
    process_message: MessageHandler | None = None
    process_session: SessionHandler | None = None
    session_initializing: SessionHandler | None = None
    session_closing: SessionHandler | None = None


def _safe_deadline(locked_until: float, lock_duration: float) -> float:
    """When handlers under a lock are cancelled: half the renewal margin before it expires.

    Not at the expiry itself: by then the broker may have given the session to another
    receiver, and a handler still running (its process busy, or its clock a little
    behind the broker's) would overlap with that receiver's (DESIGN §6.6; found by the
    multi-process chaos run, issue 7).
    """
    return locked_until - renewal_margin(lock_duration) / 2


class SessionActor:
    """Runs one locked session from accept to close (internal)."""

    def __init__(self, link: SessionLink, hooks: ActorHooks) -> None:
        options = hooks.options
        self._link = link
        self._hooks = hooks
        self._options = options
        self._peek_lock = hooks.receive_mode is ReceiveMode.PEEK_LOCK
        self._auto_complete = options.auto_complete and self._peek_lock
        self.context = SessionContext(self)
        self.done = trio.Event()
        now = trio.current_time()
        self._lock_duration = max(link.locked_until - now, 0.0)
        self._give_up_renewing_at = now + options.max_auto_lock_renewal_duration
        self._locked_until_utc = link.locked_until_utc
        self._lock_scope = trio.CancelScope(
            deadline=_safe_deadline(link.locked_until, self._lock_duration)
        )
        self._grace_scope = trio.CancelScope()
        self._receive_scope: trio.CancelScope | None = None
        self._timer_at, self._timer_renews = next_lock_action(
            link.locked_until, self._lock_duration, self._give_up_renewing_at
        )
        self._renew_attempt = 0
        capacity = options.max_concurrent_calls_per_session + options.prefetch_count
        self._requests_tx, self._requests_rx = trio.open_memory_channel[_Request](capacity + 64)
        self._open: dict[str, ReceivedMessage] = {}
        self._buffer: deque[ReceivedMessage] = deque()
        self._current: ReceivedMessage | None = None
        self._draining = False
        self._busy = 0
        self._wake_pump = trio.Event()
        self._lock_lost: SessionLockLostError | None = None
        self._lock_lost_source = ErrorSource.RENEW_LOCK
        self._receive_attempt = 0
        link.on_lock_lost(lambda error: self._note_lock_lost(error, ErrorSource.RENEW_LOCK))

    # -- SessionPort (what the context calls) ---------------------------------------------

    @property
    def session_id(self) -> str:
        return self._link.session_id

    @property
    def entity_path(self) -> str:
        return self._hooks.entity_path

    @property
    def locked_until_utc(self) -> dt.datetime:
        return self._locked_until_utc

    async def settle(self, settlement: Settlement) -> None:
        message = settlement.message
        if not self._peek_lock:
            raise MessageAlreadySettledError(
                "messages received in RECEIVE_AND_DELETE mode are settled on receipt"
            )
        token = message.lock_token or ""
        if self._open.pop(token, None) is None:
            if message.session_id != self.session_id:
                raise ValueError(
                    f"message {message.message_id!r} belongs to session "
                    f"{message.session_id!r}, not to {self.session_id!r}"
                )
            raise MessageAlreadySettledError(
                f"message {message.message_id!r} (sequence number {message.sequence_number}) "
                "was settled already"
            )
        try:
            await self._request("settle", settlement)
        except TRANSIENT_ERRORS:
            self._open[token] = message  # not settled: the caller may try again
            raise

    async def receive_deferred(self, sequence_numbers: Sequence[int]) -> list[ReceivedMessage]:
        messages: list[ReceivedMessage] = await self._request("deferred", sequence_numbers)
        for message in messages:
            if message.lock_token is not None:
                self._open[message.lock_token] = message
        return messages

    async def get_state(self) -> bytes | None:
        state: bytes | None = await self._request("get_state")
        return state

    async def set_state(self, state: bytes | None) -> None:
        await self._request("set_state", state)

    async def renew_lock(self) -> dt.datetime:
        await self._request("renew")
        return self._locked_until_utc

    def released(self) -> bool:
        """Whether `release` was called (a method, so type checkers re-read it after awaits)."""
        return self._draining

    def release(self) -> None:
        """Hand no more messages to user code; close once in-flight handlers finish."""
        if self._draining:
            return
        self._draining = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()
        self._wake_pump.set()

    def drain(self, grace_deadline: float) -> None:
        """Release the session, cancelling handlers still running at ``grace_deadline``."""
        self.release()
        self._grace_scope.deadline = min(self._grace_scope.deadline, grace_deadline)

    async def next_message(self) -> ReceivedMessage | None:
        """The actor form's iteration step: settle the previous message, wait for the next."""
        if self._hooks.process_session is None:
            raise RuntimeError("a SessionContext is iterable only in subscribe_sessions")
        previous, self._current = self._current, None
        if previous is not None:
            await self._auto_settle(previous, Complete(previous))
        message = await self._next_message()
        self._current = message
        return message

    # -- commands ------------------------------------------------------------------------

    async def _request(self, kind: str, payload: Any = None) -> Any:
        request = _Request(kind, payload)
        try:
            self._requests_tx.send_nowait(request)
        except trio.WouldBlock:
            await self._requests_tx.send(request)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise trio.ClosedResourceError(
                f"session {self.session_id!r} was closed; its context can no longer be used"
            ) from None
        await request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    async def _service(self) -> None:
        """Execute commands in arrival order, batching settlements; run the lock timer."""
        receive = self._requests_rx
        async with receive:
            while True:
                request = None
                with trio.move_on_at(self._timer_at):
                    try:
                        request = await receive.receive()
                    except trio.EndOfChannel:
                        return
                if request is None:
                    await self._on_lock_timer()
                    continue
                batch = [request]
                while len(batch) < 256:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._execute(batch)

    async def _execute(self, batch: list[_Request]) -> None:
        counters = self._hooks.counters
        i = 0
        while i < len(batch):
            request = batch[i]
            if request.kind == "settle":
                j = i
                while j < len(batch) and batch[j].kind == "settle":
                    j += 1
                group = batch[i:j]
                settlements: list[Settlement] = [r.payload for r in group]
                try:
                    results = await self._link.settle(settlements)
                except BaseException as exc:
                    for r in group:
                        r.resolve(error=exc)
                    raise
                for r, settlement, error in zip(group, settlements, results, strict=True):
                    if error is None:
                        if isinstance(settlement, Complete):
                            counters.messages_completed += 1
                        elif isinstance(settlement, Abandon):
                            counters.messages_abandoned += 1
                        elif isinstance(settlement, DeadLetter):
                            counters.messages_dead_lettered += 1
                        else:
                            counters.messages_deferred += 1
                    r.resolve(error=error)
                    # After resolving: the waiting caller wakes with the error itself, and
                    # the lock scope's cancellation reaches it at its next checkpoint.
                    if isinstance(error, SessionLockLostError):
                        self._note_lock_lost(error, _settle_source(settlement))
                i = j
                continue
            source = ErrorSource.SESSION_STATE
            try:
                if request.kind == "get_state":
                    request.resolve(await self._link.get_state())
                elif request.kind == "set_state":
                    await self._link.set_state(request.payload)
                    request.resolve()
                elif request.kind == "deferred":
                    source = ErrorSource.RECEIVE
                    request.resolve(await self._link.receive_deferred(request.payload))
                else:
                    source = ErrorSource.RENEW_LOCK
                    self._lock_renewed(await self._link.renew_lock())
                    request.resolve()
            except Exception as exc:
                request.resolve(error=exc)
                if isinstance(exc, SessionLockLostError):
                    self._note_lock_lost(exc, source)
            i += 1

    async def _on_lock_timer(self) -> None:
        if not self._timer_renews:
            self._timer_at = math.inf
            logger.info("releasing session %s: lock renewal ended", self.session_id)
            self.release()
            return
        try:
            deadline = await self._link.renew_lock()
        except SessionLockLostError as exc:
            self._note_lock_lost(exc, ErrorSource.RENEW_LOCK)
            self._timer_at = math.inf
        except Exception as exc:
            # Transient (or unknown) failure: try again after a backoff; if the lock
            # lapses first, the lock scope's deadline turns that into a lock loss.
            delay = self._options.retry.delay(self._renew_attempt)
            self._renew_attempt += 1
            self._timer_at = trio.current_time() + delay
            await self._hooks.report(exc, ErrorSource.RENEW_LOCK, self.session_id, False)
        else:
            self._lock_renewed(deadline)

    def _lock_renewed(self, deadline: float) -> None:
        now = trio.current_time()
        self._hooks.counters.lock_renewals += 1
        self._renew_attempt = 0
        self._lock_duration = max(deadline - now, 0.0)
        self._locked_until_utc = self._link.locked_until_utc
        self._lock_scope.deadline = _safe_deadline(deadline, self._lock_duration)
        if self._timer_at != math.inf or self._timer_renews:
            self._timer_at, self._timer_renews = next_lock_action(
                deadline, self._lock_duration, self._give_up_renewing_at
            )

    def _note_lock_lost(self, error: SessionLockLostError, source: ErrorSource) -> None:
        """Record the first report of a lost lock and cancel everything under it."""
        if self._lock_lost is None:
            self._lock_lost = error
            self._lock_lost_source = source
            self._lock_scope.cancel()

    async def _abort_lock_lost(self, error: SessionLockLostError, source: ErrorSource) -> NoReturn:
        self._note_lock_lost(error, source)
        await trio.sleep_forever()  # the lock scope is cancelled: raises Cancelled at once
        raise AssertionError("unreachable")  # pragma: no cover

    # -- life cycle --------------------------------------------------------------------------

    async def run(self, on_exit: Callable[[SessionActor], None]) -> None:
        """Run the session until it is idle, released, stopped or its lock is lost."""
        hooks = self._hooks
        logger.info("session %s of %s accepted", self.session_id, hooks.entity_path)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._service, name=f"session {self.session_id} service")
                with self._lock_scope:
                    with self._grace_scope:
                        if await self._initialize():
                            await self._work()
                    await self._give_back(list(self._buffer))
                    self._buffer.clear()
                    await self._call_closing()
                if self._lock_scope.cancelled_caught and self._lock_lost is None:
                    self._lock_lost = SessionLockLostError(
                        f"the lock of session {self.session_id!r} expired while handlers ran"
                    )
                    self._lock_lost_source = ErrorSource.RENEW_LOCK
                if self._lock_lost is not None:
                    logger.info("session %s lost its lock", self.session_id)
                    await hooks.report(
                        self._lock_lost, self._lock_lost_source, self.session_id, False
                    )
                self._requests_tx.close()
        finally:
            self._requests_tx.close()
            with trio.CancelScope(
                deadline=trio.current_time() + CLOSE_TIMEOUT, shield=True
            ) as close_scope:
                try:
                    await self._link.aclose()
                except Exception as exc:
                    logger.warning("closing session %s failed: %r", self.session_id, exc)
            if close_scope.cancelled_caught:
                logger.warning("closing session %s timed out", self.session_id)
            logger.info("session %s closed", self.session_id)
            on_exit(self)
            self.done.set()

    async def _initialize(self) -> bool:
        callback = self._hooks.session_initializing
        if callback is None:
            return True
        try:
            await callback(self.context)
        except Exception as exc:
            await self._report_unless_lost(exc, ErrorSource.ACCEPT_SESSION, handler=False)
            return False
        return True

    async def _call_closing(self) -> None:
        callback = self._hooks.session_closing
        if callback is None:
            return
        with trio.CancelScope(deadline=self._grace_scope.deadline):
            try:
                await callback(self.context)
            except Exception as exc:
                await self._report_unless_lost(exc, ErrorSource.CLOSE_SESSION, handler=False)

    async def _report_unless_lost(
        self, error: BaseException, source: ErrorSource, *, handler: bool
    ) -> None:
        # A lost lock is reported once, by the operation that found it.
        if isinstance(error, SessionLockLostError) and self._lock_lost is not None:
            return
        await self._hooks.report(error, source, self.session_id, handler)

    async def _work(self) -> None:
        hooks = self._hooks
        if hooks.process_session is not None:
            await self._run_session(hooks.process_session)
        elif self._options.max_concurrent_calls_per_session == 1:
            while (message := await self._next_message()) is not None:
                await self._handle(message)
        else:
            await self._run_concurrent()

    # -- receiving -------------------------------------------------------------------------

    def _received(self, batch: list[ReceivedMessage]) -> None:
        self._hooks.counters.messages_received += len(batch)
        if self._peek_lock:
            for message in batch:
                if message.lock_token is not None:
                    self._open[message.lock_token] = message

    async def _receive(self, max_count: int, idle: bool) -> list[ReceivedMessage] | None:
        """Receive up to ``max_count`` messages; None when idle or released.

        The idle clock runs only when ``idle`` (nothing in flight or buffered); transient
        errors are reported and retried with backoff, within the same scope.
        """
        while not self._draining:
            timeout = self._options.session_idle_timeout if idle else math.inf
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                self._receive_scope = scope
                try:
                    batch = await self._link.receive(max_count)
                except SessionLockLostError as exc:
                    await self._abort_lock_lost(exc, ErrorSource.RECEIVE)
                except TRANSIENT_ERRORS as exc:
                    await self._hooks.report(exc, ErrorSource.RECEIVE, self.session_id, False)
                    await trio.sleep(self._options.retry.delay(self._receive_attempt))
                    self._receive_attempt += 1
                    continue
                except Exception as exc:
                    # Not retryable: report it and give the session back.
                    await self._hooks.report(exc, ErrorSource.RECEIVE, self.session_id, False)
                    self.release()
                    return None
                self._receive_attempt = 0
                self._received(batch)
                return batch
            self._receive_scope = None
            if scope.cancelled_caught:
                return None
        return None

    async def _next_message(self) -> ReceivedMessage | None:
        """The next message for the inline handler or the actor form; None ends the session."""
        if self._draining:
            return None
        if not self._buffer:
            batch = await self._receive(1 + self._options.prefetch_count, idle=True)
            if not batch:
                return None
            self._buffer.extend(batch)
            if self.released():  # released while the batch arrived: it is given back
                return None
        return self._buffer.popleft()

    # -- handling ------------------------------------------------------------------------------

    async def _auto_settle(self, message: ReceivedMessage, settlement: Settlement) -> None:
        """Settle a message handed to user code, unless user code settled it."""
        if not self._auto_complete or self._lock_lost is not None:
            return
        token = message.lock_token or ""
        if self._open.pop(token, None) is None:
            return
        try:
            await self._request("settle", settlement)
        except SessionLockLostError:
            await trio.sleep_forever()  # noted by the service task; the lock scope is cancelled
        except Exception as exc:
            await self._hooks.report(exc, _settle_source(settlement), self.session_id, False)

    async def _handle(self, message: ReceivedMessage) -> None:
        callback = self._hooks.process_message
        assert callback is not None
        try:
            await callback(message, self.context)
        except Exception as exc:
            await self._report_unless_lost(exc, ErrorSource.PROCESS_MESSAGE, handler=True)
            await self._auto_settle(message, Abandon(message))
        else:
            await self._auto_settle(message, Complete(message))

    async def _run_session(self, process_session: SessionHandler) -> None:
        try:
            await process_session(self.context)
        except Exception as exc:
            await self._report_unless_lost(exc, ErrorSource.PROCESS_MESSAGE, handler=True)
            if self._current is not None:
                await self._auto_settle(self._current, Abandon(self._current))
        else:
            if self._current is not None:
                await self._auto_settle(self._current, Complete(self._current))
        self._current = None

    async def _give_back(self, messages: list[ReceivedMessage]) -> None:
        """Abandon messages received but never handed to user code (release, stop)."""
        requests = []
        for message in messages:
            if self._open.pop(message.lock_token or "", None) is not None:
                request = _Request("settle", Abandon(message))
                await self._requests_tx.send(request)
                requests.append(request)
        for request in requests:
            await request.done.wait()

    async def _run_concurrent(self) -> None:
        options = self._options
        capacity = options.max_concurrent_calls_per_session + options.prefetch_count
        send, receive = trio.open_memory_channel[ReceivedMessage](capacity)
        async with trio.open_nursery() as workers:
            for i in range(options.max_concurrent_calls_per_session):
                workers.start_soon(
                    self._worker, receive.clone(), name=f"session {self.session_id} worker {i}"
                )
            receive.close()
            async with send:
                while not self._draining:
                    free = capacity - self._busy
                    if free == 0:
                        await self._wake_pump.wait()
                        self._wake_pump = trio.Event()
                        continue
                    batch = await self._receive(free, idle=self._busy == 0)
                    if batch is None:  # idle (only when nothing is busy), released, or failed
                        break
                    for message in batch:
                        self._busy += 1
                        send.send_nowait(message)

    async def _worker(self, receive: trio.MemoryReceiveChannel[ReceivedMessage]) -> None:
        async with receive:
            async for message in receive:
                try:
                    if self._draining and self._peek_lock:
                        # Buffered, never handed out: give it back. (In receive-and-delete
                        # mode it is deleted already, so it is still handled.)
                        await self._give_back([message])
                    else:
                        await self._handle(message)
                finally:
                    self._busy -= 1
                    self._wake_pump.set()
                    if self._busy == 0 and self._receive_scope is not None:
                        # Nothing in flight: the idle clock starts now.
                        self._receive_scope.deadline = (
                            trio.current_time() + self._options.session_idle_timeout
                        )
