"""The Azure Service Bus backend: the real asyncio SDK, bridged with trio-asyncio.

This module and `_aioloop` (the asyncio loop it runs the SDK in) are the only ones that
import asyncio, trio_asyncio or azure.servicebus (the package imports this one lazily,
so ``import trio_sessions`` stays asyncio-free).

Every crossing into asyncio goes through one chokepoint, `AzureServiceBus._call`, which
also translates the SDK's exceptions into ours (`_SDK_ERRORS`, most specific first; the
SDK exception stays reachable as ``__cause__``). SDK objects never leave this module
except as `ReceivedMessage.raw`.

One receiver per accepted session, used by one task at a time: each `AzureSessionLink`
serialises its SDK calls behind a Trio lock; a waiting receive is preempted by any other
call on its link (a settlement, a renewal), which goes first. A batch of settlements
crosses the bridge once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import math
import re
import urllib.parse
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, final

import trio
import trio_asyncio
from azure.core.exceptions import ClientAuthenticationError
from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusMessage, ServiceBusReceiveMode
from azure.servicebus import exceptions as sdk_errors
from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.amqp import AmqpMessageProperties

from .._errors import (
    AuthenticationError,
    EntityNotFoundError,
    MessageAlreadySettledError,
    MessageLockLostError,
    MessageNotFoundError,
    MessageSizeExceededError,
    OperationTimeoutError,
    ServiceBusConnectionError,
    SessionCannotBeLockedError,
    SessionLockLostError,
    SessionsError,
    SessionsNotEnabledError,
)
from .._messages import Abandon, Complete, DeadLetter, EntityPath, Message, ReceivedMessage
from .._options import ReceiveMode
from . import _aioloop
from ._abc import SingleSettlements

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence
    from contextlib import AsyncExitStack
    from types import TracebackType

    from azure.servicebus.aio import ServiceBusReceiver, ServiceBusSender

    from .._messages import Settlement

__all__ = ["AzureServiceBus", "AzureSessionLink", "parse_connection_string"]

P = ParamSpec("P")
T = TypeVar("T")

#: Longest single SDK receive call: a waiting receive gives the link's lock up this
#: often, so that settlements and renewals queued behind it wait at most this long.
RECEIVE_SLICE = 1.0
#: How long closing a receiver or sender may take when it is shielded; also how long a
#: cancelled SDK call may take to end.
CLOSE_TIMEOUT = 10.0
#: How long a cancelled SDK call may go on before it is cancelled again (see `_Call`):
#: long enough for the SDK's own cleanup on cancellation, which a second cancel would cut.
_CANCEL_AGAIN_AFTER = 1.0
#: The same for a preempted or cancelled receive, whose cancellation needs no cleanup.
_CANCEL_RECEIVE_AGAIN_AFTER = 0.01

#: SDK exception → ours, most specific first (the first isinstance match wins).
_SDK_ERRORS: tuple[tuple[type[BaseException], type[SessionsError]], ...] = (
    (sdk_errors.SessionLockLostError, SessionLockLostError),
    (sdk_errors.MessageLockLostError, MessageLockLostError),
    (sdk_errors.MessageAlreadySettled, MessageAlreadySettledError),
    (sdk_errors.MessageNotFoundError, MessageNotFoundError),
    (sdk_errors.SessionCannotBeLockedError, SessionCannotBeLockedError),
    (sdk_errors.MessageSizeExceededError, MessageSizeExceededError),
    (sdk_errors.MessagingEntityNotFoundError, EntityNotFoundError),
    (sdk_errors.MessagingEntityDisabledError, EntityNotFoundError),
    (sdk_errors.ServiceBusAuthenticationError, AuthenticationError),
    (sdk_errors.ServiceBusAuthorizationError, AuthenticationError),
    (sdk_errors.OperationTimeoutError, OperationTimeoutError),
    (sdk_errors.ServiceBusConnectionError, ServiceBusConnectionError),
    (sdk_errors.ServiceBusCommunicationError, ServiceBusConnectionError),
    (sdk_errors.ServiceBusServerBusyError, ServiceBusConnectionError),
)

#: How Service Bus (and the emulator) word a session receiver on an entity without
#: sessions; the SDK raises a plain ServiceBusError for it.
_SESSIONS_NOT_ENABLED = re.compile(
    r"does not require sessions|doesn't require sessions|not session-?enabled"
    r"|session.{0,40}(?:not (?:enabled|supported)|non-?session)",
    re.IGNORECASE | re.DOTALL,
)


# ------------------------------------------------------------------------- connection strings


def parse_connection_string(conn_str: object) -> dict[str, str]:
    """Check a Service Bus connection string and return its parts.

    Accepts ``Endpoint=sb://<host>/;SharedAccessKeyName=<policy>;SharedAccessKey=<key>``
    or ``Endpoint=...;SharedAccessSignature=SharedAccessSignature sr=...``, with optional
    ``EntityPath=`` and ``UseDevelopmentEmulator=true``. The returned ``"host"`` is the
    endpoint's host (and port, if any).

    Raises:
        TypeError: ``conn_str`` is not a str.
        ValueError: a part is missing or malformed; the message names it, and never
            repeats a key or signature.
    """
    if not isinstance(conn_str, str):
        raise TypeError(f"the connection string must be a str, not {type(conn_str).__name__}")
    expected = (
        "expected 'Endpoint=sb://<namespace>.servicebus.windows.net/;"
        "SharedAccessKeyName=<policy>;SharedAccessKey=<key>'"
    )
    if not conn_str.strip():
        raise ValueError(f"the connection string is empty; {expected}")
    parts: dict[str, str] = {}
    for raw in conn_str.split(";"):
        item = raw.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            shown = name.strip()[:20]
            raise ValueError(
                f"the connection string has a part without 'name=value' ({shown!r}...); {expected}"
            )
        parts[name.strip().lower()] = value.strip()
    endpoint = parts.get("endpoint")
    if not endpoint:
        raise ValueError(f"the connection string has no Endpoint part; {expected}")
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme.lower() != "sb" or not url.hostname:
        raise ValueError(
            f"the connection string's Endpoint must look like 'sb://<host>/', got {endpoint!r}"
        )
    signature = parts.get("sharedaccesssignature")
    key_name = parts.get("sharedaccesskeyname")
    key = parts.get("sharedaccesskey")
    if signature is None:
        if not key_name:
            raise ValueError(
                "the connection string has no SharedAccessKeyName part (the name of a "
                f"shared access policy with Listen and Send claims); {expected}"
            )
        if not key:
            raise ValueError(f"the connection string has no SharedAccessKey part; {expected}")
    elif not signature:
        raise ValueError("the connection string's SharedAccessSignature part is empty")
    emulator = parts.get("usedevelopmentemulator", "false").lower()
    if emulator not in ("true", "false"):
        raise ValueError(
            "the connection string's UseDevelopmentEmulator must be 'true' or 'false', "
            f"got {parts['usedevelopmentemulator']!r}"
        )
    host = url.hostname if url.port is None else f"{url.hostname}:{url.port}"
    return {**parts, "host": host}


# --------------------------------------------------------------------------- conversions


def _trio_time(moment: dt.datetime) -> float:
    """An aware UTC datetime from the SDK as a Trio-clock time."""
    return trio.current_time() + (moment - dt.datetime.now(dt.UTC)).total_seconds()


def _aware(moment: dt.datetime | None) -> dt.datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=dt.UTC)


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _body_bytes(message: Any) -> bytes:
    body = message.body
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    if body is None:
        return b""
    try:
        chunks = list(body)
    except TypeError:
        return str(body).encode("utf-8")
    if all(isinstance(chunk, bytes | bytearray) for chunk in chunks):
        return b"".join(chunks)
    return str(chunks).encode("utf-8")


def _property_value(value: object) -> object:
    # pyamqp decodes AMQP strings (and symbols) as bytes; give str back, as the MemoryBroker
    # does, unless the bytes are not text (then they were binary on the wire).
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


#: Stands in for a received message without an AMQP properties section.
_NO_PROPERTIES = AmqpMessageProperties()


def _message_from_sdk(message: Any, locked_until: dt.datetime | None) -> ReceivedMessage:
    """The SDK's ServiceBusReceivedMessage as our ReceivedMessage (kept as ``raw``)."""
    properties = {
        (key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)): (
            _property_value(value)
        )
        for key, value in (message.application_properties or {}).items()
    }
    token = message.lock_token
    enqueued = _aware(message.enqueued_time_utc) or dt.datetime.now(dt.UTC)
    # The AMQP properties section, read once: each of the SDK's accessors (session_id,
    # message_id, ...) first tests the section's truth, which lists its fields anew, and
    # eight of them cost the Azure path about 10 % of its CPU per message (issue #8).
    # The SDK's accessors return these fields UTF-8-decoded, as `_text` does.
    props = message.raw_amqp_message.properties
    if props is None:
        props = _NO_PROPERTIES
    return ReceivedMessage(
        body=_body_bytes(message),
        session_id=_text(props.group_id),
        message_id=_text(props.message_id),
        sequence_number=int(message.sequence_number or 0),
        delivery_count=int(message.delivery_count or 0),
        enqueued_time=enqueued,
        locked_until=_aware(message.locked_until_utc) or (locked_until if token else None),
        lock_token=None if token is None else str(token),
        application_properties=properties,
        content_type=_text(props.content_type),
        correlation_id=_text(props.correlation_id),
        subject=_text(props.subject),
        dead_letter_reason=_text(message.dead_letter_reason),
        dead_letter_error_description=_text(message.dead_letter_error_description),
        to=_text(props.to),
        reply_to=_text(props.reply_to),
        reply_to_session_id=_text(props.reply_to_group_id),
        time_to_live=(
            None if message.time_to_live is None else message.time_to_live.total_seconds()
        ),
        scheduled_enqueue_time=_aware(message.scheduled_enqueue_time_utc),
        partition_key=_text(message.partition_key),
        raw=message,
    )


