"""Streams through the router: bytes as the upstream sent them, paced as sent, ended once."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.providers.sse import error_event
from tests.conftest import USER_MSG, eventually, openai_provider, router_config, sse_events

DONE = b"data: [DONE]\n\n"


async def _single(fakes, start_router, model: str, **route: Any):
    """A router whose route `m` has one backend: a fake upstream serving `model`."""
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up, probe=False)},
        {"m": {"backends": [{"provider": "up", "model": model}], **route}}))
    return up, r


async def _read_raw(resp: aiohttp.ClientResponse) -> bytes:
    return b"".join([chunk async for chunk in resp.content.iter_any()])


async def _direct(fake, body: dict[str, Any]) -> bytes:
    """The bytes a fake sends when called directly, up to where it tears the connection."""
    parts: list[bytes] = []
    async with aiohttp.ClientSession() as http, \
            http.post(f"{fake.base_url}/chat/completions", json=body) as resp:
        try:
            async for chunk in resp.content.iter_any():
                parts.append(chunk)
        except aiohttp.ClientPayloadError:
            pass
    return b"".join(parts)


# -- 1. passthrough --------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"n": 2}, {"stream_options": {"include_usage": True}}])
async def test_stream_bytes_identical_to_upstream(fakes, start_router, extra):
    model = "chunks:12"
    _, r = await _single(fakes, start_router, model)
    twin = await fakes("twin")  # a fresh fake: same id counter as `up` had
    body = {"model": "m", "messages": USER_MSG, "stream": True, **extra}
    async with r.chat(body, headers={"x-request-id": "stream-1"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["x-router-backend"] == f"up/{model}"
        assert resp.headers["x-request-id"] == "stream-1"
        got = await _read_raw(resp)
    want = await _direct(twin, {**body, "model": model})
    assert got == want
    assert got.endswith(DONE)
    assert got.count(DONE) == 1


# -- 2. what picks streaming -----------------------------------------------------------------

@pytest.mark.parametrize(("stream", "accept", "sse"), [
    (True, None, True),
    (True, "application/json", True),
    ("absent", "text/event-stream", True),
    (None, "text/event-stream", True),
    ("absent", "application/json;q=0.9, text/event-stream", True),
    ("absent", "application/json, text/event-stream;q=0.5", False),
    ("absent", "application/json, text/event-stream", False),
    ("absent", None, False),
    (False, "text/event-stream", False),
])
async def test_stream_or_json_is_chosen_by_body_then_accept(fakes, start_router, stream, accept,
                                                            sse):
    up, r = await _single(fakes, start_router, "gpt-x")
    body: dict[str, Any] = {"model": "m", "messages": USER_MSG}
    if stream != "absent":
        body["stream"] = stream
    headers = {"Accept": accept} if accept else {}
    async with r.chat(body, headers=headers) as resp:
        assert resp.status == 200
        raw = await _read_raw(resp)
        content_type = resp.headers["Content-Type"]
    assert up.seen[0].body["stream"] is sse
    if sse:
        assert content_type.startswith("text/event-stream")
        assert raw.startswith(b"data: {") and raw.endswith(DONE)
    else:
        assert content_type.startswith("application/json")
        assert json.loads(raw)["object"] == "chat.completion"


# -- 3. pacing -------------------------------------------------------------------------------

async def test_chunks_reach_the_client_as_the_upstream_sends_them(fakes, start_router):
    _, r = await _single(fakes, start_router, "chunks:5+gap:0.2")
    arrivals: list[tuple[float, bytes]] = []
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            arrivals.append((time.monotonic(), chunk))
    raw = b"".join(c for _, c in arrivals)
    assert raw.endswith(DONE)
    first_at = next(t for t, c in arrivals if b"tok0" in c)
    last_at = next(t for t, c in arrivals if b"tok4" in c)
    # The upstream spaces tokens 0.2 s apart: 0.8 s between the first and the last.
    assert last_at - first_at >= 0.6
    assert len({round(t, 2) for t, _ in arrivals}) >= 4  # several deliveries, not one burst


# -- 4. client disconnect --------------------------------------------------------------------

async def test_client_leaving_mid_stream_closes_upstream_and_frees_slot(fakes, start_router):
    model = "chunks:50+gap:0.2"
    up, r = await _single(fakes, start_router, model)
    state = r.worker.states[f"up/{model}"]
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
        assert resp.status == 200
        got = b""
        while b"tok0" not in got:
            got += await resp.content.readany()
        assert state.inflight == 1
        resp.close()  # drop the connection
        left = time.monotonic()
    await eventually(lambda: up.seen[0].t_disconnected is not None, 3.0)
    assert up.seen[0].t_disconnected - left < 1.0
    assert up.seen[0].t_finished is None
    await eventually(lambda: state.inflight == 0, 1.0)


@pytest.mark.parametrize("stream", [True, False])
async def test_client_leaving_before_first_byte_closes_upstream_and_frees_slot(fakes,
                                                                              start_router,
                                                                              stream):
    model = "first-byte:5"
    up, r = await _single(fakes, start_router, model)
    state = r.worker.states[f"up/{model}"]

    async def call() -> None:
        async with r.chat({"model": "m", "messages": USER_MSG, "stream": stream}) as resp:
            await resp.read()

    task = asyncio.ensure_future(call())
    await eventually(lambda: len(up.seen) == 1 and state.inflight == 1, 3.0)
    task.cancel()  # the client gives up while the upstream is still thinking
    left = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: up.seen[0].t_disconnected is not None, 3.0)
    assert up.seen[0].t_disconnected - left < 1.0
    await eventually(lambda: state.inflight == 0, 1.0)
    assert up.seen[0].t_finished is None


# -- 5. upstream dies mid-stream -------------------------------------------------------------

async def test_upstream_cut_mid_stream_ends_with_one_error_event(fakes, start_router):
    model = "chunks:10+cut:3"
    _, r = await _single(fakes, start_router, model)
    twin = await fakes("twin")
    body = {"model": "m", "messages": USER_MSG, "stream": True}
    async with r.chat(body) as resp:
        assert resp.status == 200
        got = await _read_raw(resp)  # a ClientPayloadError here would fail the test
    sent = await _direct(twin, {**body, "model": model})
    assert b"tok2" in sent and b"tok3" not in sent
    assert got.startswith(sent)
    tail = got[len(sent):]
    events = sse_events(tail)
    assert len(events) == 1
    name, data = events[0]
    assert name == "error"
    error = json.loads(data)["error"]
    assert error["message"] and error["type"] and "code" in error
    assert tail == error_event(error["message"], error["type"], error["code"])
    assert DONE not in got
    await eventually(lambda: r.worker.states[f"up/{model}"].inflight == 0, 1.0)


async def test_router_still_serves_after_a_cut_stream(fakes, start_router):
    _, r = await _single(fakes, start_router, "cut:1")
    for _ in range(3):
        async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
            assert resp.status == 200
            got = await _read_raw(resp)
        assert sse_events(got)[-1][0] == "error"


# An upstream scripted byte by byte, for splits and tears the fake upstream does not make.

async def _scripted(pieces: list[bytes], *, tear: bool):
    """A loopback upstream that writes `pieces` one by one (each its own write), then either ends
    the response or tears the connection down."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in pieces:
            await resp.write(piece)
            await asyncio.sleep(0.002)  # separate TCP segments, so the router sees the splits
        if tear:
            assert request.transport is not None
            request.transport.abort()
        else:
            await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}/v1"


