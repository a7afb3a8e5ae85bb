"""A real aiohttp server speaking the OpenAI chat-completions dialect (and embeddings, text
completions and the Responses API), misbehaving on demand.

Behaviour is chosen by the request's ``model`` string (or a server-wide override set through
``POST /_control``): directives joined by ``+``, each ``name`` or ``name:arg``, e.g.
``first-byte:0.2+chunks:10+gap:0.05`` or ``status:503+retry-after:7``. Unknown words (real model
names such as ``gpt-x``) mean a normal answer.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from router.bench.kv_cache import KvCache
from router.schema import input_items
from tests.fakes.directives import BadDirective, parse_directives

CREATED = 1700000000
TOOL_ARGUMENTS = '{"x": 1}'
_TOOL_FRAGMENTS = ('{"x', '": ', "1}")
_HANG_SECONDS = 3600.0


@dataclass
class Seen:
    """One chat-completions request as the fake received it."""

    t_received: float
    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes = b""  # the body's bytes as they arrived
    path: str = ""  # with its query string
    t_disconnected: float | None = None
    t_finished: float | None = None


@dataclass
class Recorder:
    """What the fake saw: requests, and how many were being served at once."""

    seen: list[Seen] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    override: str | None = None
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)  # created, by id
    inputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # their input items
    drop_stored: int = 0  # this many calls on stored responses break off in their answer's head
    # A prefix (KV) cache to simulate: a chat request waits for its uncached part's prefill.
    kv: KvCache | None = None
    _counter: int = 0

    def next_id(self) -> str:
        self._counter += 1
        return f"chatcmpl-fake-{self._counter}"


RECORDER = web.AppKey("RECORDER", Recorder)
NAME = web.AppKey("NAME", str)


@dataclass
class Behaviour:
    first_byte: float = 0.0
    chunks: int = 5
    gap: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    cut: int | None = None
    hang: bool = False
    echo_auth: bool = False
    malformed: bool = False
    models_500: bool = False
    deny_key: str | None = None  # a request with this API key gets 401
    limit_key: str | None = None  # ... gets 429 with Retry-After: 30


def parse_behaviour(spec: str | None) -> Behaviour:
    """Parse ``name[:arg]+name[:arg]...``; unknown names are ignored."""
    return parse_directives(spec, Behaviour())


def _error_body(message: str, type_: str = "server_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": None}}


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _prompt_tokens(body: dict[str, Any]) -> int:
    chars = 0
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return chars // 4 + 1


def _tool_name(body: dict[str, Any]) -> str | None:
    """Name of the tool to call, or None when no tool call is due."""
    tools = body.get("tools")
    if not tools or body.get("tool_choice") == "none":
        return None
    first = tools[0] if isinstance(tools[0], dict) else {}
    return str((first.get("function") or {}).get("name") or "tool")


async def _send(
    request: web.Request,
    status: int,
    payload: bytes,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> web.Response:
    """Send a complete response now, so the caller knows when it is finished."""
    resp = web.Response(status=status, body=payload, headers=headers, content_type=content_type)
    await resp.prepare(request)
    await resp.write_eof()
    return resp


def _api_key(request: web.Request) -> str:
    """The request's key: OpenAI's bearer token, or Azure's `api-key` header."""
    auth = request.headers.get("Authorization", "")
    return auth.removeprefix("Bearer ") if auth else request.headers.get("api-key", "")


def _abort(request: web.Request) -> None:
    """Tear the connection down mid-body; aiohttp's own write_eof then fails quietly."""
    if request.transport is not None:
        request.transport.abort()


Answer = Callable[[web.Request, Recorder, dict[str, Any]], Awaitable[web.StreamResponse]]


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _answer)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _embed)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _complete)


