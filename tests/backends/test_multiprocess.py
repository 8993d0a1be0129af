"""Scaling out: several OS processes on one entity, one of them SIGKILLed midway.

Three worker processes (`mp_worker.py`) each run a session manager on `AzureServiceBus`
against one emulator, over 100 sessions x 20 messages. One worker is SIGKILLed once a
third of the messages are done: its connections reset, the emulator releases its
sessions at once, and the other workers take them over. Service Bus session locks are
all that keeps each session in one process; this shows it, from the workers' histories:
nothing is lost, no session is processed in two processes at once, and first deliveries
of every session come in send order.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import trio

from trio_sessions import MemoryBroker, Message
from trio_sessions.emulator import serve_emulator

SESSIONS = 100
PER_SESSION = 20
WORKERS = 3
WORKER = Path(__file__).with_name("mp_worker.py")


def read_history(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a worker wrote (a torn last line, from a SIGKILL, is dropped)."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def handler_calls(
    entries: list[dict[str, Any]], killed_pid: int, killed_at: float
) -> list[dict[str, Any]]:
    """Pair start and end lines into calls; a call the SIGKILL cut ends at the kill."""
    open_calls: dict[tuple[int, str, int, int], dict[str, Any]] = {}
    calls = []
    for entry in sorted(entries, key=lambda e: e["time"]):
        # With the delivery count: a redelivery may start in the same process before the
        # call that lost its lock has ended.
        key = (entry["pid"], entry["session"], entry["sequence_number"], entry["delivery_count"])
        if entry["kind"] == "start":
            open_calls[key] = {**entry, "end": None}
        else:
            call = open_calls.pop(key)
            call["end"] = entry["time"]
            calls.append(call)
    for call in open_calls.values():
        assert call["pid"] == killed_pid, f"a call never ended in a live worker: {call}"
        call["end"] = killed_at
        calls.append(call)
    return calls


def overlaps(calls: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs of calls of one session that ran at the same time."""
    found = []
    by_session: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in calls:
        by_session[call["session"]].append(call)
    for session_calls in by_session.values():
        session_calls.sort(key=lambda c: c["time"])
        for before, after in itertools.pairwise(session_calls):
            if after["time"] < before["end"]:
                found.append((before, after))
    return found


def order_violations(calls: list[dict[str, Any]]) -> list[str]:
    """Sessions whose first deliveries did not start in sequence-number order."""
    firsts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in calls:
        if call["delivery_count"] == 0:
            firsts[call["session"]].append(call)
    bad = []
    for session, session_calls in firsts.items():
        numbers = [c["sequence_number"] for c in sorted(session_calls, key=lambda c: c["time"])]
        if numbers != sorted(numbers):
            bad.append(session)
    return bad


async def test_three_processes_one_killed(tmp_path: Path) -> None:
    """Nothing lost, no session in two processes at once, first deliveries in order."""
    broker = MemoryBroker(record_completed=True)
    broker.create_queue("work", lock_duration=5.0, max_delivery_count=100)
    sent = [
        Message(f"{s}-{i}", session_id=f"s{s}", message_id=f"s{s}-{i}")
        for i in range(PER_SESSION)
        for s in range(SESSIONS)
    ]
    await broker.send("work", sent)
    total = len(sent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def completed() -> int:
        return len({m.message_id for m in broker.completed_messages("work")})

    async with serve_emulator(broker) as emulator:
        histories = [tmp_path / f"worker{i}.jsonl" for i in range(WORKERS)]
        async with trio.open_nursery() as nursery:
            workers: list[trio.Process] = []
            for history in histories:
                command = [sys.executable, str(WORKER), emulator.connection_string, "work"]
                process: trio.Process = await nursery.start(
                    functools.partial(
                        trio.run_process,
                        [*command, str(history)],
                        check=False,
                        env=env,
                        stdout=subprocess.DEVNULL,
                    )
                )
                workers.append(process)
            with trio.fail_after(240):
                # Another process's progress: nothing in this one can signal it.
                while completed() < total // 3:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                victim = workers[0]
                victim.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                await victim.wait()
                while completed() < total:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                for process in workers[1:]:
                    process.send_signal(signal.SIGTERM)
                for process in workers[1:]:
                    assert await process.wait() == 0
    entries = [entry for history in histories for entry in read_history(history)]
    calls = handler_calls(entries, victim.pid, killed_at)
    assert broker.active_message_count("work") == 0
    assert completed() == total
    assert overlaps(calls) == []
    assert order_violations(calls) == []
    assert {c["pid"] for c in calls} == {w.pid for w in workers}
    handled_ids = {c["message_id"] for c in calls}
    assert handled_ids == {m.message_id for m in sent}
