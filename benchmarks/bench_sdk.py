"""The Azure path (sdk scenario, goals P6-P8): the manager beside the raw asyncio SDK.

    python benchmarks/bench_sdk.py            # 10 sessions x 200 messages, 3 rounds
    python benchmarks/bench_sdk.py --quick    # CI smoke: 4 sessions x 25 messages, 1 round

Three kinds of process, side by side in one run:

* the **emulator** (``trio-sessions emulator``), in its own process: its CPU is measured
  apart (``/proc``) and never counts as a client's;
* the **raw SDK** (``--worker raw``): ``azure.servicebus.aio`` under plain asyncio
  (``asyncio.Runner(loop_factory=asyncio.SelectorEventLoop)``; trio_sessions' Azure
  backend is never imported there, since importing trio_asyncio replaces asyncio's
  policy): S concurrent ``NEXT_AVAILABLE_SESSION`` receivers, each
  ``receive_messages(max_message_count=1 + prefetch)`` + ``complete_message`` per message;
* the **raw SDK on trio-asyncio** (``--worker raw_trio_asyncio``): the same workload in
  one crossing into a ``trio_asyncio.open_loop()`` loop, with no manager and no bridge:
  it splits P7 into what trio-asyncio's loop costs the SDK and what the manager adds;
* the **manager** (``--worker manager``): `open_session_manager` on `AzureServiceBus`
  with a no-op handler, auto-complete, ``max_concurrent_sessions = S`` and the same
  prefetch. The process counts, by wrapping `AzureSessionLink.settle`, ``receive``,
  ``settle_and_receive`` and the bridge (`_Call`), the settlements per crossing, the
  crossings per message, the settlements carried on a receive crossing and how often a
  settlement preempts a pending receive; then it measures the bridge itself (below).

Each round loads S sessions x M messages (interleaved) with the sync SDK, then runs one
worker on them; the rounds alternate raw and manager, and each figure keeps the best
round. A worker times from opening its first receiver until its last message is
settled, in wall time and in process CPU time (``time.process_time``, every thread).

The bridge, in the manager's process after its run, with a fake SDK receiver whose
``complete_message`` does nothing (so only the bridge and the link are measured):

* a crossing: ``AzureServiceBus._call`` of a trivial coroutine, less awaiting it
  directly inside asyncio;
* a settlement batch: `AzureSessionLink.settle` of k completions (k = the settlements
  per crossing the manager run saw, rounded), less ``_settle_all`` of the same k awaited
  directly inside asyncio;
* a carried settlement: `AzureSessionLink.settle_and_receive` of those k completions
  and a receive, less a plain ``receive`` and less the k completions in asyncio, per
  settlement: what a settlement adds to the receive crossing that carries it.

P6 is amortised over the run's settlements as the manager made them: those carried on
a receive at the carried cost, the others at the settle-batch cost per settlement.

Goals (issue #8)::

    P6  <= 10 µs bridge cost per settlement, amortised
    P7  the manager adds <= 25 % to the SDK's own client CPU per message
        (manager CPU/message ÷ raw SDK CPU/message - 1)
    P8  the Azure path reaches >= 0.8x the raw asyncio SDK's messages/s

Writes ``results/sdk.json`` (``results/quick/sdk.json`` with ``--quick``). Needs Linux
(``/proc``) and ``pip install "trio-sessions[emulator]"``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import goal, parse_args, progress, write_results
from bench_emulator import emulator, process_cpu

QUEUE = "bench"
BODY = b"x" * 64
#: The manager's receive slice (`_azure.RECEIVE_SLICE`), used by the raw SDK too.
RECEIVE_SLICE = 1.0
#: Bridge microbenchmark: crossings per measurement, and measurements (best kept).
BRIDGE_CALLS = 2000
BRIDGE_REPEAT = 5

GOALS = {
    "P6": "≤ 10 µs bridge cost per settlement, amortised",
    "P7": "on the Azure path the manager adds ≤ 25 % to the SDK's own CPU per message",
    "P8": "the Azure path reaches ≥ 0.8x the raw asyncio SDK's messages/s",
}


# -- the raw SDK (its own process, plain asyncio, no trio_asyncio) -----------------------------


async def _raw(conn_str: str, sessions: int, per_session: int, prefetch: int) -> dict[str, Any]:
    from azure.servicebus import NEXT_AVAILABLE_SESSION
    from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver

    receivers: list[ServiceBusReceiver] = []
    receives = 0

    async def session(client: ServiceBusClient) -> None:
        nonlocal receives
        receiver = client.get_queue_receiver(
            QUEUE,
            session_id=NEXT_AVAILABLE_SESSION,
            max_wait_time=30,
            prefetch_count=prefetch,
        )
        receiver._config.retry_total = 0  # as the Azure backend does
        await receiver.__aenter__()
        receivers.append(receiver)
        left = per_session
        while left > 0:
            got = await receiver.receive_messages(
                max_message_count=1 + prefetch, max_wait_time=RECEIVE_SLICE
            )
            receives += 1
            for message in got:
                await receiver.complete_message(message)
            left -= len(got)

    async with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(session(client) for _ in range(sessions)))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        for receiver in receivers:
            await receiver.close()
    return {"wall_s": wall, "cpu_s": cpu, "sdk_receives": receives}


def raw_worker(args: argparse.Namespace) -> dict[str, Any]:
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        result: dict[str, Any] = runner.run(
            _raw(args.conn_str, args.sessions, args.per_session, args.prefetch)
        )
    assert "trio_asyncio" not in sys.modules, "the raw SDK process must stay plain asyncio"
    return result


def raw_trio_asyncio_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The raw SDK workload again, in the trio-asyncio loop the Azure backend uses.

    One crossing for the whole run, into a loop set up as `AzureServiceBus` sets up the
    one it opens: the difference from the raw SDK under plain asyncio is what running the
    SDK on trio-asyncio's loop costs, with no manager and no bridge.
    """
    import trio
    import trio_asyncio

    from trio_sessions.backends import _azure

    async def run() -> dict[str, Any]:
        async with trio_asyncio.open_loop() as loop:
            # As AzureServiceBus sets up the loop it opens (when it has this setting).
            setup = getattr(_azure, "_speed_up_loop", None) or getattr(
                _azure, "_run_ready_handles_together", None
            )
            if setup is not None:
                setup(loop)
            result: dict[str, Any] = await trio_asyncio.aio_as_trio(_raw)(
                args.conn_str, args.sessions, args.per_session, args.prefetch
            )
        return result

    result: dict[str, Any] = trio.run(run)
    return result


