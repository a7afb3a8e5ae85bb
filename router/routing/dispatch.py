"""Try backends in order (strategy, retries, fallbacks) until one answers in time.

A stream is committed once its first chunk arrives inside `first_byte_timeout_s`; a JSON answer
is committed once its whole body arrived. Until then a failed backend means the next one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from router.errors import (
    Overloaded,
    RouterError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from router.metrics import Metrics
from router.providers import Exchange, UpstreamCall
from router.providers.base import CannotServe, leaks_secret, read_all
from router.providers.sse import carries_content
from router.routing.table import Backend, Route
from router.tasks import spawn

log = logging.getLogger("router.dispatch")
T = TypeVar("T")

MAX_ERROR_BODY = 64 * 1024
CONTENT_PEEK_BYTES = 64 * 1024  # a race's stream: read this much for content, at most


class UpstreamAnswer(RouterError):
    """A 4xx that is the client's own fault (bad parameters, context too long): relayed as is."""

    log_level = logging.INFO

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__("upstream rejected the request")
        self.status = status  # type: ignore[misc]
        self._body = body

    def body(self) -> dict[str, Any]:
        return self._body


@dataclass(frozen=True, slots=True)
class Outbound:
    """What goes upstream for one client request, whichever backends are asked: the body as
    the client sent it (each attempt sets its backend's model), and how to ask."""

    body: dict[str, Any]
    stream: bool
    request_id: str
    max_response_bytes: int
    metrics: Metrics
    trace: tuple[tuple[str, str], ...] = ()  # the client's W3C trace context
    endpoint: str = "chat"


@dataclass(slots=True)
class Opened:
    """A committed upstream answer. `finish()` must be called exactly once."""

    backend: Backend
    route: Route
    exchange: Exchange
    first: bytes  # the whole body for JSON; the first chunk for streams
    attempts: int
    metrics: Metrics
    opened_at: float
    ttfb_s: float
    tokens: tuple[int, int] | None  # (prompt, completion) when the upstream reported usage
    hide_usage: bool = False  # a stream whose usage chunk the router asked for, not the client
    bytes_relayed: int = 0  # upstream bytes written to the client (whole events for streams)
    _finished: bool = False

    def relayed(self) -> int:
        """The answer's bytes that reached the client (a JSON answer is relayed whole)."""
        if self.bytes_relayed or "event-stream" in self.exchange.content_type:
            return self.bytes_relayed
        return len(self.first)

    def record_usage(self, usage: dict[str, Any]) -> None:
        """A stream's `usage`, read by the relay at its end: kept and counted like JSON's."""
        self.tokens = count_tokens({"usage": usage}, self.route, self.backend, self.metrics)

    def finish(self, upstream_failed: bool) -> None:
        """Release the slot and close the exchange; count a failure only if the upstream was at
        fault (a client that leaves or stops reading says nothing about the backend)."""
        if self._finished:
            return
        self._finished = True
        self.exchange.close()
        self.backend.state.inflight -= 1
        m = self.metrics
        m.upstream_done(self.backend.name, time.monotonic() - self.opened_at)
        if upstream_failed:
            count_upstream_failure(self.route, self.backend, m, "stream_broken")


def count_upstream_failure(route: Route, backend: Backend, metrics: Metrics, reason: str
                           ) -> None:
    """One more failure of `backend`; logged and counted when it ejects the backend."""
    if backend.state.record_failure(route.config.ejection):
        log.warning("backend %s ejected (%s)", backend.name, reason)
        metrics.ejected(backend.name, reason)


async def dispatch(route: Route, out: Outbound, prefer: Backend | None = None) -> Opened:
    """`prefer` (a session's pinned backend, checked available by the caller) goes first; if it
    fails, the route's strategy picks the next as usual."""
    tried: set[str] = set()
    last_error: RouterError | None = None
    attempts = 0
    for r in route.chain():
        for _ in range(r.config.retries + 1):
            backend, prefer = (prefer, None) if prefer is not None else (r.pick(tried), None)
            if backend is None:
                break
            tried.add(backend.name)
            attempts += 1
            if last_error is not None:
                out.metrics.retried(route.name, last_error.code or "error")
            try:
                return await attempt(r, backend, out, attempts)
            except Retryable as exc:
                last_error = exc.error
                log.info("backend %s failed: %s", backend.name, exc.error.message)
    if last_error is not None:
        raise last_error
    raise unavailable(route)