async def _serve(request: web.Request, answer: Answer) -> web.StreamResponse:
    """Record the request, then answer it (and record how that ended)."""
    rec = request.app[RECORDER]
    t_received = time.monotonic()
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return await _send(request, 400, orjson.dumps(_error_body("bad JSON", "invalid_request")))
    if not isinstance(body, dict):
        body = {}
    seen = Seen(t_received=t_received, headers=dict(request.headers), body=body, raw=raw,
                path=request.path_qs)
    rec.seen.append(seen)
    rec.inflight += 1
    rec.max_inflight = max(rec.max_inflight, rec.inflight)
    try:
        resp = await answer(request, rec, body)
        seen.t_finished = time.monotonic()
        return resp
    except asyncio.CancelledError:
        seen.t_disconnected = time.monotonic()
        raise
    except ConnectionResetError:
        # The client left and the handler was not cancelled (handler_cancellation off).
        seen.t_disconnected = time.monotonic()
        return web.Response(status=499)  # never delivered; aiohttp drops the write quietly
    finally:
        rec.inflight -= 1


async def _answer(request: web.Request, rec: Recorder, body: dict[str, Any]) -> web.StreamResponse:
    model = str(body.get("model", ""))
    try:
        b = parse_behaviour(rec.override if rec.override is not None else model)
    except BadDirective as exc:
        return await _send(request, 400, orjson.dumps(_error_body(str(exc), "invalid_request")))
    if b.hang:
        await asyncio.sleep(_HANG_SECONDS)
    if b.first_byte > 0:
        await asyncio.sleep(b.first_byte)
    if rec.kv is not None:
        await rec.kv.prefill(body.get("messages") or [], body.get("tools"))
    key = _api_key(request)
    if b.deny_key is not None and key == b.deny_key:
        return await _send(request, 401, orjson.dumps(_error_body("bad key", "invalid_api_key")))
    if b.limit_key is not None and key == b.limit_key:
        return await _send(request, 429, orjson.dumps(_error_body("slow down", "rate_limit")),
                           {"Retry-After": "30"})
    if b.status is not None:
        headers = {"Retry-After": b.retry_after} if b.retry_after is not None else None
        payload = orjson.dumps(_error_body(f"fake failure {b.status}"))
        return await _send(request, b.status, payload, headers)

    words = [f"tok{i} " for i in range(b.chunks)]
    if b.echo_auth:
        words.insert(0, f"auth={request.headers.get('Authorization', '')} ")
    n = max(1, int(body.get("n") or 1))
    tool = _tool_name(body)
    cid = rec.next_id()
    if body.get("stream"):
        return await _stream(request, b, body, cid, model, words, n, tool)
    if b.malformed:
        return await _send(request, 200, b"{not json")

    if tool is not None:
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": tool, "arguments": TOOL_ARGUMENTS},
        }
        message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
        finish, completion = "tool_calls", len(_TOOL_FRAGMENTS)
    else:
        message = {"role": "assistant", "content": "".join(words)}
        finish, completion = "stop", len(words)
    prompt = _prompt_tokens(body)
    completion *= n
    payload = orjson.dumps(
        {
            "id": cid,
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
                for i in range(n)
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    )
    if b.cut is None:
        return await _send(request, 200, payload)
    resp = web.StreamResponse(status=200)
    resp.content_type = "application/json"
    resp.content_length = len(payload)
    await resp.prepare(request)
    await resp.write(payload[: len(payload) // 2])
    _abort(request)
    return resp


async def _stream(
    request: web.Request,
    b: Behaviour,
    body: dict[str, Any],
    cid: str,
    model: str,
    words: list[str],
    n: int,
    tool: str | None,
) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache"})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    if b.malformed:
        await resp.write(b"data: {not json}\n\n")
        await resp.write_eof()
        return resp

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return _sse(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "choices": [choice],
            }
        )

    if tool is not None:
        first: dict[str, Any] = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": tool, "arguments": ""},
                }
            ],
        }
        deltas: list[dict[str, Any]] = [
            {"tool_calls": [{"index": 0, "function": {"arguments": frag}}]}
            for frag in _TOOL_FRAGMENTS
        ]
        finish = "tool_calls"
    else:
        first = {"role": "assistant", "content": ""}
        deltas = [{"content": w} for w in words]
        finish = "stop"

    for i in range(n):
        await resp.write(chunk(i, first))
    for sent, delta in enumerate(deltas):
        if b.cut is not None and sent >= b.cut:
            _abort(request)
            return resp
        if b.gap > 0:
            await asyncio.sleep(b.gap)
        for i in range(n):
            await resp.write(chunk(i, delta))
    if b.cut is not None:  # asked to cut at or after the end: tear it before the finish chunk
        _abort(request)
        return resp
    for i in range(n):
        await resp.write(chunk(i, {}, finish))
    if (body.get("stream_options") or {}).get("include_usage"):
        prompt = _prompt_tokens(body)
        completion = len(deltas) * n
        await resp.write(
            _sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": CREATED,
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                    },
                }
            )
        )
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def models(request: web.Request) -> web.Response:
    rec = request.app[RECORDER]
    try:
        broken = parse_behaviour(rec.override).models_500
    except BadDirective:
        broken = False
    if broken:
        return await _send(request, 500, orjson.dumps(_error_body("fake failure 500")))
    data = [{"id": "fake-model", "object": "model", "created": 0, "owned_by": request.app[NAME]}]
    return await _send(request, 200, orjson.dumps({"object": "list", "data": data}))


