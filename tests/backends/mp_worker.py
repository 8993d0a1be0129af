"""A worker process for the multi-process test: one manager on AzureServiceBus.

Usage: ``python mp_worker.py CONN_STR QUEUE HISTORY_FILE``. Each handler call appends a
``start`` and an ``end`` JSON line to HISTORY_FILE (flushed at once, so a SIGKILL loses
at most the line being written); SIGTERM stops the manager gracefully.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import trio

from trio_sessions import (
    AzureServiceBus,
    ReceivedMessage,
    SessionContext,
    SessionManagerOptions,
    open_session_manager,
)


async def main(conn_str: str, queue: str, history_path: str) -> None:
    pid = os.getpid()
    with open(history_path, "a", buffering=1, encoding="utf-8") as history:  # noqa: ASYNC230 - line-buffered appends of a few bytes

        def record(kind: str, message: ReceivedMessage) -> None:
            entry: dict[str, Any] = {
                "kind": kind,
                "pid": pid,
                "session": message.session_id,
                "message_id": message.message_id,
                "sequence_number": message.sequence_number,
                "delivery_count": message.delivery_count,
                "time": time.monotonic(),  # CLOCK_MONOTONIC: one clock for all processes
            }
            history.write(json.dumps(entry) + "\n")

        async def handle(message: ReceivedMessage, context: SessionContext) -> None:
            record("start", message)
            await trio.sleep(0.001)
            record("end", message)

        options = SessionManagerOptions(
            max_concurrent_sessions=8, session_idle_timeout=0.3, accept_timeout=2.0
        )
        async with AzureServiceBus.from_connection_string(conn_str) as sb:
            async with open_session_manager(sb, queue_name=queue, options=options) as manager:
                async with trio.open_nursery() as nursery:

                    async def stop_on_sigterm() -> None:
                        with trio.open_signal_receiver(signal.SIGTERM) as signals:
                            async for _ in signals:
                                manager.stop()
                                return

                    nursery.start_soon(stop_on_sigterm)
                    print("ready", flush=True)
                    await manager.subscribe(handle)
                    nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3])
