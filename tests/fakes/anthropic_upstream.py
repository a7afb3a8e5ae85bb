"""A real aiohttp server speaking Anthropic's Messages API (JSON and SSE), misbehaving on demand.

Scripted like openai_upstream.py by the request's ``model`` (or a server-wide override set
through ``POST /_control``): directives joined by ``+``, each ``name`` or ``name:arg``, e.g.
``chunks:3+ping+error-mid:2`` or ``status:529+retry-after:7``. Unknown words (real model names)
mean a normal answer:

- text: ``chunks`` words ``tok0 tok1 ...``; ``max_tokens`` below that many stops early
  (stop_reason max_tokens); with ``stop_sequences`` the answer says it stopped on the first.
- a request with ``tools`` (and a tool_choice other than none) gets ``tools:N`` tool calls
  (default 1) of the first tool (or the one tool_choice names), input ``{"x": i}`` streamed in
  three fragments (``whole-input``: given whole in content_block_start instead);
  ``preamble`` puts a text block before them.
- ``thinking``: a thinking block first. ``cache:N``: N input tokens read from the cache.
- streams: ``ping`` (a ping before every delta), ``error-start`` (an error event first),
  ``error-mid:N`` (an error event after N deltas), ``cut:N`` (the connection torn after N
  deltas), ``no-stop`` (a clean end without message_stop), ``split:N`` (the bytes written N at a
  time), ``crlf`` (CRLF line ends), ``gap:S`` (seconds between deltas).
- ``status:N`` (+``retry-after:S``): an error answer with Anthropic's error body;
  ``first-byte:S``, ``hang``, ``malformed`` (a 200 that is not JSON), ``reason:R`` (stop_reason),
  ``answer-model:M`` (the model the answer names).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.directives import parse_directives
from tests.fakes.openai_upstream import RECORDER, Recorder, Seen

_HANG_SECONDS = 3600.0
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               402: "billing_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               504: "timeout_error", 529: "overloaded_error"}
THINKING = "Let me think."


@dataclass
class Behaviour:
    chunks: int = 5
    gap: float = 0.0
    first_byte: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    tools: int = 1
    preamble: bool = False
    whole_input: bool = False
    thinking: bool = False
    cache: int = 0
    ping: bool = False
    error_start: bool = False
    error_mid: int | None = None
    cut: int | None = None
    no_stop: bool = False
    split: int | None = None
    crlf: bool = False
    hang: bool = False
    malformed: bool = False
    reason: str | None = None
    answer_model: str | None = None


def parse_behaviour(spec: str | None) -> Behaviour:
    return parse_directives(spec, Behaviour())


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"),
                                       "message": message}, "request_id": "req_fake"}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text_of(b.get("text") or b.get("content") or "")
                       for b in content if isinstance(b, dict))
    return ""


def input_tokens(body: dict[str, Any]) -> int:
    """The fake's count: a token per 4 characters of text in system and messages, plus one."""
    chars = len(_text_of(body.get("system")))
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            chars += len(_text_of(message.get("content")))
    return chars // 4 + 1


def _tool_name(body: dict[str, Any]) -> str | None:
    tools = body.get("tools")
    choice = body.get("tool_choice") or {}
    if not tools or choice.get("type") == "none":
        return None
    if choice.get("type") == "tool":
        return str(choice["name"])
    return str(tools[0].get("name") or "tool")


@dataclass
class Plan:
    """The answer's content blocks, each with the deltas a stream sends for it."""

    blocks: list[dict[str, Any]]  # as in the JSON answer
    starts: list[dict[str, Any]]  # content_block_start's content_block
    deltas: list[list[dict[str, Any]]]
    stop_reason: str
    stop_sequence: str | None
    output_tokens: int


