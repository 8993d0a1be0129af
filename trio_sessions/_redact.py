"""Masking secrets (Service Bus keys, SAS tokens) in text bound for logs and exceptions.

Connection strings carry ``SharedAccessKey=<key>`` (or a whole
``SharedAccessSignature=<token>``), and SAS tokens carry ``sig=<signature>``: whoever
reads one can use the namespace. `redact` masks those values and keeps the rest (the
endpoint, key name, resource and expiry help to diagnose a problem and are not secret).
Every module that may put such text into a log record or an exception message calls
it; `RedactingFilter` on the library's loggers masks whatever still gets through.
"""

from __future__ import annotations

import logging
import re
from typing import final

__all__ = ["MASK", "Redacted", "RedactingFilter", "redact"]

#: What a secret value is replaced with.
MASK = "***"

# A value runs to the next separator of its format: ";" in connection strings, "&" in a
# token's query string, or whitespace, a quote or a closing bracket around the text.
_VALUE = r"[^;&\s'\"<>()\[\]{},]+"
_SECRETS = re.compile(
    r"(?P<name>\b(?:SharedAccessKey|SharedAccessSignature|sig)\s*=\s*)" + _VALUE,
    re.IGNORECASE,
)
# A SAS token written out alone ("SharedAccessSignature sr=...&sig=...&se=...&skn=...")
# has its sig= value masked; nothing else in it is secret.


def redact(text: str) -> str:
    """``text`` with the values of ``SharedAccessKey=``, ``SharedAccessSignature=`` and
    ``sig=`` masked (case-insensitive), everything else unchanged.

    >>> redact("Endpoint=sb://h/;SharedAccessKeyName=k;SharedAccessKey=s3cr3t")
    'Endpoint=sb://h/;SharedAccessKeyName=k;SharedAccessKey=***'
    >>> redact("SharedAccessSignature sr=sb%3A%2F%2Fh&sig=abc%3D&se=1&skn=k")
    'SharedAccessSignature sr=sb%3A%2F%2Fh&sig=***&se=1&skn=k'
    """
    if "=" not in text:  # the common case: nothing to mask, no regex run
        return text
    return _SECRETS.sub(lambda match: match["name"] + MASK, text)


@final
class Redacted:
    """Formats as ``redact(str(value))``, lazily: for ``%s`` arguments of log calls.

    ``logger.warning("failed: %s", Redacted(error))`` does the masking only if the record
    is emitted.
    """

    __slots__ = ("_use_repr", "_value")

    def __init__(self, value: object, *, use_repr: bool = False) -> None:
        self._value = value
        self._use_repr = use_repr

    def __str__(self) -> str:
        return redact(repr(self._value) if self._use_repr else str(self._value))

    def __repr__(self) -> str:
        return redact(repr(self._value))


@final
class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message and traceback before any handler sees it.

    Attached to each of the library's loggers (a filter on a logger only sees that
    logger's own records). It runs only for records that pass the level check, so
    disabled levels cost nothing. The message is formatted once here (``record.args``
    are then empty) and the traceback is pre-formatted into ``record.exc_text``, which
    `logging.Formatter` uses as it is.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg = masked
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


_FILTER = RedactingFilter()


def library_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` (a ``trio_sessions.*`` name) with the redacting filter."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
