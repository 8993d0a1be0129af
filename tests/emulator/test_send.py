"""The emulator's first flows, driven by the real azure-servicebus SDK over loopback sockets.

The SDK's sync client runs in a worker thread and its asyncio client in a worker thread's
own event loop, so the emulator keeps serving on the Trio side meanwhile. Time is real
here: every SDK call gets a short deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import trio
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus import exceptions as sb_errors
from azure.servicebus.aio import ServiceBusClient as AsyncServiceBusClient

from trio_sessions import MemoryBroker
from trio_sessions.emulator import Emulator, serve_emulator
from trio_sessions.emulator._server import entity_from_address, sas_token_valid

pytest.importorskip("proton")  # the emulator extra; nox installs it for the tests


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    broker = MemoryBroker()
    broker.create_queue("q")
    broker.create_topic("t")
    broker.create_subscription("t", "one")
    async with serve_emulator(broker) as running:
        yield running


def sync_send(conn_str: str, entity: str, messages: list[ServiceBusMessage]) -> None:
    with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
        with client.get_queue_sender(entity) as sender:
            sender.send_messages(messages if len(messages) > 1 else messages[0])


def async_send(conn_str: str, entity: str, messages: list[ServiceBusMessage]) -> None:
    async def send() -> None:
        async with AsyncServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            async with client.get_queue_sender(entity) as sender:
                await sender.send_messages(messages)

    # A plain asyncio loop: once trio_asyncio is imported (the Azure backend imports it),
    # asyncio.run would run trio-asyncio's own loop instead.
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(send())


@pytest.mark.parametrize("send", [sync_send, async_send], ids=["sync", "asyncio"])
async def test_sdk_sends_single_messages_and_batches(
    emulator: Emulator, send: Callable[[str, str, list[ServiceBusMessage]], None]
) -> None:
    """Both SDK clients' sends land in the broker with their properties, in order."""
    messages = [
        ServiceBusMessage(
            f"edit {i}",
            session_id=f"doc-{i % 2}",
            message_id=f"m{i}",
            content_type="text/plain",
            correlation_id="corr",
            subject="edit",
            application_properties={"n": i, "who": "me"},
        )
        for i in range(3)
    ]
    with trio.fail_after(30):
        await trio.to_thread.run_sync(send, emulator.connection_string, "q", messages)
        await trio.to_thread.run_sync(
            send,
            emulator.connection_string,
            "q",
            [ServiceBusMessage(b"one", session_id="x")],
        )
    stored = emulator.broker.active_messages("q")
    assert [(m.text(), m.session_id, m.message_id) for m in stored[:3]] == [
        ("edit 0", "doc-0", "m0"),
        ("edit 1", "doc-1", "m1"),
        ("edit 2", "doc-0", "m2"),
    ]
    first = stored[0]
    assert (first.content_type, first.correlation_id, first.subject) == (
        "text/plain",
        "corr",
        "edit",
    )
    assert first.application_properties == {"n": 0, "who": "me"}
    assert (stored[3].body, stored[3].session_id) == (b"one", "x")


async def test_topic_sends_fan_out(emulator: Emulator) -> None:
    """A send to a topic reaches its subscriptions."""
    with trio.fail_after(30):
        await trio.to_thread.run_sync(
            sync_send, emulator.connection_string, "t", [ServiceBusMessage("x", session_id="a")]
        )
    assert emulator.broker.active_message_count("t/subscriptions/one") == 1


async def test_unknown_entity(emulator: Emulator) -> None:
    """A sender to an unknown entity gets the SDK's MessagingEntityNotFoundError."""
    with trio.fail_after(30), pytest.raises(sb_errors.MessagingEntityNotFoundError, match="nope"):
        await trio.to_thread.run_sync(
            sync_send, emulator.connection_string, "nope", [ServiceBusMessage("x", session_id="a")]
        )


async def test_missing_session_id_is_refused(emulator: Emulator) -> None:
    """A message without session id for a session queue is rejected, nothing stored."""
    with trio.fail_after(30), pytest.raises(sb_errors.ServiceBusError, match="session_id"):
        await trio.to_thread.run_sync(
            sync_send, emulator.connection_string, "q", [ServiceBusMessage("x")]
        )
    assert emulator.broker.active_message_count("q") == 0


@pytest.mark.parametrize(
    ("change", "find"),
    [
        ("SharedAccessKey=", "SharedAccessKey=wrong"),
        ("SharedAccessKeyName=", "SharedAccessKeyName=nobody"),
    ],
)
async def test_bad_credentials(emulator: Emulator, change: str, find: str) -> None:
    """A wrong key or an unknown key name makes the SDK raise ServiceBusAuthenticationError."""
    conn_str = emulator.connection_string.replace(change, find)
    with trio.fail_after(60), pytest.raises(sb_errors.ServiceBusAuthenticationError):
        await trio.to_thread.run_sync(
            sync_send, conn_str, "q", [ServiceBusMessage("x", session_id="a")]
        )
    assert emulator.broker.active_message_count("q") == 0


def test_sas_validation_matches_the_sdks() -> None:
    """The spec's test vector validates; tampering, expiry and strangers do not."""
    token = (
        "SharedAccessSignature sr=sb%3A%2F%2F127.0.0.1%3A5672%2Fq"
        "&sig=RjPWhKyOTooVJjlQt7Vs9gJX1LmRhnMgAhUttElXtls%3D&se=1700000000&skn=k"
    )
    audience = "sb://127.0.0.1:5672/q"
    assert sas_token_valid(token, audience=audience, keys={"k": "v"}, now=1_600_000_000) is None
    assert sas_token_valid(token, audience=audience, keys={"k": "w"}, now=0) == "invalid signature"
    assert sas_token_valid(token, audience=audience, keys={"x": "v"}, now=0) == "unknown key name"
    assert sas_token_valid(token, audience=audience, keys={"k": "v"}, now=1_800_000_000) == (
        "the token expired"
    )
    assert sas_token_valid(token, audience="sb://other/q", keys={"k": "v"}, now=0) == (
        "the token is for another resource"
    )
    assert sas_token_valid("Bearer x", audience=audience, keys={}, now=0) is not None
    assert sas_token_valid("SharedAccessSignature sr=a", audience=audience, keys={}, now=0) == (
        "the token has no sig field"
    )


@pytest.mark.parametrize(
    ("address", "entity"),
    [
        ("amqps://127.0.0.1:5672/q", "q"),
        ("q", "q"),
        ("amqps://h/t/Subscriptions/s", "t/subscriptions/s"),
        ("t/subscriptions/s", "t/subscriptions/s"),
        ("amqps://h", ""),
    ],
)
def test_entity_addresses(address: str, entity: str) -> None:
    """Addresses with or without scheme and host map to the broker's entity paths."""
    assert entity_from_address(address) == entity
