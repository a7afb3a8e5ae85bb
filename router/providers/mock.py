"""A deterministic in-process backend for demos and tests: no network, configurable pacing."""

from __future__ import annotations

import asyncio
import itertools
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from router.config import MockProviderConfig
from router.providers.base import Exchange, UpstreamCall
from router.providers.sse import DONE, data_event
from router.schema import input_items

CREATED = 1_700_000_000


class MockProvider:
    def __init__(self, name: str, config: MockProviderConfig) -> None:
        self.name = name
        self._config = config
        self._ids = itertools.count(1)
        self.secrets: tuple[str, ...] = ()

    async def open(self, call: UpstreamCall) -> Exchange:
        if self._config.latency_ms:
            await asyncio.sleep(self._config.latency_ms / 1000)
        if call.endpoint == "embeddings":
            return Exchange(200, "application/json", _once(orjson.dumps(_embeddings(call.body))),
                            _noop)
        if call.endpoint == "completions":
            return self._completion(call)
        reply = self._reply(call.body)
        if call.stream:
            return Exchange(200, "text/event-stream", self._stream(call.body, reply), _noop)
        return Exchange(200, "application/json", _once(orjson.dumps(reply)), _noop)

    async def probe(self) -> bool | None:
        return None

    def _completion(self, call: UpstreamCall) -> Exchange:
        """A text completion (the legacy API): the same pieces, as `text`."""
        body = call.body
        pieces = self._pieces()
        prompt = body.get("prompt")
        prompt_tokens = len(prompt) // 4 + 1 if isinstance(prompt, str) else 1
        head = {"id": f"cmpl-mock-{next(self._ids)}", "object": "text_completion",
                "created": CREATED, "model": body.get("model")}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                 "total_tokens": prompt_tokens + len(pieces)}
        if not call.stream:
            answer = {**head, "choices": [{"index": 0, "text": "".join(pieces),
                                           "logprobs": None, "finish_reason": "stop"}],
                      "usage": usage}
            return Exchange(200, "application/json", _once(orjson.dumps(answer)), _noop)

        async def events() -> AsyncIterator[bytes]:
            gap = self._config.chunk_gap_ms / 1000
            for n, piece in enumerate(pieces):
                if gap and n:
                    await asyncio.sleep(gap)
                yield data_event({**head, "choices": [{"index": 0, "text": piece,
                                                       "logprobs": None,
                                                       "finish_reason": None}]})
            yield data_event({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                   "finish_reason": "stop"}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield data_event({**head, "choices": [], "usage": usage})
            yield DONE

        return Exchange(200, "text/event-stream", events(), _noop)

    def _pieces(self) -> list[str]:
        text = self._config.text or f"This is a mock reply from {self.name}."
        words = text.split(" ")
        n = self._config.chunks
        return [w + (" " if i < n - 1 else "") for i, w in
                zip(range(n), itertools.cycle(words), strict=False)]

    def _reply(self, body: dict[str, Any]) -> dict[str, Any]:
        pieces = self._pieces()
        tool_calls = _tool_calls(body)
        n = int(body.get("n") or 1)  # validated: an integer, or a float such as 2.0
        message: dict[str, Any] = {"role": "assistant", "content": None if tool_calls
                                   else "".join(pieces)}
        if tool_calls:
            message["tool_calls"] = tool_calls
        prompt = _prompt_tokens(body)
        completion = len(pieces) * n
        return {
            "id": f"chatcmpl-mock-{next(self._ids)}",
            "object": "chat.completion",
            "created": CREATED,
            "model": body.get("model"),
            "choices": [{"index": i, "message": message, "logprobs": None,
                         "finish_reason": "tool_calls" if tool_calls else "stop"}
                        for i in range(n)],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }

    async def _stream(self, body: dict[str, Any], reply: dict[str, Any]) -> AsyncIterator[bytes]:
        gap = self._config.chunk_gap_ms / 1000
        head = {"id": reply["id"], "object": "chat.completion.chunk", "created": CREATED,
                "model": reply["model"]}
        message = reply["choices"][0]["message"]
        n = len(reply["choices"])

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return data_event({**head, "choices": [
                {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
                for i in range(n)]})

        yield chunk({"role": "assistant", "content": ""})
        if message.get("tool_calls"):
            for i, call in enumerate(message["tool_calls"]):
                if gap:
                    await asyncio.sleep(gap)
                yield chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                             "function": call["function"]}]})
        else:
            for piece in self._pieces():
                if gap:
                    await asyncio.sleep(gap)
                yield chunk({"content": piece})
        yield chunk({}, reply["choices"][0]["finish_reason"])
        if (body.get("stream_options") or {}).get("include_usage"):
            yield data_event({**head, "choices": [], "usage": reply["usage"]})
        yield DONE


EMBEDDING_DIMENSIONS = 8


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    """One deterministic unit-ish vector per input, from its text's hash."""
    texts = body.get("input")
    items = input_items(texts)
    size = int(body.get("dimensions") or EMBEDDING_DIMENSIONS)
    data = []
    for i, item in enumerate(items):
        seed = zlib.crc32(orjson.dumps(item))
        data.append({"object": "embedding", "index": i, "embedding": [
            round(((seed >> (k % 24)) % 1000) / 1000 - 0.5, 3) for k in range(size)]})
    tokens = sum(len(t) // 4 + 1 if isinstance(t, str) else len(t) if isinstance(t, list) else 1
                 for t in items)
    return {"object": "list", "data": data, "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _tool_calls(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if not tools or body.get("tool_choice") == "none":
        return None
    name = tools[0]["function"]["name"]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name", name)
    return [{"id": "call_mock_1", "type": "function",
             "function": {"name": name, "arguments": "{}"}}]


def _prompt_tokens(body: dict[str, Any]) -> int:
    chars = sum(len(m["content"]) for m in body.get("messages", [])
                if isinstance(m.get("content"), str))
    return chars // 4 + 1


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _noop() -> None:
    pass
