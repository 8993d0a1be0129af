"""Loading the official emulator's Config.json into a MemoryBroker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trio_sessions import Message
from trio_sessions.emulator._config import ConfigError, ConfigWarning, load_config, parse_duration

OFFICIAL_SAMPLE: dict[str, Any] = {
    "UserConfig": {
        "Namespaces": [
            {
                "Name": "sbemulatorns",
                "Queues": [
                    {
                        "Name": "queue.1",
                        "Properties": {
                            "DeadLetteringOnMessageExpiration": False,
                            "DefaultMessageTimeToLive": "PT1H",
                            "DuplicateDetectionHistoryTimeWindow": "PT20S",
                            "ForwardDeadLetteredMessagesTo": "",
                            "ForwardTo": "",
                            "LockDuration": "PT1M",
                            "MaxDeliveryCount": 3,
                            "RequiresDuplicateDetection": False,
                            "RequiresSession": True,
                        },
                    }
                ],
                "Topics": [
                    {
                        "Name": "topic.1",
                        "Properties": {"DefaultMessageTimeToLive": "PT1H"},
                        "Subscriptions": [
                            {
                                "Name": "subscription.1",
                                "Properties": {"LockDuration": "PT30S", "RequiresSession": False},
                            }
                        ],
                    }
                ],
            }
        ],
        "Logging": {"Type": "File"},
    }
}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("PT1M", 60),
        ("PT30S", 30),
        ("PT0.5S", 0.5),
        ("P1D", 86400),
        ("P1DT2H3M4S", 93784),
        ("PT1H", 3600),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    """ISO-8601 durations are read in seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["1 minute", "P", "PT", "60", "PT1X", 60, None])
def test_bad_durations(text: object) -> None:
    """Anything else is a ConfigError quoting the value."""
    with pytest.raises(ConfigError, match="ISO-8601"):
        parse_duration(text, "X.LockDuration")


async def test_the_official_sample_loads(tmp_path: Path) -> None:
    """The official format creates queues, topics and subscriptions with their settings."""
    config = tmp_path / "Config.json"
    config.write_text(json.dumps(OFFICIAL_SAMPLE))
    broker = load_config(config)
    await broker.send("queue.1", Message(b"x", session_id="s"))
    await broker.send("topic.1", Message(b"y"))
    assert broker.active_message_count("queue.1") == 1
    assert broker.active_message_count("topic.1/subscriptions/subscription.1") == 1
    queue = broker._entities["queue.1"]
    assert (queue.lock_duration, queue.max_delivery_count, queue.requires_session) == (60, 3, True)
    assert queue.default_message_time_to_live == 3600
    subscription = broker._entities["topic.1/subscriptions/subscription.1"]
    assert (subscription.lock_duration, subscription.requires_session) == (30, False)
    assert subscription.default_message_time_to_live == 3600  # inherited from the topic


def test_unknown_and_unmodelled_properties_warn() -> None:
    """Unknown properties, active unmodelled ones and rules are ignored with a warning."""
    config = json.loads(json.dumps(OFFICIAL_SAMPLE))
    queue = config["UserConfig"]["Namespaces"][0]["Queues"][0]
    queue["Properties"]["Colour"] = "blue"
    queue["Properties"]["RequiresDuplicateDetection"] = True
    sub = config["UserConfig"]["Namespaces"][0]["Topics"][0]["Subscriptions"][0]
    sub["Rules"] = [{"Name": "r"}]
    with pytest.warns(ConfigWarning) as record:
        load_config(config)
    messages = sorted(str(w.message) for w in record)
    assert any("Queues[0].Properties.Colour is unknown" in m for m in messages)
    assert any("RequiresDuplicateDetection is not modelled" in m for m in messages)
    assert any("Subscriptions[0].Rules" in m for m in messages)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda c: c.pop("UserConfig"), "UserConfig"),
        (lambda c: c["UserConfig"].update(Namespaces={}), "UserConfig.Namespaces"),
        (lambda c: c["UserConfig"]["Namespaces"][0].update(Queues=[5]), "Namespaces[0].Queues[0]"),
        (lambda c: q(c).update(Name=""), "Queues[0].Name"),
        (
            lambda c: q(c)["Properties"].update(LockDuration="1m"),
            "Queues[0].Properties.LockDuration",
        ),
        (lambda c: q(c)["Properties"].update(LockDuration="PT0S"), "Properties.LockDuration"),
        (lambda c: q(c)["Properties"].update(MaxDeliveryCount=0), "Properties.MaxDeliveryCount"),
        (lambda c: q(c)["Properties"].update(RequiresSession="yes"), "Properties.RequiresSession"),
        (lambda c: q(c).update(Properties=[]), "Queues[0].Properties"),
        (
            lambda c: c["UserConfig"]["Namespaces"][0]["Topics"][0].update(Name="queue.1"),
            "Topics[0]",
        ),
    ],
)
def test_invalid_files_name_the_json_path(change: Any, path: str) -> None:
    """A file that cannot be used raises ConfigError naming where the problem is."""
    config = json.loads(json.dumps(OFFICIAL_SAMPLE))
    change(config)
    with pytest.raises(ConfigError, match=path.replace("[", r"\[").replace("]", r"\]")):
        load_config(config)


def q(config: dict[str, Any]) -> dict[str, Any]:
    queue: dict[str, Any] = config["UserConfig"]["Namespaces"][0]["Queues"][0]
    return queue


def test_unreadable_files(tmp_path: Path) -> None:
    """A missing file or one that is not JSON is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match=r"bad\.json is not valid JSON"):
        load_config(bad)
