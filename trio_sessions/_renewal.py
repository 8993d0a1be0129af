"""When to renew a session lock, and when to give the session back.

Service Bus (like .NET's processor) renews a lock a margin before it expires: half the
lock duration, at most 10 seconds. Renewal goes on until ``max_auto_lock_renewal_duration``
after accept; after that the actor works on under the current lock and releases the
session once less than the margin is left, so a quiet session ends without error.
"""

from __future__ import annotations

__all__ = ["MAX_RENEWAL_MARGIN", "next_lock_action", "renewal_margin"]

#: The largest margin kept before a lock expires (seconds), as .NET does.
MAX_RENEWAL_MARGIN = 10.0


def renewal_margin(lock_duration: float) -> float:
    """Seconds before expiry at which a lock of ``lock_duration`` seconds is renewed."""
    return min(lock_duration / 2, MAX_RENEWAL_MARGIN)


def next_lock_action(
    locked_until: float, lock_duration: float, give_up_at: float
) -> tuple[float, bool]:
    """Return ``(when, renew)``: renew the lock at ``when``, or (``renew`` False) release then.

    All times are Trio-clock deadlines; ``give_up_at`` is when renewal stops.
    """
    when = locked_until - renewal_margin(lock_duration)
    return when, when < give_up_at
