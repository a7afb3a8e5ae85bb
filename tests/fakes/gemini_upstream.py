"""A real aiohttp server speaking Google's Gemini API (`generateContent`, and
`streamGenerateContent?alt=sse`), misbehaving on demand.

Requests are checked against the google-genai SDK's own types (which forbid unknown fields, as
the API does): a request the real API would refuse gets its 400 INVALID_ARGUMENT here too.

Behaviour is chosen by the model name in the path (or a server-wide override set through
``POST /_control``): directives joined by ``+``, each ``name`` or ``name:arg``; unknown words
(real model names) mean a normal answer.

- ``chunks:N`` the answer is N pieces ``tok0 tok1 ...`` (default 5), one per stream chunk;
  cut short at a requested stop sequence, or at maxOutputTokens (finishReason MAX_TOKENS)
- a request that declares tools (mode not NONE) gets a function call of its first (allowed)
  function with ``{"x": 1}``; ``calls:N`` makes N calls; ``signature`` gives each call part a
  thoughtSignature; ``call-id`` gives each call an id
- ``thought`` a thought part first (to be left out), counted in thoughtsTokenCount
- ``finish:REASON`` the last chunk's finishReason; ``no-finish`` a stream without one
- ``blocked`` the prompt is blocked (promptFeedback.blockReason, no candidates)
- ``ping`` an SSE comment between stream chunks; ``gap:S`` seconds between chunks;
  ``first-byte:S`` seconds before answering
- ``error-mid`` an error object after two stream chunks, then the end; ``error-first`` as the
  first event
- ``status:N`` an error answer (google.rpc status for N); ``retry-after:N`` its Retry-After
  header; ``retry-delay:N`` a RetryInfo detail of N seconds in its body
- ``cut:N`` the connection torn after N stream chunks (a JSON answer: halfway)
- ``cached:N`` cachedContentTokenCount
- ``models-500`` the models list fails
"""

from __future__ import annotations

import asyncio
import time
import warnings
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from google.genai import types
from pydantic import TypeAdapter

from tests.fakes.directives import parse_directives
from tests.fakes.openai_upstream import Recorder, Seen

MODEL_VERSION = "gemini-fake-001"
TOOL_ARGS = {"x": 1}
SIGNATURE = "c2lnbmF0dXJlLW9mLXRob3VnaHQ="  # base64, as Gemini's are
RPC_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
              404: "NOT_FOUND", 409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
              500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE",
              504: "DEADLINE_EXCEEDED"}
_REQUEST_FIELDS = {"contents": TypeAdapter(list[types.Content]),
                   "systemInstruction": TypeAdapter(types.Content),
                   "tools": TypeAdapter(list[types.Tool]),
                   "toolConfig": TypeAdapter(types.ToolConfig),
                   "generationConfig": TypeAdapter(types.GenerationConfig),
                   "safetySettings": TypeAdapter(list[types.SafetySetting]),
                   "cachedContent": TypeAdapter(str)}

RECORDER = web.AppKey("RECORDER", Recorder)


@dataclass
class Behaviour:
    chunks: int = 5
    calls: int = 1
    signature: bool = False
    call_id: bool = False
    thought: bool = False
    finish: str = "STOP"
    no_finish: bool = False
    blocked: bool = False
    ping: bool = False
    gap: float = 0.0
    first_byte: float = 0.0
    error_mid: bool = False
    error_first: bool = False
    status: int | None = None
    retry_after: str | None = None
    retry_delay: int | None = None
    cut: int | None = None
    cached: int = 0
    models_500: bool = False


def parse_behaviour(spec: str | None) -> Behaviour:
    return parse_directives(spec, Behaviour())


