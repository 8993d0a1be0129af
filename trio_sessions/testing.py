"""pytest fixtures for code that talks to Service Bus: a local emulator per test.

Enable them in a ``conftest.py``::

    pytest_plugins = ["trio_sessions.testing"]

then take ``servicebus_connection_string`` (or ``servicebus_emulator`` for the broker
behind it) in a pytest-trio test. The entities come from the ``servicebus_emulator_config``
fixture, in the official emulator's Config.json format; override it to choose your own::

    @pytest.fixture
    def servicebus_emulator_config():
        return {"UserConfig": {"Namespaces": [{"Name": "test", "Queues": [
            {"Name": "orders", "Properties": {"RequiresSession": True}}]}]}}

Each test gets a fresh emulator on a free loopback port (needs the ``emulator`` extra).

.. versionadded:: 0.1
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from .emulator import Emulator, serve_emulator
from .emulator._config import load_config

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = [
    "servicebus_connection_string",
    "servicebus_emulator",
    "servicebus_emulator_config",
]

#: One session-enabled queue named ``queue``: the default entities.
DEFAULT_CONFIG: dict[str, Any] = {
    "UserConfig": {
        "Namespaces": [
            {"Name": "test", "Queues": [{"Name": "queue", "Properties": {"RequiresSession": True}}]}
        ]
    }
}


@pytest.fixture
def servicebus_emulator_config() -> dict[str, Any]:
    """The entities to create, in Config.json form (override this fixture to change them)."""
    return DEFAULT_CONFIG


@pytest.fixture
async def servicebus_emulator(
    servicebus_emulator_config: dict[str, Any],
) -> AsyncIterator[Emulator]:
    """A running emulator with the configured entities; ``.broker`` inspects its state."""
    async with serve_emulator(load_config(servicebus_emulator_config)) as emulator:
        yield emulator


@pytest.fixture
def servicebus_connection_string(servicebus_emulator: Emulator) -> str:
    """The connection string of this test's emulator (``UseDevelopmentEmulator=true``)."""
    return servicebus_emulator.connection_string
