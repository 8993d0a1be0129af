"""OpenTelemetry spans and metrics for message processing (the ``otel`` extra).

Follows the messaging semantic conventions and their Azure Service Bus profile
(semconv 1.44.0): a CONSUMER span ``process {destination}`` per message handed to user
code, linked to the producer's creation context (the ``traceparent`` or
``Diagnostic-Id`` application property); a CLIENT span ``{disposition} {destination}``
(operation type ``settle``) per settlement call; the metrics
``messaging.process.duration`` and ``messaging.client.consumed.messages``.

Cost: `telemetry_for` returns None, and nothing here is called again, unless
opentelemetry-api is installed *and* the application set a tracer or meter provider
before ``subscribe*`` started. It does not even import opentelemetry unless something
else has (setting a provider means importing it), or ``OTEL_PYTHON_TRACER_PROVIDER``
or ``OTEL_PYTHON_METER_PROVIDER`` names one for the API to load. With a `Telemetry`,
the actor swaps in the traced versions of its per-message steps once, when it starts
(see `SessionActor.__init__`), so the untraced path carries no check per message.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

import trio

from ._messages import Abandon, Complete, DeadLetter, Defer
from ._redact import redact
from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Sequence
    from types import TracebackType

    from ._actor import SessionActor
    from ._errors import ErrorSource
    from ._messages import EntityPath, ReceivedMessage, Settlement

__all__ = ["Telemetry", "telemetry_for"]

#: The semantic conventions these names follow.
SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"
SYSTEM = "servicebus"
#: The semconv's advised buckets for messaging durations (seconds).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
DISPOSITIONS: dict[type, str] = {
    Complete: "complete",
    Abandon: "abandon",
    DeadLetter: "dead_letter",
    Defer: "defer",
}
#: Application properties that may carry the producer's context, first found wins; the
#: Azure SDKs write both, Diagnostic-Id in the same W3C format.
TRACEPARENT_PROPERTIES = ("traceparent", "Diagnostic-Id")
#: Not a semconv attribute (there is none for sessions), so in our own namespace.
SESSION_ID_ATTRIBUTE = "trio_sessions.session_id"

# The API's defaults when the application configured nothing: a proxy that forwards to
# a provider set later, or a no-op. Compared by name: the meter proxy's class is private.
_UNCONFIGURED = frozenset(
    {"ProxyTracerProvider", "NoOpTracerProvider", "_ProxyMeterProvider", "NoOpMeterProvider"}
)


#: The API loads a provider named by these by itself, on first use: with one set, a
#: provider may be configured although the application never imported opentelemetry.
_PROVIDER_VARIABLES = ("OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER")


def telemetry_for(entity: EntityPath, backend: object) -> Telemetry | None:
    """A `Telemetry` for one ``subscribe*`` run, or None if OpenTelemetry is absent or idle."""
    if "opentelemetry" not in sys.modules and not any(
        name in os.environ for name in _PROVIDER_VARIABLES
    ):
        # Nothing imported it, so no provider was set: importing the API just to find
        # that out took 35 ms, in each process's first subscribe (issue #8, P7).
        return None
    try:
        from opentelemetry import metrics, trace
    except ImportError:
        return None
    tracer_provider = trace.get_tracer_provider()
    meter_provider = metrics.get_meter_provider()
    tracer = meter = None
    if type(tracer_provider).__name__ not in _UNCONFIGURED:
        tracer = tracer_provider.get_tracer("trio_sessions", __version__, schema_url=SCHEMA_URL)
    if type(meter_provider).__name__ not in _UNCONFIGURED:
        meter = meter_provider.get_meter("trio_sessions", __version__, schema_url=SCHEMA_URL)
    if tracer is None and meter is None:
        return None
    return Telemetry(tracer, meter, entity, getattr(backend, "fully_qualified_namespace", None))


def _server_attributes(namespace: object) -> dict[str, Any]:
    """``server.address`` (and ``server.port``) from ``host`` or ``host:port``."""
    if not isinstance(namespace, str) or not namespace:
        return {}
    host, sep, port = namespace.rpartition(":")
    if sep and port.isdigit() and host:
        return {"server.address": host, "server.port": int(port)}
    return {"server.address": namespace}


def _text(value: object) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _error_type(error: BaseException) -> str:
    return type(error).__qualname__


class _Processing:
    """One message in user code: its process span, start time and outcome."""

    __slots__ = ("error_type", "lock_token", "span", "started", "telemetry", "token")

    def __init__(self, telemetry: Telemetry, message: ReceivedMessage) -> None:
        self.telemetry = telemetry
        self.lock_token = message.lock_token
        self.error_type: str | None = None
        self.token: object = None
        self.span = telemetry.start_process_span(message)
        self.started = trio.current_time()
        if self.lock_token is not None:
            telemetry.live[self.lock_token] = self

    def __enter__(self) -> _Processing:
        self.attach()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.fail(exc)
        self.detach()
        self.end()

    def attach(self) -> None:
        """Make the span current in this task, so user spans nest under it."""
        otel = self.telemetry
        ctx = otel.context.set_value(otel.key, self)
        if self.span is not None:
            ctx = otel.trace.set_span_in_context(self.span, ctx)
        self.token = otel.context.attach(ctx)

    def detach(self) -> None:
        otel = self.telemetry
        # Only where it was attached: the actor form may iterate in another task.
        if self.token is not None and otel.context.get_value(otel.key) is self:
            otel.context.detach(self.token)
        self.token = None

    def fail(self, error: BaseException) -> None:
        if self.error_type is None:
            self.error_type = _error_type(error)
        if self.span is not None:
            self.telemetry.record_error(self.span, error, self.error_type)

    def settled(self, disposition: str) -> None:
        if self.span is not None:
            self.span.set_attribute("messaging.servicebus.disposition_status", disposition)

    def end(self) -> None:
        otel = self.telemetry
        if self.lock_token is not None and otel.live.get(self.lock_token) is self:
            del otel.live[self.lock_token]
        if otel.duration is not None:
            attributes = otel.metric_attributes
            if self.error_type is not None:
                attributes = {**attributes, "error.type": self.error_type}
            otel.duration.record(trio.current_time() - self.started, attributes)
        if self.span is not None:
            self.span.end()


class Telemetry:
    """Spans and metrics of one manager's ``subscribe*`` run (internal)."""

    def __init__(self, tracer: Any, meter: Any, entity: EntityPath, namespace: object) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.trace = trace
        self.context = context
        self.key = context.create_key("trio_sessions.processing")
        self._propagator = TraceContextTextMapPropagator()
        self._tracer = tracer
        destination = entity.queue_name or entity.topic_name or ""
        self._destination = destination
        base: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.destination.name": destination,
        }
        if entity.subscription_name is not None:
            base["messaging.destination.subscription.name"] = entity.subscription_name
        base.update(_server_attributes(namespace))
        self._process_name = f"process {destination}"
        self._process_attributes = {
            **base,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
        }
        self._settle_attributes = {**base, "messaging.operation.type": "settle"}
        self.metric_attributes = {**base, "messaging.operation.name": "process"}
        #: Messages in user code now, by lock token: where settlements report back.
        self.live: dict[str, _Processing] = {}
        #: The actor form: the message each session's iterator last handed out.
        self._iterating: dict[SessionActor, _Processing] = {}
        self.duration: Any = None
        self._consumed: Any = None
        if meter is not None:
            self.duration = _histogram(meter)
            self._consumed = meter.create_counter(
                "messaging.client.consumed.messages",
                unit="{message}",
                description="Number of messages that were delivered to the application.",
            )

    # -- spans ---------------------------------------------------------------------------

    def _creation_link(self, message: ReceivedMessage) -> Any:
        """A link to the producer's context carried by ``message``, or None."""
        properties = message.application_properties
        if not properties:
            return None
        carrier: dict[str, str] = {}
        for name in TRACEPARENT_PROPERTIES:
            value = properties.get(name)
            if value:
                carrier["traceparent"] = _text(value)
                break
        else:
            return None
        state = properties.get("tracestate")
        if state:
            carrier["tracestate"] = _text(state)
        span_context = self.trace.get_current_span(
            self._propagator.extract(carrier)
        ).get_span_context()
        if not span_context.is_valid:
            return None
        return self.trace.Link(span_context)

    def start_process_span(self, message: ReceivedMessage) -> Any:
        if self._consumed is not None:
            self._consumed.add(1, self.metric_attributes)
        if self._tracer is None:
            return None
        attributes = dict(self._process_attributes)
        if message.message_id is not None:
            attributes["messaging.message.id"] = message.message_id
        if message.correlation_id is not None:
            attributes["messaging.message.conversation_id"] = message.correlation_id
        if message.delivery_count > 0:  # the semconv's condition; 0-based, as ours
            attributes["messaging.servicebus.message.delivery_count"] = message.delivery_count
        if message.enqueued_time is not None:
            attributes["messaging.servicebus.message.enqueued_time"] = int(
                message.enqueued_time.timestamp()
            )
        if message.session_id is not None:
            attributes[SESSION_ID_ATTRIBUTE] = message.session_id
        link = self._creation_link(message)
        return self._tracer.start_span(
            self._process_name,
            kind=self.trace.SpanKind.CONSUMER,
            attributes=attributes,
            links=None if link is None else [link],
        )

    def record_error(self, span: Any, error: BaseException, error_type: str | None = None) -> None:
        """Mark ``span`` failed by ``error`` (``error.type``: the first error's), secrets masked."""
        if span.is_recording():
            message = redact(str(error))
            span.set_attribute("error.type", error_type or _error_type(error))
            span.set_status(self.trace.Status(self.trace.StatusCode.ERROR, message))
            span.record_exception(
                error,
                attributes={
                    "exception.message": message,
                    "exception.stacktrace": redact(
                        "".join(traceback.format_exception(type(error), error, error.__traceback__))
                    ),
                },
            )

    # -- hooks the actor installs --------------------------------------------------------------

    def traced_handle(
        self, handle: Callable[[ReceivedMessage], Awaitable[None]]
    ) -> Callable[[ReceivedMessage], Coroutine[Any, Any, None]]:
        """``SessionActor._handle`` (handler call and auto-settlement) inside a process span."""

        async def traced(message: ReceivedMessage) -> None:
            with _Processing(self, message):
                await handle(message)

        return traced

    def traced_session(
        self, actor: SessionActor, run_session: Callable[[Any], Awaitable[None]]
    ) -> Callable[[Any], Coroutine[Any, Any, None]]:
        """``SessionActor._run_session``, ending the span of the message it held last."""

        async def traced(process_session: Any) -> None:
            try:
                await run_session(process_session)
            except BaseException as exc:
                self.end_iteration(actor, exc)
                raise
            self.end_iteration(actor)

        return traced

    def traced_settle(
        self,
        settle: Callable[[Sequence[Settlement]], Awaitable[list[BaseException | None]]],
    ) -> Callable[[Sequence[Settlement]], Coroutine[Any, Any, list[BaseException | None]]]:
        """``SessionLink.settle`` for one batch, with settle spans and dispositions."""

        async def traced(settlements: Sequence[Settlement]) -> list[BaseException | None]:
            started = time.time_ns()
            try:
                results = await settle(settlements)
            except BaseException as exc:
                self._settled(settlements, [exc] * len(settlements), started)
                raise
            self._settled(settlements, results, started)
            return results

        return traced

    def traced_report(
        self, report: Callable[[BaseException, ErrorSource, str | None, bool], Awaitable[None]]
    ) -> Callable[[BaseException, ErrorSource, str | None, bool], Awaitable[None]]:
        """The manager's error reporter, also failing the process span it is called in."""

        async def traced(
            error: BaseException, source: ErrorSource, session_id: str | None, handler: bool
        ) -> None:
            processing = self.context.get_value(self.key)
            if isinstance(processing, _Processing):
                processing.fail(error)
            await report(error, source, session_id, handler)

        return traced

    def begin_iteration(self, actor: SessionActor, message: ReceivedMessage) -> None:
        """The actor form handed ``message`` out: its span runs until the next step."""
        processing = _Processing(self, message)
        processing.attach()
        self._iterating[actor] = processing

    def end_iteration(self, actor: SessionActor, error: BaseException | None = None) -> None:
        processing = self._iterating.pop(actor, None)
        if processing is not None:
            if error is not None:
                processing.fail(error)
            processing.detach()
            processing.end()

    def _settled(
        self,
        settlements: Sequence[Settlement],
        results: Sequence[BaseException | None],
        started: int,
    ) -> None:
        groups: dict[str, list[int]] = {}
        for i, settlement in enumerate(settlements):
            disposition = DISPOSITIONS[type(settlement)]
            groups.setdefault(disposition, []).append(i)
            if results[i] is None and settlement.message.lock_token is not None:
                processing = self.live.get(settlement.message.lock_token)
                if processing is not None:
                    processing.settled(disposition)
        if self._tracer is None:
            return
        ended = time.time_ns()
        for disposition, indices in groups.items():
            messages = [settlements[i].message for i in indices]
            attributes = {
                **self._settle_attributes,
                "messaging.operation.name": disposition,
                "messaging.servicebus.disposition_status": disposition,
            }
            parent = None
            if len(messages) == 1:
                message = messages[0]
                if message.message_id is not None:
                    attributes["messaging.message.id"] = message.message_id
                processing = self.live.get(message.lock_token or "")
                if processing is not None and processing.span is not None:
                    parent = self.trace.set_span_in_context(processing.span)
            else:
                attributes["messaging.batch.message_count"] = len(messages)
            links = [link for m in messages if (link := self._creation_link(m)) is not None]
            span = self._tracer.start_span(
                f"{disposition} {self._destination}",
                context=parent,
                kind=self.trace.SpanKind.CLIENT,
                attributes=attributes,
                links=links or None,
                start_time=started,
            )
            error = next((results[i] for i in indices if results[i] is not None), None)
            if error is not None:
                self.record_error(span, error)
            span.end(end_time=ended)


def _histogram(meter: Any) -> Any:
    kwargs = {
        "unit": "s",
        "description": "Duration of processing operation.",
    }
    try:
        return meter.create_histogram(
            "messaging.process.duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            **kwargs,
        )
    except TypeError:  # opentelemetry-api < 1.30 has no advisory parameters
        return meter.create_histogram("messaging.process.duration", **kwargs)
