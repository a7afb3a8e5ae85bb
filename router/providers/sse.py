"""Server-sent events the router writes itself: an in-band error and the end marker."""

from __future__ import annotations

from typing import Any

import orjson

from router.errors import UpstreamError

DONE = b"data: [DONE]\n\n"


def data_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_event(message: str, type_: str = "upstream_error", code: str | None = None) -> bytes:
    """One `error` event; OpenAI's SDK raises an APIError when it reads it."""
    body = orjson.dumps({"error": {"message": message, "type": type_, "code": code}})
    return b"event: error\ndata: " + body + b"\n\n"


class EventTooLarge(UpstreamError):
    pass


MAX_EVENT_BYTES = 1 << 20
_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")


class EventCutter:
    """Holds back a partial event so only whole events reach the client, byte for byte.

    Upstreams usually write one or more whole events per chunk (the fast path); a chunk split
    inside an event waits for the rest. A torn stream then never leaves half an event behind.
    """

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """The complete events now available (possibly b"")."""
        if self.pending:
            chunk = self.pending + chunk
            self.pending = b""
        if chunk.endswith(_ENDS):
            return chunk
        cut = max(chunk.rfind(end) + len(end) if end in chunk else 0 for end in _ENDS)
        self.pending = chunk[cut:]
        if len(self.pending) > MAX_EVENT_BYTES:
            raise EventTooLarge(f"the upstream sent an SSE event over {MAX_EVENT_BYTES} bytes")
        return chunk[:cut]