# -- the manager on AzureServiceBus (its own process) ------------------------------------------


def manager_worker(args: argparse.Namespace) -> dict[str, Any]:
    import trio
    from _scenarios import manager_options

    from trio_sessions import AzureServiceBus, ReceivedMessage, SessionContext
    from trio_sessions import open_session_manager as open_manager
    from trio_sessions.backends import _azure

    total = args.sessions * args.per_session
    counts = {
        "settle_calls": 0,
        "settlements": 0,
        "crossings": 0,
        "receive_calls": 0,
        "combined_calls": 0,
        "combined_settlements": 0,
        "preempts": 0,
    }
    state: dict[str, trio.Event] = {}

    link_settle = _azure.AzureSessionLink.settle
    link_receive = _azure.AzureSessionLink.receive
    link_combined = getattr(_azure.AzureSessionLink, "settle_and_receive", None)
    call_init = _azure._Call.__init__
    call_preempt = _azure._Call.preempt

    def settled(n: int) -> None:
        counts["settlements"] += n
        if counts["settlements"] >= total:
            state["done"].set()

    async def settle(self: Any, settlements: Any) -> Any:
        counts["settle_calls"] += 1
        results = await link_settle(self, settlements)
        settled(len(settlements))
        return results

    async def receive(self: Any, max_count: int) -> Any:
        counts["receive_calls"] += 1
        return await link_receive(self, max_count)

    async def combined(
        self: Any, settlements: Any, on_settled: Any, max_count: int, *rest: Any
    ) -> Any:
        assert link_combined is not None
        counts["combined_calls"] += 1
        counts["combined_settlements"] += len(settlements)

        def counted(results: Any) -> None:
            on_settled(results)
            settled(len(settlements))

        # Not through `receive` (the wrapper above): its fallback is not a receive call.
        return await link_combined(self, settlements, counted, max_count, *rest)

    def init(self: Any, *a: Any, **k: Any) -> None:
        counts["crossings"] += 1
        call_init(self, *a, **k)

    def preempt(self: Any) -> None:
        if not self._task.done():
            counts["preempts"] += 1
        call_preempt(self)

    patches: list[tuple[Any, str, Any]] = [
        (_azure.AzureSessionLink, "settle", settle),
        (_azure.AzureSessionLink, "receive", receive),
        (_azure._Call, "__init__", init),
        (_azure._Call, "preempt", preempt),
    ]
    if link_combined is not None:
        patches.append((_azure.AzureSessionLink, "settle_and_receive", combined))
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)

    async def handler(message: ReceivedMessage, context: SessionContext) -> None:  # noqa: ASYNC124
        return None

    async def run() -> dict[str, Any]:
        state["done"] = trio.Event()
        options = manager_options(args.sessions, prefetch_count=args.prefetch)
        async with AzureServiceBus.from_connection_string(args.conn_str, retry_total=0) as sb:
            async with open_manager(sb, queue_name=QUEUE, options=options) as manager:
                async with trio.open_nursery() as nursery:
                    before = dict(counts)
                    wall0, cpu0 = time.perf_counter(), time.process_time()
                    await nursery.start(manager.subscribe, handler)
                    await state["done"].wait()
                    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                    seen = {k: counts[k] - before[k] for k in counts}
                    manager.stop()
        return {"wall_s": wall, "cpu_s": cpu, **seen}

    result: dict[str, Any] = trio.run(run)
    for owner, name, value in originals:  # the bridge is measured unwrapped
        setattr(owner, name, value)
    per_crossing = result["settlements"] / max(result["settle_calls"] + result["combined_calls"], 1)
    result["bridge"] = bridge(args.conn_str, max(round(per_crossing), 1))
    return result


