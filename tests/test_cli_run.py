"""``trio-sessions run MODULE:HANDLER``: end to end on the emulator, in subprocesses.

The emulator runs in the test process (so the MemoryBroker behind it can be inspected);
``python -m trio_sessions run`` runs as a real process with real signals. The handler
module is written to ``tmp_path`` (the subprocess's working directory) and records what
it handled to a file; the tests wait for the lines the runner and the handlers print,
never for time to pass.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from trio_sessions import MemoryBroker, Message, ReceiveMode, RetryPolicy, SessionManagerOptions
from trio_sessions._cli import main
from trio_sessions._run import (
    Connection,
    Entity,
    JsonFormatter,
    LiveStatusHandler,
    Runner,
    load_handler,
    mask_secrets,
    status_fields,
    status_text,
)
from trio_sessions._stats import ManagerStats
from trio_sessions.emulator import Emulator, serve_emulator

pytest.importorskip("proton")

HANDLER_MODULE = "tests_handler_module"
HANDLERS = '''
"""Handlers for tests/test_cli_run.py: each records what it handled to $RUN_RECORD."""

import os
import pathlib

import trio

RECORD = pathlib.Path(os.environ["RUN_RECORD"])
GO = RECORD.with_suffix(".go")


def record(line):
    with RECORD.open("a") as file:
        file.write(line + "\\n")


async def handle(message, context):
    """Waits until the test creates the .go file, so that it is in flight on a signal."""
    record(f"start {context.session_id} {message.text()}")
    print(f"handling {context.session_id} {message.text()}", flush=True)
    while not GO.exists():
        await trio.sleep(0.01)
    record(f"done {context.session_id} {message.text()}")


async def quick(message, context):
    record(f"done {context.session_id} {message.text()}")
    print(f"handled {context.session_id} {message.text()}", flush=True)


async def actor(session):
    async for message in session:
        record(f"actor {session.session_id} {message.text()}")
        print(f"actor {session.session_id} {message.text()}", flush=True)


async def flaky(message, context):
    """Raises on a message's first delivery, handles it on the second."""
    if message.delivery_count == 0:
        raise RuntimeError(f"first try of {message.text()}")
    record(f"done {context.session_id} {message.text()} {message.delivery_count}")
    print(f"handled {context.session_id} {message.text()}", flush=True)


def sync_handler(message, context):
    pass