def _message_to_sdk(message: Message) -> ServiceBusMessage:
    return ServiceBusMessage(
        message.body,
        session_id=message.session_id,
        message_id=message.message_id,
        application_properties=message.application_properties,  # type: ignore[arg-type]
        content_type=message.content_type,
        correlation_id=message.correlation_id,
        subject=message.subject,
        time_to_live=(
            None if message.time_to_live is None else dt.timedelta(seconds=message.time_to_live)
        ),
        to=message.to,
        reply_to=message.reply_to,
        reply_to_session_id=message.reply_to_session_id,
        scheduled_enqueue_time_utc=message.scheduled_enqueue_time,
        partition_key=message.partition_key,
    )


@contextlib.contextmanager
def _translate_sdk_errors() -> Iterator[None]:
    """Raise ours for the SDK's exceptions (``raise Ours(str(exc)) from exc``)."""
    try:
        yield
    except sdk_errors.ServiceBusError as exc:
        for sdk_type, ours in _SDK_ERRORS:
            if isinstance(exc, sdk_type):
                raise ours(str(exc)) from exc
        if _SESSIONS_NOT_ENABLED.search(str(exc)):
            raise SessionsNotEnabledError(str(exc)) from exc
        # A credential that cannot get a token (DefaultAzureCredential with no identity
        # signed in): the SDK wraps it in a plain "Handler failed" ServiceBusError.
        if isinstance(getattr(exc, "inner_exception", None), ClientAuthenticationError):
            raise AuthenticationError(str(exc)) from exc
        raise
    except sdk_errors.MessageAlreadySettled as exc:
        raise MessageAlreadySettledError(str(exc)) from exc
    except ClientAuthenticationError as exc:
        raise AuthenticationError(str(exc)) from exc


