"""Logging: one JSON object per line (or plain text), through the standard logging module."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from router.config.model import LoggingConfig


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
