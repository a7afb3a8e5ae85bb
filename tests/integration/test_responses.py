"""The OpenAI Responses API through the router, with the official openai SDK as the client:
answers and streams, the stored response's endpoints, response ids that always reach the
backend that made them (one router, two routers on one real Redis), other principals' ids,
limits and metrics, Azure's paths, and routes that cannot serve it."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
import orjson
import pytest
from redis.asyncio import Redis

from tests.conftest import (
    KEY,
    OTHER_KEY,
    anthropic_provider,
    eventually,
    openai_provider,
    router_config,
)

LIMITED_KEY = "sk-limited-0123456789abcdef0123456789"
RPM_KEY = "sk-rpm3-0123456789abcdef0123456789abcd"
TPM_KEY = "sk-tpm-0123456789abcdef0123456789abcdef"
TEXT = "tok0 tok1 tok2 tok3 tok4 "  # what the fake writes (five words)


def config(a: Any, b: Any, claude: Any, store: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    """Route `rr` (round robin over fakes a and b: the narrow key's one route), `az` (Azure
    over fake a, deployment `dep`) and `claude` (Anthropic: chat only)."""
    cfg = router_config(
        {"a": openai_provider(a, probe=False), "b": openai_provider(b, probe=False),
         "az": {"type": "azure", "base_url": a.base_url.removesuffix("/v1"),
                "api_version": "2025-03-01-preview", "api_key": "az-key", "probe": False},
         "claude": anthropic_provider(claude, probe=False)},
        {"rr": {"strategy": "round_robin",
                "backends": [{"provider": "a", "model": "gpt-x"},
                             {"provider": "b", "model": "gpt-x"}]},
         "az": {"backends": [{"provider": "az", "model": "dep"}]},
         "claude": {"backends": [{"provider": "claude", "model": "claude-x"}]}},
        **({"store": store} if store is not None else {}))
    cfg["auth"]["api_keys"].append(
        {"id": "limited", "user": "carol", "limits": {"tpm": 100_000},
         "key_sha256": hashlib.sha256(LIMITED_KEY.encode()).hexdigest()})
    return cfg


@pytest.fixture
async def ups(fakes, claude_fakes) -> tuple[Any, Any, Any]:
    return await fakes("a"), await fakes("b"), await claude_fakes("claude")


@pytest.fixture
async def router(ups, start_router) -> Any:
    return await start_router(config(*ups))


def sdk(router: Any, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0,
                              timeout=20)


@pytest.fixture
async def client(router) -> AsyncIterator[openai.AsyncOpenAI]:
    c = sdk(router)
    yield c
    await c.close()


def made_by(response_id: str) -> str:
    """The fake that made a response (its ids are `resp_{fake}_{n}`)."""
    return response_id.split("_")[1]


async def test_a_response_json_and_streamed(router, client, ups):
    a, b, _ = ups
    raw = await client.responses.with_raw_response.create(model="rr", input="Say hello",
                                                          max_output_tokens=50)
    answer = raw.parse()
    assert answer.output_text == TEXT
    assert answer.usage is not None and answer.usage.output_tokens == 5
    backend = raw.headers["x-router-backend"]
    assert backend == f"{made_by(answer.id)}/gpt-x"
    sent = (a.seen + b.seen)[0]
    assert sent.path == "/v1/responses" and sent.body["model"] == "gpt-x"
    assert sent.body["input"] == "Say hello" and sent.body["max_output_tokens"] == 50

    stream = await client.responses.create(model="rr", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Say hello"}]}],
        stream=True)
    events = [event async for event in stream]
    assert [e.type for e in events][:2] == ["response.created", "response.in_progress"]
    assert events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == TEXT
    streamed = (a.seen + b.seen)[-1]
    assert streamed.body["stream"] is True
    assert "stream_options" not in streamed.body  # a Responses stream ends with its usage

    # The events as the fake wrote them: no [DONE], and no error event added at the end.
    async with router.http.post(f"{router.url}/api/v1/responses", json={
            "model": "rr", "input": "hi", "stream": True},
            headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 200
        raw_stream = await resp.read()
    events = raw_stream.split(b"\n\n")
    assert events[0].startswith(b"event: response.created\ndata: {")
    assert events[-2].startswith(b"event: response.completed\n") and events[-1] == b""
    assert b"[DONE]" not in raw_stream and b"event: error" not in raw_stream


async def test_the_stored_response_endpoints_reach_its_backend(router, client, ups):
    a, b, _ = ups
    made = [await client.responses.create(model="rr", input="hi") for _ in range(2)]
    assert {made_by(r.id) for r in made} == {"a", "b"}  # round robin: one on each
    for response in made:
        fake = a if made_by(response.id) == "a" else b
        before = len(fake.seen)
        got = await client.responses.retrieve(response.id)
        assert got.id == response.id and got.output_text == TEXT
        items = await client.responses.input_items.list(response.id, limit=5, order="asc")
        assert [item.content[0].text for item in items.data] == ["hi"]  # type: ignore[union-attr]
        cancelled = await client.responses.cancel(response.id)
        assert cancelled.status == "cancelled"
        paths = [s.path.partition("?")[0] for s in fake.seen[before:]]
        assert paths == [f"/v1/responses/{response.id}",
                         f"/v1/responses/{response.id}/input_items",
                         f"/v1/responses/{response.id}/cancel"]
        assert "limit=5" in fake.seen[before + 1].path
        assert "order=asc" in fake.seen[before + 1].path
    gone = made[0]
    await client.responses.delete(gone.id)
    with pytest.raises(openai.NotFoundError) as info:  # the pin went with it: no upstream call
        await client.responses.retrieve(gone.id)
    assert info.value.code == "response_not_found"  # type: ignore[attr-defined]


async def test_previous_response_id_stays_on_the_first_turns_backend(router, client, ups):
    a, b, _ = ups
    first = await client.responses.create(model="rr", input="turn 1")
    home = made_by(first.id)
    previous = first.id
    for turn in (2, 3):
        raw = await client.responses.with_raw_response.create(
            model="rr", input=f"turn {turn}", previous_response_id=previous)
        answer = raw.parse()
        assert raw.headers["x-router-backend"] == f"{home}/gpt-x"
        assert made_by(answer.id) == home
        previous = answer.id
    # A streamed turn follows the pin too, and its own id is pinned from its first event.
    stream = await client.responses.create(model="rr", input="turn 4", stream=True,
                                           previous_response_id=previous)
    events = [e async for e in stream]  # the whole stream, then its first event
    created = events[0]
    assert created.type == "response.created" and made_by(created.response.id) == home
    fifth = await client.responses.create(model="rr", input="turn 5",
                                          previous_response_id=created.response.id)
    assert made_by(fifth.id) == home
    other = b if home == "a" else a
    assert all("previous_response_id" not in s.body for s in other.seen)


async def test_an_unknown_previous_response_is_404_without_an_upstream_call(router, client,
                                                                            ups):
    a, b, _ = ups
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(model="rr", input="hi",
                                      previous_response_id="resp_nowhere")
    assert info.value.code == "response_not_found"  # type: ignore[attr-defined]
    for method in ("GET", "DELETE"):
        async with router.http.request(method, f"{router.url}/v1/responses/bad%20id",
                                       headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "response_not_found"
    assert a.seen == [] and b.seen == []


async def test_another_principals_response_is_absent(router, client, ups):
    a, b, _ = ups
    mine = await client.responses.create(model="rr", input="hi")
    before = len(a.seen) + len(b.seen)
    other = sdk(router, OTHER_KEY)
    try:
        with pytest.raises(openai.NotFoundError):
            await other.responses.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.input_items.list(mine.id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.delete(mine.id)
        with pytest.raises(openai.NotFoundError) as info:
            await other.responses.create(model="rr", input="hi", previous_response_id=mine.id)
        assert info.value.code == "response_not_found"  # type: ignore[attr-defined]
    finally:
        await other.close()
    assert len(a.seen) + len(b.seen) == before
    assert (await client.responses.retrieve(mine.id)).id == mine.id  # still the owner's


async def test_two_routers_on_one_redis_agree_on_where_a_response_lives(
        ups, start_router, redis_server):
    cfg = config(*ups, store={"url": redis_server.url, "timeout_ms": 500})
    replicas = [await start_router(cfg), await start_router(cfg)]
    clients = [sdk(r) for r in replicas]
    try:
        first = await clients[0].responses.create(model="rr", input="turn 1")
        home = made_by(first.id)
        previous = first.id
        for turn in range(2, 6):  # alternate replicas; each one's round robin moves on
            answer = await clients[turn % 2].responses.create(
                model="rr", input=f"turn {turn}", previous_response_id=previous)
            assert made_by(answer.id) == home
            previous = answer.id
        stream = await clients[0].responses.create(model="rr", input="s", stream=True)
        events = [e async for e in stream]
        created = events[0].response  # type: ignore[union-attr]
        got = await clients[1].responses.retrieve(created.id)
        assert got.id == created.id
    finally:
        for c in clients:
            await c.close()


async def test_limits_see_the_usage_and_metrics_count_the_endpoint(router, ups):
    limited = sdk(router, LIMITED_KEY)
    try:
        raw = await limited.responses.with_raw_response.create(
            model="rr", input="x" * 400, max_output_tokens=1000)
        # Charged up front: the input's estimate and max_output_tokens.
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 100_000 - 100 - 1000
        used = raw.parse().usage
        assert used is not None
        # Settled on the real usage: the next request sees what the first really used (the
        # bucket refills 1,667 tokens a second meanwhile; unsettled, 994 more would be gone).
        raw = await limited.responses.with_raw_response.create(
            model="rr", input="x" * 400, max_output_tokens=1000)
        settled = 100_000 - used.total_tokens - 1100
        assert settled <= int(raw.headers["x-ratelimit-remaining-tokens"]) < settled + 500
    finally:
        await limited.close()

    async def counted() -> bool:
        async with router.http.get(f"{router.url}/metrics") as resp:
            lines = (await resp.text()).splitlines()
        requests = any(line.startswith("router_requests_total") and 'route="rr"' in line
                       for line in lines)
        tokens = [line for line in lines if line.startswith("router_tokens_total")
                  and 'route="rr"' in line and 'kind="completion"' in line]
        return requests and sum(float(line.split()[-1]) for line in tokens) == 10
    await eventually(counted, 5, "the responses in router_requests_total and tokens")


async def test_streamed_usage_is_counted(router, client):
    stream = await client.responses.create(model="rr", input="hi", stream=True)
    assert [e async for e in stream][-1].type == "response.completed"

    async def counted() -> bool:
        registry = router.worker.metrics.registry
        total = sum(registry.get_sample_value(
            "router_tokens_total", {"route": "rr", "backend": f"{f}/gpt-x",
                                    "kind": "completion"}) or 0.0 for f in ("a", "b"))
        return total == 5
    await eventually(counted, 5, "the stream's completion tokens")


async def test_azure_responses_paths(router, client, ups):
    a, _, _ = ups
    made = await client.responses.create(model="az", input="hi")
    await client.responses.retrieve(made.id)
    await client.responses.input_items.list(made.id, limit=3)
    paths = [s.path for s in a.seen]
    assert paths[0] == "/openai/responses?api-version=2025-03-01-preview"
    assert a.seen[0].body["model"] == "dep"
    assert paths[1] == f"/openai/responses/{made.id}?api-version=2025-03-01-preview"
    assert paths[2] == (f"/openai/responses/{made.id}/input_items"
                        "?api-version=2025-03-01-preview&limit=3")
    assert all({k.lower(): v for k, v in s.headers.items()}["api-key"] == "az-key"
               for s in a.seen)


async def test_a_route_that_cannot_serve_responses_is_a_400(router, client, ups):
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="claude", input="hi")
    assert info.value.code == "unsupported_endpoint"  # type: ignore[attr-defined]
    assert "does not serve responses" in info.value.message
    assert ups[2].seen == []


async def test_bad_bodies_are_422(router, client):
    with pytest.raises(openai.UnprocessableEntityError):
        await client.responses.create(model="rr", input="hi", max_output_tokens=0)
    with pytest.raises(openai.UnprocessableEntityError) as info:
        await client.responses.create(model="rr", input="hi",
                                      previous_response_id="not a safe id")
    assert info.value.param == "previous_response_id"  # type: ignore[attr-defined]


async def test_calls_on_a_stored_response_are_admitted_like_any_request(ups, start_router):
    """One request each against `rpm` (no tokens), refused with the limit's 429 before the
    upstream is asked."""
    cfg = config(*ups)
    cfg["auth"]["api_keys"].append(
        {"id": "rpm3", "user": "dave", "limits": {"rpm": 3},
         "key_sha256": hashlib.sha256(RPM_KEY.encode()).hexdigest()})
    router = await start_router(cfg)
    c = sdk(router, RPM_KEY)
    try:
        made = await c.responses.with_raw_response.create(model="rr", input="hi")
        assert made.headers["x-ratelimit-remaining-requests"] == "2"
        response_id = made.parse().id
        got = await c.responses.with_raw_response.retrieve(response_id)
        assert got.headers["x-ratelimit-remaining-requests"] == "1"
        items = await c.responses.input_items.with_raw_response.list(response_id)
        assert items.headers["x-ratelimit-remaining-requests"] == "0"
        fake = ups[0] if made_by(response_id) == "a" else ups[1]
        before = len(fake.seen)
        with pytest.raises(openai.RateLimitError) as info:
            await c.responses.retrieve(response_id)
        assert info.value.code == "rpm"  # type: ignore[attr-defined]
        assert len(fake.seen) == before
    finally:
        await c.close()

    async def counted() -> bool:
        async with router.http.get(f"{router.url}/metrics") as resp:
            text = await resp.text()
        return ('router_endpoint_requests_total{endpoint="responses",route="rr",status="200"} '
                '3.0') in text
    await eventually(counted, 5, "the calls in router_endpoint_requests_total")


async def test_calls_on_a_stored_response_use_no_tokens(ups, start_router):
    """A token limit spent by the responses themselves does not refuse reading them; an
    error answer carries the rate-limit headers too."""
    cfg = config(*ups)
    cfg["auth"]["api_keys"].append(
        {"id": "tpm", "user": "erin", "limits": {"tpm": 200, "rpm": 100},
         "key_sha256": hashlib.sha256(TPM_KEY.encode()).hexdigest()})
    router = await start_router(cfg)
    c = sdk(router, TPM_KEY)
    try:
        # More than the whole budget: admitted on an empty bucket, charged whole.
        made = await c.responses.create(model="rr", input="x" * 400, max_output_tokens=1000)
        with pytest.raises(openai.RateLimitError) as refused:
            await c.responses.create(model="rr", input="hi")
        assert refused.value.code == "tpm"  # type: ignore[attr-defined]
        got = await c.responses.with_raw_response.retrieve(made.id)
        assert got.parse().id == made.id
        assert got.headers["x-ratelimit-remaining-requests"] == "98"  # (a refusal costs none)
        assert "x-ratelimit-limit-tokens" not in got.headers  # held to rpm only
        with pytest.raises(openai.NotFoundError) as missing:
            await c.responses.retrieve("resp_nowhere")
        assert missing.value.response.headers["x-ratelimit-remaining-requests"] == "97"
    finally:
        await c.close()


@pytest.mark.parametrize("key", [KEY, LIMITED_KEY], ids=["no-limits", "limited"])
async def test_a_response_pin_lives_ttl_from_its_last_use(ups, start_router, redis_server,
                                                          key):
    """Reading a response or continuing it slides its pin's TTL in the store (without limits
    in the call that reads it; with limits after the admission that read it)."""
    router = await start_router(config(*ups, store={"url": redis_server.url}) | {
        "sessions": {"ttl_s": 100}})
    c = sdk(router, key)
    # The user's own session TTL is for sessions: a response's pin keeps sessions.ttl_s.
    async with router.http.put(f"{router.url}/api/v1/automation/settings",
                               json={"session_ttl_s": 60},
                               headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
    try:
        async with Redis.from_url(redis_server.url) as redis:
            first = await c.responses.create(model="rr", input="turn 1")
            [pin_key] = [k async for k in redis.scan_iter(f"router:sess:*resp/{first.id}")]

            async def slid() -> bool:
                return await redis.pttl(pin_key) > 99_000
            assert await slid()
            await asyncio.sleep(1.2)
            assert not await slid()
            await c.responses.retrieve(first.id)
            await eventually(slid, 5, "the pin's TTL slid by a retrieve")
            await asyncio.sleep(1.2)
            second = await c.responses.create(model="rr", input="turn 2",
                                              previous_response_id=first.id)
            await eventually(slid, 5, "the pin's TTL slid by a continuation")
            assert made_by(second.id) == made_by(first.id)
    finally:
        await c.close()


async def test_a_streamed_response_is_found_on_another_replica_at_its_first_event(
        ups, start_router, redis_server):
    """The id is pinned before the client reads it: another replica finds it while the
    stream is still going, even when the first replica's store answers slowly (its commands
    pass through a proxy that holds each for 0.3 s)."""
    slow_redis = await delaying_proxy(redis_server.port, 0.3)
    cfg = config(*ups, store={"url": redis_server.url, "timeout_ms": 2000})
    cfg["routes"]["slow"] = {"backends": [{"provider": "a", "model": "chunks:6+gap:0.3"}]}
    one = await start_router(cfg | {"store": {"url": f"redis://127.0.0.1:{slow_redis.port}",
                                              "timeout_ms": 2000}})
    two = await start_router(cfg)
    other = sdk(two)
    try:
        async with one.http.post(f"{one.url}/v1/responses", json={
                "model": "slow", "input": "hi", "stream": True},
                headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 200
            first = b""
            while b"\n\n" not in first:
                first += await resp.content.readany()
            data = first.split(b"data: ", 1)[1].split(b"\n", 1)[0]
            response_id = orjson.loads(data)["response"]["id"]
            got = await other.responses.retrieve(response_id)
            assert got.id == response_id
            assert not resp.content.at_eof()  # the stream had not ended
            await resp.read()
    finally:
        await other.close()
        slow_redis.close()


@dataclass
class DelayingProxy:
    port: int
    server: asyncio.Server

    def close(self) -> None:
        self.server.close()


async def delaying_proxy(port: int, delay_s: float) -> DelayingProxy:
    """A TCP proxy to 127.0.0.1:`port` that holds what its clients send for `delay_s`."""
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   delay: float) -> None:
        try:
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, up_writer, delay_s), pipe(up_reader, writer, 0))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return DelayingProxy(server.sockets[0].getsockname()[1], server)


async def test_a_read_of_a_stored_response_is_retried_on_its_backend(router, client, ups):
    """A GET that lost its connection is asked again of the same backend (the route's
    `retries`); a DELETE that may have reached it is not."""
    made = await client.responses.create(model="rr", input="hi")
    fake = ups[0] if made_by(made.id) == "a" else ups[1]
    before = len(fake.seen)
    fake.recorder.drop_stored = 2
    got = await client.responses.retrieve(made.id)
    assert got.id == made.id
    assert [s.path for s in fake.seen[before:]] == [f"/v1/responses/{made.id}"] * 3
    fake.recorder.drop_stored = 1
    with pytest.raises(openai.InternalServerError) as info:
        await client.responses.delete(made.id)
    assert info.value.status_code == 502
    assert len(fake.seen) == before + 4
    await client.responses.delete(made.id)  # the pin was kept: the retry by hand works

    async def counted() -> bool:
        registry = router.worker.metrics.registry
        return registry.get_sample_value(
            "router_retries_total", {"route": "rr", "reason": "bad_gateway"}) == 2
    await eventually(counted, 5, "the two retries in router_retries_total")


async def test_failed_calls_on_a_stored_response_count_towards_ejection(ups, start_router):
    cfg = config(*ups)
    cfg["routes"]["rr"]["ejection"] = {"consecutive_failures": 3}
    router = await start_router(cfg)
    c = sdk(router)
    try:
        made = await c.responses.create(model="rr", input="hi")
        fake = ups[0] if made_by(made.id) == "a" else ups[1]
        fake.recorder.drop_stored = 3  # the first try and both retries
        with pytest.raises(openai.InternalServerError):
            await c.responses.retrieve(made.id)
    finally:
        await c.close()
    registry = router.worker.metrics.registry
    assert registry.get_sample_value("router_backend_ejections_total", {
        "backend": f"{made_by(made.id)}/gpt-x", "reason": "bad_gateway"}) == 1
