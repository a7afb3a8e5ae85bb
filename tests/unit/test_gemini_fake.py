"""The fake Gemini upstream cannot drift from the real API: its answers and stream chunks parse
as the google-genai SDK's own types (which forbid unknown fields), and the SDK itself, pointed
at the fake, gets what it would get from Google."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types

from tests.fakes.gemini_upstream import SIGNATURE, Recorder, check_request, start_gemini

# The SDK's async client subclasses aiohttp's ClientSession, which aiohttp discourages.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession:DeprecationWarning")
KEY = "g-test-key"
CONTENTS = [{"role": "user", "parts": [{"text": "hello there, fake"}]}]  # 17 chars -> 5 tokens
TOOLS = [{"functionDeclarations": [{"name": "get_weather", "parametersJsonSchema": {
    "type": "object", "properties": {"x": {"type": "integer"}}}}]}]

Fake = tuple[str, Recorder, aiohttp.ClientSession]


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    runner, base, rec = await start_gemini()
    async with aiohttp.ClientSession(headers={"x-goog-api-key": KEY}) as session:
        yield base, rec, session
    await runner.cleanup()


@pytest.fixture
async def sdk(fake: Fake) -> AsyncIterator[genai.Client]:
    base = fake[0]
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(
        base_url=base, api_version="v1beta"))
    yield client
    await client.aio.aclose()


async def generate(fake: Fake, model: str, stream: bool = False,
                   **request: Any) -> tuple[int, bytes]:
    base, _, session = fake
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    body = {"contents": CONTENTS, **request}
    async with session.post(f"{base}/v1beta/models/{model}:{method}", json=body) as resp:
        return resp.status, await resp.read()


def sse_data(raw: bytes) -> list[bytes]:
    return [line.removeprefix(b"data: ") for block in raw.split(b"\r\n\r\n")
            for line in block.split(b"\r\n") if line.startswith(b"data: ")]


VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("gemini-x", {}),
    ("chunks:3+thought+cached:2", {}),
    ("finish:SAFETY", {"generationConfig": {"candidateCount": 2, "maxOutputTokens": 2}}),
    ("calls:2+signature+call-id", {"tools": TOOLS}),
    ("gemini-x", {"tools": TOOLS, "toolConfig": {"functionCallingConfig": {"mode": "ANY"}}}),
    ("blocked", {}),
]


@pytest.mark.parametrize(("model", "request_"), VARIANTS)
async def test_answers_and_chunks_parse_as_the_sdk_types(fake, model, request_):
    status, raw = await generate(fake, model, **request_)
    assert status == 200, raw
    whole = types.GenerateContentResponse.model_validate_json(raw)
    assert whole.response_id and whole.model_version
    status, raw = await generate(fake, model, stream=True, **request_)
    assert status == 200, raw
    chunks = [types.GenerateContentResponse.model_validate_json(d) for d in sse_data(raw)]
    assert chunks
    if model != "blocked":
        assert chunks[-1].candidates and chunks[-1].candidates[0].finish_reason is not None
        assert all(c.finish_reason is None for chunk in chunks[:-1]
                   for c in chunk.candidates or ())


async def test_function_call_parts(fake):
    _, raw = await generate(fake, "calls:2+signature+call-id", tools=TOOLS)
    answer = types.GenerateContentResponse.model_validate_json(raw)
    parts = answer.candidates[0].content.parts
    assert [(p.function_call.name, p.function_call.args, p.function_call.id) for p in parts] == [
        ("get_weather", {"x": 1}, "fc-1"), ("get_weather", {"x": 1}, "fc-2")]
    assert parts[0].thought_signature == types.Part.model_validate_json(
        f'{{"thoughtSignature": "{SIGNATURE}"}}').thought_signature


async def test_sdk_drives_the_fake(fake, sdk):
    _, rec, _ = fake
    answer = await sdk.aio.models.generate_content(
        model="chunks:3", contents="hello there",
        config=types.GenerateContentConfig(system_instruction="Be brief.", temperature=0.2,
                                           stop_sequences=["never"], max_output_tokens=50))
    assert answer.text == "tok0 tok1 tok2 "
    assert answer.candidates[0].finish_reason == types.FinishReason.STOP
    assert answer.usage_metadata.candidates_token_count == 3
    # What the SDK sends, the fake's request check takes.
    assert check_request(rec.seen[-1].body) is None
    assert rec.seen[-1].path == "/v1beta/models/chunks:3:generateContent"
    text = [chunk.text async for chunk in
            await sdk.aio.models.generate_content_stream(model="chunks:4", contents="hi")]
    assert "".join(t or "" for t in text) == "tok0 tok1 tok2 tok3 "
    assert rec.seen[-1].path == "/v1beta/models/chunks:4:streamGenerateContent?alt=sse"


async def test_sdk_reads_function_calls_and_sends_results(fake, sdk):
    _, rec, _ = fake
    weather = types.FunctionDeclaration(name="get_weather", parameters_json_schema={
        "type": "object", "properties": {"x": {"type": "integer"}}})
    config = types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[weather])],
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True))
    answer = await sdk.aio.models.generate_content(model="signature", contents="weather?",
                                                   config=config)
    (call,) = answer.function_calls
    assert (call.name, call.args) == ("get_weather", {"x": 1})
    follow_up = [types.Content(role="user", parts=[types.Part(text="weather?")]),
                 answer.candidates[0].content,
                 types.Content(role="user", parts=[types.Part.from_function_response(
                     name="get_weather", response={"temp": 3})])]
    await sdk.aio.models.generate_content(model="gemini-x", contents=follow_up, config=config)
    sent = rec.seen[-1].body
    assert check_request(sent) is None
    assert sent["contents"][1]["parts"][0]["thoughtSignature"] == SIGNATURE


async def test_sdk_reads_the_fakes_errors(fake, sdk):
    with pytest.raises(errors.ClientError) as info:
        await sdk.aio.models.generate_content(model="status:429+retry-delay:9", contents="x")
    assert info.value.code == 429
    assert info.value.status == "RESOURCE_EXHAUSTED"
    assert info.value.details["error"]["details"][0]["retryDelay"] == "9s"
    with pytest.raises(errors.ServerError) as server:
        await sdk.aio.models.generate_content(model="status:503", contents="x")
    assert server.value.status == "UNAVAILABLE"


async def test_requests_the_api_would_refuse(fake):
    for bad, says in [
            ({"generation_config": {}}, 'Unknown name "generation_config"'),
            ({"generationConfig": {"maxTokens": 5}}, "generationConfig"),
            ({"tools": [{"functionDeclarations": [{"name": "f", "parameters": {
                "type": "object", "additionalProperties": False, "const": 1}}]}]}, "tools"),
            ({"contents": []}, "contents is not specified"),
            ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "role"),
            ({"contents": [{"role": "user", "parts": []}]}, "must not be empty"),
            ({"contents": [{"role": "user", "parts": [{"inlineData": {
                "mimeType": "image/png", "data": "not base64!"}}]}]}, "contents")]:
        status, raw = await generate(fake, "gemini-x", **bad)
        assert status == 400, bad
        error = errors.APIError(400, json.loads(raw))
        assert error.status == "INVALID_ARGUMENT"
        assert says in (error.message or ""), (bad, error.message)


async def test_key_header_is_required_and_bearer_tokens_refused(fake):
    base, _, session = fake
    url = f"{base}/v1beta/models/gemini-x:generateContent"
    async with aiohttp.ClientSession() as bare:
        async with bare.post(url, json={"contents": CONTENTS}) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["status"] == "PERMISSION_DENIED"
        async with bare.get(f"{base}/v1beta/models") as resp:
            assert resp.status == 403
    async with session.post(url, json={"contents": CONTENTS},
                            headers={"Authorization": "Bearer x"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["status"] == "UNAUTHENTICATED"
    async with session.get(f"{base}/v1beta/models") as resp:
        assert resp.status == 200


async def test_sdk_lists_the_fakes_models(sdk):
    listed = [model async for model in await sdk.aio.models.list()]
    assert [(m.name, m.supported_actions) for m in listed] == [
        ("models/gemini-fake", ["generateContent", "countTokens"])]
