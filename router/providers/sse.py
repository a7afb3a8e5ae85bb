"""Server-sent events the router writes itself: an in-band error and the end marker."""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def data_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_event(message: str, type_: str = "upstream_error", code: str | None = None) -> bytes:
    """One `error` event; OpenAI's SDK raises an APIError when it reads it."""
    body = orjson.dumps({"error": {"message": message, "type": type_, "code": code}})
    return b"event: error\ndata: " + body + b"\n\n"


def at_event_boundary(tail: bytes) -> bool:
    """Whether the bytes relayed so far end between two events (or nothing was sent)."""
    return not tail or tail.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))
