"""Routing through real fake upstreams: distribution, retries, fallbacks, timeouts, ejection,
rate-limit rests, concurrency caps and active probes, as a client and the upstreams see them.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from itertools import pairwise
from typing import Any

from tests.conftest import USER_MSG, eventually, openai_provider, router_config

# Short ejection so tests never wait on the 30 s default; tests that want ejection say so.
NO_EJECTION = {"consecutive_failures": 1000}


async def ask(r: Any, model: str = "m", *, stream: bool = False) -> tuple[int, str | None, Any]:
    """One chat request: (status, x-router-backend, parsed JSON body or SSE text)."""
    async with r.chat({"model": model, "messages": USER_MSG, "stream": stream}) as resp:
        backend = resp.headers.get("x-router-backend")
        if resp.content_type == "application/json":
            return resp.status, backend, await resp.json()
        return resp.status, backend, await resp.text()


def closed_port() -> int:
    """A loopback port nobody listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def route(*backends: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"backends": list(backends), "ejection": NO_EJECTION, **extra}


def b(provider: str, model: str = "gpt-x", **extra: Any) -> dict[str, Any]:
    return {"provider": provider, "model": model, **extra}


def assert_error(body: Any, type_: str, code: str | None = None) -> None:
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["type"] == type_
    if code is not None:
        assert body["error"]["code"] == code


async def hold(r: Any, model: str = "m") -> None:
    """A request that stays in flight until the task is cancelled (client disconnect)."""
    await ask(r, model)


async def release(tasks: list[asyncio.Task[Any]], *fakes: Any) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await eventually(lambda: all(f.recorder.inflight == 0 for f in fakes))


# --- distribution ----------------------------------------------------------------------------

async def test_round_robin_spreads_evenly_over_three_upstreams(fakes, start_router):
    ups = [await fakes(n) for n in ("a", "b", "c")]
    r = await start_router(router_config(
        {u.name: openai_provider(u) for u in ups},
        {"m": route(*(b(u.name) for u in ups), strategy="round_robin")}))
    seen = []
    for _ in range(42):
        status, backend, _body = await ask(r)
        assert status == 200
        seen.append(backend)
    assert seen[:6] == ["a/gpt-x", "b/gpt-x", "c/gpt-x"] * 2
    assert Counter(seen) == {"a/gpt-x": 14, "b/gpt-x": 14, "c/gpt-x": 14}
    assert [len(u.seen) for u in ups] == [14, 14, 14]


async def test_weighted_gives_3_to_1_without_bursts(fakes, start_router):
    big, small = await fakes("big"), await fakes("small")
    r = await start_router(router_config(
        {"big": openai_provider(big), "small": openai_provider(small)},
        {"m": route(b("big", weight=3), b("small", weight=1), strategy="weighted")}))
    seen = [(await ask(r))[1] for _ in range(40)]
    assert Counter(seen) == {"big/gpt-x": 30, "small/gpt-x": 10}
    assert (len(big.seen), len(small.seen)) == (30, 10)
    assert all(not (x == y == "small/gpt-x") for x, y in pairwise(seen))


async def test_least_busy_avoids_a_backend_with_a_request_in_flight(fakes, start_router):
    a, c = await fakes("a"), await fakes("c")
    a.recorder.override = "hang"
    # Both routes use the backend "a/gpt-x": its in-flight count is shared by name.
    r = await start_router(router_config(
        {"a": openai_provider(a), "c": openai_provider(c)},
        {"m": route(b("a"), b("c"), strategy="least_busy"),
         "hold": route(b("a"))}))
    held = [asyncio.ensure_future(hold(r, "hold"))]
    await eventually(lambda: a.recorder.inflight == 1)
    seen = [(await ask(r))[1] for _ in range(10)]
    assert seen == ["c/gpt-x"] * 10
    assert len(a.seen) == 1
    await release(held, a)


async def test_latency_prefers_the_faster_upstream_once_measured(fakes, start_router):
    slow, fast = await fakes("slow"), await fakes("fast")
    r = await start_router(router_config(
        {"slow": openai_provider(slow), "fast": openai_provider(fast)},
        {"m": route(b("slow", "first-byte:0.3"), b("fast"), strategy="latency")}))
    seen = [(await ask(r))[1] for _ in range(10)]
    # Each is tried once while unmeasured; after that the fast one takes everything.
    assert len(slow.seen) == 1
    assert seen.count("fast/gpt-x") == 9


# --- retries and fallbacks ---------------------------------------------------------------------