'''
#: Short real durations: the emulator runs over real sockets.
FAST = ["--session-idle-timeout", "0.2", "--accept-timeout", "1", "--sdk-retry-total", "0"]
CEILING = 60


@attrs.define
class Lines:
    """The lines a process writes to one pipe, as they come."""

    lines: list[str] = attrs.field(factory=list)
    changed: trio.Event = attrs.field(factory=trio.Event)
    closed: trio.Event = attrs.field(factory=trio.Event)

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        async for chunk in stream:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            self.lines.extend(line.decode() for line in complete)
            self.changed.set()
            self.changed = trio.Event()
        if pending:
            self.lines.append(pending.decode())
        self.closed.set()
        self.changed.set()

    async def wait_for(self, text: str, count: int = 1) -> list[str]:
        """Wait until ``count`` lines contain ``text``; return them."""
        while True:
            found = [line for line in self.lines if text in line]
            if len(found) >= count:
                return found
            if self.closed.is_set():
                raise AssertionError(f"{text!r} never came; got:\n" + "\n".join(self.lines))
            await self.changed.wait()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@attrs.define
class RunProcess:
    process: trio.Process
    out: Lines
    err: Lines
    record: Path

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def exit_code(self) -> int:
        code = await self.process.wait()
        await self.out.closed.wait()
        await self.err.closed.wait()
        return code

    def recorded(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []

    def release_handlers(self) -> None:
        self.record.with_suffix(".go").touch()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / f"{HANDLER_MODULE}.py").write_text(HANDLERS)
    return tmp_path


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    broker = MemoryBroker()
    broker.create_queue("q", lock_duration=10)
    broker.create_queue("plain", requires_session=False)
    async with serve_emulator(broker) as served:
        yield served


@asynccontextmanager
async def run_command(workdir: Path, *args: str) -> AsyncIterator[RunProcess]:
    env = {**os.environ, "RUN_RECORD": str(workdir / "record.txt")}
    env.pop("SERVICEBUS_CONNECTION_STR", None)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_sessions", "run", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=workdir,
        env=env,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    run = RunProcess(process, Lines(), Lines(), workdir / "record.txt")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run.out.pump, process.stdout)
        nursery.start_soon(run.err.pump, process.stderr)
        try:
            yield run
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 10):
                await process.wait()


async def test_first_sigint_drains_and_exits_0(workdir: Path, emulator: Emulator) -> None:
    """In-flight handlers finish after SIGINT; no new session is accepted; exit 0."""
    broker = emulator.broker
    await broker.send("q", [Message(f"m-{sid}", session_id=sid) for sid in "abcd"])
    with trio.fail_after(CEILING):
        async with run_command(
            workdir,
            f"{HANDLER_MODULE}:handle",
            "--queue",
            "q",
            "--connection-string",
            emulator.connection_string,
            "--max-concurrent-sessions",
            "2",
            *FAST,
        ) as run:
            await run.err.wait_for("subscribed to queue 'q'")
            await run.out.wait_for("handling", count=2)  # sessions a and b are in flight
            run.signal(signal.SIGINT)
            await run.err.wait_for("SIGINT: draining")
            run.release_handlers()
            code = await run.exit_code()
    assert code == 0, run.err.text
    assert sorted(line for line in run.recorded() if line.startswith("done")) == [
        "done a m-a",
        "done b m-b",
    ]
    assert broker.active_message_count("q") == 2  # c and d were never accepted
    assert "stopped after" in run.err.text
    assert "completed 2" in run.err.text
    assert emulator.key not in run.err.text


async def test_second_signal_cancels(workdir: Path, emulator: Emulator) -> None:
    """A second signal cancels the handlers at once; exit 128 + its number; nothing lost."""
    broker = emulator.broker
    await broker.send("q", Message("stuck", session_id="a"))
    with trio.fail_after(CEILING):
        async with run_command(
            workdir,
            f"{HANDLER_MODULE}:handle",
            "--queue",
            "q",
            "--connection-string",
            emulator.connection_string,
            *FAST,
        ) as run:
            await run.out.wait_for("handling a stuck")
            run.signal(signal.SIGINT)
            await run.err.wait_for("SIGINT: draining")
            run.signal(signal.SIGTERM)
            code = await run.exit_code()
    assert code == 128 + signal.SIGTERM, run.err.text
    assert "SIGTERM again: cancelling 1 handler call(s)" in run.err.text
    assert run.recorded() == ["start a stuck"]
    assert broker.active_message_count("q") == 1  # given back, not lost
    assert broker.dead_letter_messages("q") == []


async def test_shutdown_timeout_cancels_slow_handlers(workdir: Path, emulator: Emulator) -> None:
    """A handler still running when --shutdown-timeout ends is cancelled: a warning, exit 0."""
    broker = emulator.broker
    await broker.send("q", Message("slow", session_id="a"))
    with trio.fail_after(CEILING):
        async with run_command(
            workdir,
            f"{HANDLER_MODULE}:handle",
            "--queue",
            "q",
            "--connection-string",
            emulator.connection_string,
            "--shutdown-timeout",
            "0.2",
            *FAST,
        ) as run:
            await run.out.wait_for("handling a slow")
            run.signal(signal.SIGTERM)
            code = await run.exit_code()
    assert code == 0, run.err.text
    assert "shutdown_timeout (0.2 s) ended with 1 handler call(s) in flight" in run.err.text
    assert run.recorded() == ["start a slow"]
    assert broker.active_message_count("q") == 1


async def test_subscription_and_handler_errors(workdir: Path, emulator: Emulator) -> None:
    """--topic/--subscription reads a subscription; a handler error is logged, then retried."""
    broker = emulator.broker
    broker.create_topic("t")
    broker.create_subscription("t", "s")
    await broker.send("t", [Message("one", session_id="a"), Message("two", session_id="b")])
    with trio.fail_after(CEILING):
        async with run_command(
            workdir,
            f"{HANDLER_MODULE}:flaky",
            "--topic",
            "t",
            "--subscription",
            "s",
            "--connection-string",
            emulator.connection_string,
            *FAST,
        ) as run:
            await run.err.wait_for("subscribed to subscription 's' of topic 't'")
            await run.out.wait_for("handled", count=2)
            run.signal(signal.SIGINT)
            code = await run.exit_code()
    assert code == 0, run.err.text
    assert sorted(run.recorded()) == ["done a one 1", "done b two 1"]
    assert broker.active_message_count("t/subscriptions/s") == 0
    assert "handler raised in session a of t/subscriptions/s" in run.err.text
    assert "RuntimeError: first try of one" in run.err.text  # with its traceback
    assert "received 4, completed 2, abandoned 2, errors 2" in run.err.text


async def test_wrong_key_is_fatal_with_a_hint(workdir: Path, emulator: Emulator) -> None:
    """A refused key: exit 1 and one line naming the Listen claim; no key is printed."""
    conn_str = emulator.connection_string.replace(emulator.key, "not-the-key")
    with trio.fail_after(CEILING):
        async with run_command(
            workdir,
            f"{HANDLER_MODULE}:quick",
            "--queue",
            "q",
            "--connection-string",
            conn_str,
            *FAST,
        ) as run:
            code = await run.exit_code()
    assert code == 1, run.err.text
    (hint,) = [line for line in run.err.lines if "trio_sessions.run" in line and "ERROR" in line]
    assert "access to queue 'q'" in hint
    assert "was refused" in hint
    assert "the SAS policy has the Listen claim" in hint
    assert "'Azure Service Bus Data Receiver' role" in hint
    assert "not-the-key" not in run.err.text
    assert emulator.key not in run.err.text


@pytest.mark.parametrize(
    ("entity", "expected"),
    [
        (["--queue", "nope"], "queue 'nope' was not found in namespace 127.0.0.1:"),
        (["--queue", "plain"], "queue 'plain' in namespace 127.0.0.1:"),
    ],
)
async def test_unknown_or_sessionless_entity_is_fatal(
    workdir: Path, emulator: Emulator, entity: list[str], expected: str
) -> None:
    """An unknown queue, or one without sessions: exit 1 with one line naming it."""
    with trio.fail_after(CEILING):
        async with run_command(
            workdir,
            f"{HANDLER_MODULE}:quick",
            *entity,
            "--connection-string",
            emulator.connection_string,
            *FAST,
        ) as run:
            code = await run.exit_code()
    assert code == 1, run.err.text
    (hint,) = [line for line in run.err.lines if "trio_sessions.run" in line and "ERROR" in line]
    assert expected in hint
    if entity[1] == "nope":
        assert "check the name (--queue) and the namespace (--connection-string)" in hint
    else:
        assert "does not have sessions enabled" in hint


async def test_actor_form_and_json_logs(workdir: Path, emulator: Emulator) -> None:
    """--sessions runs process_session per session, in order; --log-format json is JSON."""
    broker = emulator.broker
    await broker.send("q", [Message(f"x{n}", session_id="x") for n in range(3)])
    await broker.send("q", [Message(f"y{n}", session_id="y") for n in range(2)])
    with trio.fail_after(CEILING):
        async with run_command(
            workdir,
            f"{HANDLER_MODULE}:actor",
            "--sessions",
            "--queue",
            "q",
            "--connection-string",
            emulator.connection_string,
            "--log-format",
            "json",
            "--status-interval",
            "0.1",
            *FAST,
        ) as run:
            await run.out.wait_for("actor", count=5)
            await run.err.wait_for('"status: sessions held')
            run.signal(signal.SIGTERM)
            code = await run.exit_code()
    assert code == 0, run.err.text
    recorded = run.recorded()
    assert [line for line in recorded if " x " in line] == [f"actor x x{n}" for n in range(3)]
    assert [line for line in recorded if " y " in line] == [f"actor y y{n}" for n in range(2)]
    assert broker.active_message_count("q") == 0
    records = [json.loads(line) for line in run.err.lines if line]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    messages = [r["message"] for r in records]
    assert any(m.startswith("subscribed to queue 'q'") and "(actor form)" in m for m in messages)
    status = next(r for r in records if r["message"].startswith("status:"))
    assert status["max_concurrent_sessions"] == 8
    assert {"sessions_held", "messages_per_s", "messages_completed", "errors"} <= set(status)
    assert any(r["message"].startswith("SIGTERM: draining") for r in records)


async def test_live_status_line_on_a_terminal(workdir: Path, emulator: Emulator) -> None:
    """With stderr on a terminal, a status line is redrawn in place under the log lines."""
    await emulator.broker.send("q", Message("m", session_id="a"))
    master, slave = os.openpty()
    env = {**os.environ, "RUN_RECORD": str(workdir / "record.txt")}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_sessions", "run", f"{HANDLER_MODULE}:quick", "--queue", "q",
         "--connection-string", emulator.connection_string, *FAST],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, cwd=workdir, env=env,
    )  # fmt: skip
    os.close(slave)
    seen = b""
    try:
        with trio.fail_after(CEILING):
            async with trio.lowlevel.FdStream(master) as terminal:
                while b"\r\x1b[Ksessions held" not in seen:
                    seen += await terminal.receive_some()
                process.send_signal(signal.SIGINT)
                with contextlib.suppress(trio.BrokenResourceError, OSError):
                    while chunk := await terminal.receive_some():  # EIO once the child exits
                        seen += chunk
                code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert code == 0, seen.decode(errors="replace")
    text = seen.decode()
    assert "completed 1 | errors 0" in text
    # A log record clears the status line, is written, and the status line comes back.
    assert re.search(r"\r\x1b\[K[^\r\n]* SIGINT: draining[^\r\n]*\r?\nsessions held", text)


BAD_MODULES = {
    "broken_import": "import trio\nundefined_name + 1\n",
    "broken_syntax": "async def handle(message, context)\n    pass\n",
}


@pytest.mark.parametrize(
    ("target", "extra", "expected"),
    [
        ("no_such_module:handle", [], "cannot import module 'no_such_module': no module named"),
        (
            "broken_import:handle",
            [],
            "cannot import module 'broken_import': NameError: name 'undefined_name' is not defined",
        ),
        ("broken_syntax:handle", [], "cannot import module 'broken_syntax': SyntaxError"),
        (
            f"{HANDLER_MODULE}:missing",
            [],
            f"module '{HANDLER_MODULE}' has no attribute 'missing' "
            "(its async functions: actor, flaky, handle, quick)",
        ),
        (
            f"{HANDLER_MODULE}:sync_handler",
            [],
            "must be an async function, async def handler(message, context); "
            "it is a regular (sync) function",
        ),
        (f"{HANDLER_MODULE}:actor", [], "(it takes (session): run it with --sessions)"),
        (
            f"{HANDLER_MODULE}:handle",
            ["--sessions"],
            "(it takes (message, context): run it without --sessions)",
        ),
        (f"{HANDLER_MODULE}:RECORD", [], "must be an async function"),
        (HANDLER_MODULE, [], "expected MODULE:HANDLER"),
    ],
)
async def test_bad_handler_exits_2(
    workdir: Path, target: str, extra: list[str], expected: str
) -> None:
    """A module that fails to import, a missing attribute, a wrong kind: one line, exit 2."""
    for name, source in BAD_MODULES.items():
        (workdir / f"{name}.py").write_text(source)
    conn_str = "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;SharedAccessKey=secret"
    with trio.fail_after(CEILING):
        async with run_command(
            workdir, target, "--queue", "q", "--connection-string", conn_str, *extra
        ) as run:
            code = await run.exit_code()
    assert code == 2
    assert len(run.err.lines) == 1, run.err.text
    assert run.err.lines[0].startswith("trio-sessions run: ")
    assert expected in run.err.text
    assert "secret" not in run.err.text


# ------------------------------------------------------------------- in-process: usage


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--queue", "q", "--topic", "t"], "give either --queue, or --topic with --subscription"),
        (["--topic", "t"], "--topic needs --subscription NAME"),
        (["--subscription", "s"], "--subscription needs --topic NAME"),
        ([], "name the entity: --queue NAME"),
        (
            ["--queue", "q", "--max-concurrent-sessions", "0"],
            "--max-concurrent-sessions: max_concurrent_sessions must be >= 1, got 0",
        ),
        (
            ["--queue", "q", "--session-idle-timeout", "0"],
            "--session-idle-timeout: session_idle_timeout must be > 0",
        ),
        (
            ["--queue", "q", "--session-id", "a", "--session-id", "a"],
            "--session-id: session_ids must not repeat an id",
        ),
        (
            ["--queue", "q", "--retry-max-delay", "0.1"],
            "--retry-max-delay: max_delay must be >= initial_delay (0.5), got 0.1",
        ),
        (["--queue", "q", "--retry-jitter", "2"], "--retry-jitter: jitter must be between 0 and 1"),
        (
            ["--queue", "q", "--receive-and-delete", "--prefetch-count", "3"],
            "--prefetch-count must be 0 with --receive-and-delete",
        ),
        (["--queue", "q", "--status-interval", "-1"], "--status-interval must be >= 0"),
        (["--queue", "q", "--sdk-retry-total", "-1"], "--sdk-retry-total must be >= 0"),
        (
            ["--queue", "q", "--connection-string", "x", "--namespace", "n"],
            "give --connection-string or --namespace, not both",
        ),
        (
            ["--queue", "q"],
            "no connection: give --connection-string, set $SERVICEBUS_CONNECTION_STR",
        ),
        (
            ["--queue", "q", "--connection-string", "Endpoint=sb://h/;SharedAccessKey=hunter2"],
            "bad connection string in --connection-string: the connection string has no "
            "SharedAccessKeyName part",
        ),
        (["--queue", "q", "--namespace", "sb://a/b"], "--namespace must be a namespace name"),
    ],
)
def test_usage_errors_exit_2(
    flags: list[str],
    expected: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bad flags are one line naming the flag, exit code 2, before anything connects."""
    monkeypatch.delenv("SERVICEBUS_CONNECTION_STR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "m:h", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("trio-sessions run: ")
    assert expected in err
    assert "hunter2" not in err


def test_every_option_is_a_flag() -> None:
    """Each SessionManagerOptions field (and RetryPolicy's) is set by its flag."""
    from trio_sessions._cli import _parser
    from trio_sessions._run import build_options

    args = _parser().parse_args(
        ["run", "m:h", "--queue", "q",
         "--max-concurrent-sessions", "3", "--max-concurrent-calls-per-session", "2",
         "--session-idle-timeout", "1.5", "--max-auto-lock-renewal-duration", "inf",
         "--no-auto-complete", "--prefetch-count", "4", "--session-id", "a", "--session-id", "b",
         "--accept-timeout", "5", "--shutdown-timeout", "7",
         "--retry-initial-delay", "1", "--retry-max-delay", "9", "--retry-multiplier", "3",
         "--retry-jitter", "0"]
    )  # fmt: skip
    assert build_options(args) == SessionManagerOptions(
        max_concurrent_sessions=3,
        max_concurrent_calls_per_session=2,
        session_idle_timeout=1.5,
        max_auto_lock_renewal_duration=float("inf"),
        auto_complete=False,
        prefetch_count=4,
        session_ids=("a", "b"),
        accept_timeout=5.0,
        shutdown_timeout=7.0,
        retry=RetryPolicy(initial_delay=1, max_delay=9, multiplier=3, jitter=0),
    )
    defaults = _parser().parse_args(["run", "m:h", "--queue", "q"])
    assert build_options(defaults) == SessionManagerOptions()


def test_bad_connection_string_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """$SERVICEBUS_CONNECTION_STR is used without the flag, and named when it is wrong."""
    monkeypatch.setenv("SERVICEBUS_CONNECTION_STR", "Endpoint=http://h/;SharedAccessKey=hunter2")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "m:h", "--queue", "q"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bad connection string in $SERVICEBUS_CONNECTION_STR" in err
    assert "hunter2" not in err


def test_namespace_without_the_identity_extra(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--namespace without azure-identity says which extra to install (exit 2)."""
    monkeypatch.setitem(sys.modules, "azure.identity.aio", None)  # import fails
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "m:h", "--queue", "q", "--namespace", "my-namespace"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "trio-sessions run: --namespace signs in with azure-identity, which is not "
        'installed: pip install "trio-sessions[identity]"\n'
    )


def test_load_handler_puts_the_current_directory_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MODULE is found in the current directory, as with python -m; dotted attributes work."""
    (tmp_path / "cwd_handlers.py").write_text(
        "class Handlers:\n"
        "    async def process(self, message, context): ...\n"
        "handlers = Handlers()\n"
        "class Callable:\n"
        "    async def __call__(self, session): ...\n"
        "actor = Callable()\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_handlers", raising=False)
    handler = load_handler("cwd_handlers:handlers.process", sessions=False)
    assert handler.__name__ == "process"
    assert sys.path[0] == str(tmp_path)
    assert load_handler("cwd_handlers:actor", sessions=True) is sys.modules["cwd_handlers"].actor
    monkeypatch.delitem(sys.modules, "cwd_handlers")


# ----------------------------------------------------------------- in-process: pieces


def test_mask_secrets() -> None:
    """Keys, whole signatures and sig= values are masked; the rest is kept."""
    assert mask_secrets(
        "Endpoint=sb://h/;SharedAccessKeyName=k;SharedAccessKey=abc;EntityPath=q"
    ) == ("Endpoint=sb://h/;SharedAccessKeyName=k;SharedAccessKey=***;EntityPath=q")
    assert mask_secrets("SharedAccessSignature sr=x&sig=abc%3D&se=1") == (
        "SharedAccessSignature sr=x&sig=***&se=1"
    )
    assert mask_secrets("nothing here") == "nothing here"


def test_status_and_json_records() -> None:
    """The status line, and JSON records with extras, tracebacks and masked secrets."""
    stats = ManagerStats(
        active_sessions=2, messages_received=1200, messages_completed=1100, errors=1
    )
    fields = status_fields(stats, 8, 123.45)
    assert status_text(fields) == (
        "sessions held 2/8 | 123.5 msg/s | received 1,200 | completed 1,100 | errors 1"
    )
    try:
        raise ValueError("SharedAccessKey=hunter2")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "key %s", ("SharedAccessKey=hunter2",),
            sys.exc_info(), extra={"session_id": "s1"},
        )  # fmt: skip
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "key SharedAccessKey=***"
    assert entry["session_id"] == "s1"
    assert entry["level"] == "ERROR"
    assert "ValueError" in entry["exc_info"]
    assert "hunter2" not in json.dumps(entry)


def test_live_status_line_stays_below_the_log_records() -> None:
    """On a terminal, log records are written above the status line, which is redrawn."""
    stream = io.StringIO()
    live = LiveStatusHandler(stream)
    live.setFormatter(logging.Formatter("%(message)s"))
    live.set_status("sessions held 1/8")
    live.emit(logging.makeLogRecord({"msg": "hello", "levelno": logging.INFO}))
    live.clear_status()
    assert stream.getvalue() == (
        "\r\x1b[Ksessions held 1/8\r\x1b[Khello\nsessions held 1/8\r\x1b[K"
    )


async def test_runner_in_process(emulator: Emulator, caplog: pytest.LogCaptureFixture) -> None:
    """The runner drains on interrupt and returns 0; its records go above the live line."""
    broker = emulator.broker
    await broker.send("q", [Message(f"m{n}", session_id=f"s{n}") for n in range(3)])
    handled = trio.Semaphore(0)

    async def process(message: object, context: object) -> None:
        handled.release()

    stream = io.StringIO()
    live = LiveStatusHandler(stream)
    live.setFormatter(logging.Formatter("%(message)s"))
    runner = Runner(
        handler=process,
        target="test:process",
        sessions=False,
        entity=Entity(queue_name="q"),
        connection=Connection(
            host=f"{emulator.host}:{emulator.port}",
            connection_string=emulator.connection_string,
            source="--connection-string",
            client_kwargs={"retry_total": 0},
        ),
        options=SessionManagerOptions(session_idle_timeout=0.2, accept_timeout=1.0),
        receive_mode=ReceiveMode.PEEK_LOCK,
        status_interval=30.0,
        live=live,
    )
    caplog.set_level(logging.INFO, logger="trio_sessions")
    logger = logging.getLogger("trio_sessions")
    logger.addHandler(live)
    try:
        with trio.fail_after(CEILING):
            async with trio.open_nursery() as nursery:
                result: list[int] = []

                async def serve() -> None:
                    result.append(await runner.serve())

                nursery.start_soon(serve)
                for _ in range(3):
                    await handled.acquire()
                runner.interrupt(signal.SIGINT)
    finally:
        logger.removeHandler(live)
    assert result == [0]
    assert broker.active_message_count("q") == 0
    assert "SIGINT: draining" in stream.getvalue()
    assert "stopped after" in stream.getvalue()


class FailingCredential:
    """Stands in for DefaultAzureCredential when no identity is signed in."""

    closed = 0

    def __init__(self) -> None:
        from azure.core.exceptions import ClientAuthenticationError

        self._error = ClientAuthenticationError("DefaultAzureCredential failed to get a token")

    async def get_token(self, *scopes: str, **kwargs: object) -> object:
        raise self._error

    async def close(self) -> None:
        FailingCredential.closed += 1


async def test_namespace_sign_in_failure_is_fatal(
    emulator: Emulator, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--namespace: a credential that gets no token is an AuthenticationError, exit 1."""
    identity = types.ModuleType("azure.identity.aio")
    identity.DefaultAzureCredential = FailingCredential  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "azure.identity.aio", identity)
    caplog.set_level(logging.INFO, logger="trio_sessions")

    async def process(message: object, context: object) -> None:
        raise AssertionError("no message can arrive")

    runner = Runner(
        handler=process,
        target="test:process",
        sessions=False,
        entity=Entity(queue_name="q"),
        connection=Connection(
            host=f"{emulator.host}:{emulator.port}",
            namespace=f"{emulator.host}:{emulator.port}",
            source="--namespace",
            client_kwargs={"retry_total": 0, "use_tls": False},  # the emulator has no TLS
        ),
        options=SessionManagerOptions(accept_timeout=1.0),
        receive_mode=ReceiveMode.PEEK_LOCK,
        status_interval=0,
        live=None,
    )
    with trio.fail_after(CEILING):
        assert await runner.serve() == 1
    assert FailingCredential.closed == 1  # the backend's own credential is closed
    (hint,) = [
        r.getMessage()
        for r in caplog.records
        if r.name == "trio_sessions.run" and r.levelno == logging.ERROR
    ]
    assert hint.startswith("access to queue 'q' in namespace 127.0.0.1:")
    assert "failed to get a token" in hint
    assert "check that you are signed in (az login, a managed identity)" in hint
    assert "'Azure Service Bus Data Receiver' role" in hint
