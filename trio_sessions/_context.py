"""`SessionContext`: what handlers get to act on their session.

A context never touches the broker: its methods send commands to the session's actor,
whose own tasks do all the session's I/O (DESIGN §2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, final

from ._messages import Abandon, Complete, DeadLetter, Defer, ReceivedMessage, Settlement

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Sequence

__all__ = ["SessionContext", "SessionPort", "state_to_bytes"]


def state_to_bytes(state: object) -> bytes | None:
    """Session state as stored: bytes, a str encoded as UTF-8, or None."""
    if state is None or isinstance(state, bytes):
        return state
    if isinstance(state, str):
        return state.encode("utf-8")
    if isinstance(state, bytearray | memoryview):
        return bytes(state)
    raise TypeError(f"session state must be bytes, str or None, not {type(state).__name__}")


class SessionPort(Protocol):
    """What a context needs from its actor (internal)."""

    @property
    def session_id(self) -> str: ...

    @property
    def entity_path(self) -> str: ...

    @property
    def locked_until_utc(self) -> dt.datetime: ...

    async def settle(self, settlement: Settlement) -> None: ...

    async def receive_deferred(self, sequence_numbers: Sequence[int]) -> list[ReceivedMessage]: ...

    async def get_state(self) -> bytes | None: ...

    async def set_state(self, state: bytes | None) -> None: ...

    async def renew_lock(self) -> dt.datetime: ...

    def release(self) -> None: ...

    async def next_message(self) -> ReceivedMessage | None: ...


@final
class SessionContext:
    """One locked session, as seen by user code.

    Handlers get one with each message (``process_message(message, context)``); in the
    actor form (`SessionManager.subscribe_sessions`) ``process_session(session)`` gets it
    once, and it is also an async iterator of the session's messages::

        async def process_session(session: SessionContext) -> None:
            async for message in session:
                ...

    Iteration ends when the session goes idle, is released, or the manager stops. With
    ``auto_complete``, a message is completed when the loop asks for the next one (or when
    ``process_session`` returns), and abandoned if the body raised, unless it was settled.

    Settling a message twice raises `MessageAlreadySettledError`. The methods may be
    called from any task; the session's actor carries them out in order.

    Contexts are made by the manager; user code does not create them.
    """

    __slots__ = ("_port",)

    def __init__(self, port: SessionPort, /) -> None:
        self._port = port

    def __repr__(self) -> str:
        return f"<SessionContext session_id={self.session_id!r} entity={self.entity_path!r}>"

    @property
    def session_id(self) -> str:
        """The id of the session."""
        return self._port.session_id

    @property
    def entity_path(self) -> str:
        """The queue, or ``"<topic>/subscriptions/<subscription>"``, the session belongs to."""
        return self._port.entity_path

    @property
    def locked_until(self) -> dt.datetime:
        """When the session lock expires (aware UTC datetime), updated on each renewal."""
        return self._port.locked_until_utc

    async def complete(self, message: ReceivedMessage) -> None:
        """Settle ``message`` as processed: it is removed from the entity.

        Raises:
            MessageAlreadySettledError: it was settled already.
            SessionLockLostError: the session lock was lost; the message will be delivered
                again.
        """
        await self._port.settle(Complete(message))

    async def abandon(self, message: ReceivedMessage) -> None:
        """Give ``message`` back: it is delivered again first, with ``delivery_count`` + 1."""
        await self._port.settle(Abandon(message))

    async def dead_letter(
        self,
        message: ReceivedMessage,
        reason: str | None = None,
        error_description: str | None = None,
    ) -> None:
        """Move ``message`` to the dead-letter queue, with an optional reason and description."""
        for name, value in (("reason", reason), ("error_description", error_description)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str or None, not {value!r}")
        await self._port.settle(DeadLetter(message, reason, error_description))

    async def defer(self, message: ReceivedMessage) -> None:
        """Set ``message`` aside: it can then only be received by its sequence number."""
        await self._port.settle(Defer(message))

    async def receive_deferred_messages(
        self, sequence_numbers: Sequence[int]
    ) -> list[ReceivedMessage]:
        """Receive deferred messages of this session by sequence number.

        ``auto_complete`` never settles these: settle each one explicitly.

        Raises:
            MessageNotFoundError: no deferred message has one of the sequence numbers.
        """
        numbers = list(sequence_numbers)
        for number in numbers:
            if isinstance(number, bool) or not isinstance(number, int):
                raise TypeError(f"sequence numbers must be int, not {number!r}")
        return await self._port.receive_deferred(numbers)

    async def get_state(self) -> bytes | None:
        """The session state (None if never set)."""
        return await self._port.get_state()

    async def set_state(self, state: bytes | str | None) -> None:
        """Replace the session state; a str is stored as UTF-8, None clears it.

        Raises:
            TypeError: ``state`` is not bytes, str or None.
            MessageSizeExceededError: ``state`` is larger than Service Bus keeps (256 KiB
                on Standard, the size of one message).
        """
        await self._port.set_state(state_to_bytes(state))

    async def renew_lock(self) -> dt.datetime:
        """Renew the session lock now; return the new `locked_until`."""
        return await self._port.renew_lock()

    def release(self) -> None:
        """Give the session back once in-flight handlers finish.

        No further messages of this session reach user code; buffered ones are abandoned,
        as on `SessionManager.stop`.
        """
        self._port.release()

    def __aiter__(self) -> SessionContext:
        return self

    async def __anext__(self) -> ReceivedMessage:
        message = await self._port.next_message()
        if message is None:
            raise StopAsyncIteration
        return message