async def test_a_500_is_retried_on_the_next_backend(fakes, start_router):
    bad, good = await fakes("bad"), await fakes("good")
    r = await start_router(router_config(
        {"bad": openai_provider(bad), "good": openai_provider(good)},
        {"m": route(b("bad", "status:500"), b("good"))}))
    status, backend, body = await ask(r)
    assert status == 200
    assert backend == "good/gpt-x"
    assert body["object"] == "chat.completion"
    assert len(bad.seen) == 1 and len(good.seen) == 1
    assert bad.seen[0].t_received < good.seen[0].t_received


async def test_retries_are_capped_by_the_route(fakes, start_router):
    up = await fakes("up")
    backends = [b("up", f"status:500+n{i}") for i in range(5)]
    r = await start_router(router_config(
        {"up": openai_provider(up)},
        {"m": route(*backends, retries=2), "none": route(*backends, retries=0)}))
    status, backend, body = await ask(r)
    assert status == 502 and backend is None
    assert_error(body, "upstream_error", "bad_gateway")
    assert len(up.seen) == 3  # one try and two retries, not five
    status, _, body = await ask(r, "none")
    assert status == 502
    assert len(up.seen) == 4


async def test_fallback_routes_are_tried_in_order_depth_first(fakes, start_router):
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up)},
        {"main": route(b("up", "status:500+m1"), b("up", "status:500+m2"),
                       b("up", "status:500+m3"), retries=1, fallbacks=["fb1", "fb2"]),
         "fb1": route(b("up", "status:503+f1"), fallbacks=["fb3"]),
         "fb3": route(b("up", "status:502+f3")),
         # m1 was already tried: it is not asked a second time.
         "fb2": route(b("up", "status:500+m1"), b("up", "f2"))}))
    status, backend, body = await ask(r, "main")
    assert status == 200
    assert backend == "up/f2"
    assert body["model"] == "f2"
    order = [s.body["model"] for s in up.seen]
    # Two of main's three (one try, one retry), then fb1, its own fallback fb3, then fb2.
    assert len(order) == 5
    assert order[0] == "status:500+m1"
    assert order[1] in ("status:500+m2", "status:500+m3")
    assert order[2:] == ["status:503+f1", "status:502+f3", "f2"]


async def test_every_backend_failing_is_502_with_an_openai_error(fakes, start_router):
    a, c = await fakes("a"), await fakes("c")
    r = await start_router(router_config(
        {"a": openai_provider(a), "c": openai_provider(c)},
        {"m": route(b("a", "status:500"), b("c", "status:503"))}))
    for stream in (False, True):
        status, backend, body = await ask(r, stream=stream)
        assert status == 502
        assert backend is None
        assert_error(body, "upstream_error", "bad_gateway")
        assert "Traceback" not in body["error"]["message"]
    assert len(a.seen) == 2 and len(c.seen) == 2


async def test_every_upstream_rate_limited_is_429_with_retry_after(fakes, start_router):
    a, c = await fakes("a"), await fakes("c")
    r = await start_router(router_config(
        {"a": openai_provider(a), "c": openai_provider(c)},
        {"m": route(b("a", "status:429+retry-after:7"), b("c", "status:429+retry-after:7"))}))
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "7"
        body = await resp.json()
    assert_error(body, "upstream_rate_limited")
    assert len(a.seen) == 1 and len(c.seen) == 1


async def test_an_upstream_400_is_relayed_not_retried_and_not_held_against_it(
        fakes, start_router):
    picky, other = await fakes("picky"), await fakes("other")
    r = await start_router(router_config(
        {"picky": openai_provider(picky), "other": openai_provider(other)},
        {"m": {"backends": [b("picky", "status:400"), b("other")],
               "ejection": {"consecutive_failures": 1, "base_cooldown_s": 30}}}))
    status, backend, body = await ask(r)
    assert status == 400
    assert backend is None
    assert body["error"]["message"] == "fake failure 400"
    assert other.seen == []
    # The client's own mistake does not eject the backend: round robin comes back to it.
    assert (await ask(r))[0] == 200
    assert (await ask(r))[0] == 400
    assert len(picky.seen) == 2


async def test_an_upstream_401_is_our_credentials_problem_so_the_next_backend_answers(
        fakes, start_router):
    locked, good = await fakes("locked"), await fakes("good")
    r = await start_router(router_config(
        {"locked": openai_provider(locked), "good": openai_provider(good)},
        {"m": route(b("locked", "status:401"), b("good"))}))
    status, backend, _ = await ask(r)
    assert (status, backend) == (200, "good/gpt-x")
    assert len(locked.seen) == 1


# --- timeouts and connection failures --------------------------------------------------------

