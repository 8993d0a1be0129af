"""The trio-sessions command and the demo behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trio_sessions._cli import main
from trio_sessions._demo import DemoProgress, run_demo

KEYS = {
    "documents",
    "edits_sent",
    "edits_applied",
    "lost",
    "duplicates",
    "out_of_order",
    "redeliveries",
    "peak_sessions",
    "elapsed_s",
    "messages_per_s",
}


async def test_demo_applies_every_edit_once_in_order() -> None:
    """With random handler failures every edit is still applied exactly once, in order."""
    seen: list[DemoProgress] = []
    result = await run_demo(
        documents=6, edits=5, concurrency=2, fail_rate=0.4, seed=3, on_progress=seen.append
    )
    assert result.ok
    assert (result.lost, result.duplicates, result.out_of_order) == (0, 0, 0)
    assert result.edits_applied == result.edits_sent == 30
    assert result.redeliveries > 0
    assert 1 <= result.peak_sessions <= 2
    assert seen[-1].edits_applied == 30
    assert set(result.to_json()) == KEYS | {"ok"}


def test_demo_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    """demo --json prints one JSON object with the documented keys and exits 0."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--json", "--documents", "3", "--edits", "3", "--fail-rate", "0.2"])
    assert exit_info.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= KEYS
    assert data["edits_sent"] == data["edits_applied"] == 9
    assert data["lost"] == data["duplicates"] == data["out_of_order"] == 0


def test_demo_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --json the demo prints a verdict and progress lines on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--documents", "2", "--edits", "2", "--fail-rate", "0"])
    assert exit_info.value.code == 0
    out, err = capsys.readouterr()
    assert out.startswith("OK: 2 documents, 4/4 edits applied")
    assert "edits applied 4/4" in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["demo", "--fail-rate", "1.5"], "--fail-rate"),
        (["demo", "--fail-rate", "x"], "--fail-rate"),
        (["demo", "--documents", "0"], "--documents"),
        (["demo", "--edits", "-1"], "--edits"),
        (["demo", "--concurrency", "0"], "--concurrency"),
    ],
)
def test_bad_flags_exit_2(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An out-of-range flag is an argparse error naming the flag (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_python_dash_m_runs_the_demo() -> None:
    """python -m trio_sessions demo works as a program and prints parseable JSON."""
    env = dict(os.environ)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trio_sessions",
            "demo",
            "--json",
            "--documents",
            "3",
            "--edits",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["edits_applied"] == 6
