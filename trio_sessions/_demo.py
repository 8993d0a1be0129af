"""``trio-sessions demo``: the document-editing use case of the SessionManager proposal.

N documents (sessions) each receive M ordered edits. The handler applies each edit to
the document text kept in the session state, recording the last applied edit there, so
an edit delivered again (after a failure) is applied once. With ``fail_rate`` the handler
raises at random, half the time before applying the edit and half the time after, to
show abandon and redelivery. At the end every document is verified: no edit lost, none
applied twice, all in order.
"""

from __future__ import annotations

import json
import random
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._manager import SessionManager, open_session_manager
from ._messages import Message, ReceivedMessage
from ._options import RetryPolicy, SessionManagerOptions
from .backends._memory import MemoryBroker

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._context import SessionContext

__all__ = ["DemoProgress", "DemoResult", "run_demo"]

QUEUE = "documents"


class PlannedFailure(Exception):
    """Raised by the demo handler on purpose, to show abandon and redelivery."""


@attrs.frozen(kw_only=True)
class DemoProgress:
    """A live view of the demo while it runs."""

    sessions_held: int
    edits_applied: int
    edits_sent: int
    messages_per_s: float
    redeliveries: int
    elapsed_s: float


@attrs.frozen(kw_only=True)
class DemoResult:
    """What the demo verified; ``ok`` only when nothing was lost, duplicated or reordered."""

    documents: int
    edits_sent: int
    edits_applied: int
    lost: int
    duplicates: int
    out_of_order: int
    redeliveries: int
    peak_sessions: int
    elapsed_s: float
    messages_per_s: float
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.lost == self.duplicates == self.out_of_order == 0

    def to_json(self) -> dict[str, Any]:
        """The figures as one JSON-ready object (``--json``)."""
        data = attrs.asdict(self)
        del data["problems"]
        data["ok"] = self.ok
        return data


def _edit_text(doc: int, seq: int) -> str:
    return f"[{doc}:{seq}]"


async def run_demo(
    *,
    documents: int = 50,
    edits: int = 20,
    concurrency: int = 8,
    fail_rate: float = 0.1,
    seed: int = 1,
    on_progress: Callable[[DemoProgress], None] | None = None,
    progress_interval: float = 0.25,
) -> DemoResult:
    """Send ``edits`` ordered edits to each of ``documents`` documents and process them."""
    rng = random.Random(seed)
    broker = MemoryBroker()
    broker.create_queue(QUEUE, lock_duration=30, max_delivery_count=1000)
    names = [f"doc-{d:04d}" for d in range(documents)]
    batch = [
        Message(
            json.dumps({"doc": d, "seq": seq, "text": _edit_text(d, seq)}),
            session_id=names[d],
            message_id=f"{names[d]}/{seq}",
            content_type="application/json",
        )
        for seq in range(1, edits + 1)
        for d in range(documents)
    ]
    for start in range(0, len(batch), 1000):
        await broker.send(QUEUE, batch[start : start + 1000])

    applications: dict[str, list[int]] = {name: [] for name in names}
    done_documents: set[str] = set()
    all_done = trio.Event()
    redeliveries = 0
    peak = 0

    held_by: list[SessionManager] = []

    async def apply_edit(message: ReceivedMessage, context: SessionContext) -> None:
        nonlocal redeliveries, peak
        peak = max(peak, held_by[0].stats().active_sessions)
        edit = message.json()
        if message.delivery_count > 0:
            redeliveries += 1
        if rng.random() < fail_rate / 2:
            raise PlannedFailure("failed before applying the edit")
        state = json.loads(await context.get_state() or b'{"applied": 0, "text": ""}')
        if edit["seq"] <= state["applied"]:
            return  # delivered again after it was applied: apply once
        state = {"applied": edit["seq"], "text": state["text"] + edit["text"]}
        await context.set_state(json.dumps(state))
        applications[context.session_id].append(edit["seq"])
        if edit["seq"] == edits:
            done_documents.add(context.session_id)
            if len(done_documents) == documents:
                all_done.set()
        if rng.random() < fail_rate / 2:
            raise PlannedFailure("failed after applying the edit")

    async def ignore_planned(error: object) -> None:
        """Planned failures are the point of the demo; they are counted, not printed."""

    options = SessionManagerOptions(
        max_concurrent_sessions=concurrency,
        session_idle_timeout=0.02,
        accept_timeout=1,
        retry=RetryPolicy(initial_delay=0.01, max_delay=0.5),
    )
    started = time.perf_counter()

    def progress(manager_stats_sessions: int) -> DemoProgress:
        elapsed = time.perf_counter() - started
        applied = sum(len(v) for v in applications.values())
        return DemoProgress(
            sessions_held=manager_stats_sessions,
            edits_applied=applied,
            edits_sent=len(batch),
            messages_per_s=applied / elapsed if elapsed else 0.0,
            redeliveries=redeliveries,
            elapsed_s=elapsed,
        )

    async with open_session_manager(broker, queue_name=QUEUE, options=options) as manager:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal peak
                while True:
                    held = manager.stats().active_sessions
                    peak = max(peak, held)
                    if on_progress is not None:
                        on_progress(progress(held))
                    await trio.sleep(progress_interval)

            held_by.append(manager)
            nursery.start_soon(watch)
            await nursery.start(
                lambda task_status: manager.subscribe(
                    apply_edit, process_error=ignore_planned, task_status=task_status
                )
            )
            await all_done.wait()
            manager.stop()
            nursery.cancel_scope.cancel()
    elapsed = time.perf_counter() - started
    if on_progress is not None:
        on_progress(progress(0))

    lost = duplicates = out_of_order = 0
    problems: list[str] = []
    for d, name in enumerate(names):
        applied = applications[name]
        missing = set(range(1, edits + 1)) - set(applied)
        twice = len(applied) - len(set(applied))
        state = json.loads(broker.session_state(QUEUE, name) or b'{"text": ""}')
        expected_text = "".join(_edit_text(d, seq) for seq in range(1, edits + 1))
        lost += len(missing)
        duplicates += twice
        if applied != sorted(applied) or state["text"] != expected_text:
            out_of_order += 1
        if missing or twice or applied != sorted(applied) or state["text"] != expected_text:
            problems.append(
                f"{name}: lost {sorted(missing)}, applied twice {twice}, order {applied}"
            )
    applied_total = sum(len(v) for v in applications.values())
    return DemoResult(
        documents=documents,
        edits_sent=len(batch),
        edits_applied=applied_total,
        lost=lost,
        duplicates=duplicates,
        out_of_order=out_of_order,
        redeliveries=redeliveries,
        peak_sessions=peak,
        elapsed_s=round(elapsed, 3),
        messages_per_s=round(applied_total / elapsed, 1) if elapsed else 0.0,
        problems=tuple(problems),
    )