def bridge(conn_str: str, batch: int) -> dict[str, Any]:
    """Per crossing and per settlement batch: bridge CPU and wall, less the same in asyncio."""
    import datetime as dt
    import types

    import trio
    import trio_asyncio

    from trio_sessions import AzureServiceBus, ReceivedMessage, ReceiveMode
    from trio_sessions._messages import Complete
    from trio_sessions.backends._azure import AzureSessionLink, _settle_all

    async def trivial() -> None:  # noqa: ASYNC124 - the bridge's cost is what is timed
        return None

    class FakeSession:
        session_id = "s"
        locked_until_utc = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)

    sdk_message = types.SimpleNamespace(
        application_properties=None,
        lock_token="t",
        enqueued_time_utc=dt.datetime.now(dt.UTC),
        raw_amqp_message=types.SimpleNamespace(properties=None),
        body=b"",
        sequence_number=1,
        delivery_count=0,
        locked_until_utc=None,
        dead_letter_reason=None,
        dead_letter_error_description=None,
        time_to_live=None,
        scheduled_enqueue_time_utc=None,
        partition_key=None,
    )

    class FakeReceiver:
        session = FakeSession()

        async def complete_message(self, raw: object) -> None:
            return None

        async def receive_messages(self, **_: object) -> list[Any]:
            return [sdk_message]

    message = ReceivedMessage(
        body=b"",
        session_id="s",
        message_id="m",
        sequence_number=1,
        delivery_count=0,
        enqueued_time=dt.datetime.now(dt.UTC),
        locked_until=None,
        lock_token="t",
        raw=object(),
    )
    settlements = [Complete(message)] * batch
    pairs = [(s, s.message.raw) for s in settlements]
    n = BRIDGE_CALLS

    async def direct_trivial() -> tuple[float, float]:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            await trivial()
        return time.perf_counter() - wall0, time.process_time() - cpu0

    async def direct_settle(receiver: Any) -> tuple[float, float]:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            await _settle_all(receiver, pairs)
        return time.perf_counter() - wall0, time.process_time() - cpu0

    combined = hasattr(AzureSessionLink, "settle_and_receive")

    async def run() -> dict[str, Any]:
        best: dict[str, tuple[float, float]] = {}

        def keep(name: str, wall: float, cpu: float) -> None:
            old = best.get(name)
            if old is None or cpu < old[1]:
                best[name] = (wall, cpu)

        def ignore(results: object) -> None:
            return None

        async with AzureServiceBus.from_connection_string(conn_str) as sb:
            receiver: Any = FakeReceiver()
            link = AzureSessionLink(sb, receiver, ReceiveMode.PEEK_LOCK)
            for _ in range(BRIDGE_REPEAT):
                wall0, cpu0 = time.perf_counter(), time.process_time()
                for _ in range(n):
                    await sb._call(trivial)
                keep("call", time.perf_counter() - wall0, time.process_time() - cpu0)
                keep("direct_call", *await trio_asyncio.aio_as_trio(direct_trivial)())
                wall0, cpu0 = time.perf_counter(), time.process_time()
                for _ in range(n):
                    await link.settle(settlements)
                keep("settle", time.perf_counter() - wall0, time.process_time() - cpu0)
                keep("direct_settle", *await trio_asyncio.aio_as_trio(direct_settle)(receiver))
                wall0, cpu0 = time.perf_counter(), time.process_time()
                for _ in range(n):
                    await link.receive(1)
                keep("receive", time.perf_counter() - wall0, time.process_time() - cpu0)
                if combined:
                    wall0, cpu0 = time.perf_counter(), time.process_time()
                    for _ in range(n):
                        await link.settle_and_receive(settlements, ignore, 1)
                    keep("combined", time.perf_counter() - wall0, time.process_time() - cpu0)
        us = {k: (w * 1e6 / n, c * 1e6 / n) for k, (w, c) in best.items()}
        return {
            "calls_per_measurement": n,
            "settlements_per_batch": batch,
            "call_us": {"wall": us["call"][0], "cpu": us["call"][1]},
            "direct_call_us": {"wall": us["direct_call"][0], "cpu": us["direct_call"][1]},
            "crossing_cpu_us": us["call"][1] - us["direct_call"][1],
            "crossing_wall_us": us["call"][0] - us["direct_call"][0],
            "settle_batch_us": {"wall": us["settle"][0], "cpu": us["settle"][1]},
            "direct_settle_batch_us": {
                "wall": us["direct_settle"][0],
                "cpu": us["direct_settle"][1],
            },
            "settle_overhead_cpu_us_per_batch": us["settle"][1] - us["direct_settle"][1],
            "settle_overhead_cpu_us_per_settlement": (us["settle"][1] - us["direct_settle"][1])
            / batch,
            # A settlement carried on a receive crossing (settle_and_receive): the combined
            # call less a plain receive (both through the link, same fake receiver), less
            # the settlements' own cost in asyncio: what carrying them adds.
            "receive_us": {"wall": us["receive"][0], "cpu": us["receive"][1]},
            **(
                {
                    "combined_us": {"wall": us["combined"][0], "cpu": us["combined"][1]},
                    "carried_overhead_cpu_us_per_settlement": (
                        us["combined"][1] - us["receive"][1] - us["direct_settle"][1]
                    )
                    / batch,
                }
                if combined
                else {}
            ),
        }

    result: dict[str, Any] = trio.run(run)
    return result


