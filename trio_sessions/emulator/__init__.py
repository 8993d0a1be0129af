"""The emulator: a MemoryBroker served over AMQP 1.0 on loopback, for the Service Bus SDKs."""

from __future__ import annotations

from ._server import Emulator as Emulator
from ._server import serve_emulator as serve_emulator

__all__ = ["Emulator", "serve_emulator"]
