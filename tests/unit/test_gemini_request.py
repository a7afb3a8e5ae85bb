"""The chat-completions request written as Gemini's generateContent body: each row of the
mapping in docs/providers.md, what is refused, and what drop_unsupported leaves out."""

from __future__ import annotations

import re
from typing import Any

import pytest

from router.errors import BadRequest
from router.providers.base import UpstreamCall
from router.providers.gemini import GeminiDialect
from router.providers.gemini_request import gemini_body
from router.providers.translated import Unsupported
from router.upstream import Timeouts

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": ["string", "null"]}},
                                             "additionalProperties": False}}}


def body(**params: Any) -> dict[str, Any]:
    return gemini_body({"model": "gemini-2.5-flash", "messages": USER, **params}, False)


def config(**params: Any) -> dict[str, Any]:
    return body(**params).get("generationConfig", {})


def contents(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    return gemini_body({"messages": list(messages)}, False)["contents"]


def call(body: dict[str, Any], stream: bool = False) -> UpstreamCall:
    return UpstreamCall(body, stream, "req-1", Timeouts(5, 60, 30))


def test_url_by_model_and_stream():
    dialect = GeminiDialect("https://g.example")
    for model, path in [("gemini-2.5-flash", "models/gemini-2.5-flash"),
                        ("models/gemini-2.5-pro", "models/gemini-2.5-pro"),
                        ("tunedModels/my-tune", "tunedModels/my-tune")]:
        assert dialect.request(call({"model": model, "messages": USER})).url == \
            f"https://g.example/v1beta/{path}:generateContent"
        assert dialect.request(call({"model": model, "messages": USER}, True)).url == \
            f"https://g.example/v1beta/{path}:streamGenerateContent?alt=sse"


def test_plain_request_has_only_contents():
    assert body(stream=True, stream_options={"include_usage": True}, user="u-1",
                metadata={"a": "b"}, store=False, n=1) == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def test_sampling_parameters_go_to_generation_config():
    assert config(temperature=0.3, top_p=0.9, top_k=40, max_tokens=64, stop="END", n=3,
                  seed=7, presence_penalty=0.5, frequency_penalty=-0.5) == {
        "temperature": 0.3, "topP": 0.9, "topK": 40, "maxOutputTokens": 64,
        "stopSequences": ["END"], "candidateCount": 3, "seed": 7, "presencePenalty": 0.5,
        "frequencyPenalty": -0.5}
    assert config(stop=["a", "b"]) == {"stopSequences": ["a", "b"]}


def test_max_completion_tokens_wins_over_max_tokens():
    assert config(max_completion_tokens=10) == {"maxOutputTokens": 10}
    assert config(max_tokens=99, max_completion_tokens=10) == {"maxOutputTokens": 10}
    assert config(max_completion_tokens=10, max_tokens=99) == {"maxOutputTokens": 10}


def test_null_parameters_are_absent():
    assert body(temperature=None, tools=None, logit_bias=None) == body()


def test_response_format():
    assert config(response_format={"type": "text"}) == {}
    assert config(response_format={"type": "json_object"}) == {
        "responseMimeType": "application/json"}
    schema = {"type": "object", "properties": {"a": {"const": 1}}}
    assert config(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}}) == {
        "responseMimeType": "application/json", "responseJsonSchema": schema}


def test_reasoning_effort_is_a_thinking_budget():
    assert config(reasoning_effort="low") == {"thinkingConfig": {"thinkingBudget": 1024}}
    assert config(reasoning_effort="high") == {"thinkingConfig": {"thinkingBudget": 24576}}
    assert config(reasoning_effort="none") == {"thinkingConfig": {"thinkingBudget": 0}}
    with pytest.raises(BadRequest, match="reasoning_effort"):
        body(reasoning_effort="extreme")


def test_system_and_developer_messages_make_the_system_instruction():
    native = gemini_body({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "developer", "content": [{"type": "text", "text": "No lists."}]}]}, False)
    assert native["systemInstruction"] == {"parts": [{"text": "Be brief."},
                                                     {"text": "No lists."}]}
    assert native["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]


def test_roles_and_text_parts():
    assert contents({"role": "user", "content": [{"type": "text", "text": "a"},
                                                 {"type": "text", "text": "b"}]},
                    {"role": "assistant", "content": "c"},
                    {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
                    {"role": "user", "content": ""}) == [
        {"role": "user", "parts": [{"text": "a"}, {"text": "b"}]},
        {"role": "model", "parts": [{"text": "c"}]},
        {"role": "model", "parts": [{"text": "no"}]}]  # an empty message has no parts: left out


def test_tools_and_tool_choice():
    native = body(tools=[TOOL], tool_choice="auto")
    assert native["tools"] == [{"functionDeclarations": [{
        "name": "get_weather", "description": "Weather.",
        "parametersJsonSchema": TOOL["function"]["parameters"]}]}]
    assert native["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    for choice, calling in [
            ("none", {"mode": "NONE"}), ("required", {"mode": "ANY"}),
            ({"type": "function", "function": {"name": "get_weather"}},
             {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
            ({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
                {"type": "function", "function": {"name": "get_weather"}}]}},
             {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
            ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
                {"type": "function", "function": {"name": "get_weather"}}]}},
             {"mode": "VALIDATED", "allowedFunctionNames": ["get_weather"]})]:
        assert body(tools=[TOOL], tool_choice=choice)["toolConfig"] == {
            "functionCallingConfig": calling}
    bare = {"type": "function", "function": {"name": "now"}}
    assert body(tools=[bare])["tools"] == [{"functionDeclarations": [{"name": "now"}]}]
    assert "toolConfig" not in body(tool_choice="auto")  # no tools: nothing to configure
    assert body(parallel_tool_calls=True) == body()


