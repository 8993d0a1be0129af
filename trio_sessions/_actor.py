"""The session actor: one task tree per locked session.

::

    service task (in the supervisor nursery, started when first needed): executes
      commands (settlements in batches, state, deferred receives, renewals), lock timer
    actor task ── work scope (deadline = the earlier of the lock's safe deadline and
                  │  the end of the shutdown grace; which fired is worked out after)
                  ├─ max_concurrent_calls_per_session == 1: the actor task itself
                  │  receives (the idle deadline goes to the link's settle_and_receive,
                  │  or else the work scope is the idle clock) and runs the handler
                  └─ otherwise: the actor task pumps into a memory channel read by
                     that many long-lived worker tasks
                  then, if there are closing steps, a scope for the lock alone

Only the actor's tasks touch its `SessionLink`; handlers reach it through commands sent
with ``send_nowait`` over a bounded memory channel. An idle session in the default shape
holds one task and one cancel scope of its own. Lock loss cancels the work scope:
handlers are cancelled (Trio cancellation, no token to check) and nothing more is
settled on that lock.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, cast

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
from ._redact import Redacted, library_logger
from ._renewal import next_lock_action, renewal_margin

if TYPE_CHECKING:
    import datetime as dt

    from ._otel import Telemetry
    from ._stats import Counters
    from .backends._abc import SessionLink, SettleAndReceive

__all__ = ["ActorHooks", "SessionActor"]

logger = library_logger("trio_sessions.session")

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
    telemetry: Telemetry | None = None
    #: Calls ``actor.lock_timer_due()`` at a Trio-clock time, from a task shared by all
    #: actors (the manager's): it lets an actor start its service task only when one is
    #: needed. None: every actor starts its service task at once.
    schedule_lock_timer: Callable[[SessionActor, float], None] | None = None


def _safe_deadline(locked_until: float, lock_duration: float) -> float:
    """When handlers under a lock are cancelled: half the renewal margin before it expires.

    Not at the expiry itself: by then the broker may have given the session to another
    receiver, and a handler still running (its process busy, or its clock a little
    behind the broker's) would overlap with that receiver's (DESIGN §6.6; found by the
    multi-process chaos run, issue 7).
    """
    return locked_until - renewal_margin(lock_duration) / 2


_SettleBatch = Callable[[Sequence[Settlement]], Awaitable[list[BaseException | None]]]


class _LinkSettle:
    """``actor._settle_batch`` is ``actor._link.settle`` unless set on the instance.

    A non-data descriptor, so that telemetry can put the traced version in the
    instance's ``__dict__``, while an untraced actor holds no bound method (64 B).
    """

    def __get__(self, actor: SessionActor, owner: object = None) -> _SettleBatch:
        return actor._link.settle


class SessionActor:
    """Runs one locked session from accept to close (internal)."""

    # Slots: thousands of actors may be held at once (issue #8, memory per idle session).
    # "__dict__" too, made only when something sets another attribute (for instance a
    # per-instance wrapper of a method), so that stays possible at no cost otherwise.
    __slots__ = (
        "__dict__",
        "__weakref__",  # LockTimers holds actors weakly
        "_auto_complete",
        "_buffer",
        "_busy",
        "_close_reason",
        "_combined",
        "_context",
        "_current",
        "_defer_settle",
        "_done",
        "_draining",
        "_ended",
        "_give_up_renewing_at",
        "_grace_deadline",
        "_grace_scope",
        "_hooks",
        "_idle_deadline",
        "_idle_scope",
        "_link",
        "_link_closing",
        "_lock_deadline",
        "_lock_duration",
        "_lock_lost",
        "_lock_lost_source",
        "_lock_scope",
        "_locked_until_utc",
        "_nursery",
        "_open",
        "_options",
        "_peek_lock",
        "_pending",
        "_receive_attempt",
        "_receive_scope",
        "_renew_attempt",
        "_requests_tx",
        "_service_done",
        "_service_scope",
        "_session_context",
        "_settle_failure",
        "_settle_inline",
        "_stop_deadline",
        "_timer_at",
        "_timer_renews",
        "_wake_pump",
        "limiter_token",
    )

    def __init__(self, link: SessionLink, hooks: ActorHooks) -> None:
        options = hooks.options
        self._link = link
        self._hooks = hooks
        self._options = options
        self._peek_lock = hooks.receive_mode is ReceiveMode.PEEK_LOCK
        self._auto_complete = options.auto_complete and self._peek_lock
        # One task receives and runs handlers (inline calls, or the actor form): it settles
        # its own auto-settlements directly (see _auto_settle).
        self._settle_inline = (
            hooks.process_session is not None or options.max_concurrent_calls_per_session == 1
        )
        self._session_context: SessionContext | None = None  # see context
        #: The manager's: the borrower of the CapacityLimiter token held for this actor.
        self.limiter_token: object = None
        self._ended = False
        self._done: trio.Event | None = None  # made by the first wait_done
        now = trio.current_time()
        locked_until = link.locked_until
        self._lock_duration = max(locked_until - now, 0.0)
        self._give_up_renewing_at = now + options.max_auto_lock_renewal_duration
        # Read from the link when first asked for (issue #8: a datetime per idle session),
        # or on renewal, lock loss or close, whichever comes first.
        self._locked_until_utc: dt.datetime | None = None
        # One scope around the work for both the lock and the shutdown grace (issue #8:
        # each live scope costs an idle session 600 B): its deadline is the earlier of the
        # two, and which one fired is worked out after it fires (see run). The inline loop
        # also uses it as its idle clock (see _run_inline).
        self._lock_deadline = _safe_deadline(locked_until, self._lock_duration)
        self._stop_deadline = math.inf  # the end of the shutdown grace, once stopped
        # The work scope's deadline when not idling: min(lock deadline, stop deadline).
        self._grace_deadline = self._lock_deadline
        self._grace_scope = trio.CancelScope(deadline=self._grace_deadline)
        # The scope lock loss cancels: the work scope, then one around the closing steps.
        self._lock_scope = self._grace_scope
        # The scope of the receive now waiting (its deadline is the idle clock), or None.
        self._receive_scope: trio.CancelScope | None = None
        # The idle deadline of the wait under that scope (a renewal keeps it).
        self._idle_deadline = math.inf
        self._idle_scope: trio.CancelScope | None = None
        self._timer_at, self._timer_renews = next_lock_action(
            locked_until, self._lock_duration, self._give_up_renewing_at
        )
        self._renew_attempt = 0
        self._nursery: trio.Nursery | None = None
        self._context: contextvars.Context | None = None  # the actor task's own
        self._link_closing = False
        # Made with the service task (see _start_service).
        self._requests_tx: trio.MemorySendChannel[_Request] | None = None
        self._service_scope: trio.CancelScope | None = None
        self._service_done: trio.Event | None = None
        self._open: dict[str, ReceivedMessage] = {}
        # Received but not yet handed out, last first (a list: an empty deque costs 600 B).
        self._buffer: list[ReceivedMessage] = []
        self._current: ReceivedMessage | None = None
        self._draining = False
        self._busy = 0
        self._wake_pump: trio.Event | None = None  # only with several workers
        self._lock_lost: SessionLockLostError | None = None
        self._lock_lost_source = ErrorSource.RENEW_LOCK
        self._receive_attempt = 0
        self._close_reason: str | None = None
        link.on_lock_lost(self._lock_lost_by_link)
        if (telemetry := hooks.telemetry) is not None:
            # OpenTelemetry is configured: swap in traced steps once, so that the
            # untraced path has no check per message (see _otel).
            self._handle = telemetry.traced_handle(self._handle)  # type: ignore[method-assign,assignment]
            self._run_session = telemetry.traced_session(self, self._run_session)  # type: ignore[method-assign,assignment]
            self._settle_batch = telemetry.traced_settle(link.settle)
        # Where the link can settle and receive in one call, the inline loop carries each
        # auto-settlement on the next receive (issue #8: one checkpoint, or one bridge
        # crossing, per message instead of two). Not with telemetry: its settle spans
        # wrap `settle` calls.
        # The same call takes the idle deadline, which then costs nothing when a message
        # is ready (moving a cancel scope's deadline twice per message cost 3 us).
        self._combined = self._settle_inline and hasattr(link, "settle_and_receive")
        self._defer_settle = self._combined and self._auto_complete and telemetry is None
        self._pending: Settlement | None = None  # the auto-settlement the next receive carries
        self._settle_failure: tuple[BaseException, Settlement] | None = None

    #: Sends settlements to the backend: the link's own ``settle`` (see `_LinkSettle`),
    #: or the traced one that telemetry puts in the instance's ``__dict__``.
    _settle_batch: _SettleBatch = _LinkSettle()  # type: ignore[assignment]

    @property
    def context(self) -> SessionContext:
        """The session's `SessionContext`, made when first needed (issue #8: 48 B)."""
        context = self._session_context
        if context is None:
            context = self._session_context = SessionContext(self)
        return context

    def _set_lock_deadline(self, deadline: float) -> None:
        """Move the lock deadline (on renewal) on whichever scope guards the lock now."""
        if self._lock_lost is None and trio.current_time() >= self._lock_deadline:
            # The renewal came after the lock's safe deadline: the scope guarding the
            # lock has fired (or fires now) for it, and that stays a lock loss, even
            # though the deadline moves on (run() could no longer tell the cause).
            self._note_lock_lost(
                SessionLockLostError(
                    f"the lock of session {self.session_id!r} expired while handlers ran"
                ),
                ErrorSource.RENEW_LOCK,
            )
        self._lock_deadline = deadline
        scope = self._lock_scope
        if scope is not self._grace_scope:  # closing: a scope for the lock alone
            scope.deadline = deadline
            return
        self._grace_deadline = min(self._stop_deadline, deadline)
        if self._receive_scope is scope and not self._combined:
            scope.deadline = min(self._idle_deadline, self._grace_deadline)
        else:
            scope.deadline = self._grace_deadline

    @property
    def _log_extra(self) -> dict[str, str]:
        # Made per log call, not held (issue #8: a dict per idle session was 200 B).
        return {"session_id": self._link.session_id, "entity_path": self._hooks.entity_path}

    async def wait_done(self) -> None:
        """Wait until the actor has ended (its link closed, its limiter token given back)."""
        if self._ended:
            return
        if self._done is None:
            # Made only when someone waits (issue #8: most actors never have a waiter).
            self._done = trio.Event()
        await self._done.wait()

    # -- SessionPort (what the context calls) ---------------------------------------------

    @property
    def session_id(self) -> str:
        return self._link.session_id

    @property
    def entity_path(self) -> str:
        return self._hooks.entity_path

    @property
    def locked_until_utc(self) -> dt.datetime:
        if self._locked_until_utc is None:
            self._locked_until_utc = self._link.locked_until_utc
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
        return self.locked_until_utc

    def released(self) -> bool:
        """Whether `release` was called (a method, so type checkers re-read it after awaits)."""
        return self._draining

    def release(self, reason: str = "released") -> None:
        """Hand no more messages to user code; close once in-flight handlers finish."""
        if self._draining:
            return
        self._draining = True
        self._close_reason = reason
        if self._receive_scope is not None:
            self._receive_scope.cancel()
        if self._wake_pump is not None:
            self._wake_pump.set()

    def drain(self, grace_deadline: float) -> None:
        """Release the session, cancelling handlers still running at ``grace_deadline``."""
        self.release("stopped")
        self._stop_deadline = min(self._stop_deadline, grace_deadline)
        self._grace_deadline = min(self._grace_deadline, grace_deadline)
        self._grace_scope.deadline = min(self._grace_scope.deadline, grace_deadline)

    async def next_message(self) -> ReceivedMessage | None:
        """The actor form's iteration step: settle the previous message, wait for the next."""
        if self._hooks.process_session is None:
            raise RuntimeError("a SessionContext is iterable only in subscribe_sessions")
        previous, self._current = self._current, None
        if previous is not None:
            await self._auto_settle(previous, Complete(previous))
            previous = None  # not held through the wait below
        telemetry = self._hooks.telemetry
        if telemetry is not None:
            telemetry.end_iteration(self)
        message = await self._next_message()
        self._current = message
        if telemetry is not None and message is not None:
            telemetry.begin_iteration(self, message)
        return message

    # -- commands ------------------------------------------------------------------------

    def lock_timer_due(self) -> None:
        """The first lock timer is due (called by the manager's timer task)."""
        self._start_service()

    def _start_service(self) -> None:
        """Start the service task unless it runs already or the actor is closing.

        It is started lazily (issue #8: a short-lived or quiet session then never pays
        for a second task): by the first command, or when the lock timer is first due.
        """
        if self._requests_tx is not None or self._nursery is None:
            return
        options = self._options
        capacity = options.max_concurrent_calls_per_session + options.prefetch_count
        self._requests_tx, receive = trio.open_memory_channel[_Request](capacity + 64)
        self._service_scope = trio.CancelScope()
        self._service_done = trio.Event()
        # In the actor's own context, not that of the handler whose command started it:
        # a task copies its spawner's context vars (an OpenTelemetry span, for one).
        assert self._context is not None
        name = f"session {self.session_id} service"
        self._context.run(
            functools.partial(self._nursery.start_soon, name=name), self._service, receive
        )

    async def _send_request(self, request: _Request) -> None:
        self._start_service()
        requests = self._requests_tx
        if requests is None:  # closing, and no service task ever started
            raise trio.ClosedResourceError
        try:
            requests.send_nowait(request)
        except trio.WouldBlock:
            await requests.send(request)

    async def _request(self, kind: str, payload: Any = None) -> Any:
        request = _Request(kind, payload)
        try:
            await self._send_request(request)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise trio.ClosedResourceError(
                f"session {self.session_id!r} was closed; its context can no longer be used"
            ) from None
        await request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    async def _service(self, receive: trio.MemoryReceiveChannel[_Request]) -> None:
        """Execute commands in arrival order, batching settlements; run the lock timer.

        It runs in the manager's supervisor nursery, beside its actor (issue #8: a nursery
        of the actor's own cost 1.1 KiB per idle session); the actor waits for it to end
        before it closes the link, and cancels it when it ends by an exception.
        """
        scope, done = self._service_scope, self._service_done
        assert scope is not None
        assert done is not None
        try:
            with scope:
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
        finally:
            done.set()

    async def _execute(self, batch: list[_Request]) -> None:
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
                    results = await self._settle_batch(settlements)
                except BaseException as exc:
                    for r in group:
                        r.resolve(error=exc)
                    raise
                for r, error in zip(group, results, strict=True):
                    r.resolve(error=error)
                # After resolving: the waiting caller wakes with the error itself, and
                # the work scope's cancellation reaches it at its next checkpoint.
                self._record_settled(settlements, results)
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

    def _record_settled(
        self, settlements: Sequence[Settlement], results: Sequence[BaseException | None]
    ) -> None:
        """Log (at DEBUG) and count what the backend settled; note a lost lock found by a
        settlement. Every path that settles through the link ends here."""
        if logger.isEnabledFor(logging.DEBUG):
            self._log_settled(settlements, results)
        counters = self._hooks.counters
        for settlement, error in zip(settlements, results, strict=True):
            if error is None:
                if isinstance(settlement, Complete):
                    counters.messages_completed += 1
                elif isinstance(settlement, Abandon):
                    counters.messages_abandoned += 1
                elif isinstance(settlement, DeadLetter):
                    counters.messages_dead_lettered += 1
                else:
                    counters.messages_deferred += 1
            elif isinstance(error, SessionLockLostError):
                self._note_lock_lost(error, _settle_source(settlement))

    async def _on_lock_timer(self) -> None:
        if not self._timer_renews:
            self._timer_at = math.inf
            logger.info(
                "releasing session %s: lock renewal ended after %s s",
                self.session_id,
                self._options.max_auto_lock_renewal_duration,
                extra=self._log_extra,
            )
            self.release("lock renewal ended")
            return
        try:
            deadline = await self._link.renew_lock()
        except SessionLockLostError as exc:
            self._note_lock_lost(exc, ErrorSource.RENEW_LOCK)
            self._timer_at = math.inf
        except Exception as exc:
            # Transient (or unknown) failure: try again after a backoff; if the lock's
            # safe deadline passes first, the work scope's deadline makes it a lock loss.
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
        self._set_lock_deadline(_safe_deadline(deadline, self._lock_duration))
        logger.debug(
            "session %s: lock renewed until %s",
            self.session_id,
            self._locked_until_utc,
            extra=self._log_extra,
        )
        if self._timer_at != math.inf or self._timer_renews:
            self._timer_at, self._timer_renews = next_lock_action(
                deadline, self._lock_duration, self._give_up_renewing_at
            )

    def _log_settled(
        self, settlements: Sequence[Settlement], results: Sequence[BaseException | None]
    ) -> None:
        for settlement, error in zip(settlements, results, strict=True):
            message = settlement.message
            disposition = _settle_source(settlement).value
            if error is None:
                logger.debug(
                    "session %s: settled message %s (sequence number %s): %s",
                    self.session_id,
                    message.message_id,
                    message.sequence_number,
                    disposition,
                    extra=self._log_extra,
                )
            else:
                logger.debug(
                    "session %s: settling message %s (sequence number %s) as %s failed: %s",
                    self.session_id,
                    message.message_id,
                    message.sequence_number,
                    disposition,
                    Redacted(error, use_repr=True),
                    extra=self._log_extra,
                )

    def lock_lost_elsewhere(self) -> None:
        """The broker handed this session to our manager again: this lock is gone.

        Unless this actor is closing its link already: then the broker handed it on after
        that release, as it should.
        """
        if self._link_closing:
            return
        self._note_lock_lost(
            SessionLockLostError(
                f"the lock of session {self.session_id!r} was lost: the broker gave the "
                "session to this manager again while its handlers still ran"
            ),
            ErrorSource.RENEW_LOCK,
        )

    def _lock_expired(self) -> None:
        """The lock deadline passed while handlers (or session_closing) still ran."""
        self._lock_lost = SessionLockLostError(
            f"the lock of session {self.session_id!r} expired while handlers ran"
        )
        self._lock_lost_source = ErrorSource.RENEW_LOCK

    def _lock_lost_by_link(self, error: SessionLockLostError) -> None:
        self._note_lock_lost(error, ErrorSource.RENEW_LOCK)

    def _note_lock_lost(self, error: SessionLockLostError, source: ErrorSource) -> None:
        """Record the first report of a lost lock and cancel everything under it."""
        if self._locked_until_utc is None:
            self._locked_until_utc = self._link.locked_until_utc  # the lost lock's
        if self._lock_lost is None:
            self._lock_lost = error
            self._lock_lost_source = source
            self._lock_scope.cancel()

    async def _abort_lock_lost(self, error: SessionLockLostError, source: ErrorSource) -> NoReturn:
        self._note_lock_lost(error, source)
        await (
            trio.sleep_forever()
        )  # the work (or closing) scope is cancelled: raises Cancelled at once
        raise AssertionError("unreachable")  # pragma: no cover

    # -- life cycle --------------------------------------------------------------------------

    async def run(self, on_exit: Callable[[SessionActor], None], nursery: trio.Nursery) -> None:
        """Run the session until it is idle, released, stopped or its lock is lost.

        ``nursery`` (the manager's supervisor) is where the service task is started, when
        one is needed: the actor has no nursery of its own (issue #8).
        """
        hooks = self._hooks
        # Each log call checked first: building its `extra` is a cost per session even
        # when INFO is off (issue #8, CPU per session lifecycle).
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "session %s of %s accepted",
                self.session_id,
                hooks.entity_path,
                extra=self._log_extra,
            )
        try:
            self._nursery = nursery
            self._context = contextvars.copy_context()
            schedule = hooks.schedule_lock_timer
            if schedule is None:
                self._start_service()
            else:
                schedule(self, self._timer_at)
            with self._grace_scope:
                if await self._initialize():
                    # Not through a helper coroutine: each frame held by an idle
                    # session's wait costs about 200 B (issue #8).
                    if hooks.process_session is not None:
                        await self._run_session(hooks.process_session)
                    elif self._options.max_concurrent_calls_per_session == 1:
                        await self._run_inline()
                    else:
                        await self._run_concurrent()
                    pending = self._pending
                    if pending is not None:  # no receive came to carry it
                        self._pending = None
                        await self._settle_auto(pending)
            if self._grace_scope.cancelled_caught and self._lock_lost is None:
                # Which deadline fired: the lock's (a lock loss), or else the grace's or
                # the inline loop's idle clock.
                if trio.current_time() >= self._lock_deadline:
                    self._lock_expired()
                elif not self._draining:
                    self._close_reason = "idle"
            if self._settle_failure is not None and self._lock_lost is None:
                # A settlement carried by a receive failed (see _on_settled).
                error, settlement = self._settle_failure
                self._settle_failure = None
                await hooks.report(error, _settle_source(settlement), self.session_id, False)
            if self._buffer or hooks.session_closing is not None:
                # Closing steps, under the lock alone (skipped when there are none: a
                # scope per session is a cost of its own).
                with trio.CancelScope(deadline=self._lock_deadline) as closing:
                    self._lock_scope = closing
                    if self._lock_lost is not None:
                        closing.cancel()  # nothing more under a lost lock
                    await self._give_back(self._buffer[::-1])
                    self._buffer.clear()
                    await self._call_closing()
                if closing.cancelled_caught and self._lock_lost is None:
                    self._lock_expired()
            if self._lock_lost is not None:
                logger.info(
                    "session %s lost its lock: %s",
                    self.session_id,
                    Redacted(self._lock_lost),
                    extra=self._log_extra,
                )
                await hooks.report(self._lock_lost, self._lock_lost_source, self.session_id, False)
            self._close_requests()
            if self._service_done is not None:
                await self._service_done.wait()  # it does the commands sent before the close
        except BaseException as exc:
            cancelled = isinstance(exc, trio.Cancelled) or (
                isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[0] is not None
            )
            self._close_reason = "cancelled" if cancelled else "failed"
            raise
        finally:
            self._close_requests()
            self._link_closing = True
            if self._locked_until_utc is None:
                self._locked_until_utc = self._link.locked_until_utc  # while it is ours
            if self._service_done is not None and not self._service_done.is_set():
                # Ended by an exception: stop the service task and wait for it, as a
                # nursery of the actor's own would (its link calls stop within their
                # own time limits), and only then close the link, with a limit of its own.
                assert self._service_scope is not None
                self._service_scope.cancel()
                with trio.CancelScope(shield=True):
                    await self._service_done.wait()
            with trio.CancelScope(
                deadline=trio.current_time() + CLOSE_TIMEOUT, shield=True
            ) as close_scope:
                try:
                    await self._link.aclose()
                except Exception as exc:
                    logger.warning(
                        "closing session %s failed: %s",
                        self.session_id,
                        Redacted(exc, use_repr=True),
                        extra=self._log_extra,
                    )
            if close_scope.cancelled_caught:
                logger.warning(
                    "closing session %s timed out", self.session_id, extra=self._log_extra
                )
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "session %s of %s closed (%s)",
                    self.session_id,
                    hooks.entity_path,
                    "lock lost" if self._lock_lost is not None else self._close_reason or "done",
                    extra=self._log_extra,
                )
            on_exit(self)
            self._ended = True
            if self._done is not None:
                self._done.set()

    def _close_requests(self) -> None:
        """No more commands: the service task (if any) ends once it has done those sent."""
        self._nursery = None  # and no service task from now on
        if self._requests_tx is not None:
            self._requests_tx.close()

    async def _initialize(self) -> bool:
        callback = self._hooks.session_initializing
        if callback is None:
            return True
        try:
            await callback(self.context)
        except Exception as exc:
            self._close_reason = "session_initializing failed"
            await self._report_unless_lost(exc, ErrorSource.ACCEPT_SESSION, handler=False)
            return False
        return True

    async def _call_closing(self) -> None:
        callback = self._hooks.session_closing
        if callback is None:
            return
        with trio.CancelScope(deadline=self._grace_deadline):
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

    async def _run_inline(self) -> None:
        """Receive and handle one message at a time, in this task.

        No cancel scope per message (issue #8: a scope per message was a main cost, and
        each live scope costs memory). Where the link has `settle_and_receive`, each
        wait takes the idle deadline as an argument, and carries the auto-settlement of
        the message handled before it. Otherwise the grace scope around this loop
        doubles as the idle clock: `_receive_within` moves its deadline to the idle
        deadline around each wait and back to the grace deadline, so handler time never
        counts as idle. This loop is `_next_message` unrolled: each coroutine layer costs
        per message.
        """
        grace = self._idle_scope = self._grace_scope
        max_count = 1 + self._options.prefetch_count
        try:
            while not self._draining:
                if not self._buffer:
                    batch = await self._receive_within(grace, max_count, idle=True)
                    if not batch:
                        return
                    self._buffer = batch[::-1]
                    del batch  # not held through the next wait
                    if self.released():  # released while the batch arrived: given back
                        return
                await self._handle(self._buffer.pop())
        finally:
            self._idle_scope = None

    # -- receiving -------------------------------------------------------------------------

    def _received(self, batch: list[ReceivedMessage]) -> None:
        self._hooks.counters.messages_received += len(batch)
        if logger.isEnabledFor(logging.DEBUG):
            for message in batch:
                logger.debug(
                    "session %s: received message %s (sequence number %s, delivery count %s)",
                    self.session_id,
                    message.message_id,
                    message.sequence_number,
                    message.delivery_count,
                    extra=self._log_extra,
                )
        if self._peek_lock:
            for message in batch:
                if message.lock_token is not None:
                    self._open[message.lock_token] = message

    async def _receive(self, max_count: int, idle: bool) -> list[ReceivedMessage] | None:
        """Receive up to ``max_count`` messages; None when idle or released.

        With a link that has `settle_and_receive`, the idle deadline is an argument of
        that call, which returns no message when it passes. Otherwise, in the inline
        loop the idle clock is the work scope (see `_run_inline`), which raises
        `trio.Cancelled` out of here when it fires; elsewhere each wait has a scope of
        its own.
        """
        held = self._idle_scope
        if held is not None:
            return await self._receive_within(held, max_count, idle)
        with trio.CancelScope() as scope:
            return await self._receive_within(scope, max_count, idle)
        if not self._draining:
            self._close_reason = "idle"
        return None  # the wait ran idle

    async def _receive_within(
        self, scope: trio.CancelScope, max_count: int, idle: bool
    ) -> list[ReceivedMessage] | None:
        """Receive with ``scope`` as the idle clock; None when released or failed.

        The idle clock runs only when ``idle`` (nothing in flight or buffered); transient
        errors are reported and retried with backoff, each attempt with a fresh idle
        deadline. When the idle deadline passes, the combined call returns no message
        (None here), or else ``scope`` is cancelled.
        """
        while not self._draining:
            timeout = self._options.session_idle_timeout if idle else math.inf
            self._receive_scope = scope
            try:
                if self._combined:
                    link = cast("SettleAndReceive", self._link)
                    # No local for the settlement: this frame lives through the wait, and
                    # would keep the message it settled alive in every idle session.
                    batch = await link.settle_and_receive(
                        () if self._pending is None else (self._pending,),
                        self._on_settled,
                        max_count,
                        trio.current_time() + timeout,
                    )
                else:
                    self._idle_deadline = trio.current_time() + timeout
                    scope.deadline = min(self._idle_deadline, self._grace_deadline)
                    try:
                        batch = await self._link.receive(max_count)
                    finally:
                        scope.deadline = self._grace_deadline
            except SessionLockLostError as exc:
                await self._abort_lock_lost(exc, ErrorSource.RECEIVE)
            except TRANSIENT_ERRORS as exc:
                if self._is_settle_failure(exc):
                    return None
                await self._hooks.report(exc, ErrorSource.RECEIVE, self.session_id, False)
                await trio.sleep(self._options.retry.delay(self._receive_attempt))
                self._receive_attempt += 1
                continue
            except Exception as exc:
                if self._is_settle_failure(exc):
                    return None
                # Not retryable: report it and give the session back.
                await self._hooks.report(exc, ErrorSource.RECEIVE, self.session_id, False)
                self.release("receive failed")
                return None
            finally:
                self._receive_scope = None
            self._receive_attempt = 0
            if not batch:  # the idle deadline passed (the combined call)
                if not self._draining:
                    self._close_reason = "idle"
                return None
            self._received(batch)
            return batch
        return None

    async def _next_message(self) -> ReceivedMessage | None:
        """The next message for the actor form; None ends the session."""
        if self._draining:
            return None
        if not self._buffer:
            batch = await self._receive(1 + self._options.prefetch_count, idle=True)
            if not batch:
                return None
            self._buffer = batch[::-1]
            if self.released():  # released while the batch arrived: it is given back
                return None
        return self._buffer.pop()

    # -- handling ------------------------------------------------------------------------------

    async def _auto_settle(self, message: ReceivedMessage, settlement: Settlement) -> None:
        """Settle a message handed to user code, unless user code settled it.

        With nothing buffered, where the link allows, the settlement is left for the next
        receive to carry (`_defer_settle`); `run` settles it if no receive comes.
        """
        if not self._auto_complete or self._lock_lost is not None:
            return
        token = message.lock_token or ""
        if self._open.pop(token, None) is None:
            return
        if self._defer_settle and not self._buffer and not self._draining:
            self._pending = settlement
            return
        await self._settle_auto(settlement)

    def _on_settled(self, results: list[BaseException | None]) -> None:
        """The carried settlement is done (called by the link, before its wait)."""
        settlement = self._pending
        if settlement is None:  # the call carried none
            return
        self._pending = None
        settlements = [settlement]
        self._record_settled(settlements, results)  # notes a lost lock: cancels the wait
        (error,) = results
        if error is not None and not isinstance(error, SessionLockLostError):
            # As in _settle_auto: no later message may run before this one. Reported
            # once the wait has ended (run), since this is not an async context.
            self._settle_failure = (error, settlement)
            self.release("settlement failed")

    def _is_settle_failure(self, error: BaseException) -> bool:
        """Whether a receive raised its carried settlement's error (a link that could not
        start the call): on_settled has released the session, and run() reports it once,
        as a settlement error, not again as a receive error."""
        failure = self._settle_failure
        return failure is not None and error is failure[0]

    async def _settle_auto(self, settlement: Settlement) -> None:
        error: BaseException | None
        if self._settle_inline:
            # The task that receives settles too: no command, no hop to the service task,
            # no event to wait on (issue #8); the link sees one caller at a time as before.
            results = await self._settle_batch([settlement])
            (error,) = results
            self._record_settled([settlement], results)
        else:
            # Several workers: the service task serialises their settlements, in batches.
            try:
                await self._request("settle", settlement)
            except Exception as exc:
                error = exc
            else:
                error = None
        if isinstance(error, SessionLockLostError):
            await trio.sleep_forever()  # noted; the work scope is cancelled
        elif error is not None:
            await self._hooks.report(error, _settle_source(settlement), self.session_id, False)
            # The message is still locked by us, unsettled: handling the session's next
            # messages now would put it behind them. Give the session back instead, so
            # that it is delivered again first (to us or to another receiver).
            self.release("settlement failed")

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
            if self._close_reason is None:
                self._close_reason = "process_session raised"
        else:
            if self._current is not None:
                await self._auto_settle(self._current, Complete(self._current))
            if self._close_reason is None:
                self._close_reason = "process_session returned"
        self._current = None

    async def _give_back(self, messages: list[ReceivedMessage]) -> None:
        """Abandon messages received but never handed to user code (release, stop)."""
        requests = []
        for message in messages:
            if self._open.pop(message.lock_token or "", None) is not None:
                request = _Request("settle", Abandon(message))
                await self._send_request(request)
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
                        self._wake_pump = wake = trio.Event()
                        await wake.wait()
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
                    if self._wake_pump is not None:
                        self._wake_pump.set()
                    if self._busy == 0 and self._receive_scope is not None:
                        # Nothing in flight: the idle clock starts now.
                        self._receive_scope.deadline = (
                            trio.current_time() + self._options.session_idle_timeout
                        )
