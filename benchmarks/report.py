"""Write the results tables of docs/benchmarks.md from benchmarks/results/*.json.

The tables go between the ``<!-- results:begin -->`` and ``<!-- results:end -->`` lines
of the page, which is otherwise written by hand (the reasons a goal is missed are kept
in `WHY` below, next to the figures they explain). Also redraws docs/throughput.svg.

Run after a full benchmark run: ``python benchmarks/report.py [results-directory]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import plot_throughput

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

COMMANDS = {
    "throughput": "python benchmarks/bench_throughput.py",
    "memory": "python benchmarks/bench_memory.py",
    "churn": "python benchmarks/bench_churn.py",
    "latency": "python benchmarks/bench_latency.py",
    "sdk": "python benchmarks/bench_sdk.py",
}

#: Why a goal is missed (shown only while it is): see "Where the time goes" on the page.
WHY = {
    "P1": "the manager does the broker's work per message (a receive with its settlement, "
    "a checkpoint through Trio's scheduler, plus a `ReceivedMessage` and a lock token), "
    "which the floor, having no broker, does not",
    "P1 (prefetch)": "as P1, less one receive hop in eleven",
    "P2": "met at a constant total (every S); at 10 messages per session with 10 to 1 000 "
    "sessions it would need a session start cheaper than starting a Trio task (26 µs, "
    "2.6 µs a message there), which the naive loop avoids by reusing its tasks across "
    'sessions and an actor per session cannot (see "Goals not reached" below)',
    "P2 (prefetch)": "as P2: batched receives save receive hops, but not the session "
    "start that ten messages share",
    "P3": "the cost that grows with the sessions held is per object held: the garbage "
    "collector's full passes over them",
    "P4": "an idle actor is a task, its scope, its link waiting in the broker under a "
    "scope of its own, and its bookkeeping",
    "P4 ratio": "as P4: the reference is one task, one channel and no cancel scope",
    "P5": "the broker's own part of a lifecycle (accept, receives, a settlement, close: "
    "what the naive loop pays) takes most of the budget",
    "P6": 'see "The Azure path" below',
    "P7": 'see "The Azure path" below',
    "P8": 'see "The Azure path" below',
}


def _load(name: str, results: Path) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    if not path.exists():
        return None
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


def _measured(key: str, documents: dict[str, dict[str, Any]]) -> str:
    """The figures a goal's ratio is made of, from the same run."""
    tp, churn, memory = (documents.get(n) for n in ("throughput", "churn", "memory"))
    if key in ("P1", "P1 (prefetch)", "P2", "P2 (prefetch)", "P3") and tp is not None:
        figures, ratios = tp["figures"], tp["ratios"]
        if key.startswith("P1"):
            s = max(figures["constant_total"]["manager"], key=int)
            s = "1000" if "1000" in figures["constant_total"]["manager"] else s
            row = figures["constant_total"]
            name = "manager" if key == "P1" else "manager_prefetch"
            return (
                f"S={int(s):,}: {name} {row[name][s]['messages_per_cpu_s']:,.0f}, "
                f"floor {row['floor'][s]['messages_per_cpu_s']:,.0f} messages/CPU-s"
            )
        if key == "P3":
            sc = ratios["P3_scaling"]
            return (
                f"T({sc['sessions'][1]:,})/T({sc['sessions'][0]:,}): manager "
                f"{sc['manager_T_big_over_T_small']:.2f}, floor {sc['floor_T_big_over_T_small']:.2f}"
            )
        name = "manager" if key == "P2" else "manager_prefetch"
        cells = [
            (ratios[series][s][f"{name}_vs_naive"], series, s)
            for series in ("constant_total", "per_session")
            for s in ratios[series]
        ]
        low, series, s = min(cells)
        high = max(c[0] for c in cells)
        where = "constant total" if series == "constant_total" else "10 per session"
        return f"{low:.2f}x (S={int(s):,}, {where}) to {high:.2f}x"
    if key == "P5" and churn is not None:
        f = churn["figures"]
        return (
            f"manager {f['manager']['cpu_us_per_session']:.0f} µs, naive loop "
            f"{f['naive']['cpu_us_per_session']:.0f} µs, bare task "
            f"{f['bare_task']['cpu_us_per_session']:.0f} µs"
        )
    if key.startswith("P4") and memory is not None:
        parts = []
        for count, row in memory["figures"].items():
            actor, bare = row["actor"], row["bare_task"]
            parts.append(
                f"N={int(count):,}: actor {actor['bytes_per_traced_actor_only'] / 1024:.1f} KiB "
                f"traced, {actor['bytes_per_rss'] / 1024:.1f} KiB RSS; bare task "
                f"{bare['bytes_per_traced'] / 1024:.1f} / {bare['bytes_per_rss'] / 1024:.1f} KiB"
            )
        return "; ".join(parts)
    sdk = documents.get("sdk")
    if key in ("P6", "P7", "P8") and sdk is not None and "raw_sdk" in sdk["figures"]:
        figures, observed = sdk["figures"], sdk["figures"]["observed"]
        best_cpu = figures["best_cpu_us_per_message"]
        if key == "P6":
            bridge = figures["bridge"]
            return (
                f"{observed['settlements_carried_on_a_receive']:.2f} of the settlements "
                f"carried on a receive crossing, each adding "
                f"{bridge['carried_overhead_cpu_us_per_settlement']:.1f} µs to it (a combined "
                f"call {bridge['combined_us']['cpu']:.1f} µs, a plain receive "
                f"{bridge['receive_us']['cpu']:.1f} µs); a settlement crossing of its own "
                f"{bridge['settle_overhead_cpu_us_per_settlement']:.1f} µs; "
                f"{observed['crossings_per_message']:.2f} crossings per message"
            )
        if key == "P7":
            return (
                f"client CPU per message: manager {best_cpu['manager']:.0f} µs, raw SDK "
                f"{best_cpu['raw_sdk']:.0f} µs (on trio-asyncio's loop alone "
                f"{best_cpu['raw_sdk_on_trio_asyncio']:.0f} µs)"
            )
        return (
            f"manager {figures['manager']['messages_per_s']:,.0f}, raw SDK "
            f"{figures['raw_sdk']['messages_per_s']:,.0f} messages/s"
        )
    return ""


