"""Google's Gemini API (`type: gemini`): `{base_url}/v1beta/models/{model}:generateContent`, or
`:streamGenerateContent?alt=sse` for a stream, with the key in `x-goog-api-key`.

The request is written by gemini_request.py; here the answers are read back as OpenAI's:
candidates become choices, function calls tool calls, `usageMetadata` usage, and a stream's
`GenerateContentResponse` chunks become `chat.completion.chunk` events as each arrives.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from router.config import GeminiProviderConfig
from router.errors import UpstreamError
from router.jsonbody import dump_json
from router.providers.base import UpstreamCall
from router.providers.gemini_embeddings import embed_answer, embed_body
from router.providers.gemini_request import API, gemini_body
from router.providers.translated import (
    DONE,
    THOUGHT,
    ChunkWriter,
    Request,
    TranslatedProvider,
    parse_data,
    wants_usage,
)
from router.upstream import UpstreamClient

_LENGTH = frozenset({"MAX_TOKENS", "CONTINUATION"})
_FILTERED = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                       "LANGUAGE", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT",
                       "IMAGE_RECITATION", "MODEL_ARMOR", "ESCALATION",
                       "PUP_LIMITED_DISABLED"})
# google.rpc status -> OpenAI's error type.
_ERROR_TYPES = {
    "INVALID_ARGUMENT": "invalid_request_error", "FAILED_PRECONDITION": "invalid_request_error",
    "OUT_OF_RANGE": "invalid_request_error", "NOT_FOUND": "invalid_request_error",
    "ALREADY_EXISTS": "invalid_request_error", "CANCELLED": "invalid_request_error",
    "RESOURCE_EXHAUSTED": "rate_limit_error", "UNAUTHENTICATED": "authentication_error",
    "PERMISSION_DENIED": "permission_error", "INTERNAL": "server_error",
    "UNKNOWN": "server_error", "DATA_LOSS": "server_error", "UNAVAILABLE": "server_error",
    "DEADLINE_EXCEEDED": "server_error", "UNIMPLEMENTED": "server_error",
}
_DELAY = re.compile(r"\s*(\d+(?:\.\d*)?)s\s*")
_ROLE = {"role": "assistant", "content": ""}


def build(name: str, config: GeminiProviderConfig, client: UpstreamClient,
          probe_timeout_s: float) -> TranslatedProvider:
    base = config.base_url.rstrip("/")
    auth = {"x-goog-api-key": config.api_key} if config.api_key else {}
    return TranslatedProvider(name, config, GeminiDialect(base, config.drop_unsupported), client,
                              auth_headers=auth, probe_url=f"{base}/v1beta/models",
                              probe_timeout_s=probe_timeout_s, retry_hint=retry_delay)


def _resource(model: str) -> str:
    """`gemini-2.5-flash`, `models/gemini-2.5-flash` or a tuned model's full name, as Gemini
    names it."""
    return model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"


class GeminiDialect:
    name = API

    def __init__(self, base_url: str, drop_unsupported: bool = False) -> None:
        self._base = base_url
        self._drop = drop_unsupported
        self._urls: dict[tuple[str, str], str] = {}

    def request(self, call: UpstreamCall) -> Request:
        model = str(call.body.get("model") or "")
        if call.endpoint == "embeddings":
            return Request(self._url(model, "batchEmbedContents"), dump_json(
                embed_body(call.body, _resource(model), self._drop)))
        method = "streamGenerateContent?alt=sse" if call.stream else "generateContent"
        return Request(self._url(model, method),
                       dump_json(gemini_body(call.body, self._drop)))

    def _url(self, model: str, method: str) -> str:
        url = self._urls.get((model, method))
        if url is None:
            kind, _, rest = _resource(model).partition("/")
            url = self._urls[model, method] = \
                f"{self._base}/v1beta/{kind}/{quote(rest, safe='')}:{method}"
        return url

    def answer(self, native: dict[str, Any], call: UpstreamCall) -> dict[str, Any]:
        if call.endpoint == "embeddings":
            return embed_answer(native, call.body)
        candidates = native.get("candidates")
        if isinstance(candidates, list) and candidates:
            choices = sorted((_choice(cand) for cand in candidates if isinstance(cand, dict)),
                             key=lambda c: c["index"])
        elif _blocked(native):
            # The prompt itself was refused: one empty choice that says so.
            choices = [{"index": 0, "message": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": "content_filter"}]
        else:
            raise UpstreamError("upstream answered without any candidate")
        answer: dict[str, Any] = {"id": _str(native.get("responseId")) or _completion_id(),
                                  "object": "chat.completion", "created": int(time.time()),
                                  "model": _str(native.get("modelVersion"))
                                  or call.body.get("model"),
                                  "choices": choices}
        usage = native.get("usageMetadata")
        if isinstance(usage, dict):
            answer["usage"] = openai_usage(usage)
        return answer

    def stream(self, call: UpstreamCall) -> GeminiStream:
        return GeminiStream(call)

    def error(self, status: int, native: Any) -> dict[str, Any]:
        error = _native_error(native)
        message = _str(error.get("message")) or f"upstream answered HTTP {status}"
        rpc_status = _str(error.get("status"))
        kind = _ERROR_TYPES.get(rpc_status) or \
            ("server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": message, "type": kind,
                          "code": rpc_status.lower() if rpc_status else None}}


@dataclass(slots=True)
class _Candidate:
    """One choice of a stream: its tool calls so far, and its finish once it came."""

    calls: int = 0
    finish: str | None = None


class GeminiStream:
    """One `streamGenerateContent?alt=sse` stream: each `data:` is a GenerateContentResponse
    holding the candidates' new parts. Gemini has no end event: the stream's end is the
    answer's end, which must have given every candidate its finishReason."""

    def __init__(self, call: UpstreamCall) -> None:
        self._call = call
        self._writer: ChunkWriter | None = None
        self._candidates: dict[int, _Candidate] = {}
        self._usage: dict[str, Any] | None = None

    def feed(self, event: str, data: bytes) -> bytes:
        data = data.strip()
        if not data or data == b"[DONE]":  # a comment (keep-alive), or a proxy's end marker
            return b""
        chunk = parse_data(data)
        error = chunk.get("error")
        if isinstance(error, dict):
            raise UpstreamError(f"upstream reported an error mid-stream "
                                f"({_str(error.get('status')) or error.get('code')})")
        writer = self._writer
        if writer is None:
            writer = self._writer = ChunkWriter(
                _str(chunk.get("responseId")) or _completion_id(),
                _str(chunk.get("modelVersion")) or str(self._call.body.get("model") or ""))
        usage = chunk.get("usageMetadata")
        if isinstance(usage, dict):
            self._usage = usage  # each chunk's counts are the totals so far
        out: list[bytes] = []
        candidates = chunk.get("candidates")
        if isinstance(candidates, list) and candidates:
            for cand in candidates:
                if isinstance(cand, dict):
                    self._candidate(writer, cand, out)
        elif _blocked(chunk) and 0 not in self._candidates:
            self._candidates[0] = _Candidate(finish="content_filter")
            out += (writer.delta(_ROLE), writer.delta({}, 0, "content_filter"))
        return b"".join(out)

    def _candidate(self, writer: ChunkWriter, cand: dict[str, Any], out: list[bytes]) -> None:
        index = _index(cand)
        state = self._candidates.get(index)
        if state is None:
            state = self._candidates[index] = _Candidate()
            out.append(writer.delta(_ROLE, index))
        text, calls = _parts(cand)
        if text:
            out.append(writer.delta({"content": text}, index))
        for call in calls:
            k = state.calls
            state.calls += 1
            out.append(writer.delta({"tool_calls": [{
                "index": k, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}]}, index))
            out.append(writer.delta({"tool_calls": [{
                "index": k, "function": {"arguments": call["function"]["arguments"]}}]}, index))
        reason = _str(cand.get("finishReason"))
        if reason and state.finish is None:
            state.finish = finish_reason(reason, state.calls > 0)
            out.append(writer.delta({}, index, state.finish))

    def end(self) -> bytes:
        if not self._candidates or any(c.finish is None for c in self._candidates.values()):
            raise UpstreamError("upstream stream ended before its finish reason")
        out = []
        if wants_usage(self._call) and self._usage is not None and self._writer is not None:
            out.append(self._writer.usage(openai_usage(self._usage)))
        out.append(DONE)
        return b"".join(out)


