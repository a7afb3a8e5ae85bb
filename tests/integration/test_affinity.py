"""Prefix affinity through real fake upstreams: a conversation stays where its prefix is cached,
prefixes spread, a backend at its bound spills and gets its prefixes back, an ejected backend
gives up only its own prefixes (to their second choice), a new session is pinned where its
prefix goes and its pin wins after, and on upstreams that simulate a prefix cache the cache is
hit far more often than with round robin."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

from router.bench.kv_cache import KvCache
from router.routing.affinity import prefix_key
from router.routing.strategies import rendezvous_order
from tests.conftest import eventually, openai_provider, router_config
from tests.integration.test_limits_faults import scrape

SYSTEM = {"role": "system", "content": "You answer questions about the attached report."}


def messages(conversation: int, turns: int = 0) -> list[dict[str, str]]:
    out = [SYSTEM, {"role": "user", "content": f"Report {conversation}: " + "figures " * 50}]
    for k in range(turns):
        out += [{"role": "assistant", "content": f"Answer {k}."},
                {"role": "user", "content": f"Follow-up {k}?"}]
    return out


def config(ups: list[Any], extra: dict[str, Any] | None = None, **route: Any
           ) -> dict[str, Any]:
    return router_config(
        {u.name: openai_provider(u) for u in ups},
        {"m": {"strategy": "prefix_affinity",
               "backends": [{"provider": u.name, "model": "gpt-x"} for u in ups],
               "ejection": {"consecutive_failures": 1000}, **route}}, **(extra or {}))


async def ask(r: Any, body: dict[str, Any]) -> tuple[int, str | None]:
    async with r.chat({"model": "m", **body}) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-router-backend")


async def backend_of(r: Any, conversation: int, turns: int = 0, **extra: Any) -> str:
    status, backend = await ask(r, {"messages": messages(conversation, turns), **extra})
    assert status == 200 and backend is not None
    return backend


async def test_each_conversation_stays_on_one_backend_and_prefixes_spread(fakes, start_router):
    ups = [await fakes(n) for n in ("a", "b", "c")]
    r = await start_router(config(ups))
    homes: dict[int, set[str]] = {i: set() for i in range(30)}
    for turns in range(3):
        for i in homes:
            homes[i].add(await backend_of(r, i, turns, stream=turns == 1))
    assert all(len(h) == 1 for h in homes.values()), homes
    spread = Counter(next(iter(h)) for h in homes.values())
    assert set(spread) == {"a/gpt-x", "b/gpt-x", "c/gpt-x"}
    assert await scrape(r, "router_affinity_total", route="m", outcome="first") == 90
    assert await scrape(r, "router_affinity_total", route="m", outcome="spill") == 0


async def test_a_backend_at_its_bound_spills_and_comes_back(fakes, start_router):
    ups = [await fakes(n) for n in ("a", "b")]
    r = await start_router(config(ups, affinity={"load_factor": 1.25}))
    home = await backend_of(r, 7)
    busy = next(u for u in ups if home.startswith(u.name + "/"))
    other = next(u for u in ups if u is not busy)
    busy.recorder.override = "hang"
    # With k in flight on it and none elsewhere, its bound is ceil(1.25 x 1/2 x (k + 1)):
    # it takes a fifth request (k = 4), not a sixth.
    held = [asyncio.create_task(ask(r, {"messages": messages(7)})) for _ in range(5)]
    await eventually(lambda: busy.recorder.inflight == 5)
    assert await backend_of(r, 7) == f"{other.name}/gpt-x"
    assert await scrape(r, "router_affinity_total", route="m", outcome="spill") == 1
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)
    await eventually(lambda: busy.recorder.inflight == 0)
    busy.recorder.override = None
    await asyncio.sleep(0.05)  # the router counts the cancelled requests out
    assert await backend_of(r, 7) == home


async def test_an_ejected_backend_moves_only_its_prefixes_to_their_second_choice(
        fakes, start_router):
    ups = [await fakes(n) for n in ("a", "b", "c")]
    r = await start_router(config(ups, retries=1, ejection={"consecutive_failures": 1,
                                                             "base_cooldown_s": 60}))
    before = {i: await backend_of(r, i) for i in range(24)}
    out = ups[0]
    mine = [i for i, b in before.items() if b == "a/gpt-x"]
    assert mine and len(mine) < len(before)
    out.recorder.override = "status:500"
    assert await backend_of(r, mine[0]) != "a/gpt-x"  # failed there, ejected, retried
    out.recorder.override = None
    seen = len(out.seen)
    stand_ins = [SimpleNamespace(name=f"{u.name}/gpt-x", weight=1.0) for u in ups]
    for i, was in before.items():
        now = await backend_of(r, i)
        if i in mine:
            key = prefix_key({"messages": messages(i)}, "first_user")
            assert key is not None
            assert now == rendezvous_order(key, stand_ins)[1].name  # type: ignore[arg-type]
        else:
            assert now == was
    assert len(out.seen) == seen  # nothing reached the ejected backend
    assert await scrape(r, "router_affinity_total", route="m", outcome="skip") == len(mine)


async def test_a_new_session_is_pinned_where_its_prefix_goes_then_its_pin_wins(
        fakes, start_router):
    ups = [await fakes(n) for n in ("a", "b", "c")]
    r = await start_router(config(ups, {"store": {"url": "memory://"}}))
    home = await backend_of(r, 1)
    assert await backend_of(r, 1, session_id="s1") == home  # pinned where its prefix is cached
    asked = 2
    for other in range(2, 50):  # a conversation whose prefix lives elsewhere
        asked += 1
        if await backend_of(r, other) != home:
            break
    else:
        raise AssertionError("every prefix had the same home")
    for turns in range(3):  # the session's pin wins over that prefix's home
        assert await backend_of(r, other, turns, session_id="s1") == home
    assert await scrape(r, "router_affinity_total", route="m", outcome="first") == asked


async def test_prefix_cache_hits_far_more_often_than_with_round_robin(fakes, start_router):
    ups = [await fakes(n) for n in ("a", "b", "c")]
    hit_ratio: dict[str, float] = {}
    for strategy in ("round_robin", "prefix_affinity"):
        for u in ups:
            u.recorder.kv = KvCache(capacity_tokens=20_000, per_token_s=0.0, base_s=0.0)
        r = await start_router(config(ups) | {"routes": {"m": {
            "strategy": strategy, "backends": [{"provider": u.name, "model": "gpt-x"}
                                               for u in ups]}}})
        for turns in range(4):
            for i in range(11):  # not a multiple of 3: round robin moves each conversation
                await backend_of(r, i, turns)
        stats = [u.recorder.kv.stats for u in ups if u.recorder.kv is not None]
        hit_ratio[strategy] = (sum(s.cached_tokens for s in stats)
                               / sum(s.prompt_tokens for s in stats))
    # Every turn after a conversation's first finds its history cached with affinity.
    assert hit_ratio["prefix_affinity"] > 0.7
    assert hit_ratio["prefix_affinity"] > hit_ratio["round_robin"] + 0.2
