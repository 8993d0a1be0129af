"""The public surface: DESIGN §3.1's names, clean module metadata, docstrings, no leaks."""

from __future__ import annotations

import subprocess
import sys

import trio_sessions

CONTRACT = {
    "open_session_manager",
    "SessionManager",
    "SessionManagerOptions",
    "RetryPolicy",
    "ReceiveMode",
    "ManagerStats",
    "SessionContext",
    "ReceivedMessage",
    "Message",
    "ErrorContext",
    "ErrorSource",
    "MemoryBroker",
    "AzureServiceBus",
    "SessionsError",
    "SessionLockLostError",
    "SessionCannotBeLockedError",
    "MessageAlreadySettledError",
    "MessageLockLostError",
    "MessageNotFoundError",
    "EntityNotFoundError",
    "AuthenticationError",
    "ServiceBusConnectionError",
    "OperationTimeoutError",
}


def test_all_holds_the_contract_sorted() -> None:
    """__all__ names every public name of the contract, sorted, and each one resolves."""
    assert set(trio_sessions.__all__) >= CONTRACT
    assert list(trio_sessions.__all__) == sorted(trio_sessions.__all__)
    for name in trio_sessions.__all__:
        assert getattr(trio_sessions, name) is not None


def test_public_objects_live_in_the_package() -> None:
    """Exported objects report trio_sessions as their module and have docstrings."""
    for name in trio_sessions.__all__:
        obj = getattr(trio_sessions, name)
        if name != "AzureServiceBus":
            assert obj.__module__ == "trio_sessions", name
        assert obj.__doc__, name


def test_exceptions_share_one_base() -> None:
    """Every exception of the contract subclasses SessionsError."""
    for name in CONTRACT:
        obj = getattr(trio_sessions, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, trio_sessions.SessionsError), name


def test_no_private_leaks() -> None:
    """Nothing private is exported."""
    assert not [name for name in trio_sessions.__all__ if name.startswith("_")]


def test_import_does_not_load_asyncio_or_the_sdk() -> None:
    """import trio_sessions never imports asyncio, trio_asyncio or azure.servicebus."""
    code = (
        "import sys, trio_sessions; "
        "print(sorted(m for m in ('asyncio', 'trio_asyncio', 'azure.servicebus') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_unknown_attributes_raise() -> None:
    """A missing attribute is an AttributeError, not a lazy-import surprise."""
    import pytest

    with pytest.raises(AttributeError):
        trio_sessions.NoSuchThing  # noqa: B018
    with pytest.raises(AttributeError):
        trio_sessions.backends.NoSuchThing  # noqa: B018