def plan(b: Behaviour, body: dict[str, Any]) -> Plan:
    blocks: list[dict[str, Any]] = []
    starts: list[dict[str, Any]] = []
    deltas: list[list[dict[str, Any]]] = []
    if b.thinking:
        blocks.append({"type": "thinking", "thinking": THINKING, "signature": "sig-fake"})
        starts.append({"type": "thinking", "thinking": "", "signature": ""})
        deltas.append([{"type": "thinking_delta", "thinking": "Let me "},
                       {"type": "thinking_delta", "thinking": "think."},
                       {"type": "signature_delta", "signature": "sig-fake"}])
    tool = _tool_name(body)
    stop_reason, stop_sequence = "end_turn", None
    output = 0
    if tool is None or b.preamble:
        words = [f"tok{i} " for i in range(b.chunks if tool is None else 2)]
        limit = body.get("max_tokens")
        if isinstance(limit, int) and 0 < limit < len(words):
            words, stop_reason = words[:limit], "max_tokens"
        elif body.get("stop_sequences"):
            stop_reason, stop_sequence = "stop_sequence", body["stop_sequences"][0]
        blocks.append({"type": "text", "text": "".join(words), "citations": None})
        starts.append({"type": "text", "text": "", "citations": None})
        deltas.append([{"type": "text_delta", "text": w} for w in words])
        output += len(words)
    if tool is not None:
        for i in range(b.tools):
            tool_input = {"x": i + 1}
            raw = orjson.dumps(tool_input).decode()
            block = {"type": "tool_use", "id": f"toolu_fake_{i + 1}", "name": tool,
                     "input": tool_input}
            blocks.append(block)
            if b.whole_input:
                starts.append(block)
                deltas.append([])
            else:
                starts.append({**block, "input": {}})
                deltas.append([{"type": "input_json_delta", "partial_json": piece}
                               for piece in (raw[:3], raw[3:6], raw[6:])])
            output += 3
        stop_reason = "tool_use"
    return Plan(blocks, starts, deltas, b.reason or stop_reason, stop_sequence, output)


def usage(b: Behaviour, body: dict[str, Any], output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens(body), "output_tokens": output_tokens,
            "cache_read_input_tokens": b.cache, "cache_creation_input_tokens": 2 if b.cache
            else 0, "cache_creation": None, "server_tool_use": None, "service_tier": "standard"}


