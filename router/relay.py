"""Upstream bytes -> client response. Streams are relayed chunk by chunk, never re-encoded.

After the first byte went out there is no fallback: an upstream failure becomes one SSE `error`
event, then a clean end of the chunked response; a partial event is never sent. A stream ends
with `data: [DONE]`, or (the Responses API's) with its terminal event. A heartbeat over
all live streams sends SSE comments through long silences and ends streams whose upstream
trickles bytes without completing an event. A stream's `usage` is read on the way (a substring
test per batch, a parse only of the event that carries it); the usage-only chunk the router asked
for on the client's behalf is the one event not relayed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from router.errors import UpstreamError
from router.metrics import Metrics
from router.providers.sse import DONE, EventCutter, UsageTap, error_event, may_carry_usage
from router.routing.dispatch import Opened

log = logging.getLogger("router.relay")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
KEEPALIVE = b": keep-alive\n\n"
TAIL = 16  # enough for b"data: [DONE]\n\n" and an event boundary


def relay_json(opened: Opened, headers: Mapping[str, str]) -> web.Response:
    opened.bytes_relayed = len(opened.first)
    opened.finish(upstream_failed=False)
    # `headers` are the router's own (rate limits, session, backend), never a Content-Type:
    # aiohttp refuses both that header and `content_type`.
    return web.Response(status=opened.exchange.status, body=opened.first, headers=headers,
                        content_type="application/json")


@dataclass(eq=False, slots=True)
class LiveStream:
    task: asyncio.Task[object]
    resp: web.StreamResponse
    idle_timeout_s: float
    last_write: float
    last_event: float
    tail: bytes = b""  # the last bytes handed to the transport (updated before each write)
    writing: bool = False  # inside a write that waits for the client to read
    abort_reason: str | None = None
    abort_blames_upstream: bool = False

    def ended_with_done(self) -> bool:
        return self.tail.rstrip().endswith(b"[DONE]")


class ActiveStreams:
    """Live streams: counted for the cap, ended by the drain, kept alive by the heartbeat."""

    def __init__(self) -> None:
        self._live: set[LiveStream] = set()

    def __len__(self) -> int:
        return len(self._live)

    def add(self, stream: LiveStream) -> None:
        self._live.add(stream)

    def discard(self, stream: LiveStream) -> None:
        self._live.discard(stream)

    def abort_all(self, reason: str) -> None:
        for stream in self._live:
            _abort(stream, reason, blames_upstream=False)

    async def heartbeat(self, keepalive_s: float, write_stall_s: float,
                        every_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            for stream in list(self._live):
                if stream.abort_reason is not None:
                    continue
                if stream.writing:
                    if now - stream.last_write > write_stall_s:
                        _abort(stream, "the client stopped reading", blames_upstream=False)
                elif now - stream.last_event > stream.idle_timeout_s:
                    _abort(stream, "the upstream sent no complete event within idle_timeout_s",
                           blames_upstream=True)
                elif now - stream.last_write >= keepalive_s:
                    # Only whole events are ever written, so a comment fits in between.
                    stream.last_write = now
                    try:
                        async with asyncio.timeout(1.0):
                            await stream.resp.write(KEEPALIVE)
                    except (TimeoutError, ConnectionError, RuntimeError):
                        pass  # a stuck or gone client is the relay's to notice


def _abort(stream: LiveStream, reason: str, *, blames_upstream: bool) -> None:
    stream.abort_reason = reason
    stream.abort_blames_upstream = blames_upstream
    stream.task.cancel()


def responses_stream_ended(last: bytes) -> bool:
    """Whether a Responses stream's last events end it: it has no `[DONE]`, its last event is
    `response.completed`, `response.failed`, `response.incomplete` or `error`."""
    return _RESPONSE_END.search(last) is not None


_RESPONSE_END = re.compile(
    rb'"type"\s*:\s*"(?:response\.(?:completed|failed|incomplete)|error)"|^event:\s*error\b',
    re.MULTILINE)


async def relay_stream(request: web.Request, opened: Opened, headers: Mapping[str, str],
                       streams: ActiveStreams, metrics: Metrics,
                       ended: Callable[[bytes], bool] | None = None) -> web.StreamResponse:
    """`ended(last)`: whether the last events relayed end the stream when it has no `data:
    [DONE]` (the Responses API's streams); None: only `[DONE]` does."""
    resp = web.StreamResponse(status=200, headers={**headers, **SSE_HEADERS})
    task = asyncio.current_task()
    assert task is not None
    now = time.monotonic()
    live = LiveStream(task, resp, opened.route.config.idle_timeout_s, now, now)
    streams.add(live)
    metrics.stream_opened()
    upstream_failed = False
    usage = UsageTap(hide=opened.hide_usage)
    try:
        await resp.prepare(request)
        cutter = EventCutter()
        try:
            events = cutter.feed(opened.first)
            if events and may_carry_usage(events):
                events = usage.take(events)
            last = events
            if events:
                live.tail = events[-TAIL:]
                await resp.write(events)
                opened.bytes_relayed += len(events)
            async for chunk in opened.exchange.chunks:
                events = cutter.feed(chunk)
                if not events:
                    continue
                if may_carry_usage(events):  # a substring count; parsed only when it says so
                    events = usage.take(events)
                    if not events:  # only the usage chunk the client did not ask for
                        live.last_event = time.monotonic()
                        continue
                live.tail = events[-TAIL:] if len(events) >= TAIL else \
                    (live.tail + events)[-TAIL:]
                live.last_write = live.last_event = time.monotonic()
                live.writing = True
                await resp.write(events)  # waits while the client's buffer is full
                live.writing = False
                opened.bytes_relayed += len(events)
                last = events
            if cutter.pending.strip() == DONE.strip():
                # `data: [DONE]` without its blank line: still the end; relay it as sent.
                live.tail = cutter.pending
                await resp.write(cutter.pending)
                opened.bytes_relayed += len(cutter.pending)
            if not live.ended_with_done() and (ended is None or not ended(last)):
                # Every stream ends with exactly one terminator: [DONE] or an error event.
                upstream_failed = True
                await _end_with_error(live, "the upstream ended the stream without [DONE]")
                return resp
        except UpstreamError as exc:
            log.warning("stream from %s broke: %s", opened.backend.name, exc.message)
            upstream_failed = True
            await _end_with_error(live, "upstream failed mid-stream")
            return resp
        await resp.write_eof()
    except asyncio.CancelledError:
        if live.abort_reason is None:
            raise  # the client left: finish() closes the upstream
        # Ended by the router (drain deadline, idle upstream): say why, then end cleanly.
        task.uncancel()
        upstream_failed = live.abort_blames_upstream
        log.warning("stream from %s ended: %s", opened.backend.name, live.abort_reason)
        await _end_with_error(live, live.abort_reason)
    except ConnectionError:
        pass  # the client left mid-write
    finally:
        streams.discard(live)
        metrics.stream_closed()
        if usage.usage is not None:
            opened.record_usage(usage.usage)  # before finish(): the limiter settles after it
        opened.finish(upstream_failed=upstream_failed)
    return resp


async def _end_with_error(live: LiveStream, message: str) -> None:
    event = error_event(message, "upstream_error", "stream_interrupted")
    try:
        async with asyncio.timeout(5.0):
            await live.resp.write(event)
            await live.resp.write_eof()
    except (TimeoutError, ConnectionError):
        pass