def _with_p1_prefetch(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The throughput goals, with "P1 (prefetch)" derived if the run predates it."""
    goals: list[dict[str, Any]] = document["goals"]
    if any(g["goal"] == "P1 (prefetch)" for g in goals):
        return goals
    p1 = next(g for g in goals if g["goal"] == "P1")
    s = "1000" if "1000" in document["ratios"]["constant_total"] else "100"
    figure = document["ratios"]["constant_total"][s]["manager_prefetch_vs_floor"]
    derived = {
        **p1,
        "goal": "P1 (prefetch)",
        "text": "as P1, the manager with prefetch_count=10 (batched receives)",
        "figure": figure,
        "met": figure >= p1["threshold"],
    }
    return [p1, derived, *(g for g in goals if g["goal"] != "P1")]


def _goal_rows(documents: dict[str, dict[str, Any]]) -> list[str]:
    rows = [
        "| Goal | Target | Result | Measured (same run) | Status | Command |",
        "|---|---|---:|---|---|---|",
    ]
    for name, document in documents.items():
        goals = _with_p1_prefetch(document) if name == "throughput" else document["goals"]
        for verdict in goals:
            key = verdict["goal"]
            command = f"`{COMMANDS[name]}`"
            if verdict["met"] is None:
                rows.append(
                    f"| {key} | {verdict['text']} | | | not measured: {verdict['note']} "
                    f"| {command} |"
                )
                continue
            figure = f"{verdict['figure']:.3g}{verdict['unit']}"
            status = "**met**" if verdict["met"] else f"**missed**: {WHY.get(key, '')}"
            rows.append(
                f"| {key} | {verdict['text']} | {figure} | {_measured(key, documents)} "
                f"| {status} | {command} |"
            )
    return rows


def _throughput_rows(document: dict[str, Any]) -> list[str]:
    out: list[str] = []
    titles = {"constant_total": "Constant total", "per_session": "10 messages per session"}
    for series, title in titles.items():
        rows = document["figures"][series]
        ratios = document["ratios"][series]
        out += [
            "",
            f"**{title}** (messages per CPU-second; wall-clock messages/s in brackets)",
            "",
            "| S | messages | floor | naive | manager | manager, prefetch 10 "
            "| manager/floor | manager/naive | prefetch/naive |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in rows["manager"]:
            cells = {
                name: f"{row[s]['messages_per_cpu_s']:,.0f} ({row[s]['messages_per_s']:,.0f})"
                for name, row in rows.items()
            }

            def cell(name: str, cells: dict[str, str] = cells) -> str:
                return cells[name]

            r = ratios[s]
            out.append(
                f"| {int(s):,} | {rows['manager'][s]['messages']:,} | {cell('floor')} "
                f"| {cell('naive')} | {cell('manager')} | {cell('manager_prefetch')} "
                f"| {r['manager_vs_floor']:.2f} | {r['manager_vs_naive']:.2f} "
                f"| {r['manager_prefetch_vs_naive']:.2f} |"
            )
    scaling = document["ratios"]["P3_scaling"]
    small, big = scaling["sessions"]
    out += [
        "",
        f"P3: T({big:,})/T({small:,}) at 10 messages per session: manager "
        f"{scaling['manager_T_big_over_T_small']:.2f}, floor "
        f"{scaling['floor_T_big_over_T_small']:.2f}, naive "
        f"{scaling['naive_T_big_over_T_small']:.2f}.",
    ]
    return out


def _churn_rows(document: dict[str, Any]) -> list[str]:
    figures = document["figures"]
    params = document["parameters"]
    out = [
        "",
        f"**Churn**: {params['sessions']:,} sessions of one message, "
        f"{params['max_concurrent_sessions']:,} at a time, idle timeout "
        f"{params['session_idle_timeout']} s.",
        "",
        "| | CPU per session lifecycle | sessions/s (wall) |",
        "|---|---:|---:|",
    ]
    for name, label in (
        ("manager", "manager"),
        ("naive", "naive loop"),
        ("bare_task", "a bare task per session"),
    ):
        row = figures[name]
        out.append(
            f"| {label} | {row['cpu_us_per_session']:.0f} µs | {row['sessions_per_s']:,.0f} |"
        )
    return out


def _memory_rows(document: dict[str, Any]) -> list[str]:
    out = [
        "",
        "**Memory** per idle session (KiB; actor only = without what the broker allocates "
        "for a locked session)",
        "",
        "| N | actor, traced | actor only, traced | actor, RSS | bare task, traced "
        "| bare task, RSS | actor only / bare (traced) | actor / bare (RSS) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for count, row in document["figures"].items():
        actor, bare = row["actor"], row["bare_task"]
        ratios = document["ratios"][count]
        out.append(
            f"| {int(count):,} | {actor['bytes_per_traced'] / 1024:.2f} "
            f"| {actor['bytes_per_traced_actor_only'] / 1024:.2f} "
            f"| {actor['bytes_per_rss'] / 1024:.2f} | {bare['bytes_per_traced'] / 1024:.2f} "
            f"| {bare['bytes_per_rss'] / 1024:.2f} | {ratios['actor_only_vs_bare_traced']:.2f} "
            f"| {ratios['actor_vs_bare_rss']:.2f} |"
        )
    return out


def _latency_rows(document: dict[str, Any]) -> list[str]:
    params = document["parameters"]
    out = [
        "",
        f"**Latency** from send to handler start, {params['rate_per_s']:g} messages/s over "
        f"{params['sessions']} sessions ({params['messages'] - params['warmup_left_out']:,} "
        "samples after warm-up); no goal, reported:",
        "",
        "| | p50 | p99 | max |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (("floor", "floor"), ("naive", "naive loop"), ("manager", "manager")):
        row = document["figures"][name]
        out.append(
            f"| {label} | {row['p50_us']:.0f} µs | {row['p99_us']:.0f} µs "
            f"| {row['max_us']:.0f} µs |"
        )
    return out


def _sdk_rows(document: dict[str, Any]) -> list[str]:
    params, figures, ratios = document["parameters"], document["figures"], document["ratios"]
    if "raw_sdk" not in figures:
        return []
    best_cpu = figures["best_cpu_us_per_message"]
    out = [
        "",
        f"**The Azure path** against the emulator (its own process): {params['sessions']} "
        f"sessions x {params['messages_per_session']} messages, `prefetch_count="
        f"{params['prefetch_count']}`, each client in its own process, best of "
        f"{params['rounds']} alternating rounds",
        "",
        "| client | messages/s (wall) | client CPU per message | emulator CPU per message (over the client process's life) |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (
        ("raw_sdk", "raw asyncio SDK, plain asyncio"),
        ("raw_sdk_on_trio_asyncio", "raw asyncio SDK, on trio-asyncio's loop"),
        ("manager", "manager on `AzureServiceBus`"),
    ):
        row = figures.get(name)
        if row is None:
            continue
        emulator = row["emulator_cpu_s"] * 1e6 / row["messages"]
        out.append(
            f"| {label} | {row['messages_per_s']:,.0f} | {best_cpu[name]:.0f} µs "
            f"| {emulator:.0f} µs |"
        )
    observed, bridge = figures["observed"], figures["bridge"]
    out += [
        "",
        f"Manager run: {observed['crossings_per_message']:.2f} crossings per message, "
        f"{observed['settlements_carried_on_a_receive']:.2f} of the settlements carried on "
        f"a receive's crossing (`settle_and_receive`), "
        f"{observed['preempted_receives_per_message']:.3f} receives preempted per message "
        f"(raw SDK: {observed['raw_sdk_receives_per_message']:.2f} SDK receives per message). "
        f"Bridge: a `_Call` round trip {bridge['call_us']['cpu']:.1f} µs CPU "
        f"(a direct await {bridge['direct_call_us']['cpu']:.2f} µs); a plain receive "
        f"{bridge['receive_us']['cpu']:.1f} µs and one carrying a settlement "
        f"{bridge['combined_us']['cpu']:.1f} µs through the link; `settle` of "
        f"{bridge['settlements_per_batch']} in its own crossing "
        f"{bridge['settle_batch_us']['cpu']:.1f} µs "
        f"(`_settle_all` awaited directly {bridge['direct_settle_batch_us']['cpu']:.1f} µs); "
        f"the crossings cost {ratios['bridge_cpu_us_per_message']:.0f} µs CPU per message "
        f"of the manager's {ratios['manager_extra_cpu_us_per_message']:.0f} µs over the raw "
        "SDK.",
    ]
    return out


def _provenance(documents: dict[str, dict[str, Any]]) -> list[str]:
    any_doc = next(iter(documents.values()))
    versions = ", ".join(f"{k} {v}" for k, v in any_doc["versions"].items() if v)
    machine = any_doc["machine"]
    lines = ["", "Measured with " + versions + "."]
    lines.append(
        f"Machine: {machine.get('cpu_model', machine.get('processor'))}, "
        f"{machine.get('cpu_count')} CPUs, {machine.get('platform')}; shared with other work "
        "(load average at the start of each run in the JSON)."
    )
    lines.append(
        "Runs: "
        + "; ".join(
            f"{name} at {doc['date']} (commit {doc['machine'].get('commit')}, "
            f"{doc['duration_s']:.0f} s)"
            for name, doc in documents.items()
        )
        + "."
    )
    return lines


def render(results: Path = RESULTS) -> str:
    documents = {name: doc for name in COMMANDS if (doc := _load(name, results)) is not None}
    if not documents:
        raise SystemExit(f"no results in {results}: run the benchmarks first")
    lines = ["", *_goal_rows(documents)]
    if "throughput" in documents:
        lines += _throughput_rows(documents["throughput"])
    if "memory" in documents:
        lines += _memory_rows(documents["memory"])
    if "churn" in documents:
        lines += _churn_rows(documents["churn"])
    if "latency" in documents:
        lines += _latency_rows(documents["latency"])
    if "sdk" in documents:
        lines += _sdk_rows(documents["sdk"])
    lines += _provenance(documents)
    return "\n".join(lines) + "\n"


def main() -> None:
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    page = PAGE.read_text(encoding="utf-8")
    head, _, rest = page.partition(BEGIN)
    _, _, tail = rest.partition(END)
    PAGE.write_text(head + BEGIN + "\n" + render(results) + "\n" + END + tail, encoding="utf-8")
    print(f"wrote {PAGE}")
    source = results / "throughput.json"
    if source.exists():
        document = json.loads(source.read_text(encoding="utf-8"))
        plot_throughput.TARGET.write_text(plot_throughput.render(document), encoding="utf-8")
        print(f"wrote {plot_throughput.TARGET}")


if __name__ == "__main__":
    main()
