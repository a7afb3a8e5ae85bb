"""Anthropic's Messages API in the OpenAI dialect: every row of docs/providers.md's mapping
tables (request, answer, stream, errors), the refusals and drop_unsupported."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
import pytest

from router.config import AnthropicProviderConfig
from router.errors import BadRequest, UpstreamError
from router.providers.anthropic import AnthropicDialect, MessageStream, build
from router.providers.base import UpstreamCall
from router.providers.translated import Unsupported
from router.upstream import Timeouts

USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": {"type": "object",
                                                          "properties": {"x": {}}}}}]


def config(**extra: Any) -> AnthropicProviderConfig:
    return AnthropicProviderConfig(type="anthropic", base_url="http://up.test", api_key="sk-a",
                                   **extra)


def dialect(**extra: Any) -> AnthropicDialect:
    return AnthropicDialect("http://up.test", config(**extra))


def call(body: dict[str, Any], stream: bool = False) -> UpstreamCall:
    return UpstreamCall({"model": "claude-x", "messages": USER, **body}, stream, "rid",
                        Timeouts(1, 1, 1))


def translate(body: dict[str, Any], stream: bool = False, **extra: Any) -> dict[str, Any]:
    request = dialect(**extra).request(call(body, stream))
    assert request.url == "http://up.test/v1/messages"
    parsed: dict[str, Any] = orjson.loads(request.body)
    return parsed


# --- request -------------------------------------------------------------------------------

def test_minimal_request_gets_the_default_max_tokens():
    assert translate({}) == {"model": "claude-x", "max_tokens": 4096,
                             "messages": [{"role": "user",
                                           "content": [{"type": "text", "text": "hi"}]}]}
    assert translate({}, default_max_tokens=77)["max_tokens"] == 77


@pytest.mark.parametrize(("given", "sent"), [
    ({"max_tokens": 10}, 10),
    ({"max_tokens": 54.0}, 54),
    ({"max_completion_tokens": 20}, 20),
    ({"max_tokens": 10, "max_completion_tokens": 20}, 20),
])
def test_max_tokens(given, sent):
    assert translate(given)["max_tokens"] == sent


def test_an_integer_past_64_bits_goes_as_sent():
    """Anthropic answers it with its own 400, as an OpenAI upstream would."""
    request = dialect().request(call({"max_completion_tokens": 10**30}))
    assert b'"max_tokens":1000000000000000000000000000000' in request.body


def test_system_and_developer_messages_become_system():
    one = translate({"messages": [{"role": "system", "content": "be brief"}, *USER]})
    assert one["system"] == "be brief"
    assert [m["role"] for m in one["messages"]] == ["user"]
    several = translate({"messages": [
        {"role": "system", "content": [{"type": "text", "text": "a"}]}, *USER,
        {"role": "developer", "content": "b"}, {"role": "system", "content": ""}]})
    assert several["system"] == [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]


@pytest.mark.parametrize(("stop", "sent"), [("END", ["END"]), (["a", "b"], ["a", "b"])])
def test_stop_becomes_stop_sequences(stop, sent):
    assert translate({"stop": stop})["stop_sequences"] == sent


def test_sampling_parameters_and_user():
    out = translate({"temperature": 0.2, "top_p": 0.9, "top_k": 5, "user": "u-1"})
    assert (out["temperature"], out["top_p"], out["top_k"]) == (0.2, 0.9, 5)
    assert out["metadata"] == {"user_id": "u-1"}
    with pytest.raises(BadRequest):
        translate({"user": 5})


def test_stream_flag_and_the_routers_own_fields():
    out = translate({"stream": True, "stream_options": {"include_usage": True}, "store": False,
                     "metadata": {"k": "v"}}, stream=True)
    assert out["stream"] is True
    assert "stream_options" not in out and "store" not in out and "metadata" not in out
    assert "stream" not in translate({"stream": False})


def test_tools():
    tools = [*TOOLS, {"type": "function", "function": {"name": "bare", "strict": True}}]
    assert translate({"tools": tools})["tools"] == [
        {"name": "get_weather", "description": "Weather",
         "input_schema": {"type": "object", "properties": {"x": {}}}},
        {"name": "bare", "input_schema": {"type": "object", "properties": {}}, "strict": True}]


@pytest.mark.parametrize(("choice", "parallel", "sent"), [
    (None, None, None),
    ("auto", None, {"type": "auto"}),
    ("none", None, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None,
     {"type": "tool", "name": "get_weather"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ("none", False, {"type": "none"}),
    ("auto", True, {"type": "auto"}),
])
def test_tool_choice_and_parallel_tool_calls(choice, parallel, sent):
    body: dict[str, Any] = {"tools": TOOLS}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert translate(body).get("tool_choice") == sent


def test_without_tools_tool_choice_has_nothing_to_choose():
    out = translate({"tool_choice": "required", "parallel_tool_calls": False})
    assert "tool_choice" not in out and "tools" not in out


def test_a_tool_round_trip_and_turns_merged():
    out = translate({"tools": TOOLS, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "user", "content": [{"type": "text", "text": "in Paris"}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"x": 1}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2",
         "content": [{"type": "text", "text": "rain"}]},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": None},  # empty: dropped
    ]})
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "weather?"},
                                     {"type": "text", "text": "in Paris"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"x": 1}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "call_2",
             "content": [{"type": "text", "text": "rain"}]},
            {"type": "text", "text": "thanks"}]},
    ]


@pytest.mark.parametrize("arguments", ["not json", "[1]"])
def test_tool_call_arguments_must_be_a_json_object(arguments):
    with pytest.raises(BadRequest, match=r"tool_calls\[0\]\.function\.arguments"):
        translate({"messages": [*USER, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f",
                                                         "arguments": arguments}}]}]})


def test_a_tool_message_needs_its_call_id():
    with pytest.raises(BadRequest, match="tool_call_id"):
        translate({"messages": [*USER, {"role": "tool", "content": "x"}]})


def test_images_and_pdf():
    parts = [{"type": "text", "text": "what is it?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0=",
                                                 "detail": "high"}},
             {"type": "image_url", "image_url": {"url": "https://img.test/cat.jpg"}},
             {"type": "image_url", "image_url": "https://img.test/dog.webp"},
             {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=",
                                       "filename": "a.pdf"}}]
    out = translate({"messages": [{"role": "user", "content": parts}]})
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "what is it?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0="}},
        {"type": "image", "source": {"type": "url", "url": "https://img.test/cat.jpg"}},
        {"type": "image", "source": {"type": "url", "url": "https://img.test/dog.webp"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                        "data": "JVBERi0="}}]


@pytest.mark.parametrize("url", ["ftp://x/y.png", "data:image/png,notbase64", 5])
def test_bad_image_urls(url):
    with pytest.raises(BadRequest, match=r"messages\[0\]\.content\[0\]\.image_url"):
        translate({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]})


def test_response_format_and_reasoning_effort():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    out = translate({"response_format": {"type": "json_schema",
                                         "json_schema": {"name": "x", "schema": schema}},
                     "reasoning_effort": "high"})
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": schema},
                                    "effort": "high"}
    assert "output_config" not in translate({"response_format": {"type": "text"}})


NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False,
           "top_logprobs": 0, "logit_bias": {}, "parallel_tool_calls": True, "seed": None}


def test_neutral_values_are_accepted():
    assert translate(NEUTRAL) == translate({})


UNSUPPORTED = [
    ({"n": 2}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"seed": 7}, "seed"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"x_vendor_knob": 1}, "x_vendor_knob"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"reasoning_effort": "minimal"}, "reasoning_effort"),
    ({"reasoning_effort": ["high"]}, "reasoning_effort"),
    ({"response_format": "json"}, "response_format"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
    ({"messages": [*USER, {"role": "function", "name": "f", "content": "1"}]},
     "messages[1].role"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "listen"},
        {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}]},
     "messages[0].content[1]"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "read"},
        {"type": "file", "file": {"file_id": "file-1"}}]}]}, "messages[0].content[1]"),
    ({"messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}, *USER]},
     "messages[0].content[0]"),
    ({"messages": [*USER, {"role": "assistant", "function_call": {"name": "f"}}]},
     "messages[1].function_call"),
]


@pytest.mark.parametrize(("body", "param"), UNSUPPORTED)
def test_unsupported_is_a_400_naming_it(body, param):
    with pytest.raises(Unsupported) as info:
        translate(body)
    assert info.value.param == param
    assert info.value.status == 400 and info.value.code == "unsupported_parameter"
    assert f"`{param}` is not supported by the Anthropic API" in info.value.message


@pytest.mark.parametrize(("body", "param"), UNSUPPORTED)
def test_drop_unsupported_leaves_it_out(body, param):
    out = translate(body, drop_unsupported=True)
    top = param.split("[")[0].split(".")[0]
    if top != "messages":
        assert top not in out and "output_config" not in out
        assert out.get("tool_choice") is None
    text = json.dumps(out)
    assert "input_audio" not in text and "file-1" not in text and "function_call" not in text
    assert out["messages"][0]["role"] == "user"


# --- answer ---------------------------------------------------------------------------------

def native(content: list[dict[str, Any]], stop_reason: str = "end_turn",
           **usage: int) -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x-2025",
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 4, **usage}}


def answer(message: dict[str, Any]) -> dict[str, Any]:
    return dialect().answer(message, call({}))


def test_text_answer():
    out = answer(native([{"type": "text", "text": "Hello "}, {"type": "text", "text": "you"}]))
    assert out["id"] == "msg_1" and out["object"] == "chat.completion"
    assert out["model"] == "claude-x-2025" and isinstance(out["created"], int)
    assert out["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": "Hello you",
                                           "refusal": None}}]
    assert out["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                            "prompt_tokens_details": {"cached_tokens": 0}}


def test_tool_use_and_thinking_answer():
    out = answer(native([
        {"type": "thinking", "thinking": "hmm", "signature": "s"},
        {"type": "redacted_thinking", "data": "xx"},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"x": 1}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}}],
        "tool_use"))
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and message["reasoning_content"] == "hmm"
    assert message["tool_calls"] == [
        {"id": "toolu_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"x":1}'}},
        {"id": "toolu_2", "type": "function",
         "function": {"name": "get_weather", "arguments": "{}"}}]


@pytest.mark.parametrize(("stop_reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter"), ("pause_turn", "stop"),
    ("model_context_window_exceeded", "length"), ("something_new", "stop"),
])
def test_stop_reasons(stop_reason, finish):
    out = answer(native([{"type": "text", "text": "x"}], stop_reason))
    assert out["choices"][0]["finish_reason"] == finish


def test_cached_input_counts_in_prompt_tokens():
    out = answer(native([], cache_read_input_tokens=100, cache_creation_input_tokens=5,
                        output_tokens_details={"thinking_tokens": 3}))  # type: ignore[arg-type]
    assert out["usage"] == {"prompt_tokens": 115, "completion_tokens": 4, "total_tokens": 119,
                            "prompt_tokens_details": {"cached_tokens": 100},
                            "completion_tokens_details": {"reasoning_tokens": 3}}
    assert out["choices"][0]["message"]["content"] == ""


@pytest.mark.parametrize("bad", [{"type": "error"}, {"type": "message", "content": "x"}, {}])
def test_an_answer_that_is_not_a_message(bad):
    with pytest.raises(UpstreamError):
        answer(bad)


# --- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "kind", "type_", "code"), [
    (400, "invalid_request_error", "invalid_request_error", None),
    (401, "authentication_error", "invalid_request_error", "invalid_api_key"),
    (403, "permission_error", "invalid_request_error", "permission_denied"),
    (404, "not_found_error", "invalid_request_error", "not_found"),
    (413, "request_too_large", "invalid_request_error", "request_too_large"),
    (402, "billing_error", "insufficient_quota", "insufficient_quota"),
    (429, "rate_limit_error", "rate_limit_error", "rate_limit_exceeded"),
    (504, "timeout_error", "server_error", "timeout"),
    (500, "api_error", "server_error", "api_error"),
    (529, "overloaded_error", "server_error", "overloaded"),
    (418, "teapot_error", "invalid_request_error", "teapot_error"),
    (503, "new_error", "server_error", "new_error"),
])
def test_errors(status, kind, type_, code):
    body = {"type": "error", "error": {"type": kind, "message": "it went wrong"}}
    assert dialect().error(status, body) == {"error": {"message": "it went wrong",
                                                       "type": type_, "code": code}}


@pytest.mark.parametrize(("status", "type_"), [(400, "invalid_request_error"),
                                               (502, "server_error")])
def test_an_error_body_that_is_not_anthropics(status, type_):
    for body in (None, {"detail": "x"}, [1]):
        assert dialect().error(status, body) == {"error": {
            "message": f"upstream answered HTTP {status}", "type": type_, "code": None}}


# --- stream ---------------------------------------------------------------------------------

def ev(payload: dict[str, Any]) -> tuple[str, bytes]:
    return payload["type"], orjson.dumps(payload)


START = ev({"type": "message_start", "message": {
    "id": "msg_s", "type": "message", "role": "assistant", "model": "claude-x-2025",
    "content": [], "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 4}}})


def block_start(index: int, block: dict[str, Any]) -> tuple[str, bytes]:
    return ev({"type": "content_block_start", "index": index, "content_block": block})


def delta(index: int, d: dict[str, Any]) -> tuple[str, bytes]:
    return ev({"type": "content_block_delta", "index": index, "delta": d})


def block_stop(index: int) -> tuple[str, bytes]:
    return ev({"type": "content_block_stop", "index": index})


def message_delta(stop_reason: str, output_tokens: int) -> tuple[str, bytes]:
    return ev({"type": "message_delta", "delta": {"stop_reason": stop_reason,
                                                   "stop_sequence": None},
               "usage": {"output_tokens": output_tokens}})


STOP = ev({"type": "message_stop"})
PING = ev({"type": "ping"})


def chunks(raw: bytes) -> list[dict[str, Any]]:
    """The data of each event written (all must be whole `data:` events)."""
    out = []
    for event in raw.split(b"\n\n"):
        if event:
            assert event.startswith(b"data: ")
            data = event[6:]
            out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def test_a_stream_translated_event_by_event():
    stream = MessageStream("claude-x", wants_usage=True)
    outputs = [stream.feed(*e) for e in [
        START, PING,
        block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
        delta(0, {"type": "thinking_delta", "thinking": "hmm"}),
        delta(0, {"type": "signature_delta", "signature": "sig"}),
        block_stop(0),
        block_start(1, {"type": "text", "text": ""}),
        delta(1, {"type": "text_delta", "text": "Let me "}),
        delta(1, {"type": "text_delta", "text": "check."}),
        block_stop(1),
        block_start(2, {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                        "input": {}}),
        delta(2, {"type": "input_json_delta", "partial_json": ""}),
        delta(2, {"type": "input_json_delta", "partial_json": '{"x"'}),
        delta(2, {"type": "input_json_delta", "partial_json": ": 1}"}),
        block_stop(2),
        block_start(3, {"type": "tool_use", "id": "toolu_2", "name": "get_weather",
                        "input": {}}),
        block_stop(3),
        message_delta("tool_use", 30),
        STOP,
    ]]
    assert outputs[1] == b""  # ping
    assert outputs[4] == b"" and outputs[5] == b""  # signature, thinking's stop
    got = [c for out in outputs for c in chunks(out)] + chunks(stream.end())
    assert all(c["id"] == "msg_s" and c["model"] == "claude-x-2025"
               and c["object"] == "chat.completion.chunk" for c in got[:-1])
    deltas = [c["choices"][0]["delta"] if c["choices"] else c["usage"] for c in got[:-1]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "hmm"},
        {"content": "Let me "},
        {"content": "check."},
        {"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"x"'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
        {"tool_calls": [{"index": 1, "id": "toolu_2", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {},
        {"prompt_tokens": 16, "completion_tokens": 30, "total_tokens": 46,
         "prompt_tokens_details": {"cached_tokens": 4}},
    ]
    assert got[-3]["choices"][0]["finish_reason"] == "tool_calls"
    assert got[-2]["choices"] == []
    assert got[-1] == "[DONE]"


def test_a_tool_input_given_whole_at_its_start():
    stream = MessageStream("m", wants_usage=False)
    stream.feed(*START)
    stream.feed(*block_start(0, {"type": "tool_use", "id": "t", "name": "f",
                                 "input": {"a": [1]}}))
    (c,) = chunks(stream.feed(*block_stop(0)))
    assert c["choices"][0]["delta"] == {"tool_calls": [{"index": 0, "function": {
        "arguments": '{"a":[1]}'}}]}


def test_no_usage_chunk_unless_asked_and_finish_without_message_delta():
    stream = MessageStream("m", wants_usage=False)
    stream.feed(*START)
    got = chunks(stream.feed(*STOP)) + chunks(stream.end())
    assert [c if c == "[DONE]" else c["choices"][0]["finish_reason"] for c in got] == \
        ["stop", "[DONE]"]


def test_message_delta_usage_updates_the_input_counts():
    stream = MessageStream("m", wants_usage=True)
    stream.feed(*START)
    stream.feed("message_delta", orjson.dumps({
        "type": "message_delta", "delta": {"stop_reason": "max_tokens"},
        "usage": {"output_tokens": 7, "input_tokens": 20, "cache_read_input_tokens": None}}))
    usage = chunks(stream.feed(*STOP))[0]["usage"]
    assert usage["prompt_tokens"] == 24 and usage["completion_tokens"] == 7


def test_an_error_event_raises():
    stream = MessageStream("m", wants_usage=True)
    stream.feed(*START)
    with pytest.raises(UpstreamError, match="overloaded_error"):
        stream.feed("error", b'{"type": "error", "error": {"type": "overloaded_error", '
                             b'"message": "Overloaded"}}')


def test_a_stream_without_message_stop_fails_at_its_end():
    stream = MessageStream("m", wants_usage=True)
    stream.feed(*START)
    stream.feed(*message_delta("end_turn", 3))
    with pytest.raises(UpstreamError, match="message_stop"):
        stream.end()


@pytest.mark.parametrize("first", [block_start(0, {"type": "text", "text": ""}),
                                   ("", b"{not json"), ("", b"[1]")])
def test_a_stream_that_does_not_begin_with_message_start(first):
    with pytest.raises(UpstreamError):
        MessageStream("m", wants_usage=False).feed(*first)


def test_comment_only_and_unknown_events_write_nothing():
    stream = MessageStream("m", wants_usage=False)
    stream.feed(*START)
    assert stream.feed("", b"") == b""
    assert stream.feed("future_event", b'{"type": "future_event"}') == b""


# --- through the provider: the bytes as they arrive -------------------------------------------

class Response:
    def __init__(self, status: int, pieces: list[bytes], headers: Mapping[str, str]) -> None:
        self.status = status
        self.headers = headers
        self._pieces = pieces

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for piece in self._pieces:
            yield piece

    def close(self) -> None:
        pass


class Client:
    """An upstream pool that answers every POST with these bytes, cut into `size` pieces."""

    def __init__(self, status: int, raw: bytes, size: int,
                 headers: Mapping[str, str] | None = None,
                 pieces: list[bytes] | None = None) -> None:
        if pieces is None:
            pieces = [raw[i:i + size] for i in range(0, len(raw), size)]
        self.response = Response(status, pieces, headers or {})
        self.sent: list[tuple[str, dict[str, str], bytes]] = []

    async def post(self, url: str, headers: Mapping[str, str], body: bytes,
                   timeouts: Timeouts, ca_file: str | None = None) -> Response:
        self.sent.append((url, dict(headers), body))
        return self.response

    async def get_status(self, url: str, headers: Mapping[str, str], timeout_s: float,
                         ca_file: str | None = None) -> int:
        self.sent.append((url, dict(headers), b""))
        return 200

    async def close(self) -> None:
        pass


def sse(events: list[tuple[str, bytes]], crlf: bool = False) -> bytes:
    raw = b"".join(b"event: " + n.encode() + b"\ndata: " + d + b"\n\n" for n, d in events)
    return raw.replace(b"\n", b"\r\n") if crlf else raw


STREAM = [START, PING, block_start(0, {"type": "text", "text": ""}),
          delta(0, {"type": "text_delta", "text": "Hé "}),
          delta(0, {"type": "text_delta", "text": "there"}), block_stop(0),
          message_delta("end_turn", 2), STOP]


async def relayed(client: Client, stream: bool = True) -> tuple[int, bytes]:
    provider = build("a", config(), client, 1.0)  # type: ignore[arg-type]
    exchange = await provider.open(call({}, stream))
    return exchange.status, b"".join([chunk async for chunk in exchange.chunks])


@pytest.mark.parametrize("size", [1, 2, 7, 64, 100_000])
@pytest.mark.parametrize("crlf", [False, True])
async def test_split_chunks_make_the_same_stream(size, crlf):
    _, whole = await relayed(Client(200, sse(STREAM), 100_000))
    _, split = await relayed(Client(200, sse(STREAM, crlf), size))
    strip = [{**c, "created": 0} if isinstance(c, dict) else c for c in chunks(split)]
    assert strip == [{**c, "created": 0} if isinstance(c, dict) else c
                     for c in chunks(whole)]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks(whole)
                   if isinstance(c, dict) and c["choices"])
    assert text == "Hé there"


async def test_headers_url_and_probe():
    client = Client(200, orjson.dumps(native([{"type": "text", "text": "x"}])), 100)
    provider = build("a", config(anthropic_beta="beta-1"), client, 1.0)  # type: ignore[arg-type]
    assert set(provider.secrets) == {"sk-a"}  # the version and beta headers are not secrets
    exchange = await provider.open(call({}))
    assert chunks(b"data: " + b"".join([c async for c in exchange.chunks]) + b"\n\n")[0][
        "choices"][0]["message"]["content"] == "x"
    url, headers, _ = client.sent[0]
    assert url == "http://up.test/v1/messages"
    assert headers["x-api-key"] == "sk-a"
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "beta-1"
    assert "Authorization" not in headers
    assert await provider.probe() is True
    url, headers, _ = client.sent[1]
    assert url == "http://up.test/v1/models" and headers["x-api-key"] == "sk-a"
    assert headers["anthropic-version"] == "2023-06-01" and "Content-Type" not in headers


async def test_overloaded_is_a_429_with_its_retry_after():
    body = orjson.dumps({"type": "error", "error": {"type": "overloaded_error",
                                                    "message": "Overloaded"}})
    provider = build("a", config(), Client(529, body, 100, {"Retry-After": "7"}),  # type: ignore[arg-type]
                     1.0)
    exchange = await provider.open(call({}))
    assert exchange.status == 429 and exchange.retry_after_s == 7.0
    assert orjson.loads(b"".join([c async for c in exchange.chunks])) == {"error": {
        "message": "Overloaded", "type": "server_error", "code": "overloaded"}}


ERROR = ("error", b'{"type": "error", "error": {"type": "overloaded_error", '
                  b'"message": "Overloaded"}}')
TEXT = [block_start(0, {"type": "text", "text": ""}),
        delta(0, {"type": "text_delta", "text": "partial"})]


async def test_an_error_in_the_first_read_sends_nothing():
    """Nothing reached the client yet: the error comes alone, and the next backend may answer."""
    provider = build("a", config(), Client(200, b"", 1, pieces=[sse([START, *TEXT, ERROR])]),  # type: ignore[arg-type]
                     1.0)
    exchange = await provider.open(call({}, True))
    with pytest.raises(UpstreamError, match="overloaded_error"):
        await anext(exchange.chunks)


async def test_an_error_after_the_beginning_comes_after_the_events_read_with_it():
    provider = build("a", config(), Client(200, b"", 1, pieces=[  # type: ignore[arg-type]
        sse([START]), sse([*TEXT]), sse([*TEXT, ERROR])]), 1.0)
    exchange = await provider.open(call({}, True))
    first = await anext(exchange.chunks)  # the role chunk, held until content followed it
    assert [c["choices"][0]["delta"] for c in chunks(first)] == [
        {"role": "assistant", "content": ""}, {"content": "partial"}]
    second = await anext(exchange.chunks)
    assert [c["choices"][0]["delta"] for c in chunks(second)] == [{"content": "partial"}]
    with pytest.raises(UpstreamError, match="overloaded_error"):
        await anext(exchange.chunks)


async def test_an_error_before_any_content_commits_nothing():
    """The role chunk waits for content: an overload reported in a later read still comes
    before the stream's first chunk, so dispatch tries the next backend."""
    provider = build("a", config(), Client(200, b"", 1, pieces=[  # type: ignore[arg-type]
        sse([START]), sse([*TEXT[:1], ERROR])]), 1.0)
    exchange = await provider.open(call({}, True))
    with pytest.raises(UpstreamError, match="overloaded_error"):
        await anext(exchange.chunks)
