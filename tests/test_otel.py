"""OpenTelemetry spans and metrics, read back from opentelemetry-sdk's in-memory exporters."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing

pytest.importorskip("opentelemetry.sdk")  # the tests extra installs it

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

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
from trio_sessions._messages import EntityPath
from trio_sessions._otel import DURATION_BUCKETS, _server_attributes, telemetry_for
from trio_sessions._redact import MASK

Q = "q"
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"


def attributes_of(span: ReadableSpan | Event) -> dict[str, Any]:
    return dict(span.attributes or {})


def _reset_globals() -> None:
    # The API lets a process set its providers once; OpenTelemetry's own test utilities
    # reset these module globals the same way, so that each test starts unconfigured.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    from opentelemetry.metrics import _internal as metrics_internal

    metrics_internal._METER_PROVIDER_SET_ONCE = Once()
    metrics_internal._METER_PROVIDER = None


@attrs.define
class Otel:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if name is None or s.name == name]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for m in scope.metrics
            if m.name == metric
            for point in m.data.data_points
        ]


@pytest.fixture
def otel() -> Iterator[Otel]:
    """Global SDK providers with in-memory exporters, as an application would set them."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    _reset_globals()
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    try:
        yield Otel(spans, reader)
    finally:
        _reset_globals()
        meter_provider.shutdown()
        tracer_provider.shutdown()


@pytest.fixture
def unconfigured() -> Iterator[None]:
    """The API installed but no provider set: the state of most processes."""
    _reset_globals()
    yield
    _reset_globals()


async def run(
    broker: MemoryBroker,
    handler: Any,
    *,
    seconds: float = 10,
    sessions: bool = False,
    options: SessionManagerOptions | None = None,
    **entity: str,
) -> None:
    """Run subscribe (or subscribe_sessions) for ``seconds`` of virtual time, then stop."""
    errors: list[ErrorContext] = []

    async def on_error(context: ErrorContext) -> None:
        errors.append(context)

    async with open_session_manager(
        broker,
        options=options or SessionManagerOptions(session_idle_timeout=1),
        **(entity or {"queue_name": Q}),  # type: ignore[arg-type]
    ) as manager:
        subscribe = manager.subscribe_sessions if sessions else manager.subscribe
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: subscribe(handler, process_error=on_error))
            await trio.sleep(seconds)
            manager.stop()


def queue_broker() -> MemoryBroker:
    broker = MemoryBroker()
    broker.create_queue(Q)
    return broker


