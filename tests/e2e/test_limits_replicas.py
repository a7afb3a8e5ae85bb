"""Three `router serve` processes sharing one Redis: a limit is a limit across replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from router.store.redis import limit_keys
from tests.conftest import KEY, USER_MSG, eventually, openai_provider, router_config
from tests.e2e.test_limits_crash import open_stream
from tests.fakes.openai_upstream import RECORDER, Recorder, build_app


def config(fake: Any, redis_url: str, limits: dict[str, int]) -> dict[str, Any]:
    cfg = router_config({"up": openai_provider(fake)},
                        {"m": {"backends": [{"provider": "up", "model": "gpt-x"}]},
                         "slow": {"backends": [{"provider": "up",
                                                "model": "chunks:20+gap:0.1"}]}},
                        store={"url": redis_url, "timeout_ms": 500})
    cfg["auth"]["api_keys"][0]["limits"] = limits
    return cfg


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    async with http.post(url + "/api/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as resp:
        await resp.read()
        return resp.status


async def test_rpm_exact_across_three_replicas(fakes, router_process, redis_server):
    up = await fakes()
    cfg = config(up, redis_server.url, {"rpm": 20})
    routers = await asyncio.gather(*(router_process(cfg) for _ in range(3)))
    body = {"model": "m", "messages": USER_MSG}
    async with aiohttp.ClientSession() as http:
        statuses = await asyncio.gather(*(post(http, routers[i % 3].url, body)
                                          for i in range(60)))
    assert statuses.count(200) == 20 and statuses.count(429) == 40
    assert len(up.seen) == 20
    async with Redis.from_url(redis_server.url) as redis:
        sec, usec = await redis.time()
        ahead = float(await redis.get(limit_keys("test")[0])) - (sec * 1000 + usec / 1000)
    assert 50_000 < ahead <= 60_000  # 20 charges of 3 s: the arrival time a minute ahead


async def test_concurrency_exact_across_three_replicas(fakes, router_process, redis_server):
    up = await fakes()
    cfg = config(up, redis_server.url, {"concurrency": 2})
    routers = await asyncio.gather(*(router_process(cfg) for _ in range(3)))
    body = {"model": "slow", "messages": USER_MSG, "stream": True}
    async with aiohttp.ClientSession() as http:
        statuses = await asyncio.gather(*(post(http, routers[i % 3].url, body)
                                          for i in range(9)))
    assert statuses.count(200) == 2 and statuses.count(429) == 7
    assert up.recorder.max_inflight == 2
    async with Redis.from_url(redis_server.url) as redis:

        async def empty() -> bool:
            return await redis.zcard(limit_keys("test")[2]) == 0

        await eventually(empty, 5, "the slots to come back", every_s=0.05)


@dataclass
class GatedFake:
    """The fake upstream behind a gate: chat requests are counted as they arrive and held
    until `gate` is set (so no admitted request settles while the others are decided)."""

    base_url: str
    recorder: Recorder
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: int = 0


@pytest.fixture
async def gated_fake() -> AsyncIterator[GatedFake]:
    app = build_app("gated")
    gated = GatedFake("", Recorder())

    @web.middleware
    async def hold(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.endswith("/chat/completions"):
            gated.arrived += 1
            await gated.gate.wait()
        return await handler(request)

    app.middlewares.append(hold)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    gated.base_url = f"http://{host}:{port}/v1"
    gated.recorder = app[RECORDER]
    try:
        yield gated
    finally:
        gated.gate.set()
        await runner.cleanup()


async def redis_time_ms(redis: Redis) -> float:
    sec, usec = await redis.time()
    return sec * 1000 + usec / 1000


async def tat_of(redis: Redis, key: str) -> float:
    value = await redis.get(key)
    assert value is not None, f"{key} is not in Redis"
    return float(value)


# tpm 300: 200 ms of budget per token. A request is charged 60 tokens up front (40 characters
# / 4 + max_tokens 50), 12 s of budget, so a fresh key admits exactly 5 at once and refills one
# per 12 s. The fake reports 36 tokens used (prompt 40 / 4 + 1, completion: 25 chunks), so
# each answer refunds 24; without that usage the router would charge the estimate (the bytes
# relayed / 4 exceed max_tokens), and the state below would not move.
TPM = 300
MS_PER_TOKEN = 60_000 / TPM
CONTENT = "x" * 40
MAX_TOKENS = 50
ESTIMATE = 40 // 4 + MAX_TOKENS  # 60
USED = 40 // 4 + 1 + 25  # 36


async def test_tpm_exact_across_three_replicas(gated_fake, router_process, redis_server):
    up = gated_fake
    cfg = router_config({"up": openai_provider(up)},
                        {"m": {"backends": [{"provider": "up", "model": "chunks:25"}]}},
                        store={"url": redis_server.url, "timeout_ms": 500})
    cfg["auth"]["api_keys"][0]["limits"] = {"tpm": TPM}
    routers = await asyncio.gather(*(router_process(cfg) for _ in range(3)))
    tpm_key = limit_keys("test")[1]

    def body(i: int) -> dict[str, Any]:  # JSON and streamed answers alike
        return {"model": "m", "messages": [{"role": "user", "content": CONTENT}],
                "max_tokens": MAX_TOKENS, "stream": i % 2 == 1}

    async def burst(http: aiohttp.ClientSession, n: int, admitted: int) -> list[asyncio.Task]:
        """Fire n at once across the replicas; return once every one is decided: the admitted
        wait at the gate, the refused have their 429."""
        before = up.arrived
        tasks = [asyncio.create_task(post(http, routers[i % 3].url, body(i))) for i in range(n)]
        await eventually(lambda: up.arrived - before + sum(t.done() for t in tasks) >= n, 15.0,
                         f"{n} admission decisions")
        done = [t.result() for t in tasks if t.done()]
        assert up.arrived - before == admitted and done == [429] * (n - admitted), \
            (up.arrived - before, done)
        return tasks

    async with aiohttp.ClientSession() as http, Redis.from_url(redis_server.url) as redis:
        start = await redis_time_ms(redis)
        first = await burst(http, 20, admitted=5)
        decided = await redis_time_ms(redis)
        # The up-front charges: 5 x 60 tokens, one whole minute past the first admission.
        charged = await tat_of(redis, tpm_key)
        assert start + 60_000 - 1 <= charged <= decided + 60_000 + 1
        up.gate.set()
        statuses = await asyncio.gather(*first)
        assert statuses.count(200) == 5 and statuses.count(429) == 15

        async def reconciled(expected: float) -> bool:
            return abs(await tat_of(redis, tpm_key) - expected) < 0.01

        # Each answer gives back what it did not use: 5 x 24 tokens.
        refunded = charged - 5 * (ESTIMATE - USED) * MS_PER_TOKEN
        await eventually(lambda: reconciled(refunded), 10.0, "the refunds of the usage")

        # What is left is 60 s - 5 x 36 x 200 ms = 24 s of budget (+ what refilled since, less
        # than 12 s worth): exactly 2 more of 60 tokens, whichever replica they reach.
        up.gate.clear()
        second = await burst(http, 10, admitted=2)
        assert await redis_time_ms(redis) - start < 12_000, "too slow for the refill margin"
        up.gate.set()
        statuses = await asyncio.gather(*second)
        assert statuses.count(200) == 2 and statuses.count(429) == 8
        # Afterwards the state is what the 7 answers really used: 7 x 36 tokens x 200 ms past
        # the first admission.
        final = refunded + 2 * USED * MS_PER_TOKEN
        await eventually(lambda: reconciled(final), 10.0, "the second burst's refunds")
        assert start + 7 * USED * MS_PER_TOKEN - 1 <= final \
            <= decided + 7 * USED * MS_PER_TOKEN + 1
    assert len(up.recorder.seen) == 7
    streamed = [s.body for s in up.recorder.seen if s.body.get("stream")]
    assert streamed and all(b["stream_options"]["include_usage"] for b in streamed)


async def test_concurrency_slots_come_back_after_client_disconnect(fakes, router_process,
                                                                   redis_server):
    up = await fakes()
    cfg = config(up, redis_server.url, {"concurrency": 2})
    # 200 chunks 50 ms apart: 10 s, far longer than the wait for the slots below.
    cfg["routes"]["long"] = {"backends": [{"provider": "up", "model": "chunks:200+gap:0.05"}]}
    routers = await asyncio.gather(*(router_process(cfg) for _ in range(3)))
    conc_key = limit_keys("test")[2]
    async with aiohttp.ClientSession() as http, Redis.from_url(redis_server.url) as redis:
        opened = [await open_stream(http, routers[i].url, "long") for i in (0, 1)]
        assert [r.status for r in opened] == [200, 200]
        assert await redis.zcard(conc_key) == 2
        assert (await open_stream(http, routers[2].url, "long")).status == 429
        hung_up = time.monotonic()
        for resp in opened:
            resp.close()  # the client goes away mid-stream

        async def empty() -> bool:
            return await redis.zcard(conc_key) == 0

        await eventually(empty, 5.0, "the slots of the streams whose clients left")
        assert time.monotonic() - hung_up < 5.0  # long before the streams' own end
        # The upstream streams were cut too, not read to their end.
        await eventually(lambda: all(s.t_disconnected is not None for s in up.seen), 5.0,
                         "the upstream streams to be closed")
        assert len(up.seen) == 2 and all(s.t_finished is None for s in up.seen)
        # Both slots are free for any replica: two new streams get in, a third does not.
        again = [await open_stream(http, routers[i].url, "long") for i in (2, 0)]
        assert [r.status for r in again] == [200, 200]
        assert (await open_stream(http, routers[1].url, "long")).status == 429
        for resp in again:
            resp.close()
        await eventually(empty, 5.0, "the slots to come back again")
