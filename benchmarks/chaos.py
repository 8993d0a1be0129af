"""The multi-process chaos run (issue 7): ``nox -s chaos`` (``-- --quick`` in CI).

``python benchmarks/chaos.py run [--quick] [--seed N] ...`` (the orchestrator):

1. serves a MemoryBroker over AMQP with the emulator, on loopback;
2. sends N messages over S sessions into its session-enabled queue;
3. starts W worker processes (``chaos.py worker``), each running a session manager on
   the real SDK through `AzureServiceBus` against the emulator, and each writing its
   handler calls to a JSONL history;
4. injects faults on a schedule drawn from the seed: every client connection cut
   (`Emulator.drop_connections`), session locks expired through the broker, transient
   broker errors (``fail_next``), workers SIGKILLed and started again; the workers add
   their own (handlers that raise, run slow or hang past the lock; managers stopped
   and restarted);
5. samples each worker's RSS every second; once the queue is drained (or the time is
   up) stops the workers, reads the histories, runs the history checker on them and on
   the broker's final state, and writes ``benchmarks/results/chaos.json`` and the table
   in ``docs/reliability.md``.

It exits 1 if anything was lost, a session overlapped, first deliveries left send
order or a duplicate has no lock loss behind it.
"""

from __future__ import annotations

import argparse
import enum
import functools
import json
import logging
import math
import random
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import attrs
import trio

from trio_sessions import (
    MemoryBroker,
    Message,
    OperationTimeoutError,
    ReceivedMessage,
    ServiceBusConnectionError,
    SessionManagerOptions,
    open_session_manager,
)
from trio_sessions._chaos import (
    BrokerState,
    Fault,
    HistoryWriter,
    Recorder,
    check_history,
    read_history,
)

if TYPE_CHECKING:
    from trio_sessions import AzureServiceBus
    from trio_sessions.emulator import Emulator

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
QUEUE = "chaos"

#: Fault kinds the orchestrator injects, with their weights.
FAULT_WEIGHTS = {"cut_connections": 2, "expire_lock": 4, "kill": 2, "error": 2}
BROKER_ERRORS = [
    ("renew_lock", ServiceBusConnectionError),
    ("receive", ServiceBusConnectionError),
    ("complete", OperationTimeoutError),
    ("accept_session", ServiceBusConnectionError),
]


@attrs.frozen(kw_only=True)
class RunConfig:
    """The size of a run."""

    messages: int
    sessions: int
    workers: int
    faults: int
    seed: int
    lock_duration: float
    time_limit: float
    send_duration: float
    fault_interval: float


QUICK = {"messages": 2_000, "sessions": 200, "workers": 2, "faults": 20, "time_limit": 75.0}
FULL = {"messages": 50_000, "sessions": 5_000, "workers": 4, "faults": 120, "time_limit": 1_500.0}


# -- worker -----------------------------------------------------------------------------


def make_backend(conn_str: str) -> AzureServiceBus:
    """The one place the worker builds its backend: the real SDK against the emulator."""
    from trio_sessions import AzureServiceBus

    return AzureServiceBus.from_connection_string(conn_str)


def behaviour_for(seed: int, lock_duration: float) -> Any:
    """The handler's behaviour: a fault for a few first deliveries, drawn from the seed."""

    async def behave(message: ReceivedMessage) -> None:
        rng = random.Random(f"{seed}:{message.message_id}:{message.delivery_count}")
        roll = rng.random()
        if message.delivery_count == 0 and roll < 0.01:
            raise ValueError("planned failure")
        if message.delivery_count == 0 and roll < 0.02:
            await trio.sleep(lock_duration * 0.8)  # slow: renewal must keep the lock
        elif message.delivery_count == 0 and roll < 0.022:
            await trio.sleep(lock_duration * 6)  # hangs past the lock and its renewal
        else:
            await trio.sleep(rng.random() * 0.002)

    return behave