def _choice(cand: dict[str, Any]) -> dict[str, Any]:
    text, calls = _parts(cand)
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls
                               else None}
    if calls:
        message["tool_calls"] = calls
    reason = _str(cand.get("finishReason"))
    return {"index": _index(cand), "message": message, "logprobs": None,
            "finish_reason": finish_reason(reason, bool(calls))}


def _parts(cand: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """A candidate's text (thoughts left out) and its function calls as OpenAI tool calls."""
    content = cand.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in parts if isinstance(parts, list) else ():
        if not isinstance(part, dict):
            continue
        call = part.get("functionCall")
        if isinstance(call, dict):
            calls.append(_tool_call(call, _str(part.get("thoughtSignature"))))
        elif isinstance(part.get("text"), str) and not part.get("thought"):
            text.append(part["text"])
    return "".join(text), calls


def _tool_call(call: dict[str, Any], signature: str) -> dict[str, Any]:
    call_id = _str(call.get("id")) or f"call_{secrets.token_hex(12)}"
    if signature:
        call_id = f"{call_id}{THOUGHT}{signature}"
    args = call.get("args")
    return {"id": call_id, "type": "function",
            "function": {"name": _str(call.get("name")),
                         "arguments": orjson.dumps(args if isinstance(args, dict) else {})
                         .decode()}}


def finish_reason(native: str, called: bool) -> str:
    """Gemini's finishReason -> OpenAI's; a candidate that called functions says tool_calls
    unless it was cut short or filtered."""
    if native in _LENGTH:
        return "length"
    if native in _FILTERED:
        return "content_filter"
    return "tool_calls" if called else "stop"


def openai_usage(meta: dict[str, Any]) -> dict[str, Any]:
    """`usageMetadata` -> OpenAI's usage: thinking counts as completion (reasoning) tokens,
    the prompt of server-side tools as prompt tokens."""
    prompt = _count(meta.get("promptTokenCount")) + _count(meta.get("toolUsePromptTokenCount"))
    thoughts = _count(meta.get("thoughtsTokenCount"))
    completion = _count(meta.get("candidatesTokenCount")) + thoughts
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens":
                                      _count(meta.get("cachedContentTokenCount"))},
            "completion_tokens_details": {"reasoning_tokens": thoughts}}


def retry_delay(native: Any) -> float | None:
    """The `retryDelay` ("37s") of a google.rpc.RetryInfo in an error's details."""
    details = _native_error(native).get("details")
    for detail in details if isinstance(details, list) else ():
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith(
                "google.rpc.RetryInfo"):
            match = _DELAY.fullmatch(str(detail.get("retryDelay", "")))
            if match:
                return min(float(match.group(1)), 3600.0)
    return None


def _native_error(native: Any) -> dict[str, Any]:
    """The `error` object of an error body (streaming endpoints may wrap it in a list)."""
    if isinstance(native, list) and native:
        native = native[0]
    error = native.get("error") if isinstance(native, dict) else None
    return error if isinstance(error, dict) else {}


def _blocked(native: dict[str, Any]) -> bool:
    feedback = native.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason"))


def _index(cand: dict[str, Any]) -> int:
    """A candidate's index: absent is 0 (proto3 JSON leaves default values out)."""
    index = cand.get("index")
    return index if isinstance(index, int) and index >= 0 else 0


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"
