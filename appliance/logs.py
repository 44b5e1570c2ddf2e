"""The appliance's own log: plain lines (the default) or one JSON object per line for journald or
Loki; the id of the request a line was written for; scheduler chatter kept at DEBUG.

Meaningful events reach it from the store: every event written to the events table is also logged
once its transaction commits (logger ``appliance.events``), so the log and `GET /api/v1/events`
tell the same story."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any, Literal

from aiohttp.http_exceptions import HttpProcessingError

# The id of the request being handled, set by the HTTP layer (X-Request-ID, taken or made).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
EVENT_FIELDS = ("kind", "endpoint", "details")  # what an event's log record carries besides its message


class _WithRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def _utc(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request {rid}]" if rid else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": _utc(record), "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        for name in EVENT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class ClientHttpErrors(logging.Filter):
    """aiohttp's server logs a request it could not parse as an error with a traceback ("Error handling
    request from <peer>"). Malformed HTTP is the client's error, not the appliance's: one line at INFO
    naming the peer and what was wrong. Its other errors (a handler's bug) keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "an unknown peer"
        # The parser quotes what the client sent: one line of printable characters, of bounded length.
        text = " ".join(str(exc.message).split())
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)[:300]
        record.msg, record.args = "bad HTTP request from %s: %s %s", (peer, exc.code, text)
        record.exc_info, record.exc_text = None, None
        if record.levelno > logging.INFO:
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return logging.getLogger(record.name).isEnabledFor(record.levelno)


def quiet_client_errors(logger: logging.Logger) -> None:
    """Install ClientHttpErrors on aiohttp's server logger (once)."""
    if not any(isinstance(f, ClientHttpErrors) for f in logger.filters):
        logger.addFilter(ClientHttpErrors())


def setup_logging(level: str, fmt: Literal["plain", "json"] = "plain") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_WithRequestId())
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_client_errors(logging.getLogger("aiohttp.server"))
    if level.lower() != "debug":
        # APScheduler logs two INFO lines per job run: 40 lines a minute of nothing on an idle box.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
