"""The JavaScript SDK (``@azure/service-bus`` on Node.js) runs a session flow on the emulator.

``js/session_flow.mjs`` sends, accepts sessions by id and next-available, receives,
completes, abandons and receives again, dead-letters, sets and gets session state, renews
the session lock and closes; it prints one JSON object per step. This test serves it an
emulator, checks those steps and then the broker. Without ``node`` it is skipped; with
``node`` but without the npm packages it fails, so CI (which installs them) cannot skip it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_sessions import MemoryBroker
from trio_sessions.emulator import serve_emulator

pytest.importorskip("proton")

JS = Path(__file__).parent / "js"
NODE = shutil.which("node")
INSTALL = "npm ci --prefix tests/emulator/js"

pytestmark = pytest.mark.skipif(
    NODE is None, reason="node is not on PATH: the JavaScript SDK flow needs Node.js >= 18"
)


def run_steps(stdout: bytes) -> dict[str, list[dict[str, Any]]]:
    """The script's JSON lines, grouped by step name, in order."""
    steps: dict[str, list[dict[str, Any]]] = {}
    for line in stdout.decode().splitlines():
        record = json.loads(line)
        steps.setdefault(record.pop("step"), []).append(record)
    return steps


async def test_session_flow() -> None:
    """Every step of the JS flow sees what Service Bus would give it; the broker agrees."""
    assert NODE is not None
    if not (JS / "node_modules" / "@azure" / "service-bus" / "package.json").is_file():
        pytest.fail(
            f"node is on PATH but the JavaScript SDK is not installed: run `{INSTALL}`",
            pytrace=False,
        )
    broker = MemoryBroker()
    broker.create_queue("js-sessions", lock_duration=30)
    started_ms = time.time() * 1000
    async with serve_emulator(broker) as emulator:
        with trio.fail_after(120):
            result = await trio.run_process(
                [NODE, str(JS / "session_flow.mjs"), emulator.connection_string, "js-sessions"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert result.returncode == 0, result.stderr.decode()
    steps = run_steps(result.stdout)

    [accepted] = steps["accepted"]
    assert accepted["sessionId"] == "a"
    assert started_ms < accepted["lockedUntil"] <= time.time() * 1000 + 30_000
    [elsewhere] = steps["locked-elsewhere"]
    assert elsewhere["error"] == {"name": "ServiceBusError", "code": "SessionCannotBeLocked"}

    [received] = steps["received"]
    assert received["bodies"] == ["a1", "a2", "a3"]
    assert received["messageIds"] == ["m-a1", "m-a2", "m-a3"]
    assert received["applicationProperties"] == {"n": 1}
    assert received["deliveryCounts"] == [0, 0, 0]
    assert received["sequenceNumbers"] == [1, 2, 3]
    assert len(set(received["lockTokens"])) == 3

    [again] = steps["received-again"]  # the abandoned one, counted; the SDK drained after it
    assert (again["bodies"], again["deliveryCounts"], again["sequenceNumbers"]) == (
        ["a2"],
        [1],
        [2],
    )
    assert again["lockTokens"][0] not in received["lockTokens"]
    assert steps["received-none"] == [{"count": 0}]
    assert steps["state"] == [{"state": "checkpoint-1"}]
    [renewed] = steps["renewed"]
    assert renewed["lockedUntil"] >= accepted["lockedUntil"]

    [next_available] = steps["next-available"]
    assert (next_available["sessionId"], next_available["bodies"]) == ("b", ["b1"])
    assert steps["closed"] == [{"sessionId": "a"}, {"sessionId": "b"}]
    [no_session] = steps["no-session"]
    assert no_session["error"] == {"name": "ServiceBusError", "code": "ServiceTimeout"}
    assert "done" in steps

    assert broker.active_message_count("js-sessions") == 0
    [dead] = broker.dead_letter_messages("js-sessions")
    # The JS SDK sends a string body as JSON in a data section, as it does to Service Bus.
    assert (dead.body, dead.dead_letter_reason, dead.dead_letter_error_description) == (
        b'"a3"',
        "bad",
        "very bad",
    )
    assert broker.session_state("js-sessions", "a") == b'"checkpoint-1"'  # JSON again
    assert broker.locked_sessions("js-sessions") == []