# --------------------------------------------------------------------------------- bridge


def _not_open() -> RuntimeError:
    return RuntimeError(
        "AzureServiceBus is not open: use it as 'async with AzureServiceBus...(...) as sb'"
    )


class _Preempted(Exception):
    """A preemptible SDK call was stopped early to let another call on its receiver in."""


class _Guard:
    """What a call's coroutine and its `_Call` share while part of the call must not be cut.

    While ``guarded`` is true, a preemption or a cancellation does not cancel the task:
    it sets ``stop_requested`` and waits (within `CLOSE_TIMEOUT`); the coroutine reads
    ``stop_requested`` when it leaves the guarded part and ends early by itself.
    """

    __slots__ = ("guarded", "stop_requested")

    def __init__(self) -> None:
        self.guarded = True
        self.stop_requested = False


@final
class _Call(Generic[T]):
    """One asyncio task in the backend's loop, awaited from Trio: the bridge crossing.

    This is trio-asyncio's ``aio_as_trio`` with three differences:

    - **Cancellation** is sent again until the task ends (within `CLOSE_TIMEOUT`): the
      SDK awaits ``asyncio.wait_for`` everywhere, and on Python 3.11 ``wait_for`` can
      swallow a cancellation that races its own timeout, so the single
      ``Task.cancel()`` of trio-asyncio sometimes did not stop an accept.
    - **Preemption**: `preempt` stops a waiting call (a receive) early so that another
      call on the same receiver can go first; `result` then raises `_Preempted`, unless
      the task finished anyway, in which case its result is kept (nothing is dropped).
      A call with a `_Guard` is neither preempted nor cancelled while guarded.
    - **Cost** (issue #8, P6): the coroutine wakes the waiting Trio task itself when it
      ends (no done callback, which asyncio would schedule as one more loop callback,
      and no `trio.Event`); the task is made by the loop directly.
    """

    __slots__ = ("_task", "_waiter", "_woken", "cancel_again_after", "guard")

    def __init__(self, loop: Any, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs):
        #: How long a cancelled task may go on before it is cancelled again.
        self.cancel_again_after = _CANCEL_AGAIN_AFTER
        self.guard: _Guard | None = None
        self._waiter: trio.lowlevel.Task | None = None
        self._woken = False
        self._task: asyncio.Task[T] = loop.create_task(self._run(fn, args, kwargs))

    async def _run(self, fn: Callable[..., Awaitable[T]], args: Any, kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        finally:
            # Runs inside the loop's Trio task, in the same thread: the waiter wakes as
            # soon as this step of the asyncio task (which sets its result) is over.
            self._wake()

    def _wake(self) -> None:
        self._woken = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            trio.lowlevel.reschedule(waiter)

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def preempt(self) -> None:
        if self.guard is not None:
            self.guard.stop_requested = True
        self._wake()

    async def result(self) -> T:
        try:
            if self._woken:
                await trio.lowlevel.checkpoint()
            else:
                self._waiter = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort)
        except trio.Cancelled:
            await self._stop()  # noqa: ASYNC102 - _stop shields itself, with a deadline
            if self._task.done() and not self._task.cancelled():
                self._task.exception()  # retrieved: asyncio must not log it as never retrieved
            raise
        if not self._task.done():
            await self._stop()
            if not self._task.done():
                # Still running after CLOSE_TIMEOUT of cancellations: the receiver cannot
                # be used safely any more, so its session ends as after a lost connection.
                raise ServiceBusConnectionError(
                    f"an SDK call did not stop within {CLOSE_TIMEOUT} s of being cancelled"
                )
        if self._task.cancelled():
            raise _Preempted
        return self._task.result()

    async def _stop(self) -> None:
        guard = self.guard
        if guard is not None:
            guard.stop_requested = True
        done = trio.Event()
        self._task.add_done_callback(lambda _: done.set())
        with trio.CancelScope(deadline=trio.current_time() + CLOSE_TIMEOUT, shield=True):
            while not self._task.done():
                if guard is None or not guard.guarded:
                    self._task.cancel()
                with trio.move_on_after(self.cancel_again_after):
                    await done.wait()
        if guard is not None and not self._task.done():
            self._task.cancel()  # the guarded part overran CLOSE_TIMEOUT: cut it after all


