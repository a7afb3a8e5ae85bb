"""A Gemini backend seen through the router by the official openai SDK: the fake Gemini
upstream behind, answers and streams exactly OpenAI-shaped in front."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.conftest import (
    GEMINI_KEY,
    KEY,
    USER_MSG,
    Fake,
    eventually,
    gemini_provider,
    router_config,
    sse_events,
)
from tests.fakes.gemini_upstream import SIGNATURE

TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}]
TEXT5 = "tok0 tok1 tok2 tok3 tok4 "
PROMPT = len(USER_MSG[0]["content"]) // 4 + 1  # what the fake counts for "hello there"
DONE = b"data: [DONE]\n\n"



@pytest.fixture
async def gem(gemini_fakes, start_router):
    """(router, fake): route `g` (model gemini-x) and `d` (the same provider with
    drop_unsupported); a test scripts the fake through its override (`script()`)."""
    up = await gemini_fakes()
    r = await start_router(router_config(
        {"g": gemini_provider(up), "gd": gemini_provider(up, drop_unsupported=True)},
        {"g": {"backends": [{"provider": "g", "model": "gemini-x"}]},
         "d": {"backends": [{"provider": "gd", "model": "gemini-x"}]}}))
    return r, up


@pytest.fixture
async def client(gem) -> AsyncIterator[openai.AsyncOpenAI]:
    r, _ = gem
    sdk = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key=KEY, max_retries=0, timeout=20)
    yield sdk
    await sdk.close()


def script(up: Fake, directives: str | None) -> None:
    up.recorder.override = directives


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


async def test_json_answer(gem, client):
    _, up = gem
    raw = await client.chat.completions.with_raw_response.create(
        model="g", messages=[{"role": "system", "content": "Be brief."}, *USER_MSG],
        temperature=0.5, max_tokens=50)
    assert raw.headers["x-router-backend"] == "g/gemini-x"
    answer = raw.parse()
    assert answer.object == "chat.completion"
    assert answer.id == "resp-fake-1"
    assert answer.model == "gemini-fake-001"
    (choice,) = answer.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == TEXT5
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens,
            answer.usage.total_tokens) == (6, 5, 11)  # (11 + 9 characters) // 4 + 1
    (seen,) = up.seen
    assert seen.path == "/v1beta/models/gemini-x:generateContent"
    assert seen.body == {
        "contents": [{"role": "user", "parts": [{"text": "hello there"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {"temperature": 0.5, "maxOutputTokens": 50}}


async def test_headers_sent_upstream(gemini_fakes, start_router):
    up = await gemini_fakes()
    r = await start_router(router_config(
        {"g": gemini_provider(up, headers={"x-goog-user-project": "proj-1"})},
        {"g": {"backends": [{"provider": "g", "model": "gemini-x"}]}}))
    async with r.chat({"model": "g", "messages": USER_MSG},
                      headers={"x-request-id": "req-gemini-1"}) as resp:
        assert resp.status == 200
    async with r.chat({"model": "g", "messages": USER_MSG, "stream": True}) as resp:
        assert resp.status == 200
        await resp.read()
    for seen, accept in zip(up.seen, ["application/json", "text/event-stream"], strict=True):
        headers = lower(seen.headers)
        assert headers["x-goog-api-key"] == GEMINI_KEY
        assert "authorization" not in headers  # Gemini takes its key in x-goog-api-key only
        assert headers["content-type"] == "application/json"
        assert headers["accept"] == accept
        assert headers["user-agent"].startswith("router/")
        assert headers["x-goog-user-project"] == "proj-1"
    assert lower(up.seen[0].headers)["x-request-id"] == "req-gemini-1"


async def test_stream(gem, client):
    _, up = gem
    stream = await client.chat.completions.create(model="g", messages=USER_MSG, stream=True)
    deltas, finish = [], None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.id == "resp-fake-1" and chunk.model == "gemini-fake-001"
        for choice in chunk.choices:
            deltas.append(choice.delta)
            finish = choice.finish_reason or finish
    assert deltas[0].role == "assistant" and deltas[0].content == ""
    assert "".join(d.content or "" for d in deltas) == TEXT5
    assert finish == "stop"
    assert up.seen[0].path == "/v1beta/models/gemini-x:streamGenerateContent?alt=sse"


async def test_stream_ends_with_done_and_no_usage_chunk_unless_asked(gem):
    r, _ = gem
    async with r.chat({"model": "g", "messages": USER_MSG, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    assert raw.endswith(DONE)
    events = [json.loads(data) for _, data in sse_events(raw)[:-1]]
    assert all(e["choices"] for e in events)  # no usage-only chunk
    assert all("usage" not in e for e in events)
    async with r.chat({"model": "g", "messages": USER_MSG, "stream": True,
                       "stream_options": {"include_usage": True}}) as resp:
        raw = await resp.read()
    *events, done = sse_events(raw)
    assert done == (None, "[DONE]")
    usage = json.loads(events[-1][1])
    assert usage["choices"] == []
    assert usage["usage"]["prompt_tokens"] == PROMPT
    assert usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["total_tokens"] == PROMPT + 5


async def test_stream_usage_for_the_sdk(gem, client):
    stream = await client.chat.completions.create(
        model="g", messages=USER_MSG, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


async def test_tools_json(gem, client):
    _, up = gem
    answer = await client.chat.completions.create(
        model="g", messages=USER_MSG, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (choice,) = answer.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"x": 1}
    sent = up.seen[0].body
    assert sent["tools"] == [{"functionDeclarations": [{
        "name": "get_weather", "description": "The weather in a city.",
        "parametersJsonSchema": TOOLS[0]["function"]["parameters"]}]}]
    assert sent["toolConfig"] == {"functionCallingConfig": {
        "mode": "ANY", "allowedFunctionNames": ["get_weather"]}}


async def test_tools_streamed_and_accumulated_by_the_sdk(gem, client):
    _, up = gem
    script(up, "calls:2")
    async with client.chat.completions.stream(model="g", messages=USER_MSG,
                                              tools=TOOLS) as stream:
        final = await stream.get_final_completion()
    (choice,) = final.choices
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_weather", '{"x":1}'), ("get_weather", '{"x":1}')]
    assert len({c.id for c in calls}) == 2


async def test_tool_results_go_back_with_their_thought_signature(gem, client):
    _, up = gem
    script(up, "signature")
    first = await client.chat.completions.create(model="g", messages=USER_MSG, tools=TOOLS)
    (call,) = first.choices[0].message.tool_calls or []
    script(up, None)
    messages: list[Any] = [
        *USER_MSG,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 3}'},
    ]
    second = await client.chat.completions.create(model="g", messages=messages,
                                                  tools=TOOLS, tool_choice="none")
    assert second.choices[0].message.content == TEXT5
    assert up.seen[1].body["contents"] == [
        {"role": "user", "parts": [{"text": "hello there"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"x": 1}},
                                     "thoughtSignature": SIGNATURE}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                                                         "response": {"temp": 3}}}]}]
    assert up.seen[1].body["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}


async def test_stop_and_max_tokens(gem, client):
    _, up = gem
    answer = await client.chat.completions.create(model="g", messages=USER_MSG,
                                                  stop=["tok2"])
    assert answer.choices[0].message.content == "tok0 tok1 "
    assert answer.choices[0].finish_reason == "stop"
    assert up.seen[0].body["generationConfig"] == {"stopSequences": ["tok2"]}
    answer = await client.chat.completions.create(model="g", messages=USER_MSG,
                                                  max_completion_tokens=2)
    assert answer.choices[0].message.content == "tok0 tok1 "
    assert answer.choices[0].finish_reason == "length"
    assert up.seen[1].body["generationConfig"] == {"maxOutputTokens": 2}


async def test_images_by_data_url_and_https_url(gem, client):
    _, up = gem
    content: Any = [{"type": "text", "text": "what is in these?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp"}}]
    answer = await client.chat.completions.create(
        model="g", messages=[{"role": "user", "content": content}])
    assert answer.choices[0].message.content == TEXT5
    assert up.seen[0].body["contents"][0]["parts"] == [
        {"text": "what is in these?"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0K"}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp"}}]
    unknown: Any = [{"type": "image_url", "image_url": {"url": "https://example.com/img?id=4"}}]
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="g",
                                             messages=[{"role": "user", "content": unknown}])
    assert "data URL" in info.value.message
    assert len(up.seen) == 1  # refused by the router: Gemini was not asked


async def test_n_is_candidate_count(gem, client):
    _, up = gem
    answer = await client.chat.completions.create(model="g", messages=USER_MSG, n=2)
    assert [(c.index, c.message.content) for c in answer.choices] == [(0, TEXT5), (1, TEXT5)]
    assert up.seen[0].body["generationConfig"] == {"candidateCount": 2}
    stream = await client.chat.completions.create(model="g", messages=USER_MSG, n=2,
                                                  stream=True)
    text: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str | None] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert text == {0: TEXT5, 1: TEXT5}
    assert finish == {0: "stop", 1: "stop"}


@pytest.mark.parametrize("params", [{"logit_bias": {"50256": -100}}, {"logprobs": True},
                                    {"parallel_tool_calls": False, "tools": TOOLS}])
async def test_parameters_without_equivalent_refused_or_dropped(gem, client, params):
    _, up = gem
    name = next(iter(params))
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="g", messages=USER_MSG, **params)
    assert info.value.status_code == 400
    assert info.value.code == "unsupported_parameter"
    assert f"`{name}`" in info.value.message
    assert not up.seen
    answer = await client.chat.completions.create(model="d", messages=USER_MSG, **params)
    assert answer.choices[0].finish_reason in ("stop", "tool_calls")
    (seen,) = up.seen
    assert name not in json.dumps(seen.body)


async def test_json_usage_and_reasoning_tokens(gem, client):
    _, up = gem
    script(up, "thought+cached:2")
    answer = await client.chat.completions.create(model="g", messages=USER_MSG)
    assert answer.choices[0].message.content == TEXT5  # the thought is left out
    usage = answer.usage
    assert usage is not None
    assert usage.prompt_tokens == PROMPT
    assert usage.completion_tokens == 5 + 4
    assert usage.total_tokens == PROMPT + 9
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 4
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 2


async def test_limits_see_a_streams_tokens_the_client_did_not_ask_for(gemini_fakes,
                                                                      start_router):
    up = await gemini_fakes()
    config = router_config({"g": gemini_provider(up)},
                           {"g": {"backends": [{"provider": "g", "model": "gemini-x"}]}},
                           store={"url": "memory://"})
    config["auth"]["api_keys"][0]["limits"] = {"tpm": 1000}
    r = await start_router(config)
    body = {"model": "g", "messages": USER_MSG, "stream": True, "max_tokens": 100}
    async with r.chat(body) as resp:
        # "hello there": 2 tokens estimated + max_tokens 100, charged up front.
        assert resp.headers["x-ratelimit-remaining-tokens"] == "898"
        raw = await resp.read()
    assert b'"usage"' not in raw

    def counted() -> float:
        return r.worker.metrics.registry.get_sample_value(
            "router_tokens_total", {"route": "g", "backend": "g/gemini-x",
                                    "kind": "completion"}) or 0.0

    assert await eventually(counted) == 5
    await asyncio.sleep(0.05)  # the settlement follows the relay's end
    async with r.chat(body) as resp:
        remaining = int(resp.headers["x-ratelimit-remaining-tokens"])
        await resp.read()
    # The first charge was settled to its real usage (3 + 5), not to the bytes relayed (which
    # would have kept the whole 102, leaving 796): 1000 - 8 - 102, plus what refilled in
    # between (1000 tokens a minute).
    assert 890 <= remaining < 950


async def test_ping_mid_stream_is_invisible(gem):
    r, up = gem
    plain = await _raw_stream(r)
    script(up, "ping+gap:0.01")
    pinged = await _raw_stream(r)
    assert b"ping" not in pinged
    assert _contents(pinged) == _contents(plain) == TEXT5


async def _raw_stream(r: Any) -> bytes:
    async with r.chat({"model": "g", "messages": USER_MSG, "stream": True}) as resp:
        assert resp.status == 200
        return bytes(await resp.read())


def _contents(raw: bytes) -> str:
    return "".join(choice["delta"].get("content") or ""
                   for name, data in sse_events(raw) if name is None and data != "[DONE]"
                   for choice in json.loads(data)["choices"])


async def test_error_mid_stream_ends_with_the_routers_error_event(gem, client):
    r, up = gem
    script(up, "error-mid+gap:0.05")  # the first chunk commits the stream before the error
    raw = await _raw_stream(r)
    last = sse_events(raw)[-1]
    assert last[0] == "error"
    assert json.loads(last[1])["error"]["code"] == "stream_interrupted"
    assert b"[DONE]" not in raw
    assert _contents(raw) == "tok0 tok1 "  # what came before the error
    stream = await client.chat.completions.create(model="g", messages=USER_MSG, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


async def test_stream_without_finish_reason_ends_with_an_error_event(gem):
    r, up = gem
    script(up, "no-finish")
    raw = await _raw_stream(r)
    assert sse_events(raw)[-1][0] == "error"
    assert _contents(raw) == TEXT5


async def test_blocked_prompt_is_a_content_filter_finish(gem, client):
    _, up = gem
    script(up, "blocked")
    answer = await client.chat.completions.create(model="g", messages=USER_MSG)
    assert answer.choices[0].finish_reason == "content_filter"
    assert answer.choices[0].message.content == ""
    stream = await client.chat.completions.create(model="g", messages=USER_MSG, stream=True)
    finishes = [c.finish_reason async for chunk in stream for c in chunk.choices]
    assert finishes == [None, "content_filter"]


async def test_error_before_first_byte_goes_to_the_next_backend(gemini_fakes, start_router):
    bad, good = await gemini_fakes("bad"), await gemini_fakes("good")
    script(bad, "error-first")
    r = await start_router(router_config(
        {"bad": gemini_provider(bad), "good": gemini_provider(good)},
        {"g": {"strategy": "round_robin", "retries": 1,
               "backends": [{"provider": "bad", "model": "gemini-x"},
                            {"provider": "good", "model": "gemini-x"}]}}))
    for _ in range(2):  # whichever is picked first, the answer is good's
        async with r.chat({"model": "g", "messages": USER_MSG, "stream": True}) as resp:
            assert resp.status == 200
            assert resp.headers["x-router-backend"] == "good/gemini-x"
            assert _contents(await resp.read()) == TEXT5


async def test_upstream_400_is_an_openai_error(gem, client):
    _, up = gem
    script(up, "status:400")
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="g", messages=USER_MSG)
    assert info.value.body == {"message": "fake failure 400", "type": "invalid_request_error",
                               "code": "invalid_argument"}
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="g", messages=USER_MSG, stream=True)


async def test_upstream_404_is_relayed(gem, client):
    _, up = gem
    script(up, "status:404")
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="g", messages=USER_MSG)
    assert info.value.code == "not_found"


@pytest.mark.parametrize("directives", ["status:429+retry-after:30", "status:429+retry-delay:30",
                                        "status:529+retry-after:30"])
async def test_rate_limited_backend_rests_and_the_next_answers(gemini_fakes, start_router,
                                                               directives):
    limited, spare = await gemini_fakes("limited"), await gemini_fakes("spare")
    r = await start_router(router_config(
        {"limited": gemini_provider(limited), "spare": gemini_provider(spare)},
        {"g": {"retries": 0, "backends": [{"provider": "limited", "model": directives}],
               "fallbacks": ["s"]},
         "s": {"backends": [{"provider": "spare", "model": "gemini-x"}]}}))
    for stream in (False, True, False):
        async with r.chat({"model": "g", "messages": USER_MSG, "stream": stream}) as resp:
            assert resp.status == 200
            assert resp.headers["x-router-backend"] == "spare/gemini-x"
            await resp.read()
    assert len(limited.seen) == 1  # it rests for the 30 s it asked for
    rest = r.worker.ref.current.table.routes["g"].rest_remaining()
    assert rest is not None and 25 < rest <= 30


async def test_rate_limited_single_backend_tells_the_client_how_long(gemini_fakes,
                                                                     start_router):
    limited = await gemini_fakes()
    r = await start_router(router_config(
        {"g": gemini_provider(limited)},
        {"g": {"retries": 0, "backends": [{"provider": "g",
                                           "model": "status:429+retry-delay:7"}]}}))
    async with r.chat({"model": "g", "messages": USER_MSG}) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "7"
        assert (await resp.json())["error"]["type"] == "upstream_rate_limited"


async def test_server_error_is_an_upstream_failure(gem, client):
    _, up = gem
    script(up, "status:503")
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="g", messages=USER_MSG)
    assert info.value.status_code == 502


async def test_probe_lists_models(gemini_fakes, start_router):
    up = await gemini_fakes()
    r = await start_router(router_config(
        {"g": gemini_provider(up, probe=True),
         "nokey": {"type": "gemini", "base_url": up.base_url}},
        {"g": {"backends": [{"provider": "g", "model": "gemini-x"}]}}))
    providers = r.worker.ref.current.providers
    assert await providers["g"].probe() is True
    assert await providers["nokey"].probe() is False  # the fake, like Google, wants a key
    script(up, "models-500")
    assert await providers["g"].probe() is False
    assert not up.seen  # a probe is never a billed generateContent call


def test_default_base_url():
    from router.config import GeminiProviderConfig

    config = GeminiProviderConfig(type="gemini", api_key="k")
    assert config.base_url == "https://generativelanguage.googleapis.com"
