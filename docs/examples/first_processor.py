"""A first session processor: six edits of three documents, on an in-process broker."""

from __future__ import annotations

import trio

from trio_sessions import (
    MemoryBroker,
    Message,
    ReceivedMessage,
    SessionContext,
    SessionManagerOptions,
    open_session_manager,
)


async def main() -> None:
    broker = MemoryBroker()
    broker.create_queue("edits")  # session-enabled, like a Service Bus queue with sessions
    await broker.send("edits", [Message(f"edit {n}", session_id=f"doc-{n % 3}") for n in range(6)])

    handled = 0

    async def process_message(message: ReceivedMessage, context: SessionContext) -> None:
        nonlocal handled
        print(f"{context.session_id}: {message.text()}")
        handled += 1
        if handled == 6:
            manager.stop()  # drain and return from subscribe

    options = SessionManagerOptions(max_concurrent_sessions=2, session_idle_timeout=1)
    async with open_session_manager(broker, queue_name="edits", options=options) as manager:
        await manager.subscribe(process_message)

    stats = manager.stats()
    print(f"completed {stats.messages_completed} messages in {stats.sessions_accepted} sessions")


if __name__ == "__main__":
    trio.run(main)
