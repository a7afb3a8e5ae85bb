"""Redis killed and restarted under mixed traffic: once `/readyz` answers 200 again, every store
path answers (managed keys created and used for the first time, automation settings read and
written, sessions read, chats with limits and sessions), with the default `store.timeout_ms`.

redis-py's pool holds connections that died with the old Redis; each must be noticed before it
is used, or its command tried once more on a fresh connection, never answered with a 503."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from typing import Any

from tests.conftest import (
    ADMIN_KEY,
    ADMIN_KEY_ENTRY,
    KEY,
    USER_MSG,
    RouterUnderTest,
    bearer,
    router_config,
)
from tests.redis_server import RedisServer, start_redis

ROUTES = {"fast": {"backends": [{"provider": "mock", "model": "m1"}]}}
SETTINGS = "/api/v1/automation/settings"
FIRST_USES = 40  # concurrent first uses of new managed keys (and as many settings reads)
READY_WITHIN_S = 10.0


def config(store_url: str) -> dict[str, Any]:
    # `closed`: a store failure is a 503 (no local fallback hides it), and /readyz asks Redis.
    # store.timeout_ms is left at its default: the defaults must hold these bursts.
    cfg = router_config({"mock": {"type": "mock"}}, ROUTES,
                        store={"url": store_url, "on_failure": "closed"})
    cfg["auth"]["api_keys"].append(ADMIN_KEY_ENTRY)
    cfg["auth"]["default_limits"] = {"rpm": 100_000, "tpm": 100_000_000}  # every chat admits
    return cfg


async def call(r: RouterUnderTest, method: str, path: str, key: str = KEY,
               body: Any = None) -> int:
    async with r.http.request(method, r.url + path, json=body, headers=bearer(key)) as resp:
        await resp.read()
        return resp.status


async def chat(r: RouterUnderTest, key: str = KEY, session: str | None = None) -> int:
    body: dict[str, Any] = {"model": "fast", "messages": USER_MSG}
    if session is not None:
        body["session_id"] = session
    return await call(r, "POST", "/v1/chat/completions", key, body)


async def create_key(r: RouterUnderTest, user: str) -> tuple[int, str]:
    async with r.http.post(r.url + "/api/v1/admin/keys", json={"user": user},
                           headers=bearer(ADMIN_KEY)) as resp:
        doc = await resp.json()
        return resp.status, doc.get("key", "")


def mixed(r: RouterUnderTest, n: int) -> list[Any]:
    """One of each kind of store path, `n` times over (the answers that are not 503 are all
    expected ones: a session may be gone with the old Redis's data)."""
    calls: list[Any] = []
    for i in range(n):
        calls += [chat(r), chat(r, session=f"s{i}"), call(r, "GET", SETTINGS),
                  call(r, "PUT", SETTINGS, body={"session_ttl_s": 60 + i}),
                  call(r, "GET", f"/api/v1/sessions/s{i}")]
    return calls


async def test_every_store_path_recovers_after_a_redis_restart(
        start_router: Any, redis_server: RedisServer) -> None:
    r = await start_router(config(redis_server.url))
    # Warm: the pool opens as many connections as a busy router would hold.
    warm = await asyncio.gather(*mixed(r, 12), *(call(r, "GET", SETTINGS) for _ in range(40)))
    assert set(warm) <= {200, 404}, Counter(warm)

    log: list[tuple[float, str, int]] = []  # (started, what, status) of the steady traffic
    stop = asyncio.Event()

    async def steady() -> None:
        i = 0
        while not stop.is_set():
            for what, make in (("chat", lambda: chat(r)),
                               ("session chat", lambda: chat(r, session=f"t{i % 5}")),
                               ("settings", lambda: call(r, "GET", SETTINGS)),
                               ("session", lambda: call(r, "GET", f"/api/v1/sessions/t{i % 5}"))):
                started = time.monotonic()
                log.append((started, what, await make()))
            i += 1
            await asyncio.sleep(0.01)

    traffic = asyncio.create_task(steady())
    try:
        await asyncio.sleep(0.2)
        os.kill(redis_server.proc.pid, signal.SIGKILL)
        redis_server.proc.wait()
        await asyncio.sleep(0.3)  # traffic meets a dead Redis
        again = await asyncio.to_thread(start_redis, redis_server.workdir, redis_server.port)
        try:
            started = time.monotonic()
            while await call(r, "GET", "/readyz") != 200:
                assert time.monotonic() - started < READY_WITHIN_S, "never ready again"
                await asyncio.sleep(0.02)
            ready_at = time.monotonic()

            # Right after: new managed keys, then their first uses and as many settings reads,
            # all at once, then every other path at once.
            made = await asyncio.gather(*(create_key(r, f"u{i}") for i in range(FIRST_USES)))
            assert Counter(s for s, _ in made) == {201: FIRST_USES}, Counter(s for s, _ in made)
            burst = await asyncio.gather(*(chat(r, key) for _, key in made),
                                         *(call(r, "GET", SETTINGS) for _ in range(FIRST_USES)))
            assert Counter(burst) == {200: 2 * FIRST_USES}, Counter(burst)
            rest = await asyncio.gather(*mixed(r, 8))
            assert set(rest) <= {200, 404}, Counter(rest)
            await asyncio.sleep(0.2)
        finally:
            stop.set()
            await traffic
            again.stop()
    finally:
        if not traffic.done():
            traffic.cancel()
    after = [(what, status) for started, what, status in log if started >= ready_at]
    assert after, "no steady traffic after the restart"
    assert all(status in (200, 404) for _, status in after), Counter(after)
