"""Keys, SAS tokens and connection strings never reach logs or exception messages."""

from __future__ import annotations

import logging

import pytest
import trio

from trio_sessions import AzureServiceBus, MemoryBroker
from trio_sessions._redact import MASK, Redacted, RedactingFilter, library_logger, redact

KEY = "ZmFrZS1rZXktZm9yLXRlc3RzLW9ubHk9PQ=="  # base64, as Service Bus keys are
SIG = "RjPWhKyOTooVJjlQt7Vs9gJX1LmRhnMgAhUttElXtls%3D"
CONN_STR = (
    f"Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen;SharedAccessKey={KEY}"
)
TOKEN = f"SharedAccessSignature sr=sb%3A%2F%2Fns%2Fq&sig={SIG}&se=1700000000&skn=listen"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            CONN_STR,
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen;"
            f"SharedAccessKey={MASK}",
        ),
        (
            f"{CONN_STR};EntityPath=q",
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=listen;"
            f"SharedAccessKey={MASK};EntityPath=q",
        ),
        (TOKEN, f"SharedAccessSignature sr=sb%3A%2F%2Fns%2Fq&sig={MASK}&se=1700000000&skn=listen"),
        (
            f"Endpoint=sb://ns/;SharedAccessSignature={TOKEN}",
            f"Endpoint=sb://ns/;SharedAccessSignature={MASK} "
            f"sr=sb%3A%2F%2Fns%2Fq&sig={MASK}&se=1700000000&skn=listen",
        ),
        (f"sharedaccesskey = {KEY}", f"sharedaccesskey = {MASK}"),  # any case and spacing
        (f"ValueError('bad {CONN_STR}')", f"ValueError('bad {redact(CONN_STR)}')"),
        (f'{{"conn": "{CONN_STR}"}}', f'{{"conn": "{redact(CONN_STR)}"}}'),
        (
            "SharedAccessKeyName=listen;Endpoint=sb://ns/",
            "SharedAccessKeyName=listen;Endpoint=sb://ns/",
        ),
        ("no secrets here", "no secrets here"),
        ("design=signature", "design=signature"),  # "sig" only as a whole word
    ],
)
def test_redact(text: str, expected: str) -> None:
    """Secret values are masked; the names, endpoint, key name and the rest are kept."""
    assert redact(text) == expected
    assert KEY not in redact(text)
    assert SIG not in redact(text)


def test_redacted_is_lazy_and_masks_str_and_repr() -> None:
    """Redacted formats (and masks) only when formatted, as str or as repr."""

    class Loud:
        formatted = 0

        def __str__(self) -> str:
            Loud.formatted += 1
            return CONN_STR

        def __repr__(self) -> str:
            return f"Loud({CONN_STR!r})"

    wrapped = Redacted(Loud())
    assert Loud.formatted == 0
    assert str(wrapped) == redact(CONN_STR)
    assert Loud.formatted == 1
    assert repr(wrapped) == f"Loud({redact(CONN_STR)!r})"
    assert str(Redacted(ValueError(CONN_STR), use_repr=True)) == f"ValueError({redact(CONN_STR)!r})"


def test_filter_masks_messages_arguments_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """Whatever a library logger is given, its handlers see the secrets masked."""
    logger = library_logger("trio_sessions.test_redact")
    assert logger is logging.getLogger("trio_sessions.test_redact")
    assert library_logger("trio_sessions.test_redact").filters.count(logger.filters[0]) == 1
    with caplog.at_level(logging.DEBUG, logger="trio_sessions"):
        logger.info("connecting with %s", CONN_STR)
        logger.warning(f"token {TOKEN}")  # noqa: G004 - an f-string, as careless code would
        try:
            raise ValueError(f"cannot parse {CONN_STR!r}")
        except ValueError:
            logger.exception("failed")
    text = caplog.text
    assert KEY not in text
    assert SIG not in text
    assert f"SharedAccessKey={MASK}" in text
    assert f"sig={MASK}" in text
    assert "ValueError: cannot parse" in text  # the traceback is kept, masked
    assert [r.getMessage() for r in caplog.records[:2]] == [
        f"connecting with {redact(CONN_STR)}",
        f"token {redact(TOKEN)}",
    ]


def test_filter_leaves_clean_records_alone() -> None:
    """A record without secrets keeps its msg and args (lazy formatting is kept)."""
    record = logging.LogRecord("trio_sessions", logging.INFO, __file__, 1, "n=%d", (3,), None)
    assert RedactingFilter().filter(record)
    assert (record.msg, record.args) == ("n=%d", (3,))


@pytest.mark.parametrize(
    "conn_str",
    [
        f"SharedAccessKeyName=listen;SharedAccessKey={KEY}",  # no endpoint
        f"Endpoint=;SharedAccessKeyName=listen;SharedAccessKey={KEY}",
        f"sb://ns.servicebus.windows.net/ SharedAccessKey={KEY}",  # not key=value;...
        f"Endpoint=sb://;SharedAccessKeyName=listen;SharedAccessKey={KEY}",  # no host
    ],
)
def test_bad_connection_strings_are_not_echoed(conn_str: str) -> None:
    """AzureServiceBus.from_connection_string names the problem, never the key or token."""
    with pytest.raises(ValueError, match=r"\w") as excinfo:
        AzureServiceBus.from_connection_string(conn_str)
    for text in (str(excinfo.value), repr(excinfo.value)):
        assert KEY not in text
        assert SIG not in text


def test_azure_backend_repr_hides_the_key() -> None:
    """A backend built from a connection string does not show it in its repr."""
    backend = AzureServiceBus.from_connection_string(CONN_STR)
    assert KEY not in repr(backend)


async def test_emulator_auth_failures_do_not_leak_keys(caplog: pytest.LogCaptureFixture) -> None:
    """A wrong key is refused with a reason: in our logs and the SDK's error, no secret."""
    pytest.importorskip("proton")
    from azure.servicebus import ServiceBusClient, ServiceBusMessage
    from azure.servicebus.exceptions import ServiceBusAuthenticationError

    from trio_sessions.emulator import serve_emulator

    broker = MemoryBroker()
    broker.create_queue("q")
    wrong_key = "d3Jvbmcta2V5LWZvci10ZXN0cw=="

    def send(conn_str: str) -> None:
        with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
            with client.get_queue_sender("q") as sender:
                sender.send_messages(ServiceBusMessage("x", session_id="a"))

    with caplog.at_level(logging.INFO, logger="trio_sessions"):
        async with serve_emulator(broker) as emulator:
            conn_str = emulator.connection_string.replace(emulator.key, wrong_key)
            assert wrong_key in conn_str
            with trio.fail_after(60), pytest.raises(ServiceBusAuthenticationError) as excinfo:
                await trio.to_thread.run_sync(send, conn_str)
    ours = [r for r in caplog.records if r.name.startswith("trio_sessions")]
    assert any("refused a SAS token" in r.getMessage() for r in ours)
    texts = [str(excinfo.value), repr(excinfo.value), *(r.getMessage() for r in ours)]
    for text in texts:
        assert wrong_key not in text
        assert emulator.key not in text
        assert "sig=" not in text or f"sig={MASK}" in text
