"""Three `router serve` processes sharing one Redis: a limit is a limit across replicas."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from redis.asyncio import Redis

from router.store.redis import limit_keys
from tests.conftest import KEY, USER_MSG, openai_provider, router_config


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
        deadline = time.monotonic() + 5
        while await redis.zcard(limit_keys("test")[2]) != 0:
            assert time.monotonic() < deadline, "slots did not come back"
            await asyncio.sleep(0.05)
