"""A replica dies holding concurrency slots (RELIABILITY "Limits"): two `router serve` processes
on one Redis, concurrency 5, a short lease; SIGKILL the replica holding 3 of the 5 streams.

The upstream never serves more than 5 at once, the dead replica's slots come back within the
lease TTL (its leases are no longer refreshed), new streams are then admitted on the survivor,
and the concurrency ZSET is empty once every stream has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import aiohttp
from redis.asyncio import Redis

from router.store.redis import limit_keys
from tests.conftest import KEY, USER_MSG, eventually, openai_provider, router_config

LEASE_TTL_S = 2.0  # LimitsConfig.lease_ttl_s: at least 1
STREAM = "chunks:80+gap:0.1"  # 8 s per stream
SHORT = "chunks:10+gap:0.1"  # 1 s


def config(fake: Any, redis_url: str) -> dict[str, Any]:
    cfg = router_config({"up": openai_provider(fake)},
                        {"long": {"backends": [{"provider": "up", "model": STREAM}]},
                         "short": {"backends": [{"provider": "up", "model": SHORT}]}},
                        store={"url": redis_url, "timeout_ms": 500},
                        limits={"lease_ttl_s": LEASE_TTL_S})
    cfg["auth"]["api_keys"][0]["limits"] = {"concurrency": 5}
    return cfg


async def open_stream(http: aiohttp.ClientSession, url: str, model: str
                      ) -> aiohttp.ClientResponse:
    """POST a streamed chat; a 200 is returned once its first line arrived (still open)."""
    resp = await http.post(url + "/api/v1/chat/completions",
                           json={"model": model, "messages": USER_MSG, "stream": True},
                           headers={"Authorization": f"Bearer {KEY}"})
    if resp.status == 200:
        await resp.content.readline()
    else:
        await resp.read()
    return resp


async def drain(resp: aiohttp.ClientResponse) -> None:
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        await resp.read()
    resp.release()


async def test_crashed_replica_slots_come_back(fakes, router_process, redis_server):
    up = await fakes()
    cfg = config(up, redis_server.url)
    a, b = await asyncio.gather(router_process(cfg), router_process(cfg))
    conc_key = limit_keys("test")[2]
    async with aiohttp.ClientSession() as http, Redis.from_url(redis_server.url) as redis:
        on_a = [await open_stream(http, a.url, "long") for _ in range(3)]
        on_b = [await open_stream(http, b.url, "long") for _ in range(2)]
        assert [s.status for s in on_a + on_b] == [200] * 5
        assert await redis.zcard(conc_key) == 5
        assert up.recorder.inflight == 5
        refused = await open_stream(http, b.url, "short")
        assert refused.status == 429
        # Past one lease TTL: the live leases are refreshed, the slots still held.
        await asyncio.sleep(LEASE_TTL_S * 1.2)
        assert (await open_stream(http, b.url, "short")).status == 429
        assert await redis.zcard(conc_key) == 5

        # SIGKILL replica A: its workers (if any) first, then it; only our own PIDs.
        doomed = [*a.children(), a.pid]
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await a.proc.wait()
        for resp in on_a:
            resp.close()

        # The survivor admits again once A's leases lapse: within the TTL (+ margin).
        admitted: list[aiohttp.ClientResponse] = []

        async def one_admitted() -> bool:
            resp = await open_stream(http, b.url, "short")
            if resp.status == 200:
                admitted.append(resp)
                return True
            assert resp.status == 429
            return False

        await eventually(one_admitted, LEASE_TTL_S + 2.0, "a slot freed by the dead replica",
                         every_s=0.1)
        waited = time.monotonic() - killed_at
        assert waited <= LEASE_TTL_S + 2.0
        # All three of A's slots are free: two more fit, the one after does not.
        for _ in range(2):
            await eventually(one_admitted, 2.0, "another freed slot", every_s=0.1)
        assert (await open_stream(http, b.url, "short")).status == 429
        assert up.recorder.max_inflight <= 5, up.recorder.max_inflight

        await asyncio.gather(*(drain(resp) for resp in admitted + on_b))

        async def empty() -> bool:
            return await redis.zcard(conc_key) == 0

        await eventually(empty, 5.0, "the concurrency ZSET to empty")
        assert up.recorder.max_inflight <= 5, up.recorder.max_inflight