async def worker(args: argparse.Namespace, file: IO[str]) -> None:
    """One worker process: a manager on the SDK, restarted now and then, recording calls."""
    rng = random.Random(f"{args.seed}:{args.name}")
    options = SessionManagerOptions(
        max_concurrent_sessions=args.concurrency,
        session_idle_timeout=2.0,
        max_auto_lock_renewal_duration=args.lock_duration * 3,
        accept_timeout=5.0,
        shutdown_timeout=args.lock_duration / 2,
    )
    recorder = Recorder(
        args.name,
        behaviour=behaviour_for(args.seed, args.lock_duration),
        writer=HistoryWriter(file, args.name),
        clock=time.time,
    )
    done = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with make_backend(args.conn_str) as backend, trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    done.set()
                    return

            nursery.start_soon(stop_on_signal)
            while not done.is_set():
                # The manager is stopped and a new one opened every 10-40 s (a restart).
                async with open_session_manager(
                    backend,
                    queue_name=QUEUE,
                    options=options,
                ) as manager:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(
                            functools.partial(
                                manager.subscribe,
                                recorder.process_message,
                                process_error=recorder.process_error,
                            )
                        )
                        with trio.move_on_after(rng.uniform(10, 40)):
                            await done.wait()
                        if not done.is_set():
                            recorder.record(
                                Fault(kind="restart", time=time.time(), process=args.name)
                            )
                        manager.stop()
            nursery.cancel_scope.cancel()


# -- orchestrator -----------------------------------------------------------------------


@attrs.define
class Worker:
    """One worker slot: its current process and the RSS samples of every incarnation."""

    index: int
    incarnation: int = 0
    process: trio.Process | None = None
    rss: dict[str, list[tuple[float, int]]] = attrs.field(factory=dict)

    @property
    def name(self) -> str:
        return f"w{self.index}.{self.incarnation}"


def rss_kib(pid: int) -> int | None:
    """The resident set size of ``pid`` in KiB (Linux), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def orchestrate(config: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Run the whole thing; return the JSON report."""
    from trio_sessions.emulator import serve_emulator

    rng = random.Random(config.seed)
    histories = out_dir / "histories"
    histories.mkdir(parents=True, exist_ok=True)
    for old in histories.glob("*.jsonl"):
        old.unlink()
    faults_file = (histories / "orchestrator.jsonl").open("w", encoding="utf-8")
    log = HistoryWriter(faults_file, "orchestrator")
    emulator_logger = logging.getLogger("trio_sessions.emulator")
    emulator_logger.addHandler(_DroppedConnections(log))
    broker = MemoryBroker(record_completed=True)
    broker.create_queue(QUEUE, lock_duration=config.lock_duration, max_delivery_count=50)
    sent: dict[str, str] = {}
    for number in range(config.messages):
        sid = f"s{rng.randrange(config.sessions)}"
        sent[f"m{number}"] = sid
    items = list(sent.items())
    sending_done = trio.Event()
    stopping = trio.Event()  # from here on, workers exit because they were told to

    async def send_all() -> None:
        # In send order, in batches spread over the fault period, so that faults strike
        # a busy system; the broker numbers each session's messages in send order.
        batch = 100
        pause = config.send_duration / max(1, math.ceil(len(items) / batch))
        for at in range(0, len(items), batch):
            chunk = items[at : at + batch]
            await broker.send(QUEUE, [Message(m, session_id=sid, message_id=m) for m, sid in chunk])
            await trio.sleep(pause)
        sending_done.set()

    started = time.time()
    workers = [Worker(i) for i in range(config.workers)]
    injected = 0
    exits: list[str] = []

    async with serve_emulator(broker) as emulator, trio.open_nursery() as nursery:

        async def start(slot: Worker) -> None:
            slot.incarnation += 1
            command = [
                sys.executable,
                str(SCRIPT),
                "worker",
                "--conn-str", emulator.connection_string,
                "--name", slot.name,
                "--history", str(histories / f"{slot.name}.jsonl"),
                "--seed", str(config.seed),
                "--lock-duration", str(config.lock_duration),
            ]  # fmt: skip
            log_path = histories / f"{slot.name}.log"
            with log_path.open("wb") as stderr:  # the child keeps its own descriptor
                slot.process = await nursery.start(
                    functools.partial(trio.run_process, command, check=False, stderr=stderr)
                )
            slot.rss[slot.name] = []

        async def watch(slot: Worker) -> None:
            while True:
                process = slot.process
                if process is not None:
                    if process.returncode is not None and not stopping.is_set():
                        log_text = (histories / f"{slot.name}.log").read_text(errors="replace")
                        last = (log_text.strip().splitlines() or ["(no output)"])[-1]
                        exits.append(f"{slot.name} exited with {process.returncode}: {last}")
                        slot.process = None
                    else:
                        kib = rss_kib(process.pid)
                        if kib is not None:
                            slot.rss[slot.name].append((round(time.time() - started, 1), kib))
                await trio.sleep(1)

        for slot in workers:
            await start(slot)
            nursery.start_soon(watch, slot)
        nursery.start_soon(send_all)
        deadline = started + config.time_limit
        while time.time() < deadline and not exits:
            if injected < config.faults:
                await trio.sleep(rng.expovariate(1 / config.fault_interval))
                kind = rng.choices(list(FAULT_WEIGHTS), weights=list(FAULT_WEIGHTS.values()))[0]
                if inject(kind, rng, broker, emulator, workers, log):
                    injected += 1
                    if kind == "kill":
                        slot = next(w for w in workers if w.process is None)
                        await start(slot)
            else:
                await trio.sleep(1)
                if sending_done.is_set() and broker.active_message_count(QUEUE) == 0:
                    break
        stopping.set()
        for slot in workers:
            if slot.process is not None:
                slot.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(config.lock_duration * 4):
            for slot in workers:
                if slot.process is not None:
                    await slot.process.wait()
        nursery.cancel_scope.cancel()
    faults_file.close()

    history = read_history(sorted(histories.glob("*.jsonl")))
    report = check_history(history, sent, BrokerState.of(broker, QUEUE))
    summary = report.summary()
    summary.update(
        seed=config.seed,
        workers=config.workers,
        lock_duration_s=config.lock_duration,
        elapsed_s=round(time.time() - started, 1),
        worker_exits=exits,
        examples={
            "lost": list(report.lost[:10]),
            "overlaps": [attrs.asdict(o) for o in report.unexplained_overlaps[:5]],
            "forced_overlaps": [attrs.asdict(o) for o in report.overlaps if o.cause][:5],
            "order_violations": [attrs.asdict(v) for v in report.order_violations[:5]],
            "unexplained_duplicates": [attrs.asdict(d) for d in report.unexplained_duplicates[:5]],
        },
        rss_kib={name: samples for slot in workers for name, samples in slot.rss.items()},
        peak_rss_kib={
            name: max(kib for _, kib in samples)
            for slot in workers
            for name, samples in slot.rss.items()
            if samples
        },
        ok=report.ok and not exits and not report.unfinished,
    )
    return summary


