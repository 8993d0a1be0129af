"""Latency from send to handler start at a steady, moderate rate: p50 and p99.

A sender task sends one message every 1/RATE seconds, round robin over SESSIONS
sessions, each stamped with its Trio-clock send time; the handler records how long it
waited. The first WARMUP messages (sessions being accepted) are left out. Beside the
manager, from the same run: the floor (raw Trio: the sender hands the message straight
to its session's consumer task over a memory channel) and the naive loop on the
MemoryBroker. Issue #8 sets no goal on latency; the figures are reported.

Run: ``python benchmarks/bench_latency.py`` (``--quick`` for a smoke test).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio
from _common import parse_args, percentile, progress, write_results
from _scenarios import QUEUE, manager_options

from trio_sessions import (
    MemoryBroker,
    Message,
    ReceivedMessage,
    SessionContext,
    open_session_manager,
)
from trio_sessions._messages import EntityPath

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

SESSIONS = 100
RATE = 2000.0  # messages per second: moderate, far below every scenario's throughput
FULL_MESSAGES = 20_000
QUICK_MESSAGES = 1_000
WARMUP = 0.1  # share of the messages left out at the start


def _stamp(message: ReceivedMessage) -> float:
    sent = message.application_properties["sent"]
    assert isinstance(sent, float)
    return sent


async def _send_steadily(count: int, send_one: Callable[[int, float], Awaitable[None]]) -> None:
    start = trio.current_time()
    for i in range(count):
        await trio.sleep_until(start + i / RATE)
        await send_one(i % SESSIONS, trio.current_time())


def run_floor(count: int) -> list[float]:
    latencies: list[float] = []

    async def consumer(inbox: trio.MemoryReceiveChannel[float]) -> None:
        async with inbox:
            async for sent in inbox:
                latencies.append(trio.current_time() - sent)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            inboxes = []
            for _ in range(SESSIONS):
                tx, rx = trio.open_memory_channel[float](1)
                inboxes.append(tx)
                nursery.start_soon(consumer, rx)

            async def send_one(session: int, now: float) -> None:
                await inboxes[session].send(now)

            await _send_steadily(count, send_one)
            for tx in inboxes:
                tx.close()

    trio.run(main)
    return latencies


def _broker() -> MemoryBroker:
    broker = MemoryBroker()
    broker.create_queue(QUEUE, lock_duration=300.0)
    return broker


def _sender(broker: MemoryBroker) -> Callable[[int, float], Awaitable[None]]:
    async def send_one(session: int, now: float) -> None:
        await broker.send(
            QUEUE, Message(b"x", session_id=f"s{session}", application_properties={"sent": now})
        )

    return send_one


def run_naive(count: int) -> list[float]:
    latencies: list[float] = []
    all_handled = trio.Event()
    broker = _broker()
    entity = EntityPath(queue_name=QUEUE)

    async def session_loop(limiter: trio.CapacityLimiter) -> None:
        while True:
            async with limiter:
                link = await broker.accept_session(entity, max_wait_time=600)
                try:
                    while True:
                        with trio.move_on_after(600):
                            batch = await link.receive(1)
                        for message in batch:
                            latencies.append(trio.current_time() - _stamp(message))
                            if len(latencies) == count:
                                all_handled.set()
                            await link.complete(message)
                finally:
                    with trio.CancelScope(shield=True):
                        await link.aclose()

    async def main() -> None:
        limiter = trio.CapacityLimiter(SESSIONS)
        async with trio.open_nursery() as nursery:
            for _ in range(SESSIONS):
                nursery.start_soon(session_loop, limiter)
            await _send_steadily(count, _sender(broker))
            await all_handled.wait()
            nursery.cancel_scope.cancel()

    trio.run(main)
    return latencies


def run_manager(count: int) -> list[float]:
    latencies: list[float] = []
    broker = _broker()

    all_handled = trio.Event()

    async def handler(message: ReceivedMessage, context: SessionContext) -> None:  # noqa: ASYNC124
        latencies.append(trio.current_time() - _stamp(message))
        if len(latencies) == count:
            all_handled.set()

    async def main() -> None:
        async with open_session_manager(
            broker, queue_name=QUEUE, options=manager_options(SESSIONS)
        ) as manager:
            async with trio.open_nursery() as nursery:
                await nursery.start(manager.subscribe, handler)
                await _send_steadily(count, _sender(broker))
                await all_handled.wait()
                manager.stop()

    trio.run(main)
    return latencies


SCENARIOS: dict[str, Callable[[int], list[float]]] = {
    "floor": run_floor,
    "naive": run_naive,
    "manager": run_manager,
}


def main() -> None:
    started = time.perf_counter()
    args = parse_args(__doc__.splitlines()[0])
    count = QUICK_MESSAGES if args.quick else FULL_MESSAGES
    skip = int(count * WARMUP)
    samples: dict[str, list[list[float]]] = {name: [] for name in SCENARIOS}
    for attempt in range(args.repeat):
        for name, run in SCENARIOS.items():
            samples[name].append(run(count)[skip:])
        progress(
            f"latency {attempt + 1}/{args.repeat}: "
            + ", ".join(
                f"{name} p50 {percentile(s[-1], 50) * 1e6:.0f} µs" for name, s in samples.items()
            )
        )
    figures: dict[str, Any] = {}
    for name, runs in samples.items():
        # The run with the lowest p99: noise from other processes only adds latency.
        chosen = min(runs, key=lambda r: percentile(r, 99))
        figures[name] = {
            "p50_us": percentile(chosen, 50) * 1e6,
            "p99_us": percentile(chosen, 99) * 1e6,
            "max_us": max(chosen) * 1e6,
            "samples": len(chosen),
        }
    ratios = {
        f"manager_vs_{ref}_{p}": figures["manager"][f"{p}_us"] / figures[ref][f"{p}_us"]
        for ref in ("floor", "naive")
        for p in ("p50", "p99")
    }
    write_results(
        "latency",
        args,
        parameters={
            "sessions": SESSIONS,
            "rate_per_s": RATE,
            "messages": count,
            "warmup_left_out": skip,
            "repeat": args.repeat,
        },
        figures=figures,
        ratios=ratios,
        goals=[],
        started=started,
    )


if __name__ == "__main__":
    main()
