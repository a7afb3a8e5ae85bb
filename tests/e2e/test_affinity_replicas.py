"""Two `router serve` processes with no shared store place each prompt prefix on the same
backend: a conversation's turns, sent to either process, all land on one backend."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp

from tests.conftest import KEY, openai_provider, router_config


def messages(conversation: int, turns: int) -> list[dict[str, str]]:
    out = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": f"Question {conversation}"}]
    for k in range(turns):
        out += [{"role": "assistant", "content": f"Answer {k}."},
                {"role": "user", "content": f"And then {k}?"}]
    return out


async def backend_of(http: aiohttp.ClientSession, url: str, conversation: int,
                     turns: int) -> str:
    async with http.post(url + "/v1/chat/completions",
                         json={"model": "m", "messages": messages(conversation, turns)},
                         headers={"Authorization": f"Bearer {KEY}"}) as resp:
        await resp.read()
        assert resp.status == 200
        return resp.headers["x-router-backend"]


async def test_two_processes_place_each_prefix_on_the_same_backend(fakes, router_process):
    ups: list[Any] = [await fakes(n) for n in ("a", "b", "c")]
    cfg = router_config({u.name: openai_provider(u) for u in ups},
                        {"m": {"strategy": "prefix_affinity",
                               "backends": [{"provider": u.name, "model": "gpt-x"}
                                            for u in ups]}})
    routers = await asyncio.gather(router_process(cfg), router_process(cfg))
    placed: dict[int, set[str]] = {i: set() for i in range(24)}
    async with aiohttp.ClientSession() as http:
        for turns in range(4):
            for i in placed:
                router = routers[(i + turns) % 2]  # each turn on the other process
                placed[i].add(await backend_of(http, router.url, i, turns))
    assert all(len(b) == 1 for b in placed.values()), placed
    assert set(Counter(next(iter(b)) for b in placed.values())) == {
        "a/gpt-x", "b/gpt-x", "c/gpt-x"}