class _DroppedConnections(logging.Handler):
    """Records each client connection the emulator ends on an error, as a fault.

    The emulator closes a connection when serving it raises (an injected broker error on
    a management request does, for one), and so releases its sessions at once, like a
    cut: the checker must see that as a forced release.
    """

    def __init__(self, log: HistoryWriter) -> None:
        super().__init__(level=logging.ERROR)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "emulator connection failed":
            self.log.fault(Fault(kind="connection_failed", time=record.created))


def inject(
    kind: str,
    rng: random.Random,
    broker: MemoryBroker,
    emulator: Emulator,
    workers: list[Worker],
    log: HistoryWriter,
) -> bool:
    """Inject one fault of ``kind``; return whether there was something to hit."""
    now = time.time()
    if kind == "cut_connections":
        # A network partition: the broker does not see the clients go, so their locks last
        # until they expire (as on Service Bus) and nobody else takes their sessions sooner.
        emulator.drop_connections(keep_locks=True)
        log.fault(Fault(kind="cut_connections", time=now))
    elif kind == "expire_lock":
        locked = broker.locked_sessions(QUEUE)
        if not locked:
            return False
        sid = rng.choice(locked)
        broker.expire_session_lock(QUEUE, sid)
        log.fault(Fault(kind="expire_lock", time=now, session_id=sid))
    elif kind == "kill":
        alive = [w for w in workers if w.process is not None]
        if not alive:
            return False
        slot = rng.choice(alive)
        assert slot.process is not None
        slot.process.send_signal(signal.SIGKILL)
        log.fault(Fault(kind="kill", time=now, process=slot.name))
        slot.process = None
    else:
        operation, error = rng.choice(BROKER_ERRORS)
        broker.fail_next(operation, error)
        log.fault(Fault(kind=f"error:{operation}", time=now))
    return True


# -- report -----------------------------------------------------------------------------


def _mean_mib(samples: list[tuple[float, int]]) -> float:
    return sum(kib for _, kib in samples) / len(samples) / 1024


