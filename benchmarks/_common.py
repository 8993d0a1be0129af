"""Shared helpers for the benchmark scripts: arguments, timing, progress, results JSON.

Every figure a script reports is measured in the same process and the same run as the
reference it is compared with, and the goals (issue #8, P1-P8) are ratios of the two:
the 2-core machines these run on are shared and noisy, so absolute figures from
different runs do not compare, while ratios from one run do.

Each script writes ``benchmarks/results/<name>.json``::

    {"benchmark": ..., "quick": ..., "versions": {...}, "machine": {...},
     "parameters": {...}, "figures": {...}, "ratios": {...}, "goals": [...]}

``--quick`` makes a script a smoke test of a few seconds: same code paths, tiny sizes;
its results go to ``benchmarks/results/quick/`` so they never overwrite a full run's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

RESULTS = Path(__file__).parent / "results"

#: Distributions whose versions go into every result file.
VERSIONED = ("trio", "trio-sessions", "attrs", "trio-asyncio", "azure-servicebus")


def parse_args(
    description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    """The common command line: ``--quick``, ``--repeat``, ``--output``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny sizes, a few seconds, results under results/quick/",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="measurements per figure (the best is kept); default 3, 1 with --quick",
    )
    parser.add_argument("--output", type=Path, default=None, help="where to write the JSON")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    return args


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries measured, and Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def machine() -> dict[str, Any]:
    """What the figures were measured on (and how loaded it was when the run began)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "implementation": platform.python_implementation(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "commit": _git_commit(),
    }
    with contextlib.suppress(OSError):  # not on every platform
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.partition(":")[2].strip()
                break
    except OSError:  # pragma: no cover - not on Linux
        pass
    return info


def progress(text: str) -> None:
    """One line of progress on stderr (stdout stays free for the summary)."""
    stamp = dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {text}", file=sys.stderr, flush=True)


@attrs.define
class Timing:
    """Wall-clock and process CPU seconds of one measured block."""

    wall: float = 0.0
    cpu: float = 0.0


@contextmanager
def timed() -> Iterator[Timing]:
    """Measure the block's wall and CPU time, with the garbage collector run beforehand."""
    gc.collect()
    timing = Timing()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        yield timing
    finally:
        timing.wall = time.perf_counter() - wall0
        timing.cpu = time.process_time() - cpu0


def best(timings: list[Timing]) -> Timing:
    """The fastest of several measurements: on a shared machine, noise only adds time."""
    return min(timings, key=lambda t: t.wall)


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ``values``, by linear interpolation."""
    if not values:
        raise ValueError("percentile of no values")
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    index = round(p * 10) - 1
    return cuts[min(max(index, 0), len(cuts) - 1)]


def goal(
    name: str,
    text: str,
    figure: float,
    threshold: float,
    *,
    higher_is_better: bool,
    unit: str = "",
    note: str = "",
) -> dict[str, Any]:
    """One goal's verdict: the figure, the threshold, and whether it was met."""
    met = figure >= threshold if higher_is_better else figure <= threshold
    return {
        "goal": name,
        "text": text,
        "figure": round(figure, 4),
        "op": ">=" if higher_is_better else "<=",
        "threshold": threshold,
        "unit": unit,
        "met": met,
        "note": note,
    }


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def write_results(
    name: str,
    args: argparse.Namespace,
    *,
    parameters: dict[str, Any],
    figures: dict[str, Any],
    ratios: dict[str, Any],
    goals: list[dict[str, Any]],
    started: float,
) -> Path:
    """Write ``results/<name>.json`` (``results/quick/`` with ``--quick``) and print goals."""
    path: Path = args.output or (RESULTS / "quick" if args.quick else RESULTS) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "command": " ".join(["python", *sys.argv]),
        "quick": args.quick,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started, 1),
        "versions": versions(),
        "machine": machine(),
        "parameters": parameters,
        "figures": _rounded(figures),
        "ratios": _rounded(ratios),
        "goals": goals,
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    for verdict in goals:
        if verdict["met"] is None:
            print(f"{verdict['goal']}: not measured: {verdict['note']}")
            continue
        state = "met" if verdict["met"] else "MISSED"
        print(
            f"{verdict['goal']}: {verdict['figure']}{verdict['unit']} "
            f"(goal {verdict['op']} {verdict['threshold']}"
            f"{verdict['unit']}) {state}: {verdict['text']}"
        )
    progress(f"wrote {path}")
    return path
