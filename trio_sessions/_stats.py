"""Counters kept by a session manager, and the frozen snapshot `SessionManager.stats` returns."""

from __future__ import annotations

import attrs

__all__ = ["Counters", "ManagerStats"]


@attrs.frozen(kw_only=True)
class ManagerStats:
    """A snapshot of a session manager's counters (like trio's ``statistics()``).

    ``active_sessions`` is the number of sessions held locked now, idle ones included;
    ``handler_errors`` counts exceptions raised by ``process_message``/``process_session``;
    ``errors`` counts every other error reported to ``process_error``.
    """

    active_sessions: int = 0
    sessions_accepted: int = 0
    sessions_closed: int = 0
    messages_received: int = 0
    messages_completed: int = 0
    messages_abandoned: int = 0
    messages_dead_lettered: int = 0
    messages_deferred: int = 0
    handler_errors: int = 0
    lock_renewals: int = 0
    errors: int = 0


@attrs.define
class Counters:
    """The mutable counters behind `ManagerStats` (internal)."""

    active_sessions: int = 0
    sessions_accepted: int = 0
    sessions_closed: int = 0
    messages_received: int = 0
    messages_completed: int = 0
    messages_abandoned: int = 0
    messages_dead_lettered: int = 0
    messages_deferred: int = 0
    handler_errors: int = 0
    lock_renewals: int = 0
    errors: int = 0

    def snapshot(self) -> ManagerStats:
        return ManagerStats(**attrs.asdict(self))
