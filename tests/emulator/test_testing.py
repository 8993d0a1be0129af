"""The trio_sessions.testing fixtures, used as a user would."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from azure.servicebus import ServiceBusClient, ServiceBusMessage

from trio_sessions.emulator import Emulator

pytest.importorskip("proton")


def send(conn_str: str, queue: str) -> None:
    with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages(ServiceBusMessage("hi", session_id="s"))


async def test_default_entities(
    servicebus_connection_string: str, servicebus_emulator: Emulator
) -> None:
    """By default there is one session queue named queue, reachable with the string."""
    with trio.fail_after(30):
        await trio.to_thread.run_sync(send, servicebus_connection_string, "queue")
    assert servicebus_emulator.broker.active_message_count("queue") == 1


class TestOverriddenEntities:
    """Overriding servicebus_emulator_config chooses the entities."""

    @pytest.fixture
    def servicebus_emulator_config(self) -> dict[str, Any]:
        return {"UserConfig": {"Namespaces": [{"Name": "x", "Queues": [{"Name": "orders"}]}]}}

    async def test_custom_queue(
        self, servicebus_connection_string: str, servicebus_emulator: Emulator
    ) -> None:
        """The overridden config's queue exists and the default one does not."""
        with trio.fail_after(30):
            await trio.to_thread.run_sync(send, servicebus_connection_string, "orders")
        assert servicebus_emulator.broker.active_message_count("orders") == 1
        assert "queue" not in servicebus_emulator.broker._queues
