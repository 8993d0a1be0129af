"""The chaos history checker on hand-made histories: each violation kind, and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest

from trio_sessions import (
    ErrorContext,
    ErrorSource,
    MemoryBroker,
    Message,
    ServiceBusConnectionError,
    SessionLockLostError,
)
from trio_sessions._chaos import (
    BrokerState,
    Call,
    Fault,
    History,
    HistoryWriter,
    Outcome,
    Recorder,
    check_history,
    read_history,
)
from trio_sessions._messages import EntityPath

SENT = {"m1": "s1", "m2": "s1", "m3": "s2"}
ALL_DONE = BrokerState(completed=("m1", "m2", "m3"), dead_lettered=frozenset(), active=frozenset())


def call(
    mid: str,
    start: float,
    end: float | None,
    *,
    outcome: Outcome = Outcome.OK,
    process: str = "p1",
    count: int = 0,
) -> Call:
    sid = SENT[mid]
    seq = int(mid[1:])
    return Call(
        process=process,
        session_id=sid,
        message_id=mid,
        sequence_number=seq,
        delivery_count=count,
        start=start,
        end=end,
        outcome=outcome,
    )


def clean_calls() -> list[Call]:
    return [call("m1", 0, 1), call("m2", 1, 2), call("m3", 0.5, 3, process="p2")]


def test_a_clean_history_passes() -> None:
    """Every message handled once, in order, one call per session at a time: no finding."""
    report = check_history(History(clean_calls()), SENT, ALL_DONE)
    assert report.ok
    assert report.summary() == {
        "messages": 3,
        "sessions": 2,
        "handler_calls": 3,
        "faults": {},
        "faults_total": 0,
        "observed": {},
        "lost": 0,
        "unfinished": 0,
        "overlaps": 0,
        "overlaps_unexplained": 0,
        "overlap_causes": {},
        "order_violations": 0,
        "duplicates": 0,
        "duplicate_causes": {},
    }


def test_lost_messages_are_found() -> None:
    """A message neither settled nor still in the broker is lost; one still there is not."""
    final = BrokerState(completed=("m1",), dead_lettered=frozenset({"m3"}), active=frozenset())
    report = check_history(History(clean_calls()), SENT, final)
    assert report.lost == ("m2",)
    assert not report.ok
    waiting = BrokerState(
        completed=("m1",), dead_lettered=frozenset({"m3"}), active=frozenset({"m2"})
    )
    report = check_history(History(clean_calls()), SENT, waiting)
    assert report.lost == ()
    assert report.unfinished == ("m2",)
    assert report.ok


def test_overlaps_across_processes_are_found() -> None:
    """Two calls of one session at once, in two processes, are an overlap."""
    calls = [call("m1", 0, 2), call("m2", 1, 3, process="p2"), call("m3", 0, 1)]
    report = check_history(History(calls), SENT, ALL_DONE)
    assert [(o.first.message_id, o.second.message_id) for o in report.overlaps] == [("m1", "m2")]
    assert not report.ok


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        (Fault(kind="cut_connections", time=0.5), "cut_connections"),
        (Fault(kind="connection_failed", time=0.5), "connection_failed"),
        (Fault(kind="expire_lock", time=0.5, session_id="s1"), "expire_lock"),
        (Fault(kind="expire_lock", time=0.5, session_id="s2"), None),  # another session
        (Fault(kind="cut_connections", time=0.5, process="p2"), None),  # not the holder's
        (Fault(kind="cut_connections", time=1.5), None),  # after the second call began
        (Fault(kind="lock_lost", time=0.5, process="p1", session_id="s1"), None),  # observed
    ],
)
def test_forced_releases_explain_overlaps(fault: Fault, cause: str | None) -> None:
    """An overlap after the broker took the lock from the running call has that cause."""
    calls = [call("m1", 0, 2), call("m2", 1, 3, process="p2"), call("m3", 0, 1)]
    report = check_history(History(calls, [fault]), SENT, ALL_DONE)
    assert [o.cause for o in report.overlaps] == [cause]
    assert report.ok is (cause is not None)
    assert report.summary()["overlap_causes"] == {cause or "unexplained": 1}
    assert report.summary()["overlaps_unexplained"] == (cause is None)


def test_back_to_back_calls_do_not_overlap() -> None:
    """A call that starts the moment the previous one ends is no overlap."""
    calls = [call("m1", 0, 1), call("m2", 1, 2, process="p2")]
    assert check_history(History(calls), SENT, ALL_DONE).overlaps == ()


def test_a_killed_call_runs_until_the_kill() -> None:
    """A call without an end lasts until its process is killed, or forever if never killed."""
    calls = [call("m1", 0, None, outcome=Outcome.KILLED), call("m2", 5, 6, process="p2")]
    killed = [Fault(kind="kill", time=4.0, process="p1")]
    assert check_history(History(calls, killed), SENT, ALL_DONE).overlaps == ()
    late_kill = [Fault(kind="kill", time=5.5, process="p1")]
    assert len(check_history(History(calls, late_kill), SENT, ALL_DONE).overlaps) == 1
    assert len(check_history(History(calls), SENT, ALL_DONE).overlaps) == 1


def test_first_deliveries_out_of_order_are_found() -> None:
    """m2 handled before m1 (sent first) in the same session is an order violation."""
    calls = [call("m2", 0, 1), call("m1", 1, 2), call("m3", 0, 1)]
    report = check_history(History(calls), SENT, ALL_DONE)
    assert [(v.call.message_id, v.after_sequence_number) for v in report.order_violations] == [
        ("m1", 2)
    ]
    assert not report.ok


def test_redeliveries_do_not_count_as_order_violations() -> None:
    """m1 raising, m2 handled, then m1 again would be wrong order only for first deliveries."""
    calls = [
        call("m1", 0, 1, outcome=Outcome.RAISED),
        call("m1", 1, 2, count=1),
        call("m2", 2, 3),
        call("m3", 0, 1),
    ]
    report = check_history(History(calls), SENT, ALL_DONE)
    assert report.order_violations == ()
    assert report.duplicates == ()


def test_unexplained_duplicates_are_violations() -> None:
    """A message processed to its end twice with no lock loss in between is unexplained."""
    calls = [*clean_calls(), call("m1", 5, 6, count=1, process="p2")]
    report = check_history(History(calls), SENT, ALL_DONE)
    assert [(d.message_id, d.cause) for d in report.duplicates] == [("m1", None)]
    assert report.unexplained_duplicates == report.duplicates
    assert not report.ok
    assert report.summary()["duplicate_causes"] == {"unexplained": 1}


@pytest.mark.parametrize(
    ("fault", "explained"),
    [
        (Fault(kind="expire_lock", time=1.5, session_id="s1"), True),
        (Fault(kind="lock_lost", time=1.5, process="p1", session_id="s1"), True),
        (Fault(kind="complete_failed", time=1.5, process="p1", session_id="s1"), True),
        (Fault(kind="kill", time=1.5, process="p1"), True),
        (Fault(kind="cut_connections", time=1.5), True),
        (Fault(kind="expire_lock", time=1.5, session_id="s2"), False),  # another session
        (Fault(kind="kill", time=1.5, process="p2"), False),  # another process
        (Fault(kind="expire_lock", time=-1.0, session_id="s1"), False),  # before the call
        (Fault(kind="expire_lock", time=7.0, session_id="s1"), False),  # after redelivery
        (Fault(kind="raise", time=1.5, process="p1", session_id="s1"), False),  # no lock loss
    ],
)
def test_duplicates_need_a_lock_loss_in_between(fault: Fault, explained: bool) -> None:
    """A duplicate is explained only by a lock loss of its process and session, in time."""
    calls = [*clean_calls(), call("m1", 5, 6, count=1, process="p2")]
    report = check_history(History(calls, [fault]), SENT, ALL_DONE)
    assert len(report.duplicates) == 1
    assert report.duplicates[0].cause == (fault.kind if explained else None)
    assert report.ok is explained


def test_a_loss_observed_late_by_the_holder_explains() -> None:
    """A lock loss the holder reports after the redelivery began still explains, unless
    the holder had begun another call of that session before reporting it."""
    calls = [
        call("m1", 0, 1),
        call("m1", 2, 3, count=1, process="p2"),
        call("m2", 3, 4, process="p2"),
        call("m3", 0, 1),
    ]
    late = [Fault(kind="complete_failed", time=2.5, process="p1", session_id="s1")]
    assert check_history(History(calls, late), SENT, ALL_DONE).ok
    injected_late = [Fault(kind="expire_lock", time=2.5, session_id="s1")]
    assert not check_history(History(calls, injected_late), SENT, ALL_DONE).ok
    busy_holder = [*calls, call("m2", 1.5, 1.8, count=1)]  # p1 went on with s1 meanwhile
    report = check_history(History(busy_holder, late), SENT, ALL_DONE)
    # The report now explains the later call (m2), not the one before it (m1).
    assert [(d.message_id, d.cause) for d in report.duplicates] == [
        ("m1", None),
        ("m2", "complete_failed"),
    ]


def test_double_completion_in_the_broker_is_unexplained() -> None:
    """The broker completing one message twice is a duplicate nothing explains."""
    final = BrokerState(
        completed=("m1", "m2", "m3", "m2"), dead_lettered=frozenset(), active=frozenset()
    )
    report = check_history(History(clean_calls()), SENT, final)
    assert [(d.message_id, d.cause) for d in report.duplicates] == [("m2", None)]
    assert not report.ok


def test_faults_are_counted_by_kind_without_observed_losses() -> None:
    """The report counts injected faults by kind, not those a worker observed."""
    faults = [
        Fault(kind="kill", time=1, process="p1"),
        Fault(kind="kill", time=2, process="p2"),
        Fault(kind="cut_connections", time=3),
        Fault(kind="lock_lost", time=3, process="p1", session_id="s1"),
        Fault(kind="complete_failed", time=3, process="p1", session_id="s1"),
    ]
    summary = check_history(History(clean_calls(), faults), SENT, ALL_DONE).summary()
    assert summary["faults"] == {"cut_connections": 1, "kill": 2}
    assert summary["faults_total"] == 3
    assert summary["observed"] == {"complete_failed": 1, "lock_lost": 1}


def test_jsonl_round_trip_with_a_torn_last_line(tmp_path: Path) -> None:
    """Written histories read back; a start without an end is a killed call; a torn tail is skipped."""
    path = tmp_path / "p1.jsonl"
    with path.open("w", encoding="utf-8") as file:
        writer = HistoryWriter(file, "p1")
        first = writer.start(
            session_id="s1", message_id="m1", sequence_number=1, delivery_count=0, start=0.0
        )
        writer.end(first, end=1.0, outcome=Outcome.OK)
        writer.start(
            session_id="s1", message_id="m2", sequence_number=2, delivery_count=0, start=1.0
        )
        writer.fault(Fault(kind="lock_lost", time=1.5, process="p1", session_id="s1"))
        file.write('{"type": "end", "id"')  # SIGKILL mid-write
    history = read_history([path])
    assert history.calls == [
        call("m1", 0.0, 1.0),
        call("m2", 1.0, None, outcome=Outcome.KILLED),
    ]
    assert history.faults == [Fault(kind="lock_lost", time=1.5, process="p1", session_id="s1")]
    assert json.loads(json.dumps(history.calls[0].to_json()))["outcome"] == "ok"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            'nonsense\n{"type": "fault", "kind": "kill", "time": 1}\n',
            "p.jsonl:1: not a JSON record",
        ),
        ('{"type": "other"}\n', "unknown record type 'other'"),
    ],
)
def test_corrupt_histories_are_refused(tmp_path: Path, text: str, match: str) -> None:
    """A bad line that is not the last, or an unknown record type, is an error naming the line."""
    path = tmp_path / "p.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        read_history([path])


async def test_broker_state_reads_the_memory_broker() -> None:
    """BrokerState.of lists completed, dead-lettered and active message ids."""
    broker = MemoryBroker(record_completed=True)
    broker.create_queue("q", max_delivery_count=1)
    await broker.send("q", [Message(b"", session_id="s", message_id=f"m{i}") for i in range(3)])
    link = await broker.accept_session(EntityPath(queue_name="q"), "s")
    first, second = await link.receive(2)
    await link.complete(first)
    await link.abandon(second)  # max_delivery_count=1: dead-lettered
    await link.aclose()
    state = BrokerState.of(broker, "q")
    assert state == BrokerState(
        completed=("m0",), dead_lettered=frozenset({"m1"}), active=frozenset({"m2"})
    )


async def test_recorder_writes_calls_and_observed_faults(tmp_path: Path) -> None:
    """A Recorder with a writer puts each call and each observed lock loss in the JSONL file."""
    broker = MemoryBroker(record_completed=True)
    broker.create_queue("q")
    await broker.send("q", Message(b"", session_id="s1", message_id="m1"))
    path = tmp_path / "p1.jsonl"
    with path.open("w", encoding="utf-8") as file:
        recorder = Recorder("p1", writer=HistoryWriter(file, "p1"), clock=lambda: 7.0)
        link = await broker.accept_session(EntityPath(queue_name="q"), "s1")
        (message,) = await link.receive(1)
        await recorder.process_message(message, _Context("s1"))  # type: ignore[arg-type]
        for error, source in [
            (SessionLockLostError("lost"), ErrorSource.RENEW_LOCK),
            (ServiceBusConnectionError("cut"), ErrorSource.COMPLETE),
            (ServiceBusConnectionError("cut"), ErrorSource.RECEIVE),  # not recorded
        ]:
            await recorder.process_error(
                ErrorContext(error=error, source=source, session_id="s1", entity_path="q")
            )
        await link.aclose()
    history = read_history([path])
    assert history == recorder.history
    assert [c.outcome for c in history.calls] == [Outcome.OK]
    assert [f.kind for f in history.faults] == ["lock_lost", "complete_failed"]


@attrs.define
class _Context:
    session_id: str