def unavailable(route: Route) -> RouterError:
    """No backend could be asked: 429 while every one rests after an upstream 429, else 503."""
    rests = [rest for r in route.chain() if (rest := r.rest_remaining()) is not None]
    if rests:
        return UpstreamRateLimited("every upstream for this model asked to wait",
                                   headers={"Retry-After": str(max(1, math.ceil(min(rests))))})
    return Overloaded("every backend of this route is at its concurrency limit or down",
                      headers={"Retry-After": "1"})


class Retryable(Exception):
    """An attempt failed in a way another backend may not (it is tried next); `error` is what
    the client sees if none does."""

    def __init__(self, error: RouterError) -> None:
        self.error = error


async def attempt_or_error(route: Route, backend: Backend, out: Outbound, attempts: int,
                           until_content: bool = False) -> Opened | RouterError:
    """One copy of a fanned-out request: its answer, or the error the client would see."""
    try:
        return await attempt(route, backend, out, attempts, until_content)
    except Retryable as exc:
        log.info("backend %s failed: %s", backend.name, exc.error.message)
        return exc.error
    except RouterError as exc:  # an upstream 4xx that blames the request
        return exc


def spawn_counted(backend: Backend, run: Callable[[], Awaitable[T]], name: str
                  ) -> asyncio.Task[T]:
    """A task whose `run()` calls attempt() on `backend`, that backend's slot counted from now:
    a pick and its count in one step (as in dispatch()), so `max_concurrency` holds while the
    task waits for its first turn, and a task cancelled before that turn gives the slot back."""
    state = backend.state
    state.inflight += 1
    started = False

    async def counted() -> T:
        nonlocal started
        started = True
        state.inflight -= 1  # attempt() counts it again before it first waits
        return await run()

    def unstarted(_: asyncio.Task[T]) -> None:
        if not started:
            state.inflight -= 1

    task = spawn(counted(), name)
    task.add_done_callback(unstarted)
    return task


def finish_if_opened(task: asyncio.Task[Opened | RouterError]) -> None:
    """Done callback of a fanned-out copy that lost: if it answered after all (it finished
    before its cancellation landed), release that answer."""
    if not task.cancelled():
        result = task.result()
        if isinstance(result, Opened):
            result.finish(upstream_failed=False)


async def attempt(route: Route, backend: Backend, out: Outbound, attempts: int,
                  until_content: bool = False) -> Opened:
    """One backend asked once. A stream commits at its first chunk, or with `until_content`
    (a race) once it carries content: a role-only first chunk sent at once proves nothing."""
    cfg = route.config
    stream, metrics = out.stream, out.metrics
    upstream_body = dict(out.body)
    upstream_body["model"] = backend.model
    upstream_body.pop("session_id", None)
    # A Responses stream always ends with its usage (`response.completed`): nothing to ask.
    hide_usage = stream and out.endpoint != "responses" and _ask_for_usage(upstream_body)
    call = UpstreamCall(upstream_body, stream, out.request_id, route.timeouts,
                        out.max_response_bytes, out.trace, out.endpoint)
    state = backend.state
    state.inflight += 1
    exchange: Exchange | None = None
    committed = False
    first_byte_s = cfg.first_byte_timeout_s
    tokens = None  # a stream's usage is read by the relay (Opened.record_usage)
    started = time.monotonic()
    try:
        # No timer at all when no first-byte timeout is set: this is every request's path.
        if first_byte_s is None:
            exchange = await backend.provider.open(call)
        else:
            async with asyncio.timeout(first_byte_s):
                exchange = await backend.provider.open(call)
        if exchange.status >= 300:
            raise await _refusal(route, backend, exchange)
        if stream:
            if until_content:
                async with asyncio.timeout(None if first_byte_s is None else
                                           first_byte_s - (time.monotonic() - started)):
                    first = await _until_content(exchange)
            elif first_byte_s is None:
                first = await anext(exchange.chunks, b"")
            else:
                async with asyncio.timeout(first_byte_s - (time.monotonic() - started)):
                    first = await anext(exchange.chunks, b"")
            ttfb = time.monotonic() - started
        else:
            # A JSON answer's head is its first byte; the body may take the whole timeout_s.
            ttfb = time.monotonic() - started
            first = await read_all(exchange.chunks, out.max_response_bytes)
            tokens = count_tokens(check_json(first), route, backend, metrics)
        state.record_ttfb(ttfb)
        metrics.first_byte(route.name, backend.name, ttfb)
        state.record_success()
        committed = True
        return Opened(backend, route, exchange, first, attempts, metrics, started, ttfb, tokens,
                      hide_usage)
    except TimeoutError:
        count_upstream_failure(route, backend, metrics, "timeout")
        raise Retryable(UpstreamTimeout(
            f"no first byte from upstream within {cfg.first_byte_timeout_s} s")) from None
    except UpstreamError as exc:
        count_upstream_failure(route, backend, metrics, exc.code or "error")
        raise Retryable(exc) from exc
    except CannotServe as exc:  # this backend's API lacks a parameter: another may have it
        raise Retryable(exc) from exc
    finally:
        if not committed:
            state.inflight -= 1
            if exchange is not None:
                exchange.close()


