"""Anthropic's Messages API behind the router: the official openai SDK as the client, the fake
Anthropic upstream behind it. What the client sees is OpenAI's chat completions, JSON and
streamed; what the upstream sees is a Messages API request."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest

from tests.conftest import (
    ANTHROPIC_KEY,
    KEY,
    USER_MSG,
    anthropic_provider,
    eventually,
    openai_provider,
    router_config,
)

API_KEY = ANTHROPIC_KEY
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]
TEXT5 = "".join(f"tok{i} " for i in range(5))
PROMPT = len(USER_MSG[0]["content"]) // 4 + 1  # the fake's count of "hello there"
DONE = b"data: [DONE]\n\n"


def route(*models: str, provider: str = "claude", **extra: Any) -> dict[str, Any]:
    return {"backends": [{"provider": provider, "model": m} for m in models], **extra}


@pytest.fixture
async def claude(claude_fakes, start_router):
    """(router, fake, sdk client): routes `m` (5 words), `tools` (2 tool calls), `cache`,
    `ping` (pings between deltas), `mid` (an error after 2 deltas), `cut`, `nostop`,
    `drop` (a provider with drop_unsupported) and `bad` (a 400)."""
    up = await claude_fakes()
    r = await start_router(router_config(
        {"claude": anthropic_provider(up, anthropic_beta="tools-2099-01-01"),
         "lenient": anthropic_provider(up, drop_unsupported=True, probe=False)},
        {"m": route("claude-x+answer-model:claude-x-2099"), "tools": route("tools:2"),
         "cache": route("cache:10"), "ping": route("ping+chunks:3+split:9"),
         # a gap between deltas: the stream's beginning reaches the client before the failure
         "mid": route("error-mid:2+gap:0.02"), "cut": route("cut:2+gap:0.02"),
         "nostop": route("no-stop"),
         "bad": route("status:400"), "drop": route("lenient-x", provider="lenient")}))
    client = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key=KEY, max_retries=0, timeout=20)
    yield r, up, client
    await client.close()


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


async def raw_stream(r, body: dict[str, Any]) -> bytes:
    async with r.chat({"messages": USER_MSG, "stream": True, **body}) as resp:
        assert resp.status == 200
        return await resp.read()


async def test_json_answer(claude):
    _, up, client = claude
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER_MSG)
    assert raw.headers["x-router-backend"] == "claude/claude-x+answer-model:claude-x-2099"
    answer = raw.parse()
    assert answer.object == "chat.completion"
    assert answer.id == "msg_fake_1" and answer.model == "claude-x-2099"
    choice = answer.choices[0]
    assert choice.message.content == TEXT5 and choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens,
            answer.usage.total_tokens) == (PROMPT, 5, PROMPT + 5)
    (seen,) = up.seen
    assert seen.path == "/v1/messages"
    assert seen.body == {"model": "claude-x+answer-model:claude-x-2099", "max_tokens": 4096,
                         "messages": [{"role": "user", "content": [
                             {"type": "text", "text": "hello there"}]}]}


async def test_headers_sent_upstream_and_the_probe(claude):
    r, up, client = claude
    await client.chat.completions.create(model="m", messages=USER_MSG,
                                         extra_headers={"x-request-id": "req-abc"})
    headers = lower(up.seen[0].headers)
    assert headers["x-api-key"] == API_KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "tools-2099-01-01"
    assert headers["x-request-id"] == "req-abc"
    assert headers["content-type"] == "application/json"
    assert "authorization" not in headers  # neither the client's key nor a bearer upstream
    assert KEY not in json.dumps(headers)
    providers = r.worker.ref.current.providers
    assert await providers["claude"].probe() is True  # GET /v1/models: needs the key
    assert await providers["lenient"].probe() is None  # probe: false


async def test_stream(claude):
    _, up, client = claude
    stream = await client.chat.completions.create(model="m", messages=USER_MSG, stream=True)
    text, finish, ids = [], None, set()
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.choices
        ids.add((chunk.id, chunk.model))
        text.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(text) == TEXT5 and finish == "stop"
    assert ids == {("msg_fake_1", "claude-x-2099")}
    assert up.seen[0].body["stream"] is True


async def test_a_stream_without_include_usage_has_no_usage_chunk(claude):
    r, _, _ = claude
    raw = await raw_stream(r, {"model": "m"})
    assert raw.endswith(DONE) and b'"usage"' not in raw
    first = json.loads(raw.split(b"\n\n")[0].removeprefix(b"data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


async def test_usage_json_and_streamed(claude):
    _, _, client = claude
    answer = await client.chat.completions.create(model="cache", messages=USER_MSG)
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == PROMPT + 10 + 2  # input + cache read + cache written
    assert answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 10
    assert answer.usage.completion_tokens == 5
    stream = await client.chat.completions.create(model="cache", messages=USER_MSG,
                                                  stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == answer.usage.model_dump(
        exclude_none=True)
    assert all(c.usage is None for c in chunks[:-1])


async def test_limits_see_a_streams_tokens_the_client_did_not_ask_for(claude_fakes,
                                                                      start_router):
    up = await claude_fakes()
    config = router_config({"claude": anthropic_provider(up, probe=False)},
                           {"m": route("claude-x")})
    # tpm 60: one token a second, so the few milliseconds between requests change nothing.
    config["auth"]["api_keys"][0]["limits"] = {"tpm": 60, "tokens_per_day": 100_000}
    r = await start_router(config)
    body = {"model": "m", "messages": USER_MSG, "max_tokens": 20}
    async with r.chat({**body, "stream": True}) as resp:
        # "hello there" is estimated at 2 tokens, + max_tokens 20 charged up front.
        assert resp.headers["x-ratelimit-remaining-tokens"] == "38"
        raw = await resp.read()
    assert b'"usage"' not in raw
    await eventually(lambda: r.worker.store._buckets["test"].day_used == PROMPT + 5,
                     what="the stream settled on its real usage")
    async with r.chat(body) as resp:
        assert resp.status == 200
        # 60 - 8 really used - 22 charged now (30, where the estimate alone would leave 16).
        assert resp.headers["x-ratelimit-remaining-tokens"] == "30"
    assert up.seen[0].body["max_tokens"] == 20


async def test_tools_json(claude):
    _, up, client = claude
    answer = await client.chat.completions.create(model="tools", messages=USER_MSG,
                                                  tools=TOOLS, tool_choice="required",
                                                  parallel_tool_calls=False)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("toolu_fake_1", "get_weather", {"x": 1}), ("toolu_fake_2", "get_weather", {"x": 2})]
    sent = up.seen[0].body
    assert sent["tools"] == [{"name": "get_weather", "description": "The weather in a city",
                              "input_schema": TOOLS[0]["function"]["parameters"]}]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


async def test_tools_streamed_accumulate(claude):
    _, up, client = claude
    async with client.chat.completions.stream(
            model="tools", messages=USER_MSG, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}) as stream:
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("toolu_fake_1", "get_weather", {"x": 1}), ("toolu_fake_2", "get_weather", {"x": 2})]
    assert up.seen[0].body["tool_choice"] == {"type": "tool", "name": "get_weather"}


async def test_a_tool_round_trip(claude):
    _, up, client = claude
    messages: list[Any] = [
        {"role": "system", "content": "be brief"}, *USER_MSG,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_fake_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "toolu_fake_1", "content": "sunny"}]
    answer = await client.chat.completions.create(model="m", messages=messages,
                                                  tools=TOOLS, tool_choice="none")
    assert answer.choices[0].message.content == TEXT5
    sent = up.seen[0].body
    assert sent["system"] == "be brief"
    assert sent["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_fake_1",
                                           "name": "get_weather", "input": {"x": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_fake_1",
                                      "content": "sunny"}]}]


async def test_stop(claude):
    _, up, client = claude
    answer = await client.chat.completions.create(model="m", messages=USER_MSG, stop="tok3")
    assert answer.choices[0].finish_reason == "stop"
    stream = await client.chat.completions.create(model="m", messages=USER_MSG,
                                                  stop=["tok3", "END"], stream=True)
    finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert finishes[-1] == "stop"
    assert [s.body["stop_sequences"] for s in up.seen] == [["tok3"], ["tok3", "END"]]


async def test_max_tokens_reached_is_length(claude):
    _, up, client = claude
    answer = await client.chat.completions.create(model="m", messages=USER_MSG,
                                                  max_completion_tokens=2)
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content == "tok0 tok1 "
    assert up.seen[0].body["max_tokens"] == 2


async def test_images(claude):
    _, up, client = claude
    content: Any = [
        {"type": "text", "text": "what are these?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://img.test/cat.jpg",
                                            "detail": "low"}}]
    answer = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": content}])
    assert answer.choices[0].message.content == TEXT5
    assert up.seen[0].body["messages"][0]["content"] == [
        {"type": "text", "text": "what are these?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://img.test/cat.jpg"}}]


async def test_n_above_one_is_refused_naming_it(claude):
    _, up, client = claude
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="m", messages=USER_MSG, n=2)
    assert info.value.status_code == 400
    error: Any = info.value.body
    assert error["code"] == "unsupported_parameter"
    assert error["message"].startswith("`n` is not supported by the Anthropic API")
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="m", messages=USER_MSG, seed=3,
                                             stream=True)
    assert "`seed`" in str(info.value)
    assert up.seen == []


async def test_drop_unsupported_leaves_them_out(claude):
    _, up, client = claude
    answer = await client.chat.completions.create(model="drop", messages=USER_MSG, n=2,
                                                  presence_penalty=0.5, seed=1)
    assert len(answer.choices) == 1 and answer.choices[0].message.content == TEXT5
    assert set(up.seen[0].body) == {"model", "max_tokens", "messages"}


async def test_a_ping_mid_stream_is_invisible(claude):
    r, _, _ = claude
    raw = await raw_stream(r, {"model": "ping"})
    events = [e for e in raw.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events)
    assert b"event:" not in raw and b'"type":"ping"' not in raw
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1])
    assert text == "tok0 tok1 tok2 " and raw.endswith(DONE)


@pytest.mark.parametrize("model", ["mid", "cut", "nostop"])
async def test_a_failure_mid_stream_ends_with_the_routers_error_event(claude, model):
    r, _, client = claude
    raw = await raw_stream(r, {"model": model})
    assert DONE not in raw
    last = raw.rstrip(b"\n").split(b"\n\n")[-1]
    assert last.startswith(b"event: error\ndata: ")
    assert json.loads(last.split(b"data: ", 1)[1])["error"]["code"] == "stream_interrupted"
    if model == "nostop":
        assert b'"finish_reason":"stop"' in raw  # the answer was whole but never ended
    else:
        assert raw.count(b'"content":"tok') == 2
    stream = await client.chat.completions.create(model=model, messages=USER_MSG, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


async def test_an_error_answer_before_the_first_byte(claude):
    _, _, client = claude
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="bad", messages=USER_MSG)
    error: Any = info.value.body
    assert error == {"message": "fake failure 400", "type": "invalid_request_error",
                     "code": None}


@pytest.mark.parametrize("status", [429, 529])
@pytest.mark.parametrize("stream", [False, True])
async def test_rate_limited_or_overloaded_tries_the_next_backend_and_rests(
        claude_fakes, fakes, start_router, status, stream):
    busy = await claude_fakes("busy")
    spare = await claude_fakes("spare")
    other = await fakes("openai")
    r = await start_router(router_config(
        {"busy": anthropic_provider(busy, probe=False),
         "spare": anthropic_provider(spare, probe=False),
         "other": openai_provider(other, probe=False)},
        {"m": route(f"status:{status}+retry-after:30", provider="busy",
                    fallbacks=["spare" if status == 429 else "other"]),
         "spare": route("claude-x", provider="spare"),
         "other": route("gpt-x", provider="other")}))
    body = {"model": "m", "messages": USER_MSG, "stream": stream}
    for _ in range(2):
        async with r.chat(body) as resp:
            assert resp.status == 200
            answered = resp.headers["x-router-backend"]
            raw = await resp.read()
        assert answered == ("spare/claude-x" if status == 429 else "other/gpt-x")
        assert raw.rstrip().endswith(b"[DONE]") if stream else b"tok0" in raw
    assert len(busy.seen) == 1  # it rests for its retry-after: the second went elsewhere
    backend = r.worker.ref.current.table.routes["m"].backends[0]
    assert 25 < backend.state.resting_until - time.monotonic() <= 30


async def test_an_error_event_before_the_first_chunk_tries_the_next_backend(claude_fakes,
                                                                            start_router):
    up = await claude_fakes()
    r = await start_router(router_config(
        {"claude": anthropic_provider(up, probe=False)},
        {"m": route("error-start", "claude-x", strategy="round_robin", retries=1)}))
    for _ in range(2):  # whichever is picked first, the answer is the good one's
        raw = await raw_stream(r, {"model": "m"})
        assert raw.endswith(DONE) and b"tok4" in raw


async def test_an_overload_after_message_start_but_before_any_text_tries_the_next_backend(
        claude_fakes, start_router):
    """The role chunk is held until content follows it: an upstream that fails in a later
    read, before its first token, has committed nothing, so the next backend answers."""
    up = await claude_fakes()
    r = await start_router(router_config(
        {"claude": anthropic_provider(up, probe=False)},
        {"m": route("error-mid:0+gap:0.05", "claude-x", strategy="round_robin", retries=1)}))
    for _ in range(2):
        raw = await raw_stream(r, {"model": "m"})
        assert raw.endswith(DONE) and b"tok4" in raw
        assert raw.count(b'"role":"assistant"') == 1
    assert any(seen.body["model"].startswith("error-mid") for seen in up.seen)
