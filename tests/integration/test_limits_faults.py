"""The limiter when Redis misbehaves (RELIABILITY "Limits"), against a real redis-server.

* Redis slowed by `DEBUG SLEEP 0.2` (sent from another connection) while requests run with a 50 ms
  store timeout: every request is decided within the timeout plus a margin, `open` serves and
  counts `router_store_errors_total{op="admit"}`, `closed` answers 503 with Retry-After, the
  event loop keeps ticking, and admissions go back to Redis once it answers again.
* The router's own 429 and an upstream's 429 differ in the error `type`.
* Every limiter key in Redis carries a TTL after a mixed run (nothing lives forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from router.store.redis import limit_keys
from tests.conftest import KEY, USER_MSG, eventually, openai_provider, router_config
from tests.redis_server import RedisServer, start_redis

STORE_TIMEOUT_MS = 50
DECISION_MARGIN_S = 0.45  # on top of the store timeout: a loaded 2-core box
SLEEPS = 4  # DEBUG SLEEP 0.2 back to back: Redis is unresponsive for about 0.8 s
TICK_S = 0.01
# Below one DEBUG SLEEP (0.2 s: what a blocking store call would stall), above what a busy
# 2-core box's scheduler costs (111 ms seen once with a CPU burner beside the suite).
MAX_TICK_GAP_S = 0.16


@pytest.fixture
def debug_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    # DEBUG is off by default since Redis 7.
    server = start_redis(tmp_path / "redis-debug", None, "--enable-debug-command", "yes")
    yield server
    server.stop()


def limited_config(fake: Any, key_limits: dict[str, int], store: dict[str, Any],
                   **extra: Any) -> dict[str, Any]:
    config = router_config(
        {"up": openai_provider(fake)},
        {"m": {"backends": [{"provider": "up", "model": "gpt-x"}]},
         "slow": {"backends": [{"provider": "up", "model": "chunks:20+gap:0.05"}]},
         "busy": {"backends": [{"provider": "up", "model": "status:429+retry-after:3"}],
                  "retries": 0},
         "broken": {"backends": [{"provider": "up", "model": "status:500"}], "retries": 0}},
        store=store, **extra)
    config["auth"]["api_keys"][0]["limits"] = key_limits
    return config


async def scrape(r: Any, name: str, **labels: str) -> float:
    """One sample from /metrics as Prometheus would read it (0 when absent)."""
    async with r.http.get(f"{r.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head == f"{name}{{{want}}}" or (not labels and head == name):
            return float(value)
    return 0.0


async def redis_tat(redis: Redis, key: str) -> float:
    value = await redis.get(key)
    return float(value) if value is not None else 0.0


@contextlib.asynccontextmanager
async def ticker() -> AsyncIterator[list[float]]:
    """A 10 ms ticker on this (the router's) event loop; yields [max gap between ticks]."""
    worst = [0.0]

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            worst[0] = max(worst[0], now - last - TICK_S)
            last = now

    task = asyncio.create_task(tick())
    try:
        yield worst
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("on_failure", ["open", "closed"])
async def test_slow_redis_bounded_decisions(fakes, start_router, debug_redis, on_failure):
    up = await fakes()
    store = {"url": debug_redis.url, "timeout_ms": STORE_TIMEOUT_MS, "on_failure": on_failure}
    r = await start_router(limited_config(up, {"rpm": 1000, "concurrency": 500}, store))
    rpm_key = limit_keys("test")[0]
    body = {"model": "m", "messages": USER_MSG}

    async def one() -> tuple[int, float, dict[str, str], Any]:
        started = time.monotonic()
        async with r.chat(body) as resp:
            payload = await resp.json()
            return resp.status, time.monotonic() - started, dict(resp.headers), payload

    status, _, _, _ = await one()  # the script is loaded, the pool warm
    assert status == 200
    errors_before = await scrape(r, "router_store_errors_total", op="admit")

    async with Redis.from_url(debug_redis.url) as sleeper, \
            Redis.from_url(debug_redis.url) as redis:
        tat_before = await redis_tat(redis, rpm_key)
        assert tat_before > 0

        async def slow_down() -> None:
            for _ in range(SLEEPS):
                await sleeper.execute_command("DEBUG", "SLEEP", "0.2")

        results: list[tuple[int, float, dict[str, str], Any]] = []
        async with ticker() as lag:
            sleeping = asyncio.create_task(slow_down())
            await asyncio.sleep(0.02)  # the first DEBUG SLEEP has reached Redis

            async def client() -> None:
                while not sleeping.done():
                    results.append(await one())

            await asyncio.gather(*(client() for _ in range(4)))
            await sleeping
        assert lag[0] < MAX_TICK_GAP_S, f"event loop stalled {lag[0] * 1000:.0f} ms"

        assert len(results) >= 4
        slowest = max(elapsed for _, elapsed, _, _ in results)
        assert slowest < STORE_TIMEOUT_MS / 1000 + DECISION_MARGIN_S, \
            f"a decision took {slowest * 1000:.0f} ms"
        statuses = [s for s, _, _, _ in results]
        if on_failure == "open":
            assert set(statuses) == {200}, statuses
        else:
            refused = [(h, p) for s, _, h, p in results if s == 503]
            assert refused, statuses
            assert set(statuses) <= {200, 503}
            for headers, payload in refused:
                assert int(headers["Retry-After"]) >= 1
                assert payload["error"]["code"] == "store_unavailable"
        errors_after = await scrape(r, "router_store_errors_total", op="admit")
        assert errors_after > errors_before
        if on_failure == "closed":
            assert errors_after - errors_before >= statuses.count(503)

        # Redis answers again: admissions are decided there (its counter moves), no more errors.
        assert await redis.ping()
        tat_mid = await redis_tat(redis, rpm_key)
        for _ in range(3):
            status, elapsed, headers, payload = await one()
            assert status == 200, payload
            assert elapsed < 1.0
        tat_after = await redis_tat(redis, rpm_key)
        assert tat_after >= max(tat_mid, tat_before) + 2 * 60.0  # 60 ms per request at rpm 1000
        assert await scrape(r, "router_store_errors_total", op="admit") == errors_after


async def test_router_429_and_upstream_429_are_distinguishable(fakes, start_router,
                                                                redis_server):
    up = await fakes()
    store = {"url": redis_server.url, "timeout_ms": 500}
    r = await start_router(limited_config(up, {"rpm": 2}, store))
    async with r.chat({"model": "busy", "messages": USER_MSG}) as resp:
        assert resp.status == 429
        upstream = (await resp.json())["error"]
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 200
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 429
        own = (await resp.json())["error"]
        assert int(resp.headers["Retry-After"]) >= 1
    assert upstream["type"] == "upstream_rate_limited"
    assert own["type"] == "rate_limit_exceeded"
    assert own["code"] == "rpm"
    assert upstream["type"] != own["type"]


async def test_every_limiter_key_expires(fakes, start_router, redis_server):
    """After JSON answers, streams, a client that leaves, an upstream failure and refusals,
    every `router:lim:*` key in Redis has a TTL; while a stream is open too."""
    up = await fakes()
    store = {"url": redis_server.url, "timeout_ms": 500}
    limits = {"rpm": 30, "tpm": 100_000, "concurrency": 3, "tokens_per_day": 1_000_000}
    r = await start_router(limited_config(up, limits, store, limits={"lease_ttl_s": 2}))

    async def run(model: str, stream: bool = False, max_tokens: int | None = None) -> int:
        body: dict[str, Any] = {"model": model, "messages": USER_MSG, "stream": stream}
        if max_tokens:
            body["max_tokens"] = max_tokens
        async with r.chat(body) as resp:
            await resp.read()
            return resp.status

    async def keys_without_ttl(redis: Redis) -> dict[str, int]:
        found: dict[str, int] = {}
        async for key in redis.scan_iter(match="router:lim:*"):
            found[key.decode()] = await redis.pttl(key)
        assert found, "no limiter keys at all"
        return {k: ttl for k, ttl in found.items() if ttl <= 0 and ttl != -2}

    statuses = [await run("m"), await run("m", max_tokens=50), await run("slow", True),
                await run("broken"), await run("busy")]
    assert statuses == [200, 200, 200, 502, 429]
    statuses = await asyncio.gather(*(run("slow", True) for _ in range(5)))
    assert sorted(statuses) == [200, 200, 200, 429, 429]
    async with Redis.from_url(redis_server.url) as redis:
        # A stream open (its lease live and refreshed past one TTL), and one that leaves early.
        async with r.chat({"model": "slow", "messages": USER_MSG, "stream": True}) as held:
            assert held.status == 200
            await held.content.readline()
            async with r.chat({"model": "slow", "messages": USER_MSG,
                               "stream": True}) as gone:
                await gone.content.readline()
                gone.close()
            await asyncio.sleep(0.3)
            assert await redis.zcard(limit_keys("test")[2]) == 1
            assert await keys_without_ttl(redis) == {}
            await held.read()
        # Spend the requests: refusals for rpm.
        statuses = await asyncio.gather(*(run("m") for _ in range(30)))
        assert 429 in statuses
        await asyncio.sleep(0.3)  # background settles
        assert await keys_without_ttl(redis) == {}
        present = {k.decode() async for k in redis.scan_iter(match="router:lim:*")}
        # (tpm's arrival time may already be past after the refunds: then the key is gone.)
        rpm_key, _tpm, _conc, day_key = limit_keys("test")
        assert {rpm_key, day_key} <= present


async def test_client_leaving_during_admission_gives_its_slot_back(fakes, start_router,
                                                                   debug_redis):
    """A client that hangs up while Redis decides: the slot its admission took is released at
    once, not when its lease expires (lease_ttl_s 60 here), so the next request gets in."""
    up = await fakes()
    store = {"url": debug_redis.url, "timeout_ms": 5000}
    r = await start_router(limited_config(up, {"concurrency": 1}, store))
    body = {"model": "m", "messages": USER_MSG}
    async with r.chat(body) as resp:  # the script is loaded, the connection up
        assert resp.status == 200
    conc_key = limit_keys("test")[2]
    async with Redis.from_url(debug_redis.url) as sleeper, \
            Redis.from_url(debug_redis.url) as redis:
        sleeping = asyncio.create_task(sleeper.execute_command("DEBUG", "SLEEP", "1.5"))
        await asyncio.sleep(0.2)  # Redis is asleep: the admission below waits for it
        with pytest.raises(TimeoutError):  # the client gives up long before Redis wakes
            async with r.http.post(f"{r.url}/api/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {KEY}"},
                                   timeout=aiohttp.ClientTimeout(total=0.3)) as resp:
                await resp.read()
        await sleeping
        # The admission ran when Redis woke up, and its release right after it.

        async def released() -> bool:
            return await redis.zcard(conc_key) == 0

        await eventually(released, 3.0, "the slot's release")
    async with r.chat(body) as resp:
        assert resp.status == 200, await resp.text()