# -- the orchestrator --------------------------------------------------------------------------


def load(conn_str: str, sessions: int, per_session: int) -> None:
    """Send ``per_session`` messages to each of ``sessions``, interleaved, in batches."""
    from azure.servicebus import ServiceBusClient, ServiceBusMessage

    messages = [
        ServiceBusMessage(BODY, session_id=f"s{s}")
        for _ in range(per_session)
        for s in range(sessions)
    ]
    with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
        with client.get_queue_sender(QUEUE) as sender:
            for at in range(0, len(messages), 100):
                sender.send_messages(messages[at : at + 100])


def run_worker(kind: str, conn_str: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    """One round: load the queue, run a worker process on it; its figures and the emulator's."""
    load(conn_str, args.sessions, args.per_session)
    emulator0 = process_cpu(pid)[0]
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            kind,
            conn_str,
            str(args.sessions),
            str(args.per_session),
            str(args.prefetch),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the {kind} worker failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["emulator_cpu_s"] = process_cpu(pid)[0] - emulator0  # the whole worker's life
    total = args.sessions * args.per_session
    result["messages"] = total
    result["messages_per_s"] = total / result["wall_s"]
    result["cpu_us_per_message"] = result["cpu_s"] * 1e6 / total
    progress(
        f"  {kind}: {result['messages_per_s']:,.0f} msg/s, "
        f"{result['cpu_us_per_message']:,.0f} µs CPU per message"
    )
    return result


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=None, help="S (default 10; 4 quick)")
    parser.add_argument(
        "--per-session", type=int, default=None, help="messages per session (200; 25 quick)"
    )
    parser.add_argument("--prefetch", type=int, default=0, help="prefetch_count (default 0)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, conn_str, sessions, per_session, prefetch = sys.argv[2:7]
        worker_args = argparse.Namespace(
            conn_str=conn_str,
            sessions=int(sessions),
            per_session=int(per_session),
            prefetch=int(prefetch),
        )
        workers = {
            "raw": raw_worker,
            "raw_trio_asyncio": raw_trio_asyncio_worker,
            "manager": manager_worker,
        }
        figures = workers[kind](worker_args)
        print(json.dumps(figures))
        return
    started = time.perf_counter()
    args = parse_args(__doc__.splitlines()[0], _extra)
    args.sessions = args.sessions or (4 if args.quick else 10)
    args.per_session = args.per_session or (25 if args.quick else 200)
    if args.sessions < 1 or args.per_session < 1 or args.prefetch < 0:
        raise SystemExit("--sessions and --per-session must be >= 1, --prefetch >= 0")
    if not Path("/proc/self/stat").exists():
        raise SystemExit("this benchmark reads the emulator's CPU time from /proc (Linux only)")
    progress(
        f"sdk: {args.sessions} sessions x {args.per_session} messages, prefetch "
        f"{args.prefetch}, {args.repeat} round(s) of raw SDK, raw SDK on trio-asyncio, manager"
    )
    rounds: dict[str, list[dict[str, Any]]] = {"raw": [], "raw_trio_asyncio": [], "manager": []}
    with emulator() as (conn_str, pid):
        for round_ in range(args.repeat):
            progress(f"round {round_ + 1} of {args.repeat}")
            for kind in rounds:
                rounds[kind].append(run_worker(kind, conn_str, pid, args))
    raw = max(rounds["raw"], key=lambda r: r["messages_per_s"])
    manager = max(rounds["manager"], key=lambda r: r["messages_per_s"])
    raw_cpu = min(r["cpu_us_per_message"] for r in rounds["raw"])
    loop_cpu = min(r["cpu_us_per_message"] for r in rounds["raw_trio_asyncio"])
    on_loop = max(rounds["raw_trio_asyncio"], key=lambda r: r["messages_per_s"])
    manager_cpu = min(r["cpu_us_per_message"] for r in rounds["manager"])
    # The bridge figures of the manager round with the cheapest bridge (noise only adds).
    bridged = min(rounds["manager"], key=lambda r: r["bridge"]["crossing_cpu_us"])["bridge"]
    m = manager
    total = m["messages"]
    carried = m["combined_settlements"] / max(m["settlements"], 1)
    observed = {
        "settlements_per_crossing": m["settlements"]
        / max(m["settle_calls"] + m["combined_calls"], 1),
        "crossings_per_message": m["crossings"] / total,
        "settle_crossings_per_message": m["settle_calls"] / total,
        "combined_crossings_per_message": m["combined_calls"] / total,
        "receive_calls_per_message": m["receive_calls"] / total,
        "settlements_carried_on_a_receive": carried,
        "raw_sdk_receives_per_message": raw["sdk_receives"] / total,
        "preempted_receives_per_message": m["preempts"] / total,
    }
    # P6, amortised over the settlements as the run made them: those carried on a receive
    # crossing cost what carrying adds; the others, their share of a settle crossing.
    plain_cost = bridged["settle_overhead_cpu_us_per_settlement"]
    carried_cost = bridged.get("carried_overhead_cpu_us_per_settlement", plain_cost)
    p6 = carried * carried_cost + (1 - carried) * plain_cost
    p7 = manager_cpu / raw_cpu - 1
    p8 = manager["messages_per_s"] / raw["messages_per_s"]
    ratios = {
        "P6_bridge_cpu_us_per_settlement": p6,
        "P6_settle_crossing_cpu_us_per_settlement": plain_cost,
        "P6_carried_cpu_us_per_settlement": carried_cost,
        "P7_manager_cpu_over_raw_minus_1": p7,
        "P8_manager_over_raw_messages_per_s": p8,
        # P7 split: the SDK on trio-asyncio's loop (no manager, no bridge) over plain asyncio,
        # then the manager (and its bridge crossings) over that.
        "raw_trio_asyncio_cpu_over_raw_minus_1": loop_cpu / raw_cpu - 1,
        "manager_cpu_over_raw_trio_asyncio_minus_1": manager_cpu / loop_cpu - 1,
        "raw_trio_asyncio_over_raw_messages_per_s": on_loop["messages_per_s"]
        / raw["messages_per_s"],
        "manager_extra_cpu_us_per_message": manager_cpu - raw_cpu,
        "bridge_cpu_us_per_message": bridged["crossing_cpu_us"]
        * (manager["crossings"] / manager["messages"]),
    }
    note6 = (
        f"a crossing costs {bridged['crossing_cpu_us']:.1f} µs CPU over a direct await; "
        f"a settle crossing {plain_cost:.1f} µs per settlement, one carried on a receive "
        f"{carried_cost:.1f} µs; {observed['settlements_per_crossing']:.2f} settlements "
        f"per crossing, {carried:.0%} of them carried on a receive"
    )
    write_results(
        "sdk",
        args,
        parameters={
            "sessions": args.sessions,
            "messages_per_session": args.per_session,
            "prefetch_count": args.prefetch,
            "rounds": args.repeat,
            "body_bytes": len(BODY),
            "receive_slice_s": RECEIVE_SLICE,
            "bridge_calls_per_measurement": BRIDGE_CALLS,
            "cpu": "each worker's time.process_time over its timed block; emulator: "
            "/proc/<pid>/task/*/schedstat over the worker's whole life",
        },
        figures={
            "raw_sdk": raw,
            "raw_sdk_on_trio_asyncio": on_loop,
            "manager": {k: v for k, v in manager.items() if k != "bridge"},
            "rounds": {
                kind: [{k: v for k, v in r.items() if k != "bridge"} for r in rs]
                for kind, rs in rounds.items()
            },
            "best_cpu_us_per_message": {
                "raw_sdk": raw_cpu,
                "raw_sdk_on_trio_asyncio": loop_cpu,
                "manager": manager_cpu,
            },
            "observed": observed,
            "bridge": bridged,
        },
        ratios=ratios,
        goals=[
            goal("P6", GOALS["P6"], p6, 10.0, higher_is_better=False, unit=" µs", note=note6),
            goal("P7", GOALS["P7"], p7 * 100, 25.0, higher_is_better=False, unit=" %"),
            goal("P8", GOALS["P8"], p8, 0.8, higher_is_better=True, unit="x"),
        ],
        started=started,
    )


if __name__ == "__main__":
    main()
