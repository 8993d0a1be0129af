"""SessionManagerOptions and RetryPolicy: defaults, and a clear error for every bad value."""

from __future__ import annotations

import math
import random
from typing import Any

import attrs
import pytest

from trio_sessions import RetryPolicy, SessionManagerOptions


def test_defaults_are_the_contract() -> None:
    """Every default is DESIGN §3's."""
    options = SessionManagerOptions()
    assert attrs.asdict(options, recurse=False) == {
        "max_concurrent_sessions": 8,
        "max_concurrent_calls_per_session": 1,
        "session_idle_timeout": 60.0,
        "max_auto_lock_renewal_duration": 300.0,
        "auto_complete": True,
        "prefetch_count": 0,
        "session_ids": None,
        "accept_timeout": 60.0,
        "shutdown_timeout": 30.0,
        "retry": RetryPolicy(),
    }
    retry = RetryPolicy()
    assert (retry.initial_delay, retry.max_delay, retry.multiplier, retry.jitter) == (
        0.5,
        60.0,
        2.0,
        0.1,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_concurrent_sessions": 1},
        {"max_concurrent_calls_per_session": 16},
        {"session_idle_timeout": 1},
        {"session_idle_timeout": 0.001},
        {"session_idle_timeout": math.inf},
        {"max_auto_lock_renewal_duration": 0},
        {"max_auto_lock_renewal_duration": math.inf},
        {"prefetch_count": 0},
        {"accept_timeout": 5},
        {"shutdown_timeout": 0},
        {"auto_complete": False},
        {"session_ids": ("a", "b")},
    ],
)
def test_valid_values(kwargs: dict[str, Any]) -> None:
    """Edge values in range are accepted, ints where floats are expected too."""
    options = SessionManagerOptions(**kwargs)
    for name, value in kwargs.items():
        assert getattr(options, name) == value


@pytest.mark.parametrize(
    ("field", "value", "error", "allowed"),
    [
        ("max_concurrent_sessions", 0, ValueError, ">= 1"),
        ("max_concurrent_sessions", 1.5, TypeError, "an int"),
        ("max_concurrent_sessions", True, TypeError, "an int"),
        ("max_concurrent_calls_per_session", 0, ValueError, ">= 1"),
        ("max_concurrent_calls_per_session", "2", TypeError, "an int"),
        ("session_idle_timeout", 0, ValueError, "> 0"),
        ("session_idle_timeout", -1.0, ValueError, "> 0"),
        ("session_idle_timeout", math.nan, ValueError, "NaN"),
        ("session_idle_timeout", "60", TypeError, "int or float"),
        ("session_idle_timeout", None, TypeError, "int or float"),
        ("max_auto_lock_renewal_duration", -0.1, ValueError, ">= 0"),
        ("prefetch_count", -1, ValueError, ">= 0"),
        ("prefetch_count", 2.0, TypeError, "an int"),
        ("accept_timeout", 0, ValueError, "> 0"),
        ("shutdown_timeout", -1, ValueError, ">= 0"),
        ("auto_complete", 1, TypeError, "True or False"),
        ("session_ids", "abc", TypeError, "tuple of session id"),
        ("session_ids", 5, TypeError, "tuple of session id"),
        ("session_ids", (), ValueError, "non-empty"),
        ("session_ids", ("a", ""), TypeError, "non-empty strings"),
        ("session_ids", ("a", 1), TypeError, "non-empty strings"),
        ("session_ids", ("a", "a"), ValueError, "repeat"),
        ("retry", {"initial_delay": 1}, TypeError, "RetryPolicy"),
    ],
)
def test_invalid_values_name_the_field(
    field: str, value: object, error: type[Exception], allowed: str
) -> None:
    """A bad value raises TypeError or ValueError naming the field and what it allows."""
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(error, match=field) as info:
        SessionManagerOptions(**kwargs)
    assert allowed in str(info.value)


def test_session_ids_accepts_any_iterable() -> None:
    """A list or generator of ids becomes a tuple."""
    assert SessionManagerOptions(session_ids=["a", "b"]).session_ids == ("a", "b")
    assert SessionManagerOptions(session_ids=(s for s in "xy")).session_ids == ("x", "y")


def test_options_are_frozen_and_evolve() -> None:
    """Options cannot change in place; attrs.evolve makes a validated copy."""
    options = SessionManagerOptions()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.prefetch_count = 3  # type: ignore[misc]
    assert attrs.evolve(options, prefetch_count=3).prefetch_count == 3
    with pytest.raises(ValueError, match="prefetch_count"):
        attrs.evolve(options, prefetch_count=-3)


@pytest.mark.parametrize(
    ("kwargs", "field", "error"),
    [
        ({"initial_delay": 0}, "initial_delay", ValueError),
        ({"max_delay": 0.1}, "max_delay", ValueError),
        ({"multiplier": 0.5}, "multiplier", ValueError),
        ({"jitter": -0.1}, "jitter", ValueError),
        ({"jitter": 1.5}, "jitter", ValueError),
        ({"initial_delay": "1"}, "initial_delay", TypeError),
    ],
)
def test_invalid_retry_policies(kwargs: dict[str, Any], field: str, error: type[Exception]) -> None:
    """RetryPolicy refuses bad values, naming the field."""
    with pytest.raises(error, match=field):
        RetryPolicy(**kwargs)


def test_retry_delays_grow_cap_and_jitter() -> None:
    """Delays grow by the multiplier, stop at max_delay and stay within the jitter band."""
    exact = RetryPolicy(initial_delay=0.5, max_delay=5, multiplier=2, jitter=0)
    assert [exact.delay(n) for n in range(6)] == [0.5, 1, 2, 4, 5, 5]
    assert exact.delay(10_000) == 5  # no overflow for long outages
    rng = random.Random(7)
    jittered = RetryPolicy(initial_delay=1, max_delay=100, jitter=0.1)
    delays = [jittered.delay(3, rng) for _ in range(200)]
    assert all(7.2 <= d <= 8.8 for d in delays)
    assert len(set(delays)) > 100
    assert 0.9 <= RetryPolicy(jitter=0.1, initial_delay=1).delay(0) <= 1.1
