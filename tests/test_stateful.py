"""A Hypothesis stateful test: random sends, handler outcomes, lock expiries and restarts.

Each example draws manager options, then a sequence of steps (send, let time pass,
expire a session lock, stop and restart the manager), each drawn with knowledge of the
state so far, and checks after every step that:

* nothing is lost: every sent message is completed, dead-lettered, expired, or still in
  the broker (available, locked or deferred), and none is completed twice;
* each session's messages are first delivered in send order;
* with one call per session, no two handler calls of a session overlap;
* no more than ``max_concurrent_sessions`` sessions are held at once.

At the end, time runs on until every message has settled: then nothing may be active but
deferred messages. Everything runs on the MockClock, so an example takes milliseconds.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import attrs
import hypothesis.strategies as st
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings

from trio_sessions import (
    ErrorContext,
    MemoryBroker,
    Message,
    ReceivedMessage,
    SessionContext,
    SessionManager,
    SessionManagerOptions,
    open_session_manager,
)

Q = "q"
LOCK = 10.0
OUTCOMES = ["return", "raise", "complete", "abandon", "dead_letter", "defer", "slow", "release"]


@attrs.define
class World:
    """What the test knows: what was sent, and what the handlers saw."""

    broker: MemoryBroker
    options: SessionManagerOptions
    sent: dict[str, str] = attrs.field(factory=dict)  # message id -> first-delivery outcome
    first_deliveries: dict[str, list[int]] = attrs.field(factory=lambda: defaultdict(list))
    in_flight: Counter[str] = attrs.field(factory=Counter)
    violations: list[str] = attrs.field(factory=list)
    manager: SessionManager | None = None

    def check(self) -> None:
        broker = self.broker
        assert self.violations == []
        completed = [m.message_id for m in broker.completed_messages(Q)]
        assert len(completed) == len(set(completed)), "a message was completed twice"
        ended = (
            completed
            + [m.message_id for m in broker.dead_letter_messages(Q)]
            + [m.message_id for m in broker.expired_messages(Q)]
            + [m.message_id for m in broker.active_messages(Q)]
        )
        assert Counter(ended) == Counter(self.sent.keys()), "a message was lost or duplicated"
        for sid, firsts in self.first_deliveries.items():
            # Sequence numbers are given in send order.
            assert firsts == sorted(firsts), f"session {sid} first deliveries out of order"
        held = len(broker.locked_sessions(Q))
        assert held <= self.options.max_concurrent_sessions

    async def handle(self, message: ReceivedMessage, context: SessionContext) -> None:
        sid = context.session_id
        self.in_flight[sid] += 1
        try:
            if self.in_flight[sid] > 1 and self.options.max_concurrent_calls_per_session == 1:
                self.violations.append(f"two calls of session {sid} at once")
            held = len(self.broker.locked_sessions(Q))
            if held > self.options.max_concurrent_sessions:
                self.violations.append(f"{held} sessions held")
            if message.delivery_count == 0:
                self.first_deliveries[sid].append(message.sequence_number)
            assert message.message_id is not None
            outcome = self.sent[message.message_id] if message.delivery_count == 0 else "return"
            await trio.sleep(0.1)
            if outcome == "raise":
                raise ValueError("planned failure")
            if outcome == "complete":
                await context.complete(message)
            elif outcome == "abandon":
                await context.abandon(message)
            elif outcome == "dead_letter":
                await context.dead_letter(message, reason="planned")
            elif outcome == "defer":
                await context.defer(message)
            elif outcome == "slow":
                await trio.sleep(LOCK * 2.5)
            elif outcome == "release":
                context.release()
        finally:
            self.in_flight[sid] -= 1


async def on_error(context: ErrorContext) -> None:
    """Reported errors are expected here (planned failures, lock losses)."""


async def scenario(data: st.DataObject) -> None:
    options = data.draw(
        st.builds(
            SessionManagerOptions,
            max_concurrent_sessions=st.integers(1, 4),
            prefetch_count=st.integers(0, 2),
            session_idle_timeout=st.sampled_from([1.0, 5.0]),
            max_auto_lock_renewal_duration=st.sampled_from([0.0, 15.0, math.inf]),
            shutdown_timeout=st.sampled_from([0.0, 3.0, 30.0]),
            accept_timeout=st.just(2.0),
        ),
        label="options",
    )
    broker = MemoryBroker(record_completed=True)
    broker.create_queue(Q, lock_duration=LOCK, max_delivery_count=5)
    world = World(broker, options)
    sessions = [f"s{i}" for i in range(data.draw(st.integers(1, 6), label="sessions"))]
    counter = 0

    async with trio.open_nursery() as nursery:
        stopped = trio.Event()

        async def run_manager(task_status: trio.TaskStatus[None]) -> None:  # noqa: ASYNC128
            nonlocal stopped
            stopped = trio.Event()
            async with open_session_manager(broker, queue_name=Q, options=options) as manager:
                world.manager = manager
                await manager.subscribe(
                    world.handle, process_error=on_error, task_status=task_status
                )
            stopped.set()  # subscribe returned: every session is closed

        await nursery.start(run_manager)
        steps = data.draw(st.integers(1, 12), label="steps")
        for _ in range(steps):
            step = data.draw(st.sampled_from(["send", "wait", "expire", "restart"]), label="step")
            if step == "send":
                batch = []
                for _ in range(data.draw(st.integers(1, 5), label="messages")):
                    sid = data.draw(st.sampled_from(sessions), label="session")
                    outcome = data.draw(st.sampled_from(OUTCOMES), label="outcome")
                    ttl = data.draw(st.sampled_from([None, None, 3.0]), label="ttl")
                    counter += 1
                    mid = f"m{counter}"
                    world.sent[mid] = outcome
                    batch.append(Message(mid, session_id=sid, message_id=mid, time_to_live=ttl))
                await broker.send(Q, batch)
            elif step == "wait":
                await trio.sleep(data.draw(st.sampled_from([0.05, 0.5, 3.0, 12.0]), label="wait"))
            elif step == "expire":
                locked = broker.locked_sessions(Q)
                if locked:
                    broker.expire_session_lock(Q, data.draw(st.sampled_from(locked), label="lock"))
                await trio.testing.wait_all_tasks_blocked()
            else:
                assert world.manager is not None
                world.manager.stop()
                with trio.fail_after(200):
                    await stopped.wait()
                await nursery.start(run_manager)
            world.check()
        # Let everything settle: no message may stay active unless deferred.
        await trio.sleep(600)
        world.check()
        active = broker.active_messages(Q)
        assert all(world.sent[m.message_id or ""] == "defer" for m in active), active
        assert world.manager is not None
        world.manager.stop()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(st.data())
def test_random_histories_keep_every_promise(data: st.DataObject) -> None:
    """Random sends, outcomes, expiries and restarts never lose, reorder or double-hold."""
    trio.run(scenario, data, clock=trio.testing.MockClock(autojump_threshold=0))
