"""Failures: a handler error is retried, a poison message is dead-lettered."""

from __future__ import annotations

import trio

from trio_sessions import (
    ErrorContext,
    MemoryBroker,
    Message,
    ReceivedMessage,
    SessionContext,
    open_session_manager,
)


async def main() -> None:
    broker = MemoryBroker()
    broker.create_queue("orders", max_delivery_count=3)
    await broker.send(
        "orders",
        [
            Message("created", session_id="order-1"),
            Message("paid", session_id="order-1"),
            Message("{not json", session_id="order-2"),
        ],
    )

    outcomes = 0

    async def process_message(message: ReceivedMessage, context: SessionContext) -> None:
        nonlocal outcomes
        if message.text() == "paid" and message.delivery_count == 0:
            raise RuntimeError("payment service busy")  # abandoned: delivered again
        try:
            event = message.json() if message.text().startswith("{") else message.text()
        except ValueError as exc:
            await context.dead_letter(message, reason="BadJson", error_description=str(exc))
        else:
            print(f"{context.session_id}: {event} (delivery {message.delivery_count})")
        outcomes += 1
        if outcomes == 3:
            manager.stop()

    async def process_error(error: ErrorContext) -> None:
        print(f"error in {error.session_id} ({error.source.name}): {error.error}")

    async with open_session_manager(broker, queue_name="orders") as manager:
        await manager.subscribe(process_message, process_error=process_error)

    for dead in broker.dead_letter_messages("orders"):
        print(f"dead-lettered {dead.text()!r}: {dead.dead_letter_reason}")


if __name__ == "__main__":
    trio.run(main)
