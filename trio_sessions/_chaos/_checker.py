"""The history checker: did the run keep Service Bus's promises?

From the handler calls and faults of a run (`History`) and the broker's final state
(`BrokerState`) it computes, as issue 7 defines them:

* **lost**: sent, but never completed, dead-lettered or deferred, and no longer in the
  broker;
* **duplicates**: a message whose handler ran to its end (``Outcome.OK``) more than
  once. At-least-once delivery allows that only after a lock loss, so each one must be
  explained by a lock-loss fault (`LOCK_LOSS_FAULTS`) that hit the earlier call's
  process and session between that call's start and the message's next delivery. A
  message the broker completed twice is a duplicate nothing explains;
* **overlaps**: two handler calls of one session at the same time, in any processes
  (a call of a killed process lasts until the kill). An overlap is *forced* when the
  broker took the lock from under the earlier call (`FORCED_RELEASE_FAULTS`: the lock
  expired, or the connection was cut and the emulator released its sessions at once)
  before the later call began: no client can see that at once, so those are counted
  with their cause, apart from the unexplained ones, which are bugs;
* **order violations**: the first handler call of a session's messages out of send
  (sequence number) order.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

import attrs

from ._history import (
    FORCED_RELEASE_FAULTS,
    LOCK_LOSS_FAULTS,
    OBSERVED_FAULTS,
    Call,
    Fault,
    History,
    Outcome,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from ..backends import MemoryBroker


@attrs.frozen(kw_only=True)
class BrokerState:
    """What the broker holds at the end: message ids completed, dead-lettered, still there.

    ``completed`` may repeat an id (a broker bug the checker reports). ``active`` is every
    message still in the entity: available, locked or deferred.
    """

    completed: tuple[str, ...]
    dead_lettered: frozenset[str]
    active: frozenset[str]

    @classmethod
    def of(cls, broker: MemoryBroker, entity: str) -> BrokerState:
        """Read the final state of ``entity`` (the broker needs ``record_completed=True``)."""
        return cls(
            completed=tuple(m.message_id or "" for m in broker.completed_messages(entity)),
            dead_lettered=frozenset(
                m.message_id or "" for m in broker.dead_letter_messages(entity)
            ),
            active=frozenset(m.message_id or "" for m in broker.active_messages(entity)),
        )


@attrs.frozen(kw_only=True)
class Duplicate:
    """A message processed to its end again; ``cause`` is the fault kind that explains it."""

    message_id: str
    first: Call | None
    again: Call | None
    cause: str | None


@attrs.frozen(kw_only=True)
class Overlap:
    """Two calls of one session that ran at the same time; ``cause`` if it was forced."""

    session_id: str
    first: Call
    second: Call
    cause: str | None = None


@attrs.frozen(kw_only=True)
class OrderViolation:
    """A message first handled after a later-sent message of its session."""

    session_id: str
    call: Call
    after_sequence_number: int


@attrs.frozen(kw_only=True)
class Report:
    """What `check_history` found."""

    sent: int
    sessions: int
    calls: int
    lost: tuple[str, ...]
    unfinished: tuple[str, ...]
    duplicates: tuple[Duplicate, ...]
    overlaps: tuple[Overlap, ...]
    order_violations: tuple[OrderViolation, ...]
    faults: Mapping[str, int]
    observed: Mapping[str, int] = attrs.field(factory=dict)

    @property
    def unexplained_duplicates(self) -> tuple[Duplicate, ...]:
        """The duplicates no lock loss explains."""
        return tuple(d for d in self.duplicates if d.cause is None)

    @property
    def unexplained_overlaps(self) -> tuple[Overlap, ...]:
        """The overlaps no forced release of the lock explains."""
        return tuple(o for o in self.overlaps if o.cause is None)

    @property
    def ok(self) -> bool:
        """Nothing lost, no unexplained overlap, no order violation, no unexplained duplicate."""
        return not (
            self.lost
            or self.unexplained_overlaps
            or self.order_violations
            or self.unexplained_duplicates
        )

    def summary(self) -> dict[str, Any]:
        """The figures as a JSON object (the chaos report's table)."""
        causes = Counter(d.cause or "unexplained" for d in self.duplicates)
        return {
            "messages": self.sent,
            "sessions": self.sessions,
            "handler_calls": self.calls,
            "faults": dict(sorted(self.faults.items())),
            "faults_total": sum(self.faults.values()),
            "observed": dict(sorted(self.observed.items())),
            "lost": len(self.lost),
            "unfinished": len(self.unfinished),
            "overlaps": len(self.overlaps),
            "overlaps_unexplained": len(self.unexplained_overlaps),
            "overlap_causes": dict(
                sorted(Counter(o.cause or "unexplained" for o in self.overlaps).items())
            ),
            "order_violations": len(self.order_violations),
            "duplicates": len(self.duplicates),
            "duplicate_causes": dict(sorted(causes.items())),
        }


def check_history(history: History, sent: Mapping[str, str], final: BrokerState) -> Report:
    """Check a run's history against what was sent and what the broker holds at the end.

    Args:
        history: every handler call and fault of the run.
        sent: message id -> session id of every message sent.
        final: the broker's state once the run is over.
    """
    calls_of: dict[str, list[Call]] = defaultdict(list)
    for call in history.calls:
        calls_of[call.message_id].append(call)
    for calls in calls_of.values():
        calls.sort(key=lambda c: c.start)
    settled = set(final.completed) | final.dead_lettered
    lost = tuple(sorted(m for m in sent if m not in settled and m not in final.active))
    unfinished = tuple(sorted(m for m in sent if m in final.active))
    return Report(
        sent=len(sent),
        sessions=len(set(sent.values())),
        calls=len(history.calls),
        lost=lost,
        unfinished=unfinished,
        duplicates=tuple(_duplicates(history.calls, calls_of, history.faults, final.completed)),
        overlaps=tuple(_overlaps(history.calls, history.faults)),
        order_violations=tuple(_order_violations(calls_of)),
        faults=Counter(f.kind for f in history.faults if f.kind not in OBSERVED_FAULTS),
        observed=Counter(f.kind for f in history.faults if f.kind in OBSERVED_FAULTS),
    )


def _duplicates(
    calls: list[Call],
    calls_of: Mapping[str, list[Call]],
    faults: list[Fault],
    completed: Iterable[str],
) -> Iterable[Duplicate]:
    losses = sorted((f for f in faults if f.kind in LOCK_LOSS_FAULTS), key=lambda f: f.time)
    starts: dict[tuple[str, str], list[float]] = defaultdict(list)
    for call in calls:
        starts[call.process, call.session_id].append(call.start)

    def explains(fault: Fault, done: Call, until: float) -> bool:
        if not fault.hits(done.process, done.session_id) or fault.time < done.start:
            return False
        if fault.time <= until:
            return True
        # A loss the holder observed is reported late (after its failed operation, while
        # another receiver may already have the session): it still explains, as long as
        # the holder had not begun another call of that session in between.
        return (
            fault.process == done.process
            and fault.kind in OBSERVED_FAULTS
            and not any(done.start < t < fault.time for t in starts[done.process, done.session_id])
        )

    for message_id, message_calls in sorted(calls_of.items()):
        oks = [c for c in message_calls if c.outcome is Outcome.OK]
        for done in oks[:-1]:
            later = [c for c in message_calls if c.start > done.start]
            until = later[0].start if later else math.inf
            cause = next((f.kind for f in losses if explains(f, done, until)), None)
            yield Duplicate(
                message_id=message_id, first=done, again=later[0] if later else None, cause=cause
            )
    for message_id, times in sorted(Counter(completed).items()):
        for _ in range(times - 1):
            yield Duplicate(message_id=message_id, first=None, again=None, cause=None)


def _end(call: Call, kills: Mapping[str, list[float]]) -> float:
    """When a call stopped running: its end, or its process's next kill (or never)."""
    if call.end is not None:
        return call.end
    return min((t for t in kills.get(call.process, ()) if t >= call.start), default=math.inf)


def _overlaps(calls: list[Call], faults: list[Fault]) -> Iterable[Overlap]:
    forced = sorted((f for f in faults if f.kind in FORCED_RELEASE_FAULTS), key=lambda f: f.time)
    kills: dict[str, list[float]] = defaultdict(list)
    for fault in faults:
        if fault.kind == "kill" and fault.process is not None:
            kills[fault.process].append(fault.time)
    by_session: dict[str, list[Call]] = defaultdict(list)
    for call in calls:
        by_session[call.session_id].append(call)
    for session_id, session_calls in sorted(by_session.items()):
        session_calls.sort(key=lambda c: c.start)
        running: list[tuple[float, Call]] = []  # (end, call) of calls begun so far
        for call in session_calls:
            running = [(end, c) for end, c in running if end > call.start]
            for _, earlier in running:
                cause = next(
                    (
                        f.kind
                        for f in forced
                        if earlier.start <= f.time <= call.start
                        and f.hits(earlier.process, session_id)
                    ),
                    None,
                )
                yield Overlap(session_id=session_id, first=earlier, second=call, cause=cause)
            running.append((_end(call, kills), call))


def _order_violations(calls_of: Mapping[str, list[Call]]) -> Iterable[OrderViolation]:
    firsts: dict[str, list[Call]] = defaultdict(list)
    for calls in calls_of.values():
        firsts[calls[0].session_id].append(calls[0])
    for session_id, session_firsts in sorted(firsts.items()):
        session_firsts.sort(key=lambda c: c.start)  # stable: ties keep recording order
        highest = -1
        for call in session_firsts:
            if call.sequence_number < highest:
                yield OrderViolation(
                    session_id=session_id, call=call, after_sequence_number=highest
                )
            highest = max(highest, call.sequence_number)