async def _failure(request: web.Request, b: Behaviour) -> web.StreamResponse | None:
    """The scripted failure before any answer (a wait, an error status), if any."""
    if b.first_byte > 0:
        await asyncio.sleep(b.first_byte)
    if b.status is None:
        return None
    headers = {"Retry-After": b.retry_after} if b.retry_after is not None else None
    return await _send(request, b.status, orjson.dumps(_error_body(f"fake failure {b.status}")),
                       headers)


async def _embed(request: web.Request, rec: Recorder, body: dict[str, Any]
                 ) -> web.StreamResponse:
    """One vector per input (`dimensions` long, default 4); usage counts tokens as the chat
    answer does (characters / 4 + 1 per text, one per token id)."""
    b = parse_behaviour(rec.override if rec.override is not None else str(body.get("model")))
    failed = await _failure(request, b)
    if failed is not None:
        return failed
    texts = body.get("input")
    items = input_items(texts)
    size = int(body.get("dimensions") or 4)
    if body.get("encoding_format") == "base64":
        vector: Any = base64.b64encode(struct.pack(f"<{size}f", *([0.25] * size))).decode()
    else:
        vector = [0.25] * size
    tokens = sum(len(t) // 4 + 1 if isinstance(t, str) else len(t) if isinstance(t, list) else 1
                 for t in items)
    return await _send(request, 200, orjson.dumps({
        "object": "list", "model": body.get("model"),
        "data": [{"object": "embedding", "index": i, "embedding": vector}
                 for i in range(len(items))],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))


async def _complete(request: web.Request, rec: Recorder, body: dict[str, Any]
                    ) -> web.StreamResponse:
    """A legacy text completion of `chunks` words, JSON or SSE (with a usage chunk when
    `stream_options.include_usage`)."""
    b = parse_behaviour(rec.override if rec.override is not None else str(body.get("model")))
    failed = await _failure(request, b)
    if failed is not None:
        return failed
    words = [f"tok{i} " for i in range(b.chunks)]
    prompt = body.get("prompt")
    prompt_tokens = len(prompt) // 4 + 1 if isinstance(prompt, str) else 1
    head = {"id": rec.next_id().replace("chatcmpl", "cmpl"), "object": "text_completion",
            "created": CREATED, "model": body.get("model")}
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
             "total_tokens": prompt_tokens + len(words)}
    if not body.get("stream"):
        return await _send(request, 200, orjson.dumps({**head, "choices": [
            {"index": 0, "text": "".join(words), "logprobs": None, "finish_reason": "stop"}],
            "usage": usage}))
    resp = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache"})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    for i, word in enumerate(words):
        if b.cut is not None and i >= b.cut:
            _abort(request)
            return resp
        if b.gap > 0:
            await asyncio.sleep(b.gap)
        await resp.write(_sse({**head, "choices": [{"index": 0, "text": word, "logprobs": None,
                                                    "finish_reason": None}]}))
    await resp.write(_sse({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                "finish_reason": "stop"}]}))
    if (body.get("stream_options") or {}).get("include_usage"):
        await resp.write(_sse({**head, "choices": [], "usage": usage}))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _input_items(body: dict[str, Any], rid: str) -> list[dict[str, Any]]:
    """A response's input as the stored input items (messages of input_text parts)."""
    given = body.get("input")
    messages = [{"role": "user", "content": given}] if isinstance(given, str) else \
        [m for m in given or [] if isinstance(m, dict)]
    items = []
    for n, message in enumerate(messages):
        content = message.get("content")
        parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else \
            [p for p in content or [] if isinstance(p, dict)]
        items.append({"type": "message", "id": f"msg_in_{rid}_{n}",
                      "role": str(message.get("role") or "user"), "status": "completed",
                      "content": parts})
    return items


