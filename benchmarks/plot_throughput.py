"""Draw docs/throughput.svg from benchmarks/results/throughput.json (no dependencies).

Messages per CPU-second against the number of sessions (log scale), the manager beside the
raw Trio floor and the naive loop: one panel at a constant total of messages, one at 10
messages per session.

Run: ``python benchmarks/plot_throughput.py [results.json] [out.svg]``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

ROOT = Path(__file__).parent.parent
SOURCE = ROOT / "benchmarks" / "results" / "throughput.json"
TARGET = ROOT / "docs" / "throughput.svg"

COLOURS = {
    "floor": "#7f7f7f",
    "naive": "#d62728",
    "manager": "#1f77b4",
    "manager_prefetch": "#1f77b4",
}
LABELS = {
    "floor": "floor (raw Trio)",
    "naive": "naive loop",
    "manager": "manager",
    "manager_prefetch": "manager, prefetch 10",
}
DASHED = {"manager_prefetch"}
SERIES = {
    "constant_total": "constant total of messages",
    "per_session": "10 messages per session",
}
#: The plotted figure: messages per CPU-second (see bench_throughput.py).
METRIC = "messages_per_cpu_s"
PANEL_W, PANEL_H = 360, 250
LEFT, TOP, BOTTOM, GAP = 70, 50, 60, 40


def _nice_max(value: float) -> float:
    exponent = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            return step * exponent
    return 10 * exponent  # pragma: no cover


def _panel(x0: float, title: str, rows: dict[str, dict[str, Any]], y_max: float) -> list[str]:
    sessions = sorted(int(s) for s in rows["manager"])
    lo, hi = math.log10(sessions[0]), math.log10(sessions[-1])
    span = (hi - lo) or 1.0

    def px(s: int) -> float:
        return x0 + (math.log10(s) - lo) / span * PANEL_W

    def py(v: float) -> float:
        return TOP + PANEL_H - v / y_max * PANEL_H

    out = [
        f'<text x="{x0 + PANEL_W / 2}" y="{TOP - 18}" text-anchor="middle" '
        f'font-weight="bold">{escape(title)}</text>',
        f'<rect x="{x0}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" '
        'stroke="#333"/>',
    ]
    for i in range(6):
        value = y_max * i / 5
        y = py(value)
        out.append(
            f'<line x1="{x0}" y1="{y}" x2="{x0 + PANEL_W}" y2="{y}" stroke="#ddd"/>'
            f'<text x="{x0 - 6}" y="{y + 4}" text-anchor="end">{value / 1000:g}k</text>'
        )
    for s in sessions:
        out.append(f'<text x="{px(s)}" y="{TOP + PANEL_H + 18}" text-anchor="middle">{s:,}</text>')
    out.append(
        f'<text x="{x0 + PANEL_W / 2}" y="{TOP + PANEL_H + 40}" text-anchor="middle">'
        "sessions (S, log scale)</text>"
    )
    for name, colour in COLOURS.items():
        if name not in rows:
            continue
        points = [(px(s), py(rows[name][str(s)][METRIC])) for s in sessions]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        dash = ' stroke-dasharray="6 4"' if name in DASHED else ""
        out.append(
            f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2.5"{dash}/>'
        )
        out.extend(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"/>' for x, y in points
        )
    return out


def render(document: dict[str, Any]) -> str:
    figures = document["figures"]
    y_max = _nice_max(
        max(
            row[str(s)][METRIC]
            for series in figures.values()
            for row in series.values()
            for s in row
        )
    )
    width = LEFT + 2 * PANEL_W + GAP + LEFT // 2
    height = TOP + PANEL_H + BOTTOM + 30
    body: list[str] = [
        f'<text x="{LEFT - 50}" y="{TOP + PANEL_H / 2}" text-anchor="middle" '
        f'transform="rotate(-90 {LEFT - 50} {TOP + PANEL_H / 2})">messages per CPU-second</text>'
    ]
    for i, (key, title) in enumerate(SERIES.items()):
        body += _panel(LEFT + i * (PANEL_W + GAP + 20), title, figures[key], y_max)
    legend_y = height - 12
    for i, (name, colour) in enumerate(COLOURS.items()):
        x = LEFT + i * 180
        dash = ' stroke-dasharray="6 4"' if name in DASHED else ""
        body.append(
            f'<line x1="{x}" y1="{legend_y - 4}" x2="{x + 22}" y2="{legend_y - 4}" '
            f'stroke="{colour}" stroke-width="2.5"{dash}/>'
            f'<text x="{x + 28}" y="{legend_y}">{escape(LABELS[name])}</text>'
        )
    versions = document["versions"]
    caption = (
        f"trio {versions['trio']}, Python {versions['python']}, "
        f"commit {document['machine'].get('commit')}, {document['date']}"
    )
    body.append(
        f'<text x="{width - 10}" y="14" text-anchor="end" font-size="10" fill="#666">'
        f"{escape(caption)}</text>"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">\n'
        f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n"
    )


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else TARGET
    document = json.loads(source.read_text(encoding="utf-8"))
    target.write_text(render(document), encoding="utf-8")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