async def test_no_first_byte_in_time_moves_to_the_next_backend(fakes, start_router):
    slow, fast = await fakes("slow"), await fakes("fast")
    r = await start_router(router_config(
        {"slow": openai_provider(slow), "fast": openai_provider(fast)},
        {"m": route(b("slow", "first-byte:2"), b("fast"), first_byte_timeout_s=0.3)}))
    started = time.monotonic()
    status, backend, text = await ask(r, stream=True)
    elapsed = time.monotonic() - started
    assert status == 200
    assert backend == "fast/gpt-x"
    assert text.endswith("data: [DONE]\n\n")
    assert elapsed < 1.5  # the slow one would have taken 2 s
    assert len(slow.seen) == 1
    # The router hung up on the slow upstream instead of leaving it running.
    await eventually(lambda: slow.seen[0].t_disconnected is not None)
    assert slow.seen[0].t_finished is None


async def test_no_first_byte_anywhere_is_504(fakes, start_router):
    slow = await fakes("slow")
    r = await start_router(router_config(
        {"slow": openai_provider(slow)},
        {"m": route(b("slow", "first-byte:2+a"), b("slow", "first-byte:2+b"),
                    first_byte_timeout_s=0.2)}))
    status, backend, body = await ask(r, stream=True)
    assert status == 504 and backend is None
    assert_error(body, "upstream_error", "upstream_timeout")
    assert len(slow.seen) == 2
    await eventually(lambda: all(s.t_disconnected is not None for s in slow.seen))


async def test_connect_refused_moves_to_the_next_backend(fakes, start_router):
    good = await fakes("good")
    dead = {"type": "openai", "base_url": f"http://127.0.0.1:{closed_port()}/v1"}
    r = await start_router(router_config(
        {"dead": dead, "good": openai_provider(good)},
        {"m": route(b("dead"), b("good")), "only-dead": route(b("dead"))}))
    for _ in range(4):
        status, backend, _ = await ask(r)
        assert (status, backend) == (200, "good/gpt-x")
    status, backend, body = await ask(r, "only-dead")
    assert status == 502 and backend is None
    assert_error(body, "upstream_error", "backend_unavailable")


# --- passive ejection --------------------------------------------------------------------------

async def test_failing_backend_is_ejected_for_the_cooldown_then_readmitted(fakes, start_router):
    bad, good = await fakes("bad"), await fakes("good")
    bad.recorder.override = "status:500"
    r = await start_router(router_config(
        {"bad": openai_provider(bad), "good": openai_provider(good)},
        {"m": {"backends": [b("bad"), b("good")],
               "ejection": {"consecutive_failures": 2, "base_cooldown_s": 1}}}))
    # Round robin sends every other request to bad first; each time the retry saves it.
    for _ in range(2):
        assert (await ask(r))[:2] == (200, "good/gpt-x")
    assert len(bad.seen) == 2
    ejected_at = bad.seen[1].t_received
    for _ in range(8):
        assert (await ask(r))[:2] == (200, "good/gpt-x")
    # Nothing reached bad during its 1 s cool-down (however slow this machine is).
    assert all(s.t_received >= ejected_at + 1.0 for s in bad.seen[2:])
    # After the cool-down it is tried again, and serves once it has recovered.
    bad.recorder.override = None
    await asyncio.sleep(max(0.0, ejected_at + 1.3 - time.monotonic()))
    backends = {(await ask(r))[1] for _ in range(2)}
    assert backends == {"bad/gpt-x", "good/gpt-x"}


async def test_the_last_backend_is_never_ejected(fakes, start_router):
    bad = await fakes("bad")
    r = await start_router(router_config(
        {"bad": openai_provider(bad)},
        {"m": {"backends": [b("bad", "status:500")],
               "ejection": {"consecutive_failures": 1, "base_cooldown_s": 30}},
         "two": {"backends": [b("bad", "status:500+x"), b("bad", "status:500+y")],
                 "ejection": {"consecutive_failures": 1, "base_cooldown_s": 30}}}))
    for _ in range(3):
        status, _, body = await ask(r)
        assert status == 502  # the upstream's failure, not 503 "no backend"
        assert body["error"]["code"] == "bad_gateway"
    assert len(bad.seen) == 3
    # Every backend of a route ejected: all of them are still tried.
    for _ in range(2):
        assert (await ask(r, "two"))[0] == 502
    assert len(bad.seen) == 3 + 4


async def test_an_upstream_429_rests_that_backend_for_retry_after(fakes, start_router):
    limited, other = await fakes("limited"), await fakes("other")
    limited.recorder.override = "status:429+retry-after:2"
    r = await start_router(router_config(
        {"limited": openai_provider(limited), "other": openai_provider(other)},
        {"m": route(b("limited"), b("other"))}))
    assert (await ask(r))[:2] == (200, "other/gpt-x")
    assert len(limited.seen) == 1
    rested_at = limited.seen[0].t_received
    for _ in range(6):
        assert (await ask(r))[:2] == (200, "other/gpt-x")
    assert all(s.t_received >= rested_at + 2.0 for s in limited.seen[1:])
    # A 429 is not a failure: the backend is back after its rest, not ejected.
    limited.recorder.override = None
    await asyncio.sleep(max(0.0, rested_at + 2.3 - time.monotonic()))
    assert {(await ask(r))[1] for _ in range(2)} == {"limited/gpt-x", "other/gpt-x"}