def _stream_bytes() -> bytes:
    events = [{"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": text}, "finish_reason": None}]}
        for text in ("Grüße ", "日本語 ", "🙂 emoji", "")]
    return b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n"
                    for e in events) + DONE


@pytest.mark.parametrize("size", [1, 3, 7])
async def test_stream_relayed_identically_under_any_split(start_router, size):
    whole = _stream_bytes()
    pieces = [whole[i:i + size] for i in range(0, len(whole), size)]
    runner, base = await _scripted(pieces, tear=False)
    try:
        r = await start_router(router_config(
            {"up": {"type": "openai", "base_url": base, "probe": False}},
            {"m": {"backends": [{"provider": "up", "model": "x"}]}}))
        async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
            assert resp.status == 200
            got = await _read_raw(resp)
    finally:
        await runner.cleanup()
    assert got == whole


async def test_upstream_torn_inside_an_event_drops_the_partial_event(start_router):
    whole = _stream_bytes()
    torn = whole[: whole.index(b"\n\n", 20) + 2] + b'data: {"id": "c1", "obj'
    runner, base = await _scripted([torn[:40], torn[40:]], tear=True)
    try:
        r = await start_router(router_config(
            {"up": {"type": "openai", "base_url": base, "probe": False}},
            {"m": {"backends": [{"provider": "up", "model": "x"}]}}))
        async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
            assert resp.status == 200
            got = await _read_raw(resp)
    finally:
        await runner.cleanup()
    complete = torn[: torn.rindex(b"\n\n") + 2]
    assert got.startswith(complete)
    rest = got[len(complete):]
    # The half event never reaches the client: it would be broken JSON to every SSE parser.
    assert rest.startswith(b"event: error\n")
    assert sse_events(rest)[-1][0] == "error"
    assert len([e for e in sse_events(got) if e[0] == "error"]) == 1
    assert DONE not in got


