"""Peek, deferral without sessions, property round trips, scheduling, expired tokens and
subscriptions, each driven by the real azure-servicebus SDK (sync and asyncio clients).

One flow is written once for both clients: ``call`` awaits what the asyncio client
returns and passes the sync client's results through, and ``enter`` enters either kind
of context manager. The flow runs in a worker thread's own asyncio loop, so the
emulator keeps serving on the Trio side. Real time: waits are short.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
from azure.core.credentials import AzureSasCredential
from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusMessageState,
)
from azure.servicebus import exceptions as sb_errors
from azure.servicebus._pyamqp.utils import amqp_long_value, generate_sas_token
from azure.servicebus.aio import ServiceBusClient as AsyncServiceBusClient

from trio_sessions import MemoryBroker, Message, MessageLockLostError
from trio_sessions.emulator import Emulator, serve_emulator

pytest.importorskip("proton")

SUB = "t/subscriptions/s"
# The SDK's own helpers, untyped: typed here for mypy.
long_value: Callable[[int], Any] = amqp_long_value
sas_token: Callable[[str, str, str, int], str] = generate_sas_token


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    broker = MemoryBroker()
    broker.create_queue("q", lock_duration=30)
    broker.create_queue("plain", requires_session=False, lock_duration=30)
    broker.create_topic("t")
    broker.create_subscription("t", "s", lock_duration=30)
    async with serve_emulator(broker) as running:
        yield running


@pytest.fixture(params=["sync", "asyncio"])
def sdk(request: pytest.FixtureRequest) -> type[Any]:
    """The SDK's client class: the sync one or the asyncio one."""
    return ServiceBusClient if request.param == "sync" else AsyncServiceBusClient


async def call(result: Any) -> Any:
    """The result of an SDK call of either client."""
    return await result if inspect.isawaitable(result) else result


async def enter(stack: AsyncExitStack, manager: Any) -> Any:
    """Enter a sync or an async context manager on ``stack``."""
    if hasattr(manager, "__aenter__"):
        return await stack.enter_async_context(manager)
    return stack.enter_context(manager)