async def _send(request: web.Request, status: int, payload: bytes,
                headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(status=status, body=payload, headers=headers,
                        content_type="application/json")
    await resp.prepare(request)
    await resp.write_eof()
    return resp


def api_key(request: web.Request) -> str:
    """The key: `x-api-key`, or a bearer token (which the SDK's newer versions send)."""
    bearer = request.headers.get("Authorization", "")
    return request.headers.get("x-api-key") or bearer.removeprefix("Bearer ")


async def messages(request: web.Request) -> web.StreamResponse:
    rec = request.app[RECORDER]
    t_received = time.monotonic()
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return await _send(request, 400, orjson.dumps(error_body(400, "bad JSON")))
    if not isinstance(body, dict):
        body = {}
    seen = Seen(t_received, dict(request.headers), body, raw, request.path_qs)
    rec.seen.append(seen)
    rec.inflight += 1
    rec.max_inflight = max(rec.max_inflight, rec.inflight)
    try:
        resp = await _answer(request, rec, body)
        seen.t_finished = time.monotonic()
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        seen.t_disconnected = time.monotonic()
        raise
    finally:
        rec.inflight -= 1


async def _answer(request: web.Request, rec: Recorder, body: dict[str, Any]
                  ) -> web.StreamResponse:
    if not api_key(request):
        return await _send(request, 401, orjson.dumps(error_body(
            401, "x-api-key header is required")))
    if not request.headers.get("anthropic-version"):
        return await _send(request, 400, orjson.dumps(error_body(
            400, "anthropic-version: header is required")))
    model = str(body.get("model", ""))
    b = parse_behaviour(rec.override if rec.override is not None else model)
    if b.hang:
        await asyncio.sleep(_HANG_SECONDS)
    if b.first_byte > 0:
        await asyncio.sleep(b.first_byte)
    if b.status is not None:
        headers = {"retry-after": b.retry_after} if b.retry_after is not None else None
        return await _send(request, b.status, orjson.dumps(error_body(
            b.status, f"fake failure {b.status}")), headers)
    if not isinstance(body.get("max_tokens"), int):
        return await _send(request, 400, orjson.dumps(error_body(
            400, "max_tokens: Field required")))
    p = plan(b, body)
    msg_id = rec.next_id().replace("chatcmpl-fake-", "msg_fake_")
    answer_model = b.answer_model or model
    if body.get("stream"):
        return await _stream(request, b, body, p, msg_id, answer_model)
    if b.malformed:
        return await _send(request, 200, b"{not json")
    return await _send(request, 200, orjson.dumps({
        "id": msg_id, "type": "message", "role": "assistant", "model": answer_model,
        "content": p.blocks, "stop_reason": p.stop_reason, "stop_sequence": p.stop_sequence,
        "usage": usage(b, body, p.output_tokens)}), {"request-id": "req_fake"})


def event(name: str, payload: dict[str, Any], crlf: bool = False) -> bytes:
    raw = b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
    return raw.replace(b"\n", b"\r\n") if crlf else raw


async def _stream(request: web.Request, b: Behaviour, body: dict[str, Any], p: Plan,
                  msg_id: str, model: str) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache",
                                                   "request-id": "req_fake"})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)

    async def send(name: str, payload: dict[str, Any]) -> None:
        raw = event(name, payload, b.crlf)
        step = b.split or len(raw)
        for i in range(0, len(raw), step):
            await resp.write(raw[i:i + step])

    def abort() -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        return resp

    if b.malformed:
        await resp.write(b"event: message_start\ndata: {not json}\n\n")
        await resp.write_eof()
        return resp
    overloaded = {"type": "error", "error": {"type": "overloaded_error",
                                             "message": "Overloaded"}}
    if b.error_start:
        await send("error", overloaded)
        await resp.write_eof()
        return resp
    start_usage = {**usage(b, body, 1)}
    await send("message_start", {"type": "message_start", "message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
    if b.ping:
        await send("ping", {"type": "ping"})
    sent = 0
    for index, (start, deltas) in enumerate(zip(p.starts, p.deltas, strict=True)):
        await send("content_block_start", {"type": "content_block_start", "index": index,
                                           "content_block": start})
        for delta in deltas:
            if b.gap > 0:
                await asyncio.sleep(b.gap)
            if b.error_mid is not None and sent >= b.error_mid:
                await send("error", overloaded)
                await resp.write_eof()
                return resp
            if b.cut is not None and sent >= b.cut:
                return abort()
            if b.ping:
                await send("ping", {"type": "ping"})
            await send("content_block_delta", {"type": "content_block_delta", "index": index,
                                               "delta": delta})
            sent += 1
        await send("content_block_stop", {"type": "content_block_stop", "index": index})
    if b.cut is not None:
        return abort()
    final = usage(b, body, p.output_tokens)
    await send("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": p.stop_reason,
                                           "stop_sequence": p.stop_sequence},
                                 "usage": {k: final[k] for k in (
                                     "input_tokens", "output_tokens",
                                     "cache_read_input_tokens",
                                     "cache_creation_input_tokens")}})
    if not b.no_stop:
        await send("message_stop", {"type": "message_stop"})
    await resp.write_eof()
    return resp


async def models(request: web.Request) -> web.Response:
    if not api_key(request):
        return await _send(request, 401, orjson.dumps(error_body(
            401, "x-api-key header is required")))
    data = [{"type": "model", "id": "claude-fake", "display_name": "Claude Fake",
             "created_at": "2025-01-01T00:00:00Z"}]
    return await _send(request, 200, orjson.dumps({
        "data": data, "has_more": False, "first_id": "claude-fake", "last_id": "claude-fake"}))


async def control(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read() or b"{}")
    behaviour = body.get("behaviour") if isinstance(body, dict) else None
    request.app[RECORDER].override = str(behaviour) if behaviour is not None else None
    return await _send(request, 200, b"{}")


def build_app() -> web.Application:
    app = web.Application()
    app[RECORDER] = Recorder()
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/_control", control)
    return app


async def start_fake() -> tuple[web.AppRunner, str, Recorder]:
    """Start the fake on 127.0.0.1:<free port>; returns (runner, base_url without /v1,
    recorder). Call ``await runner.cleanup()`` when done."""
    app = build_app()
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}", app[RECORDER]
