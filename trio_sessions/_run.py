"""``trio-sessions run MODULE:HANDLER``: a production runner for one queue or subscription.

::

    run(args) ── usage checks (exit 2): handler, entity, options, credentials
       └─ trio.run(Runner.serve)
            ├─ signal watcher: 1st SIGINT/SIGTERM → manager.stop() (drain), 2nd → cancel
            ├─ status reporter: a live line on a terminal, else periodic log records
            └─ manager.subscribe(handler) / subscribe_sessions(handler)

Exit codes: 0 after a clean drain, 1 after a fatal error (one line says what went wrong
and how to fix it), 2 for bad usage (handler, flags, credentials), 128 + the signal
number (130 for SIGINT, 143 for SIGTERM) when a second signal cancelled the handlers.

Nothing here prints or logs a key or a connection string: endpoints are shown as their
host alone, and every line this command writes passes through `mask_secrets`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import inspect
import json
import logging
import math
import os
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, TextIO, final

import attrs
import trio

from ._errors import (
    FATAL_ERRORS,
    AuthenticationError,
    EntityNotFoundError,
    ErrorContext,
    ErrorSource,
    SessionsNotEnabledError,
)
from ._manager import open_session_manager
from ._options import ReceiveMode, RetryPolicy, SessionManagerOptions
from ._redact import redact

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

    from ._manager import SessionManager
    from ._stats import ManagerStats

__all__ = ["EXIT_FATAL", "EXIT_OK", "EXIT_USAGE", "UsageError", "add_run_parser", "run"]

logger = logging.getLogger("trio_sessions.run")

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
#: Environment variable read when --connection-string is not given.
CONNECTION_STRING_ENV = "SERVICEBUS_CONNECTION_STR"
#: How often the live status line on a terminal is redrawn (seconds).
LIVE_REFRESH = 1.0

_OPTION_FLAGS: dict[str, str] = {
    "max_concurrent_sessions": "--max-concurrent-sessions",
    "max_concurrent_calls_per_session": "--max-concurrent-calls-per-session",
    "session_idle_timeout": "--session-idle-timeout",
    "max_auto_lock_renewal_duration": "--max-auto-lock-renewal-duration",
    "auto_complete": "--auto-complete",
    "prefetch_count": "--prefetch-count",
    "session_ids": "--session-id",
    "accept_timeout": "--accept-timeout",
    "shutdown_timeout": "--shutdown-timeout",
}
_RETRY_FLAGS: dict[str, str] = {
    "initial_delay": "--retry-initial-delay",
    "max_delay": "--retry-max-delay",
    "multiplier": "--retry-multiplier",
    "jitter": "--retry-jitter",
}

#: One masking for everything this command writes: the library's own.
mask_secrets = redact


class UsageError(Exception):
    """Bad input on the command line: reported in one line, exit code 2."""


# ------------------------------------------------------------------------------- arguments


def _default(cls: type[Any], name: str) -> object:
    field = getattr(attrs.fields(cls), name)
    if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        return field.default.factory()
    return field.default


def add_run_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``run`` sub-command to ``commands`` (an argparse subparsers action)."""
    run_parser: argparse.ArgumentParser = commands.add_parser(
        "run",
        help="process a real queue or subscription with your handler",
        description=(
            "Process a Service Bus queue or subscription with HANDLER from MODULE (imported "
            "with the current directory on sys.path, like python -m). HANDLER is "
            "'async def handler(message, context)', or with --sessions "
            "'async def handler(session)'. The first SIGINT or SIGTERM stops accepting "
            "sessions and drains within --shutdown-timeout; a second one cancels at once. "
            "Exit codes: 0 stopped cleanly, 1 fatal error, 2 bad usage, 130/143 cancelled "
            "by a second SIGINT/SIGTERM."
        ),
    )
    run_parser.add_argument("target", metavar="MODULE:HANDLER", help="e.g. myapp.handlers:process")
    entity = run_parser.add_argument_group("entity (--queue, or --topic with --subscription)")
    entity.add_argument("--queue", metavar="NAME")
    entity.add_argument("--topic", metavar="NAME")
    entity.add_argument("--subscription", metavar="NAME")
    conn = run_parser.add_argument_group(
        "connection (--connection-string or --namespace, else $SERVICEBUS_CONNECTION_STR)"
    )
    conn.add_argument(
        "--connection-string",
        metavar="STR",
        help=f"a SAS connection string (prefer ${CONNECTION_STRING_ENV}: arguments are visible to ps)",
    )
    conn.add_argument(
        "--namespace",
        metavar="HOST",
        help=(
            "the namespace ('<name>' or '<name>.servicebus.windows.net'), signed in with "
            'DefaultAzureCredential (needs: pip install "trio-sessions[identity]")'
        ),
    )
    conn.add_argument(
        "--sdk-retry-total",
        type=int,
        default=None,
        metavar="N",
        help=(
            "retries inside the azure-servicebus SDK, under the manager's own "
            "(--retry-*) [the SDK's default, 3]; 0 makes fatal errors surface at once"
        ),
    )
    behaviour = run_parser.add_argument_group("processing")
    behaviour.add_argument(
        "--sessions",
        action="store_true",
        help="the actor form: HANDLER is 'async def handler(session)', called once per session",
    )
    behaviour.add_argument(
        "--receive-and-delete",
        action="store_true",
        help="settle each message as it is received (lost if the handler fails)",
    )
    options = run_parser.add_argument_group("options (SessionManagerOptions; defaults in brackets)")

    def option(name: str, kind: Callable[[str], object], help_text: str, **kw: Any) -> None:
        default = _default(SessionManagerOptions, name)
        options.add_argument(
            _OPTION_FLAGS[name],
            dest=name,
            type=kind,
            default=argparse.SUPPRESS,
            help=f"{help_text} [{default}]",
            **kw,
        )

    option("max_concurrent_sessions", int, "sessions held at once", metavar="N")
    option(
        "max_concurrent_calls_per_session", int, "handler calls in flight per session", metavar="N"
    )
    option(
        "session_idle_timeout",
        float,
        "seconds without a message before a session is released",
        metavar="S",
    )
    option(
        "max_auto_lock_renewal_duration",
        float,
        "seconds to keep renewing a session lock (0: never, inf: forever)",
        metavar="S",
    )
    options.add_argument(
        "--auto-complete",
        dest="auto_complete",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="complete when the handler returns, abandon when it raises [True]",
    )
    option("prefetch_count", int, "messages received ahead per session", metavar="N")
    options.add_argument(
        "--session-id",
        dest="session_ids",
        action="append",
        default=argparse.SUPPRESS,
        metavar="ID",
        help="only this session (repeatable) instead of the next available ones",
    )
    option("accept_timeout", float, "seconds one accept waits for a free session", metavar="S")
    option(
        "shutdown_timeout",
        float,
        "grace for handlers in flight on the first signal",
        metavar="S",
    )
    for name, flag in _RETRY_FLAGS.items():
        options.add_argument(
            flag,
            dest=f"retry_{name}",
            type=float,
            default=argparse.SUPPRESS,
            metavar="X",
            help=f"RetryPolicy.{name} for transient errors [{_default(RetryPolicy, name)}]",
        )
    output = run_parser.add_argument_group("output")
    output.add_argument("--log-format", choices=["text", "json"], default="text")
    output.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default="INFO"
    )
    output.add_argument(
        "--status-interval",
        type=float,
        default=30.0,
        metavar="S",
        help=(
            "seconds between status log lines when stderr is not a terminal, or with "
            "--log-format json (0: none) [30.0]"
        ),
    )
    return run_parser


