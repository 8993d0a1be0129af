"""Graceful shutdown: the first SIGINT or SIGTERM drains, a second one cancels."""

from __future__ import annotations

import signal

import trio

from trio_sessions import (
    MemoryBroker,
    Message,
    ReceivedMessage,
    SessionContext,
    SessionManager,
    SessionManagerOptions,
    open_session_manager,
)


async def stop_on_signals(manager: SessionManager, cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not manager.stopped():
                print(f"{signal.Signals(signum).name}: draining; send it again to cancel")
                manager.stop()  # handlers in flight get shutdown_timeout seconds
            else:
                cancel_scope.cancel()  # cancels the handlers at once


async def main() -> None:
    broker = MemoryBroker()
    broker.create_queue("jobs")
    await broker.send("jobs", [Message(f"job {n}", session_id=f"user-{n}") for n in range(3)])

    async def process_message(message: ReceivedMessage, context: SessionContext) -> None:
        await trio.sleep(1)  # the work
        print(f"{message.text()} done")

    options = SessionManagerOptions(shutdown_timeout=10)
    async with open_session_manager(broker, queue_name="jobs", options=options) as manager:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signals, manager, nursery.cancel_scope)
            await manager.subscribe(process_message)  # returns once drained
            nursery.cancel_scope.cancel()  # stop listening for signals
    print(f"stopped; {broker.active_message_count('jobs')} messages left")


if __name__ == "__main__":
    trio.run(main)
