"""The emulator's CPU per message beside the azure-servicebus client's, in one run.

    python benchmarks/bench_emulator.py            # 2000 messages a phase
    python benchmarks/bench_emulator.py --quick    # CI smoke: 400 messages a phase

The emulator runs in its own process (``trio-sessions emulator``); the SDK's clients run
in this one, the sync client and then the asyncio one. For each phase (single sends,
batched sends, receive + complete on session receivers) the script measures this
process's CPU time (``getrusage``) and the emulator's (``/proc/<pid>/stat``), user and
system, and reports each per message and their ratio. The emulator must not be the
bottleneck: its ratio must stay below 1.

Writes ``benchmarks/results/emulator.json`` (``emulator.quick.json`` with ``--quick``).
Needs Linux (``/proc``) and ``pip install "trio-sessions[emulator]"``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient as AsyncServiceBusClient

if TYPE_CHECKING:
    from collections.abc import Iterator

RESULTS = Path(__file__).parent / "results"
QUEUE = "bench"
SESSIONS = 4
BODY = b"x" * 64
TICK = os.sysconf("SC_CLK_TCK")
#: ``python -c PROFILED <stats path> emulator ...``: the CLI under a CPU-time cProfile.
PROFILED = """
import cProfile, sys, time
from trio_sessions._cli import main
profiler = cProfile.Profile(time.process_time)
path = sys.argv.pop(1)
try:
    profiler.runcall(main, sys.argv[1:])
finally:
    profiler.dump_stats(path)
