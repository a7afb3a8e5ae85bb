"""Routes that mix providers: an OpenAI-compatible server, Anthropic's Messages API and Google's
Gemini API behind one route, with the official openai SDK as the client. Balancing, fallback and
fan-out treat every provider alike; the client sees OpenAI's answers whichever one answered."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.conftest import (
    KEY,
    USER_MSG,
    anthropic_provider,
    gemini_provider,
    openai_provider,
    router_config,
)

BACKENDS = {"up/gpt-x", "claude/claude-x", "gem/gemini-x"}


@pytest.fixture
async def mixed(fakes, claude_fakes, gemini_fakes, start_router):
    """A router over three upstreams, one of each provider type: routes `rr` (round robin over
    the three), `fallback` (a failing Anthropic backend, falling back to `gpt`) and `all`
    (fan-out to the three)."""
    up, claude, gem = await fakes("up"), await claude_fakes("claude"), await gemini_fakes("gem")
    three = [{"provider": "up", "model": "gpt-x"}, {"provider": "claude", "model": "claude-x"},
             {"provider": "gem", "model": "gemini-x"}]
    r = await start_router(router_config(
        {"up": openai_provider(up), "claude": anthropic_provider(claude, probe=False),
         "gem": gemini_provider(gem)},
        {"rr": {"strategy": "round_robin", "backends": three},
         "fallback": {"retries": 0, "fallbacks": ["gpt"],
                      "backends": [{"provider": "claude", "model": "status:529"}]},
         "gpt": {"backends": [{"provider": "up", "model": "gpt-x"}]},
         "claude": {"backends": [{"provider": "claude", "model": "claude-x"}]},
         "gem-sig": {"backends": [{"provider": "gem", "model": "gemini-x+signature"}]},
         "all": {"fanout": "all", "backends": three}}))
    return r, up, claude, gem


@pytest.fixture
async def client(mixed) -> AsyncIterator[openai.AsyncOpenAI]:
    r = mixed[0]
    sdk = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key=KEY, max_retries=0, timeout=20)
    yield sdk
    await sdk.close()


async def test_round_robin_over_three_providers_json_and_streamed(mixed, client):
    _, up, claude, gem = mixed
    answered: list[str] = []
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            model="rr", messages=USER_MSG)
        answer = raw.parse()
        answered.append(raw.headers["x-router-backend"])
        assert answer.object == "chat.completion"
        assert answer.choices[0].message.role == "assistant"
        assert answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert set(answered) == BACKENDS
    for _ in range(3):
        raw_stream = await client.chat.completions.with_raw_response.create(
            model="rr", messages=USER_MSG, stream=True,
            stream_options={"include_usage": True})
        answered.append(raw_stream.headers["x-router-backend"])
        text, finish, usage = "", None, None
        async for chunk in raw_stream.parse():
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert text and finish == "stop"
        assert usage is not None and usage.completion_tokens > 0
    assert set(answered[3:]) == BACKENDS
    # Each upstream got its own dialect: two requests each.
    assert len(up.seen) == len(claude.seen) == len(gem.seen) == 2
    assert "messages" in claude.seen[0].body and "max_tokens" in claude.seen[0].body
    assert "contents" in gem.seen[0].body


async def test_tools_through_each_provider(mixed, client):
    tools: list[Any] = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]
    names = set()
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            model="rr", messages=USER_MSG, tools=tools, tool_choice="required")
        answer = raw.parse()
        names.add(raw.headers["x-router-backend"])
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]  # type: ignore[index]
        assert call.type == "function" and call.function.name == "get_weather"
        assert isinstance(call.function.arguments, str) and call.id
    assert names == BACKENDS


async def test_a_failing_anthropic_backend_falls_back_to_an_openai_route(mixed, client):
    _, up, claude, _ = mixed
    raw = await client.chat.completions.with_raw_response.create(
        model="fallback", messages=USER_MSG)
    assert raw.headers["x-router-backend"] == "up/gpt-x"
    assert raw.parse().choices[0].message.content
    assert len(claude.seen) == 1 and len(up.seen) == 1
    # Streamed too: the Anthropic backend rests after its 529, the fallback answers.
    stream = await client.chat.completions.create(model="fallback", messages=USER_MSG,
                                                  stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text
    assert len(up.seen) == 2


async def test_fanout_all_merges_answers_from_three_providers(mixed, client):
    answer = await client.chat.completions.create(model="all", messages=USER_MSG)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    tagged = {c.model_extra["backend"]: c for c in answer.choices}  # type: ignore[index]
    assert set(tagged) == BACKENDS
    assert all(c.message.content and c.finish_reason == "stop" for c in answer.choices)
    assert answer.usage is not None
    assert answer.usage.completion_tokens >= 3  # each backend's count, summed
    stream = await client.chat.completions.create(model="all", messages=USER_MSG, stream=True)
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert sorted(texts) == [0, 1, 2] and all(texts.values())
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}


async def test_a_gemini_tool_call_id_goes_plain_to_other_providers(mixed, client):
    """Gemini's thought signature rides in the tool call id it hands out; a conversation that
    moves to another provider sends the plain id there (OpenAI allows 40 characters,
    Anthropic only [A-Za-z0-9_-])."""
    _, up, claude, gem = mixed
    tools: list[Any] = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    answer = await client.chat.completions.create(model="gem-sig", messages=USER_MSG,
                                                  tools=tools)
    call = answer.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert "__thought__" in call.id
    plain = call.id.partition("__thought__")[0]
    turn: list[Any] = [*USER_MSG,
                       {"role": "assistant", "content": None, "tool_calls": [
                           {"id": call.id, "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"}}]},
                       {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    for model in ("gpt", "claude", "gem-sig"):
        await client.chat.completions.create(model=model, messages=turn, tools=tools)
    sent = up.seen[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == plain and sent[2]["tool_call_id"] == plain
    blocks = claude.seen[-1].body["messages"]
    assert blocks[1]["content"][0]["id"] == plain
    assert blocks[2]["content"][0]["tool_use_id"] == plain
    # Back on Gemini, the signature returns with its call.
    assert "__thought__" not in str(gem.seen[-1].body)
    assert "thoughtSignature" in str(gem.seen[-1].body)


async def test_a_parameter_one_provider_lacks_goes_to_a_backend_that_has_it(mixed, client):
    """`logit_bias` has no Anthropic or Gemini equivalent: on a route that mixes them with an
    OpenAI-compatible server, the request goes on to that one instead of failing; a route of
    Anthropic alone answers 400 naming the parameter."""
    _, up, claude, gem = mixed
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            model="rr", messages=USER_MSG, logit_bias={"50256": -100})
        assert raw.headers["x-router-backend"] == "up/gpt-x"
    assert len(up.seen) == 3 and claude.seen == [] and gem.seen == []
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="claude", messages=USER_MSG,
                                             logit_bias={"50256": -100})
    assert info.value.code == "unsupported_parameter"  # type: ignore[attr-defined]
    assert "logit_bias" in info.value.message
