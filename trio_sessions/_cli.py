"""The ``trio-sessions`` command: ``demo`` (now), ``run`` and ``emulator`` (coming)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

import trio

from ._demo import DemoProgress, DemoResult, run_demo

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["main"]


def _bounded(
    kind: Callable[[str], Any], flag: str, low: float, high: float | None = None
) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            allowed = f">= {low}" if high is None else f"in [{low}, {high})"
            raise argparse.ArgumentTypeError(f"{flag} must be {allowed}, got {text}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-sessions",
        description="A session processor for Azure Service Bus, on Trio.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="process ordered document edits on an in-process MemoryBroker and verify them",
        description=(
            "The document-editing use case: every document is a session receiving ordered "
            "edits; the handler applies them to the text kept in the session state. "
            "Exits 0 only if no edit was lost, applied twice or applied out of order."
        ),
    )
    demo.add_argument("--documents", type=_bounded(int, "--documents", 1), default=50)
    demo.add_argument(
        "--edits", type=_bounded(int, "--edits", 1), default=20, help="edits per document"
    )
    demo.add_argument(
        "--concurrency",
        type=_bounded(int, "--concurrency", 1),
        default=8,
        help="sessions held at once (max_concurrent_sessions)",
    )
    demo.add_argument(
        "--fail-rate",
        type=_bounded(float, "--fail-rate", 0, 1),
        default=0.1,
        help="probability that the handler raises (0 <= rate < 1)",
    )
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--json", action="store_true", help="print one JSON object at the end")
    commands.add_parser("run", help="process a real entity (not available yet)")
    commands.add_parser("emulator", help="serve a MemoryBroker over AMQP (not available yet)")
    return parser


class _Progress:
    """Shows demo progress: a rich live table on a terminal, else plain lines on stderr."""

    def __init__(self, stream: TextIO, *, live: bool) -> None:
        self._stream = stream
        self._live: Any = None
        if live:
            try:
                from rich.live import Live
            except ImportError:  # the cli extra is not installed: plain lines
                pass
            else:
                self._live = Live(refresh_per_second=4, transient=False)

    def _table(self, p: DemoProgress) -> Any:
        from rich.table import Table

        table = Table(title="trio-sessions demo", show_header=True)
        for column in ("sessions held", "edits applied", "messages/s", "redeliveries"):
            table.add_column(column, justify="right")
        table.add_row(
            str(p.sessions_held),
            f"{p.edits_applied}/{p.edits_sent}",
            f"{p.messages_per_s:,.0f}",
            str(p.redeliveries),
        )
        return table

    def __call__(self, p: DemoProgress) -> None:
        if self._live is not None:
            if not self._live.is_started:
                self._live.start()
            self._live.update(self._table(p))
            return
        print(
            f"[{p.elapsed_s:6.2f}s] sessions held {p.sessions_held:3d}  "
            f"edits applied {p.edits_applied}/{p.edits_sent}  "
            f"{p.messages_per_s:,.0f} msg/s  redeliveries {p.redeliveries}",
            file=self._stream,
        )

    def close(self) -> None:
        if self._live is not None and self._live.is_started:
            self._live.stop()


def _summary(result: DemoResult) -> str:
    verdict = "OK" if result.ok else "FAILED"
    lines = [
        f"{verdict}: {result.documents} documents, {result.edits_applied}/{result.edits_sent} "
        f"edits applied in {result.elapsed_s:.2f} s ({result.messages_per_s:,.0f} msg/s), "
        f"{result.redeliveries} redeliveries, peak {result.peak_sessions} sessions held",
        f"lost {result.lost}, applied twice {result.duplicates}, "
        f"documents out of order {result.out_of_order}",
    ]
    lines.extend(result.problems[:20])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``trio-sessions`` and ``python -m trio_sessions``."""
    args = _parser().parse_args(argv)
    if args.command in ("run", "emulator"):
        issue = "production runner" if args.command == "run" else "emulator"
        print(
            f"trio-sessions {args.command}: not available yet (tracked by the {issue} issue)",
            file=sys.stderr,
        )
        sys.exit(2)
    progress = _Progress(sys.stderr, live=not args.json and sys.stderr.isatty())
    try:
        result = trio.run(
            lambda: run_demo(
                documents=args.documents,
                edits=args.edits,
                concurrency=args.concurrency,
                fail_rate=args.fail_rate,
                seed=args.seed,
                on_progress=progress,
            )
        )
    finally:
        progress.close()
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(_summary(result))
    sys.exit(0 if result.ok else 1)