# -- 6. malformed upstream -------------------------------------------------------------------

async def test_stream_ending_without_done_gets_one_error_event(fakes, start_router):
    _, r = await _single(fakes, start_router, "malformed")
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
        assert resp.status == 200
        got = await _read_raw(resp)
    # Relayed as is (the router does not parse the stream), then exactly one terminator.
    assert got.startswith(b"data: {not json}\n\n")
    assert DONE not in got
    events = sse_events(got)
    assert [e[0] for e in events].count("error") == 1
    assert events[-1][0] == "error"


async def test_malformed_json_answer_is_502(fakes, start_router):
    _, r = await _single(fakes, start_router, "malformed")
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["type"] == "upstream_error"
    assert "not json" not in body["error"]["message"]


# -- 7. tools --------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"x": {}}}}}]


def _tool_router_config(up) -> dict[str, Any]:
    return router_config(
        {"up": openai_provider(up, probe=False), "mock": {"type": "mock", "chunks": 3}},
        {"fake": {"backends": [{"provider": "up", "model": "gpt-x"}]},
         "mock": {"backends": [{"provider": "mock", "model": "mock-1"}]}})


def _join_tool_deltas(raw: bytes) -> tuple[list[dict[str, Any]], str | None]:
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for name, data in sse_events(raw):
        assert name is None
        if data == "[DONE]":
            continue
        for choice in json.loads(data)["choices"]:
            finish = choice["finish_reason"] or finish
            for tc in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.get("id") or call["id"]
                fn = tc.get("function") or {}
                call["name"] += fn.get("name") or ""
                call["arguments"] += fn.get("arguments") or ""
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("route", ["fake", "mock"])
async def test_tool_call_streamed(fakes, start_router, route):
    up = await fakes("up")
    r = await start_router(_tool_router_config(up))
    body = {"model": route, "messages": USER_MSG, "stream": True, "tools": TOOLS}
    async with r.chat(body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await _read_raw(resp)
    assert raw.endswith(DONE)
    calls, finish = _join_tool_deltas(raw)
    assert finish == "tool_calls"
    assert len(calls) == 1
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    json.loads(calls[0]["arguments"])


@pytest.mark.parametrize("route", ["fake", "mock"])
async def test_tool_call_not_streamed(fakes, start_router, route):
    up = await fakes("up")
    r = await start_router(_tool_router_config(up))
    body = {"model": route, "messages": USER_MSG, "stream": False, "tools": TOOLS,
            "tool_choice": "auto"}
    async with r.chat(body) as resp:
        assert resp.status == 200
        answer = await resp.json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather"
    json.loads(call["function"]["arguments"])
    if route == "fake":
        assert up.seen[0].body["tools"] == TOOLS
