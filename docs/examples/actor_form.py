"""The actor form: one call per session, with a running total kept in session state."""

from __future__ import annotations

import trio

from trio_sessions import (
    MemoryBroker,
    Message,
    SessionContext,
    SessionManagerOptions,
    open_session_manager,
)


async def main() -> None:
    broker = MemoryBroker()
    broker.create_queue("payments")
    await broker.send(
        "payments",
        [
            Message("10", session_id="account-a"),
            Message("5", session_id="account-b"),
            Message("20", session_id="account-a"),
        ],
    )

    finished = 0

    async def process_session(session: SessionContext) -> None:
        nonlocal finished
        state = await session.get_state()  # None the first time; kept across locks
        total = int(state or b"0")
        async for message in session:  # ends when the session has been idle for 1 s
            total += int(message.text())
            await session.set_state(str(total))
        print(f"{session.session_id}: total {total}")
        finished += 1
        if finished == 2:
            manager.stop()

    options = SessionManagerOptions(session_idle_timeout=1)
    async with open_session_manager(broker, queue_name="payments", options=options) as manager:
        await manager.subscribe_sessions(process_session)
        # The state stays readable for as long as the block is open, even after stop().
        print("account-a state:", await manager.get_state("account-a"))


if __name__ == "__main__":
    trio.run(main)
