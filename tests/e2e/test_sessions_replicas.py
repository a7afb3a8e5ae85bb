"""Two `router serve` processes sharing one Redis: a session's pin is the same on both, even when
they race to create it, and an auto-created session works through the openai SDK."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from openai import AsyncOpenAI

from tests.conftest import KEY, USER_MSG, openai_provider, router_config


def config(ups: list[Any], redis_url: str, **extra: Any) -> dict[str, Any]:
    return router_config({u.name: openai_provider(u) for u in ups},
                         {"m": {"backends": [{"provider": u.name, "model": "gpt-x"}
                                             for u in ups]}},
                         store={"url": redis_url, "timeout_ms": 500}, **extra)


async def backend_of(http: aiohttp.ClientSession, url: str, session: str) -> str:
    async with http.post(url + "/api/v1/chat/completions",
                         json={"model": "m", "messages": USER_MSG, "session_id": session},
                         headers={"Authorization": f"Bearer {KEY}"}) as resp:
        await resp.read()
        assert resp.status == 200 and resp.headers["x-session-id"] == session
        return resp.headers["x-router-backend"]


async def test_six_sessions_alternating_two_processes_stay_on_one_backend_each(
        fakes, router_process, redis_server):
    ups = [await fakes(n) for n in ("a", "b", "c")]
    cfg = config(ups, redis_server.url)
    routers = await asyncio.gather(router_process(cfg), router_process(cfg))
    async with aiohttp.ClientSession() as http:
        # Racing first requests: both processes at once, for each session.
        first = await asyncio.gather(*(backend_of(http, routers[i % 2].url, f"s{i // 2}")
                                       for i in range(12)))
        placed = {f"s{i // 2}": set() for i in range(12)}
        for i, backend in enumerate(first):
            placed[f"s{i // 2}"].add(backend)
        for round_ in range(3):
            for i, session in enumerate(sorted(placed)):
                placed[session].add(await backend_of(http, routers[(i + round_) % 2].url,
                                                     session))
    assert all(len(b) == 1 for b in placed.values()), placed
    assert len({next(iter(b)) for b in placed.values()}) > 1


async def test_an_auto_created_session_through_the_openai_sdk(fakes, router_process,
                                                              redis_server):
    ups = [await fakes(n) for n in ("a", "b")]
    cfg = config(ups, redis_server.url, sessions={"auto_create": True})
    routers = await asyncio.gather(router_process(cfg), router_process(cfg))
    clients = [AsyncOpenAI(api_key=KEY, base_url=r.url + "/v1", max_retries=0)
               for r in routers]
    raw = await clients[0].chat.completions.with_raw_response.create(
        model="m", messages=USER_MSG)  # type: ignore[arg-type]
    sid = raw.headers["x-session-id"]
    completion = raw.parse()
    assert (completion.model_extra or {}).get("session_id") == sid
    backend = raw.headers["x-router-backend"]
    for i in range(4):
        again = await clients[i % 2].chat.completions.with_raw_response.create(
            model="m", messages=USER_MSG, extra_body={"session_id": sid})  # type: ignore[arg-type]
        assert again.headers["x-router-backend"] == backend
    stream = await clients[1].chat.completions.create(
        model="m", messages=USER_MSG, stream=True)  # type: ignore[arg-type]
    chunks = [c async for c in stream]
    assert (chunks[0].model_extra or {}).get("session_id")
    for c in clients:
        await c.close()
