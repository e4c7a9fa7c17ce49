"""Logging for the server: text or one JSON object per line, each record carrying its request id.

The request id lives in a context variable: grpc.aio runs every RPC in its own task, so whatever
a handler logs (and whatever it calls logs) is tagged with that call's id without passing it on.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
import time
from collections.abc import Callable

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gptqgw_request_id", default=None
)

# Longest client-given value a log line carries before it is cut (see `printable`).
MAX_LOGGED_VALUE_CHARS = 200

# LogRecord attributes that are not extra fields given with `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "request_id",
    "request_tag",
}


def printable(value: str, limit: int = MAX_LOGGED_VALUE_CHARS) -> str:
    """`value` made safe for one log line: kept as is when printable, else escaped the way repr
    does (newlines, ESC, RTL overrides become backslash escapes), and cut to about `limit`
    characters with the original length said. A client chooses these values: unescaped, they
    could forge lines, recolour a terminal or fill the disk."""
    shown = value if value.isprintable() else repr(value)[1:-1]
    if len(shown) > limit:
        return f"{shown[:limit]}...({len(value)} chars)"
    return shown


def _safe(value: object) -> object:
    """Strings escaped (not cut: the server's own values may be long); anything else as is."""
    if isinstance(value, str) and not value.isprintable():
        return repr(value)[1:-1]
    return value


class RateLimitedLog:
    """Logs at most one record per `interval_s`; the next one logged says how many were dropped.

    For events a client can cause at will (garbage on the wire): one line per event would let
    anyone flood the log. `clock` is injectable for tests."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0
        self._lock = threading.Lock()

    def warning(self, message: str, **extra: object) -> bool:
        """Log `message` at WARNING unless one was logged less than `interval_s` ago; True if
        it was logged."""
        now = self._clock()
        with self._lock:
            if self._last is not None and now - self._last < self._interval_s:
                self._suppressed += 1
                return False
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        self._logger.warning(message, extra={**extra, "suppressed": suppressed})
        return True


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, then any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            entry["request_id"] = _safe(record.request_id)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = _safe(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level logger [request id] message key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(request_tag)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request_tag = f"[{_safe(request_id)}] " if request_id else ""
        line = super().format(record)
        extras = [
            f"{key}={_safe(value)}"
            for key, value in vars(record).items()
            if key not in _STANDARD_ATTRS and not key.startswith("_")
        ]
        return f"{line} {' '.join(extras)}" if extras else line


def configure_logging(log_format: str = "text", level: str = "info") -> None:
    """Send every logger to stderr in the chosen format (replaces earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
