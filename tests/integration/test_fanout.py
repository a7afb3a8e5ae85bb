"""Fan-out (race, hedge, all) through real fake upstreams with controlled latencies.

Timing assertions compare a slow upstream (seconds) with a fast one (milliseconds) and leave wide
margins: this suite runs on loaded 2-core CI machines. Speed claims live in the benchmark.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from router.routing.health import TtfbWindow
from router.store.redis import limit_keys
from tests.conftest import KEY, USER_MSG, eventually, openai_provider, router_config

DONE = b"data: [DONE]\n\n"
NO_EJECTION = {"consecutive_failures": 1000}
PROMPT = len(USER_MSG[0]["content"]) // 4 + 1  # the prompt tokens a fake reports


def route(mode: str, *backends: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"fanout": mode, "backends": list(backends), "ejection": NO_EJECTION, **extra}


def b(provider: str, model: str = "gpt-x") -> dict[str, Any]:
    return {"provider": provider, "model": model}


async def start(fakes, start_router, names: tuple[str, ...], routes: dict[str, Any],
                limits: dict[str, int] | None = None, **extra: Any) -> tuple[list[Any], Any]:
    ups = [await fakes(n) for n in names]
    config = router_config({u.name: openai_provider(u, probe=False) for u in ups}, routes,
                           **extra)
    if limits is not None:
        config["auth"]["api_keys"][0]["limits"] = limits
    return ups, await start_router(config)


def fanout_count(r: Any, mode: str, outcome: str) -> float:
    value = r.worker.metrics.registry.get_sample_value(
        "router_fanout_total", {"mode": mode, "outcome": outcome})
    return value or 0.0


def events(raw: bytes) -> list[Any]:
    """The data of every SSE event: parsed JSON, or the raw text ([DONE])."""
    out = []
    for block in raw.decode().split("\n\n"):
        data = "\n".join(line[6:] for line in block.split("\n") if line.startswith("data: "))
        if data:
            out.append(json.loads(data) if data.startswith("{") else data)
    return out


async def ask(r: Any, model: str, **extra: Any) -> tuple[aiohttp.ClientResponse, Any, float]:
    """One request: (response, parsed JSON or raw SSE bytes, monotonic time it was all read)."""
    async with r.chat({"model": model, "messages": USER_MSG, **extra}) as resp:
        raw = await resp.read()
        at = time.monotonic()
    parsed = json.loads(raw) if resp.content_type == "application/json" else raw
    return resp, parsed, at


def assert_error(body: Any, code: str) -> None:
    assert set(body) == {"error"}
    assert body["error"]["code"] == code and body["error"]["message"]


# --- race --------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
async def test_race_the_fast_one_wins_and_the_slow_one_is_cancelled_at_the_win(
        fakes, start_router, stream):
    (slow, fast), r = await start(fakes, start_router, ("slow", "fast"), {
        "m": route("race", b("slow", "first-byte:3"), b("fast"))})
    started = time.monotonic()
    resp, body, answered = await ask(r, "m", stream=stream)
    assert resp.status == 200
    assert resp.headers["x-router-backend"] == "fast/gpt-x"
    assert answered - started < 2.0  # the slow one would have taken 3 s
    if stream:
        assert body.endswith(DONE) and body.count(DONE) == 1
    else:
        assert body["model"] == "gpt-x" and body["choices"][0]["finish_reason"] == "stop"
    # Both were asked at once; the slow one was hung up on at the win. The fake notes when it
    # saw its client leave; allow 0.5 s (a loaded CI machine) for "at once".
    assert len(slow.seen) == 1 and len(fast.seen) == 1
    assert abs(slow.seen[0].t_received - fast.seen[0].t_received) < 0.5
    await eventually(lambda: slow.seen[0].t_disconnected is not None)
    assert slow.seen[0].t_disconnected - answered < 0.5  # type: ignore[operator]
    assert slow.seen[0].t_finished is None
    assert r.worker.states["slow/first-byte:3"].inflight == 0
    assert fanout_count(r, "race", "won") == 1
    assert fanout_count(r, "race", "cancelled") == 1


async def test_a_race_stream_is_the_winners_bytes_unchanged(fakes, start_router):
    (_slow, _fast, twin), r = await start(fakes, start_router, ("slow", "fast", "twin"), {
        "m": route("race", b("slow", "first-byte:3"), b("fast", "chunks:7"))})
    body = {"model": "m", "messages": USER_MSG, "stream": True,
            "stream_options": {"include_usage": True}}
    async with r.chat(body) as resp:
        got = await resp.read()
    # The same request sent straight to a fresh fake (same id counter) gives the same bytes.
    async with aiohttp.ClientSession() as http, \
            http.post(f"{twin.base_url}/chat/completions",
                      json={**body, "model": "chunks:7"}) as direct:
        want = await direct.read()
    assert got == want


async def test_a_race_stream_is_won_by_content_not_by_a_role_only_first_chunk(fakes,
                                                                             start_router):
    # "stalls" sends its role-only first chunk at once, then its first word 2 s later;
    # "steady" sends nothing for 0.3 s, then its whole answer. The answer begins at "steady".
    (stalls, steady), r = await start(fakes, start_router, ("stalls", "steady"), {
        "m": route("race", b("stalls", "gap:2+chunks:3"), b("steady", "first-byte:0.3"))})
    started = time.monotonic()
    resp, raw, answered = await ask(r, "m", stream=True)
    assert resp.status == 200
    assert resp.headers["x-router-backend"] == "steady/first-byte:0.3"
    assert answered - started < 1.5  # "stalls" would have needed 6 s for its answer
    assert raw.count(DONE) == 1
    await eventually(lambda: stalls.seen[0].t_disconnected is not None)
    assert len(steady.seen) == 1


async def test_a_failing_racer_does_not_win(fakes, start_router):
    (bad, _), r = await start(fakes, start_router, ("bad", "ok"), {
        "m": route("race", b("bad", "status:500"), b("ok", "first-byte:0.3"))})
    resp, _, _ = await ask(r, "m")
    assert resp.status == 200 and resp.headers["x-router-backend"] == "ok/first-byte:0.3"
    assert len(bad.seen) == 1
    assert fanout_count(r, "race", "failed") == 1 and fanout_count(r, "race", "won") == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_race_every_backend_loses_answers_like_one_backend(fakes, start_router, stream):
    (a, c), r = await start(fakes, start_router, ("a", "c"), {
        "m": route("race", b("a", "status:500"), b("c", "first-byte:0.2+status:503"))})
    resp, body, _ = await ask(r, "m", stream=stream)
    assert resp.status == 502 and "x-router-backend" not in resp.headers
    assert_error(body, "bad_gateway")
    assert len(a.seen) == 1 and len(c.seen) == 1  # no retries: each backend asked once
    assert fanout_count(r, "race", "failed") == 2


async def test_race_width_caps_the_copies(fakes, start_router):
    (x, y, z), r = await start(fakes, start_router, ("x", "y", "z"), {
        "m": route("race", b("x"), b("y"), b("z"), fanout_width=2)})
    for _ in range(3):
        resp, _, _ = await ask(r, "m")
        assert resp.status == 200
    assert len(x.seen) + len(y.seen) + len(z.seen) == 6


async def test_race_copies_respect_max_concurrency(fakes, start_router):
    (a, c), r = await start(fakes, start_router, ("a", "c"), {
        "m": route("race", {**b("a", "first-byte:0.5"), "max_concurrency": 1},
                   b("c", "first-byte:0.5"))})
    results = await asyncio.gather(*(ask(r, "m") for _ in range(4)))
    assert [resp.status for resp, _, _ in results] == [200] * 4
    assert a.recorder.max_inflight == 1 and len(a.seen) >= 1
    assert len(c.seen) == 4
    await eventually(lambda: all(s.inflight == 0 for s in r.worker.states.values()))


# --- hedge -------------------------------------------------------------------------------------

async def test_hedge_sends_the_second_copy_only_after_the_delay(fakes, start_router):
    (slow, fast), r = await start(fakes, start_router, ("slow", "fast"), {
        "m": route("hedge", b("slow", "first-byte:3"), b("fast"), hedge_after_ms=400)})
    started = time.monotonic()
    resp, _, answered = await ask(r, "m", stream=True)
    assert resp.status == 200 and resp.headers["x-router-backend"] == "fast/gpt-x"
    assert answered - started < 2.5
    # Round robin's first choice is the slow one; the fast one was asked only after 400 ms.
    gap = fast.seen[0].t_received - slow.seen[0].t_received
    assert gap >= 0.4 - 0.05, gap
    await eventually(lambda: slow.seen[0].t_disconnected is not None)
    assert slow.seen[0].t_disconnected - answered < 0.5  # type: ignore[operator]
    assert fanout_count(r, "hedge", "won") == 1 and fanout_count(r, "hedge", "cancelled") == 1


async def test_hedge_sends_no_second_copy_when_the_first_answers_in_time(fakes, start_router):
    (a, c), r = await start(fakes, start_router, ("a", "c"), {
        "m": route("hedge", b("a"), b("c"), hedge_after_ms=1000)})
    for i in range(6):
        resp, _, _ = await ask(r, "m", stream=i % 2 == 1)
        assert resp.status == 200
    await asyncio.sleep(1.2)  # past the delay: nothing was left waiting to hedge
    assert len(a.seen) + len(c.seen) == 6
    assert fanout_count(r, "hedge", "won") == 6 and fanout_count(r, "hedge", "cancelled") == 0


async def test_hedge_a_failed_copy_sends_the_next_at_once(fakes, start_router):
    _, r = await start(fakes, start_router, ("bad", "good"), {
        "m": route("hedge", b("bad", "status:500"), b("good"), hedge_after_ms=5000)})
    started = time.monotonic()
    resp, _, answered = await ask(r, "m")
    assert resp.status == 200 and resp.headers["x-router-backend"] == "good/gpt-x"
    assert answered - started < 2.5  # not the 5 s hedge delay
    assert fanout_count(r, "hedge", "failed") == 1 and fanout_count(r, "hedge", "won") == 1


async def test_hedge_relays_a_4xx_that_blames_the_request_without_a_second_copy(
        fakes, start_router):
    (picky, other), r = await start(fakes, start_router, ("picky", "other"), {
        "m": route("hedge", b("picky", "status:400"), b("other"), hedge_after_ms=5000)})
    resp, body, _ = await ask(r, "m")
    assert resp.status == 400 and body["error"]["message"] == "fake failure 400"
    assert len(picky.seen) == 1 and other.seen == []


async def test_hedge_max_hedges_spaces_each_extra_copy_by_the_delay(fakes, start_router):
    ups, r = await start(fakes, start_router, ("s1", "s2", "s3"), {
        "m": route("hedge", b("s1", "first-byte:4"), b("s2", "first-byte:4"),
                   b("s3", "first-byte:1"), hedge_after_ms=300, max_hedges=2)})
    resp, _, _ = await ask(r, "m")
    assert resp.status == 200 and resp.headers["x-router-backend"] == "s3/first-byte:1"
    # Whichever order the strategy chose, the three copies left 300 ms apart.
    t1, t2, t3 = sorted(u.seen[0].t_received for u in ups)
    assert t2 - t1 >= 0.25 and t3 - t2 >= 0.25
    await eventually(lambda: all(u.seen[0].t_disconnected is not None for u in ups[:2]))
    assert fanout_count(r, "hedge", "cancelled") == 2


async def test_hedge_p95_waits_for_samples_then_hedges_at_the_observed_p95(fakes, start_router):
    (a, c), r = await start(fakes, start_router, ("a", "c"), {
        "m": route("hedge", b("a"), b("c"))})  # hedge_after_ms: p95, the default
    # Too few first bytes seen yet: no hedge, however slow the first backend is.
    a.recorder.override = "first-byte:1"
    resp, _, _ = await ask(r, "m")
    assert resp.headers["x-router-backend"] == "a/gpt-x" and c.seen == []
    a.recorder.override = None
    for _ in range(TtfbWindow.MIN_SAMPLES + 4):
        assert (await ask(r, "m"))[0].status == 200
    # Now a stalls: a request that starts on it is hedged to c after the observed p95 (fast
    # answers: milliseconds), long before a's 5 s.
    a.recorder.override = "first-byte:5"
    before = len(a.seen)
    for _ in range(4):
        started = time.monotonic()
        resp, _, answered = await ask(r, "m")
        assert resp.status == 200 and answered - started < 2.5
        if len(a.seen) > before:
            break
    assert len(a.seen) > before, "round robin never started a request on a"
    assert resp.headers["x-router-backend"] == "c/gpt-x"
    assert c.seen[-1].t_received > a.seen[-1].t_received
    await eventually(lambda: a.seen[-1].t_disconnected is not None)


def test_ttfb_window_p95() -> None:
    window = TtfbWindow()
    for _ in range(TtfbWindow.MIN_SAMPLES - 1):
        window.record(0.001)
    assert window.p95() is None
    for _ in range(200):
        window.record(0.010)
    for _ in range(5):
        window.record(1.0)
    assert window.p95() == 0.010  # 5 slow of 224: past the 95th percentile
    for _ in range(TtfbWindow.SIZE):  # old samples roll out of the window
        window.record(0.5)
    assert window.p95() == 0.5


# --- all ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2])
async def test_all_json_merges_choices_by_backend_with_indices_and_usage(fakes, start_router, n):
    (a, c), r = await start(fakes, start_router, ("a", "c"), {
        "m": route("all", b("a", "chunks:2"), b("c", "chunks:3"))})
    resp, body, _ = await ask(r, "m", n=n)
    assert resp.status == 200
    assert resp.headers["x-router-backend"] == "a/chunks:2,c/chunks:3"
    assert body["object"] == "chat.completion" and body["model"] == "m"
    choices = body["choices"]
    assert [ch["index"] for ch in choices] == list(range(2 * n))
    assert [ch["backend"] for ch in choices] == ["a/chunks:2"] * n + ["c/chunks:3"] * n
    assert [ch["message"]["content"] for ch in choices] == \
        ["tok0 tok1 "] * n + ["tok0 tok1 tok2 "] * n
    assert body["usage"] == {"prompt_tokens": 2 * PROMPT, "completion_tokens": 5 * n,
                             "total_tokens": 2 * PROMPT + 5 * n}
    assert a.seen[0].body["n"] == n and c.seen[0].body["n"] == n
    assert fanout_count(r, "all", "won") == 2


@pytest.mark.parametrize("include_usage", [False, True])
async def test_all_stream_interleaves_as_they_arrive_with_remapped_indices(
        fakes, start_router, include_usage):
    (_a, _c), r = await start(fakes, start_router, ("a", "c"), {
        "m": route("all", b("a", "chunks:3+gap:0.3"), b("c", "chunks:3"))})
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    resp, raw, _ = await ask(r, "m", stream=True, **extra)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    assert raw.endswith(DONE) and raw.count(DONE) == 1
    evs = events(raw)
    assert evs[-1] == "[DONE]"
    chunks = [e for e in evs[:-1] if e["choices"]]
    text: dict[int, str] = {0: "", 1: ""}
    finished_at: dict[int, int] = {}
    for at, chunk in enumerate(chunks):
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == "m"
        for choice in chunk["choices"]:
            assert choice["backend"] == ("a/chunks:3+gap:0.3", "c/chunks:3")[choice["index"]]
            text[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"] is not None:
                assert choice["finish_reason"] == "stop"
                finished_at[choice["index"]] = at
    assert text == {0: "tok0 tok1 tok2 ", 1: "tok0 tok1 tok2 "}
    # c answers at once, a over 0.9 s: c's whole answer came first, not in backend order.
    assert finished_at[1] < finished_at[0]
    usage = [e for e in evs[:-1] if not e["choices"]]
    if include_usage:
        assert usage == [{**usage[0], "usage": {"prompt_tokens": 2 * PROMPT,
                                                "completion_tokens": 6,
                                                "total_tokens": 2 * PROMPT + 6}}]
        assert evs[-2] is usage[0]
    else:
        assert usage == []


async def test_all_stream_with_n_gives_each_backend_its_own_indices(fakes, start_router):
    _, r = await start(fakes, start_router, ("a", "c"), {
        "m": route("all", b("a", "chunks:2"), b("c", "chunks:2"))})
    _, raw, _ = await ask(r, "m", stream=True, n=3)
    owners: dict[int, set[str]] = {}
    for chunk in events(raw)[:-1]:
        for choice in chunk["choices"]:
            owners.setdefault(choice["index"], set()).add(choice["backend"])
    assert owners == {i: {"a/chunks:2" if i < 3 else "c/chunks:2"} for i in range(6)}


@pytest.mark.parametrize("stream", [False, True])
async def test_all_a_failing_backend_gives_an_error_choice_and_the_others_arrive(
        fakes, start_router, stream):
    _, r = await start(fakes, start_router, ("bad", "ok"), {
        "m": route("all", b("bad", "status:500"), b("ok", "first-byte:0.2"))})
    resp, body, _ = await ask(r, "m", stream=stream)
    assert resp.status == 200
    if stream:
        assert body.count(DONE) == 1 and body.endswith(DONE)
        choices = [ch for e in events(body)[:-1] for ch in e["choices"]]
        errors = [ch for ch in choices if ch["finish_reason"] == "error"]
        assert [(ch["index"], ch["backend"]) for ch in errors] == [(0, "bad/status:500")]
        assert {ch["index"] for ch in choices if ch["backend"] == "ok/first-byte:0.2"} == {1}
        assert any(ch["finish_reason"] == "stop" for ch in choices if ch["index"] == 1)
    else:
        errors = [ch for ch in body["choices"] if ch["finish_reason"] == "error"]
        assert len(body["choices"]) == 2
        assert errors == [{"index": 0, "backend": "bad/status:500", "finish_reason": "error",
                           "message": {"role": "assistant", "content": None},
                           "logprobs": None, "error": errors[0]["error"]}]
        assert body["choices"][1]["backend"] == "ok/first-byte:0.2"
        choices = body["choices"]
    assert errors[0]["error"]["code"] == "bad_gateway"
    assert fanout_count(r, "all", "failed") == 1 and fanout_count(r, "all", "won") == 1


async def test_all_a_backend_cut_mid_stream_ends_its_choice_with_error(fakes, start_router):
    _, r = await start(fakes, start_router, ("cut", "ok"), {
        "m": route("all", b("cut", "chunks:5+cut:2"), b("ok", "chunks:3+gap:0.1"))})
    resp, raw, _ = await ask(r, "m", stream=True)
    assert resp.status == 200 and raw.count(DONE) == 1 and raw.endswith(DONE)
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for chunk in events(raw)[:-1]:
        for choice in chunk["choices"]:
            by_index[choice["index"]].append(choice)
    cut = by_index[0]
    assert "".join(ch["delta"].get("content") or "" for ch in cut) == "tok0 tok1 "
    assert [ch["finish_reason"] for ch in cut][-1] == "error"
    assert [ch["finish_reason"] for ch in by_index[1]][-1] == "stop"


@pytest.mark.parametrize("stream", [False, True])
async def test_all_every_backend_failing_is_an_error(fakes, start_router, stream):
    (a, c), r = await start(fakes, start_router, ("a", "c"), {
        "m": route("all", b("a", "status:500"), b("c", "status:503"))})
    resp, body, _ = await ask(r, "m", stream=stream)
    assert resp.status == 502
    assert_error(body, "bad_gateway")
    assert len(a.seen) == 1 and len(c.seen) == 1


# --- the client leaves ---------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "stream", "extra"), [
    ("race", False, {}), ("race", True, {}), ("hedge", True, {"hedge_after_ms": 100}),
    ("all", False, {}), ("all", True, {}),
])
async def test_a_client_leaving_during_fanout_cancels_every_upstream(fakes, start_router, mode,
                                                                     stream, extra):
    (a, c), r = await start(fakes, start_router, ("a", "c"), {
        "m": route(mode, b("a", "hang"), b("c", "hang"), **extra)})

    async def client() -> None:
        await ask(r, "m", stream=stream)

    task = asyncio.ensure_future(client())
    await eventually(lambda: len(a.seen) == 1 and len(c.seen) == 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await eventually(lambda: all(f.seen[0].t_disconnected is not None for f in (a, c)))
    await eventually(lambda: all(s.inflight == 0 for s in r.worker.states.values()))
    assert fanout_count(r, mode, "cancelled") == 2


async def test_a_client_leaving_mid_stream_of_all_cancels_every_upstream(fakes, start_router):
    (a, c), r = await start(fakes, start_router, ("a", "c"), {
        "m": route("all", b("a", "chunks:100+gap:0.1"), b("c", "chunks:100+gap:0.1"))})
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
        assert resp.status == 200
        await resp.content.readline()
        await eventually(lambda: len(a.seen) == 1 and len(c.seen) == 1)
        resp.close()
    await eventually(lambda: all(f.seen[0].t_disconnected is not None for f in (a, c)))
    await eventually(lambda: all(s.inflight == 0 for s in r.worker.states.values()))
    assert all(f.seen[0].t_finished is None for f in (a, c))


# --- sessions and limits ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["race", "hedge"])
async def test_a_pinned_session_ignores_race_and_hedge(fakes, start_router, mode):
    (a, c), r = await start(fakes, start_router, ("a", "c"), {
        "m": route(mode, b("a"), b("c"), **({"hedge_after_ms": 50} if mode == "hedge" else {}))})
    seen = set()
    for _ in range(3):
        resp, _, _ = await ask(r, "m", session_id="conv-1")
        assert resp.status == 200 and resp.headers["x-session-id"] == "conv-1"
        seen.add(resp.headers["x-router-backend"])
    assert len(seen) == 1
    assert len(a.seen) + len(c.seen) == 3
    assert fanout_count(r, mode, "won") == 0


async def test_all_with_a_session_asks_every_backend_and_pins_nothing(fakes, start_router):
    (a, c), r = await start(fakes, start_router, ("a", "c"), {"m": route("all", b("a"), b("c"))})
    resp, body, _ = await ask(r, "m", session_id="conv-2")
    assert resp.status == 200 and resp.headers["x-session-id"] == "conv-2"
    assert len(body["choices"]) == 2 and len(a.seen) == 1 and len(c.seen) == 1
    assert all("session_id" not in f.seen[0].body for f in (a, c))
    async with r.http.get(f"{r.url}/api/v1/sessions/conv-2",
                          headers={"Authorization": f"Bearer {KEY}"}) as got:
        assert got.status == 404


async def test_fanout_counts_once_against_rpm_and_charges_the_real_total_tokens(
        fakes, start_router, redis_server):
    _, r = await start(fakes, start_router, ("a", "c"), {
        "all": route("all", b("a"), b("c")),
        "race": route("race", b("a", "first-byte:2"), b("c"))},
        limits={"rpm": 100, "tokens_per_day": 100_000},
        store={"url": redis_server.url, "timeout_ms": 200})
    day_key = limit_keys("test")[3]
    expected = {"all": 2 * (PROMPT + 5), "race": PROMPT + 5}  # the race's loser is not charged
    used = 0
    remaining = []
    async with Redis.from_url(redis_server.url) as redis:
        for model, stream in (("all", False), ("all", True), ("race", False)):
            resp, _, _ = await ask(r, model, stream=stream)
            assert resp.status == 200
            remaining.append(int(resp.headers["x-ratelimit-remaining-requests"]))
            used += expected[model]

            async def settled(want: int = used) -> bool:
                return await redis.get(day_key) == str(want).encode()

            await eventually(settled, 5, f"{used} tokens charged for the day")
    assert remaining == [99, 98, 97]  # one request each, however many upstreams it asked


async def test_the_openai_sdk_reads_all_merged_json_and_streams(fakes, start_router):
    import openai

    _, r = await start(fakes, start_router, ("a", "bad"), {
        "m": route("all", b("a", "chunks:3"), b("bad", "status:500"))})
    client = openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key=KEY, max_retries=0, timeout=20)
    try:
        answer = await client.chat.completions.create(model="m", messages=USER_MSG, n=2)
        assert [c.index for c in answer.choices] == [0, 1, 2, 3]
        assert [c.finish_reason for c in answer.choices] == ["stop", "stop", "error", "error"]
        assert answer.choices[0].message.content == "tok0 tok1 tok2 "
        assert (answer.choices[2].model_extra or {})["backend"] == "bad/status:500"
        stream = await client.chat.completions.create(
            model="m", messages=USER_MSG, stream=True, stream_options={"include_usage": True})
        text, finishes, usage = "", {}, None
        async for chunk in stream:  # the SDK raises on an `error` event: there is none
            for choice in chunk.choices:
                text += choice.delta.content or ""
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
            usage = chunk.usage or usage
        assert text == "tok0 tok1 tok2 " and finishes == {0: "stop", 1: "error"}
        assert usage is not None and usage.completion_tokens == 3
    finally:
        await client.close()
