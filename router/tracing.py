"""W3C trace context: a client's `traceparent` (and `tracestate`) go upstream unchanged, and the
trace id goes into the access log, so one request can be followed from the client through the
router to the backend. A malformed `traceparent` is not forwarded (nor its `tracestate`)."""

from __future__ import annotations

import re
from collections.abc import Mapping

# version-traceid-parentid-flags; version ff and all-zero ids are invalid.
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}"
                          r"-[0-9a-f]{2}(?:-[ -~]*)?")
MAX_TRACESTATE = 512
_PRINTABLE_ASCII = re.compile(r"[ -~]*")

Trace = tuple[tuple[str, str], ...]


def trace_headers(headers: Mapping[str, str]) -> Trace:
    """The trace-context headers to send upstream: none unless `traceparent` is well formed."""
    parent = headers.get("traceparent")
    if parent is None or _TRACEPARENT.fullmatch(parent) is None:
        return ()
    state = headers.get("tracestate")
    if state is None or len(state) > MAX_TRACESTATE or _PRINTABLE_ASCII.fullmatch(state) is None:
        return (("traceparent", parent),)
    return (("traceparent", parent), ("tracestate", state))


def trace_id(headers: Mapping[str, str]) -> str | None:
    """The trace id of a well-formed `traceparent`, for the access log."""
    parent = headers.get("traceparent")
    if parent is None:
        return None
    match = _TRACEPARENT.fullmatch(parent)
    return None if match is None else match.group(1)
