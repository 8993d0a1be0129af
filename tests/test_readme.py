"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

README = Path(__file__).parent.parent / "README.md"


def test_ten_line_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The first example processes every edit, each document's edits in order."""
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    assert code.rstrip().endswith("trio.run(main)")
    namespace: dict[str, Any] = {}
    exec(code.rstrip().removesuffix("trio.run(main)"), namespace)
    trio.run(namespace["main"], clock=trio.testing.MockClock(autojump_threshold=0))
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == sorted(f"doc-{i % 3} edit {i}" for i in range(9))
    for doc in range(3):
        edits = [int(line.split()[-1]) for line in lines if line.startswith(f"doc-{doc} ")]
        assert edits == sorted(edits)