def build_options(args: argparse.Namespace) -> SessionManagerOptions:
    """The `SessionManagerOptions` the flags ask for; bad values raise `UsageError`."""
    given = vars(args)
    retry_kwargs = {
        name: given[f"retry_{name}"] for name in _RETRY_FLAGS if f"retry_{name}" in given
    }
    try:
        retry = RetryPolicy(**retry_kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(_name_the_flag(str(exc), _RETRY_FLAGS)) from None
    kwargs = {name: given[name] for name in _OPTION_FLAGS if name in given}
    try:
        return SessionManagerOptions(retry=retry, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(_name_the_flag(str(exc), _OPTION_FLAGS)) from None


def _name_the_flag(message: str, flags: Mapping[str, str]) -> str:
    """Prefix an options error (which names its field first) with the flag to change."""
    for name in sorted(flags, key=len, reverse=True):
        if message.startswith(name):
            return f"{flags[name]}: {message}"
    return message


@attrs.frozen
class Entity:
    """The queue, or topic and subscription, named by the flags."""

    queue_name: str | None = None
    topic_name: str | None = None
    subscription_name: str | None = None

    def describe(self) -> str:
        if self.queue_name is not None:
            return f"queue {self.queue_name!r}"
        return f"subscription {self.subscription_name!r} of topic {self.topic_name!r}"


def entity_from(args: argparse.Namespace) -> Entity:
    """``--queue``, or ``--topic`` with ``--subscription``; anything else is a `UsageError`."""
    queue, topic, subscription = args.queue, args.topic, args.subscription
    if queue is not None and topic is None and subscription is None:
        if not queue:
            raise UsageError("--queue needs a queue name")
        return Entity(queue_name=queue)
    if queue is None and topic and subscription:
        return Entity(topic_name=topic, subscription_name=subscription)
    if queue is None and topic is None and subscription is None:
        raise UsageError("name the entity: --queue NAME, or --topic NAME with --subscription NAME")
    if queue is not None:
        raise UsageError("give either --queue, or --topic with --subscription, not both")
    if not topic:
        raise UsageError("--subscription needs --topic NAME (the topic it belongs to)")
    raise UsageError("--topic needs --subscription NAME (the subscription to read)")


# ------------------------------------------------------------------------------- handlers


def _is_async_callable(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    return (
        callable(fn)
        and not inspect.isroutine(fn)
        and not inspect.isclass(fn)
        and inspect.iscoroutinefunction(type(fn).__call__)
    )


def _kind_of(obj: object) -> str:
    if inspect.isasyncgenfunction(obj):
        return "an async generator function"
    if inspect.isclass(obj):
        return f"the class {obj.__name__}"
    if inspect.isroutine(obj):
        return "a regular (sync) function"
    return f"a {type(obj).__name__} object"


def load_handler(target: str, *, sessions: bool) -> Callable[..., Awaitable[object]]:
    """Import ``MODULE:HANDLER`` and check it is the right kind of async function.

    The current directory is put first on ``sys.path`` (as ``python -m`` does), so a
    module next to where the command runs is found.

    Raises:
        UsageError: the target is malformed, the module fails to import, the attribute
            is missing, or it is not an async function taking the right arguments.
    """
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise UsageError(
            f"expected MODULE:HANDLER (for example myapp.handlers:process), got {target!r}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + ".")
        ):
            raise UsageError(
                f"cannot import module {module_name!r}: no module named {exc.name!r} "
                f"(looked in the current directory, {cwd}, and on sys.path)"
            ) from None
        raise UsageError(
            f"cannot import module {module_name!r}: {_one_line(exc)}{_where(exc)}"
        ) from None
    except Exception as exc:
        raise UsageError(
            f"cannot import module {module_name!r}: {_one_line(exc)}{_where(exc)}"
        ) from None
    handler: object = module
    for part in attr_path.split("."):
        try:
            handler = getattr(handler, part)
        except AttributeError:
            found = sorted(
                name
                for name, value in vars(module).items()
                if not name.startswith("_")
                and _is_async_callable(value)
                and getattr(value, "__module__", None) == module.__name__
            )
            hint = f" (its async functions: {', '.join(found)})" if found else ""
            raise UsageError(
                f"module {module_name!r} has no attribute {attr_path!r}{hint}"
            ) from None
    expected = "async def handler(session)" if sessions else "async def handler(message, context)"
    if not _is_async_callable(handler):
        raise UsageError(
            f"{target} must be an async function, {expected}; it is {_kind_of(handler)}"
        )
    try:
        signature = inspect.signature(handler)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins and the like: let the call decide
        return handler  # type: ignore[return-value]
    if sessions and not _binds(signature, 1):
        other = (
            " (it takes (message, context): run it without --sessions)"
            if _binds(signature, 2)
            else ""
        )
        raise UsageError(f"{target} must take one argument, {expected}{other}")
    if not sessions and not _binds(signature, 2):
        other = " (it takes (session): run it with --sessions)" if _binds(signature, 1) else ""
        raise UsageError(f"{target} must take two arguments, {expected}{other}")
    return handler  # type: ignore[return-value]


def _binds(signature: inspect.Signature, count: int) -> bool:
    try:
        signature.bind(*([None] * count))
    except TypeError:
        return False
    return True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" ({exc.filename}, line {exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        return f" ({frames[-1].filename}, line {frames[-1].lineno})"
    return ""


# ---------------------------------------------------------------------------- connection


@attrs.frozen
class Connection:
    """How to reach the namespace: a connection string, or a namespace and an identity."""

    host: str
    connection_string: str | None = attrs.field(default=None, repr=False)
    namespace: str | None = None
    source: str = ""
    client_kwargs: Mapping[str, Any] = attrs.field(factory=dict)

    def open(self) -> Any:
        """The `AzureServiceBus` backend (not entered yet)."""
        from .backends._azure import AzureServiceBus

        if self.connection_string is not None:
            return AzureServiceBus.from_connection_string(
                self.connection_string, **self.client_kwargs
            )
        assert self.namespace is not None
        return AzureServiceBus._with_default_credential(self.namespace, **self.client_kwargs)


def connection_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Connection:
    """Pick the credentials: ``--connection-string``, ``--namespace``, else the environment.

    An explicit flag beats the environment variable; both flags at once is an error.

    Raises:
        UsageError: none given, both flags given, a malformed connection string, or
            ``--namespace`` without the ``identity`` extra.
    """
    from .backends._azure import parse_connection_string

    client_kwargs: dict[str, Any] = {}
    if args.sdk_retry_total is not None:
        if args.sdk_retry_total < 0:
            raise UsageError(f"--sdk-retry-total must be >= 0, got {args.sdk_retry_total}")
        client_kwargs["retry_total"] = args.sdk_retry_total
    if args.connection_string is not None and args.namespace is not None:
        raise UsageError("give --connection-string or --namespace, not both")
    if args.namespace is not None:
        namespace = args.namespace.strip().strip("/")
        if namespace.lower().startswith("sb://"):
            namespace = namespace[5:].strip("/")
        if not namespace or "/" in namespace or ":" in namespace:
            raise UsageError(
                "--namespace must be a namespace name or its host name "
                f"('<name>.servicebus.windows.net'), got {args.namespace!r}"
            )
        if "." not in namespace:
            namespace += ".servicebus.windows.net"
        try:
            importlib.import_module("azure.identity.aio")
        except ImportError:
            raise UsageError(
                "--namespace signs in with azure-identity, which is not installed: "
                'pip install "trio-sessions[identity]"'
            ) from None
        return Connection(
            host=namespace, namespace=namespace, source="--namespace", client_kwargs=client_kwargs
        )
    if args.connection_string is not None:
        conn_str, source = args.connection_string, "--connection-string"
    elif environ.get(CONNECTION_STRING_ENV):
        conn_str, source = environ[CONNECTION_STRING_ENV], f"${CONNECTION_STRING_ENV}"
    else:
        raise UsageError(
            f"no connection: give --connection-string, set ${CONNECTION_STRING_ENV}, "
            "or give --namespace (signs in with DefaultAzureCredential)"
        )
    try:
        parts = parse_connection_string(conn_str)
    except ValueError as exc:
        raise UsageError(f"bad connection string in {source}: {mask_secrets(str(exc))}") from None
    return Connection(
        host=parts["host"], connection_string=conn_str, source=source, client_kwargs=client_kwargs
    )


def fatal_hint(error: BaseException, entity: Entity, connection: Connection) -> str:
    """One line: what went wrong, and how to fix it."""
    reason = mask_secrets(" ".join(str(error).split()))
    reason = f" ({reason})" if reason else ""
    where = f"namespace {connection.host}"
    if isinstance(error, AuthenticationError):
        how = (
            "check the key in the connection string, and that the SAS policy has the Listen claim"
            if connection.connection_string is not None
            else "check that you are signed in (az login, a managed identity)"
        )
        return (
            f"access to {entity.describe()} in {where} was refused{reason}: {how}, "
            "or the identity has the 'Azure Service Bus Data Receiver' role"
        )
    if isinstance(error, EntityNotFoundError):
        flags = "--queue" if entity.queue_name is not None else "--topic and --subscription"
        return (
            f"{entity.describe()} was not found in {where}{reason}: check the name "
            f"({flags}) and the namespace ({connection.source})"
        )
    if isinstance(error, SessionsNotEnabledError):
        return (
            f"{entity.describe()} in {where} does not have sessions enabled{reason}: "
            "enable sessions on it (requiresSession) or use a session-enabled entity"
        )
    return f"fatal error on {entity.describe()} in {where}: {_one_line(error)}"


# ---------------------------------------------------------------------------------- logging

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extras, traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": mask_secrets(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``2026-01-01 12:00:00,000 INFO trio_sessions.run: message``, secrets masked."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


@final
class LiveStatusHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes log records to a terminal above a status line that is redrawn in place."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._status = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            with self._lock_held():
                self.stream.write(f"\r\x1b[K{text}\n{self._status}")
                self.stream.flush()
        except Exception:
            self.handleError(record)

    def set_status(self, status: str) -> None:
        with self._lock_held():
            self._status = status
            self.stream.write(f"\r\x1b[K{status}")
            self.stream.flush()

    def clear_status(self) -> None:
        with self._lock_held():
            if self._status:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            self._status = ""

    @contextlib.contextmanager
    def _lock_held(self) -> Any:
        self.acquire()
        try:
            yield
        finally:
            self.release()


def configure_logging(
    stream: TextIO, *, log_format: str, level: str, live: bool
) -> LiveStatusHandler | None:
    """Send every log record to ``stream`` (root logger); return the live handler, if any.

    The Azure SDK's own loggers are silenced unless ``level`` is DEBUG.
    """
    handler: logging.StreamHandler[TextIO]
    live_handler = None
    if live:
        handler = live_handler = LiveStatusHandler(stream)
    else:
        handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # The SDK's own records repeat, with tracebacks, what the manager reports (translated)
    # and logs itself: shown only with --log-level DEBUG.
    logging.getLogger("azure").setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)
    return live_handler


# ---------------------------------------------------------------------------------- runner


def status_fields(stats: ManagerStats, max_sessions: int, rate: float) -> dict[str, object]:
    """The figures of one status report."""
    return {
        "sessions_held": stats.active_sessions,
        "max_concurrent_sessions": max_sessions,
        "messages_per_s": round(rate, 1),
        "messages_received": stats.messages_received,
        "messages_completed": stats.messages_completed,
        "messages_abandoned": stats.messages_abandoned,
        "handler_errors": stats.handler_errors,
        "errors": stats.errors,
    }


def status_text(fields: Mapping[str, Any]) -> str:
    """The status as one short line."""
    return (
        f"sessions held {fields['sessions_held']}/{fields['max_concurrent_sessions']} | "
        f"{fields['messages_per_s']:,.1f} msg/s | received {fields['messages_received']:,} | "
        f"completed {fields['messages_completed']:,} | "
        f"errors {fields['handler_errors'] + fields['errors']:,}"
    )


@final
class Runner:
    """One ``run``: the backend, the manager, signals, status; `serve` returns the exit code."""

    def __init__(
        self,
        *,
        handler: Callable[..., Awaitable[object]],
        target: str,
        sessions: bool,
        entity: Entity,
        connection: Connection,
        options: SessionManagerOptions,
        receive_mode: ReceiveMode,
        status_interval: float,
        live: LiveStatusHandler | None,
    ) -> None:
        self._handler = handler
        self._target = target
        self._sessions = sessions
        self._entity = entity
        self._connection = connection
        self._options = options
        self._receive_mode = receive_mode
        self._status_interval = status_interval
        self._live = live
        self._manager: SessionManager | None = None
        self._cancel_scope = trio.CancelScope()
        self._stop_requested = False
        self._cancelled_by: int | None = None
        self._in_flight = 0
        self._cancelled_calls = 0

    # -- signals ---------------------------------------------------------------------------

    def interrupt(self, signum: int) -> None:
        """A signal: the first one drains, the second one cancels."""
        name = signal.Signals(signum).name
        if not self._stop_requested:
            self._stop_requested = True
            logger.info(
                "%s: draining (handlers in flight get up to %g s); send it again to cancel",
                name,
                self._options.shutdown_timeout,
            )
            if self._manager is not None:
                self._manager.stop()
            else:
                self._cancel_scope.cancel()  # nothing is running yet
            return
        if self._cancelled_by is None:
            self._cancelled_by = signum
            logger.warning("%s again: cancelling %d handler call(s) at once", name, self._in_flight)
            self._cancel_scope.cancel()

    async def watch_signals(self, signals: AsyncIterator[int]) -> None:
        """Pass each signal from ``trio.open_signal_receiver`` to `interrupt`."""
        async for signum in signals:
            self.interrupt(signum)

    # -- handler wrapping ------------------------------------------------------------------

    async def _call(self, *args: Any) -> None:
        self._in_flight += 1
        try:
            await self._handler(*args)
        except trio.Cancelled:
            self._cancelled_calls += 1
            raise
        finally:
            self._in_flight -= 1

    async def _process_message(self, message: Any, context: Any) -> None:
        await self._call(message, context)

    async def _process_session(self, session: Any) -> None:
        await self._call(session)

    async def _process_error(self, context: ErrorContext) -> None:
        error = context.error
        if context.source is ErrorSource.PROCESS_MESSAGE:
            logger.error(
                "handler raised in session %s of %s",
                context.session_id,
                context.entity_path,
                exc_info=(type(error), error, error.__traceback__),
                extra={"session_id": context.session_id},
            )
        else:
            where = "" if context.session_id is None else f" in session {context.session_id}"
            logger.warning(
                "%s error%s of %s: %s",
                context.source.value,
                where,
                context.entity_path,
                mask_secrets(_one_line(error)),
                extra={"session_id": context.session_id},
            )

    # -- status ----------------------------------------------------------------------------

    async def _report_status(self, manager: SessionManager) -> None:
        live = self._live
        interval = LIVE_REFRESH if live is not None else self._status_interval
        if interval <= 0 or math.isinf(interval):
            return
        last_count, last_time = 0, trio.current_time()
        while True:
            await trio.sleep(interval)
            stats = manager.stats()
            now = trio.current_time()
            rate = (stats.messages_received - last_count) / max(now - last_time, 1e-9)
            last_count, last_time = stats.messages_received, now
            fields = status_fields(stats, self._options.max_concurrent_sessions, rate)
            if live is not None:
                live.set_status(status_text(fields))
            else:
                logger.info("status: %s", status_text(fields), extra=fields)

    # -- the run ---------------------------------------------------------------------------

    async def serve(self) -> int:
        """Run until drained, cancelled or failed; return the exit code."""
        started = time.monotonic()
        fatal: BaseException | None = None
        with self._cancel_scope:
            async with (
                self._connection.open() as backend,
                open_session_manager(
                    backend,
                    queue_name=self._entity.queue_name,
                    topic_name=self._entity.topic_name,
                    subscription_name=self._entity.subscription_name,
                    receive_mode=self._receive_mode,
                    options=self._options,
                ) as manager,
            ):
                self._manager = manager
                if self._stop_requested:
                    manager.stop()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._report_status, manager, name="status")
                    try:
                        # Awaited here, not in a child task, so that a fatal error
                        # arrives as itself and not inside an ExceptionGroup.
                        if self._sessions:
                            await manager.subscribe_sessions(
                                self._process_session,
                                process_error=self._process_error,
                                task_status=_OnStarted(self._announce),
                            )
                        else:
                            await manager.subscribe(
                                self._process_message,
                                process_error=self._process_error,
                                task_status=_OnStarted(self._announce),
                            )
                    except FATAL_ERRORS as exc:
                        fatal = exc
                    finally:
                        nursery.cancel_scope.cancel()
        if self._live is not None:
            self._live.clear_status()
        if fatal is not None:
            logger.error("%s", fatal_hint(fatal, self._entity, self._connection))
            return EXIT_FATAL
        if self._manager is not None:
            stats = self._manager.stats()
            logger.info(
                "stopped after %.1f s: received %d, completed %d, abandoned %d, errors %d",
                time.monotonic() - started,
                stats.messages_received,
                stats.messages_completed,
                stats.messages_abandoned,
                stats.handler_errors + stats.errors,
                extra=status_fields(stats, self._options.max_concurrent_sessions, 0.0),
            )
        if self._cancelled_by is not None:
            return 128 + self._cancelled_by
        if self._cancelled_calls:
            logger.warning(
                "shutdown_timeout (%g s) ended with %d handler call(s) in flight: they were "
                "cancelled and their messages will be delivered again",
                self._options.shutdown_timeout,
                self._cancelled_calls,
            )
        return EXIT_OK

    def _announce(self) -> None:
        logger.info(
            "subscribed to %s at %s with %s%s (max_concurrent_sessions=%d); "
            "SIGINT or SIGTERM drains",
            self._entity.describe(),
            self._connection.host,
            self._target,
            " (actor form)" if self._sessions else "",
            self._options.max_concurrent_sessions,
        )


@final
class _OnStarted:
    """A task status for ``subscribe``: calls back once accepting has begun."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def started(self, value: None = None) -> None:
        self._callback()


def run(args: argparse.Namespace, *, stderr: TextIO | None = None) -> int:
    """``trio-sessions run``: check the usage, then serve; return the exit code."""
    err = sys.stderr if stderr is None else stderr
    try:
        entity = entity_from(args)
        options = build_options(args)
        receive_mode = (
            ReceiveMode.RECEIVE_AND_DELETE if args.receive_and_delete else ReceiveMode.PEEK_LOCK
        )
        if receive_mode is ReceiveMode.RECEIVE_AND_DELETE and options.prefetch_count > 0:
            raise UsageError(
                "--prefetch-count must be 0 with --receive-and-delete: prefetched messages "
                "are deleted on receipt and a stop would lose them"
            )
        if args.status_interval < 0 or math.isnan(args.status_interval):
            raise UsageError(f"--status-interval must be >= 0, got {args.status_interval}")
        connection = connection_from(args, os.environ)
        live = err.isatty() and args.log_format == "text"
        live_handler = configure_logging(
            err, log_format=args.log_format, level=args.log_level, live=live
        )
        handler = load_handler(args.target, sessions=args.sessions)
    except UsageError as exc:
        print(f"trio-sessions run: {exc}", file=err, flush=True)
        return EXIT_USAGE
    runner = Runner(
        handler=handler,
        target=args.target,
        sessions=args.sessions,
        entity=entity,
        connection=connection,
        options=options,
        receive_mode=receive_mode,
        status_interval=args.status_interval,
        live=live_handler,
    )

    async def main() -> int:
        # The receiver is open before anything runs, so no signal falls through to
        # Python's default handlers (KeyboardInterrupt, or death by SIGTERM).
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runner.watch_signals, signals, name="signals")
                code = await runner.serve()
                nursery.cancel_scope.cancel()
        return code

    try:
        return trio.run(main)
    except Exception:
        logger.exception("trio-sessions run failed")
        return EXIT_FATAL