def write_docs(summary: dict[str, Any], command: str, path: Path) -> None:
    """Write docs/reliability.md: what the suite checks, and the table of this run."""
    faults = ", ".join(f"{kind} {n}" for kind, n in summary["faults"].items()) or "none"
    causes = ", ".join(f"{cause} {n}" for cause, n in summary["duplicate_causes"].items()) or "none"
    forced_causes = {k: n for k, n in summary["overlap_causes"].items() if k != "unexplained"}
    forced = sum(forced_causes.values())
    overlap_causes = ", ".join(f"{cause} {n}" for cause, n in forced_causes.items()) or "none"
    rows = [
        ("messages", f"{summary['messages']:,}"),
        ("sessions", f"{summary['sessions']:,}"),
        ("worker processes", str(summary["workers"])),
        ("handler calls", f"{summary['handler_calls']:,}"),
        ("faults injected", f"{summary['faults_total']} ({faults})"),
        (
            "observed",
            ", ".join(f"{k} {n}" for k, n in summary.get("observed", {}).items()) or "none",
        ),
        ("lost", str(summary["lost"])),
        ("overlaps (unexplained)", str(summary["overlaps_unexplained"])),
        ("overlaps after a forced release", f"{forced} ({overlap_causes})"),
        ("order violations", str(summary["order_violations"])),
        ("duplicates", f"{summary['duplicates']} ({causes})"),
        ("still in the queue at the end", str(summary["unfinished"])),
        ("elapsed", f"{summary['elapsed_s']} s"),
    ]
    rss_rows = []

    def natural(item: tuple[str, Any]) -> tuple[int, ...]:
        return tuple(int(part) for part in item[0][1:].split("."))  # w3.10 after w3.2

    for name, samples in sorted(summary["rss_kib"].items(), key=natural):
        if len(samples) >= 8:  # a process that lived at least 8 s
            q = len(samples) // 4
            rss_rows.append(
                f"| {name} | {len(samples)} s | {_mean_mib(samples[q : 2 * q]):.0f} | "
                f"{_mean_mib(samples[-q:]):.0f} | {max(k for _, k in samples) / 1024:.0f} |"
            )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = f"""# Reliability

Service Bus promises at-least-once delivery, FIFO within a session and one holder per
session lock. The chaos suite (issue 7) checks that the session manager keeps those
promises when things break, with a history checker in the spirit of Jepsen: every
handler call records its process, session, message id, sequence number, delivery
count, start, end and outcome, and from that history and the broker's final state
the checker computes

* **lost**: sent, but never completed, dead-lettered or deferred, and no longer in the
  broker (must be 0);
* **overlaps**: two handler calls of one session at the same time, across processes
  (must be 0). Those that follow a *forced release* are counted apart, with their
  cause: the orchestrator took the lock away through the broker (`expire_lock`) while
  the holder's handler ran. The broker detaches the link, but a handler doing no I/O
  on it cannot see that until its next operation or its lock deadline; if the session
  goes to another process meanwhile, the two overlap. (When it comes back to the same
  manager, the manager now cancels the old handler first.) On Service Bus a lock is
  only lost by time, and the manager cancels handlers half the renewal margin before
  that. Connection cuts are network partitions here
  (`drop_connections(keep_locks=True)`): as on Service Bus, the cut client's locks
  last until they expire, so they force no release. The emulator also ends a
  connection when an injected broker error escapes a request it serves
  (`connection_failed` below, read from its log), which is a forced release too;
* **order violations**: the first handler calls of a session's messages out of send
  order (must be 0);
* **duplicates**: a message processed to its end more than once. At-least-once delivery
  allows that only after a lock loss (or a failed complete, which leaves the message
  locked until its session closes), and each must be explained by one.

It runs twice:

* in-process, `tests/test_chaos.py`: several managers share one MemoryBroker queue in
  virtual time while Hypothesis draws the fault plan (expired session locks, transient
  broker errors, handlers that raise, run slow or hang past the lock, managers stopped
  and restarted, or crashed); 100 examples in the test suite, 1000 in `nox -s chaos`;
* across OS processes, `benchmarks/chaos.py` (`nox -s chaos`; `-- --quick` in CI):
  worker processes run managers on the real SDK through `AzureServiceBus` against the
  emulator, while the orchestrator cuts connections, expires locks, injects broker
  errors and SIGKILLs and restarts workers.

## Latest run

`{command}`

| | |
|---|---|
{table}

RSS per worker process over time (MiB, sampled each second; a worker killed and started
again is a new process; those that lived at least 8 s): the mean over the second
quarter of its samples (after start-up) and over the last quarter, and the peak.

| process | lived | second quarter | last quarter | peak |
|---|---|---|---|---|
{chr(10).join(rss_rows) or "| (no samples) | | | | |"}

Raw figures, RSS series included: `benchmarks/results/chaos.json`
(`python benchmarks/chaos.py docs` renders this page from it again).

## What the runs found

* **Handlers outlived their lock** (fixed). The actor cancelled handlers at the lock's
  expiry itself, so in a busy process a handler ran on after the broker had given the
  session to another worker (an overlap of 1.5 s in the first multi-process run). It now
  cancels them half the renewal margin earlier, as the design says.
* **The emulator releases a cut connection's sessions at once**; Service Bus keeps a
  vanished client's lock until it expires. Overlaps after a cut come from that, and are
  counted apart above; an emulator that kept the locks would remove them.
* **An injected broker error ends the whole emulator connection**: `fail_next` errors
  that escape a request the emulator serves are not answered with an AMQP error but end
  the client's connection (and so release its sessions), silently.
* **A failed auto-complete is not retried**: the message stays locked until its session
  closes and then comes back, after later messages of its session were handled (the
  `complete_failed` duplicates above). Retrying the complete with the backoff policy
  would avoid both the duplicate and the reordering.
"""
    path.write_text(text, encoding="utf-8")


