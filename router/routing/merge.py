"""`fanout: all`: every backend of the route answers, and the client gets one answer.

JSON: the `choices` of every backend, in the route's backend order, re-indexed 0..k-1, each
tagged `"backend": name`; `usage` summed. A stream: each upstream's events, as they arrive
(whole events only), with `choices[].index` remapped (backend number x n + the upstream's index)
and tagged, then one summed usage event, then one `data: [DONE]` once every upstream ended. This
is the one place the router re-encodes SSE: the index must change. A backend that fails gives a
choice (a chunk, when streamed) with `finish_reason: "error"` and the error, and the others
still arrive; if every backend fails the client gets the last error, as from one backend.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from router.errors import RouterError, UpstreamError
from router.metrics import Metrics
from router.providers import Exchange
from router.providers.sse import DONE, EventCutter, data_event, event_data
from router.routing.dispatch import (
    Opened,
    Outbound,
    attempt_or_error,
    check_json,
    count_tokens,
    finish_if_opened,
    spawn_counted,
    unavailable,
)
from router.routing.health import BackendState
from router.routing.table import Backend, Route

QUEUE_EVENTS = 64  # batches of events waiting for the client: past it, upstreams wait too
_EVENT = re.compile(rb".*?(?:\r\n\r\n|\n\n|\r\r)", re.DOTALL)
_EVENT_NAME = re.compile(rb"^event:[ \t]*(\S+)", re.MULTILINE)


@dataclass(slots=True)
class Combined(Opened):
    """The merged answer, relayed like any other. Each part's slot is released by its own
    finish(); this one's closes the stream's upstreams if they are still running."""

    merger: StreamMerger | None = None

    def record_usage(self, usage: dict[str, Any]) -> None:
        pass  # the summed usage event: each backend's part was counted as it arrived

    def finish(self, upstream_failed: bool) -> None:
        if self._finished:
            return
        self._finished = True
        self.exchange.close()
        if self.merger is not None:
            self.tokens = self.merger.tokens()


async def ask_all(route: Route, out: Outbound) -> Opened:
    width = route.config.fanout_width or len(route.backends)
    tried: set[str] = set()
    while len(tried) < width and (backend := route.pick(tried)) is not None:
        tried.add(backend.name)
    if not tried:
        raise unavailable(route)
    # The route's order, whatever order the strategy picked them in: indices are stable.
    backends = [b for b in route.backends if b.name in tried]
    body, metrics = out.body, out.metrics
    n = int(body.get("n") or 1)  # validated: an integer, or a float such as 2.0
    group = Backend(",".join(b.name for b in backends), backends[0].provider, "", 1.0, None,
                    BackendState())
    started = time.monotonic()
    if out.stream:
        merger = StreamMerger(route, backends, out, n)
        merger.start()
        try:
            first = await merger.first_events()
        except BaseException:
            merger.close()
            raise
        options = body.get("stream_options")
        asked = isinstance(options, dict) and options.get("include_usage") not in (None, False)
        exchange = Exchange(200, "text/event-stream", merger.rest(), merger.close)
        return Combined(group, route, exchange, first, len(backends), metrics, started,
                        time.monotonic() - started, None, hide_usage=not asked, merger=merger)
    answers = await _gather(route, backends, out)
    merged = merge_json(route, backends, answers, n)
    tokens = _tokens([(a.tokens, len(a.first)) for a in answers if isinstance(a, Opened)])
    exchange = Exchange(200, "application/json", _nothing(), _noop)
    return Combined(group, route, exchange, merged, len(backends), metrics, started,
                    time.monotonic() - started, tokens)


async def _gather(route: Route, backends: list[Backend], out: Outbound
                  ) -> list[Opened | RouterError]:
    """Every backend's whole JSON answer (or error); the last error if all of them failed."""
    metrics = out.metrics
    tasks = [spawn_counted(b, partial(attempt_or_error, route, b, out, i + 1), "fanout-all")
             for i, b in enumerate(backends)]
    last_error: RouterError | None = None
    pending = set(tasks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                result = task.result()
                if isinstance(result, RouterError):
                    last_error = result
    except BaseException:  # the client left: nobody wants any of them now
        for task in tasks:
            failed = task.done() and isinstance(task.result(), RouterError)
            task.cancel()
            task.add_done_callback(finish_if_opened)
            _count(metrics, "failed" if failed else "cancelled")
        raise
    answers = [t.result() for t in tasks]
    for answer in answers:
        _count(metrics, "failed" if isinstance(answer, RouterError) else "won")
        if isinstance(answer, Opened):
            answer.bytes_relayed = len(answer.first)
            answer.finish(upstream_failed=False)  # read whole: the slot is free
    if last_error is not None and not any(isinstance(a, Opened) for a in answers):
        raise last_error
    return answers


def merge_json(route: Route, backends: list[Backend], answers: list[Opened | RouterError],
               n: int) -> bytes:
    """One chat.completion of every answer (an error choice for each failed one)."""
    choices: list[dict[str, Any]] = []
    usage: dict[str, int] = {}
    created: object = None
    for backend, answer in zip(backends, answers, strict=True):
        if isinstance(answer, RouterError):
            choices.extend({"index": i, "backend": backend.name, "finish_reason": "error",
                            "message": {"role": "assistant", "content": None},
                            "logprobs": None, "error": answer.body()["error"]}
                           for i in range(n))
            continue
        parsed = check_json(answer.first)  # checked when it arrived: it parses
        if created is None:
            created = parsed.get("created")
        own = [c for c in parsed.get("choices") or () if isinstance(c, dict)]
        own.sort(key=_own_index)
        for choice in own:
            choice["backend"] = backend.name
            choices.append(choice)
        _add_usage(usage, parsed.get("usage"))
    for i, choice in enumerate(choices):
        choice["index"] = i
    merged: dict[str, Any] = {
        "id": _new_id(), "object": "chat.completion",
        "created": created if isinstance(created, int) else int(time.time()),
        "model": route.name, "choices": choices,
    }
    if usage:
        merged["usage"] = usage
    return orjson.dumps(merged)


def _tokens(parts: list[tuple[tuple[int, int] | None, int]]) -> tuple[int, int] | None:
    """What the backends used, from (reported tokens, bytes relayed) of each that answered:
    the reported usage, plus bytes / 4 for one that reported none; None when none reported
    (the limiter then estimates from the bytes relayed)."""
    reported = [t for t, _ in parts if t is not None]
    if not reported:
        return None
    prompt = sum(t[0] for t in reported)
    completion = sum(t[1] for t in reported) + sum(size // 4 for t, size in parts if t is None)
    return prompt, completion


def _own_index(choice: dict[str, Any]) -> int:
    index = choice.get("index")
    return index if isinstance(index, int) else 0


def _add_usage(total: dict[str, int], usage: object) -> None:
    if not isinstance(usage, dict):
        return
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            total[key] = total.get(key, 0) + value
        else:
            total.setdefault(key, 0)


@dataclass(eq=False, slots=True)
class _Part:
    """One backend's stream in the merge."""

    number: int  # its place in the route's order: its choices are number * n + index
    backend: Backend
    task: asyncio.Task[None] | None = None
    done: bool = False  # its [DONE] arrived
    ended: bool = False  # its pump finished (answered, or failed)
    finished: set[int] = field(default_factory=set)  # its own indices with a finish_reason
    usage: dict[str, Any] | None = None
    tokens: tuple[int, int] | None = None
    relayed: int = 0  # bytes of its events put out


class StreamMerger:
    """One pump task per upstream puts remapped events on a bounded queue; the client's relay
    reads them through `rest()`. `close()` cancels the pumps still running, which closes their
    upstream connections and frees their slots."""

    def __init__(self, route: Route, backends: list[Backend], out: Outbound, n: int) -> None:
        self.route = route
        self.out = out
        self.n = n
        self.metrics = out.metrics
        self.parts = [_Part(i, b) for i, b in enumerate(backends)]
        self.queue: asyncio.Queue[tuple[bytes, bool] | None] = asyncio.Queue(QUEUE_EVENTS)
        self.live = len(self.parts)  # pumps whose end the reader has not seen yet
        self.last_error: RouterError | None = None
        self.id = _new_id()
        self.created = int(time.time())
        self.extra: dict[tuple[int, str], int] = {}  # indices an upstream sent outside 0..n-1
        self.closed = False

    def start(self) -> None:
        for part in self.parts:
            part.task = spawn_counted(part.backend, partial(self._pump, part), "fanout-all")

    async def first_events(self) -> bytes:
        """The events up to the first content chunk of any backend: the merge is committed.
        Raises the last error when every backend failed before sending any."""
        buffered: list[bytes] = []
        while self.live:
            item = await self.queue.get()
            if item is None:
                self.live -= 1
                continue
            buffered.append(item[0])
            if item[1]:
                return b"".join(buffered)
        if any(p.done for p in self.parts):  # answered, with no content at all
            return b"".join(buffered)
        raise self.last_error or UpstreamError("no backend answered")

    async def rest(self) -> AsyncIterator[bytes]:
        """Everything after `first_events()`: the remaining events as they come (what is queued
        goes in one write), then the summed usage and one [DONE]."""
        queue = self.queue
        while self.live:
            out: list[bytes] = []
            item = await queue.get()
            while True:
                if item is None:
                    self.live -= 1
                else:
                    out.append(item[0])
                if queue.empty():
                    break
                item = queue.get_nowait()
            if out:
                yield b"".join(out)
        yield self._usage_event() + DONE

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for part in self.parts:
            if part.task is not None and not part.task.done():
                part.task.cancel()
                if not part.ended:
                    _count(self.metrics, "cancelled")

    def tokens(self) -> tuple[int, int] | None:
        return _tokens([(p.tokens, p.relayed) for p in self.parts])

    async def _pump(self, part: _Part) -> None:
        result = await attempt_or_error(self.route, part.backend, self.out, part.number + 1)
        if isinstance(result, RouterError):
            await self._fail(part, result)
            return
        broken: UpstreamError | None = None
        try:
            cutter = EventCutter()
            await self._put(part, cutter.feed(result.first))
            async for chunk in result.exchange.chunks:
                if part.done:
                    break
                await self._put(part, cutter.feed(chunk))
            if not part.done:
                if cutter.pending.strip() == DONE.strip():
                    part.done = True  # `data: [DONE]` without its blank line: still the end
                else:
                    raise UpstreamError("the upstream ended the stream without [DONE]")
        except UpstreamError as exc:
            broken = exc
        finally:  # also when cancelled: the client left
            if part.usage is not None:
                part.tokens = count_tokens({"usage": part.usage}, self.route, part.backend,
                                           self.metrics)
            result.finish(upstream_failed=broken is not None)
        if broken is not None:
            await self._fail(part, broken)
            return
        part.ended = True
        _count(self.metrics, "won")
        await self.queue.put(None)

    async def _put(self, part: _Part, events: bytes) -> None:
        """Remap whole events and queue them (an upstream's `usage` is kept, not relayed)."""
        out: list[bytes] = []
        for match in _EVENT.finditer(events):
            event = match.group()
            data = event_data(event)
            name = _EVENT_NAME.search(event)
            if name is not None and name.group(1) == b"error":
                raise UpstreamError("the upstream sent an error event")
            if not data or (name is not None and name.group(1) != b"message"):
                continue  # a comment (keep-alive), or an event type this dialect does not have
            if data.strip() == b"[DONE]":
                part.done = True
                break
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamError("the upstream sent an event that is not JSON") from None
            if not isinstance(payload, dict) or "error" in payload:
                raise UpstreamError("the upstream sent an error in its stream")
            usage = payload.pop("usage", None)
            if isinstance(usage, dict):
                part.usage = usage
            choices = payload.get("choices")
            if not isinstance(choices, list) or not choices:
                continue  # the usage-only event: the merge sends one, summed, at the end
            for choice in choices:
                if isinstance(choice, dict):
                    own = choice.get("index")
                    choice["index"] = self._index(part, own)
                    choice["backend"] = part.backend.name
                    if choice.get("finish_reason") is not None and isinstance(own, int):
                        part.finished.add(own)
            payload["id"] = self.id
            payload["model"] = self.route.name
            out.append(data_event(payload))
        if out:
            batch = b"".join(out)
            part.relayed += len(batch)
            await self.queue.put((batch, True))

    def _index(self, part: _Part, own: object) -> int:
        n = self.n
        if isinstance(own, int) and not isinstance(own, bool) and 0 <= own < n:
            return part.number * n + own
        key = (part.number, repr(own))  # an upstream that ignored `n`: past every reserved one
        found = self.extra.get(key)
        if found is None:
            found = self.extra[key] = len(self.parts) * n + len(self.extra)
        return found

    async def _fail(self, part: _Part, error: RouterError) -> None:
        """A chunk that ends this backend's unfinished choices with `finish_reason: error`."""
        self.last_error = error
        part.ended = True
        _count(self.metrics, "failed")
        detail = error.body()["error"]
        choices = [{"index": part.number * self.n + i, "backend": part.backend.name,
                    "delta": {}, "finish_reason": "error", "logprobs": None, "error": detail}
                   for i in range(self.n) if i not in part.finished]
        if choices:
            await self.queue.put((data_event(self._chunk(choices)), False))
        await self.queue.put(None)

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.route.name, "choices": choices, **extra}

    def _usage_event(self) -> bytes:
        usage: dict[str, int] = {}
        for part in self.parts:
            _add_usage(usage, part.usage)
        return data_event(self._chunk([], usage=usage)) if usage else b""


def _count(metrics: Metrics, outcome: str) -> None:
    metrics.fanout("all", outcome)


def _new_id() -> str:
    return "chatcmpl-" + os.urandom(12).hex()


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


def _noop() -> None:
    pass
