"""The official openai SDK as the client: what an application sees through the router."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import pytest

from tests.conftest import KEY, OTHER_KEY, USER_MSG, openai_provider, router_config

TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"x": {}}}}}]

Client = Callable[..., Awaitable[openai.AsyncOpenAI]]


@pytest.fixture
async def sdk(fakes, start_router) -> AsyncIterator[Client]:
    """`await sdk(prefix, key=...)`: an SDK client on a router with these routes:

    `m` (fake upstream, normal answer), `cut` (fake that tears the stream after 2 tokens),
    `mock` (the in-process mock provider).
    """
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up, probe=False), "mock": {"type": "mock", "chunks": 4}},
        {"m": {"backends": [{"provider": "up", "model": "chunks:6"}]},
         "cut": {"backends": [{"provider": "up", "model": "chunks:6+cut:2"}]},
         "mock": {"backends": [{"provider": "mock", "model": "mock-1"}]}}))
    clients: list[openai.AsyncOpenAI] = []

    async def make(prefix: str = "/v1", key: str = KEY) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{r.url}{prefix}", api_key=key, max_retries=0,
                                    timeout=20)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
async def test_sdk_non_stream(sdk, prefix):
    client = await sdk(prefix)
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER_MSG)
    assert raw.headers["x-router-backend"] == "up/chunks:6"
    assert raw.headers["x-request-id"]
    answer = raw.parse()
    assert answer.choices[0].message.content == "".join(f"tok{i} " for i in range(6))
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 6


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
async def test_sdk_stream(sdk, prefix):
    client = await sdk(prefix)
    stream = await client.chat.completions.create(model="m", messages=USER_MSG, stream=True)
    text = []
    finish = None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(text) == "".join(f"tok{i} " for i in range(6))
    assert finish == "stop"


@pytest.mark.parametrize("model", ["m", "mock"])
async def test_sdk_tools_streamed(sdk, model):
    client = await sdk()
    stream = await client.chat.completions.create(model=model, messages=USER_MSG, tools=TOOLS,
                                                  stream=True)
    name = arguments = ""
    call_id = None
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                assert tc.index == 0
                call_id = tc.id or call_id
                if tc.function is not None:
                    name += tc.function.name or ""
                    arguments += tc.function.arguments or ""
    assert finish == "tool_calls"
    assert call_id and name == "get_weather"
    json.loads(arguments)


@pytest.mark.parametrize("model", ["m", "mock"])
async def test_sdk_tools_not_streamed(sdk, model):
    client = await sdk("/api/v1")
    answer = await client.chat.completions.create(model=model, messages=USER_MSG, tools=TOOLS)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    json.loads(call.function.arguments)


async def test_sdk_sees_422_as_unprocessable_entity(sdk):
    client = await sdk()
    bad: Any = [{"role": "wizard", "content": "hi"}]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        await client.chat.completions.create(model="m", messages=bad)
    assert info.value.status_code == 422
    # The SDK keeps the `error` object as `.body`; the whole answer still has `detail`.
    detail = info.value.response.json()["detail"]
    assert detail[0]["loc"] == ["body", "messages", 0, "role"]
    # The SDK shows the error object's message, not a bare "Error code: 422".
    assert info.value.message.startswith("Error code: 422 - messages.0.role: Input should be")
    assert info.value.param == "messages.0.role"  # type: ignore[attr-defined]
    assert info.value.code == "validation_error"  # type: ignore[attr-defined]


async def test_sdk_sees_bad_key_as_authentication_error(sdk):
    client = await sdk(key="sk-not-a-real-key")
    with pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(model="m", messages=USER_MSG)
    assert info.value.status_code == 401
    assert "sk-not-a-real-key" not in str(info.value)


async def test_sdk_sees_unknown_model_as_not_found(sdk):
    client = await sdk()
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=USER_MSG)


async def test_sdk_raises_when_upstream_dies_mid_stream(sdk):
    client = await sdk()
    stream = await client.chat.completions.create(model="cut", messages=USER_MSG, stream=True)
    text = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
    assert "".join(text) == "tok0 tok1 "  # what arrived before the cut is kept
    # The router's in-band error event, not a broken connection.
    assert not isinstance(info.value, openai.APIConnectionError)
    assert info.value.message
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "upstream_error"


async def test_sdk_lists_models(sdk):
    client = await sdk()
    models = [m.id async for m in client.models.list()]
    assert sorted(models) == ["cut", "m", "mock"]


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
async def test_sdk_retrieves_a_model_it_may_use_and_nothing_else(sdk, prefix):
    client = await sdk(prefix)
    model = await client.models.retrieve("m")
    assert (model.id, model.object, model.owned_by) == ("m", "model", "router")
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("no-such-route")
    assert info.value.code == "model_not_found"  # type: ignore[attr-defined]
    # The narrow key may use only the first route: another route is just as absent.
    narrow = await sdk(prefix, key=OTHER_KEY)
    assert (await narrow.models.retrieve("m")).id == "m"
    with pytest.raises(openai.NotFoundError):
        await narrow.models.retrieve("mock")


async def test_a_model_whose_name_holds_a_slash_is_retrieved_whole(fakes, start_router):
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up, probe=False)},
        {"org/model-a": {"backends": [{"provider": "up", "model": "x"}]}}))
    async with r.http.get(f"{r.url}/v1/models/org/model-a",
                          headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["id"] == "org/model-a"