def error_body(code: int, message: str, details: list[Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message,
                             "status": RPC_STATUS.get(code, "UNKNOWN")}
    if details:
        error["details"] = details
    return {"error": error}


def check_request(body: Any) -> str | None:
    """Why the real API would refuse this body (None: it would take it)."""
    if not isinstance(body, dict):
        return "Invalid JSON payload received."
    for name in body:
        if name not in _REQUEST_FIELDS:
            return f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
    if not body.get("contents"):
        return "* GenerateContentRequest.contents: contents is not specified"
    for name, adapter in _REQUEST_FIELDS.items():
        if name in body:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    adapter.validate_json(orjson.dumps(body[name]))
            except Exception as exc:
                return f"Invalid JSON payload received. {name}: {exc}"
    for i, content in enumerate(body["contents"]):
        if content.get("role") not in ("user", "model"):
            return f"* GenerateContentRequest.contents[{i}].role: must be user or model"
        if not content.get("parts"):
            return f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not " \
                   "be empty."
    return None


def _text_chars(content: Any) -> int:
    parts = content.get("parts") if isinstance(content, dict) else None
    return sum(len(p.get("text") or "") for p in parts or () if isinstance(p, dict))


def prompt_tokens(body: dict[str, Any]) -> int:
    chars = sum(_text_chars(c) for c in body.get("contents") or ())
    return (chars + _text_chars(body.get("systemInstruction"))) // 4 + 1


def _function_names(body: dict[str, Any]) -> list[str]:
    """The functions a call may name: none when no tools are declared or the mode is NONE."""
    calling = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    if calling.get("mode") == "NONE":
        return []
    names = [d["name"] for tool in body.get("tools") or ()
             for d in tool.get("functionDeclarations") or ()]
    allowed = calling.get("allowedFunctionNames")
    return [n for n in names if n in allowed] if allowed else names


def _pieces(b: Behaviour, config: dict[str, Any]) -> tuple[list[str], str]:
    """The text pieces and the finishReason, after stop sequences and maxOutputTokens."""
    pieces = [f"tok{i} " for i in range(b.chunks)]
    finish = b.finish
    for stop in config.get("stopSequences") or ():
        for i, piece in enumerate(pieces):
            if stop in piece:
                pieces = pieces[:i]
                break
    limit = config.get("maxOutputTokens")
    if isinstance(limit, int) and limit < len(pieces):
        pieces, finish = pieces[:limit], "MAX_TOKENS"
    return pieces, finish


class Answer:
    """One answer's candidates, built for a JSON body or chunk by chunk for a stream."""

    def __init__(self, b: Behaviour, body: dict[str, Any], response_id: str) -> None:
        self.b = b
        self.response_id = response_id
        config = body.get("generationConfig") or {}
        self.n = int(config.get("candidateCount") or 1)
        self.prompt = prompt_tokens(body)
        self.pieces, self.finish = _pieces(b, config)
        names = _function_names(body)
        self.calls = [names[0]] * b.calls if names else []
        self.thoughts = 4 if b.thought else 0

    def function_calls(self) -> list[dict[str, Any]]:
        parts = []
        for k, name in enumerate(self.calls):
            call: dict[str, Any] = {"name": name, "args": TOOL_ARGS}
            if self.b.call_id:
                call["id"] = f"fc-{k + 1}"
            part: dict[str, Any] = {"functionCall": call}
            if self.b.signature:
                part["thoughtSignature"] = SIGNATURE
            parts.append(part)
        return parts

    def completion_tokens(self, sent: int) -> int:
        per_candidate = 3 * len(self.calls) if self.calls else sent
        return per_candidate * self.n

    def usage(self, sent: int) -> dict[str, Any]:
        completion = self.completion_tokens(sent)
        usage: dict[str, Any] = {"promptTokenCount": self.prompt,
                                 "candidatesTokenCount": completion,
                                 "totalTokenCount": self.prompt + completion + self.thoughts,
                                 "promptTokensDetails": [{"modality": "TEXT",
                                                          "tokenCount": self.prompt}]}
        if self.thoughts:
            usage["thoughtsTokenCount"] = self.thoughts
        if self.b.cached:
            usage["cachedContentTokenCount"] = self.b.cached
        return usage

    def response(self, candidates: list[dict[str, Any]] | None,
                 usage: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if candidates is not None:
            out["candidates"] = candidates
        else:
            out["promptFeedback"] = {"blockReason": "SAFETY"}
        out.update(usageMetadata=usage, modelVersion=MODEL_VERSION, responseId=self.response_id)
        return out

    def whole(self) -> dict[str, Any]:
        if self.b.blocked:
            return self.response(None, {"promptTokenCount": self.prompt,
                                        "totalTokenCount": self.prompt})
        parts: list[dict[str, Any]] = []
        if self.b.thought:
            parts.append({"text": "Let me think.", "thought": True})
        if self.calls:
            parts += self.function_calls()
        else:
            parts.append({"text": "".join(self.pieces)})
        candidates = [{"content": {"parts": parts, "role": "model"},
                       "finishReason": self.finish, "index": i} for i in range(self.n)]
        return self.response(candidates, self.usage(len(self.pieces)))

    def chunks(self) -> list[dict[str, Any]]:
        """The stream's GenerateContentResponse chunks, in order."""
        if self.b.blocked:
            return [self.whole()]
        steps: list[list[dict[str, Any]]] = []  # each chunk's parts, the same for every index
        if self.b.thought:
            steps.append([{"text": "Let me think.", "thought": True}])
        if self.calls:
            steps.append(self.function_calls())
        else:
            steps += [[{"text": piece}] for piece in self.pieces]
            steps.append([{"text": ""}])  # Gemini's last chunk: empty text and the finish
        out = []
        for k, parts in enumerate(steps):
            last = k == len(steps) - 1
            candidates = []
            for i in range(self.n):
                cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"},
                                        "index": i}
                if last and not self.b.no_finish:
                    cand["finishReason"] = self.finish
                candidates.append(cand)
            sent = min(k + 1 - (1 if self.b.thought else 0), len(self.pieces))
            out.append(self.response(candidates, self.usage(max(sent, 0))))
        return out


async def _send(request: web.Request, status: int, payload: Any,
                headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(status=status, body=orjson.dumps(payload), headers=headers,
                        content_type="application/json")
    await resp.prepare(request)
    await resp.write_eof()
    return resp


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _denied(request: web.Request) -> dict[str, Any] | None:
    """The API's answer to a request without its key, or with a bearer token it cannot use."""
    if request.headers.get("Authorization"):
        return error_body(401, "Request had invalid authentication credentials. Expected "
                               "OAuth 2 access token, login cookie or other valid "
                               "authentication credential.")
    if not request.headers.get("x-goog-api-key"):
        return error_body(403, "Method doesn't allow unregistered callers (callers without "
                               "established identity). Please use API Key or other form of "
                               "API consumer identity to call this API.")
    return None


async def generate(request: web.Request) -> web.StreamResponse:
    rec = request.app[RECORDER]
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    model, _, method = request.match_info["target"].rpartition(":")
    seen = Seen(t_received=time.monotonic(), headers=dict(request.headers),
                body=body if isinstance(body, dict) else {}, raw=raw, path=request.path_qs)
    rec.seen.append(seen)
    rec.inflight += 1
    rec.max_inflight = max(rec.max_inflight, rec.inflight)
    try:
        resp = await _answer(request, rec, model, method, body)
        seen.t_finished = time.monotonic()
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        seen.t_disconnected = time.monotonic()
        raise
    finally:
        rec.inflight -= 1


_CONTENT = TypeAdapter(types.Content)


async def _embed(request: web.Request, b: Behaviour, model: str, body: Any
                 ) -> web.StreamResponse:
    """batchEmbedContents: one vector of `outputDimensionality` (default 6) values per request,
    each request naming this model, its content checked against the SDK's Content type."""
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests or set(body) != {"requests"}:
        return await _send(request, 400, error_body(400, "Invalid JSON payload: requests"))
    vectors = []
    for n, item in enumerate(requests):
        if not isinstance(item, dict) or item.get("model") != f"models/{model}" or \
                set(item) - {"model", "content", "outputDimensionality", "taskType", "title"}:
            return await _send(request, 400, error_body(400, f"requests[{n}] is invalid"))
        try:
            _CONTENT.validate_python(item.get("content"))
        except ValueError as exc:
            return await _send(request, 400, error_body(400, f"requests[{n}].content: {exc}"))
        size = item.get("outputDimensionality") or 6
        vectors.append({"values": [round(0.125 * (n + 1), 3)] * size})
    if b.status is not None:
        return await _send(request, b.status, error_body(b.status, f"fake failure {b.status}"))
    return await _send(request, 200, {"embeddings": vectors})


async def _answer(request: web.Request, rec: Recorder, model: str, method: str,
                  body: Any) -> web.StreamResponse:
    b = parse_behaviour(rec.override if rec.override is not None else model)
    denied = _denied(request)
    if denied is not None:
        return await _send(request, denied["error"]["code"], denied)
    if method == "batchEmbedContents":
        return await _embed(request, b, model, body)
    if method not in ("generateContent", "streamGenerateContent"):
        return await _send(request, 404, error_body(404, f"Method {method} not found."))
    problem = check_request(body)
    if problem is not None:
        return await _send(request, 400, error_body(400, problem))
    if b.first_byte:
        await asyncio.sleep(b.first_byte)
    if b.status is not None:
        details = None
        if b.retry_delay is not None:
            details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{b.retry_delay}s"}]
        headers = {"Retry-After": b.retry_after} if b.retry_after is not None else None
        return await _send(request, b.status,
                           error_body(b.status, f"fake failure {b.status}", details), headers)
    answer = Answer(b, body, rec.next_id().replace("chatcmpl-", "resp-"))
    if method == "streamGenerateContent":
        if request.query.get("alt") != "sse":
            return await _send(request, 400, error_body(400, "this fake streams only SSE"))
        return await _stream(request, b, answer)
    whole = answer.whole()
    if b.cut is None:
        return await _send(request, 200, whole)
    payload = orjson.dumps(whole)
    resp = web.StreamResponse(status=200)
    resp.content_type = "application/json"
    resp.content_length = len(payload)
    await resp.prepare(request)
    await resp.write(payload[: len(payload) // 2])
    _abort(request)
    return resp


async def _stream(request: web.Request, b: Behaviour, answer: Answer) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache"})
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    failure = b"data: " + orjson.dumps(error_body(500, "An internal error has occurred.")) + \
        b"\r\n\r\n"
    if b.error_first:
        await resp.write(failure)
        await resp.write_eof()
        return resp
    for k, chunk in enumerate(answer.chunks()):
        if b.cut is not None and k >= b.cut:
            _abort(request)
            return resp
        if k and b.gap:
            await asyncio.sleep(b.gap)
        if b.error_mid and k == 2:
            await resp.write(failure)
            await resp.write_eof()
            return resp
        if k and b.ping:
            await resp.write(b": ping\r\n\r\n")
        # Gemini ends its SSE lines with CRLF.
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\r\n\r\n")
    await resp.write_eof()
    return resp


async def models(request: web.Request) -> web.Response:
    rec = request.app[RECORDER]
    denied = _denied(request)
    if denied is not None:
        return await _send(request, denied["error"]["code"], denied)
    if parse_behaviour(rec.override).models_500:
        return await _send(request, 500, error_body(500, "fake failure 500"))
    return await _send(request, 200, {"models": [{
        "name": "models/gemini-fake", "version": "001", "displayName": "Gemini Fake",
        "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
        "supportedGenerationMethods": ["generateContent", "countTokens"]}]})


async def control(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read() or b"{}")
    behaviour = body.get("behaviour") if isinstance(body, dict) else None
    request.app[RECORDER].override = str(behaviour) if behaviour is not None else None
    return await _send(request, 200, {})


def build_app() -> web.Application:
    app = web.Application()
    app[RECORDER] = Recorder()
    app.router.add_post("/v1beta/models/{target}", generate)
    app.router.add_post("/v1beta/tunedModels/{target}", generate)
    app.router.add_get("/v1beta/models", models)
    app.router.add_post("/_control", control)
    return app


async def start_gemini() -> tuple[web.AppRunner, str, Recorder]:
    """Start the fake on 127.0.0.1:<free port>: (runner, base_url without a path, recorder).
    Call ``await runner.cleanup()`` when done."""
    app = build_app()
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}", app[RECORDER]
