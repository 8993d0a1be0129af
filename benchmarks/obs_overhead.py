"""What logging and OpenTelemetry hooks cost per message when they are off (or on).

Runs N sessions x M messages through `subscribe` (and `subscribe_sessions`) on a
MemoryBroker with a no-op handler, in a fresh process per mode, and prints the best of
a few runs in microseconds of CPU time per message (CPU time: other processes on a
shared machine disturb it less than wall time)::

    python benchmarks/obs_overhead.py                 # absent, unconfigured, configured
    python benchmarks/obs_overhead.py --modes absent  # one mode
    PYTHONPATH=/path/to/other/checkout python benchmarks/obs_overhead.py --modes absent

Modes: ``absent`` (opentelemetry made unimportable), ``unconfigured`` (the API
installed, no provider set: most processes), ``configured`` (SDK tracer and meter
providers that export nowhere: the cost of making spans and metrics). Figures are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _measure(mode: str, sessions: int, per_session: int, repeat: int) -> dict[str, float]:
    if mode == "absent":
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
    elif mode == "configured":
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())
        metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))

    import trio

    from trio_sessions import (
        MemoryBroker,
        Message,
        ReceivedMessage,
        SessionContext,
        SessionManagerOptions,
        open_session_manager,
    )

    total = sessions * per_session

    async def once(actor_form: bool) -> float:
        broker = MemoryBroker()
        broker.create_queue("q")
        for i in range(per_session):
            await broker.send(
                "q",
                [Message(b"x", session_id=f"s{s}", message_id=f"{s}-{i}") for s in range(sessions)],
            )
        done = trio.Event()
        seen = 0

        async def handle(message: ReceivedMessage, context: SessionContext) -> None:  # noqa: ASYNC124 - handlers are async by contract
            nonlocal seen
            seen += 1
            if seen == total:
                done.set()

        async def process_session(session: SessionContext) -> None:
            async for message in session:
                await handle(message, session)

        options = SessionManagerOptions(max_concurrent_sessions=64, session_idle_timeout=0.05)
        async with open_session_manager(broker, queue_name="q", options=options) as manager:
            async with trio.open_nursery() as nursery:
                started = time.process_time()
                if actor_form:
                    nursery.start_soon(manager.subscribe_sessions, process_session)
                else:
                    nursery.start_soon(manager.subscribe, handle)
                await done.wait()
                elapsed = time.process_time() - started
                manager.stop()
        return elapsed / total * 1e6

    async def main() -> dict[str, float]:
        return {
            "subscribe": min([await once(False) for _ in range(repeat)]),
            "subscribe_sessions": min([await once(True) for _ in range(repeat)]),
        }

    return trio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["absent", "unconfigured", "configured"])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--per-session", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = _measure(args.child, args.sessions, args.per_session, args.repeat)
        print(json.dumps(result))
        return
    print(
        f"{args.sessions} sessions x {args.per_session} messages, best of {args.repeat}, us/message"
    )
    for mode in args.modes:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--sessions",
                str(args.sessions),
                "--per-session",
                str(args.per_session),
                "--repeat",
                str(args.repeat),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        figures = json.loads(out)
        print(f"{mode:>13}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