"""


def process_cpu(pid: int) -> tuple[float, float, float]:
    """CPU seconds process ``pid`` has used: in all, then user and system.

    The total is the scheduler's, in nanoseconds, summed over the threads
    (``/proc/<pid>/task/*/schedstat``); the user/system split (``/proc/<pid>/stat``) counts
    in clock ticks, too coarse for a short phase on its own.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        total += int((task / "schedstat").read_text().split()[0])
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return total / 1e9, int(fields[11]) / TICK, int(fields[12]) / TICK  # utime, stime


def own_cpu() -> tuple[float, float, float]:
    """CPU seconds this process (every thread) has used: in all, then user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.process_time(), usage.ru_utime, usage.ru_stime


@contextmanager
def emulator(profile: Path | None = None) -> Iterator[tuple[str, int]]:
    """Run ``trio-sessions emulator`` in a child process; yield its connection string and pid.

    With ``profile``, the emulator runs under cProfile (timing CPU, not wall time) and
    writes its statistics there when it stops.
    """
    command = [sys.executable, "-m", "trio_sessions", "emulator", "--port", "0"]
    if profile is not None:
        command[1:3] = ["-c", PROFILED, str(profile)]
    proc = subprocess.Popen(
        [*command, "--queue", QUEUE, "--key", "bench"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        conn_str = proc.stdout.readline().strip()
        if not conn_str.startswith("Endpoint="):
            raise SystemExit(f"the emulator did not start (exit code {proc.wait(10)})")
        yield conn_str, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


class Meter:
    """Both processes' CPU and the wall time over a ``with`` block, per message."""

    def __init__(self, name: str, emulator_pid: int, messages: int) -> None:
        self.name, self.pid, self.messages = name, emulator_pid, messages
        self.figures: dict[str, Any] = {}

    def __enter__(self) -> Meter:
        print(f"  {self.name}: {self.messages} messages ...", end="", flush=True)
        self.start = time.perf_counter(), own_cpu(), process_cpu(self.pid)
        return self

    def __exit__(self, *exc_info: object) -> None:
        wall0, client0, server0 = self.start
        server, server_user, server_sys = (
            b - a for a, b in zip(server0, process_cpu(self.pid), strict=True)
        )
        client, client_user, client_sys = (b - a for a, b in zip(client0, own_cpu(), strict=True))
        wall = time.perf_counter() - wall0
        if exc_info[0] is not None:
            print(" failed")
            return
        per_message = 1e6 / self.messages
        self.figures = {
            "messages": self.messages,
            "wall_s": round(wall, 3),
            "messages_per_s": round(self.messages / wall, 1),
            "client_cpu_s": round(client, 4),
            "emulator_cpu_s": round(server, 4),
            "client_user_system_s": [round(client_user, 3), round(client_sys, 3)],
            "emulator_user_system_s": [round(server_user, 3), round(server_sys, 3)],
            "client_cpu_per_message_us": round(client * per_message, 1),
            "emulator_cpu_per_message_us": round(server * per_message, 1),
            "emulator_to_client_ratio": round(server / client, 3) if client else None,
        }
        print(
            f" {self.figures['messages_per_s']:.0f} msg/s; CPU per message: client "
            f"{self.figures['client_cpu_per_message_us']:.0f} µs, emulator "
            f"{self.figures['emulator_cpu_per_message_us']:.0f} µs "
            f"(ratio {self.figures['emulator_to_client_ratio']})"
        )


def batches(n: int, batch: int) -> list[list[ServiceBusMessage]]:
    """``n`` messages over the four sessions, in lists of ``batch``."""
    messages = [ServiceBusMessage(BODY, session_id=f"s{i % SESSIONS}") for i in range(n)]
    return [messages[at : at + batch] for at in range(0, n, batch)]


def sync_phases(conn_str: str, pid: int, n: int, batch: int) -> dict[str, Any]:
    """The sync client: single sends, batched sends, then receive + complete of all."""
    meters = {
        "send": Meter("send, one message a call", pid, n),
        "send_batch": Meter(f"send, batches of {batch}", pid, n),
        "receive_complete": Meter("receive + complete", pid, 2 * n),
    }
    with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
        with client.get_queue_sender(QUEUE) as sender:
            sender.send_messages(ServiceBusMessage(BODY, session_id="warm-up"))
            singles = [m for group in batches(n, 1) for m in group]
            grouped = batches(n, batch)
            with meters["send"]:
                for message in singles:
                    sender.send_messages(message)
            with meters["send_batch"]:
                for group in grouped:
                    sender.send_messages(group)
        with meters["receive_complete"]:
            for session in range(SESSIONS):
                with client.get_queue_receiver(
                    QUEUE, session_id=f"s{session}", max_wait_time=5, prefetch_count=batch
                ) as receiver:
                    left = 2 * n // SESSIONS
                    while left > 0:
                        got = receiver.receive_messages(max_message_count=batch, max_wait_time=5)
                        if not got:
                            raise SystemExit(f"session s{session}: {left} messages missing")
                        for message in got:
                            receiver.complete_message(message)
                        left -= len(got)
    return {name: meter.figures for name, meter in meters.items()}


async def async_phases(conn_str: str, pid: int, n: int, batch: int) -> dict[str, Any]:
    """The asyncio client (what the Azure backend uses, through trio-asyncio), likewise."""
    meters = {
        "send": Meter("send, one message a call", pid, n),
        "send_batch": Meter(f"send, batches of {batch}", pid, n),
        "receive_complete": Meter("receive + complete", pid, 2 * n),
    }
    async with AsyncServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
        async with client.get_queue_sender(QUEUE) as sender:
            await sender.send_messages(ServiceBusMessage(BODY, session_id="warm-up"))
            singles = [m for group in batches(n, 1) for m in group]
            grouped = batches(n, batch)
            with meters["send"]:
                for message in singles:
                    await sender.send_messages(message)
            with meters["send_batch"]:
                for group in grouped:
                    await sender.send_messages(group)
        with meters["receive_complete"]:
            for session in range(SESSIONS):
                async with client.get_queue_receiver(
                    QUEUE, session_id=f"s{session}", max_wait_time=5, prefetch_count=batch
                ) as receiver:
                    left = 2 * n // SESSIONS
                    while left > 0:
                        got = await receiver.receive_messages(
                            max_message_count=batch, max_wait_time=5
                        )
                        if not got:
                            raise SystemExit(f"session s{session}: {left} messages missing")
                        for message in got:
                            await receiver.complete_message(message)
                        left -= len(got)
    return {name: meter.figures for name, meter in meters.items()}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("trio-sessions", "azure-servicebus", "python-qpid-proton", "trio"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 400 messages a phase")
    parser.add_argument("--messages", type=int, help="messages per send phase (default 2000)")
    parser.add_argument("--batch", type=int, default=100, help="batch size (default 100)")
    parser.add_argument("--output", type=Path, help="where to write the JSON results")
    parser.add_argument(
        "--profile-emulator",
        type=Path,
        metavar="PATH",
        help="run the emulator under cProfile, writing its statistics to PATH",
    )
    args = parser.parse_args(argv)
    n = args.messages or (400 if args.quick else 2000)
    if n < 4 or n % 4:
        parser.error(f"--messages must be a positive multiple of 4, got {n}")
    if not 1 <= args.batch <= 4000:
        parser.error(f"--batch must be between 1 and 4000, got {args.batch}")
    if not Path("/proc/self/stat").exists():
        parser.error("this benchmark reads the emulator's CPU time from /proc (Linux only)")
    output = args.output or RESULTS / ("emulator.quick.json" if args.quick else "emulator.json")

    print(f"emulator benchmark: {n} messages a send phase, batches of {args.batch}")
    clients: dict[str, Any] = {}
    with emulator(args.profile_emulator) as (conn_str, pid):
        print("sync client (azure.servicebus.ServiceBusClient):")
        clients["sync"] = sync_phases(conn_str, pid, n, args.batch)
        print("asyncio client (azure.servicebus.aio.ServiceBusClient):")
        clients["asyncio"] = asyncio.run(async_phases(conn_str, pid, n, args.batch))
    ratios = {
        f"{client}.{phase}": figures["emulator_to_client_ratio"]
        for client, phases in clients.items()
        for phase, figures in phases.items()
    }
    result = {
        "benchmark": "emulator CPU per message beside the SDK client's",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/bench_emulator.py", *(argv or sys.argv[1:])]),
        "versions": versions(),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "parameters": {
            "messages_per_send_phase": n,
            "batch": args.batch,
            "body_bytes": len(BODY),
            "sessions": SESSIONS,
            "clients": "azure-servicebus sync and asyncio clients, one after the other, here",
            "emulator": "trio-sessions emulator, a child process",
            "cpu": "here: time.process_time (user/system: getrusage); emulator: "
            "/proc/<pid>/task/*/schedstat (user/system: /proc/<pid>/stat, in clock ticks)",
        },
        "clients": clients,
        "ratios": ratios,
        "emulator_below_client": all(r is not None and r < 1 for r in ratios.values()),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(output)
    verdict = "below" if result["emulator_below_client"] else "NOT below"
    print(f"emulator CPU per message is {verdict} the client's in every phase: {ratios}")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