# --- concurrency caps --------------------------------------------------------------------------

async def test_a_backend_at_max_concurrency_is_skipped_then_503_when_all_are_full(
        fakes, start_router):
    a, c = await fakes("a"), await fakes("c")
    a.recorder.override = "hang"
    r = await start_router(router_config(
        {"a": openai_provider(a), "c": openai_provider(c)},
        {"m": route(b("a", max_concurrency=1), b("c", max_concurrency=1))}))
    held = [asyncio.ensure_future(hold(r))]
    await eventually(lambda: a.recorder.inflight == 1)
    for _ in range(4):
        assert (await ask(r))[:2] == (200, "c/gpt-x")
    assert len(a.seen) == 1
    c.recorder.override = "hang"
    held.append(asyncio.ensure_future(hold(r)))
    await eventually(lambda: c.recorder.inflight == 1)
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) >= 1
        assert_error(await resp.json(), "server_error", "overloaded")
    assert (len(a.seen), len(c.seen)) == (1, 5)
    assert a.recorder.max_inflight == 1 and c.recorder.max_inflight == 1
    await release(held, a, c)
    # The slots come back once the held requests are gone.
    c.recorder.override = a.recorder.override = None

    async def served() -> bool:
        return (await ask(r))[0] == 200

    await eventually(served, 5, "the release of the held slots", every_s=0.05)
    assert {(await ask(r))[1] for _ in range(2)} == {"a/gpt-x", "c/gpt-x"}


# --- active probes -----------------------------------------------------------------------------

PROBES = {"enabled": True, "interval_s": 0.2, "timeout_s": 1}


async def until_only(r: Any, model: str, backend: str, *, streak: int = 6) -> None:
    """Ask until `streak` answers in a row came from `backend` (probe verdicts are periodic)."""
    deadline = time.monotonic() + 5
    run = 0
    while run < streak:
        assert time.monotonic() < deadline, f"{model} never settled on {backend}"
        run = run + 1 if (await ask(r, model))[1] == backend else 0


async def test_a_provider_failing_its_probe_gets_no_traffic_until_it_recovers(
        fakes, start_router):
    sick, well = await fakes("sick"), await fakes("well")
    sick.recorder.override = "models-500"  # only /v1/models fails; chat would still work
    r = await start_router(router_config(
        {"sick": openai_provider(sick), "well": openai_provider(well)},
        {"m": route(b("sick", "x"), b("sick", "y"), b("well"))}, health=PROBES))
    await until_only(r, "m", "well/gpt-x")
    before = len(sick.seen)
    for _ in range(10):
        assert (await ask(r))[:2] == (200, "well/gpt-x")
    assert len(sick.seen) == before
    # It recovers: the next probes bring both of its backends back.
    sick.recorder.override = None
    names: set[str | None] = set()
    deadline = time.monotonic() + 5
    while not {"sick/x", "sick/y"} <= names:
        assert time.monotonic() < deadline, "the recovered provider never came back"
        names.add((await ask(r))[1])
        await asyncio.sleep(0.02)


async def test_a_route_whose_every_backend_fails_its_probe_still_serves(fakes, start_router):
    sick, well = await fakes("sick"), await fakes("well")
    sick.recorder.override = "models-500"
    r = await start_router(router_config(
        {"sick": openai_provider(sick), "well": openai_provider(well)},
        {"m": route(b("sick")), "mixed": route(b("sick"), b("well"))}, health=PROBES))
    await until_only(r, "mixed", "well/gpt-x")  # the probe has taken sick out
    for _ in range(3):
        assert (await ask(r))[:2] == (200, "sick/gpt-x")


async def test_a_single_backend_resting_after_429_is_not_called_again(fakes, start_router):
    limited = await fakes("limited")
    r = await start_router(router_config(
        {"limited": openai_provider(limited)},
        {"m": {"retries": 0, "backends": [{"provider": "limited",
                                           "model": "status:429+retry-after:3"}]}}))
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "3"
    for _ in range(3):
        async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
            assert resp.status == 429
            assert (await resp.json())["error"]["type"] == "upstream_rate_limited"
            assert 1 <= int(resp.headers["Retry-After"]) <= 3
    # The upstream asked for 3 s of rest: it saw only the first request.
    assert len(limited.seen) == 1
