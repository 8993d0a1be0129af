"""Messages per second: the manager beside the raw Trio floor and the naive loop.

S sessions x M messages, S in {10, 100, 1000, 10000}: once at a constant total (so the
per-message cost is compared) and once at 10 messages per session (so session lifecycle
cost is amortised alike at every S). Goals P1-P3 of issue #8::

    P1  manager(1000) >= 0.9 x floor(1000)            (constant total)
    P2  manager(S) >= 1.5 x naive(S) at every S         (both series)
    P3  manager T(10000)/T(1000) >= 0.9 x floor's own ratio  (10 per session)

Throughput is messages per CPU-second of the process (each scenario is one Trio thread,
CPU-bound): on machines shared with other work the CPU a run used is far steadier than
its wall-clock time, which is recorded beside it (``messages_per_s``). A supplementary
series runs the manager with ``prefetch_count=10`` (receives in batches).

Run: ``python benchmarks/bench_throughput.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import math
import time
from typing import Any

import _scenarios
from _common import Timing, best, goal, parse_args, progress, write_results
from _scenarios import PREFETCH, SCENARIOS

FULL_SESSIONS = (10, 100, 1000, 10000)
QUICK_SESSIONS = (10, 100)
FULL_TOTAL = 100_000
QUICK_TOTAL = 2_000
PER_SESSION = 10
#: Short runs are repeated until a measurement has seen about this many messages in all,
#: so that tiny totals (10 sessions x 10 messages) are not just timer noise.
MIN_MESSAGES = 20_000


def _throughput(name: str, rows: dict[str, Any], sessions: int) -> float:
    return float(rows[name][str(sessions)]["messages_per_cpu_s"])


def main() -> None:
    started = time.perf_counter()
    args = parse_args(__doc__.splitlines()[0])
    session_counts = QUICK_SESSIONS if args.quick else FULL_SESSIONS
    total = QUICK_TOTAL if args.quick else FULL_TOTAL
    min_messages = 0 if args.quick else MIN_MESSAGES
    series: dict[str, list[tuple[int, int]]] = {
        "constant_total": [(s, max(total // s, 1)) for s in session_counts],
        "per_session": [(s, PER_SESSION) for s in session_counts],
    }
    figures: dict[str, Any] = {}
    for series_name, shapes in series.items():
        rows: dict[str, dict[str, Any]] = {name: {} for name in SCENARIOS}
        for sessions, per_session in shapes:
            messages = sessions * per_session
            tries = max(args.repeat, math.ceil(min_messages / messages))
            timings: dict[str, list[Timing]] = {name: [] for name in SCENARIOS}
            collected: dict[str, list[dict[str, Any]]] = {name: [] for name in SCENARIOS}
            # Interleaved, so that a noisy moment hurts every scenario alike.
            for _ in range(tries):
                for name, run in SCENARIOS.items():
                    timings[name].append(run(sessions, per_session))
                    collected[name].append(dict(_scenarios.LAST_GC))
            for name in SCENARIOS:
                fastest = best(timings[name])
                leanest = min(timings[name], key=lambda t: t.cpu)
                gc_work = collected[name][timings[name].index(leanest)]
                rows[name][str(sessions)] = {
                    "sessions": sessions,
                    "per_session": per_session,
                    "messages": messages,
                    "measurements": tries,
                    "messages_per_cpu_s": messages / leanest.cpu,
                    "cpu_us_per_message": leanest.cpu / messages * 1e6,
                    "messages_per_s": messages / fastest.wall,
                    "wall_s": fastest.wall,
                    # Diagnostic, of the leanest measurement: the collector's share.
                    "gc_collections": gc_work["collections"],
                    "gc_cpu_us_per_message": gc_work["cpu_s"] / messages * 1e6,
                }
            progress(
                f"{series_name} S={sessions} M={per_session}: "
                + ", ".join(
                    f"{name} {rows[name][str(sessions)]['messages_per_cpu_s']:,.0f}/CPU-s"
                    f" (gc {rows[name][str(sessions)]['gc_cpu_us_per_message']:.1f} µs/msg)"
                    for name in SCENARIOS
                )
            )
        figures[series_name] = rows

    ratios: dict[str, Any] = {}
    for series_name, rows in figures.items():
        ratios[series_name] = {
            str(s): {
                f"{a}_vs_{b}": _throughput(a, rows, s) / _throughput(b, rows, s)
                for a, b in (
                    ("manager", "floor"),
                    ("manager", "naive"),
                    ("naive", "floor"),
                    ("manager_prefetch", "floor"),
                    ("manager_prefetch", "naive"),
                )
            }
            | {
                "manager_vs_naive_wall": rows["manager"][str(s)]["messages_per_s"]
                / rows["naive"][str(s)]["messages_per_s"],
                "manager_vs_floor_wall": rows["manager"][str(s)]["messages_per_s"]
                / rows["floor"][str(s)]["messages_per_s"],
            }
            for s in session_counts
        }

    # P1 at 1000 sessions (the largest S of a quick run stands in for it).
    p1_s = str(1000 if 1000 in session_counts else session_counts[-1])
    p1 = ratios["constant_total"][p1_s]["manager_vs_floor"]

    def worst(key: str) -> float:
        return float(min(ratios[name][str(s)][key] for name in series for s in session_counts))

    p2, p2_prefetch = worst("manager_vs_naive"), worst("manager_prefetch_vs_naive")
    big, small = (
        ("10000", "1000")
        if 10000 in session_counts
        else (str(session_counts[-1]), str(session_counts[0]))
    )
    per = figures["per_session"]

    def scaling(name: str) -> float:
        return _throughput(name, per, int(big)) / _throughput(name, per, int(small))

    p3 = scaling("manager") / scaling("floor")
    ratios["P3_scaling"] = {
        "sessions": [int(small), int(big)],
        **{f"{name}_T_big_over_T_small": scaling(name) for name in SCENARIOS},
    }
    goals = [
        goal(
            "P1",
            f"manager at {p1_s} sessions ≥ 0.9x the floor's messages/s (constant total)",
            p1,
            0.9,
            higher_is_better=True,
            unit="x",
        ),
        goal(
            "P1 (prefetch)",
            f"as P1, the manager with prefetch_count={PREFETCH} (batched receives)",
            ratios["constant_total"][p1_s]["manager_prefetch_vs_floor"],
            0.9,
            higher_is_better=True,
            unit="x",
        ),
        goal(
            "P2",
            "manager ≥ 1.5x the naive loop at every S (worst S of both series)",
            p2,
            1.5,
            higher_is_better=True,
            unit="x",
        ),
        goal(
            "P2 (prefetch)",
            f"as P2, the manager with prefetch_count={PREFETCH} (batched receives)",
            p2_prefetch,
            1.5,
            higher_is_better=True,
            unit="x",
        ),
        goal(
            "P3",
            f"at {PER_SESSION} messages per session, manager T({big})/T({small}) ≥ 0.9x floor's",
            p3,
            0.9,
            higher_is_better=True,
            unit="x",
        ),
    ]
    write_results(
        "throughput",
        args,
        parameters={
            "sessions": list(session_counts),
            "constant_total": total,
            "per_session": PER_SESSION,
            "repeat": args.repeat,
            "min_messages_per_measurement": min_messages,
            "handler": "no-op async function",
            "manager_options": "max_concurrent_sessions=S, auto_complete, prefetch_count=0",
            "manager_prefetch_options": f"as manager, prefetch_count={PREFETCH}",
            "throughput": "messages per CPU-second (least CPU of the measurements); "
            "messages_per_s is wall-clock (fastest measurement)",
        },
        figures=figures,
        ratios=ratios,
        goals=goals,
        started=started,
    )


if __name__ == "__main__":
    main()
