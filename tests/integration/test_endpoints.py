"""Embeddings and legacy text completions through the router's routes, with the official openai
SDK as the client: what goes upstream, what comes back, limits and metrics, and routes that
cannot serve them."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import openai
import pytest

from tests.conftest import (
    KEY,
    anthropic_provider,
    eventually,
    gemini_provider,
    openai_provider,
    router_config,
)

LIMITED_KEY = "sk-limited-0123456789abcdef0123456789"


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


@pytest.fixture
async def routed(fakes, claude_fakes, start_router):
    """Routes `e` and `c` (an OpenAI-compatible fake), `az` (Azure, deployment `dep`), `mock`,
    `claude` (Anthropic: chat only) and `chat-only` (the fake, `endpoints: [chat]`); a second
    key with a tpm limit."""
    up, claude = await fakes("up"), await claude_fakes("claude")
    config = router_config(
        {"up": openai_provider(up, probe=False),
         "az": {"type": "azure", "base_url": up.base_url.removesuffix("/v1"),
                "api_version": "2024-10-21", "api_key": "az-key", "probe": False},
         "mock": {"type": "mock", "chunks": 3},
         "claude": anthropic_provider(claude, probe=False)},
        {"e": {"backends": [{"provider": "up", "model": "text-embedding-x"}]},
         "c": {"backends": [{"provider": "up", "model": "chunks:4"}]},
         "az": {"backends": [{"provider": "az", "model": "dep"}]},
         "mock": {"backends": [{"provider": "mock", "model": "mock-1"}]},
         "claude": {"backends": [{"provider": "claude", "model": "claude-x"}]},
         "chat-only": {"endpoints": ["chat"],
                       "backends": [{"provider": "up", "model": "x"}]}})
    config["auth"]["api_keys"].append(
        {"id": "limited", "user": "carol", "limits": {"tpm": 100_000},
         "key_sha256": hashlib.sha256(LIMITED_KEY.encode()).hexdigest()})
    r = await start_router(config)
    return r, up


@pytest.fixture
async def client(routed) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=f"{routed[0].url}/v1", api_key=KEY, max_retries=0,
                             timeout=20)
    yield sdk
    await sdk.close()


async def test_embeddings_go_upstream_and_come_back(routed, client):
    _, up = routed
    raw = await client.embeddings.with_raw_response.create(
        model="e", input=["first text", "second text"], dimensions=3)
    answer = raw.parse()
    assert raw.headers["x-router-backend"] == "up/text-embedding-x"
    # The SDK asks for base64 and decodes it: the upstream's floats arrive intact.
    assert [d.embedding for d in answer.data] == [[0.25] * 3, [0.25] * 3]
    assert answer.usage.prompt_tokens > 0
    seen = up.seen[0]
    assert seen.path == "/v1/embeddings"
    assert seen.body["model"] == "text-embedding-x" and seen.body["dimensions"] == 3
    assert seen.body["input"] == ["first text", "second text"]
    assert "stream" not in seen.body  # an embedding never streams
    float_answer = await client.embeddings.create(model="e", input=[1, 2, 3],
                                                  encoding_format="float")
    assert float_answer.data[0].embedding == [0.25] * 4
    assert up.seen[1].body["input"] == [1, 2, 3]


async def test_text_completions_json_and_streamed(routed, client):
    _, up = routed
    answer = await client.completions.create(model="c", prompt="Say hello", max_tokens=5)
    assert answer.object == "text_completion"
    assert answer.choices[0].text == "tok0 tok1 tok2 tok3 "
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    assert up.seen[0].path == "/v1/completions" and up.seen[0].body["model"] == "chunks:4"
    stream = await client.completions.create(model="c", prompt="Say hello", stream=True)
    texts = [choice.text async for chunk in stream for choice in chunk.choices]
    assert "".join(texts) == "tok0 tok1 tok2 tok3 "
    # The router asked for the usage chunk on the client's behalf, and hid it.
    assert up.seen[1].body["stream_options"] == {"include_usage": True}
    stream = await client.completions.create(model="c", prompt="Say hello", stream=True,
                                             stream_options={"include_usage": True})
    usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 4


async def test_azure_deployment_paths_and_the_mock(routed, client):
    _, up = routed
    await client.embeddings.create(model="az", input="hi", encoding_format="float")
    await client.completions.create(model="az", prompt="hi")
    assert [s.path for s in up.seen] == [
        "/openai/deployments/dep/embeddings?api-version=2024-10-21",
        "/openai/deployments/dep/completions?api-version=2024-10-21"]
    assert all(lower(s.headers)["api-key"] == "az-key" for s in up.seen)
    vectors = await client.embeddings.create(model="mock", input=["a", "b"],
                                             encoding_format="float")
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 8
    assert vectors.data[0].embedding != vectors.data[1].embedding  # one per text
    text = await client.completions.create(model="mock", prompt="hi")
    assert text.choices[0].text


@pytest.mark.parametrize(("model", "call"), [
    ("claude", "embeddings"), ("claude", "completions"), ("chat-only", "embeddings")])
async def test_a_route_that_cannot_serve_the_endpoint_is_a_400_naming_why(routed, client,
                                                                         model, call):
    _, up = routed
    with pytest.raises(openai.BadRequestError) as info:
        if call == "embeddings":
            await client.embeddings.create(model=model, input="hi")
        else:
            await client.completions.create(model=model, prompt="hi")
    assert info.value.code == "unsupported_endpoint"  # type: ignore[attr-defined]
    assert f"does not serve {call}" in info.value.message
    assert up.seen == []


async def test_bad_bodies_are_422_with_an_error_object(routed, client):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        await client.embeddings.create(model="e", input=[])
    assert info.value.param == "input"  # type: ignore[attr-defined]
    with pytest.raises(openai.UnprocessableEntityError):
        await client.completions.create(model="c", prompt="hi", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="no-such-route", input="hi")


async def test_limits_and_metrics_count_the_new_endpoints(routed):
    r, _ = routed
    sdk = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key=LIMITED_KEY, max_retries=0,
                             timeout=20)
    try:
        raw = await sdk.embeddings.with_raw_response.create(model="e", input="x" * 400)
        # Charged up front: the input's estimate and no completion (embeddings have none).
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 100_000 - 100
        raw = await sdk.completions.with_raw_response.create(model="c", prompt="hi")
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    finally:
        await sdk.close()

    async def counted() -> bool:
        async with r.http.get(f"{r.url}/metrics") as resp:
            lines = (await resp.text()).splitlines()
        return all(any(line.startswith("router_requests_total") and f'route="{route}"' in line
                       for line in lines) for route in ("e", "c")) and all(
            f'router_endpoint_requests_total{{endpoint="{endpoint}",route="{route}",'
            f'status="200"}} 1.0' in lines
            for endpoint, route in (("embeddings", "e"), ("completions", "c")))

    await eventually(counted, 5, "the requests in router_requests_total, by endpoint")



async def test_gemini_embeddings_through_batch_embed_contents(gemini_fakes, start_router):
    """Gemini embeds text with batchEmbedContents: one request per input, the size as
    outputDimensionality; the answer comes back in OpenAI's shape (base64 or floats), with
    the router's token estimate as its usage; token ids are a 400 naming `input`."""
    gem = await gemini_fakes("gem")
    r = await start_router(router_config(
        {"gem": gemini_provider(gem)},
        {"g": {"backends": [{"provider": "gem", "model": "text-embedding-004"}]}}))
    sdk = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key=KEY, max_retries=0, timeout=20)
    try:
        answer = await sdk.embeddings.create(model="g", input=["first", "second"],
                                             dimensions=3)  # the SDK asks for base64
        assert [d.embedding for d in answer.data] == [[0.125] * 3, [0.25] * 3]
        assert answer.usage.prompt_tokens == 2 + 2  # len // 4 + 1 each
        seen = gem.seen[0]
        assert seen.path == "/v1beta/models/text-embedding-004:batchEmbedContents"
        assert seen.body == {"requests": [
            {"model": "models/text-embedding-004", "outputDimensionality": 3,
             "content": {"parts": [{"text": "first"}]}},
            {"model": "models/text-embedding-004", "outputDimensionality": 3,
             "content": {"parts": [{"text": "second"}]}}]}
        floats = await sdk.embeddings.create(model="g", input="one", encoding_format="float")
        assert floats.data[0].embedding == [0.125] * 6
        with pytest.raises(openai.BadRequestError) as info:
            await sdk.embeddings.create(model="g", input=[1, 2, 3])
        assert info.value.code == "unsupported_parameter"  # type: ignore[attr-defined]
        assert "input" in info.value.message and len(gem.seen) == 2
    finally:
        await sdk.close()