def _track_amqp_clients(handler: Any) -> list[Any]:
    """Remember each pyamqp client that ``handler`` creates (see `_close_stranded_connections`)."""
    created: list[Any] = []
    create = handler._create_handler

    def tracking_create(*args: Any, **kwargs: Any) -> None:
        create(*args, **kwargs)
        created.append(handler._handler)

    handler._create_handler = tracking_create
    return created


async def _close_stranded_connections(clients: list[Any]) -> None:
    """Close the sockets the SDK strands when an open is cancelled (runs in asyncio).

    Workaround: pyamqp's ``AMQPClientAsync.close_async`` returns at once when it has no
    AMQP session yet (``if not self._session: return``), so an open cancelled while it
    connects leaves its TCP connection open until garbage collection.
    """
    for client in clients:
        connection = getattr(client, "_connection", None)
        if connection is not None and getattr(client, "_session", None) is None:
            await connection.close()


def _speed_up_loop(loop: Any) -> None:
    """Give a trio-asyncio loop this backend opened asyncio's own shape (see `_aioloop`)."""
    _aioloop.adopt(loop)


# ------------------------------------------------------------------------------- backend


@final
class AzureServiceBus:
    """Azure Service Bus through the ``azure-servicebus`` asyncio SDK, bridged to Trio.

    Use it as an async context manager, opened before the session manager::

        async with AzureServiceBus.from_connection_string(conn_str) as sb, \\
                open_session_manager(sb, queue_name="docs") as manager:
            await manager.subscribe(process_message)

    Entering opens one trio-asyncio loop for the backend's whole life, unless one is
    running already (then it is reused), and builds the SDK's ``ServiceBusClient`` in it.
    Leaving closes every receiver and sender it opened, then the client, then the loop
    it opened.

    Args:
        fully_qualified_namespace: ``"<namespace>.servicebus.windows.net"``.
        credential: any azure-core async credential: ``DefaultAzureCredential`` from
            ``azure.identity.aio`` (the ``identity`` extra), ``AzureNamedKeyCredential``,
            ``AzureSasCredential``.
        **client_kwargs: passed to ``azure.servicebus.aio.ServiceBusClient`` (for
            example ``retry_total``, ``transport_type``, ``logging_enable``).

    Scaling out: run more processes on more hosts against the same entity; Service Bus
    session locks keep each session with one receiver at a time.
    """

    def __init__(self, fully_qualified_namespace: str, credential: object, **client_kwargs: Any):
        if not isinstance(fully_qualified_namespace, str) or not fully_qualified_namespace.strip():
            raise ValueError(
                "fully_qualified_namespace must be a host name such as "
                f"'<namespace>.servicebus.windows.net', not {fully_qualified_namespace!r}"
            )
        if "://" in fully_qualified_namespace or "/" in fully_qualified_namespace.strip("/"):
            raise ValueError(
                "fully_qualified_namespace must be a bare host name such as "
                f"'<namespace>.servicebus.windows.net', not {fully_qualified_namespace!r}"
            )
        self._namespace = fully_qualified_namespace.strip("/")
        self._credential = credential
        self._client_kwargs = client_kwargs
        self._conn_str: str | None = None
        self._owns_credential = False
        self._stack: AsyncExitStack | None = None
        self._loop: Any = None
        self._client: ServiceBusClient | None = None
        self._links: set[AzureSessionLink] = set()
        self._senders: dict[str, tuple[trio.Lock, ServiceBusSender]] = {}
        self._senders_lock = trio.Lock()

    @classmethod
    def from_connection_string(cls, conn_str: str, **client_kwargs: Any) -> AzureServiceBus:
        """Build from ``Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...``.

        The string is checked here, before any connection is made (see
        ``parse_connection_string``); ``UseDevelopmentEmulator=true`` strings (the
        emulator's) work too.

        Raises:
            ValueError: a part of the string is missing or malformed (named in the message).
        """
        parts = parse_connection_string(conn_str)
        self = cls(parts["host"].partition(":")[0], None, **client_kwargs)
        self._conn_str = conn_str
        return self

    @classmethod
    def _with_default_credential(cls, namespace: str, **client_kwargs: Any) -> AzureServiceBus:
        """Sign in with ``azure.identity.aio.DefaultAzureCredential``, closed on exit.

        For ``trio-sessions run --namespace``: the credential is the backend's own, so
        it is closed in the backend's asyncio loop, after the client.

        Raises:
            ImportError: the ``identity`` extra (azure-identity) is not installed.
        """
        # Imported by name: azure-identity is optional, and mypy may not see it.
        identity = importlib.import_module("azure.identity.aio")
        self = cls(namespace, identity.DefaultAzureCredential(), **client_kwargs)
        self._owns_credential = True
        return self

    def __repr__(self) -> str:
        state = "open" if self._client is not None else "closed"
        return f"<AzureServiceBus {self._namespace!r} {state}>"

    @property
    def fully_qualified_namespace(self) -> str:
        """The namespace's host name."""
        return self._namespace

    async def __aenter__(self) -> AzureServiceBus:
        if self._stack is not None:
            raise RuntimeError(f"{self!r} is already open; enter it once")
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            loop = trio_asyncio.current_loop.get()
            if loop is None:
                loop = await stack.enter_async_context(trio_asyncio.open_loop())
                _speed_up_loop(loop)
            self._loop = loop
            self._client = await self._call(self._make_client)
            stack.push_async_callback(self._close_everything)
        except BaseException as exc:
            self._loop = None
            # Not shielded: the loop's nursery, entered above, must exit outside any scope
            # opened after it; _close_everything shields the part that needs it.
            await stack.__aexit__(type(exc), exc, exc.__traceback__)  # noqa: ASYNC102
            raise
        self._stack = stack
        return self

    async def _make_client(self) -> ServiceBusClient:
        # Built inside the asyncio loop: the SDK may look for the running loop.
        if self._conn_str is not None:
            return ServiceBusClient.from_connection_string(self._conn_str, **self._client_kwargs)
        return ServiceBusClient(self._namespace, self._credential, **self._client_kwargs)  # type: ignore[arg-type]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        try:
            # Not shielded, as in __aenter__: _close_everything shields what needs it.
            return bool(await stack.__aexit__(exc_type, exc, tb))  # noqa: ASYNC102
        except BaseExceptionGroup as group:
            # The loop's nursery wraps the body's own exception; let it leave as itself
            # (as open_session_manager does), never an unrelated one.
            if exc is not None:
                mine, rest = group.split(lambda error: error is exc)
                if mine is not None and rest is None:
                    return False
            raise

    async def _close_everything(self) -> None:
        with trio.CancelScope(deadline=trio.current_time() + CLOSE_TIMEOUT, shield=True):
            for link in list(self._links):
                await link.aclose()
            senders = [sender for _, sender in self._senders.values()]
            self._senders.clear()
            for sender in senders:
                with contextlib.suppress(SessionsError, sdk_errors.ServiceBusError):
                    await self._call(sender.close)
            client, self._client = self._client, None
            if client is not None:
                with contextlib.suppress(SessionsError, sdk_errors.ServiceBusError):
                    await self._call(client.close)
            close_credential = getattr(self._credential, "close", None)
            if self._owns_credential and close_credential is not None:
                with contextlib.suppress(Exception):
                    await self._call(close_credential)
        self._loop = None

    async def _call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run an asyncio function in the backend's loop: the one bridge crossing."""
        with _translate_sdk_errors():
            return await self._start(fn, *args, **kwargs).result()

    def _start(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> _Call[T]:
        """Start a call that can be preempted; await its `_Call.result` inside `_translate`."""
        if self._loop is None:
            raise _not_open()
        return _Call(self._loop, fn, *args, **kwargs)

    def _require_client(self) -> ServiceBusClient:
        if self._client is None:
            raise _not_open()
        return self._client

    # -- Backend ---------------------------------------------------------------------------

    async def accept_session(
        self,
        entity: EntityPath,
        session_id: str | None = None,
        *,
        receive_mode: ReceiveMode = ReceiveMode.PEEK_LOCK,
        max_wait_time: float | None = None,
        prefetch_count: int = 0,
    ) -> AzureSessionLink:
        """Lock a session through a new SDK session receiver.

        The wait for a next-available session happens on the server (``max_wait_time``
        becomes the receiver's ``max_wait_time``, sent as ``com.microsoft:timeout``).

        **Cancellation**: cancelling the wait cancels the SDK's open, and the receiver
        is closed (its link detached) before this raises `trio.Cancelled`.

        Raises:
            OperationTimeoutError: no session became available within ``max_wait_time``.
            SessionCannotBeLockedError: another receiver holds ``session_id``.
            EntityNotFoundError: the entity does not exist.
            SessionsNotEnabledError: the entity does not require sessions.
        """
        client = self._require_client()
        kwargs: dict[str, Any] = {
            "session_id": NEXT_AVAILABLE_SESSION if session_id is None else session_id,
            "receive_mode": (
                ServiceBusReceiveMode.PEEK_LOCK
                if receive_mode is ReceiveMode.PEEK_LOCK
                else ServiceBusReceiveMode.RECEIVE_AND_DELETE
            ),
            "prefetch_count": prefetch_count,
        }
        if max_wait_time is not None and max_wait_time != float("inf"):
            kwargs["max_wait_time"] = max(max_wait_time, 0.001)
        if entity.queue_name is not None:
            receiver = client.get_queue_receiver(entity.queue_name, **kwargs)
        else:
            assert entity.topic_name is not None
            assert entity.subscription_name is not None
            receiver = client.get_subscription_receiver(
                entity.topic_name, entity.subscription_name, **kwargs
            )
        # The manager retries (RetryPolicy): the SDK's own retries would multiply every wait
        # (an accept with max_wait_time=0.2 took 15 s with its defaults). The client's
        # retry settings still apply to sends; receivers take no retry_total of their own.
        receiver._config.retry_total = 0
        await self._open_handler(receiver)
        link = AzureSessionLink(self, receiver, receive_mode)
        self._links.add(link)
        return link

    async def _open_handler(self, handler: ServiceBusReceiver | ServiceBusSender) -> None:
        """Open an SDK receiver or sender; on failure or cancellation, close all it opened.

        Cancellation reaches the SDK's open (see `_Call`), and the link is closed
        (detached) before `trio.Cancelled` propagates.
        """
        opened = _track_amqp_clients(handler)
        try:
            await self._call(handler.__aenter__)
        except BaseException:
            with trio.CancelScope(deadline=trio.current_time() + CLOSE_TIMEOUT, shield=True):
                with contextlib.suppress(Exception):
                    await self._call(handler.close)
                with contextlib.suppress(Exception):
                    await self._call(_close_stranded_connections, opened)
            raise

    async def send(self, entity: str, messages: Message | Sequence[Message]) -> None:
        """Send one message, or a list as one batch, to a queue or topic.

        Senders are opened on first use, one per entity, and kept until the backend
        closes; concurrent sends to one entity take turns on it.

        Raises:
            TypeError: not a `Message` or a list of them.
            EntityNotFoundError: no such queue or topic.
            MessageSizeExceededError: a message, or the batch, is larger than the entity
                allows (a `ValueError`).
        """
        if isinstance(messages, Message):
            batch: list[Message] | Message = messages
        else:
            batch = list(messages)
            for item in batch:
                if not isinstance(item, Message):
                    raise TypeError(f"send() takes Message objects, not {type(item).__name__}")
            if not batch:
                return
        if not isinstance(entity, str) or not entity:
            raise ValueError(f"entity must be a queue or topic name, not {entity!r}")
        lock, sender = await self._sender(entity)
        payload = (
            _message_to_sdk(batch)
            if isinstance(batch, Message)
            else [_message_to_sdk(item) for item in batch]
        )
        async with lock:
            await self._call(sender.send_messages, payload)

    async def _sender(self, entity: str) -> tuple[trio.Lock, ServiceBusSender]:
        async with self._senders_lock:
            found = self._senders.get(entity)
            if found is None:
                sender = self._require_client().get_queue_sender(entity)
                await self._open_handler(sender)
                found = self._senders[entity] = (trio.Lock(), sender)
            return found


# ---------------------------------------------------------------------------------- link


async def _settle_all(
    receiver: ServiceBusReceiver,
    settlements: Sequence[tuple[Settlement, Any]],
    results: list[BaseException | None] | None = None,
) -> list[BaseException | None]:
    """Settle several messages in one bridge crossing (runs in asyncio).

    Each result is appended to ``results`` (a new list if None) as soon as it is known.
    """
    if results is None:
        results = []
    for settlement, raw in settlements:
        try:
            with _translate_sdk_errors():
                if isinstance(settlement, Complete):
                    await receiver.complete_message(raw)
                elif isinstance(settlement, Abandon):
                    await receiver.abandon_message(raw)
                elif isinstance(settlement, DeadLetter):
                    await receiver.dead_letter_message(
                        raw,
                        reason=settlement.reason,
                        error_description=settlement.error_description,
                    )
                else:
                    await receiver.defer_message(raw)
        except (SessionsError, ValueError) as exc:
            results.append(exc)
        else:
            results.append(None)
    return results


async def _settle_then_receive(
    guard: _Guard,
    receiver: ServiceBusReceiver,
    settlements: Sequence[tuple[Settlement, Any]],
    on_settled: Callable[[list[BaseException | None]], None],
    max_count: int,
    deadline: float,
) -> tuple[list[BaseException | None], list[Any] | None, BaseException | None]:
    """Settle, report the results, then receive, in one crossing (runs in asyncio).

    Returns the results, the batch (None when the receive was skipped or cut short),
    and what ``on_settled`` raised. The settlements run guarded (see `_Guard`); the
    receive does not, and its cancellation (a preemption, or the caller's) ends the call
    with no batch, since the settlements are done and reported.
    """
    results: list[BaseException | None] = []
    try:
        await _settle_all(receiver, settlements, results)
    finally:
        guard.guarded = False
        if len(results) < len(settlements):  # cut after CLOSE_TIMEOUT (see _Call._stop)
            results.extend(
                ServiceBusConnectionError("the settlement was cut short by a cancellation")
                for _ in range(len(settlements) - len(results))
            )
        try:
            on_settled(results)
        except Exception as exc:
            callback_error: BaseException | None = exc
        else:
            callback_error = None
    if callback_error is not None or guard.stop_requested:
        return results, None, callback_error
    for error in results:
        if isinstance(error, SessionLockLostError):
            return results, None, None
    wait = min(RECEIVE_SLICE, deadline - trio.current_time())  # the loop runs in Trio
    if wait <= 0:
        return results, [], None
    try:
        batch = await receiver.receive_messages(max_message_count=max_count, max_wait_time=wait)
    # The task ends right here, so nothing above it waits for this cancellation to
    # propagate: the settlements are done and must not be lost with it.
    except asyncio.CancelledError:  # noqa: ASYNC103
        return results, None, None  # noqa: ASYNC104
    return results, batch, None


@final
class AzureSessionLink(SingleSettlements):
    """One accepted session: an SDK session receiver, used by one task at a time."""

    def __init__(
        self, backend: AzureServiceBus, receiver: ServiceBusReceiver, receive_mode: ReceiveMode
    ) -> None:
        self._backend = backend
        self._receiver = receiver
        self._receive_mode = receive_mode
        self._session = receiver.session
        self._session_id = str(self._session.session_id)
        self._lock = trio.Lock()
        self._locked_until_utc = _aware(self._session.locked_until_utc) or dt.datetime.now(dt.UTC)
        self._locked_until = _trio_time(self._locked_until_utc)
        self._on_lock_lost: Callable[[SessionLockLostError], None] | None = None
        self._receiving: _Call[Any] | None = None
        self._waiting = 0  # calls other than receive waiting for the lock
        self._closed = False

    def __repr__(self) -> str:
        return f"<AzureSessionLink session {self._session_id!r}>"

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def locked_until(self) -> float:
        return self._locked_until

    @property
    def locked_until_utc(self) -> dt.datetime:
        return self._locked_until_utc

    def on_lock_lost(self, callback: Callable[[SessionLockLostError], None]) -> None:
        self._on_lock_lost = callback

    def _lost(self, error: SessionLockLostError) -> None:
        callback, self._on_lock_lost = self._on_lock_lost, None
        if callback is not None:
            callback(error)

    async def _acquire(self) -> None:
        """Take the lock, as a call other than a receive (which gives way to these).

        Uncontended, without `trio.Lock.acquire`'s checkpoint: the crossing that follows
        is one, and a scheduler pass per crossing is a fifth of its cost (issue #8, P6).
        """
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            self._waiting += 1
            try:
                await self._lock.acquire()
            finally:
                self._waiting -= 1

    async def _sdk(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """One SDK call on this receiver, alone on it (the lock), through the chokepoint.

        A waiting receive is preempted, so settlements and renewals never wait for it.
        """
        if self._closed:
            raise trio.ClosedResourceError(f"session {self._session_id!r} is closed")
        if self._receiving is not None:
            self._receiving.preempt()
        await self._acquire()
        try:
            try:
                return await self._backend._call(fn, *args, **kwargs)
            except SessionLockLostError as exc:
                self._lost(exc)
                raise
        finally:
            self._lock.release()

    async def receive(self, max_count: int) -> list[ReceivedMessage]:
        """Wait for at least one message; return up to ``max_count`` in session order.

        The wait is a series of SDK receives of at most `RECEIVE_SLICE` seconds each; any
        other call on this link (a settlement, a renewal) preempts the one under way,
        goes first (Trio's lock is fair), and the receive then carries on.

        **Cancellation**: the SDK's receive is cancelled and the link stays usable (the
        actor still settles what is in flight, then closes it). A message that reaches
        the SDK after the cancellation is released back to the session (prefetch 0) or
        kept in the SDK's buffer for the next receive.
        """
        return await self._receive(max_count, math.inf)

    async def _receive(self, max_count: int, deadline: float) -> list[ReceivedMessage]:
        """`receive`, or an empty list once the Trio-clock ``deadline`` has passed."""
        first = True
        while True:
            if self._closed:
                raise trio.ClosedResourceError(f"session {self._session_id!r} is closed")
            wait = min(RECEIVE_SLICE, deadline - trio.current_time())
            if wait <= 0:
                await trio.lowlevel.checkpoint()
                return []
            if first:  # uncontended, no checkpoint (see _acquire); the crossing is one
                first = False
                try:
                    self._lock.acquire_nowait()
                except trio.WouldBlock:
                    await self._lock.acquire()
            else:
                await self._lock.acquire()
            try:
                if self._waiting:
                    continue  # another call queued first: let it go (the lock is fair)
                call = self._receiving = self._backend._start(
                    self._receiver.receive_messages,
                    max_message_count=max_count,
                    max_wait_time=wait,
                )
                # A receive has no cleanup worth waiting for, and the lock renewal may be
                # the call waiting behind it: a swallowed cancellation is sent again soon.
                call.cancel_again_after = _CANCEL_RECEIVE_AGAIN_AFTER
                try:
                    with _translate_sdk_errors():
                        batch = await call.result()
                except _Preempted:
                    continue
                except SessionLockLostError as exc:
                    self._lost(exc)
                    raise
                finally:
                    self._receiving = None
            finally:
                self._lock.release()
            if batch:
                return [_message_from_sdk(m, self._locked_until_utc) for m in batch]

    async def settle(self, settlements: Sequence[Settlement]) -> list[BaseException | None]:
        """Apply several settlements in order, in one bridge crossing."""
        pairs = [(settlement, settlement.message.raw) for settlement in settlements]
        results = await self._sdk(_settle_all, self._receiver, pairs)
        for error in results:
            if isinstance(error, SessionLockLostError):
                self._lost(error)
                break
        return results

    async def settle_and_receive(
        self,
        settlements: Sequence[Settlement],
        on_settled: Callable[[list[BaseException | None]], None],
        max_count: int,
        deadline: float = math.inf,
    ) -> list[ReceivedMessage]:
        """Apply settlements in order, then wait for messages as `receive`, in one crossing.

        The wait ends at the Trio-clock ``deadline`` (the SDK's receive waits no longer
        than it), with an empty list.

        ``on_settled(results)`` is called exactly once, synchronously in the Trio thread
        (inside the backend's asyncio loop, so it must not block or await), as soon as
        the settlements are done and before the wait for messages; ``results`` are as
        `settle` returns them. An exception it raises skips the receive and is raised here.

        The settlements cannot be preempted: a call that comes for the link meanwhile
        waits for them, then cuts the receive short (which carries on as `receive` does,
        after it). **Cancellation** before the settlements are done does not stop them:
        they complete (within `CLOSE_TIMEOUT`), ``on_settled`` is called, then
        `trio.Cancelled` is raised; cancellation during the receive is as in `receive`.

        Raises:
            SessionLockLostError: a settlement found the lock lost (that same error),
                or the receive did.
            trio.ClosedResourceError: the link is closed (nothing was settled, and
                ``on_settled`` is not called).
        """
        if self._closed:
            raise trio.ClosedResourceError(f"session {self._session_id!r} is closed")
        pairs = [(settlement, settlement.message.raw) for settlement in settlements]
        if self._receiving is not None:
            self._receiving.preempt()
        try:
            self._lock.acquire_nowait()  # uncontended, no checkpoint (see _acquire)
        except trio.WouldBlock:
            # The settlements must be applied even if we are cancelled while waiting
            # our turn: the wait is for another call on this link, cut short above.
            with trio.CancelScope(
                shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT
            ) as waited:
                await self._acquire()
            late = waited.cancelled_caught
        else:
            late = False
        if late:
            error = ServiceBusConnectionError(
                f"another call held session {self._session_id!r} for {CLOSE_TIMEOUT} s"
            )
            on_settled([error] * len(pairs))
            raise error
        try:
            if self._closed:
                raise trio.ClosedResourceError(f"session {self._session_id!r} is closed")
            guard = _Guard()
            if self._waiting:
                guard.stop_requested = True  # another call queued first: settle only
            call = self._receiving = self._backend._start(
                _settle_then_receive,
                guard,
                self._receiver,
                pairs,
                on_settled,
                max_count,
                deadline,
            )
            call.guard = guard
            call.cancel_again_after = _CANCEL_RECEIVE_AGAIN_AFTER
            try:
                with _translate_sdk_errors():
                    results, batch, callback_error = await call.result()
            except _Preempted:  # pragma: no cover - only when the settlements overran
                raise ServiceBusConnectionError(
                    f"settling on session {self._session_id!r} was cut short"
                ) from None
            except SessionLockLostError as exc:
                self._lost(exc)
                raise
            finally:
                self._receiving = None
        finally:
            self._lock.release()
        if callback_error is not None:
            raise callback_error
        for error in results:
            if isinstance(error, SessionLockLostError):
                self._lost(error)
                raise error
        if batch:
            return [_message_from_sdk(m, self._locked_until_utc) for m in batch]
        # Preempted, or a slice with no message: carry on as receive does, holding
        # nothing settled (and no SDK message) through the wait.
        del settlements, pairs, results, call, batch
        return await self._receive(max_count, deadline)

    async def _settle_single(self, settlement: Settlement) -> None:
        (error,) = await self.settle([settlement])
        if error is not None:
            raise error

    async def receive_deferred(self, sequence_numbers: Sequence[int]) -> list[ReceivedMessage]:
        """Receive deferred messages by sequence number (`MessageNotFoundError` if unknown)."""
        batch = await self._sdk(
            self._receiver.receive_deferred_messages, [int(n) for n in sequence_numbers]
        )
        return [_message_from_sdk(m, self._locked_until_utc) for m in batch]

    async def renew_lock(self) -> float:
        """Renew the session lock (the SDK session's ``renew_lock``); return `locked_until`."""
        moment = await self._sdk(self._session.renew_lock)
        self._locked_until_utc = _aware(moment) or self._locked_until_utc
        self._locked_until = _trio_time(self._locked_until_utc)
        return self._locked_until

    async def get_state(self) -> bytes | None:
        state: Any = await self._sdk(self._session.get_state)
        if state is None:
            return None
        return bytes(state) if isinstance(state, bytes | bytearray) else str(state).encode()

    async def set_state(self, state: bytes | None) -> None:
        await self._sdk(self._session.set_state, state)

    async def aclose(self) -> None:
        """Close the receiver: the session lock is released and unsettled messages return."""
        if self._closed:
            return
        self._closed = True
        self._backend._links.discard(self)
        if self._receiving is not None:
            self._receiving.preempt()
        async with self._lock:
            with contextlib.suppress(SessionsError, sdk_errors.ServiceBusError):
                await self._backend._call(self._receiver.close)
