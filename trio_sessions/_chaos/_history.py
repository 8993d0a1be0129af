"""What a chaos run records: handler calls and faults, in memory or as JSONL per process.

A worker process appends one ``start`` line when a handler call begins and one ``end``
line when it ends, each flushed at once, so a SIGKILLed worker leaves its in-flight calls
behind as starts without an end (``Outcome.KILLED``): the checker still sees them when
it looks for overlaps. The orchestrator appends ``fault`` lines for what it injected.
"""

from __future__ import annotations

import enum
import json
from typing import IO, TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path


class Outcome(enum.Enum):
    """How a handler call ended."""

    #: The handler returned: its work is done (the message may still fail to settle).
    OK = "ok"
    #: The handler raised: the message was abandoned, its work not done.
    RAISED = "raised"
    #: The handler was cancelled (lock loss, or the end of the shutdown grace).
    CANCELLED = "cancelled"
    #: The process died during the call (a start without an end).
    KILLED = "killed"


#: Faults observed rather than injected: ``lock_lost`` (a worker's
#: ``process_error`` was given a `SessionLockLostError`), ``complete_failed`` (a
#: transient error failed an auto-complete; the message stays locked, unsettled, until its
#: session closes, and then comes back, as on Service Bus); and ``connection_failed`` (the
#: emulator ended a client connection on an error, releasing its sessions, as a cut does).
OBSERVED_FAULTS = frozenset({"lock_lost", "complete_failed", "connection_failed"})

#: Injected faults by which the broker takes a session lock from a holder that cannot
#: know at once (its handler may still run when another receiver gets the session): an
#: expiry forced through the broker, and a cut connection (the emulator then releases
#: the connection's sessions at once; Service Bus keeps a vanished client's lock until
#: it expires), or one the emulator ended on an error. They explain an overlap; nothing
#: else does.
FORCED_RELEASE_FAULTS = frozenset({"expire_lock", "cut_connections", "connection_failed"})

#: Fault kinds that explain a duplicate: those that take a session lock away from its
#: holder, and a failed complete.
LOCK_LOSS_FAULTS = frozenset({"expire_lock", "kill", "cut_connections", *OBSERVED_FAULTS})


@attrs.frozen(kw_only=True)
class Call:
    """One handler call: which message, where, when, and how it ended.

    ``end`` is None when the process died during the call. Times are seconds on one
    clock shared by every process of the run (the Trio clock in-process, wall time
    across processes).
    """

    process: str
    session_id: str
    message_id: str
    sequence_number: int
    delivery_count: int
    start: float
    end: float | None
    outcome: Outcome

    def to_json(self) -> dict[str, Any]:
        """The call as a JSON object."""
        return {**attrs.asdict(self), "outcome": self.outcome.value}


@attrs.frozen(kw_only=True)
class Fault:
    """An injected fault, or a lock loss a worker observed.

    ``process`` None means every process (a cut of all connections); ``session_id`` None
    means every session the process held.
    """

    kind: str
    time: float
    process: str | None = None
    session_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The fault as a JSON object."""
        return attrs.asdict(self)

    def hits(self, process: str, session_id: str) -> bool:
        """Whether this fault could have taken ``session_id``'s lock from ``process``."""
        return (self.process is None or self.process == process) and (
            self.session_id is None or self.session_id == session_id
        )


@attrs.define
class History:
    """Every call and fault of a run."""

    calls: list[Call] = attrs.field(factory=list)
    faults: list[Fault] = attrs.field(factory=list)


@attrs.define(eq=False)
class HistoryWriter:
    """Appends a process's calls and faults to a JSONL file, one flushed line each."""

    file: IO[str]
    process: str
    _next_id: int = attrs.field(init=False, default=0)

    def start(
        self,
        *,
        session_id: str,
        message_id: str,
        sequence_number: int,
        delivery_count: int,
        start: float,
    ) -> int:
        """Record that a call began; returns the id to give `end`."""
        self._next_id += 1
        self._write(
            {
                "type": "start",
                "id": self._next_id,
                "process": self.process,
                "session_id": session_id,
                "message_id": message_id,
                "sequence_number": sequence_number,
                "delivery_count": delivery_count,
                "start": start,
            }
        )
        return self._next_id

    def end(self, call_id: int, *, end: float, outcome: Outcome) -> None:
        """Record that call ``call_id`` ended."""
        self._write(
            {
                "type": "end",
                "id": call_id,
                "process": self.process,
                "end": end,
                "outcome": outcome.value,
            }
        )

    def fault(self, fault: Fault) -> None:
        """Record a fault."""
        self._write({"type": "fault", **fault.to_json()})

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def read_history(paths: Iterable[Path]) -> History:
    """Read the JSONL files of a run (a torn last line, from a SIGKILL, is skipped).

    Raises:
        ValueError: a line other than a file's last is not a record.
    """
    history = History()
    for path in paths:
        starts: dict[tuple[str, int], dict[str, Any]] = {}
        ends: dict[tuple[str, int], dict[str, Any]] = {}
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                if number == len(lines):
                    break  # the process died while writing it
                raise ValueError(f"{path}:{number}: not a JSON record: {line[:80]!r}") from None
            kind = record.pop("type")
            if kind == "fault":
                history.faults.append(Fault(**record))
            elif kind == "start":
                starts[record["process"], record.pop("id")] = record
            elif kind == "end":
                ends[record["process"], record["id"]] = record
            else:
                raise ValueError(f"{path}:{number}: unknown record type {kind!r}")
        for key, start in starts.items():
            end = ends.get(key)
            history.calls.append(
                Call(
                    **start,
                    end=None if end is None else end["end"],
                    outcome=Outcome.KILLED if end is None else Outcome(end["outcome"]),
                )
            )
    return history
