"""`open_session_manager` and `SessionManager`: the supervisor of the session actors.

::

    subscribe*() ── supervisor nursery
        ├─ accept scope ── acceptor tasks (ACCEPTORS to MAX_ACCEPTORS, or one per session id)
        │     each takes a CapacityLimiter token on behalf of the actor it will start,
        │     accepts a session, and starts the actor in the supervisor nursery
        └─ SessionActor tasks: one per locked session; each gives its token back when it ends

No nursery stays open around the ``yield`` of `open_session_manager`, so exceptions
from the body of the ``async with`` block leave it as themselves; the supervisor
nursery lives inside ``subscribe``/``subscribe_sessions``.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, final

import trio

from ._actor import CLOSE_TIMEOUT, ActorHooks, SessionActor, SessionHandler
from ._context import state_to_bytes
from ._errors import (
    FATAL_ERRORS,
    TRANSIENT_ERRORS,
    ErrorContext,
    ErrorSource,
    OperationTimeoutError,
    SessionCannotBeLockedError,
    SessionLockLostError,
)
from ._messages import EntityPath
from ._options import ReceiveMode, SessionManagerOptions
from ._otel import telemetry_for
from ._redact import Redacted, library_logger
from ._renewal import LockTimers
from ._stats import Counters, ManagerStats

if TYPE_CHECKING:
    from .backends._abc import Backend, SessionLink

__all__ = ["SessionManager", "open_session_manager"]

logger = library_logger("trio_sessions.manager")

#: Accepts of next-available sessions kept waiting when no session is free: enough that
#: one slow accept does not serialise acquisition, few enough not to hold many
#: server-side waits (each is a connection on Azure).
ACCEPTORS = 4
#: Accepts of next-available sessions in flight at most, while sessions are being found.
#: A subscription starts this many (no more than max_concurrent_sessions), since an
#: accept on Azure takes about half a second and four at a time made acquiring ten
#: sessions take three of those (issue #8, P8). An accept that finds no session free
#: ends its acceptor while more than ACCEPTORS run; each accept that finds one starts
#: another acceptor while a slot is free, so the pool follows the supply of sessions.
MAX_ACCEPTORS = 16

ErrorHandler = Callable[[ErrorContext], Awaitable[object]]

#: Accept errors retried with backoff; SessionCannotBeLockedError happens for a listed
#: session id that another receiver holds.
_RETRIED_ACCEPT_ERRORS: tuple[type[BaseException], ...] = (
    *TRANSIENT_ERRORS,
    SessionCannotBeLockedError,
)


#: Reported errors logged at WARNING, not ERROR: retried, or recovered from by the
#: broker (a lost lock's messages are delivered again).
_SELF_HEALING_ERRORS: tuple[type[BaseException], ...] = (
    *_RETRIED_ACCEPT_ERRORS,
    SessionLockLostError,
)


def _check_async(name: str, fn: object, *, optional: bool = False) -> None:
    if fn is None and optional:
        return
    is_async = inspect.iscoroutinefunction(fn)  # functools.partial is unwrapped by inspect
    if not is_async and callable(fn) and not inspect.isroutine(fn):
        is_async = inspect.iscoroutinefunction(type(fn).__call__)  # an async __call__
    if not is_async:
        raise TypeError(f"{name} must be an async function (async def), got {fn!r}")


def _entity_path(
    queue_name: str | None, topic_name: str | None, subscription_name: str | None
) -> EntityPath:
    for name, value in (
        ("queue_name", queue_name),
        ("topic_name", topic_name),
        ("subscription_name", subscription_name),
    ):
        if value is not None and (not isinstance(value, str) or not value):
            raise TypeError(f"{name} must be a non-empty str or None, got {value!r}")
    if queue_name is not None and topic_name is None and subscription_name is None:
        return EntityPath(queue_name=queue_name)
    if queue_name is None and topic_name is not None and subscription_name is not None:
        return EntityPath(topic_name=topic_name, subscription_name=subscription_name)
    raise ValueError(
        "give exactly one of queue_name, or topic_name together with subscription_name; "
        f"got queue_name={queue_name!r}, topic_name={topic_name!r}, "
        f"subscription_name={subscription_name!r}"
    )


@final
class SessionManager:
    """Reads many sessions of one entity at once, with bounded concurrency.

    Made by `open_session_manager`; see `subscribe` and `subscribe_sessions`.
    """

    def __init__(
        self,
        backend: Backend,
        entity: EntityPath,
        receive_mode: ReceiveMode,
        options: SessionManagerOptions,
        /,
    ) -> None:
        self._backend = backend
        self._entity = entity
        self._receive_mode = receive_mode
        self._options = options
        self._counters = Counters()
        self._actors: dict[str, SessionActor] = {}
        self._stopped = False
        self._closed = False
        self._running = False
        self._not_running = trio.Event()
        self._not_running.set()
        self._accept_scope: trio.CancelScope | None = None
        self._accepting = False
        self._acceptors = 0  # next-available acceptor tasks running (see MAX_ACCEPTORS)
        self._acceptors_started = 0  # for their task names
        self._timers = LockTimers()
        self._limiter = trio.CapacityLimiter(1)  # the running subscribe's (see _run)
        self._fatal: BaseException | None = None
        self._process_error: ErrorHandler | None = None
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"<SessionManager entity={self._entity.path!r} stopped={self._stopped}>"

    @property
    def entity_path(self) -> str:
        """The queue, or ``"<topic>/subscriptions/<subscription>"``, this manager reads."""
        return self._entity.path

    @property
    def options(self) -> SessionManagerOptions:
        """The options this manager was opened with."""
        return self._options

    def stats(self) -> ManagerStats:
        """A snapshot of the counters: sessions held, messages settled, errors reported."""
        return self._counters.snapshot()

    # -- running -------------------------------------------------------------------------

    async def subscribe(  # noqa: ASYNC128 - task_status is handed to _run, which starts
        self,
        process_message: Callable[..., Awaitable[object]],
        *,
        process_error: ErrorHandler | None = None,
        session_initializing: SessionHandler | None = None,
        session_closing: SessionHandler | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Process messages with ``await process_message(message, context)`` until stopped.

        Runs until `stop`, cancellation, or a fatal error; works with ``nursery.start``
        (started once accepting has begun).

        ``process_error(error_context)`` is told of every handler exception and every
        retried error; ``session_initializing(context)`` runs after a session is accepted,
        before its first message; ``session_closing(context)`` before it is released.

        Cancellation:
            Cancelling ``subscribe`` cancels every handler at once and closes every
            session; unsettled messages are delivered again (use `stop` to drain).

        Error handling:
            Handler exceptions are reported and the message abandoned (with
            ``auto_complete``). Transient errors are retried with backoff. A fatal error
            (`EntityNotFoundError`, `AuthenticationError`, `SessionsNotEnabledError`)
            stops the manager and is raised, alone, once every task has ended.

        Raises:
            TypeError: a callback is not an async function (before any session is accepted).
            RuntimeError: another ``subscribe*`` of this manager is running.
        """
        _check_async("process_message", process_message)
        await self._run(
            process_error,
            task_status,
            process_message=process_message,
            session_initializing=session_initializing,
            session_closing=session_closing,
        )

    async def subscribe_sessions(  # noqa: ASYNC128 - task_status is handed to _run
        self,
        process_session: Callable[..., Awaitable[object]],
        *,
        process_error: ErrorHandler | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The actor form: ``await process_session(session)`` once per acquired session.

        ``session`` is a `SessionContext` that is also an async iterator of the session's
        messages; iteration ends when the session goes idle, is released, or the manager
        stops. When ``process_session`` returns, the message it last received is
        completed (with ``auto_complete``, unless settled); when it raises, that message
        is abandoned and the error reported with source ``PROCESS_MESSAGE``.

        Otherwise as `subscribe`.
        """
        _check_async("process_session", process_session)
        await self._run(process_error, task_status, process_session=process_session)

    async def _run(
        self,
        process_error: ErrorHandler | None,
        task_status: trio.TaskStatus[None],
        **callbacks: Any,
    ) -> None:
        _check_async("process_error", process_error, optional=True)
        for name in ("session_initializing", "session_closing"):
            _check_async(name, callbacks.get(name), optional=True)
        if self._closed:
            raise RuntimeError("this session manager is closed (its async with block ended)")
        if self._running:
            raise RuntimeError("this session manager is running a subscribe already")
        if self._stopped:
            task_status.started()
            return
        self._running = True
        self._not_running = trio.Event()
        self._process_error = process_error
        # Decided once per run: OpenTelemetry set up after subscribe* started is not seen.
        telemetry = telemetry_for(self._entity, self._backend)
        timers = self._timers = LockTimers()
        hooks = ActorHooks(
            options=self._options,
            receive_mode=self._receive_mode,
            entity_path=self._entity.path,
            counters=self._counters,
            report=self._report if telemetry is None else telemetry.traced_report(self._report),
            telemetry=telemetry,
            schedule_lock_timer=timers.schedule,
            **callbacks,
        )
        try:
            async with trio.open_nursery() as supervisor:
                supervisor.start_soon(timers.run, name="lock timers")
                self._accepting = True
                limiter = self._limiter = trio.CapacityLimiter(
                    self._options.max_concurrent_sessions
                )
                with trio.CancelScope() as accept_scope:
                    self._accept_scope = accept_scope
                    if self.stopped():  # stop() was called by a callback racing us
                        accept_scope.cancel()
                    task_status.started()
                    async with trio.open_nursery() as acceptors:
                        session_ids = self._options.session_ids
                        if session_ids is None:
                            count = min(MAX_ACCEPTORS, self._options.max_concurrent_sessions)
                            for _ in range(count):
                                self._start_acceptor(acceptors, supervisor, limiter, hooks)
                        else:
                            for sid in session_ids:
                                acceptors.start_soon(
                                    self._acceptor,
                                    supervisor,
                                    limiter,
                                    hooks,
                                    sid,
                                    name=f"acceptor {sid}",
                                )
                self._accept_scope = None
                self._accepting = False
                if self._counters.active_sessions == 0:
                    timers.finish()
        finally:
            self._accepting = False
            self._running = False
            self._not_running.set()
        if self._fatal is not None:
            raise self._fatal

    def _start_acceptor(
        self,
        acceptors: trio.Nursery,
        supervisor: trio.Nursery,
        limiter: trio.CapacityLimiter,
        hooks: ActorHooks,
    ) -> None:
        """Start one more next-available acceptor (counted in ``_acceptors``)."""
        self._acceptors += 1
        self._acceptors_started += 1
        acceptors.start_soon(
            self._acceptor,
            supervisor,
            limiter,
            hooks,
            None,
            acceptors,
            name=f"acceptor {self._acceptors_started}",
        )

    async def _acceptor(
        self,
        supervisor: trio.Nursery,
        limiter: trio.CapacityLimiter,
        hooks: ActorHooks,
        session_id: str | None,
        acceptors: trio.Nursery | None = None,
    ) -> None:
        """Accept sessions and start their actors, until cancelled or no longer needed.

        Next-available acceptors (``session_id`` None, given ``acceptors``) are a pool
        that grows and shrinks with the supply of sessions: see `MAX_ACCEPTORS`.
        """
        try:
            await self._accept_loop(supervisor, limiter, hooks, session_id, acceptors)
        finally:
            if acceptors is not None:
                self._acceptors -= 1

    def _spare_acceptor(self) -> bool:
        """True when a next-available acceptor beyond the ACCEPTORS kept waiting runs."""
        return self._acceptors > min(ACCEPTORS, self._options.max_concurrent_sessions)

    async def _accept_loop(
        self,
        supervisor: trio.Nursery,
        limiter: trio.CapacityLimiter,
        hooks: ActorHooks,
        session_id: str | None,
        acceptors: trio.Nursery | None,
    ) -> None:
        options = self._options
        attempt = 0
        while True:
            borrower = object()
            try:
                # Without a trip through the scheduler when a token is free (issue #8:
                # a yield per session); the accept below is the loop's checkpoint.
                limiter.acquire_on_behalf_of_nowait(borrower)
            except trio.WouldBlock:
                await limiter.acquire_on_behalf_of(borrower)
            try:
                link = await self._backend.accept_session(
                    self._entity,
                    session_id,
                    receive_mode=self._receive_mode,
                    max_wait_time=options.accept_timeout,
                    prefetch_count=options.prefetch_count,
                )
            except OperationTimeoutError:
                limiter.release_on_behalf_of(borrower)
                if acceptors is not None and self._spare_acceptor():
                    return  # no session is free: fewer server-side waits will do
                continue  # no session was free within accept_timeout: not an error
            except FATAL_ERRORS as exc:
                limiter.release_on_behalf_of(borrower)
                self._fail(exc)
                return
            except _RETRIED_ACCEPT_ERRORS as exc:
                limiter.release_on_behalf_of(borrower)
                await self._report(exc, ErrorSource.ACCEPT_SESSION, session_id, False)
                if acceptors is not None and self._spare_acceptor():
                    return  # the ACCEPTORS kept waiting retry
                await trio.sleep(options.retry.delay(attempt, self._rng))
                attempt += 1
                continue
            except BaseException:
                limiter.release_on_behalf_of(borrower)
                raise
            attempt = 0
            actor = self._start_actor(supervisor, link, hooks, limiter, borrower)
            if acceptors is not None:
                # Sessions are there to be had: one more accept in flight, while a slot
                # is free for it.
                if (
                    self._acceptors < min(MAX_ACCEPTORS, options.max_concurrent_sessions)
                    and limiter.available_tokens > 0
                ):
                    self._start_acceptor(acceptors, supervisor, limiter, hooks)
            else:
                # Never hold one session twice: accept it again only once it is closed.
                await actor.wait_done()

    def _start_actor(
        self,
        supervisor: trio.Nursery,
        link: SessionLink,
        hooks: ActorHooks,
        limiter: trio.CapacityLimiter,
        borrower: object,
    ) -> SessionActor:
        actor = SessionActor(link, hooks)
        # What _actor_ended needs, on the actor rather than in a closure per session
        # (issue #8: the closure and its cells were 230 B per idle session).
        actor.limiter_token = borrower
        sid = link.session_id
        counters = self._counters
        counters.sessions_accepted += 1
        counters.active_sessions += 1
        previous = self._actors.get(sid)
        self._actors[sid] = actor
        on_exit = self._actor_ended
        if previous is None:
            supervisor.start_soon(actor.run, on_exit, supervisor, name=f"session {sid}")
        else:
            # The broker gave us a session we still hold: the old lock was lost (taken
            # away on the broker's side, unseen because nothing read the link meanwhile).
            # Its handlers stop before the new actor's start, so that they never overlap.
            previous.lock_lost_elsewhere()
            supervisor.start_soon(
                self._run_after, previous, actor, on_exit, supervisor, name=f"session {sid}"
            )
        if self._stopped:
            actor.drain(trio.current_time() + self._options.shutdown_timeout)
        return actor

    def _actor_ended(self, actor: SessionActor) -> None:
        """An actor has closed its session: count it, forget it, give its token back."""
        counters = self._counters
        counters.active_sessions -= 1
        counters.sessions_closed += 1
        sid = actor.session_id
        if self._actors.get(sid) is actor:
            del self._actors[sid]
        self._limiter.release_on_behalf_of(actor.limiter_token)
        if not self._accepting and counters.active_sessions == 0:
            self._timers.finish()  # accepting is over and this was the last actor

    @staticmethod
    async def _run_after(
        previous: SessionActor,
        actor: SessionActor,
        on_exit: Callable[[SessionActor], None],
        supervisor: trio.Nursery,
    ) -> None:
        await previous.wait_done()
        await actor.run(on_exit, supervisor)

    def _fail(self, error: BaseException) -> None:
        """A fatal error: remember the first, stop, and let ``subscribe*`` raise it."""
        logger.error(
            "fatal error on %s: %s",
            self._entity.path,
            Redacted(error),
            extra={"session_id": None, "entity_path": self._entity.path},
        )
        if self._fatal is None:
            self._fatal = error
        self.stop()

    async def _report(
        self, error: BaseException, source: ErrorSource, session_id: str | None, handler: bool
    ) -> None:
        if handler:
            self._counters.handler_errors += 1
        else:
            self._counters.errors += 1
        context = ErrorContext(
            error=error, source=source, session_id=session_id, entity_path=self._entity.path
        )
        callback = self._process_error
        extra = {"session_id": session_id, "entity_path": self._entity.path}
        # Logged whether or not process_error handles it, so operators see it without the
        # application's help: WARNING for what is retried or recovers by itself (a lost
        # lock: the messages come back), ERROR for the rest, handler exceptions included.
        # The traceback only when nobody else gets the exception.
        logger.log(
            logging.WARNING if isinstance(error, _SELF_HEALING_ERRORS) else logging.ERROR,
            "%s error in session %s of %s: %s",
            source.value,
            session_id,
            self._entity.path,
            Redacted(error, use_repr=True),
            exc_info=error if callback is None and handler else None,
            extra=extra,
        )
        if callback is None:
            return
        try:
            await callback(context)
        except Exception:
            logger.exception(
                "process_error raised while handling %s",
                Redacted(error, use_repr=True),
                extra=extra,
            )

    def stopped(self) -> bool:
        """Whether `stop` was called (it is final)."""
        return self._stopped

    def stop(self) -> None:
        """Stop accepting, drain, and close: final.

        In-flight handlers get ``shutdown_timeout`` seconds to finish (settlements keep
        working meanwhile), then they are cancelled; messages received but not handed to
        a handler are abandoned; every session is closed. A running ``subscribe*``
        returns once that is done; a later one returns at once.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        if self._actors:
            grace_deadline = trio.current_time() + self._options.shutdown_timeout
            for actor in list(self._actors.values()):
                actor.drain(grace_deadline)

    # -- session state -------------------------------------------------------------------

    async def get_state(self, session_id: str) -> bytes | None:
        """The state of ``session_id``.

        Routed to the session's actor if this manager holds the session; otherwise the
        session is accepted just for the call.

        Raises:
            SessionCannotBeLockedError: another receiver holds the session.
        """
        result: bytes | None = await self._with_session(session_id, "get", None)
        return result

    async def set_state(self, session_id: str, state: bytes | str | None) -> None:
        """Replace the state of ``session_id`` (a str is stored as UTF-8; None clears it).

        Raises:
            TypeError: ``state`` is not bytes, str or None.
            MessageSizeExceededError: ``state`` is larger than Service Bus keeps (256 KiB
                on Standard, the size of one message).
            SessionCannotBeLockedError: another receiver holds the session.
        """
        await self._with_session(session_id, "set", state_to_bytes(state))

    async def _with_session(self, session_id: str, op: str, state: bytes | None) -> Any:
        if not isinstance(session_id, str) or not session_id:
            raise TypeError(f"session_id must be a non-empty str, got {session_id!r}")
        if self._closed:
            raise RuntimeError("this session manager is closed (its async with block ended)")
        while True:
            actor = self._actors.get(session_id)
            if actor is None:
                break
            try:
                if op == "get":
                    return await actor.get_state()
                return await actor.set_state(state)
            except trio.ClosedResourceError:
                await actor.wait_done()  # it is closing: use the session once it is free
        link = await self._backend.accept_session(
            self._entity,
            session_id,
            receive_mode=self._receive_mode,
            max_wait_time=self._options.accept_timeout,
        )
        try:
            if op == "get":
                return await link.get_state()
            return await link.set_state(state)
        finally:
            with trio.CancelScope(deadline=trio.current_time() + CLOSE_TIMEOUT, shield=True):
                await link.aclose()

    async def _close(self) -> None:
        self.stop()
        await self._not_running.wait()
        self._closed = True


@asynccontextmanager
async def open_session_manager(
    backend: Backend,
    *,
    queue_name: str | None = None,
    topic_name: str | None = None,
    subscription_name: str | None = None,
    receive_mode: ReceiveMode = ReceiveMode.PEEK_LOCK,
    options: SessionManagerOptions = SessionManagerOptions(),  # noqa: B008 - frozen
) -> AsyncIterator[SessionManager]:
    """Open a session manager on a queue, or on a topic's subscription.

    ::

        async with open_session_manager(broker, queue_name="docs") as manager:
            await manager.subscribe(process_message)

    Leaving the block calls `SessionManager.stop` and waits for a running ``subscribe*``
    to return. No I/O happens until ``subscribe*`` or a state call.

    Raises:
        ValueError: not exactly one of ``queue_name`` or (``topic_name`` and
            ``subscription_name``); or ``prefetch_count > 0`` with
            ``RECEIVE_AND_DELETE`` (a stop would lose the buffer).
        TypeError: an argument has the wrong type.
    """
    entity = _entity_path(queue_name, topic_name, subscription_name)
    if not isinstance(receive_mode, ReceiveMode):
        raise TypeError(
            f"receive_mode must be ReceiveMode.PEEK_LOCK or ReceiveMode.RECEIVE_AND_DELETE, "
            f"not {receive_mode!r}"
        )
    if not isinstance(options, SessionManagerOptions):
        raise TypeError(f"options must be a SessionManagerOptions, not {options!r}")
    if receive_mode is ReceiveMode.RECEIVE_AND_DELETE and options.prefetch_count > 0:
        raise ValueError(
            "prefetch_count must be 0 with ReceiveMode.RECEIVE_AND_DELETE: prefetched "
            "messages are deleted on receipt and a stop would lose them"
        )
    accept = getattr(backend, "accept_session", None)
    if accept is None or not inspect.iscoroutinefunction(accept):
        raise TypeError(f"backend must be a MemoryBroker or AzureServiceBus, not {backend!r}")
    manager = SessionManager(backend, entity, receive_mode, options)
    try:
        yield manager
    finally:
        # Stop, then wait for a running subscribe* to drain: it needs at most the grace
        # plus closing time, so the wait is bounded even when we are being cancelled.
        with trio.CancelScope(
            deadline=trio.current_time() + options.shutdown_timeout + 2 * CLOSE_TIMEOUT, shield=True
        ):
            await manager._close()
