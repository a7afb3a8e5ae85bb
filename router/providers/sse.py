"""Server-sent events: the ones the router writes itself (an in-band error, the end marker),
cutting an upstream stream into whole events, and reading its `usage`."""

from __future__ import annotations

import re
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


_USAGE = b'"usage"'
_NULL_USAGE = (b'"usage":null', b'"usage": null')
_EVENT = re.compile(rb".*?(?:\r\n\r\n|\n\n|\r\r)", re.DOTALL)


# What makes a stream's answer begin: text (not the empty content of a role-only first chunk),
# a tool call, a finish reason, or the stream's end. A race's stream wins on the first of these.
_CONTENT = re.compile(rb'"(?:content|reasoning_content|refusal)"\s*:\s*"[^"]'
                      rb'|"tool_calls"\s*:\s*\[|"finish_reason"\s*:\s*"|\[DONE\]')


def carries_content(data: bytes) -> bool:
    return _CONTENT.search(data) is not None


def may_carry_usage(events: bytes) -> bool:
    """Whether whole events may carry a non-null `usage`: two substring counts, no parsing.

    False only when no event can hold one (a false positive merely costs a parse)."""
    n = events.count(_USAGE)
    return n > 0 and n > events.count(_NULL_USAGE[0]) + events.count(_NULL_USAGE[1])


def event_data(event: bytes) -> bytes:
    """The data of one SSE event: its `data:` lines joined by newlines."""
    lines = [line[5:] for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)


class UsageTap:
    """Reads a stream's `usage` from whole events and, when `hide` (the client did not ask for
    it), drops the usage-only event (`"choices": []`); every other byte passes unchanged.

    Some servers put `usage` on the last content chunk instead: it is read there and the event
    kept. The last non-null `usage` seen wins (cumulative per-chunk usage ends up right). A
    Responses stream carries it in its `response.completed` event, as `response.usage`."""

    __slots__ = ("hide", "usage")

    def __init__(self, hide: bool) -> None:
        self.hide = hide
        self.usage: dict[str, Any] | None = None

    def take(self, events: bytes) -> bytes:
        """The events to relay; call only when `may_carry_usage(events)`."""
        kept: list[bytes] = []
        dropped = False
        end = 0
        for match in _EVENT.finditer(events):
            event = match.group()
            end = match.end()
            if may_carry_usage(event) and self._read(event) and self.hide:
                dropped = True
            else:
                kept.append(event)
        if not dropped:
            return events
        kept.append(events[end:])  # stray bytes after the last boundary (e.g. a third newline)
        return b"".join(kept)

    def _read(self, event: bytes) -> bool:
        """Take the event's usage; True when the event is usage only (no choices)."""
        try:
            payload = orjson.loads(event_data(event))
        except orjson.JSONDecodeError:
            return False
        if not isinstance(payload, dict):
            return False
        usage = payload.get("usage")
        if not isinstance(usage, dict):
            response = payload.get("response")  # a Responses event: never hidden
            if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                self.usage = response["usage"]
            return False
        self.usage = usage
        return not payload.get("choices")
