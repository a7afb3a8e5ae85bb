"""Per-principal limits against a real redis-server: exact counts under concurrency, token
reconciliation, concurrency leases, headers, honest Retry-After, and a Redis that dies."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from router.config.model import Limits
from router.limits import duration
from router.store import MemoryStore
from router.store.redis import limit_keys
from tests.conftest import USER_MSG, eventually, openai_provider, router_config
from tests.redis_server import RedisServer, start_redis


def limited(fake: Any, key_limits: dict[str, int], store: dict[str, Any] | None = None,
            **extra: Any) -> dict[str, Any]:
    config = router_config({"up": openai_provider(fake)},
                           {"m": {"backends": [{"provider": "up", "model": "gpt-x"}]},
                            "slow": {"backends": [{"provider": "up",
                                                   "model": "chunks:20+gap:0.1"}]}},
                           store=store or {"url": "memory://"}, **extra)
    config["auth"]["api_keys"][0]["limits"] = key_limits
    return config


def redis_store(server: RedisServer, **extra: Any) -> dict[str, Any]:
    return {"url": server.url, "timeout_ms": 200, **extra}


async def status_of(r: Any, body: dict[str, Any]) -> tuple[int, Any]:
    async with r.chat(body) as resp:
        return resp.status, resp


def metric(r: Any, name: str, **labels: str) -> float:
    value = r.worker.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def redis_time_ms(redis: Redis) -> float:
    sec, usec = await redis.time()
    return sec * 1000 + usec / 1000


async def test_rpm_exact_under_concurrency(fakes, start_router, redis_server):
    up = await fakes()
    r = await start_router(limited(up, {"rpm": 20}, redis_store(redis_server)))
    body = {"model": "m", "messages": USER_MSG}

    async def one() -> tuple[int, dict[str, str], Any]:
        async with r.chat(body) as resp:
            return resp.status, dict(resp.headers), await resp.json()

    results = await asyncio.gather(*(one() for _ in range(60)))
    statuses = sorted(s for s, _, _ in results)
    assert statuses.count(200) == 20 and statuses.count(429) == 40
    assert len(up.seen) == 20
    for status, headers, payload in results:
        assert headers["x-ratelimit-limit-requests"] == "20"
        if status == 429:
            assert payload["error"]["type"] == "rate_limit_exceeded"
            assert payload["error"]["code"] == "rpm"
            assert int(headers["Retry-After"]) >= 1
            assert headers["x-ratelimit-remaining-requests"] == "0"
    assert metric(r, "router_rate_limited_total", limit="rpm") == 40
    # Redis agrees: 20 requests of 3 s each put the arrival time one whole minute ahead.
    async with Redis.from_url(redis_server.url) as redis:
        tat = float(await redis.get(limit_keys("test")[0]))
        ahead = tat - await redis_time_ms(redis)
        assert 55_000 < ahead <= 60_000


async def test_headers_on_json_and_stream(fakes, start_router, redis_server):
    up = await fakes()
    r = await start_router(limited(up, {"rpm": 5, "tpm": 1000}, redis_store(redis_server)))
    async with r.chat({"model": "m", "messages": USER_MSG, "max_tokens": 100}) as resp:
        assert resp.status == 200
        h = resp.headers
        assert h["x-ratelimit-limit-requests"] == "5"
        assert h["x-ratelimit-remaining-requests"] == "4"
        assert h["x-ratelimit-reset-requests"] == "12s"
        assert h["x-ratelimit-limit-tokens"] == "1000"
        # "hello there": 11 chars -> 2 tokens, + max_tokens 100 = 102 charged up front.
        assert h["x-ratelimit-remaining-tokens"] == "898"
        assert h["x-ratelimit-reset-tokens"] == "6.12s"
        assert h["RateLimit-Policy"] == '"rpm";q=5;w=60, "tpm";q=1000;w=60'
        assert h["RateLimit"] == '"rpm";r=4;t=12, "tpm";r=898;t=7'
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True,
                       "max_tokens": 100}) as resp:
        assert resp.status == 200
        assert resp.headers["x-ratelimit-remaining-requests"] == "3"
        assert re.fullmatch(r"24s|23\.9\d*s", resp.headers["x-ratelimit-reset-requests"])
        assert "RateLimit" in resp.headers
        await resp.read()
    # An error after admission carries them too (an upstream failure: 502).
    up.recorder.override = "status:500"
    async with r.chat({"model": "m", "messages": USER_MSG, "max_tokens": 100}) as resp:
        assert resp.status == 502
        assert resp.headers["x-ratelimit-remaining-requests"] == "2"
    up.recorder.override = None


def test_duration_format():
    assert duration(17) == "17ms"
    assert duration(1000) == "1s"
    assert duration(1500) == "1.5s"
    assert duration(360_000) == "6m0s"
    assert duration(3_723_000) == "1h2m3s"


async def test_retry_after_is_honest(fakes, start_router, redis_server):
    up = await fakes()
    r = await start_router(limited(up, {"rpm": 60}, redis_store(redis_server)))
    body = {"model": "m", "messages": USER_MSG}
    results = await asyncio.gather(*(status_of(r, body) for _ in range(60)))
    assert all(s == 200 for s, _ in results)
    async with r.chat(body) as resp:
        assert resp.status == 429
        retry = int(resp.headers["Retry-After"])
    assert retry == 1
    await asyncio.sleep(retry)
    async with r.chat(body) as resp:
        assert resp.status == 200


async def test_tokens_reconciled_with_usage(fakes, start_router, redis_server):
    up = await fakes()
    r = await start_router(limited(up, {"tpm": 600, "tokens_per_day": 100_000},
                                   redis_store(redis_server)))
    rpm_key, tpm_key, _, day_key = limit_keys("test")
    async with Redis.from_url(redis_server.url) as redis:
        before = await redis_time_ms(redis)
        for i in range(10):
            # The fake reports 3 prompt + 5 completion tokens; 2 + 20 are charged up front.
            async with r.chat({"model": "m", "messages": USER_MSG, "max_tokens": 20,
                               "stream": i % 2 == 1}) as resp:
                assert resp.status == 200
                await resp.read()

        async def settled() -> bool:
            return await redis.get(day_key) == b"80"

        await eventually(settled)
        # tpm: 80 tokens at 100 ms each put the arrival time 8 s past the first admission.
        tat = float(await redis.get(tpm_key))
        assert 8000 <= tat - before < 8300
        assert await redis.exists(rpm_key) == 0


async def test_tokens_per_day_budget(fakes, start_router, redis_server):
    up = await fakes()
    r = await start_router(limited(up, {"tokens_per_day": 50}, redis_store(redis_server)))
    day_key = limit_keys("test")[3]
    body = {"model": "m", "messages": USER_MSG, "max_tokens": 20}
    async with Redis.from_url(redis_server.url) as redis:
        for used in (8, 16, 24, 32):  # 22 charged up front, 8 used: fits while used <= 28
            async with r.chat(body) as resp:
                assert resp.status == 200
                assert '"tpd";q=50;w=86400' in resp.headers["RateLimit-Policy"]

            async def settled(used: int = used) -> bool:
                return await redis.get(day_key) == str(used).encode()

            await eventually(settled)
        async with r.chat(body) as resp:
            assert resp.status == 429
            assert (await resp.json())["error"]["code"] == "tokens_per_day"
            to_midnight = 86400 - time.time() % 86400
            assert abs(int(resp.headers["Retry-After"]) - to_midnight) < 5
        assert 0 < await redis.pttl(day_key) <= 86_400_000
    assert len(up.seen) == 4


async def test_concurrency_slots(fakes, start_router, redis_server):
    up = await fakes()
    r = await start_router(limited(up, {"concurrency": 2}, redis_store(redis_server)))
    conc_key = limit_keys("test")[2]
    slow = {"model": "slow", "messages": USER_MSG, "stream": True}

    async def stream() -> int:
        async with r.chat(slow) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(stream() for _ in range(6)))
    assert sorted(statuses) == [200, 200, 429, 429, 429, 429]
    assert up.recorder.max_inflight == 2
    async with Redis.from_url(redis_server.url) as redis:
        async def free() -> bool:
            return await redis.zcard(conc_key) == 0

        await eventually(free)
        # A client that leaves mid-stream gives its slot back.
        async with r.chat(slow) as resp:
            assert resp.status == 200
            await resp.content.readline()
            assert await redis.zcard(conc_key) == 1
            resp.close()
        await eventually(free)
        statuses = await asyncio.gather(*(stream() for _ in range(2)))
        assert statuses == [200, 200]


async def test_memory_store_same_semantics(fakes, start_router):
    up = await fakes()
    r = await start_router(limited(up, {"rpm": 3}))
    statuses = [(await status_of(r, {"model": "m", "messages": USER_MSG}))[0] for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]


async def test_no_limits_no_headers(fakes, start_router):
    up = await fakes()
    r = await start_router(limited(up, {}))
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 200
        assert not any(k.lower().startswith(("x-ratelimit", "ratelimit")) for k in resp.headers)


async def test_memory_store_gcra_window_edge():
    now = [1_000_000.0]
    store = MemoryStore(clock=lambda: now[0])
    lim = Limits(rpm=10)
    admitted = [(await store.admit("p", lim, 1, "", 60)).allowed for _ in range(11)]
    assert admitted == [True] * 10 + [False]
    refused = await store.admit("p", lim, 1, "", 60)
    assert refused.retry_after_ms == 6000 and refused.requests_remaining == 0
    now[0] += 5.999
    assert not (await store.admit("p", lim, 1, "", 60)).allowed
    now[0] += 0.001
    assert (await store.admit("p", lim, 1, "", 60)).allowed
    # Worst case in one window: the burst, then one per interval: limit + burst.
    now[0] += 60
    count = 0
    for _ in range(600):
        count += (await store.admit("p", lim, 1, "", 60)).allowed
        now[0] += 0.1
    assert count <= 10 + 10 and count >= 10


@pytest.mark.parametrize("on_failure", ["open", "closed"])
async def test_redis_killed_and_back(fakes, start_router, redis_server, on_failure, tmp_path):
    up = await fakes()
    r = await start_router(limited(up, {"rpm": 1000},
                                   redis_store(redis_server, on_failure=on_failure)))
    body = {"model": "m", "messages": USER_MSG}
    assert (await status_of(r, body))[0] == 200
    os.kill(redis_server.proc.pid, signal.SIGKILL)
    redis_server.proc.wait()
    for _ in range(5):
        started = time.monotonic()
        async with r.chat(body) as resp:
            if on_failure == "open":
                assert resp.status == 200
            else:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                assert (await resp.json())["error"]["code"] == "store_unavailable"
        assert time.monotonic() - started < 0.2 + 0.5
    assert metric(r, "router_store_errors_total", op="admit") == 5
    async with r.http.get(r.url + "/readyz") as resp:
        assert resp.status == (200 if on_failure == "open" else 503)
    back = start_redis(redis_server.workdir, port=redis_server.port)
    try:
        async with r.chat(body) as resp:
            assert resp.status == 200
        async with r.http.get(r.url + "/readyz") as resp:
            assert resp.status == 200
        assert metric(r, "router_store_errors_total", op="admit") == 5
    finally:
        back.stop()


async def test_store_timeout_bounds_latency(fakes, start_router, redis_server):
    """A hung Redis (SIGSTOP): every decision within the store timeout + margin."""
    up = await fakes()
    r = await start_router(limited(up, {"rpm": 1000}, redis_store(redis_server)))
    body = {"model": "m", "messages": USER_MSG}
    assert (await status_of(r, body))[0] == 200
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        statuses = await asyncio.gather(*(status_of(r, body) for _ in range(10)))
        assert all(s == 200 for s, _ in statuses)
        assert time.monotonic() - started < 0.2 + 0.5
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)



async def test_script_reloaded_after_flush(fakes, start_router, redis_server):
    up = await fakes()
    r = await start_router(limited(up, {"rpm": 3}, redis_store(redis_server)))
    body = {"model": "m", "messages": USER_MSG}
    assert (await status_of(r, body))[0] == 200
    async with Redis.from_url(redis_server.url) as redis:
        await redis.script_flush()
    assert [(await status_of(r, body))[0] for _ in range(3)] == [200, 200, 429]


async def test_long_request_keeps_its_lease(fakes, start_router, redis_server):
    """A stream longer than the lease TTL keeps its slot: the worker refreshes live leases."""
    up = await fakes()
    r = await start_router(limited(up, {"concurrency": 1}, redis_store(redis_server),
                                   limits={"lease_ttl_s": 1}))
    slow = {"model": "slow", "messages": USER_MSG, "stream": True}
    async with r.chat(slow) as resp:
        assert resp.status == 200
        await resp.content.readline()
        await asyncio.sleep(1.4)
        assert (await status_of(r, slow))[0] == 429
        await resp.read()
    async with Redis.from_url(redis_server.url) as redis:
        async def free() -> bool:
            return await redis.zcard(limit_keys("test")[2]) == 0

        await eventually(free)


@pytest.mark.parametrize("value", [10**30, 2**64, 2**31])
async def test_a_huge_max_completion_tokens_is_charged_not_a_store_failure(
        fakes, start_router, redis_server, value):
    """A passthrough field the validator does not bound: its charge is capped like
    max_tokens (a charge above the whole tpm goes when the budget is full), so the store
    never chokes on the number."""
    up = await fakes()
    r = await start_router(limited(up, {"tpm": 1000, "tokens_per_day": 10**12},
                                   redis_store(redis_server, on_failure="closed")))
    async with r.chat({"model": "m", "messages": USER_MSG,
                       "max_completion_tokens": value}) as resp:
        assert resp.status == 200, await resp.text()
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 429  # the budget went to the first one, not a 503
        assert (await resp.json())["error"]["code"] == "tpm"
