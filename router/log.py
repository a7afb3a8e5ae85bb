"""Logging: one JSON object per line (or plain text), through the standard logging module."""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import time
from typing import Any

import orjson

from router.config.model import LoggingConfig

# A client string at most this long is logged as it is: no credential is that short.
REDACT_KEEP = 12
# A value as `repr` quotes it: a quote of the other kind, or an escaped one, does not end it.
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


def redact(value: str) -> str:
    """A string the client chose (a model name, a path segment, ...) as a log line may carry
    it: as it is when short and printable, else its first 4 characters, its length and a
    digest (to match lines about the same value), never more than about 30 characters. A
    credential pasted into the wrong field never reaches the logs whole."""
    if len(value) <= REDACT_KEEP and value.isprintable():
        return value
    prefix = "".join(c if c.isprintable() else "?" for c in value[:4])
    digest = hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:8]
    return f"{prefix}…[{len(value)} chars {digest}]"


def redact_path(path: str) -> str:
    """A request path for the logs: each segment through `redact`, at most 200 characters."""
    return "/".join(redact(segment) for segment in path.split("/"))[:200]


def redact_message(message: str) -> str:
    """An error message for the logs: every quoted value in it (messages quote what the client
    sent, as `repr` does) through `redact`, at most 300 characters."""
    return _QUOTED.sub(lambda m: m[0][0] + redact(m[0][1:-1]) + m[0][0], message)[:300]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "access", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = getattr(record, "access", None)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


class _NoTracebackForBadRequests(logging.Filter):
    """aiohttp logs each malformed HTTP request with a full traceback; one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None:
            name = record.exc_info[0].__name__
            if name in ("BadHttpMessage", "LineTooLong", "BadStatusLine", "InvalidHeader",
                        "HttpProcessingError", "BadHttpMethod", "TransferEncodingError",
                        "ContentLengthError", "InvalidURLError"):
                record.msg = f"bad HTTP request: {name}"
                record.args = ()
                record.exc_info = None
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def setup_logging(config: LoggingConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    logging.getLogger("aiohttp.server").addFilter(_NoTracebackForBadRequests())
    logging.getLogger("aiohttp.access").disabled = True
