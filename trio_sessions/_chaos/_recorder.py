"""Handler and error callbacks that record a chaos run's history as it happens."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import trio

from .._errors import ErrorSource, SessionLockLostError
from ._history import Call, Fault, History, Outcome

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .._context import SessionContext
    from .._errors import ErrorContext
    from .._messages import ReceivedMessage
    from ._history import HistoryWriter

#: Settle sources whose transient failure leaves a message locked and unsettled, so
#: that it comes back when its session closes: at-least-once allows that duplicate.
_SETTLE_SOURCES = frozenset({ErrorSource.COMPLETE})


async def _no_fault(message: ReceivedMessage) -> None:
    await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class Recorder:
    """Wraps a behaviour as ``process_message`` and records every call and lock loss.

    Calls and observed faults go to ``history`` (in memory) and, if given, to
    ``writer`` (JSONL). ``clock`` gives the time (`trio.current_time` in virtual time,
    `time.time` across processes).
    """

    process: str
    history: History = attrs.field(factory=History)
    behaviour: Callable[[ReceivedMessage], Awaitable[None]] = _no_fault
    writer: HistoryWriter | None = None
    clock: Callable[[], float] = trio.current_time

    async def process_message(self, message: ReceivedMessage, context: SessionContext) -> None:
        """Run the behaviour, recording the call's start, end and outcome."""
        start = self.clock()
        mid = message.message_id or ""
        call_id = 0
        if self.writer is not None:
            call_id = self.writer.start(
                session_id=context.session_id,
                message_id=mid,
                sequence_number=message.sequence_number,
                delivery_count=message.delivery_count,
                start=start,
            )
        outcome = Outcome.CANCELLED
        try:
            await self.behaviour(message)
            outcome = Outcome.OK
        except Exception:
            outcome = Outcome.RAISED
            raise
        finally:
            end = self.clock()
            self.history.calls.append(
                Call(
                    process=self.process,
                    session_id=context.session_id,
                    message_id=mid,
                    sequence_number=message.sequence_number,
                    delivery_count=message.delivery_count,
                    start=start,
                    end=end,
                    outcome=outcome,
                )
            )
            if self.writer is not None:
                self.writer.end(call_id, end=end, outcome=outcome)

    async def process_error(self, context: ErrorContext) -> None:
        """Record lost locks and failed settlements (the faults that explain duplicates)."""
        await trio.lowlevel.checkpoint()
        if isinstance(context.error, SessionLockLostError):
            kind = "lock_lost"
        elif context.source in _SETTLE_SOURCES:
            kind = "complete_failed"
        else:
            return
        self.record(
            Fault(kind=kind, time=self.clock(), process=self.process, session_id=context.session_id)
        )

    def record(self, fault: Fault) -> None:
        """Record a fault (in memory, and in the JSONL file if there is one)."""
        self.history.faults.append(fault)
        if self.writer is not None:
            self.writer.fault(fault)