def test_tool_calls_and_results_round_trip():
    signed = "call_1__thought__c2ln"
    got = contents(
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            {"id": signed, "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": signed, "content": '{"temp": 3}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
        {"role": "user", "content": "thanks"})
    assert got == [
        {"role": "user", "parts": [{"text": "weather?"}]},
        {"role": "model", "parts": [
            {"text": "Looking."},
            {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
             "thoughtSignature": "c2ln"},
            {"functionCall": {"name": "now", "args": {}}}]},
        {"role": "user", "parts": [  # consecutive results: one turn
            {"functionResponse": {"name": "get_weather", "response": {"temp": 3}}},
            {"functionResponse": {"name": "now", "response": {"content": "noon"}}}]},
        {"role": "user", "parts": [{"text": "thanks"}]}]


def test_tool_result_content_as_parts_and_non_object_json():
    got = contents(
        {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "[1, 2]"}]})
    assert got[1]["parts"] == [{"functionResponse": {"name": "f",
                                                     "response": {"content": "[1, 2]"}}}]


def test_legacy_function_role_names_its_function():
    got = contents({"role": "function", "name": "f", "content": "{}"})
    assert got == [{"role": "user", "parts": [{"functionResponse": {"name": "f",
                                                                    "response": {}}}]}]


@pytest.mark.parametrize(("messages", "where"), [
    ([{"role": "tool", "tool_call_id": "nope", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "function", "content": "x"}], "messages[0].name"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0]"),
])
def test_malformed_conversations_are_400(messages, where):
    with pytest.raises(BadRequest) as info:
        gemini_body({"messages": messages}, True)  # never dropped
    assert info.value.message.startswith(where)
    assert info.value.status == 400


def test_images_audio_and_files():
    got = contents({"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K",
                                            "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a/cat.JPG?s=1"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=",
                                  "filename": "a.pdf"}}]})
    assert got[0]["parts"] == [
        {"text": "what is this?"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0K"}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/a/cat.JPG?s=1"}},
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}}]


@pytest.mark.parametrize(("part", "says"), [
    ({"type": "image_url", "image_url": {"url": "https://example.com/image?id=3"}},
     "does not tell it"),
    ({"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}, "http(s) URLs"),
    ({"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}, "base64"),
    ({"type": "input_audio", "input_audio": {"data": "x", "format": "flac"}}, "wav or mp3"),
    ({"type": "file", "file": {"file_id": "file-abc"}}, "file id"),
    ({"type": "video", "video": {}}, "'video'"),
])
def test_content_gemini_cannot_take_is_400(part, says):
    with pytest.raises(BadRequest, match=re.escape(says)) as info:
        gemini_body({"messages": [{"role": "user", "content": [part]}]}, True)
    assert info.value.message.startswith("messages[0].content[0]")


@pytest.mark.parametrize("params", [
    {"logit_bias": {"50256": -100}}, {"logprobs": True}, {"top_logprobs": 2},
    {"parallel_tool_calls": False}, {"modalities": ["text", "audio"]},
    {"audio": {"voice": "alloy"}}, {"prediction": {"type": "content", "content": "x"}},
    {"response_format": {"type": "grammar"}},
    {"tool_choice": {"type": "custom", "custom": {"name": "x"}}, "tools": [TOOL]},
    {"some_future_parameter": 1},
])
def test_parameters_without_equivalent_are_refused_or_dropped(params):
    name = next(iter(params))
    with pytest.raises(Unsupported) as info:
        body(**params)
    assert info.value.status == 400
    assert info.value.code == "unsupported_parameter"
    assert f"`{name}` is not supported by the Gemini API" in info.value.message
    dropped = gemini_body({"messages": USER, **params}, True)
    assert name not in str(dropped) or name == "tools"
    assert dropped["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]
    assert "toolConfig" not in dropped
    assert "generationConfig" not in dropped


def test_harmless_values_of_those_parameters_pass():
    assert body(logprobs=False, modalities=["text"]) == body()


def test_integers_past_64_bits_stay_whole():
    big = 2**70
    native = gemini_body({"messages": [
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": f'{{"id": {big}}}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": f'{{"next": {big}}}'}],
        "seed": big}, False)
    assert native["contents"][0]["parts"][0]["functionCall"]["args"] == {"id": big}
    assert native["contents"][1]["parts"][0]["functionResponse"]["response"] == {"next": big}
    sent = GeminiDialect("https://g").request(call({"model": "m", "messages": USER,
                                                    "seed": big})).body
    assert f'"seed":{big}'.encode() in sent
