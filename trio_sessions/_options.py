"""Options: how many sessions to hold, how long to keep them, how to retry.

All option classes are frozen and validated when they are built, so a bad value fails
where it is written, with a message naming the field and what it allows.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterable
from typing import Any

import attrs

__all__ = ["ReceiveMode", "RetryPolicy", "SessionManagerOptions"]


class ReceiveMode(enum.Enum):
    """How messages are taken from the entity.

    ``PEEK_LOCK`` locks each message until it is settled (complete, abandon, dead-letter,
    defer); ``RECEIVE_AND_DELETE`` settles it as it is received, so it is lost if the
    handler fails.
    """

    PEEK_LOCK = "peeklock"
    RECEIVE_AND_DELETE = "receiveanddelete"


def _check_number(field: str, value: object, *, integer: bool) -> float:
    """Refuse bools, non-numbers and NaN; return the value as a float."""
    wanted = "an int" if integer else "an int or float (seconds)"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f"{field} must be {wanted}, not {type(value).__name__} {value!r}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{field} must be a number, not NaN")
    return number


def _at_least(minimum: float, *, integer: bool = False, strict: bool = False) -> Any:
    """An attrs validator: a number >= minimum (or > minimum when strict)."""

    def validate(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        number = _check_number(attribute.name, value, integer=integer)
        bad = number <= minimum if strict else number < minimum
        if bad:
            relation = ">" if strict else ">="
            extra = "" if integer else " (math.inf allowed)"
            raise ValueError(
                f"{attribute.name} must be {relation} {minimum:g}{extra}, got {value!r}"
            )

    return validate


def _is_bool(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attribute.name} must be True or False, not {value!r}")


def _to_session_ids(value: object) -> tuple[str, ...] | None:
    if value is None or isinstance(value, tuple):
        return value  # element types are checked by the validator
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"session_ids must be None or a tuple of session id strings, not {value!r}")
    return tuple(value)


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient errors.

    The n-th retry (counting from 0) waits ``min(initial_delay * multiplier**n, max_delay)``
    seconds, scaled by a random factor in ``[1 - jitter, 1 + jitter]`` so that many
    processes that failed together do not retry together.
    """

    initial_delay: float = attrs.field(default=0.5, validator=_at_least(0, strict=True))
    max_delay: float = attrs.field(default=60.0, validator=_at_least(0, strict=True))
    multiplier: float = attrs.field(default=2.0, validator=_at_least(1))
    jitter: float = attrs.field(default=0.1, validator=_at_least(0))

    @max_delay.validator
    def _max_not_below_initial(self, attribute: attrs.Attribute[float], value: float) -> None:
        if value < self.initial_delay:
            raise ValueError(
                f"max_delay must be >= initial_delay ({self.initial_delay!r}), got {value!r}"
            )

    @jitter.validator
    def _jitter_at_most_one(self, attribute: attrs.Attribute[float], value: float) -> None:
        if value > 1:
            raise ValueError(f"jitter must be between 0 and 1, got {value!r}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0 for the first retry)."""
        base = self.initial_delay * self.multiplier ** min(attempt, 1000)
        base = min(base, self.max_delay)
        if self.jitter:
            base *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return base


@attrs.frozen(kw_only=True)
class SessionManagerOptions:
    """How many sessions to hold at once, how long to keep each one, and how to settle.

    Every field is checked when the object is built: a value of the wrong type raises
    `TypeError`, one out of range `ValueError`, both naming the field. Vary a copy with
    `attrs.evolve`.

    Args:
        max_concurrent_sessions: sessions held at once (>= 1).
        max_concurrent_calls_per_session: handler calls in flight per session (>= 1);
            1 keeps each session's messages in order.
        session_idle_timeout: seconds without a new message before a session is released
            (> 0). Handler time never counts.
        max_auto_lock_renewal_duration: seconds after accept during which the session lock
            is renewed (>= 0; 0 disables renewal, ``math.inf`` renews forever).
        auto_complete: complete a message when its handler returns, abandon it when the
            handler raises, unless the handler settled it.
        prefetch_count: messages received ahead of the handlers per session (>= 0).
        session_ids: only these sessions, instead of the next available ones.
        accept_timeout: seconds one accept waits for a free session before trying again (> 0).
        shutdown_timeout: grace for in-flight handlers on stop (>= 0); then they are cancelled.
        retry: backoff for transient errors.
    """

    max_concurrent_sessions: int = attrs.field(default=8, validator=_at_least(1, integer=True))
    max_concurrent_calls_per_session: int = attrs.field(
        default=1, validator=_at_least(1, integer=True)
    )
    session_idle_timeout: float = attrs.field(default=60.0, validator=_at_least(0, strict=True))
    max_auto_lock_renewal_duration: float = attrs.field(default=300.0, validator=_at_least(0))
    auto_complete: bool = attrs.field(default=True, validator=_is_bool)
    prefetch_count: int = attrs.field(default=0, validator=_at_least(0, integer=True))
    session_ids: tuple[str, ...] | None = attrs.field(default=None, converter=_to_session_ids)
    accept_timeout: float = attrs.field(default=60.0, validator=_at_least(0, strict=True))
    shutdown_timeout: float = attrs.field(default=30.0, validator=_at_least(0))
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)

    @session_ids.validator
    def _valid_session_ids(
        self, attribute: attrs.Attribute[tuple[str, ...] | None], value: tuple[str, ...] | None
    ) -> None:
        if value is None:
            return
        if not value:
            raise ValueError("session_ids must be None or a non-empty tuple of session ids")
        for sid in value:
            if not isinstance(sid, str) or not sid:
                raise TypeError(f"session_ids must hold non-empty strings, got {sid!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"session_ids must not repeat an id, got {value!r}")

    @retry.validator
    def _valid_retry(self, attribute: attrs.Attribute[RetryPolicy], value: object) -> None:
        if not isinstance(value, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, not {value!r}")
