"""The Azure path (sdk scenario, goals P6-P8): not measured yet, a hook for it.

The scenario (issue #8): the manager on `AzureServiceBus` against the emulator
(`trio_sessions.testing`'s ``serve_emulator``), beside the raw asyncio SDK doing the same
work in its own process under plain asyncio (same sessions, same concurrency):
messages/s and client CPU per message, and the bridge cost per crossing. Goals::

    P6  <= 10 µs bridge cost per settlement, amortised
        (trio-asyncio crossing time per settlement: the manager's CPU per message on
        the Azure path, less the SDK's own CPU per message, over settlements per batch)
    P7  the manager adds <= 25 % to the SDK's own CPU per message
        (manager CPU/message ÷ raw SDK CPU/message - 1, the emulator's process excluded)
    P8  the Azure path reaches >= 0.8x the raw asyncio SDK's messages/s

It needs the Azure backend (``trio_sessions/backends/_azure.py``), which is being
written; until this scenario is written the script writes ``results/sdk.json`` with the goals
marked "not measured" (and why) and exits 0, so
``nox -s bench`` stays green. To build it: start ``serve_emulator`` in one process
(its CPU must not count as the client's), run the raw SDK workload in a child process
with ``asyncio.run`` (``ServiceBusClient.get_queue_receiver(session_id=NEXT_AVAILABLE_SESSION)``
per concurrent session, ``receive_messages`` + ``complete_message``), then the manager
with the no-op handler of ``_scenarios.run_manager``; compare with ``_common.timed``.

Run: ``python benchmarks/bench_sdk.py``.
"""

from __future__ import annotations

import time

import trio
from _common import parse_args, progress, write_results

from trio_sessions import AzureServiceBus

GOALS = {
    "P6": "≤ 10 µs bridge cost per settlement, amortised",
    "P7": "on the Azure path the manager adds ≤ 25 % to the SDK's own CPU per message",
    "P8": "the Azure path reaches ≥ 0.8x the raw asyncio SDK's messages/s",
}


def azure_backend_ready() -> str | None:
    """None if `AzureServiceBus` can be entered; otherwise why not."""

    async def probe() -> None:
        backend = AzureServiceBus.from_connection_string(
            "Endpoint=sb://localhost;SharedAccessKeyName=k;SharedAccessKey=k;"
            "UseDevelopmentEmulator=true"
        )
        async with backend:
            pass

    try:
        trio.run(probe)
    except NotImplementedError as exc:
        return str(exc)
    except Exception:
        return None  # it is implemented (nothing listens on that address)
    return None


def main() -> None:
    started = time.perf_counter()
    args = parse_args(__doc__.splitlines()[0])
    reason = azure_backend_ready() or (
        "the Azure backend can be entered now, but this scenario is not written yet "
        "(see benchmarks/bench_sdk.py's docstring)"
    )
    progress(f"sdk scenario not measured: {reason}")
    write_results(
        "sdk",
        args,
        parameters={},
        figures={},
        ratios={},
        goals=[
            {"goal": name, "text": text, "figure": None, "met": None, "note": reason}
            for name, text in GOALS.items()
        ],
        started=started,
    )


if __name__ == "__main__":
    main()