def _json(value: object) -> object:
    """JSON for the checker's values (outcomes are enums)."""
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the orchestrator or a worker."""
    parser = argparse.ArgumentParser(prog="chaos.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="the orchestrator")
    run.add_argument("--quick", action="store_true", help="the short CI run")
    run.add_argument("--seed", type=int, default=1)
    for name in ("messages", "sessions", "workers", "faults"):
        run.add_argument(f"--{name}", type=int)
    run.add_argument("--time-limit", type=float)
    run.add_argument("--lock-duration", type=float, default=5.0)
    run.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    run.add_argument("--docs", type=Path, default=ROOT / "docs" / "reliability.md")
    render = commands.add_parser("docs", help="rewrite the docs page from chaos.json")
    render.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    render.add_argument("--docs", type=Path, default=ROOT / "docs" / "reliability.md")
    render.add_argument("--made-by", help="the command that made chaos.json")
    work = commands.add_parser("worker", help="one worker process (started by run)")
    work.add_argument("--conn-str", required=True)
    work.add_argument("--name", required=True)
    work.add_argument("--history", required=True)
    work.add_argument("--seed", type=int, required=True)
    work.add_argument("--lock-duration", type=float, required=True)
    work.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    if args.command == "worker":
        with open(args.history, "a", encoding="utf-8") as file:
            trio.run(worker, args, file)
        return 0
    if args.command == "docs":
        summary = json.loads((args.out / "chaos.json").read_text(encoding="utf-8"))
        write_docs(summary, args.made_by or summary.get("command", "nox -s chaos"), args.docs)
        return 0
    size: dict[str, Any] = dict(QUICK if args.quick else FULL)
    for name in ("messages", "sessions", "workers", "faults", "time_limit"):
        if getattr(args, name) is not None:
            size[name] = getattr(args, name)
    config = RunConfig(
        seed=args.seed,
        lock_duration=args.lock_duration,
        # Sends and faults spread over half the time limit; the rest is for draining.
        send_duration=size["time_limit"] / 2,
        fault_interval=size["time_limit"] / 2 / max(size["faults"], 1),
        **size,
    )
    summary = trio.run(orchestrate, config, args.out)
    command = shlex.join(["python", "benchmarks/chaos.py", *(argv or sys.argv[1:])])
    summary["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    name = "chaos-quick.json" if args.quick else "chaos.json"
    (args.out / name).write_text(
        json.dumps(summary, indent=1, default=_json) + "\n", encoding="utf-8"
    )
    if not args.quick:
        write_docs(summary, command, args.docs)
    brief = {k: v for k, v in summary.items() if k not in ("rss_kib", "examples")}
    print(json.dumps(brief, indent=1))
    if not summary["ok"]:
        print(json.dumps(summary["examples"], indent=1, default=_json), file=sys.stderr)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
