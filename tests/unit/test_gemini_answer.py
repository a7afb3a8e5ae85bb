"""Gemini's answers read back as OpenAI's: whole answers, streams fed event by event (and as
bytes cut anywhere), error bodies and their retry delay."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from router.config import GeminiProviderConfig
from router.errors import UpstreamError
from router.providers.base import UpstreamCall
from router.providers.gemini import GeminiDialect, build, retry_delay
from router.providers.gemini_request import THOUGHT
from router.upstream import Timeouts

USER = [{"role": "user", "content": "hi"}]
USAGE = {"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 7,
         "cachedContentTokenCount": 4, "totalTokenCount": 22}
OPENAI_USAGE = {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22,
                "prompt_tokens_details": {"cached_tokens": 4},
                "completion_tokens_details": {"reasoning_tokens": 7}}
dialect = GeminiDialect("https://g.example")


def call(stream: bool = False, include_usage: bool = False, **body: Any) -> UpstreamCall:
    payload: dict[str, Any] = {"model": "gemini-x", "messages": USER, **body}
    if include_usage:
        payload["stream_options"] = {"include_usage": True}
    return UpstreamCall(payload, stream, "req-1", Timeouts(5, 60, 30))


def candidate(*parts: dict[str, Any], finish: str | None = None,
              index: int | None = None) -> dict[str, Any]:
    cand: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}}
    if finish is not None:
        cand["finishReason"] = finish
    if index is not None:
        cand["index"] = index
    return cand


def test_answer_text_usage_id_and_model():
    native = {"candidates": [candidate({"text": "Let me think", "thought": True},
                                       {"text": "Hello "}, {"text": "world"},
                                       finish="STOP", index=0)],
              "usageMetadata": USAGE, "modelVersion": "gemini-2.5-flash-001",
              "responseId": "resp-abc"}
    answer = dialect.answer(native, call())
    assert answer["id"] == "resp-abc"
    assert answer["object"] == "chat.completion"
    assert isinstance(answer["created"], int)
    assert answer["model"] == "gemini-2.5-flash-001"
    assert answer["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "Hello world"}}]
    assert answer["usage"] == OPENAI_USAGE


def test_answer_without_id_or_model_version():
    answer = dialect.answer({"candidates": [candidate({"text": "x"}, finish="STOP")]}, call())
    assert answer["id"].startswith("chatcmpl-")
    assert answer["model"] == "gemini-x"
    assert "usage" not in answer


def test_answer_function_calls_are_tool_calls():
    native = {"candidates": [candidate(
        {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
         "thoughtSignature": "c2ln"},
        {"functionCall": {"name": "now", "id": "fc-7"}}, finish="STOP")]}
    (choice,) = dialect.answer(native, call())["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    first, second = message["tool_calls"]
    assert first["id"].startswith("call_") and first["id"].endswith(f"{THOUGHT}c2ln")
    assert first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}
    assert second["id"] == "fc-7"
    assert second["function"] == {"name": "now", "arguments": "{}"}


@pytest.mark.parametrize(("reason", "called", "expected"), [
    ("STOP", False, "stop"), ("STOP", True, "tool_calls"), ("MAX_TOKENS", False, "length"),
    ("MAX_TOKENS", True, "length"), ("SAFETY", False, "content_filter"),
    ("RECITATION", False, "content_filter"), ("BLOCKLIST", False, "content_filter"),
    ("PROHIBITED_CONTENT", False, "content_filter"), ("SPII", True, "content_filter"),
    ("IMAGE_SAFETY", False, "content_filter"), ("OTHER", False, "stop"),
    ("MALFORMED_FUNCTION_CALL", False, "stop"), ("FINISH_REASON_UNSPECIFIED", False, "stop"),
])
def test_finish_reasons(reason, called, expected):
    parts = [{"functionCall": {"name": "f", "args": {}}}] if called else [{"text": "x"}]
    native = {"candidates": [candidate(*parts, finish=reason)]}
    assert dialect.answer(native, call())["choices"][0]["finish_reason"] == expected


def test_candidates_are_choices_by_index():
    native = {"candidates": [candidate({"text": "b"}, finish="STOP", index=1),
                             candidate({"text": "a"}, finish="MAX_TOKENS")]}
    choices = dialect.answer(native, call(n=2))["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "a", "length"), (1, "b", "stop")]


def test_blocked_prompt_is_one_filtered_choice():
    native = {"promptFeedback": {"blockReason": "SAFETY"},
              "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}}
    answer = dialect.answer(native, call())
    assert answer["choices"] == [{"index": 0, "logprobs": None,
                                  "finish_reason": "content_filter",
                                  "message": {"role": "assistant", "content": ""}}]
    assert answer["usage"]["prompt_tokens"] == 8
    assert answer["usage"]["completion_tokens"] == 0


def test_answer_without_candidates_is_an_upstream_failure():
    with pytest.raises(UpstreamError):
        dialect.answer({"usageMetadata": USAGE}, call())


def data(obj: Any) -> bytes:
    return orjson.dumps(obj)


def events(raw: bytes) -> list[Any]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            payload = block.removeprefix(b"data: ")
            out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def chunk(*candidates: dict[str, Any], usage: dict[str, Any] | None = None) -> bytes:
    out: dict[str, Any] = {"candidates": list(candidates), "modelVersion": "gemini-x-001",
                           "responseId": "resp-1"}
    if usage:
        out["usageMetadata"] = usage
    return data(out)


def test_stream_text_event_by_event():
    translator = dialect.stream(call(True, include_usage=True))
    first = events(translator.feed("", chunk(candidate({"text": "Hel"}, index=0),
                                             usage={"promptTokenCount": 10})))
    assert [e["choices"][0]["delta"] for e in first] == [{"role": "assistant", "content": ""},
                                                         {"content": "Hel"}]
    assert all(e["id"] == "resp-1" and e["model"] == "gemini-x-001" and
               e["object"] == "chat.completion.chunk" for e in first)
    assert translator.feed("", b"") == b""  # an SSE comment (keep-alive)
    middle = events(translator.feed("", chunk(candidate({"text": "thinking", "thought": True},
                                                        {"text": "lo"}))))
    assert [e["choices"][0]["delta"] for e in middle] == [{"content": "lo"}]
    last = events(translator.feed("", chunk(candidate({"text": ""}, finish="STOP"),
                                            usage=USAGE)))
    assert [(e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in last] == [
        ({}, "stop")]
    end = events(translator.end())
    assert end[0]["choices"] == [] and end[0]["usage"] == OPENAI_USAGE
    assert end[1] == "[DONE]"


def test_stream_without_include_usage_has_no_usage_chunk():
    translator = dialect.stream(call(True))
    translator.feed("", chunk(candidate({"text": "x"}, finish="STOP"), usage=USAGE))
    assert events(translator.end()) == ["[DONE]"]


def test_stream_tool_calls_keep_their_ids():
    translator = dialect.stream(call(True))
    out = events(translator.feed("", chunk(candidate(
        {"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "c2ln"}))))
    out += events(translator.feed("", chunk(candidate(
        {"functionCall": {"name": "g", "args": {}, "id": "fc-2"}}, finish="STOP"))))
    deltas = [e["choices"][0]["delta"] for e in out]
    assert deltas[0] == {"role": "assistant", "content": ""}
    head = deltas[1]["tool_calls"][0]
    assert head["index"] == 0 and head["type"] == "function"
    assert head["id"].startswith("call_") and head["id"].endswith(f"{THOUGHT}c2ln")
    assert head["function"] == {"name": "f", "arguments": ""}
    assert deltas[2] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":1}'}}]}
    assert deltas[3] == {"tool_calls": [{"index": 1, "id": "fc-2", "type": "function",
                                         "function": {"name": "g", "arguments": ""}}]}
    assert deltas[4] == {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_several_candidates():
    translator = dialect.stream(call(True, n=2))
    out = events(translator.feed("", chunk(candidate({"text": "a"}),
                                           candidate({"text": "b"}, index=1))))
    out += events(translator.feed("", chunk(candidate({"text": ""}, finish="STOP", index=0),
                                            candidate({"text": ""}, finish="MAX_TOKENS",
                                                      index=1))))
    by_index: dict[int, list[Any]] = {}
    for e in out:
        (choice,) = e["choices"]
        by_index.setdefault(choice["index"], []).append(
            (choice["delta"], choice["finish_reason"]))
    assert by_index == {
        0: [({"role": "assistant", "content": ""}, None), ({"content": "a"}, None),
            ({}, "stop")],
        1: [({"role": "assistant", "content": ""}, None), ({"content": "b"}, None),
            ({}, "length")]}
    assert events(translator.end()) == ["[DONE]"]


def test_stream_blocked_prompt():
    translator = dialect.stream(call(True))
    out = events(translator.feed("", data({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                                            "responseId": "r"})))
    assert [(e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in out] == [
        ({"role": "assistant", "content": ""}, None), ({}, "content_filter")]
    assert events(translator.end()) == ["[DONE]"]


@pytest.mark.parametrize("fed", [
    [],
    [chunk(candidate({"text": "x"}))],  # no finishReason
    [chunk(candidate({"text": "x"}, finish="STOP")),
     chunk(candidate({"text": "y"}, index=1))],  # one candidate never finished
])
def test_stream_ending_before_its_finish_is_an_upstream_failure(fed):
    translator = dialect.stream(call(True))
    for item in fed:
        translator.feed("", item)
    with pytest.raises(UpstreamError, match="finish reason"):
        translator.end()


@pytest.mark.parametrize("bad", [
    data({"error": {"code": 500, "message": "boom", "status": "INTERNAL"}}),
    b"{not json", b"[1, 2]",
])
def test_stream_error_or_garbage_is_an_upstream_failure(bad):
    translator = dialect.stream(call(True))
    translator.feed("", chunk(candidate({"text": "x"})))
    with pytest.raises(UpstreamError):
        translator.feed("", bad)


def test_error_bodies():
    assert dialect.error(400, {"error": {"code": 400, "message": "bad thing",
                                         "status": "INVALID_ARGUMENT"}}) == {
        "error": {"message": "bad thing", "type": "invalid_request_error",
                  "code": "invalid_argument"}}
    # Streaming endpoints may wrap it in a list.
    assert dialect.error(429, [{"error": {"code": 429, "message": "quota",
                                          "status": "RESOURCE_EXHAUSTED"}}])["error"] == {
        "message": "quota", "type": "rate_limit_error", "code": "resource_exhausted"}
    assert dialect.error(404, {"error": {"message": "no model", "status": "NOT_FOUND"}})[
        "error"]["type"] == "invalid_request_error"
    assert dialect.error(503, None) == {"error": {"message": "upstream answered HTTP 503",
                                                  "type": "server_error", "code": None}}
    assert dialect.error(418, "teapot")["error"]["type"] == "invalid_request_error"


def test_retry_delay_from_retry_info():
    info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}
    other = {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []}
    assert retry_delay({"error": {"code": 429, "details": [other, info]}}) == 37.0
    assert retry_delay([{"error": {"details": [{**info, "retryDelay": "1.5s"}]}}]) == 1.5
    assert retry_delay({"error": {"details": [{**info, "retryDelay": "99999s"}]}}) == 3600.0
    assert retry_delay({"error": {"details": [other]}}) is None
    assert retry_delay({"error": {"details": [{**info, "retryDelay": "soon"}]}}) is None
    assert retry_delay(None) is None


# Bytes cut anywhere: the scaffolding reassembles whole events before the translator sees them.

@dataclass
class Canned:
    status: int
    body: bytes
    cut: int
    headers: Mapping[str, str] = field(default_factory=dict)
    closed: bool = False

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.body), self.cut):
            yield self.body[i:i + self.cut]

    def close(self) -> None:
        self.closed = True


@dataclass
class StubClient:
    """An UpstreamClient that answers every POST with one canned response."""

    answer: Canned
    posted: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    async def post(self, url: str, headers: Mapping[str, str], body: bytes,
                   timeouts: Timeouts, ca_file: str | None = None) -> Canned:
        self.posted.append((url, dict(headers), body))
        return self.answer

    async def get_status(self, url: str, headers: Mapping[str, str], timeout_s: float,
                         ca_file: str | None = None) -> int:
        return 200

    async def close(self) -> None:
        pass


STREAM = b"".join(b"data: " + c + b"\r\n\r\n" for c in [
    chunk(candidate({"text": "Hé"}, index=0), usage={"promptTokenCount": 3}),
    chunk(candidate({"functionCall": {"name": "f", "args": {"k": "v"}}}, index=0)),
    chunk(candidate({"text": "!"}, finish="STOP", index=0), usage=USAGE),
]) + b": keep-alive\r\n\r\n"


def provider(answer: Canned) -> tuple[Any, StubClient]:
    client = StubClient(answer)
    config = GeminiProviderConfig(type="gemini", api_key="g-key-123", base_url="http://g")
    return build("g", config, client, 1.0), client


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 64, len(STREAM)])
async def test_stream_bytes_cut_anywhere(cut):
    gemini, client = provider(Canned(200, STREAM, cut))
    exchange = await gemini.open(call(True, include_usage=True))
    raw = b"".join([piece async for piece in exchange.chunks])
    url, headers, _ = client.posted[0]
    assert url == "http://g/v1beta/models/gemini-x:streamGenerateContent?alt=sse"
    assert headers["x-goog-api-key"] == "g-key-123"
    assert headers["Accept"] == "text/event-stream"
    assert "Authorization" not in headers
    out = events(raw)
    deltas = [e["choices"][0]["delta"] for e in out if e != "[DONE]" and e["choices"]]
    assert deltas[:2] == [{"role": "assistant", "content": ""}, {"content": "Hé"}]
    assert deltas[3] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"k":"v"}'}}]}
    assert deltas[4:] == [{"content": "!"}, {}]
    assert out[-2]["usage"] == OPENAI_USAGE
    assert out[-1] == "[DONE]"


async def test_rate_limited_answer_rests_for_its_retry_delay():
    body = data({"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED",
                           "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                        "retryDelay": "12s"}]}})
    gemini, _ = provider(Canned(429, body, 5))
    exchange = await gemini.open(call())
    assert exchange.status == 429
    assert exchange.retry_after_s == 12.0
    error = orjson.loads(b"".join([piece async for piece in exchange.chunks]))
    assert error["error"]["message"] == "quota"
    # A Retry-After header, when there is one, is taken as it is.
    gemini, _ = provider(Canned(429, body, 5, {"Retry-After": "3"}))
    assert (await gemini.open(call())).retry_after_s == 3.0
