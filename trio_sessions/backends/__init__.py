"""Backends: the `Backend`/`SessionLink` seam, the MemoryBroker, and (lazily) AzureServiceBus.

``AzureServiceBus`` is imported on first use, so that ``import trio_sessions`` never
imports asyncio, trio-asyncio or the Azure SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._abc import Backend as Backend
from ._abc import SessionLink as SessionLink
from ._memory import MemoryBroker as MemoryBroker
from ._memory import MemorySessionLink as MemorySessionLink

if TYPE_CHECKING:
    from ._azure import AzureServiceBus as AzureServiceBus

__all__ = ["AzureServiceBus", "Backend", "MemoryBroker", "MemorySessionLink", "SessionLink"]


def __getattr__(name: str) -> Any:
    if name == "AzureServiceBus":
        from ._azure import AzureServiceBus

        return AzureServiceBus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
