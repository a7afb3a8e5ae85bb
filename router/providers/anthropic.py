"""Anthropic's Messages API (`type: anthropic`) behind the OpenAI dialect: requests go to
`{base_url}/v1/messages` with `x-api-key` and `anthropic-version`; answers, event streams and
errors come back as OpenAI's. The request's translation is in anthropic_request.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from router.config import AnthropicProviderConfig
from router.errors import UpstreamError
from router.jsonbody import dump_json
from router.providers.anthropic_request import API, messages_body
from router.providers.base import UpstreamCall
from router.providers.sse import DONE
from router.providers.translated import (
    ChunkWriter,
    Request,
    TranslatedProvider,
    parse_data,
    wants_usage,
)
from router.upstream import UpstreamClient

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",  # a server tool's long turn paused: what came is the answer so far
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Anthropic's error type -> OpenAI's (type, code).
ERRORS = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "permission_error": ("invalid_request_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "timeout_error": ("server_error", "timeout"),
    "api_error": ("server_error", "api_error"),
    "overloaded_error": ("server_error", "overloaded"),
}
MAX_ERROR_MESSAGE = 500


def build(name: str, config: AnthropicProviderConfig, client: UpstreamClient,
          probe_timeout_s: float) -> TranslatedProvider:
    base = config.base_url.rstrip("/")
    api_headers = {"anthropic-version": config.anthropic_version}
    if config.anthropic_beta:
        api_headers["anthropic-beta"] = config.anthropic_beta
    auth = {"x-api-key": config.api_key} if config.api_key else {}
    return TranslatedProvider(name, config, AnthropicDialect(base, config), client,
                              auth_headers=auth, api_headers=api_headers,
                              probe_url=f"{base}/v1/models", probe_timeout_s=probe_timeout_s)


class AnthropicDialect:
    name = API

    def __init__(self, base_url: str, config: AnthropicProviderConfig) -> None:
        self._url = f"{base_url}/v1/messages"
        self._default_max_tokens = config.default_max_tokens
        self._drop_unsupported = config.drop_unsupported

    def request(self, call: UpstreamCall) -> Request:
        body = messages_body(call.body, stream=call.stream,
                             default_max_tokens=self._default_max_tokens,
                             drop_unsupported=self._drop_unsupported)
        return Request(self._url, dump_json(body))  # integers past 64 bits go as sent

    def answer(self, native: dict[str, Any], call: UpstreamCall) -> dict[str, Any]:
        content = native.get("content")
        if native.get("type") != "message" or not isinstance(content, list):
            raise UpstreamError("upstream answered with a JSON object that is not a message")
        texts: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(_str(block.get("text")))
            elif kind == "thinking":
                reasoning.append(_str(block.get("thinking")))
            elif kind == "tool_use":
                calls.append({"id": _str(block.get("id")), "type": "function",
                              "function": {"name": _str(block.get("name")),
                                           "arguments": _arguments(block.get("input"))}})
            # redacted thinking and server tools' blocks have no OpenAI equivalent
        message: dict[str, Any] = {"role": "assistant",
                                   "content": "".join(texts) if texts or not calls else None,
                                   "refusal": None}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = calls
        usage = native.get("usage")
        return {
            "id": _str(native.get("id")),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": native.get("model") or call.body.get("model"),
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason(native.get("stop_reason"))}],
            "usage": openai_usage(usage if isinstance(usage, dict) else {}),
        }

    def stream(self, call: UpstreamCall) -> MessageStream:
        return MessageStream(call.body.get("model"), wants_usage(call))

    def error(self, status: int, native: Any) -> dict[str, Any]:
        error = native.get("error") if isinstance(native, dict) else None
        if not isinstance(error, dict):
            return {"error": {"message": f"upstream answered HTTP {status}",
                              "type": "server_error" if status >= 500
                              else "invalid_request_error", "code": None}}
        kind = _str(error.get("type"))
        type_, code = ERRORS.get(kind, ("server_error" if status >= 500
                                        else "invalid_request_error", kind or None))
        message = _str(error.get("message"))[:MAX_ERROR_MESSAGE] or \
            f"upstream answered HTTP {status}"
        return {"error": {"message": message, "type": type_, "code": code}}


def finish_reason(stop_reason: Any) -> str:
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def openai_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic counts cached input apart from `input_tokens`: OpenAI's prompt_tokens is the
    whole input, with the part read from the cache in prompt_tokens_details."""
    read = _count(usage.get("cache_read_input_tokens"))
    prompt = _count(usage.get("input_tokens")) + read + \
        _count(usage.get("cache_creation_input_tokens"))
    completion = _count(usage.get("output_tokens"))
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion,
                           "prompt_tokens_details": {"cached_tokens": read}}
    details = usage.get("output_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("thinking_tokens"), int):
        out["completion_tokens_details"] = {"reasoning_tokens": details["thinking_tokens"]}
    return out


@dataclass(slots=True)
class _ToolBlock:
    index: int  # the OpenAI tool call's index: tool_use blocks counted in order
    start_input: Any  # the input given in content_block_start (normally {})
    sent_arguments: bool = False


class MessageStream:
    """One Messages API event stream, translated into chat.completion.chunk events as each
    event arrives."""

    __slots__ = ("_chunks", "_finished", "_model", "_stopped", "_tools", "_usage",
                 "_wants_usage")

    def __init__(self, model: Any, wants_usage: bool) -> None:
        self._model = model
        self._wants_usage = wants_usage
        self._chunks: ChunkWriter | None = None
        self._tools: dict[int, _ToolBlock] = {}  # content block index -> its tool call
        self._usage: dict[str, Any] = {}
        self._finished = False  # the finish_reason chunk went out
        self._stopped = False  # message_stop arrived

    def feed(self, event: str, data: bytes) -> bytes:
        if not data.strip():
            return b""  # a comment-only event (a proxy's keep-alive)
        payload = parse_data(data)
        kind = payload.get("type") or event
        if kind == "ping":
            return b""
        if kind == "error":
            raise _stream_error(payload)
        if kind == "message_start":
            return self._start(payload)
        chunks = self._chunks
        if chunks is None:
            raise UpstreamError("upstream stream did not begin with message_start")
        if kind == "content_block_start":
            return self._block_start(chunks, payload)
        if kind == "content_block_delta":
            return self._delta(chunks, payload)
        if kind == "content_block_stop":
            return self._block_stop(chunks, payload)
        if kind == "message_delta":
            return self._message_delta(chunks, payload)
        if kind == "message_stop":
            return self._stop(chunks)
        return b""  # an event type newer than this translation: nothing the client needs

    def end(self) -> bytes:
        if not self._stopped:
            raise UpstreamError("the upstream ended the stream before message_stop")
        return DONE

    def _start(self, payload: dict[str, Any]) -> bytes:
        message = payload.get("message")
        if not isinstance(message, dict):
            raise UpstreamError("upstream sent message_start without a message")
        self._chunks = ChunkWriter(_str(message.get("id")), _str(message.get("model")
                                                                 or self._model))
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._usage = dict(usage)
        return self._chunks.delta({"role": "assistant", "content": ""})

    def _block_start(self, chunks: ChunkWriter, payload: dict[str, Any]) -> bytes:
        block = payload.get("content_block")
        if not isinstance(block, dict):
            return b""
        kind = block.get("type")
        if kind == "text" and block.get("text"):
            return chunks.delta({"content": _str(block["text"])})
        if kind == "thinking" and block.get("thinking"):
            return chunks.delta({"reasoning_content": _str(block["thinking"])})
        if kind == "tool_use":
            tool = _ToolBlock(len(self._tools), block.get("input"))
            self._tools[_index(payload)] = tool
            return chunks.delta({"tool_calls": [{
                "index": tool.index, "id": _str(block.get("id")), "type": "function",
                "function": {"name": _str(block.get("name")), "arguments": ""}}]})
        return b""

    def _delta(self, chunks: ChunkWriter, payload: dict[str, Any]) -> bytes:
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            return b""
        kind = delta.get("type")
        if kind == "text_delta":
            text = _str(delta.get("text"))
            return chunks.delta({"content": text}) if text else b""
        if kind == "input_json_delta":
            tool = self._tools.get(_index(payload))
            fragment = _str(delta.get("partial_json"))
            if tool is None or not fragment:
                return b""
            tool.sent_arguments = True
            return chunks.delta({"tool_calls": [{"index": tool.index,
                                                 "function": {"arguments": fragment}}]})
        if kind == "thinking_delta":
            thinking = _str(delta.get("thinking"))
            return chunks.delta({"reasoning_content": thinking}) if thinking else b""
        return b""  # signature and citations deltas: no OpenAI equivalent

    def _block_stop(self, chunks: ChunkWriter, payload: dict[str, Any]) -> bytes:
        """A tool call whose input came whole (or empty) gets its arguments now: an OpenAI
        client parses the arguments it accumulated as JSON."""
        tool = self._tools.get(_index(payload))
        if tool is None or tool.sent_arguments:
            return b""
        tool.sent_arguments = True
        return chunks.delta({"tool_calls": [{"index": tool.index, "function": {
            "arguments": _arguments(tool.start_input)}}]})

    def _message_delta(self, chunks: ChunkWriter, payload: dict[str, Any]) -> bytes:
        usage = payload.get("usage")
        if isinstance(usage, dict):  # cumulative counts: the latest are the answer's
            self._usage.update((k, v) for k, v in usage.items() if v is not None)
        delta = payload.get("delta")
        stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        if stop_reason is None or self._finished:
            return b""
        self._finished = True
        return chunks.delta({}, finish_reason=finish_reason(stop_reason))

    def _stop(self, chunks: ChunkWriter) -> bytes:
        self._stopped = True
        out = b""
        if not self._finished:
            self._finished = True
            out = chunks.delta({}, finish_reason="stop")
        if self._wants_usage:
            out += chunks.usage(openai_usage(self._usage))
        return out


def _stream_error(payload: dict[str, Any]) -> UpstreamError:
    error = payload.get("error")
    if not isinstance(error, dict):
        return UpstreamError("upstream reported an error in the stream")
    kind = _str(error.get("type")) or "error"
    message = _str(error.get("message"))[:MAX_ERROR_MESSAGE]
    return UpstreamError(f"upstream reported {kind} in the stream: {message}")


def _index(payload: dict[str, Any]) -> int:
    index = payload.get("index")
    return index if isinstance(index, int) else -1


def _arguments(value: Any) -> str:
    """A tool_use block's input as OpenAI's `arguments`: a JSON object in a string."""
    return orjson.dumps(value if isinstance(value, dict) else {}).decode()


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