async def run(flow: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    """Run an SDK flow in a worker thread's own asyncio loop."""
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(run_plain_asyncio, flow(*args))


def run_plain_asyncio(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run in a plain asyncio loop, not trio-asyncio's (which asyncio.run gives once
    trio_asyncio is imported, as the Azure backend does)."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(coroutine)


async def open_client(stack: AsyncExitStack, sdk: type[Any], emulator: Emulator) -> Any:
    return await enter(stack, sdk.from_connection_string(emulator.connection_string, retry_total=0))


# -- peek ---------------------------------------------------------------------------------


async def test_peek(emulator: Emulator, sdk: type[Any]) -> None:
    """Peek on a session receiver and on a plain one: in order, nothing locked or counted."""
    broker = emulator.broker
    await broker.send("q", [Message(f"{sid}{i}", session_id=sid) for i in range(3) for sid in "ab"])
    await broker.send("plain", [Message(f"p{i}") for i in range(4)])
    later = broker._utc(trio.current_time() + 3600)
    await broker.schedule_messages("plain", Message("scheduled"), later)

    async def flow() -> list[Any]:
        async with AsyncExitStack() as stack:
            client = await open_client(stack, sdk, emulator)
            session = await enter(
                stack, client.get_queue_receiver("q", session_id="b", max_wait_time=1)
            )
            in_session = await call(session.peek_messages(10))
            plain = await enter(stack, client.get_queue_receiver("plain", max_wait_time=1))
            [deferred] = await call(plain.receive_messages(max_message_count=1, max_wait_time=1))
            await call(plain.defer_message(deferred))
            from_two = await call(plain.peek_messages(10, sequence_number=1))
            none_left = await call(plain.peek_messages(5, sequence_number=100))
            none_left += await call(plain.peek_messages(0))
            return [
                [(str(m), m.sequence_number, m.delivery_count) for m in in_session],
                [(str(m), m.state) for m in from_two],
                none_left,
            ]

    in_session, plain, none_left = await run(flow)
    assert in_session == [("b0", 2, 0), ("b1", 4, 0), ("b2", 6, 0)]
    assert plain == [
        ("p0", ServiceBusMessageState.DEFERRED),
        ("p1", ServiceBusMessageState.ACTIVE),
        ("p2", ServiceBusMessageState.ACTIVE),
        ("p3", ServiceBusMessageState.ACTIVE),
        ("scheduled", ServiceBusMessageState.SCHEDULED),
    ]
    assert none_left == []
    # Peeking counted no delivery: the session's messages come back fresh.
    assert [m.delivery_count for m in broker.active_messages("q")] == [0] * 6


# -- deferral and update-disposition without sessions ------------------------------------


async def test_deferred_messages_without_sessions(emulator: Emulator, sdk: type[Any]) -> None:
    """receive_deferred_messages and their settlement ($management) on a plain queue."""
    await emulator.broker.send("plain", [Message(body) for body in ("done", "again", "dead")])

    async def flow() -> list[Any]:
        async with AsyncExitStack() as stack:
            client = await open_client(stack, sdk, emulator)
            receiver = await enter(stack, client.get_queue_receiver("plain", max_wait_time=1))
            messages = await call(receiver.receive_messages(max_message_count=3, max_wait_time=1))
            for message in messages:
                await call(receiver.defer_message(message))
            done, again, dead = await call(
                receiver.receive_deferred_messages([m.sequence_number for m in messages])
            )
            renewed = await call(receiver.renew_message_lock(done))
            await call(receiver.complete_message(done))
            await call(receiver.abandon_message(again))
            await call(receiver.dead_letter_message(dead, reason="why", error_description="so"))
            try:
                await call(receiver.receive_deferred_messages([999]))
            except sb_errors.MessageNotFoundError:
                missing = True
            return [str(done), renewed is not None, missing]

    assert await run(flow) == ["done", True, True]
    [back] = emulator.broker.active_messages("plain")
    assert (back.text(), back.delivery_count) == ("again", 1)  # still deferred
    [dead] = emulator.broker.dead_letter_messages("plain")
    assert (dead.dead_letter_reason, dead.dead_letter_error_description) == ("why", "so")


async def test_properties_to_modify(emulator: Emulator) -> None:
    """modified's message-annotations, on the link and in update-disposition, change the
    message's application properties (the Python SDK has no public argument for it)."""
    await emulator.broker.send("plain", Message("x", application_properties={"keep": 1}))

    def flow() -> None:
        conn_str = emulator.connection_string
        with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            with client.get_queue_receiver("plain", max_wait_time=1) as receiver:
                [message] = receiver.receive_messages(max_message_count=1, max_wait_time=1)
                receiver._handler.settle_messages(
                    message._delivery_id,
                    message._delivery_tag,
                    "modified",
                    delivery_failed=True,
                    undeliverable_here=False,
                    message_annotations={"on-link": "yes"},
                    await_outcome=True,
                )
                [message] = receiver.receive_messages(max_message_count=1, max_wait_time=1)
                assert message.lock_token is not None
                receiver._settle_message_via_mgmt_link(
                    "abandoned",
                    [message.lock_token],
                    dead_letter_details={"properties-to-modify": {"by-mgmt": 5}},
                )

    with trio.fail_after(60):
        await trio.to_thread.run_sync(flow)
    [message] = emulator.broker.active_messages("plain")
    assert message.delivery_count == 2
    assert message.application_properties == {"keep": 1, "on-link": "yes", "by-mgmt": 5}


# -- message properties ----------------------------------------------------------------


async def test_every_property_round_trips(emulator: Emulator, sdk: type[Any]) -> None:
    """Standard properties and application properties of each AMQP type the SDK sends
    come back to the SDK as it would read them from Service Bus."""
    when = dt.datetime(2026, 5, 4, 3, 2, 1, 500000, tzinfo=dt.UTC)
    token = uuid.uuid4()

    properties: dict[str | bytes, Any] = {
        "str": "text",
        "int": 7,
        "long": long_value(2**40),
        "float": 1.5,
        "bool": True,
        "bytes": b"raw",
        "when": when,
        "uuid": token,
        "none": None,
    }

    def message() -> ServiceBusMessage:
        return ServiceBusMessage(
            "body",
            session_id="s",
            message_id="mid",
            correlation_id="cid",
            content_type="application/json",
            subject="subj",
            to="dest",
            reply_to="replies",
            reply_to_session_id="reply-session",
            time_to_live=dt.timedelta(seconds=90),
            partition_key="s",
            application_properties=dict(properties),
        )

    async def flow() -> Any:
        async with AsyncExitStack() as stack:
            client = await open_client(stack, sdk, emulator)
            sender = await enter(stack, client.get_queue_sender("q"))
            await call(sender.send_messages(message()))  # one message
            await call(sender.send_messages([message()]))  # a batch
            receiver = await enter(
                stack, client.get_queue_receiver("q", session_id="s", max_wait_time=1)
            )
            received = await call(receiver.receive_messages(max_message_count=2, max_wait_time=1))
            return [
                (
                    str(m),
                    m.session_id,
                    m.message_id,
                    m.correlation_id,
                    m.content_type,
                    m.subject,
                    m.to,
                    m.reply_to,
                    m.reply_to_session_id,
                    m.time_to_live,
                    m.partition_key,
                    m.application_properties,
                )
                for m in received
            ]

    single, batched = await run(flow)
    assert single == batched
    assert single[:11] == (
        "body",
        "s",
        "mid",
        "cid",
        "application/json",
        "subj",
        "dest",
        "replies",
        "reply-session",
        dt.timedelta(seconds=90),
        "s",
    )
    # What the SDK reads from Service Bus: bytes keys and str values, timestamps as
    # milliseconds; it sends a bytes value as str.
    assert single[11] == {
        b"str": b"text",
        b"int": 7,
        b"long": 2**40,
        b"float": 1.5,
        b"bool": True,
        b"bytes": b"raw",
        b"when": int(when.timestamp() * 1000),
        b"uuid": token,
        b"none": None,
    }
    [stored] = emulator.broker.peek_messages("q")  # the broker holds plain Python values
    assert stored.application_properties["when"] == when
    assert stored.application_properties["long"] == 2**40


async def test_scheduled_messages(emulator: Emulator, sdk: type[Any]) -> None:
    """A message scheduled in the future is not delivered before its time; schedule_messages
    returns sequence numbers that cancel_scheduled_messages accepts."""

    async def flow() -> list[Any]:
        async with AsyncExitStack() as stack:
            client = await open_client(stack, sdk, emulator)
            sender = await enter(stack, client.get_queue_sender("plain"))
            receiver = await enter(stack, client.get_queue_receiver("plain"))
            # Open both links first, so the schedule below is not eaten by set-up time.
            await call(sender.send_messages(ServiceBusMessage("now")))
            [now] = await call(receiver.receive_messages(max_message_count=1, max_wait_time=5))
            await call(receiver.complete_message(now))

            due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
            message = ServiceBusMessage("sent", scheduled_enqueue_time_utc=due)
            await call(sender.send_messages(message))
            keep, cancel = await call(
                sender.schedule_messages([ServiceBusMessage("kept"), ServiceBusMessage("no")], due)
            )
            await call(sender.cancel_scheduled_messages(cancel))
            try:
                await call(sender.cancel_scheduled_messages(cancel))
            except sb_errors.MessageNotFoundError:
                cancelled_twice = "MessageNotFoundError"
            early = await call(receiver.receive_messages(max_message_count=5, max_wait_time=0.2))
            early_enough = dt.datetime.now(dt.UTC) < due  # else the check above proves nothing
            received: list[Any] = []
            while len(received) < 2:
                received += await call(
                    receiver.receive_messages(max_message_count=2 - len(received), max_wait_time=5)
                )
            arrived = dt.datetime.now(dt.UTC)
            return [
                (early, early_enough),
                [str(m) for m in received],
                [
                    abs(m.scheduled_enqueue_time_utc - due) < dt.timedelta(milliseconds=1)
                    for m in received
                ],
                arrived >= due,
                keep < cancel,
                cancelled_twice,
            ]

    early, received, times, in_time, numbered, twice = await run(flow)
    assert early == ([], True)
    assert received == ["sent", "kept"]
    assert times == [True, True]
    assert in_time
    assert numbered
    assert twice == "MessageNotFoundError"
    assert emulator.broker.scheduled_messages("plain") == []


# -- expired SAS token ---------------------------------------------------------------------


async def test_expired_sas_token(emulator: Emulator, sdk: type[Any]) -> None:
    """A correctly signed but expired SAS token makes the SDK raise
    ServiceBusAuthenticationError; the same token unexpired works."""
    namespace = f"127.0.0.1:{emulator.port}"

    def token(expiry: int) -> str:
        return sas_token(f"sb://{namespace}", emulator.key_name, emulator.key, expiry)

    async def flow(signature: str) -> None:
        async with AsyncExitStack() as stack:
            if sdk is ServiceBusClient:  # the connection-string form
                client = await enter(
                    stack,
                    sdk.from_connection_string(
                        f"Endpoint=sb://{namespace};SharedAccessSignature={signature};"
                        "UseDevelopmentEmulator=true",
                        retry_total=0,
                    ),
                )
            else:  # a credential object
                client = await enter(
                    stack,
                    sdk(namespace, AzureSasCredential(signature), use_tls=False, retry_total=0),
                )
            sender = await enter(stack, client.get_queue_sender("plain"))
            await call(sender.send_messages(ServiceBusMessage("x")))

    await run(flow, token(int(time.time()) + 600))
    assert emulator.broker.active_message_count("plain") == 1
    with pytest.raises(sb_errors.ServiceBusAuthenticationError):
        await run(flow, token(int(time.time()) - 60))
    assert emulator.broker.active_message_count("plain") == 1


# -- subscriptions -----------------------------------------------------------------------


async def test_subscription_sessions(emulator: Emulator, sdk: type[Any]) -> None:
    """Session receive, settlement and $management on a topic's subscription."""
    broker = emulator.broker
    await broker.send("t", [Message(f"m{i}", session_id="a") for i in range(4)])

    async def flow() -> list[Any]:
        async with AsyncExitStack() as stack:
            client = await open_client(stack, sdk, emulator)
            receiver = await enter(
                stack,
                client.get_subscription_receiver(
                    "t", "s", session_id=NEXT_AVAILABLE_SESSION, max_wait_time=1
                ),
            )
            done, again, later, dead = await call(
                receiver.receive_messages(max_message_count=4, max_wait_time=1)
            )
            await call(receiver.complete_message(done))
            await call(receiver.abandon_message(again))
            await call(receiver.defer_message(later))
            await call(receiver.dead_letter_message(dead, reason="r"))
            [fetched] = await call(receiver.receive_deferred_messages([later.sequence_number]))
            await call(receiver.complete_message(fetched))
            session = receiver.session
            await call(session.set_state(b"state"))
            state = await call(session.get_state())
            renewed = await call(session.renew_lock())
            peeked = await call(receiver.peek_messages(5, sequence_number=1))
            return [session.session_id, state, renewed is not None, [str(m) for m in peeked]]

    assert await run(flow) == ["a", b"state", True, ["m1"]]
    [back] = broker.active_messages(SUB)
    assert (back.text(), back.delivery_count) == ("m1", 1)
    assert [m.text() for m in broker.dead_letter_messages(SUB)] == ["m3"]
    assert broker.session_state(SUB, "a") == b"state"
    assert broker.locked_sessions(SUB) == []


# -- errors and codec ------------------------------------------------------------------


async def test_management_and_settlement_errors(emulator: Emulator) -> None:
    """A lost message lock, a bad disposition status and an unknown operation reach the
    SDK as its own errors, and the connection keeps working."""
    from azure.servicebus._common import mgmt_handlers

    broker = emulator.broker
    await broker.send("plain", [Message("a"), Message("b")])

    def flow() -> list[str]:
        seen = []
        conn_str = emulator.connection_string
        with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            with client.get_queue_receiver("plain", max_wait_time=1) as receiver:
                first, second = receiver.receive_messages(max_message_count=2, max_wait_time=1)
                trio.from_thread.run_sync(broker.fail_next, "complete", MessageLockLostError)
                try:
                    receiver.complete_message(first)
                except sb_errors.MessageLockLostError:
                    seen.append("MessageLockLostError")
                assert second.lock_token is not None
                try:
                    receiver._settle_message_via_mgmt_link("bogus", [second.lock_token])
                except sb_errors.ServiceBusError as exc:
                    seen.append(f"{type(exc).__name__}: {'disposition-status' in str(exc)}")
                try:
                    receiver._mgmt_request_response(
                        b"com.microsoft:bogus", {}, mgmt_handlers.default
                    )
                except sb_errors.ServiceBusError as exc:
                    seen.append(f"{type(exc).__name__}: {'does not implement' in str(exc)}")
                receiver.complete_message(second)  # still served
        return seen

    with trio.fail_after(60):
        seen = await trio.to_thread.run_sync(flow)
    assert seen == [
        "MessageLockLostError",
        "ServiceBusError: True",
        "ServiceBusError: True",
    ]
    [left] = broker.active_messages("plain")
    assert left.text() == "a"


def test_application_property_codec() -> None:
    """Values proton decodes become plain Python values, and plain values encode back."""
    import proton

    from trio_sessions.emulator._server import _from_amqp, _to_amqp

    assert _from_amqp(proton.timestamp(1500)) == dt.datetime(1970, 1, 1, 0, 0, 1, 500000, dt.UTC)
    beyond = proton.timestamp(253402300800000 * 10)  # past datetime's range: kept as ms
    assert (_from_amqp(beyond), type(_from_amqp(beyond))) == (beyond, int)
    assert type(_from_amqp(proton.int32(5))) is int
    assert type(_from_amqp(proton.float32(1.5))) is float
    assert type(_from_amqp(proton.symbol("s"))) is str
    assert _from_amqp(memoryview(b"x")) == b"x"
    assert type(_to_amqp(5)) is proton.int32
    assert type(_to_amqp(2**40)) is int  # proton encodes a plain int as long
    assert type(_to_amqp(2**64 - 1)) is proton.ulong
    assert _to_amqp(True) is True
    assert _to_amqp(dt.datetime(1970, 1, 1, 0, 0, 2, tzinfo=dt.UTC)) == proton.timestamp(2000)