def _ask_for_usage(body: dict[str, Any]) -> bool:
    """Ask the upstream for the stream's usage (`stream_options.include_usage`), keeping the
    client's other options. True when the client did not ask itself: the relay hides the chunk."""
    options = body.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        return False  # the client's malformed options go as sent; the upstream answers them
    if options.get("include_usage") not in (None, False):
        return False  # asked for (or malformed: the upstream answers that)
    body["stream_options"] = {**options, "include_usage": True}
    return True


async def _until_content(exchange: Exchange) -> bytes:
    """A stream's first chunks, up to the one that carries content (or its end; or
    CONTENT_PEEK_BYTES without content, which is an answer too)."""
    parts: list[bytes] = []
    size = 0
    tail = b""  # a marker may be split across chunks
    async for chunk in exchange.chunks:
        parts.append(chunk)
        size += len(chunk)
        window = tail + chunk
        if size > CONTENT_PEEK_BYTES or carries_content(window):
            break
        tail = window[-64:]
    return b"".join(parts)


def check_json(body: bytes) -> dict[str, Any]:
    """A 2xx JSON answer that does not parse is an upstream failure: the next backend may do."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamError("upstream answered with invalid JSON") from None
    if not isinstance(parsed, dict):
        raise UpstreamError("upstream answered with a JSON value that is not an object")
    return parsed


def count_tokens(answer: dict[str, Any], route: Route, backend: Backend,
                  metrics: Metrics) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the answer's `usage`, counted in the metrics. A
    Responses answer names them `input_tokens` and `output_tokens`."""
    usage = answer.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if prompt is None and completion is None:
        prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
    prompt, completion = (value if isinstance(value, int) and value > 0 else 0
                          for value in (prompt, completion))
    metrics.tokens(route.name, backend.name, prompt, completion)
    return prompt, completion


async def _refusal(route: Route, backend: Backend, exchange: Exchange) -> RouterError:
    """A non-2xx head: what it means for this backend and what the client would see."""
    status = exchange.status
    if status == 429:
        rest = exchange.retry_after_s if exchange.retry_after_s is not None else 1.0
        backend.state.rest(rest)
        retry_after = str(max(1, round(rest)))
        raise Retryable(UpstreamRateLimited(
            "every upstream for this model is rate limited", headers={"Retry-After": retry_after}))
    if status >= 500 or status in (401, 403, 407, 408):
        # Upstream trouble, or the router's own upstream credentials: never the client's fault.
        raise UpstreamError(f"upstream answered HTTP {status}")
    try:
        raw = await read_all(exchange.chunks, MAX_ERROR_BODY)
        parsed = orjson.loads(raw)
        error = parsed["error"]
        message = str(error.get("message", ""))
        if leaks_secret(message, backend.provider.secrets):
            message = f"upstream rejected the request (HTTP {status})"
        payload = {"error": {"message": message,
                             "type": str(error.get("type") or "invalid_request_error"),
                             "code": error.get("code") if isinstance(error.get("code"), str)
                             else None}}
    except (UpstreamError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        payload = {"error": {"message": f"upstream rejected the request (HTTP {status})",
                             "type": "invalid_request_error", "code": None}}
    return UpstreamAnswer(status, payload)