async def test_process_spans_follow_the_servicebus_conventions(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    """One CONSUMER span per message, linked to the producer, parent of the handler's spans."""
    broker = queue_broker()
    await broker.send(
        Q,
        [
            Message(
                b"1",
                session_id="a",
                message_id="m1",
                application_properties={"traceparent": TRACEPARENT, "tracestate": "k=v"},
            ),
            Message(
                b"2",
                session_id="a",
                message_id="m2",
                application_properties={"Diagnostic-Id": TRACEPARENT},
            ),
            Message(b"3", session_id="a", message_id="m3", correlation_id="conv"),
        ],
    )
    tracer = trace.get_tracer("user code")

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        with tracer.start_as_current_span(f"work {message.message_id}"):
            await trio.sleep(1)

    await run(broker, handle)
    process = otel.finished("process q")
    assert [attributes_of(s)["messaging.message.id"] for s in process] == ["m1", "m2", "m3"]
    for span in process:
        assert span.kind is SpanKind.CONSUMER
        assert span.status.status_code is StatusCode.UNSET
        assert span.parent is None  # links, not parents: the default of the conventions
        attributes = attributes_of(span)
        assert attributes.pop("messaging.message.id")
        assert attributes.pop("messaging.servicebus.message.enqueued_time") > 0
        attributes.pop("messaging.message.conversation_id", None)
        assert attributes == {
            "messaging.system": "servicebus",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": "q",
            "messaging.servicebus.disposition_status": "complete",
            "trio_sessions.session_id": "a",
        }
    assert attributes_of(process[2])["messaging.message.conversation_id"] == "conv"
    # m1 (traceparent) and m2 (Diagnostic-Id) link to the producer; m3 carries no context.
    linked = [[(link.context.trace_id, link.context.span_id) for link in s.links] for s in process]
    assert linked == [[(TRACE_ID, SPAN_ID)], [(TRACE_ID, SPAN_ID)], []]
    assert dict(process[0].links[0].context.trace_state) == {"k": "v"}
    # The handler's own spans are children of the process span.
    for span in process:
        (work,) = otel.finished(f"work {attributes_of(span)['messaging.message.id']}")
        assert work.parent is not None
        assert work.parent.span_id == span.context.span_id


async def test_settle_spans_are_children_of_the_process_span(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    """Each settlement gets a CLIENT span named for its disposition; the process span says it."""
    broker = queue_broker()
    for body in ("done", "later", "bad"):
        await broker.send(Q, Message(body, session_id="a", message_id=body))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.message_id == "later":
            await context.defer(message)
        elif message.message_id == "bad":
            await context.dead_letter(message, reason="bad")

    await run(broker, handle)
    process = {attributes_of(s)["messaging.message.id"]: s for s in otel.finished("process q")}
    expected = {"done": "complete", "later": "defer", "bad": "dead_letter"}
    assert {
        mid: attributes_of(s)["messaging.servicebus.disposition_status"]
        for mid, s in process.items()
    } == expected
    for mid, disposition in expected.items():
        (settle,) = [
            s
            for s in otel.finished(f"{disposition} q")
            if attributes_of(s)["messaging.message.id"] == mid
        ]
        assert settle.kind is SpanKind.CLIENT
        assert settle.parent is not None
        assert settle.parent.span_id == process[mid].context.span_id
        assert dict(settle.attributes or {}) == {
            "messaging.system": "servicebus",
            "messaging.operation.type": "settle",
            "messaging.operation.name": disposition,
            "messaging.servicebus.disposition_status": disposition,
            "messaging.destination.name": "q",
            "messaging.message.id": mid,
        }
        assert settle.start_time is not None
        assert settle.end_time is not None
        assert process[mid].start_time <= settle.start_time <= settle.end_time  # type: ignore[operator]
        assert settle.end_time <= process[mid].end_time  # type: ignore[operator]


async def test_settlement_batches_get_one_span_per_disposition(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    """Concurrent handlers settle in one batch: a span per disposition, links to producers."""
    broker = queue_broker()
    await broker.send(
        Q,
        [
            Message(
                str(i),
                session_id="a",
                message_id=f"m{i}",
                application_properties={"traceparent": TRACEPARENT},
            )
            for i in range(3)
        ],
    )

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        await trio.sleep(1)  # all three finish at the same moment
        if message.message_id == "m1" and message.delivery_count == 0:
            raise ValueError("abandon m1")

    options = SessionManagerOptions(max_concurrent_calls_per_session=3, session_idle_timeout=1)
    await run(broker, handle, options=options)
    first_round = [s for s in otel.finished() if s.kind is SpanKind.CLIENT][:2]
    complete, abandon = sorted(first_round, key=lambda s: s.name != "complete q")
    assert complete.name == "complete q"
    assert attributes_of(complete)["messaging.batch.message_count"] == 2
    assert "messaging.message.id" not in attributes_of(complete)
    assert complete.parent is None
    assert [link.context.trace_id for link in complete.links] == [TRACE_ID, TRACE_ID]
    assert abandon.name == "abandon q"
    assert attributes_of(abandon)["messaging.message.id"] == "m1"
    assert abandon.parent is not None  # one message: the child of its process span
    assert (complete.start_time, complete.end_time) == (abandon.start_time, abandon.end_time)
    dispositions = {
        (
            attributes_of(s)["messaging.message.id"],
            attributes_of(s)["messaging.servicebus.disposition_status"],
        )
        for s in otel.finished("process q")
    }
    assert dispositions == {
        ("m0", "complete"),
        ("m1", "abandon"),
        ("m2", "complete"),
        ("m1", "complete"),
    }


async def test_handler_errors_fail_the_span_and_redeliveries_count(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    """A raising handler: ERROR status, error.type, the exception masked; then the retry."""
    broker = queue_broker()
    key = "a2V5LWluLWFuLWV4Y2VwdGlvbg=="
    await broker.send(Q, Message(b"x", session_id="a", message_id="m"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.delivery_count == 0:
            raise ValueError(f"cannot use Endpoint=sb://ns/;SharedAccessKey={key}")

    await run(broker, handle)
    first, second = otel.finished("process q")
    assert first.status.status_code is StatusCode.ERROR
    assert attributes_of(first)["error.type"] == "ValueError"
    assert attributes_of(first)["messaging.servicebus.disposition_status"] == "abandon"
    assert "messaging.servicebus.message.delivery_count" not in attributes_of(first)
    (event,) = first.events
    assert event.name == "exception"
    assert attributes_of(event)["exception.type"] == "ValueError"
    assert attributes_of(event)["exception.message"] == (
        f"cannot use Endpoint=sb://ns/;SharedAccessKey={MASK}"
    )
    assert key not in str(attributes_of(event)["exception.stacktrace"])
    assert key not in str(first.status.description)
    assert second.status.status_code is StatusCode.UNSET
    assert "error.type" not in attributes_of(second)
    assert attributes_of(second)["messaging.servicebus.message.delivery_count"] == 1
    assert attributes_of(second)["messaging.servicebus.disposition_status"] == "complete"
    assert [s.name for s in otel.finished() if s.kind is SpanKind.CLIENT] == [
        "abandon q",
        "complete q",
    ]


async def test_lock_loss_cancels_the_span(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    """A handler cancelled by a lost lock ends its span as failed, with no disposition."""
    broker = queue_broker()
    await broker.send(Q, Message(b"x", session_id="a"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        if message.delivery_count == 0:
            broker.expire_session_lock(Q, "a")
            await trio.sleep_forever()

    await run(broker, handle)
    first, second = otel.finished("process q")
    assert attributes_of(first)["error.type"] == "Cancelled"
    assert first.status.status_code is StatusCode.ERROR
    assert "messaging.servicebus.disposition_status" not in attributes_of(first)
    assert attributes_of(second)["messaging.servicebus.disposition_status"] == "complete"


async def test_failed_settlements_fail_their_span(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    """A settlement the broker refuses: error.type on both spans, no disposition."""
    broker = queue_broker()
    await broker.send(Q, Message(b"x", session_id="a", message_id="m"))
    broker.fail_next("complete", ServiceBusConnectionError)

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        pass

    await run(broker, handle)
    failed, completed = otel.finished("complete q")
    assert attributes_of(failed)["error.type"] == "ServiceBusConnectionError"
    assert failed.status.status_code is StatusCode.ERROR
    assert "error.type" not in attributes_of(completed)
    first, second = otel.finished("process q")
    assert "messaging.servicebus.disposition_status" not in attributes_of(first)
    assert attributes_of(first)["error.type"] == "ServiceBusConnectionError"
    assert attributes_of(second)["messaging.servicebus.disposition_status"] == "complete"


async def test_actor_form_lock_loss_ends_the_span(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    """A lost lock cancels process_session: the held message's span ends as failed."""
    broker = queue_broker()
    await broker.send(Q, Message(b"x", session_id="a", message_id="m"))

    async def process_session(session: SessionContext) -> None:
        async for message in session:
            if message.delivery_count == 0:
                broker.expire_session_lock(Q, "a")
                await trio.sleep_forever()

    await run(broker, process_session, sessions=True)
    first, second = otel.finished("process q")
    assert attributes_of(first)["error.type"] == "Cancelled"
    assert attributes_of(second)["messaging.servicebus.disposition_status"] == "complete"


async def test_metrics_in_virtual_time(otel: Otel, autojump_clock: trio.testing.MockClock) -> None:
    """messaging.process.duration (seconds, advised buckets) and consumed.messages."""
    broker = queue_broker()
    for i in range(4):
        await broker.send(Q, Message(str(i), session_id=f"s{i % 2}"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        await trio.sleep(0.3)
        if message.text() == "3" and message.delivery_count == 0:
            raise KeyError("once")

    await run(broker, handle)
    ok_attributes = {
        "messaging.system": "servicebus",
        "messaging.operation.name": "process",
        "messaging.destination.name": "q",
    }
    by_attributes = {
        tuple(sorted(p.attributes.items())): p for p in otel.points("messaging.process.duration")
    }
    ok = by_attributes[tuple(sorted(ok_attributes.items()))]
    failed = by_attributes[tuple(sorted({**ok_attributes, "error.type": "KeyError"}.items()))]
    assert (ok.count, failed.count) == (4, 1)
    assert ok.sum == pytest.approx(4 * 0.3)
    assert failed.sum == pytest.approx(0.3)
    if (
        "explicit_bucket_boundaries_advisory"
        in inspect.signature(metrics.Meter.create_histogram).parameters
    ):
        assert tuple(ok.explicit_bounds) == DURATION_BUCKETS  # advice is API >= 1.30
    (consumed,) = otel.points("messaging.client.consumed.messages")
    assert dict(consumed.attributes) == ok_attributes
    assert consumed.value == 5  # four messages, one of them twice


async def test_subscription_attributes(otel: Otel, autojump_clock: trio.testing.MockClock) -> None:
    """On a subscription the destination is the topic, the subscription named apart."""
    broker = MemoryBroker()
    broker.create_topic("t")
    broker.create_subscription("t", "s")
    await broker.send("t", Message(b"x", session_id="a"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        pass

    await run(broker, handle, topic_name="t", subscription_name="s")
    (process,) = otel.finished("process t")
    (settle,) = otel.finished("complete t")
    for span in (process, settle):
        assert attributes_of(span)["messaging.destination.name"] == "t"
        assert attributes_of(span)["messaging.destination.subscription.name"] == "s"


async def test_actor_form_has_a_span_per_message(
    otel: Otel, autojump_clock: trio.testing.MockClock
) -> None:
    """In subscribe_sessions each yielded message gets its span until the next step."""
    broker = queue_broker()
    for i in range(3):
        await broker.send(Q, Message(str(i), session_id="a", message_id=f"m{i}"))
    tracer = trace.get_tracer("user code")

    async def process_session(session: SessionContext) -> None:
        async for message in session:
            with tracer.start_as_current_span(f"work {message.message_id}"):
                await trio.sleep(0.5)
            if message.message_id == "m2" and message.delivery_count == 0:
                raise RuntimeError("stop at m2")

    await run(broker, process_session, sessions=True)
    process = otel.finished("process q")
    assert [
        (attributes_of(s)["messaging.message.id"], attributes_of(s).get("error.type"))
        for s in process
    ] == [
        ("m0", None),
        ("m1", None),
        ("m2", "RuntimeError"),
        ("m2", None),
    ]
    assert [attributes_of(s)["messaging.servicebus.disposition_status"] for s in process] == [
        "complete",
        "complete",
        "abandon",
        "complete",
    ]
    for span in process:
        work = [
            w
            for w in otel.finished(f"work {attributes_of(span)['messaging.message.id']}")
            if w.parent is not None and w.parent.span_id == span.context.span_id
        ]
        assert len(work) == 1
    (duration,) = [
        p for p in otel.points("messaging.process.duration") if "error.type" not in attributes_of(p)
    ]
    assert duration.count == 3
    assert duration.sum == pytest.approx(1.5)  # the body's time, not the wait for messages


async def test_metrics_alone(autojump_clock: trio.testing.MockClock) -> None:
    """Only a meter provider configured: metrics, and no tracer is asked for spans."""
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    _reset_globals()
    metrics.set_meter_provider(meter_provider)
    try:
        telemetry = telemetry_for(EntityPath(queue_name=Q), MemoryBroker())
        assert telemetry is not None
        assert telemetry._tracer is None
        broker = queue_broker()
        await broker.send(Q, Message(b"x", session_id="a"))

        async def handle(message: ReceivedMessage, context: SessionContext) -> None:
            pass

        await run(broker, handle)
        otel = Otel(InMemorySpanExporter(), reader)
        (consumed,) = otel.points("messaging.client.consumed.messages")
        assert consumed.value == 1
    finally:
        _reset_globals()
        meter_provider.shutdown()


def test_unconfigured_or_absent_opentelemetry_costs_nothing(
    unconfigured: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No provider set, or opentelemetry not installed: no Telemetry, so no hooks."""
    entity = EntityPath(queue_name=Q)
    assert telemetry_for(entity, MemoryBroker()) is None
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if not installed
    assert telemetry_for(entity, MemoryBroker()) is None


async def test_unconfigured_runs_make_no_spans(
    unconfigured: None, autojump_clock: trio.testing.MockClock
) -> None:
    """A provider set after subscribe started is not used by that run (documented)."""
    broker = queue_broker()
    await broker.send(Q, Message(b"x", session_id="a"))
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        trace.set_tracer_provider(provider)

    await run(broker, handle)
    assert spans.get_finished_spans() == ()


def test_importing_the_library_imports_no_opentelemetry() -> None:
    """The otel module loads opentelemetry only when a subscribe starts."""
    code = "import sys, trio_sessions; print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


_SUBSCRIBE_ONCE = """
import sys, trio
from trio_sessions import MemoryBroker, Message, open_session_manager

async def main():
    broker = MemoryBroker()
    broker.create_queue("q")
    await broker.send("q", Message(b"x", session_id="a"))
    async with open_session_manager(broker, queue_name="q") as manager:
        async def handle(message, context):
            manager.stop()
        await manager.subscribe(handle)

trio.run(main)
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""


@pytest.mark.parametrize("variable", [None, "OTEL_PYTHON_TRACER_PROVIDER"])
def test_subscribe_imports_opentelemetry_only_if_a_provider_may_be_set(
    variable: str | None,
) -> None:
    """Unless something imported it, no provider was set: subscribe does not import it
    to find that out, unless a variable names a provider for the API to load."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_PYTHON_")}
    if variable is not None:
        env[variable] = "sdk_tracer_provider"  # opentelemetry-sdk's entry point
    out = subprocess.run(
        [sys.executable, "-c", _SUBSCRIBE_ONCE], capture_output=True, text=True, check=True, env=env
    ).stdout
    imported = out.strip().splitlines()[-1]
    if variable is None:
        assert imported == "[]"
    else:
        assert "'opentelemetry.trace'" in imported


@pytest.mark.parametrize(
    ("namespace", "attributes"),
    [
        ("ns.servicebus.windows.net", {"server.address": "ns.servicebus.windows.net"}),
        ("127.0.0.1:5672", {"server.address": "127.0.0.1", "server.port": 5672}),
        (None, {}),
        ("", {}),
    ],
)
def test_server_address(namespace: str | None, attributes: dict[str, object]) -> None:
    """server.address (and port) come from the backend's fully_qualified_namespace."""
    assert _server_attributes(namespace) == attributes


async def test_server_address_on_spans(otel: Otel, autojump_clock: trio.testing.MockClock) -> None:
    """A backend that names its namespace gets server.address on every span and metric."""

    class NamedBroker(MemoryBroker):
        fully_qualified_namespace = "ns.servicebus.windows.net"

    broker = NamedBroker()
    broker.create_queue(Q)
    await broker.send(Q, Message(b"x", session_id="a"))

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        pass

    await run(broker, handle)
    for span in otel.finished():
        assert attributes_of(span)["server.address"] == "ns.servicebus.windows.net"
    (consumed,) = otel.points("messaging.client.consumed.messages")
    assert attributes_of(consumed)["server.address"] == "ns.servicebus.windows.net"
