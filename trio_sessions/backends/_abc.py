"""The seam between the session manager and a broker.

A backend accepts sessions and sends messages; a `SessionLink` is one locked session.
Every method is a Trio-flavoured async function that blocks until it has a result;
timeouts belong to the caller (cancel scopes), except where the broker itself waits
on the server side (``max_wait_time`` of `Backend.accept_session`).

Times inside the core are Trio-clock deadlines (``trio.current_time()`` units);
``locked_until_utc`` is the same instant as an aware UTC datetime, for the public edge.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

from .._messages import Abandon, Complete, DeadLetter, Defer
from .._options import ReceiveMode

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Callable, Sequence

    from .._errors import SessionLockLostError
    from .._messages import EntityPath, Message, ReceivedMessage, Settlement

__all__ = ["Backend", "SessionLink", "SettleAndReceive", "SingleSettlements"]


class SessionLink(Protocol):
    """One accepted session, locked by this receiver until `aclose` or lock expiry.

    Only its actor's tasks call these methods. Operations on a lost lock raise
    `SessionLockLostError`.
    """

    @property
    def session_id(self) -> str: ...

    @property
    def locked_until(self) -> float:
        """The Trio-clock time at which the session lock expires."""
        ...

    @property
    def locked_until_utc(self) -> dt.datetime:
        """`locked_until` as an aware UTC datetime."""
        ...

    async def receive(self, max_count: int) -> list[ReceivedMessage]:
        """Wait for at least one message; return up to ``max_count`` in session order."""
        ...

    async def settle(self, settlements: Sequence[Settlement]) -> list[BaseException | None]:
        """Apply several settlements in order; return, for each, None or its error."""
        ...

    async def complete(self, message: ReceivedMessage) -> None: ...

    async def abandon(self, message: ReceivedMessage) -> None: ...

    async def dead_letter(
        self,
        message: ReceivedMessage,
        reason: str | None = None,
        error_description: str | None = None,
    ) -> None: ...

    async def defer(self, message: ReceivedMessage) -> None: ...

    async def receive_deferred(self, sequence_numbers: Sequence[int]) -> list[ReceivedMessage]:
        """Receive deferred messages by sequence number (`MessageNotFoundError` if unknown)."""
        ...

    async def renew_lock(self) -> float:
        """Renew the session lock; return the new `locked_until`."""
        ...

    async def get_state(self) -> bytes | None: ...

    async def set_state(self, state: bytes | None) -> None: ...

    async def aclose(self) -> None:
        """Release the session lock; unsettled messages become available again."""
        ...

    def on_lock_lost(self, callback: Callable[[SessionLockLostError], None]) -> None:
        """Call ``callback`` (synchronously, at most once) when the broker takes the lock away.

        This is how a holder learns at once of a lock lost on the broker's side (Service
        Bus detaches the link), so its handlers stop before another receiver can take
        the session. (It may also be called when the lock lapses at `locked_until`,
        which the holder knows anyway.)
        """
        ...


class SettleAndReceive(Protocol):
    """An optional `SessionLink` method: settle and receive in one call (issue #8).

    The actor's inline loop settles the message it has just handled and receives the
    next in one step where the link offers this: one checkpoint (one bridge crossing on
    the Azure backend) per message instead of two.
    """

    async def settle_and_receive(
        self,
        settlements: Sequence[Settlement],
        on_settled: Callable[[list[BaseException | None]], None],
        max_count: int,
        deadline: float = math.inf,
    ) -> list[ReceivedMessage]:
        """Apply ``settlements`` in order, then wait for messages as `SessionLink.receive`,
        but only until the Trio-clock ``deadline``: then return an empty list.

        The deadline is the idle clock of the actor's wait: given to the link, it costs
        nothing when a message is ready (a cancel scope's deadline costs two heap
        operations each time it moves).

        ``on_settled(results)`` is called exactly once, synchronously in the Trio
        thread, as soon as the settlements are done and before the wait, with what
        `SessionLink.settle` would return. A cancellation that arrives before the
        settlements are done does not stop them: they complete, ``on_settled`` is called,
        and then `trio.Cancelled` is raised. If the call raises before ``on_settled`` was
        called, no settlement was applied, with one exception: a backend whose
        settlement overran its close time-out (`AzureServiceBus`: ``CLOSE_TIMEOUT``,
        10 s) gives up waiting and raises, and ``on_settled`` may then still be called
        later, when the settlement ends.
        """
        ...


class Backend(Protocol):
    """A broker: accepts sessions and sends messages."""

    async def accept_session(
        self,
        entity: EntityPath,
        session_id: str | None = None,
        *,
        receive_mode: ReceiveMode = ReceiveMode.PEEK_LOCK,
        max_wait_time: float | None = None,
        prefetch_count: int = 0,
    ) -> SessionLink:
        """Lock a session: the given one, or the next available one.

        Raises:
            OperationTimeoutError: no session became available within ``max_wait_time``.
            SessionCannotBeLockedError: another receiver holds ``session_id``.
            EntityNotFoundError: the entity does not exist.
            SessionsNotEnabledError: the entity does not require sessions.
        """
        ...

    async def send(self, entity: str, messages: Message | Sequence[Message]) -> None:
        """Send one message, or a list as one batch, to a queue or topic."""
        ...


class SingleSettlements:
    """`SessionLink`'s one-message settle methods, for links that settle one at a time.

    A link subclasses it and defines ``_settle_single``; ``complete``, ``abandon``,
    ``dead_letter`` and ``defer`` each make one `Settlement` of it.
    """

    __slots__ = ()

    async def _settle_single(self, settlement: Settlement) -> None:
        raise NotImplementedError

    async def complete(self, message: ReceivedMessage) -> None:
        await self._settle_single(Complete(message))

    async def abandon(self, message: ReceivedMessage) -> None:
        await self._settle_single(Abandon(message))

    async def dead_letter(
        self,
        message: ReceivedMessage,
        reason: str | None = None,
        error_description: str | None = None,
    ) -> None:
        await self._settle_single(DeadLetter(message, reason, error_description))

    async def defer(self, message: ReceivedMessage) -> None:
        await self._settle_single(Defer(message))
