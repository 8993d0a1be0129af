"""The documentation's examples (docs/examples/*.py) run and print what the docs show."""

from __future__ import annotations

import functools
import runpy
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("test_"))
TESTS = sorted(EXAMPLES.glob("test_*.py"))


def _load(path: Path) -> dict[str, Any]:
    return runpy.run_path(str(path), run_name=f"docs_example_{path.stem}")


def _run_virtual(async_fn: Any, *args: object) -> None:
    """Run ``async_fn`` under an autojump MockClock, so idle timeouts take no real time."""
    trio.run(async_fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


def _expected(path: Path) -> list[str]:
    return path.with_suffix(".out").read_text(encoding="utf-8").splitlines()


def test_every_example_is_covered() -> None:
    """Each script has the expected output the docs show, and a test here runs it."""
    assert SCRIPTS, "no examples found"
    for path in SCRIPTS:
        assert path.with_suffix(".out").is_file(), f"{path.name} has no .out file"
        assert 'if __name__ == "__main__":\n    trio.run(main)' in path.read_text()


@pytest.mark.parametrize(
    "path", [p for p in SCRIPTS if p.stem != "graceful_shutdown"], ids=lambda p: p.stem
)
def test_example_prints_its_output(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The example prints the lines of its .out file (sessions interleave, so in any order)."""
    _run_virtual(_load(path)["main"])
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == sorted(_expected(path))


def test_first_processor_keeps_each_session_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    """The tutorial's claim: each document's edits are handled in the order sent."""
    _run_virtual(_load(EXAMPLES / "first_processor.py")["main"])
    lines = capsys.readouterr().out.splitlines()
    for doc in ("doc-0", "doc-1", "doc-2"):
        edits = [int(line.split()[-1]) for line in lines if line.startswith(f"{doc}:")]
        assert edits == sorted(edits)
        assert len(edits) == 2


def _signal_after(main: Any, *delays: float) -> Any:
    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(main)
            for delay in delays:
                await trio.sleep(delay)
                signal.raise_signal(signal.SIGTERM)

    return run


def test_graceful_shutdown_drains_on_first_signal(capsys: pytest.CaptureFixture[str]) -> None:
    """One SIGTERM mid-work lets the handlers finish: every job is done, none is left."""
    main = _load(EXAMPLES / "graceful_shutdown.py")["main"]
    _run_virtual(_signal_after(main, 0.5))
    lines = capsys.readouterr().out.splitlines()
    expected = _expected(EXAMPLES / "graceful_shutdown.py")
    assert lines[0] == expected[0]
    assert sorted(lines[1:-1]) == sorted(expected[1:-1])
    assert lines[-1] == expected[-1]


def test_graceful_shutdown_cancels_on_second_signal(capsys: pytest.CaptureFixture[str]) -> None:
    """A second SIGTERM cancels the handlers: no job finishes and all three come back."""
    main = _load(EXAMPLES / "graceful_shutdown.py")["main"]
    _run_virtual(_signal_after(main, 0.25, 0.25))
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "SIGTERM: draining; send it again to cancel",
        "stopped; 3 messages left",
    ]


@pytest.mark.parametrize("path", TESTS, ids=lambda p: p.stem)
def test_example_tests_pass(path: Path) -> None:
    """The testing how-to's example tests pass (run here with their autojump clock)."""
    tests = {name: fn for name, fn in _load(path).items() if name.startswith("test_")}
    assert tests
    for fn in tests.values():
        clock = trio.testing.MockClock(autojump_threshold=0)
        trio.run(functools.partial(fn, clock), clock=clock)
