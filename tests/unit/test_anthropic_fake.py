"""The fake Anthropic upstream speaks the Messages API as the official SDK reads it: its JSON
answers, stream events and error bodies parse with the SDK's own types, and the SDK itself,
pointed at the fake, gets what it would get from Anthropic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from multidict import CIMultiDict
from pydantic import TypeAdapter

from tests.fakes.anthropic_upstream import Recorder, start_fake

HEADERS = {"x-api-key": "sk-ant-fake", "anthropic-version": "2023-06-01"}
EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)
TOOLS = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[str, Recorder]]:
    runner, base, rec = await start_fake()
    yield base, rec
    await runner.cleanup()


def request(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 100,
            "messages": [{"role": "user", "content": "hello there"}], **extra}


async def post(base: str, body: dict[str, Any]) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as http, \
            http.post(f"{base}/v1/messages", json=body, headers=HEADERS) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], orjson.loads(lines["data"])))
    return out


@pytest.mark.parametrize("model", ["claude-x", "chunks:2", "thinking+preamble", "cache:7",
                                   "reason:refusal", "answer-model:claude-y"])
@pytest.mark.parametrize("tools", [False, True])
async def test_json_answers_parse_as_sdk_messages(fake, model, tools):
    base, _ = fake
    status, _, raw = await post(base, request(model, **({"tools": TOOLS} if tools else {})))
    assert status == 200
    message = Message.model_validate(orjson.loads(raw))
    assert message.role == "assistant" and message.id.startswith("msg_fake_")
    assert any(block.type == ("tool_use" if tools else "text") for block in message.content)


@pytest.mark.parametrize("model", ["claude-x", "chunks:3+ping+crlf", "thinking+preamble",
                                   "whole-input", "tools:2", "cache:7+split:5"])
async def test_stream_events_parse_as_sdk_events(fake, model):
    base, _ = fake
    status, headers, raw = await post(base, request(model, stream=True, tools=TOOLS))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    parsed = events(raw)
    names = [name for name, _ in parsed]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    for name, data in parsed:
        assert data["type"] == name
        if name != "ping":
            EVENTS.validate_python(data)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 500, 529])
async def test_error_bodies_parse_as_sdk_errors(fake, status):
    base, _ = fake
    got, headers, raw = await post(base, request(f"status:{status}+retry-after:3"))
    assert got == status and headers["retry-after"] == "3"
    ErrorResponse.model_validate(orjson.loads(raw))


async def test_error_event_parses_as_an_sdk_error(fake):
    base, _ = fake
    _, _, raw = await post(base, request("error-mid:1", stream=True))
    name, data = events(raw)[-1]
    assert name == "error"
    ErrorResponse.model_validate(data)


async def test_the_sdk_against_the_fake(fake):
    base, rec = fake
    async with anthropic.AsyncAnthropic(base_url=base, api_key="sk-ant-fake",
                                        max_retries=0) as client:
        message = await client.messages.create(
            model="chunks:3", max_tokens=50, system="be brief",
            messages=[{"role": "user", "content": "hello there"}])
        assert message.content[0].type == "text"
        assert message.content[0].text == "tok0 tok1 tok2 "
        assert message.stop_reason == "end_turn"
        assert message.usage.output_tokens == 3
        async with client.messages.stream(
                model="thinking+preamble+ping", max_tokens=50, tools=TOOLS,  # type: ignore[arg-type]
                messages=[{"role": "user", "content": "weather?"}]) as stream:
            final = await stream.get_final_message()
        kinds = [block.type for block in final.content]
        assert kinds == ["thinking", "text", "tool_use"]
        assert final.content[2].type == "tool_use" and final.content[2].input == {"x": 1}
        assert final.stop_reason == "tool_use"
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(model="status:429", max_tokens=5,
                                         messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.APIStatusError) as info:
            await client.messages.create(model="status:529", max_tokens=5,
                                         messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 529
        with pytest.raises(anthropic.APIStatusError):
            async with client.messages.stream(
                    model="error-mid:1", max_tokens=50,
                    messages=[{"role": "user", "content": "hi"}]) as stream:
                await stream.get_final_message()
        page = await client.models.list()
        assert [m.id for m in page.data] == ["claude-fake"]
    headers = {k.lower(): v for k, v in rec.seen[0].headers.items()}
    assert "sk-ant-fake" in (headers.get("x-api-key"), headers.get("authorization", "")[7:])
    assert headers["anthropic-version"]


async def test_the_fake_requires_the_key_version_and_max_tokens(fake):
    base, _ = fake
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/messages", json=request("x"),
                             headers={"anthropic-version": "2023-06-01"}) as resp:
            assert resp.status == 401
        async with http.post(f"{base}/v1/messages", json=request("x"),
                             headers={"x-api-key": "k"}) as resp:
            assert resp.status == 400
    body = request("x")
    del body["max_tokens"]
    assert (await post(base, body))[0] == 400
