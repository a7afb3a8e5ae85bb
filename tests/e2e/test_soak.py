"""Soak: mixed traffic at a steady rate against `router serve` with a real redis-server, Redis
restarted half-way; the process must not grow (RSS, fds, threads) and every answer must be one
this kind of request may get.

`make test` runs it for SOAK_S=30 seconds; `make soak` for 600. Figures are printed (pytest -s).

Traffic, one kind per request in turn (SOAK_RATE requests per second, default 25):
  json    non-streamed answer                      -> 200
  stream  streamed answer, read to `data: [DONE]`  -> 200
  error   the upstream answers 500 (no retries)    -> 502
  cut     the upstream drops the stream mid-way    -> 200, then one `error` event
  leave   the client disconnects after its first chunk   -> 200
Every chat request goes through the limiter (rpm and concurrency on the key), so each one makes
its store round trip to Redis; after the restart (an empty Redis) the limiter's keys must be
back. Redis is stopped at 50 % of the run and started again on the same port 2 s later. With
`store.on_failure: open` the chat path keeps serving: 503 is allowed only from the stop until
2 s after the restart (none was seen so far), and nowhere else. "leave" is 200 (its headers came).

Growth is measured from the end of a warm-up (20 % of the run, at least 5 s) to the end, after
the traffic stopped: RSS < 10 %, open fds and threads back to where they were. The router has
no gauge of its asyncio tasks, so tasks are not counted; threads (/proc) stand in for them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import openai_provider
from tests.e2e.conftest import StartRouter
from tests.redis_server import RedisServer, start_redis

SOAK_S = float(os.environ.get("SOAK_S", "30"))
RATE = float(os.environ.get("SOAK_RATE", "25"))
KEY = "sk-soak-" + "s" * 40
KINDS = ("json", "stream", "json", "error", "stream", "cut", "json", "leave")
EXPECTED = {"json": {200}, "stream": {200}, "error": {502}, "cut": {200}, "leave": {200}}
RESTART_GRACE_S = 2.0  # after the restart, a 503 is still allowed for this long


def proc_figures(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


@pytest.mark.timeout(SOAK_S + 120)
async def test_soak_mixed_traffic_with_a_redis_restart(
        fakes: Any, router_process: StartRouter, redis_server: RedisServer,
        tmp_path: Path) -> None:
    up = await fakes("up")
    backend = openai_provider(up)
    routes = {
        "ok": "gpt-x", "err": "status:500", "cut": "chunks:8+cut:3",
        "slow": "chunks:40+gap:0.05",
    }
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 5, "reload_poll_s": 0},
        "store": {"url": redis_server.url, "on_failure": "open"},
        "auth": {"api_keys": [{"id": "soak", "user": "soak",
                               "key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                               "limits": {"rpm": 1_000_000, "concurrency": 10_000}}]},
        "providers": {"up": backend},
        "routes": {name: {"retries": 0, "backends": [{"provider": "up", "model": model}]}
                   for name, model in routes.items()},
        "health": {"enabled": False},
        "logging": {"level": "warning", "format": "text"},
    }
    router = await router_process(config)
    redis = redis_server
    counts: Counter[tuple[str, int | str]] = Counter()
    unexpected: list[str] = []
    window: list[float] = []  # [stop, restarted + grace]
    headers = {"Authorization": f"Bearer {KEY}"}

    def in_window(t: float) -> bool:
        return bool(window) and window[0] <= t <= (window[1] if len(window) > 1 else t)

    async def one(http: aiohttp.ClientSession, kind: str) -> None:
        route = {"json": "ok", "stream": "ok", "error": "err", "cut": "cut", "leave": "slow"}
        stream = kind in ("stream", "cut", "leave")
        body = {"model": route[kind], "stream": stream,
                "messages": [{"role": "user", "content": "soak"}]}
        started = time.monotonic()
        status: int | str
        try:
            async with http.post(router.url + "/v1/chat/completions", json=body,
                                 headers=headers) as resp:
                status = resp.status
                if kind == "leave" and status == 200:
                    await resp.content.readany()
                    resp.close()  # the client leaves mid-stream
                else:
                    raw = await resp.read()
                    if status == 200 and kind == "stream" and not raw.endswith(
                            b"data: [DONE]\n\n"):
                        unexpected.append(f"{kind}: stream without [DONE]: {raw[-200:]!r}")
                    if status == 200 and kind == "cut" and b"event: error" not in raw:
                        unexpected.append(f"{kind}: cut stream without an error event")
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = type(exc).__name__
        counts[kind, status] += 1
        if status not in EXPECTED[kind] and not (status == 503 and in_window(started)):
            unexpected.append(f"{kind}: {status} at {started - t0:.1f} s")

    async def restart_redis() -> None:
        nonlocal redis
        await asyncio.sleep(SOAK_S / 2)
        window.append(time.monotonic())
        port, workdir = redis.port, redis.workdir
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(2.0)
        redis = await asyncio.to_thread(start_redis, workdir, port)
        window.append(time.monotonic() + RESTART_GRACE_S)

    warm_up_s = max(5.0, SOAK_S * 0.2)
    before: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as http:
        t0 = time.monotonic()
        restarter = asyncio.create_task(restart_redis())
        i = 0
        while (now := time.monotonic()) - t0 < SOAK_S:
            if not before and now - t0 >= warm_up_s:
                before = proc_figures(router.pid)
            task = asyncio.create_task(one(http, KINDS[i % len(KINDS)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            await asyncio.sleep(max(0.0, t0 + i / RATE - time.monotonic()))
        await asyncio.gather(*tasks)
        await restarter
    await asyncio.sleep(3.0)  # the router's side of the left streams and idle connections closes
    after = proc_figures(router.pid)
    if redis is not redis_server:
        redis_server.proc = redis.proc  # the fixture stops the running server

    by_status = Counter[str]()
    for (kind, status), n in sorted(counts.items(), key=str):
        by_status[f"{kind} {status}"] += n
    growth = (after["rss_kib"] - before["rss_kib"]) / before["rss_kib"]
    print(f"\nsoak: {SOAK_S:.0f} s at {RATE:.0f}/s, {sum(counts.values())} requests; Redis "
          f"stopped at {window[0] - t0:.1f} s for 2 s")
    print(f"  RSS {before['rss_kib']} KiB -> {after['rss_kib']} KiB ({growth:+.1%}); fds "
          f"{before['fds']} -> {after['fds']}; threads {before['threads']} -> "
          f"{after['threads']}")
    print("  " + ", ".join(f"{k}: {n}" for k, n in sorted(by_status.items())))
    left = counts["leave", 200]
    closed = sum(1 for seen in up.seen if seen.t_disconnected is not None)
    print(f"  upstream streams closed after their client left: {closed} of {left}")
    assert not unexpected, unexpected[:20]
    assert growth < 0.10
    assert after["fds"] <= before["fds"], (before, after)
    assert after["threads"] <= before["threads"], (before, after)
    assert sum(n for (kind, status), n in counts.items() if status == 200) > 0
    assert closed >= 0.9 * left  # the router hangs up on the upstream when its client leaves
    assert "Traceback" not in router.log(), router.log()[-3000:]
    # The restarted Redis started empty: keys in it mean the limiter went back to the store.
    client = aioredis.Redis.from_url(redis.url)
    try:
        assert await client.dbsize() > 0
    finally:
        await client.aclose()
