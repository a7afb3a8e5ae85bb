"""Providers whose upstream speaks another API than OpenAI's (Anthropic, Gemini): the request is
written in that API's dialect, and its answer (a JSON body, or an event stream, event by event
as each arrives) is read back as OpenAI's, so dispatch, fan-out, the relay and the limits see
what they see from any OpenAI-compatible server.

A dialect is the one file per API: `request()` builds the upstream request, `answer()` turns a
whole JSON answer into a `chat.completion`, `stream()` makes the translator of one event stream,
and `error()` turns an error body into OpenAI's `{"error": {...}}`.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from router import __version__
from router.config import TranslatedProviderConfig
from router.errors import UpstreamError
from router.providers.base import (
    CannotServe,
    Exchange,
    UpstreamCall,
    leaks_secret,
    parse_retry_after,
    read_all,
)
from router.providers.sse import DONE, MAX_EVENT_BYTES, EventCutter, carries_content
from router.upstream import UpstreamClient, UpstreamResponse

MAX_ERROR_BYTES = 64 * 1024
_EVENT = re.compile(rb".*?(?:\r\n\r\n|\n\n|\r\r)", re.DOTALL)


# Gemini's thought signatures ride in the tool call ids it hands out (`<id>__thought__<sig>`),
# so they come back with the conversation. Any other upstream gets the plain id: OpenAI's
# allow 40 characters, Anthropic's only [A-Za-z0-9_-].
THOUGHT = "__thought__"


def plain_call_id(call_id: str) -> str:
    return call_id.partition(THOUGHT)[0]


def without_signatures(body: dict[str, Any]) -> dict[str, Any]:
    """The request with every tool call id made plain (a copy; `body` is left as it is)."""
    messages = []
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            message = dict(message)
            if isinstance(message.get("tool_call_id"), str):
                message["tool_call_id"] = plain_call_id(message["tool_call_id"])
            calls = message.get("tool_calls")
            if isinstance(calls, list):
                message["tool_calls"] = [
                    {**c, "id": plain_call_id(c["id"])} if isinstance(c, dict)
                    and isinstance(c.get("id"), str) else c for c in calls]
        messages.append(message)
    return {**body, "messages": messages}


class Unsupported(CannotServe):
    """A request parameter the upstream's API has no equivalent for."""

    def __init__(self, param: str, provider: str, why: str = "") -> None:
        super().__init__(f"`{param}` is not supported by the {provider} API{why}; leave it out "
                         "(or set drop_unsupported on the provider)")
        self.param = param


@dataclass(frozen=True, slots=True)
class Request:
    """What goes to the upstream: the URL, the headers besides the provider's own, the body."""

    url: str
    body: bytes
    headers: Mapping[str, str] | None = None


class StreamTranslator(Protocol):
    def feed(self, event: str, data: bytes) -> bytes:
        """One whole upstream event (its `event:` name, "" if none, and its data) -> the
        OpenAI events it makes now (possibly b""). Raises UpstreamError when the upstream
        reports a failure in the stream."""
        ...

    def end(self) -> bytes:
        """The upstream stream ended: the last events and `data: [DONE]`. Raises UpstreamError
        when it ended before the API's own end of a complete answer."""
        ...


class Dialect(Protocol):
    name: str  # the API's name in messages: "Anthropic", "Gemini"

    def request(self, call: UpstreamCall) -> Request:
        """Raises Unsupported for a parameter the API cannot take."""
        ...

    def answer(self, native: dict[str, Any], call: UpstreamCall) -> dict[str, Any]:
        """A whole 2xx JSON answer -> a `chat.completion` object (UpstreamError if malformed)."""
        ...

    def stream(self, call: UpstreamCall) -> StreamTranslator: ...

    def error(self, status: int, native: Any) -> dict[str, Any]:
        """An error answer's parsed body (None when it was not JSON) -> `{"error": {...}}`."""
        ...


class ChunkWriter:
    """The `chat.completion.chunk` events of one translated stream: each repeats the id,
    creation time and model, encoded once."""

    __slots__ = ("_prefix",)

    def __init__(self, id_: str, model: str, created: int | None = None) -> None:
        head = orjson.dumps({"id": id_, "object": "chat.completion.chunk",
                             "created": int(time.time()) if created is None else created,
                             "model": model})
        self._prefix = b"data: " + head[:-1] + b',"choices":['  # ...then the choice, "]}"

    def delta(self, delta: dict[str, Any], index: int = 0,
              finish_reason: str | None = None) -> bytes:
        return self._prefix + orjson.dumps({"index": index, "delta": delta, "logprobs": None,
                                            "finish_reason": finish_reason}) + b"]}\n\n"

    def usage(self, usage: dict[str, Any]) -> bytes:
        return self._prefix + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"


def wants_usage(call: UpstreamCall) -> bool:
    """Whether the stream ends with a usage chunk (the router asks for it on the client's
    behalf and hides it when the client did not ask)."""
    options = call.body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


# How long a rate-limited upstream asks to be left alone, read from its error body (an API
# that says so in the body rather than in a Retry-After header).
RetryHint = Callable[[Any], float | None]


