"""Read the official Service Bus emulator's ``Config.json`` into a `MemoryBroker`.

The format (Microsoft's emulator, ``UserConfig.Namespaces[]``)::

    {"UserConfig": {"Namespaces": [{"Name": "sbemulatorns",
        "Queues": [{"Name": "q", "Properties": {"RequiresSession": true, "LockDuration": "PT1M",
                                                "MaxDeliveryCount": 3}}],
        "Topics": [{"Name": "t", "Properties": {},
                    "Subscriptions": [{"Name": "s", "Properties": {"RequiresSession": true}}]}]}]}}

Durations are ISO-8601 (``"PT1M"``, ``"PT30S"``, ``"P1D"``). Properties this emulator does
not model are ignored with a warning; a file it cannot read raises `ConfigError` naming
the JSON path of the problem.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from ..backends._memory import MemoryBroker

__all__ = ["ConfigError", "ConfigWarning", "load_config", "parse_duration"]

_DURATION = re.compile(
    r"P(?:(?P<days>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<hours>\d+(?:\.\d+)?)H)?(?:(?P<minutes>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<seconds>\d+(?:\.\d+)?)S)?)?"
)

#: Entity properties the MemoryBroker models, by entity kind, mapped to keyword arguments.
_QUEUE_PROPERTIES = {
    "RequiresSession": "requires_session",
    "LockDuration": "lock_duration",
    "MaxDeliveryCount": "max_delivery_count",
    "DefaultMessageTimeToLive": "default_message_time_to_live",
    "DeadLetteringOnMessageExpiration": "dead_lettering_on_message_expiration",
}
#: Properties of the official format this emulator does not model: a warning says so when
#: they switch something on (a detection window matters only with detection on).
_IGNORED_PROPERTIES = frozenset(
    {"RequiresDuplicateDetection", "ForwardTo", "ForwardDeadLetteredMessagesTo"}
)
_SILENTLY_IGNORED = frozenset({"DuplicateDetectionHistoryTimeWindow"})
_DURATIONS = frozenset({"LockDuration", "DefaultMessageTimeToLive"})
_BOOLEANS = frozenset({"RequiresSession", "DeadLetteringOnMessageExpiration"})


class ConfigError(ValueError):
    """The configuration file cannot be used; the message names the JSON path."""


class ConfigWarning(UserWarning):
    """Part of the configuration is ignored (unknown or not modelled by this emulator)."""


def parse_duration(text: object, path: str = "duration") -> float:
    """An ISO-8601 duration such as ``"PT1M"`` in seconds."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None or text == "P" or (isinstance(text, str) and text.endswith("T")):
        raise ConfigError(f'{path}: expected an ISO-8601 duration such as "PT1M", got {text!r}')
    parts = {name: float(value or 0) for name, value in match.groupdict().items()}
    return parts["days"] * 86400 + parts["hours"] * 3600 + parts["minutes"] * 60 + parts["seconds"]


def _items(container: dict[str, Any], key: str, path: str) -> list[tuple[str, dict[str, Any]]]:
    value = container.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{path}.{key}: expected a list, got {type(value).__name__}")
    items = []
    for i, item in enumerate(value):
        item_path = f"{path}.{key}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{item_path}: expected an object, got {type(item).__name__}")
        items.append((item_path, item))
    return items


def _name(item: dict[str, Any], path: str) -> str:
    name = item.get("Name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{path}.Name: expected a non-empty name without '/', got {name!r}")
    return name


def _entity_settings(item: dict[str, Any], path: str) -> dict[str, Any]:
    properties = item.get("Properties", {})
    if not isinstance(properties, dict):
        raise ConfigError(f"{path}.Properties: expected an object")
    settings: dict[str, Any] = {}
    for key, value in properties.items():
        where = f"{path}.Properties.{key}"
        if key in _SILENTLY_IGNORED:
            continue
        if key in _IGNORED_PROPERTIES:
            if value not in (None, "", False):
                warnings.warn(
                    f"{where} is not modelled by this emulator; ignored",
                    ConfigWarning,
                    stacklevel=4,
                )
            continue
        if key not in _QUEUE_PROPERTIES:
            warnings.warn(f"{where} is unknown; ignored", ConfigWarning, stacklevel=4)
            continue
        if key in _DURATIONS:
            value = parse_duration(value, where)
            if value <= 0:
                raise ConfigError(f"{where}: must be longer than zero")
        elif key in _BOOLEANS:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: expected a whole number >= 1, got {value!r}")
        settings[_QUEUE_PROPERTIES[key]] = value
    return settings


def load_config(
    source: str | Path | dict[str, Any], broker: MemoryBroker | None = None
) -> MemoryBroker:
    """Create the queues, topics and subscriptions of a ``Config.json`` on a broker.

    Args:
        source: the file's path, or its parsed JSON.
        broker: where to create the entities (a new `MemoryBroker` if None).

    Raises:
        ConfigError: the file is missing, not JSON, or not in the expected format; the
            message names the JSON path of the problem.
    """
    if isinstance(source, dict):
        data: Any = source
    else:
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {source}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise ConfigError(f"{source} is not valid JSON: {exc}") from exc
    broker = broker if broker is not None else MemoryBroker()
    user = data.get("UserConfig") if isinstance(data, dict) else None
    if not isinstance(user, dict):
        raise ConfigError("UserConfig: expected an object at the top level")
    for ns_path, namespace in _items(user, "Namespaces", "UserConfig"):
        for path, queue in _items(namespace, "Queues", ns_path):
            name = _name(queue, path)
            try:
                broker.create_queue(name, **_entity_settings(queue, path))
            except ValueError as exc:
                raise ConfigError(f"{path}: {exc}") from exc
        for path, topic in _items(namespace, "Topics", ns_path):
            topic_name = _name(topic, path)
            topic_settings = _entity_settings(topic, path)
            try:
                broker.create_topic(topic_name)
            except ValueError as exc:
                raise ConfigError(f"{path}: {exc}") from exc
            for sub_path, subscription in _items(topic, "Subscriptions", path):
                if subscription.get("Rules"):
                    warnings.warn(
                        f"{sub_path}.Rules: filters are not modelled; every message is delivered",
                        ConfigWarning,
                        stacklevel=2,
                    )
                settings = {
                    key: value
                    for key, value in topic_settings.items()
                    if key == "default_message_time_to_live"
                }
                settings.update(_entity_settings(subscription, sub_path))
                try:
                    broker.create_subscription(
                        topic_name, _name(subscription, sub_path), **settings
                    )
                except ValueError as exc:
                    raise ConfigError(f"{sub_path}: {exc}") from exc
    return broker
