"""The ``trio-sessions`` command: ``demo`` (now), ``run`` and ``emulator`` (coming)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

import trio

from ._demo import DemoProgress, DemoResult, run_demo
from ._run import add_run_parser, run

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
    add_run_parser(commands)
    emulator = commands.add_parser(
        "emulator",
        help="serve a MemoryBroker over AMQP 1.0 for the Service Bus SDKs",
        description=(
            "Serve an in-memory Service Bus over AMQP 1.0 on loopback. The first line on "
            "stdout is the connection string (UseDevelopmentEmulator=true); logs go to "
            "stderr; SIGINT or SIGTERM stops it."
        ),
    )
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument(
        "--port",
        type=_bounded(int, "--port", 0, 65536),
        default=5672,
        help="TCP port (0: a free port)",
    )
    emulator.add_argument("--config", help="the official emulator's Config.json")
    emulator.add_argument(
        "--queue",
        action="append",
        default=[],
        metavar="NAME",
        help="add a session-enabled queue (repeatable)",
    )
    emulator.add_argument("--key-name", default="RootManageSharedAccessKey")
    emulator.add_argument("--key", default=None, help="SAS key (default: a random one)")
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
    if args.command == "run":
        sys.exit(run(args))
    if args.command == "emulator":
        sys.exit(_emulator(args))
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


def _emulator(args: argparse.Namespace) -> int:
    """Run ``trio-sessions emulator``; return the exit code."""
    import logging
    import signal

    from .backends._memory import MemoryBroker
    from .emulator import serve_emulator
    from .emulator._config import ConfigError, load_config

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        broker = load_config(args.config) if args.config else MemoryBroker()
        for name in args.queue:
            broker.create_queue(name)
    except (ConfigError, ValueError) as exc:
        print(f"trio-sessions emulator: {exc}", file=sys.stderr)
        return 2

    async def serve() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with serve_emulator(
                broker, host=args.host, port=args.port, key_name=args.key_name, key=args.key
            ) as emulator:
                print(emulator.connection_string, flush=True)
                logging.getLogger("trio_sessions.emulator").info(
                    "serving on %s:%d", emulator.host, emulator.port
                )
                async for signum in signals:
                    logging.getLogger("trio_sessions.emulator").info(
                        "stopping on %s", signal.Signals(signum).name
                    )
                    return

    try:
        trio.run(serve)
    except OSError as exc:
        print(
            f"trio-sessions emulator: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0
