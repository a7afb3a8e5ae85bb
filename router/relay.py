"""Upstream bytes -> client response. Streams are relayed chunk by chunk, never re-encoded.

After the first byte went out there is no fallback: an upstream failure becomes one SSE `error`
event (after closing a torn event), then a clean end of the chunked response.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from aiohttp import web

from router.errors import UpstreamError
from router.providers.sse import at_event_boundary, error_event
from router.routing.dispatch import Opened

log = logging.getLogger("router.relay")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def relay_json(opened: Opened, headers: Mapping[str, str]) -> web.Response:
    opened.finish(ok=True)
    resp = web.Response(status=opened.exchange.status, body=opened.first, headers=headers)
    resp.content_type = "application/json"
    return resp


class ActiveStreams:
    """Streams being relayed, so a draining server can end the ones that outlive the grace."""

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[object], bool] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def abort_all(self) -> None:
        for task in self._tasks:
            self._tasks[task] = True
            task.cancel()

    def add(self, task: asyncio.Task[object]) -> None:
        self._tasks[task] = False

    def discard(self, task: asyncio.Task[object]) -> bool:
        """Forget the task; True when it was aborted by the drain."""
        return self._tasks.pop(task, False)

    def aborted(self, task: asyncio.Task[object]) -> bool:
        return self._tasks.get(task, False)


async def relay_stream(request: web.Request, opened: Opened, headers: Mapping[str, str],
                       streams: ActiveStreams) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={**headers, **SSE_HEADERS})
    task = asyncio.current_task()
    assert task is not None
    streams.add(task)
    ok = False
    prev = last = b""
    try:
        await resp.prepare(request)
        last = opened.first
        await resp.write(last)
        try:
            async for chunk in opened.exchange.chunks:
                await resp.write(chunk)
                prev, last = last, chunk
            ok = True
        except UpstreamError as exc:
            log.warning("stream from %s broke: %s", opened.backend.name, exc.message)
            await _end_with_error(resp, prev, last, "upstream failed mid-stream")
            return resp
        await resp.write_eof()
    except asyncio.CancelledError:
        if streams.aborted(task):
            # Shutdown grace ran out: tell the client why, then end cleanly.
            task.uncancel()
            await _end_with_error(resp, prev, last, "the router is shutting down")
            return resp
        raise  # the client left: finish() closes the upstream
    except ConnectionError:
        pass  # the client left mid-write
    finally:
        streams.discard(task)
        opened.finish(ok=ok)
    return resp


async def _end_with_error(resp: web.StreamResponse, prev: bytes, last: bytes,
                          message: str) -> None:
    tail = prev[-4:] + last[-4:]
    event = error_event(message, "upstream_error", "stream_interrupted")
    try:
        await resp.write(event if at_event_boundary(tail) else b"\n\n" + event)
        await resp.write_eof()
    except ConnectionError:
        pass