class TranslatedProvider:
    """One upstream of a translated API, through the shared upstream pool."""

    def __init__(self, name: str, config: TranslatedProviderConfig, dialect: Dialect,
                 client: UpstreamClient, *, auth_headers: Mapping[str, str],
                 probe_url: str | None, probe_timeout_s: float = 2.0,
                 api_headers: Mapping[str, str] | None = None,
                 retry_hint: RetryHint | None = None) -> None:
        """`auth_headers` carry credentials (never shown to a client); `api_headers` are the
        API's other fixed headers (a version, a feature flag), sent with every request and
        probe too but not secret: an error message may quote them. `retry_hint` reads how
        long to wait from a 429's body, for an API that says it there, not in Retry-After."""
        self.name = name
        self._dialect = dialect
        self._retry_hint = retry_hint
        self._client = client
        self._ca_file = config.ca_file
        self._probe_url = probe_url if config.probe else None
        self._probe_timeout_s = probe_timeout_s
        headers = {"User-Agent": f"router/{__version__}", **config.headers, **(api_headers or {}),
                   **auth_headers, "Content-Type": "application/json",
                   "Accept-Encoding": "identity"}
        self._headers = headers
        self._probe_headers = {k: v for k, v in headers.items() if k != "Content-Type"}
        self.secrets = tuple(v for v in (config.api_key, *config.headers.values(),
                                         *auth_headers.values()) if v)

    async def open(self, call: UpstreamCall) -> Exchange:
        req = self._dialect.request(call)
        headers = dict(self._headers)
        if req.headers:
            headers.update(req.headers)
        headers["Accept"] = "text/event-stream" if call.stream else "application/json"
        headers["x-request-id"] = call.request_id
        for name, value in call.trace:
            headers[name] = value
        resp = await self._client.post(req.url, headers, req.body, call.timeouts, self._ca_file)
        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        if resp.status >= 300:
            # Overloaded (Anthropic's 529) is a 429 to the router: the backend rests, the next
            # one is asked.
            status = 429 if resp.status == 529 else resp.status
            if status == 429 and retry_after is None and self._retry_hint is not None:
                # The wait is in the body: read it now, as the backend's rest is decided
                # from the Exchange's head, before anyone reads its body.
                try:
                    native = _loads(await read_all(resp.iter_chunks(), MAX_ERROR_BYTES))
                except BaseException:
                    resp.close()  # no Exchange will own it
                    raise
                retry_after = self._retry_hint(native)
                body = _once(orjson.dumps(self._dialect.error(resp.status, native)))
                return Exchange(status, "application/json", body, resp.close, retry_after)
            return Exchange(status, "application/json", self._error(resp), resp.close,
                            retry_after)
        if call.stream:
            chunks = self._events(resp, self._dialect.stream(call))
            return Exchange(resp.status, "text/event-stream", chunks, resp.close, retry_after)
        return Exchange(resp.status, "application/json", self._json(resp, call), resp.close,
                        retry_after)

    async def probe(self) -> bool | None:
        if self._probe_url is None:
            return None
        status = await self._client.get_status(self._probe_url, self._probe_headers,
                                               self._probe_timeout_s, self._ca_file)
        return 200 <= status < 300

    async def _json(self, resp: UpstreamResponse, call: UpstreamCall) -> AsyncIterator[bytes]:
        raw = await read_all(resp.iter_chunks(), call.max_response_bytes)
        try:
            native = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError("upstream answered with invalid JSON") from None
        if not isinstance(native, dict):
            raise UpstreamError("upstream answered with a JSON value that is not an object")
        yield orjson.dumps(self._dialect.answer(native, call))

    async def _error(self, resp: UpstreamResponse) -> AsyncIterator[bytes]:
        native = _loads(await read_all(resp.iter_chunks(), MAX_ERROR_BYTES))
        yield orjson.dumps(self._dialect.error(resp.status, native))

    async def _events(self, resp: UpstreamResponse, translator: StreamTranslator
                      ) -> AsyncIterator[bytes]:
        try:
            cutter = EventCutter()
            # The stream's beginning (the role chunk) is held until something with content
            # follows it: an upstream that fails before its first token (an overload reported
            # after its first event) leaves the stream uncommitted, so the next backend answers.
            held = b""
            started = False  # something was yielded: the stream may be committed to the client
            async for chunk in resp.iter_chunks():
                events = cutter.feed(chunk)
                if not events:
                    continue
                parts: list[bytes] = []
                try:
                    for event in _EVENT.finditer(events):
                        parts.append(translator.feed(*_split(event.group())))
                except UpstreamError:
                    # A failure reported in the same read as the events before it: once the
                    # client has the stream's beginning, it gets those too, then the error.
                    # Before that, nothing is sent and the next backend may answer instead.
                    if started and any(parts):
                        yield b"".join(parts)
                    raise
                out = b"".join(parts)
                if not out:
                    continue
                if not started:
                    held += out
                    if not carries_content(held):
                        continue
                    out, held = held, b""
                    started = True
                yield out
            if cutter.pending.strip():
                held += translator.feed(*_split(cutter.pending))  # a last event without its end
            yield held + translator.end()
        except UpstreamError as exc:
            # A failure the upstream reported that quotes one of this provider's secrets
            # says so without quoting it.
            if leaks_secret(exc.message, self.secrets):
                raise UpstreamError("the upstream reported an error in its stream") from None
            raise


def _split(event: bytes) -> tuple[str, bytes]:
    """An SSE event's name ("" when it has none) and its data (`data:` lines joined)."""
    name = ""
    data: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    return name, b"\n".join(data)


def _loads(raw: bytes) -> Any:
    """An error body parsed, or None when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def parse_data(data: bytes) -> dict[str, Any]:
    """An event's data as a JSON object, or UpstreamError."""
    if len(data) > MAX_EVENT_BYTES:
        raise UpstreamError("upstream event is too large")
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError("upstream sent an event that is not JSON") from None
    if not isinstance(parsed, dict):
        raise UpstreamError("upstream sent an event that is not a JSON object")
    return parsed


__all__ = ["DONE", "ChunkWriter", "Dialect", "Request", "RetryHint", "StreamTranslator",
           "TranslatedProvider", "Unsupported", "parse_data", "wants_usage"]
