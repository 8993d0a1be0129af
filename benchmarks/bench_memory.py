"""Memory per idle session actor, beside a bare Trio task blocked on its own channel.

N sessions (10 000 and 100 000) are accepted and left idle: each had one message, which
the no-op handler completed, and its actor now waits for the next one. The reference is
N bare tasks, each blocked in ``receive`` on a memory channel of its own. Goal P4 of
issue #8: an idle session actor costs <= 8 KiB and <= 1.75x a bare task with its channel.

Each figure comes from a fresh child process (so one measurement's garbage cannot
pollute the next): tracemalloc's traced bytes in one child, the change in resident set
size (RSS, from /proc/self/statm) in another without tracemalloc, both taken from just
before the sessions are accepted (the broker already holds their messages) to when
all of them are idle. The broker keeps completed messages (``record_completed=True``),
so freeing them does not hide part of the cost. tracemalloc also splits the bytes by
the file that allocated them: what the MemoryBroker allocates for a locked session (its
link object, lock bookkeeping) is reported apart from the actor's own share.

Run: ``python benchmarks/bench_memory.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import trio.testing
from _common import goal, parse_args, progress, write_results
from _scenarios import QUEUE, manager_options

from trio_sessions import (
    MemoryBroker,
    Message,
    ReceivedMessage,
    SessionContext,
    open_session_manager,
)

if TYPE_CHECKING:
    from collections.abc import Callable

FULL_COUNTS = (10_000, 100_000)
QUICK_COUNTS = (1_000,)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
BROKER_FILES = ("backends/_memory.py", "trio_sessions.backends._memory")
KIB = 1024


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class Meter:
    """Bytes held now, by tracemalloc (split by file) or by RSS."""

    def __init__(self, trace: bool) -> None:
        self.trace = trace
        self._before: tracemalloc.Snapshot | None = None
        self._rss_before = 0

    def start(self) -> None:
        gc.collect()
        if self.trace:
            # Traced from here only: setting up (the broker's messages) is not slowed.
            tracemalloc.start(1)
            self._before = tracemalloc.take_snapshot()
        else:
            self._rss_before = _rss()

    def stop(self) -> dict[str, int]:
        gc.collect()
        if not self.trace:
            return {"rss": _rss() - self._rss_before}
        assert self._before is not None
        after = tracemalloc.take_snapshot()
        total = broker = 0
        for stat in after.compare_to(self._before, "filename"):
            filename = stat.traceback[0].filename
            total += stat.size_diff
            if any(part in filename for part in BROKER_FILES):
                broker += stat.size_diff
        return {"traced": total, "traced_broker": broker}


def _run_idle_actors(count: int, meter: Meter) -> dict[str, int]:
    broker = MemoryBroker(record_completed=True)
    broker.create_queue(QUEUE, lock_duration=3600.0)

    handled = 0
    all_handled = trio.Event()

    async def handler(message: ReceivedMessage, context: SessionContext) -> None:  # noqa: ASYNC124
        nonlocal handled
        handled += 1
        if handled == count:
            all_handled.set()

    async def main() -> dict[str, int]:
        await broker.send(QUEUE, [Message(b"x", session_id=f"s{s}") for s in range(count)])
        options = manager_options(count, max_auto_lock_renewal_duration=0)
        async with open_session_manager(broker, queue_name=QUEUE, options=options) as manager:
            async with trio.open_nursery() as nursery:
                meter.start()
                await nursery.start(manager.subscribe, handler)
                await all_handled.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert manager.stats().messages_completed == count
                result = meter.stop()
                assert manager.stats().active_sessions == count
                manager.stop()
        return result

    out: dict[str, int] = trio.run(main)
    return out


def _run_bare_tasks(count: int, meter: Meter) -> dict[str, int]:
    async def blocked(receive: trio.MemoryReceiveChannel[bytes]) -> None:
        async with receive:
            await receive.receive()

    async def main() -> dict[str, int]:
        senders = []
        async with trio.open_nursery() as nursery:
            meter.start()
            for _ in range(count):
                send, receive = trio.open_memory_channel[bytes](0)
                senders.append(send)
                nursery.start_soon(blocked, receive)
            await trio.testing.wait_all_tasks_blocked()
            result = meter.stop()
            for send in senders:
                send.send_nowait(b"")
        return result

    out: dict[str, int] = trio.run(main)
    return out


KINDS: dict[str, Callable[[int, Meter], dict[str, int]]] = {
    "actor": _run_idle_actors,
    "bare_task": _run_bare_tasks,
}


def _child(kind: str, count: int, trace: bool) -> None:
    meter = Meter(trace)
    print(json.dumps(KINDS[kind](count, meter)))


def _measure(kind: str, count: int, trace: bool) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__)), "--child", kind, str(count), str(int(trace))],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, int] = json.loads(done.stdout)
    return result


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), bool(int(sys.argv[4])))
        return
    started = time.perf_counter()
    args = parse_args(__doc__.splitlines()[0])
    counts = QUICK_COUNTS if args.quick else FULL_COUNTS
    figures: dict[str, Any] = {}
    for count in counts:
        row: dict[str, Any] = {}
        for kind in KINDS:
            samples: dict[str, list[int]] = {}
            # 100 000 traced actors take minutes: measured once (memory is not noisy).
            for _ in range(args.repeat if count <= 10_000 else 1):
                for trace in (True, False):
                    for key, value in _measure(kind, count, trace).items():
                        samples.setdefault(key, []).append(value)
            # The least of the repeats: memory only grows with noise (arena reuse, GC).
            per = {key: min(values) / count for key, values in samples.items()}
            row[kind] = {
                "bytes_per_traced": per["traced"],
                "bytes_per_rss": per["rss"],
                "bytes_per_traced_broker": per["traced_broker"],
            }
        actor = row["actor"]
        actor["bytes_per_traced_actor_only"] = (
            actor["bytes_per_traced"] - actor["bytes_per_traced_broker"]
        )
        figures[str(count)] = row
        progress(
            f"memory N={count}: actor {actor['bytes_per_traced'] / KIB:.2f} KiB traced "
            f"({actor['bytes_per_traced_actor_only'] / KIB:.2f} KiB without the broker's), "
            f"{actor['bytes_per_rss'] / KIB:.2f} KiB RSS; bare task "
            f"{row['bare_task']['bytes_per_traced'] / KIB:.2f} KiB traced, "
            f"{row['bare_task']['bytes_per_rss'] / KIB:.2f} KiB RSS"
        )
    ratios = {
        count: {
            "actor_vs_bare_traced": row["actor"]["bytes_per_traced"]
            / row["bare_task"]["bytes_per_traced"],
            "actor_only_vs_bare_traced": row["actor"]["bytes_per_traced_actor_only"]
            / row["bare_task"]["bytes_per_traced"],
            "actor_vs_bare_rss": row["actor"]["bytes_per_rss"] / row["bare_task"]["bytes_per_rss"],
        }
        for count, row in figures.items()
    }
    worst_kib = (
        max(
            max(row["actor"]["bytes_per_traced_actor_only"], row["actor"]["bytes_per_rss"])
            for row in figures.values()
        )
        / KIB
    )
    worst_ratio = max(
        max(r["actor_only_vs_bare_traced"], r["actor_vs_bare_rss"]) for r in ratios.values()
    )
    goals = [
        goal(
            "P4",
            "an idle session actor costs ≤ 8 KiB (worst of traced without the broker's share, and RSS)",
            worst_kib,
            8.0,
            higher_is_better=False,
            unit=" KiB",
        ),
        goal(
            "P4 ratio",
            "an idle session actor costs ≤ 1.75x a bare task with its channel (worst of traced, RSS)",
            worst_ratio,
            1.75,
            higher_is_better=False,
            unit="x",
        ),
    ]
    write_results(
        "memory",
        args,
        parameters={
            "counts": list(counts),
            "repeat": args.repeat,
            "manager_options": "max_concurrent_sessions=N, max_auto_lock_renewal_duration=0",
            "broker": "MemoryBroker(record_completed=True)",
        },
        figures=figures,
        ratios=ratios,
        goals=goals,
        started=started,
    )


if __name__ == "__main__":
    main()
