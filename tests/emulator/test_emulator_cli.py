"""``trio-sessions emulator`` as a program: real process, real sockets, real signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage

pytest.importorskip("proton")

COMMAND = [sys.executable, "-m", "trio_sessions", "emulator", "--port", "0"]


def start(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serves_the_sdk_and_stops_on_signals(signum: signal.Signals) -> None:
    """The first stdout line is a working connection string; a signal stops it cleanly."""
    proc, conn_str = start("--queue", "jobs", "--key", "secret")
    try:
        assert conn_str.startswith("Endpoint=sb://127.0.0.1:")
        assert "SharedAccessKey=secret;UseDevelopmentEmulator=true" in conn_str
        with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            with client.get_queue_sender("jobs") as sender:
                sender.send_messages(ServiceBusMessage("x", session_id="a"))
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "serving on 127.0.0.1" in err
    assert f"stopping on {signum.name}" in err


def test_config_file(tmp_path: Path) -> None:
    """--config creates the file's entities; an invalid file exits 2 naming the JSON path."""
    good = tmp_path / "Config.json"
    good.write_text(
        json.dumps({"UserConfig": {"Namespaces": [{"Queues": [{"Name": "fromfile"}]}]}})
    )
    proc, conn_str = start("--config", str(good))
    try:
        with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            with client.get_queue_sender("fromfile") as sender:
                sender.send_messages(ServiceBusMessage("x", session_id="a"))
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0

    bad = tmp_path / "Bad.json"
    bad.write_text(json.dumps({"UserConfig": {"Namespaces": [{"Queues": [{"Name": ""}]}]}}))
    result = subprocess.run(
        [*COMMAND, "--config", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "UserConfig.Namespaces[0].Queues[0].Name" in result.stderr
    assert result.stdout == ""
