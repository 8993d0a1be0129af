"""trio_sessions: a session processor for Azure Service Bus, on Trio.

Reads many Service Bus sessions in parallel with bounded concurrency: acquires sessions,
runs one actor per session, renews session locks, releases idle sessions, settles every
message once, and never processes one session in two places.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ._context import SessionContext as SessionContext
from ._errors import AuthenticationError as AuthenticationError
from ._errors import EntityNotFoundError as EntityNotFoundError
from ._errors import ErrorContext as ErrorContext
from ._errors import ErrorSource as ErrorSource
from ._errors import MessageAlreadySettledError as MessageAlreadySettledError
from ._errors import MessageLockLostError as MessageLockLostError
from ._errors import MessageNotFoundError as MessageNotFoundError
from ._errors import MessageSizeExceededError as MessageSizeExceededError
from ._errors import OperationTimeoutError as OperationTimeoutError
from ._errors import ServiceBusConnectionError as ServiceBusConnectionError
from ._errors import SessionCannotBeLockedError as SessionCannotBeLockedError
from ._errors import SessionLockLostError as SessionLockLostError
from ._errors import SessionsError as SessionsError
from ._errors import SessionsNotEnabledError as SessionsNotEnabledError
from ._manager import SessionManager as SessionManager
from ._manager import open_session_manager as open_session_manager
from ._messages import Message as Message
from ._messages import ReceivedMessage as ReceivedMessage
from ._options import ReceiveMode as ReceiveMode
from ._options import RetryPolicy as RetryPolicy
from ._options import SessionManagerOptions as SessionManagerOptions
from ._stats import ManagerStats as ManagerStats
from ._version import __version__ as __version__
from .backends import MemoryBroker as MemoryBroker

if TYPE_CHECKING:
    from .backends import AzureServiceBus as AzureServiceBus

__all__ = [
    "AuthenticationError",
    "AzureServiceBus",
    "EntityNotFoundError",
    "ErrorContext",
    "ErrorSource",
    "ManagerStats",
    "MemoryBroker",
    "Message",
    "MessageAlreadySettledError",
    "MessageLockLostError",
    "MessageNotFoundError",
    "MessageSizeExceededError",
    "OperationTimeoutError",
    "ReceiveMode",
    "ReceivedMessage",
    "RetryPolicy",
    "ServiceBusConnectionError",
    "SessionCannotBeLockedError",
    "SessionContext",
    "SessionLockLostError",
    "SessionManager",
    "SessionManagerOptions",
    "SessionsError",
    "SessionsNotEnabledError",
    "open_session_manager",
]

logging.getLogger("trio_sessions").addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    # AzureServiceBus is loaded on first use, so importing trio_sessions never imports
    # asyncio or the Azure SDK (as anyio loads its backends).
    if name == "AzureServiceBus":
        from .backends._azure import AzureServiceBus

        globals()[name] = AzureServiceBus
        return AzureServiceBus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fixup_module_metadata() -> None:
    # Clean tracebacks and docs: public objects say they live in trio_sessions.
    for name in __all__:
        obj = globals().get(name)
        if obj is not None and getattr(obj, "__module__", "").startswith("trio_sessions."):
            obj.__module__ = "trio_sessions"


_fixup_module_metadata()
del _fixup_module_metadata
