"""A stream's usage: always asked of the upstream, hidden unless the client asked, counted."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import router.stages
from router.routing.dispatch import Opened
from tests.conftest import (
    KEY,
    USER_MSG,
    eventually,
    openai_provider,
    router_config,
    sse_events,
)
from tests.integration.test_streaming import _direct, _read_raw, _scripted

DONE = b"data: [DONE]\n\n"
PROMPT = len(USER_MSG[0]["content"]) // 4 + 1  # what the fake and the mock report
LOGGING = {"level": "info", "format": "json", "access_log": True}


@pytest.fixture
def relayed(monkeypatch) -> list[Opened]:
    """Every `Opened` whose stream relay has ended, as the limiter sees it then."""
    ended: list[Opened] = []
    relay = router.stages.relay_stream

    async def spy(*args: Any, **kwargs: Any) -> Any:
        try:
            return await relay(*args, **kwargs)
        finally:
            ended.append(args[1])

    monkeypatch.setattr(router.stages, "relay_stream", spy)
    return ended


async def _router(fakes, start_router, model: str = "chunks:5"):
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up, probe=False), "mock": {"type": "mock", "chunks": 4}},
        {"m": {"backends": [{"provider": "up", "model": model}]},
         "mock": {"backends": [{"provider": "mock", "model": "mock-1"}]}},
        logging=LOGGING))
    return up, r


def _usage_only(raw: bytes) -> list[bytes]:
    """The usage-only events (`"choices": []`) of a body, as sent."""
    return [b"data: " + data.encode() + b"\n\n" for name, data in sse_events(raw)
            if data.startswith("{") and json.loads(data).get("choices") == []]


async def _tokens(r, route: str, backend: str) -> tuple[float, float]:
    async with r.http.get(f"{r.url}/metrics") as resp:
        text = await resp.text()
    found = {"prompt": 0.0, "completion": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "router_tokens_total" and s.labels.get("route") == route \
                    and s.labels.get("backend") == backend:
                found[s.labels["kind"]] = s.value
    return found["prompt"], found["completion"]


@pytest.mark.parametrize(("options", "upstream_options"), [
    (None, {"include_usage": True}),
    ({"include_usage": False}, {"include_usage": True}),
    ({"x_other": 1}, {"x_other": 1, "include_usage": True}),
])
async def test_usage_chunk_hidden_when_the_client_did_not_ask(fakes, start_router, relayed,
                                                              options, upstream_options):
    up, r = await _router(fakes, start_router)
    twin = await fakes("twin")  # a fresh fake: same id counter as `up` had
    body: dict[str, Any] = {"model": "m", "messages": USER_MSG, "stream": True}
    if options is not None:
        body["stream_options"] = options
    async with r.chat(body) as resp:
        assert resp.status == 200
        got = await _read_raw(resp)
    assert up.seen[0].body["stream_options"] == upstream_options
    sent = await _direct(twin, {**body, "model": "chunks:5", "stream_options": upstream_options})
    (usage_event,) = _usage_only(sent)
    assert got == sent.replace(usage_event, b"")  # every other byte as the upstream sent it
    assert got.endswith(DONE) and not _usage_only(got)
    await eventually(lambda: len(relayed) == 1, 3.0)
    assert relayed[0].tokens == (PROMPT, 5)
    assert relayed[0].bytes_relayed == len(got)


@pytest.mark.parametrize("options", [{"include_usage": True},
                                     {"include_usage": True, "x_other": 1}])
async def test_usage_chunk_relayed_unchanged_when_the_client_asked(fakes, start_router, relayed,
                                                                   options):
    up, r = await _router(fakes, start_router)
    twin = await fakes("twin")
    body = {"model": "m", "messages": USER_MSG, "stream": True, "stream_options": options}
    async with r.chat(body) as resp:
        got = await _read_raw(resp)
    assert up.seen[0].body["stream_options"] == options
    assert got == await _direct(twin, {**body, "model": "chunks:5"})
    assert len(_usage_only(got)) == 1
    await eventually(lambda: len(relayed) == 1, 3.0)
    assert relayed[0].tokens == (PROMPT, 5)
    assert relayed[0].bytes_relayed == len(got)


@pytest.mark.parametrize(("route", "backend", "completion"),
                         [("m", "up/chunks:5", 5), ("mock", "mock/mock-1", 4)])
@pytest.mark.parametrize("asked", [False, True])
async def test_stream_usage_reaches_the_access_log_and_metrics(fakes, start_router, route,
                                                               backend, completion, asked):
    _, r = await _router(fakes, start_router)
    access = r.access_log()
    body: dict[str, Any] = {"model": route, "messages": USER_MSG, "stream": True}
    if asked:
        body["stream_options"] = {"include_usage": True}
    for _ in range(2):
        async with r.chat(body) as resp:
            got = await _read_raw(resp)
        assert len(_usage_only(got)) == (1 if asked else 0)
    await eventually(lambda: len(access()) == 2, 3.0)
    for line in access():
        assert line["stream"] is True
        assert (line["prompt_tokens"], line["completion_tokens"]) == (PROMPT, completion)
    assert await _tokens(r, route, backend) == (2 * PROMPT, 2 * completion)


async def test_stream_cut_before_the_usage_chunk_has_no_tokens_but_bytes(fakes, start_router,
                                                                         relayed):
    _, r = await _router(fakes, start_router, "chunks:10+cut:3")
    access = r.access_log()
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
        got = await _read_raw(resp)
    assert sse_events(got)[-1][0] == "error"
    await eventually(lambda: len(relayed) == 1 and len(access()) == 1, 3.0)
    opened = relayed[0]
    assert opened.tokens is None
    # Every upstream byte that reached the client, not the router's own error event.
    assert 0 < opened.bytes_relayed == got.index(b"event: error")
    (line,) = access()
    assert line["prompt_tokens"] is None and line["completion_tokens"] is None
    assert await _tokens(r, "m", "up/chunks:10+cut:3") == (0, 0)


async def test_client_leaving_mid_stream_leaves_tokens_none_and_counts_bytes(fakes,
                                                                            start_router,
                                                                            relayed):
    _, r = await _router(fakes, start_router, "chunks:50+gap:0.1")
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
        got = b""
        while b"tok1" not in got:
            got += await resp.content.readany()
        resp.close()
    await eventually(lambda: len(relayed) == 1, 3.0)
    assert relayed[0].tokens is None
    assert relayed[0].bytes_relayed >= len(got) > 0


def _chunk(content: str | None, usage: Any = "absent", finish: str | None = None) -> bytes:
    event: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {} if content is None else {"content": content},
         "finish_reason": finish}]}
    if usage != "absent":
        event["usage"] = usage
    return b"data: " + json.dumps(event).encode() + b"\n\n"


@pytest.mark.parametrize("split", [None, 7])
async def test_usage_on_the_last_content_chunk_is_read_and_the_chunk_kept(start_router, relayed,
                                                                          split):
    # A server that sends `"usage": null` on every chunk and the usage on the finish chunk.
    usage = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
    whole = (_chunk("Hello", None) + _chunk(" usage", None)
             + _chunk(None, usage, "stop") + DONE)
    pieces = [whole] if split is None else [whole[i:i + split]
                                            for i in range(0, len(whole), split)]
    runner, base = await _scripted(pieces, tear=False)
    try:
        r = await start_router(router_config(
            {"up": {"type": "openai", "base_url": base, "probe": False}},
            {"m": {"backends": [{"provider": "up", "model": "x"}]}}))
        async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
            got = await _read_raw(resp)
    finally:
        await runner.cleanup()
    assert got == whole
    await eventually(lambda: len(relayed) == 1, 3.0)
    assert relayed[0].tokens == (11, 2)
    assert relayed[0].bytes_relayed == len(whole)


@pytest.mark.parametrize("route", ["m", "mock"])
async def test_sdk_sees_usage_on_the_last_chunk_only_when_it_asked(fakes, start_router, route):
    _, r = await _router(fakes, start_router)
    completion = 5 if route == "m" else 4
    async with openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key=KEY, max_retries=0,
                                  timeout=20) as client:
        stream = await client.chat.completions.create(
            model=route, messages=USER_MSG, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None and chunks[-1].choices == []
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
            (PROMPT, completion)
        assert all(c.usage is None for c in chunks[:-1])

        stream = await client.chat.completions.create(
            model=route, messages=USER_MSG, stream=True)  # type: ignore[arg-type]
        chunks = [chunk async for chunk in stream]
        assert chunks and all(c.choices for c in chunks)  # no usage-only chunk
        assert all(c.usage is None for c in chunks)
