"""The fake OpenAI upstream used by integration tests and the benchmark behaves as promised."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.fakes.openai_upstream import Recorder, start_fake

MESSAGES = [{"role": "user", "content": "hello there, fake"}]  # 17 chars -> 17 // 4 + 1 = 5


@pytest.fixture
async def fake() -> AsyncIterator[tuple[str, Recorder, aiohttp.ClientSession]]:
    runner, base, rec = await start_fake("up1")
    async with aiohttp.ClientSession() as session:
        yield base, rec, session
    await runner.cleanup()


Fake = tuple[str, Recorder, aiohttp.ClientSession]


async def read_sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """Events of a stream: parsed JSON objects, or the raw string when not JSON."""
    events: list[Any] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        try:
            events.append(json.loads(data))
        except json.JSONDecodeError:
            events.append(data)
    return events


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


async def test_json_answer_shape_usage_and_recorder(fake: Fake) -> None:
    base, rec, session = fake
    headers = {"Authorization": "Bearer sk-test"}
    async with session.post(f"{base}/chat/completions", json=chat("gpt-x"), headers=headers) as r:
        assert r.status == 200
        body = await r.json()
    assert body["id"] == "chatcmpl-fake-1"
    assert body["object"] == "chat.completion"
    assert body["created"] == 1700000000
    assert body["model"] == "gpt-x"
    assert "system_fingerprint" not in body
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4 "},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    [seen] = rec.seen
    assert seen.body == chat("gpt-x")
    assert seen.headers["Authorization"] == "Bearer sk-test"
    assert seen.t_finished is not None and seen.t_disconnected is None
    assert rec.inflight == 0 and rec.max_inflight == 1


@pytest.mark.parametrize("include_usage", [False, True])
async def test_stream_ends_with_done_and_usage_only_when_asked(
    fake: Fake, include_usage: bool
) -> None:
    base, _, session = fake
    req = chat("chunks:3", stream=True, stream_options={"include_usage": include_usage})
    async with session.post(f"{base}/chat/completions", json=req) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:4]]
    assert content == ["tok0 ", "tok1 ", "tok2 "]
    assert chunks[4]["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "stop",
        "logprobs": None,
    }
    if include_usage:
        assert len(chunks) == 6
        assert chunks[5]["choices"] == []
        assert chunks[5]["usage"] == {
            "prompt_tokens": 5,
            "completion_tokens": 3,
            "total_tokens": 8,
        }
    else:
        assert len(chunks) == 5
        assert not any("usage" in c for c in chunks)


async def test_status_with_retry_after(fake: Fake) -> None:
    base, _, session = fake
    req = chat("status:503+retry-after:7", stream=True)
    async with session.post(f"{base}/chat/completions", json=req) as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "7"
        body = await r.json()
    assert body == {"error": {"message": "fake failure 503", "type": "server_error", "code": None}}


async def test_cut_stream_tears_connection_after_n_chunks(fake: Fake) -> None:
    base, rec, session = fake
    contents: list[str] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(f"{base}/chat/completions", json=chat("cut:3", stream=True)) as r:
            assert r.status == 200
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    if delta.get("content"):
                        contents.append(delta["content"])
    assert contents == ["tok0 ", "tok1 ", "tok2 "]
    assert rec.inflight == 0


async def test_cut_json_tears_body(fake: Fake) -> None:
    base, _, session = fake
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(f"{base}/chat/completions", json=chat("cut:1")) as r:
            assert r.status == 200
            await r.read()


async def test_control_override_and_models(fake: Fake) -> None:
    base, rec, session = fake
    async with session.get(f"{base}/models") as r:
        assert r.status == 200
        assert (await r.json())["data"][0] == {
            "id": "fake-model",
            "object": "model",
            "created": 0,
            "owned_by": "up1",
        }
    control = base.removesuffix("/v1") + "/_control"
    async with session.post(control, json={"behaviour": "status:429+models-500"}) as r:
        assert r.status == 200
        assert await r.json() == {}
    async with session.post(f"{base}/chat/completions", json=chat("gpt-x")) as r:
        assert r.status == 429
    async with session.get(f"{base}/models") as r:
        assert r.status == 500
    async with session.post(control, json={"behaviour": None}) as r:
        assert r.status == 200
    async with session.post(f"{base}/chat/completions", json=chat("gpt-x")) as r:
        assert r.status == 200
    assert rec.override is None


async def test_tool_calls_json_and_stream(fake: Fake) -> None:
    base, _, session = fake
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    async with session.post(f"{base}/chat/completions", json=chat("ok", tools=tools)) as r:
        body = await r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"x": 1}'},
        }
    ]
    req = chat("tools", tools=tools, stream=True)
    async with session.post(f"{base}/chat/completions", json=req) as r:
        events = await read_sse(r)
    first = events[0]["choices"][0]["delta"]["tool_calls"][0]
    assert first["id"] == "call_1" and first["function"] == {"name": "lookup", "arguments": ""}
    args = "".join(
        e["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for e in events[1:-2]
    )
    assert json.loads(args) == {"x": 1}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    none = chat("ok", tools=tools, tool_choice="none")
    async with session.post(f"{base}/chat/completions", json=none) as r:
        assert (await r.json())["choices"][0]["finish_reason"] == "stop"


async def test_n_choices_and_echo_auth(fake: Fake) -> None:
    base, _, session = fake
    headers = {"Authorization": "Bearer sk-secret"}
    req = chat("echo-auth+chunks:2", n=2)
    async with session.post(f"{base}/chat/completions", json=req, headers=headers) as r:
        body = await r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][1]["message"]["content"] == "auth=Bearer sk-secret tok0 tok1 "
    async with session.post(f"{base}/chat/completions", json={**req, "stream": True}) as r:
        events = await read_sse(r)
    assert {e["choices"][0]["index"] for e in events[:-1]} == {0, 1}


async def test_malformed_stream_ends_cleanly(fake: Fake) -> None:
    base, _, session = fake
    async with session.post(f"{base}/chat/completions", json=chat("malformed", stream=True)) as r:
        assert await read_sse(r) == ["{not json}"]


async def test_gap_and_first_byte_timing(fake: Fake) -> None:
    base, _, session = fake
    req = chat("first-byte:0.2+chunks:3+gap:0.1", stream=True)
    t0 = time.monotonic()
    async with session.post(f"{base}/chat/completions", json=req) as r:
        assert time.monotonic() - t0 >= 0.2
        await read_sse(r)
    assert time.monotonic() - t0 >= 0.5


async def test_hang_records_client_disconnect(fake: Fake) -> None:
    base, rec, session = fake
    timeout = aiohttp.ClientTimeout(total=0.2)
    with pytest.raises(asyncio.TimeoutError):
        await session.post(f"{base}/chat/completions", json=chat("hang"), timeout=timeout)
    for _ in range(100):
        if rec.seen[0].t_disconnected is not None:
            break
        await asyncio.sleep(0.01)
    assert rec.seen[0].t_disconnected is not None
    assert rec.seen[0].t_finished is None
    assert rec.inflight == 0
