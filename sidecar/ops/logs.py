"""Logging: JSON lines (or console text), with secrets kept out by construction and by filter.

Fields come from ``extra={...}``; our code never passes a token, proof, key or SVID there. As a
second line of defence, :class:`RedactingFilter` replaces anything JWT-shaped in any record
(including third-party library messages) with ``[redacted]``.

The audit (logger ``sidecar.audit``) is a stream of its own: :func:`set_audit` gives it its own
level, independent of ``log.level``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_FIELDS = "_sidecar_fields"  # the record's extra fields, picked once by the filter
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    _FIELDS,
}


def redact(text: str) -> str:
    # Every match starts with "eyJ": the substring test is much cheaper than the search, and
    # most values (route names, paths, statuses) have none.
    return _JWT.sub("[redacted]", text) if "eyJ" in text else text


def fields(record: logging.LogRecord) -> dict[str, Any]:
    picked = record.__dict__.get(_FIELDS)
    if picked is None:
        picked = {k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None}
    return picked


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # Redact the message as it will read: formatted once here, so a %-argument of any type
        # (a third-party library's "%d") keeps working and a JWT inside str(arg) is caught too.
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit the format: keep both
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = redact(message), None
        picked = fields(record)
        for key, value in picked.items():
            if isinstance(value, str):
                clean = redact(value)
                if clean is not value:
                    picked[key] = clean
                    setattr(record, key, clean)
        # The formatter reads the fields from here instead of walking the record again. A
        # handler added later (a test's capture) still sees the redacted attributes.
        record.__dict__[_FIELDS] = picked
        return True


class JsonFormatter(logging.Formatter):
    _second = -1
    _stamp = ""

    def _time(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime per second, not per line
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self._time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(fields(record))
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = record.exc_info[0].__name__
        return json.dumps(doc, default=str)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in fields(record).items())
        return (
            f"{record.levelname.lower():7} {record.name:18} {record.getMessage()} {extra}".rstrip()
        )


AUDIT = "sidecar.audit"


def set_audit(enabled: bool) -> None:
    """The audit is its own stream with its own setting (``audit.enabled``): its logger has a
    level of its own, so ``log.level: warning`` quiets the operational lines, not the audit."""
    logging.getLogger(AUDIT).setLevel(logging.INFO if enabled else logging.CRITICAL + 1)


def set_level(level: str) -> None:
    """Change the level at runtime (config reload); leaves handlers alone."""
    if logging.getLogger().handlers:
        logging.getLogger().setLevel(level.upper())


HANDLER_NAME = "sidecar"  # the handler configure() installs; set_format() changes only it


def set_format(fmt: str) -> None:
    """Change the output format at runtime (config reload)."""
    for handler in logging.getLogger().handlers:
        if handler.get_name() == HANDLER_NAME:
            handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())


def configure(level: str = "info", fmt: str = "json", *, audit: bool = True) -> None:
    # Nothing we write reads the caller's file and line, the thread or the process (the
    # formatters above): the logging HOWTO's "Optimization" settings skip collecting them for
    # every record, which the per-request audit line pays for otherwise.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    set_audit(audit)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
