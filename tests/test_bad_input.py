"""Bad input (issue 7, item 5): one clear error naming the problem, and nothing lost.

Options, message fields, callbacks and JSON bodies are checked where they are defined
(test_options, test_messages, test_manager); here are the limits Service Bus sets on
sizes, and the arguments those files do not cover.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from trio_sessions import (
    MemoryBroker,
    Message,
    MessageSizeExceededError,
    ReceivedMessage,
    SessionContext,
    SessionsError,
    open_session_manager,
)
from trio_sessions._messages import EntityPath
from trio_sessions.backends._memory import MAX_MESSAGE_SIZE, message_size

KIB_256 = 256 * 1024


def make_broker() -> MemoryBroker:
    broker = MemoryBroker()
    broker.create_queue("q")
    return broker


def test_the_limit_is_service_bus_standard() -> None:
    """The MemoryBroker takes messages and session states of up to 256 KiB, as Standard does."""
    assert MAX_MESSAGE_SIZE == KIB_256
    assert issubclass(MessageSizeExceededError, SessionsError)
    assert issubclass(MessageSizeExceededError, ValueError)  # as the SDK's own


def test_message_size_counts_body_and_properties() -> None:
    """The size counts the body, the string properties and the application properties."""
    message = Message(
        b"12345",
        session_id="s",
        message_id="id",
        subject="sub",
        application_properties={"k": "vv", "n": 1, "b": b"xyz", "o": None},
    )
    assert message_size(message) == 5 + 1 + 2 + 3 + (1 + 2) + (1 + 8) + (1 + 3) + (1 + 4)


async def test_an_oversized_message_is_refused_and_nothing_is_stored() -> None:
    """A message over 256 KiB raises MessageSizeExceededError naming it and the limit."""
    broker = make_broker()
    with pytest.raises(MessageSizeExceededError, match=r"'big' of session 's'.*262144 bytes"):
        await broker.send("q", Message(b"x" * KIB_256, session_id="s", message_id="big"))
    with pytest.raises(MessageSizeExceededError, match="'big'"):
        await broker.send(
            "q",
            [
                Message(b"ok", session_id="s", message_id="small"),
                Message(b"x" * (KIB_256 - 2), session_id="s", message_id="big", subject="abc"),
            ],
        )
    assert broker.active_message_count("q") == 0  # the batch was refused whole


async def test_a_message_at_the_limit_is_taken() -> None:
    """A message of exactly 256 KiB, properties included, is stored."""
    broker = make_broker()
    await broker.send("q", Message(b"x" * (KIB_256 - 1), session_id="s"))
    assert broker.active_message_count("q") == 1


async def test_oversized_topic_messages_reach_no_subscription() -> None:
    """A refused message sent to a topic is stored in none of its subscriptions."""
    broker = MemoryBroker()
    broker.create_topic("t")
    broker.create_subscription("t", "a")
    with pytest.raises(MessageSizeExceededError):
        await broker.send("t", Message(b"x" * (KIB_256 + 1), session_id="s"))
    assert broker.active_message_count("t/subscriptions/a") == 0


async def test_oversized_session_state_is_refused_on_every_path(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A session state over 256 KiB is refused by the link, the manager and the context,
    and the state already there stays."""
    broker = make_broker()
    link = await broker.accept_session(EntityPath(queue_name="q"), "s")
    await link.set_state(b"x" * KIB_256)  # at the limit
    with pytest.raises(MessageSizeExceededError, match=r"session state of 's'.*262145 bytes"):
        await link.set_state(b"x" * (KIB_256 + 1))
    await link.set_state(b"kept")
    await link.aclose()

    await broker.send("q", Message(b"1", session_id="s"))
    refused: list[BaseException] = []

    async def handle(message: ReceivedMessage, context: SessionContext) -> None:
        try:
            await context.set_state("é" * KIB_256)  # str: encoded to 512 KiB of UTF-8
        except MessageSizeExceededError as exc:
            refused.append(exc)

    async with open_session_manager(broker, queue_name="q") as manager:
        with pytest.raises(MessageSizeExceededError, match="session state"):
            await manager.set_state("s", b"x" * (KIB_256 + 1))
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.subscribe, handle)
            await trio.sleep(1)
            manager.stop()
    assert len(refused) == 1
    assert broker.session_state("q", "s") == b"kept"
    assert broker.active_message_count("q") == 0  # the message itself was completed


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"queue_name": ""}, "queue_name"),
        ({"topic_name": "", "subscription_name": "s"}, "topic_name"),
        ({"topic_name": "t", "subscription_name": ""}, "subscription_name"),
    ],
)
async def test_empty_entity_names_are_refused(kwargs: dict[str, Any], field: str) -> None:
    """An empty queue, topic or subscription name is refused on entering, naming it."""
    with pytest.raises(TypeError, match=field):
        async with open_session_manager(MemoryBroker(), **kwargs):
            raise AssertionError("not reached")
