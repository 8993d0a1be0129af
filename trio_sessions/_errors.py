"""The exceptions trio_sessions raises.

::

    SessionsError
    ├── SessionLockLostError         lock expired or renewal failed; unsettled messages can no longer be settled
    ├── SessionCannotBeLockedError   another receiver holds the session
    ├── MessageAlreadySettledError   settled twice (or settled in receive-and-delete mode)
    ├── MessageLockLostError         a message's own lock expired (non-session entities)
    ├── MessageNotFoundError         no deferred message with that sequence number
    ├── MessageSizeExceededError     a message or session state is larger than Service Bus allows
    ├── EntityNotFoundError          fatal: no such queue, topic or subscription
    ├── SessionsNotEnabledError      fatal: a session receiver on an entity without sessions
    ├── AuthenticationError          fatal: bad key, expired token or missing claim
    ├── ServiceBusConnectionError    transient: retried with backoff
    └── OperationTimeoutError        transient: retried with backoff

Transient errors are retried by the manager and reported to ``process_error``; fatal
ones end ``subscribe`` by raising that one exception.
"""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "AuthenticationError",
    "EntityNotFoundError",
    "ErrorContext",
    "ErrorSource",
    "MessageAlreadySettledError",
    "MessageLockLostError",
    "MessageNotFoundError",
    "MessageSizeExceededError",
    "OperationTimeoutError",
    "ServiceBusConnectionError",
    "SessionCannotBeLockedError",
    "SessionLockLostError",
    "SessionsError",
    "SessionsNotEnabledError",
]


class SessionsError(Exception):
    """Base class of every error trio_sessions raises on purpose."""


class SessionLockLostError(SessionsError):
    """The session lock expired or could not be renewed.

    Messages received under the lost lock can no longer be settled; Service Bus (and the
    MemoryBroker) delivers them again, with ``delivery_count`` increased.
    """


class SessionCannotBeLockedError(SessionsError):
    """Another receiver holds the lock of the requested session."""


class MessageAlreadySettledError(SessionsError):
    """The message was settled already, or cannot be settled (receive-and-delete mode)."""


class MessageLockLostError(SessionsError):
    """The lock of a single message (on an entity without sessions) expired."""


class MessageNotFoundError(SessionsError):
    """No deferred message has the requested sequence number."""


class MessageSizeExceededError(SessionsError, ValueError):
    """A message, or a session state, is larger than Service Bus allows.

    Service Bus Standard takes messages of up to 256 KiB, and a session state of the size
    of one message; the SDK raises its own ``MessageSizeExceededError`` (also a
    `ValueError`) on send. Nothing is stored: split the payload, or keep it elsewhere and
    send a reference.
    """


class EntityNotFoundError(SessionsError):
    """The queue, topic or subscription does not exist. Fatal."""


class SessionsNotEnabledError(SessionsError, ValueError):
    """A session operation was used on an entity that does not require sessions. Fatal."""


class AuthenticationError(SessionsError):
    """The credentials were refused. Fatal."""


class ServiceBusConnectionError(SessionsError):
    """The connection to the broker failed or was lost. Transient: retried with backoff."""


class OperationTimeoutError(SessionsError):
    """An operation did not complete in time. Transient: retried with backoff."""


#: Errors that end ``subscribe`` instead of being retried.
FATAL_ERRORS: tuple[type[BaseException], ...] = (
    EntityNotFoundError,
    SessionsNotEnabledError,
    AuthenticationError,
)

#: Errors the manager retries with backoff.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ServiceBusConnectionError,
    OperationTimeoutError,
)


class ErrorSource(enum.Enum):
    """The operation during which an error reported to ``process_error`` happened."""

    ACCEPT_SESSION = "accept_session"
    RECEIVE = "receive"
    RENEW_LOCK = "renew_lock"
    COMPLETE = "complete"
    ABANDON = "abandon"
    DEAD_LETTER = "dead_letter"
    DEFER = "defer"
    SESSION_STATE = "session_state"
    PROCESS_MESSAGE = "process_message"
    CLOSE_SESSION = "close_session"


@attrs.frozen(kw_only=True)
class ErrorContext:
    """What ``process_error`` is given: the error, where it happened, and in which session.

    ``entity_path`` is the queue name, or ``"<topic>/subscriptions/<subscription>"``.
    ``session_id`` is None for errors outside any one session (accepting, for example).
    """

    error: BaseException
    source: ErrorSource
    session_id: str | None
    entity_path: str
