"""A drain across replicas: two `router serve` processes (one of them with two workers) on one
`redis-server`. A drain made through one replica reaches every worker of the other within a
second, lets the stream under way finish, is lifted by an undrain made anywhere, and is still
there when a replica restarts."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp

from tests.conftest import (
    ADMIN_KEY,
    ADMIN_KEY_ENTRY,
    KEY,
    USER_MSG,
    bearer,
    openai_provider,
    router_config,
    sse_events,
)

PROPAGATION_S = 1.0  # the contract: every replica sees a drain within this


def config(a: Any, c: Any, redis_url: str) -> dict[str, Any]:
    cfg = router_config(
        {"a": openai_provider(a), "c": openai_provider(c)},
        {"m": {"backends": [{"provider": "a", "model": "gpt-x"},
                            {"provider": "c", "model": "gpt-x"}]},
         "only-a": {"backends": [{"provider": "a", "model": "gpt-x"}]}},
        store={"url": redis_url, "timeout_ms": 500})
    cfg["auth"]["api_keys"].append(ADMIN_KEY_ENTRY)
    return cfg


async def backend_of(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(url + "/api/v1/chat/completions",
                         json={"model": "m", "messages": USER_MSG}, headers=bearer(KEY)) as resp:
        await resp.read()
        assert resp.status == 200
        return resp.headers["x-router-backend"]


async def admin(http: aiohttp.ClientSession, url: str, action: str) -> dict[str, Any]:
    async with http.post(f"{url}/api/v1/admin/backends/{action}", json={"backend": "a/gpt-x"},
                         headers=bearer(ADMIN_KEY)) as resp:
        assert resp.status == 200
        answer: dict[str, Any] = await resp.json()
    assert answer["scope"] == "store"
    return answer


async def state_of_a(http: aiohttp.ClientSession, url: str) -> tuple[str, int]:
    """(a's state, pid of the worker that answered)."""
    async with http.get(url + "/api/v1/admin/status", headers=bearer(ADMIN_KEY)) as resp:
        assert resp.status == 200
        doc = await resp.json()
    (entry,) = doc["routes"]["only-a"]["backends"]
    return entry["state"], doc["worker"]["pid"]


async def test_a_drain_reaches_every_replica_within_a_second_and_outlives_a_restart(
        fakes: Any, router_process: Any, redis_server: Any) -> None:
    a, c = await fakes("a"), await fakes("c")
    cfg = config(a, c, redis_server.url)
    one, two = await asyncio.gather(router_process(cfg),
                                    router_process(cfg, "--workers", "2"))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        assert {await backend_of(http, two.url) for _ in range(4)} == {"a/gpt-x", "c/gpt-x"}

        # A stream to `a` through replica two, under way when replica one drains `a`.
        a.recorder.override = "chunks:20+gap:0.1"
        async with http.post(two.url + "/api/v1/chat/completions",
                             json={"model": "only-a", "messages": USER_MSG, "stream": True},
                             headers=bearer(KEY)) as stream:
            assert stream.status == 200
            first = await stream.content.readline()
            assert first.startswith(b"data: ")
            await admin(http, one.url, "drain")
            drained_at = time.monotonic()
            body = first + await stream.read()
        a.recorder.override = None
        events = sse_events(body)
        assert events[-1] == (None, "[DONE]")  # the stream under way finished whole
        assert not any(name == "error" for name, _ in events)
        assert len(events) >= 20

        await asyncio.sleep(max(0.0, drained_at + PROPAGATION_S - time.monotonic()))
        seen = len(a.seen)
        assert {await backend_of(http, two.url) for _ in range(10)} == {"c/gpt-x"}
        assert {await backend_of(http, one.url) for _ in range(4)} == {"c/gpt-x"}
        assert len(a.seen) == seen
        # Both workers of replica two say so (the kernel spreads connections between them).
        pids: set[int] = set()
        for _ in range(40):
            async with aiohttp.ClientSession() as fresh:  # a new connection each time
                state, pid = await state_of_a(fresh, two.url)
            assert state == "drained"
            pids.add(pid)
        assert len(pids) == 2, pids

        # Undrained through the other replica: back in rotation everywhere.
        assert (await admin(http, two.url, "undrain"))["drained"] is False
        await asyncio.sleep(PROPAGATION_S)
        assert "a/gpt-x" in {await backend_of(http, one.url) for _ in range(4)}
        assert "a/gpt-x" in {await backend_of(http, two.url) for _ in range(6)}

        # Drained again, then replica two restarts: from its first request it knows.
        await admin(http, one.url, "drain")
        two.send(signal.SIGTERM)
        assert await two.wait_exit(20) == 0
        again = await router_process(cfg)
        seen = len(a.seen)
        assert {await backend_of(http, again.url) for _ in range(6)} == {"c/gpt-x"}
        assert len(a.seen) == seen
        assert (await state_of_a(http, again.url))[0] == "drained"