def _response(rid: str, body: dict[str, Any], status: str, text: str | None,
              usage: dict[str, Any] | None) -> dict[str, Any]:
    """A response object as OpenAI's Responses API writes it."""
    output = [] if text is None else [{
        "type": "message", "id": f"msg_{rid}", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    return {"id": rid, "object": "response", "created_at": CREATED, "status": status,
            "model": body.get("model"), "output": output, "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": [], "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "previous_response_id": body.get("previous_response_id"),
            "usage": usage}


async def _respond(request: web.Request, rec: Recorder, body: dict[str, Any]
                   ) -> web.StreamResponse:
    """A model response of `chunks` words, JSON or SSE (the Responses API's event sequence,
    no [DONE]), remembered by id; a `previous_response_id` this fake did not make is a 404."""
    b = parse_behaviour(rec.override if rec.override is not None else str(body.get("model")))
    failed = await _failure(request, b)
    if failed is not None:
        return failed
    previous = body.get("previous_response_id")
    if previous is not None and previous not in rec.responses:
        return await _send(request, 404, orjson.dumps({"error": {
            "message": f"Previous response with id '{previous}' not found.",
            "type": "invalid_request_error", "param": "previous_response_id",
            "code": "previous_response_not_found"}}))
    rid = rec.next_id().replace("chatcmpl-fake-", f"resp_{request.app[NAME]}_")
    words = [f"tok{i} " for i in range(b.chunks)]
    text = "".join(words)
    items = _input_items(body, rid)
    prompt = sum(len(p.get("text") or "") for i in items for p in i["content"]) // 4 + 1
    usage = {"input_tokens": prompt,
             "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
             "output_tokens": len(words), "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": prompt + len(words)}
    done = _response(rid, body, "completed", text, usage)
    rec.responses[rid] = done
    rec.inputs[rid] = items
    if not body.get("stream"):
        return await _send(request, 200, orjson.dumps(done))
    resp = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache"})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    seq = 0

    async def event(kind: str, fields: dict[str, Any]) -> None:
        nonlocal seq
        await resp.write(f"event: {kind}\n".encode()
                         + _sse({"type": kind, "sequence_number": seq, **fields}))
        seq += 1

    started = _response(rid, body, "in_progress", None, None)
    mid = f"msg_{rid}"
    part = {"type": "output_text", "text": "", "annotations": []}
    await event("response.created", {"response": started})
    await event("response.in_progress", {"response": started})
    await event("response.output_item.added", {"output_index": 0, "item": {
        "type": "message", "id": mid, "status": "in_progress", "role": "assistant",
        "content": []}})
    await event("response.content_part.added", {"item_id": mid, "output_index": 0,
                                                "content_index": 0, "part": part})
    for n, word in enumerate(words):
        if b.cut is not None and n >= b.cut:
            _abort(request)
            return resp
        if b.gap > 0:
            await asyncio.sleep(b.gap)
        await event("response.output_text.delta", {"item_id": mid, "output_index": 0,
                                                   "content_index": 0, "delta": word,
                                                   "logprobs": []})
    await event("response.output_text.done", {"item_id": mid, "output_index": 0,
                                              "content_index": 0, "text": text,
                                              "logprobs": []})
    await event("response.content_part.done", {"item_id": mid, "output_index": 0,
                                               "content_index": 0,
                                               "part": {**part, "text": text}})
    await event("response.output_item.done", {"output_index": 0,
                                              "item": done["output"][0]})
    await event("response.completed", {"response": done})
    await resp.write_eof()
    return resp


async def stored_response(request: web.Request) -> web.Response:
    """GET, DELETE, cancel and input_items of a response this fake made (else a 404, as a
    real backend answers for another's)."""
    rec = request.app[RECORDER]
    rec.seen.append(Seen(t_received=time.monotonic(), headers=dict(request.headers), body={},
                         path=request.path_qs))
    if rec.drop_stored > 0 and request.transport is not None:
        rec.drop_stored -= 1
        request.transport.write(b"HTTP/1.1 5")  # a torn head: not a stale keep-alive connection
        _abort(request)
        return web.Response()  # never sent: the connection is gone
    if request.path.startswith("/openai/") and "api-version" not in request.query:
        return await _send(request, 404, orjson.dumps(_error_body("Resource not found")))
    rid = request.match_info["id"]
    response = rec.responses.get(rid)
    if response is None:
        return await _send(request, 404, orjson.dumps({"error": {
            "message": f"Response with id '{rid}' not found.",
            "type": "invalid_request_error", "param": None, "code": None}}))
    action = request.match_info.get("action")
    if request.method == "DELETE":
        del rec.responses[rid]
        return await _send(request, 200, orjson.dumps(
            {"id": rid, "object": "response.deleted", "deleted": True}))
    if action == "cancel":
        response = rec.responses[rid] = {**response, "status": "cancelled"}
    elif action == "input_items":
        items = rec.inputs.get(rid, [])
        if request.query.get("order") == "desc":
            items = items[::-1]
        limit = int(request.query.get("limit") or 20)
        data = items[:limit]
        return await _send(request, 200, orjson.dumps({
            "object": "list", "data": data, "has_more": len(items) > limit,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}))
    return await _send(request, 200, orjson.dumps(response))


async def responses(request: web.Request) -> web.StreamResponse:
    return await _serve(request, _respond)


async def azure_responses(request: web.Request) -> web.StreamResponse:
    if "api-version" not in request.query:
        return await _send(request, 404, orjson.dumps(_error_body("Resource not found")))
    return await _serve(request, _respond)


async def azure_chat(request: web.Request) -> web.StreamResponse:
    """Azure OpenAI's deployment path: the deployment is the model; api-version is required."""
    if "api-version" not in request.query:
        return await _send(request, 404, orjson.dumps(_error_body("Resource not found")))
    endpoint = request.path.rsplit("/", 1)[-1]
    answer = _answer if request.path.endswith("/chat/completions") else \
        _embed if endpoint == "embeddings" else _complete
    return await _serve(request, answer)


async def azure_models(request: web.Request) -> web.Response:
    if "api-version" not in request.query:
        return await _send(request, 404, orjson.dumps(_error_body("Resource not found")))
    return await models(request)


async def control(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read() or b"{}")
    behaviour = body.get("behaviour") if isinstance(body, dict) else None
    request.app[RECORDER].override = str(behaviour) if behaviour is not None else None
    return await _send(request, 200, b"{}")


def build_app(name: str = "fake") -> web.Application:
    """The fake upstream; serve it with ``web.AppRunner(app, handler_cancellation=True)``."""
    app = web.Application()
    app[RECORDER] = Recorder()
    app[NAME] = name
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/openai/responses", azure_responses)
    for root in ("/v1", "/openai"):
        app.router.add_get(f"{root}/responses/{{id}}", stored_response)
        app.router.add_delete(f"{root}/responses/{{id}}", stored_response)
        app.router.add_post(f"{root}/responses/{{id}}/{{action:cancel}}", stored_response)
        app.router.add_get(f"{root}/responses/{{id}}/{{action:input_items}}", stored_response)
    for path in ("chat/completions", "embeddings", "completions"):
        app.router.add_post(f"/openai/deployments/{{deployment}}/{path}", azure_chat)
    app.router.add_get("/openai/models", azure_models)
    app.router.add_post("/_control", control)
    return app


async def start_fake(name: str = "fake", ssl_context: ssl.SSLContext | None = None,
                     ) -> tuple[web.AppRunner, str, Recorder]:
    """Start the fake on 127.0.0.1:<free port>; returns (runner, base_url ending in /v1, recorder).

    With `ssl_context` (a server context holding the certificate) it speaks HTTPS only.
    Call ``await runner.cleanup()`` when done.
    """
    app = build_app(name)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    host, port = runner.addresses[0][:2]
    scheme = "http" if ssl_context is None else "https"
    return runner, f"{scheme}://{host}:{port}/v1", app[RECORDER]
