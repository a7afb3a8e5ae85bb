"""Sessions (SPEC 5) through the real app: pins shared by two routers on one real redis-server,
re-pinning, TTL, user isolation, automation settings, auto-creation, route mismatch, memory://
in one process, requests counted only when admitted, and agreement by consistent hashing with
bounded load when there is no shared store."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections import Counter
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from router.store.redis import limit_keys, pin_key, settings_key
from tests.conftest import (
    KEY,
    OTHER_KEY,
    USER_MSG,
    eventually,
    openai_provider,
    router_config,
)

NO_EJECTION = {"consecutive_failures": 1000}
EJECT_AT_ONCE = {"consecutive_failures": 1, "base_cooldown_s": 30}


def config(ups: list[Any], store: dict[str, Any], *, ejection: dict[str, Any] | None = None,
           **extra: Any) -> dict[str, Any]:
    backends = [{"provider": u.name, "model": "gpt-x"} for u in ups]
    ej = ejection or NO_EJECTION
    return router_config(
        {u.name: openai_provider(u) for u in ups},
        {"m": {"backends": backends, "ejection": ej},
         "same": {"backends": list(reversed(backends)), "ejection": ej},  # same backend set
         "solo": {"backends": backends[:1], "ejection": ej}},
        store=store, **extra)


def redis(server: Any) -> dict[str, Any]:
    return {"url": server.url, "timeout_ms": 500}


MEMORY = {"url": "memory://"}


async def ask(r: Any, session: str | None = None, *, model: str | None = "m",
              stream: bool = False, key: str = KEY) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body or the SSE text)."""
    body: dict[str, Any] = {"messages": USER_MSG, "stream": stream}
    if model is not None:
        body["model"] = model
    if session is not None:
        body["session_id"] = session
    async with r.chat(body, key=key) as resp:
        payload = await resp.json() if resp.content_type == "application/json" \
            else await resp.text()
        return resp.status, dict(resp.headers), payload


async def backend_of(r: Any, session: str, **kw: Any) -> str:
    status, headers, _ = await ask(r, session, **kw)
    assert status == 200
    assert headers["x-session-id"] == session
    return headers["x-router-backend"]


def pins(r: Any, outcome: str) -> float:
    return r.worker.metrics.registry.get_sample_value(
        "router_session_pins_total", {"outcome": outcome}) or 0.0


async def requests_on(r: Any, session: str, expected: int, key: str = KEY) -> dict[str, Any]:
    """The session as GET shows it, once it counts `expected` requests (an admitted request's
    count is sent without waiting for it); fails if it never does."""
    deadline = time.monotonic() + 10.0
    while True:
        status, info = await api(r, "GET", f"/api/v1/sessions/{session}", key=key)
        assert status == 200
        if info["requests"] == expected or time.monotonic() > deadline:
            assert info["requests"] == expected, info
            return info  # type: ignore[no-any-return]
        await asyncio.sleep(0.02)


def with_limits(cfg: dict[str, Any], **limits: int) -> dict[str, Any]:
    cfg["auth"]["api_keys"][0]["limits"] = limits
    return cfg


async def api(r: Any, method: str, path: str, *, key: str = KEY,
              json: Any = None, data: bytes | None = None) -> tuple[int, Any]:
    async with r.http.request(method, r.url + path, json=json, data=data,
                              headers={"Authorization": f"Bearer {key}"}) as resp:
        body = await resp.read()
        return resp.status, orjson.loads(body) if body else None


# --- pins shared by replicas -------------------------------------------------------------------

async def test_six_sessions_alternating_two_replicas_each_stay_on_one_backend(
        fakes, start_router, redis_server):
    ups = [await fakes(n) for n in ("a", "b", "c")]
    cfg = config(ups, redis(redis_server))
    replicas = [await start_router(cfg), await start_router(cfg)]
    seen: dict[str, set[str]] = {f"s{i}": set() for i in range(6)}
    for round_ in range(4):
        for i, session in enumerate(seen):
            r = replicas[(i + round_) % 2]
            seen[session].add(await backend_of(r, session))
    assert all(len(backends) == 1 for backends in seen.values()), seen
    # The strategy placed them: round robin spreads six new sessions over the three backends.
    assert len({next(iter(b)) for b in seen.values()}) > 1
    assert sum(pins(r, "new") for r in replicas) == 6
    assert sum(pins(r, "hit") for r in replicas) == 18
    assert sum(pins(r, "repin") for r in replicas) == 0
    # Both replicas show the same pin, with every request counted.
    for r in replicas:
        status, info = await api(r, "GET", "/api/v1/sessions/s0")
        assert status == 200
        assert info["backend"] == next(iter(seen["s0"])) and info["route"] == "m"
        assert info["requests"] == 4
        assert info["created_at"] <= info["last_used_at"] < info["expires_at"]


async def test_the_pin_and_settings_share_a_slot_and_the_pin_has_the_ttl(
        fakes, start_router, redis_server):
    r = await start_router(config([await fakes("a")], redis(redis_server),
                                  sessions={"ttl_s": 120}))
    await backend_of(r, "s")
    assert (await api(r, "PUT", "/api/v1/automation/settings",
                      json={"auto_create_session": False}))[0] == 200
    key, skey = pin_key("alice", "s"), settings_key("alice")
    def tag(k: str) -> str:
        return k.split("{", 1)[1].split("}", 1)[0]

    assert tag(key) == tag(skey)  # one hash tag: one Cluster slot
    assert "alice" not in key  # user names never show in a key listing
    async with Redis.from_url(redis_server.url) as client:
        assert 110_000 < await client.pttl(key) <= 120_000
        assert (await client.hgetall(key))[b"backend"] == b"a/gpt-x"
        assert orjson.loads(await client.get(skey)) == {"auto_create_session": False}
        assert not await client.exists(*limit_keys("test"))  # no limits: none charged


async def test_racing_replicas_agree_on_one_pin_for_a_new_session(
        fakes, start_router, redis_server):
    ups = [await fakes(n) for n in ("a", "b", "c")]
    cfg = config(ups, redis(redis_server))
    replicas = [await start_router(cfg), await start_router(cfg)]
    # Offset one replica's round robin so the two would choose differently on their own.
    await backend_of(replicas[1], "warm-up")
    for n in range(5):
        got = await asyncio.gather(*(backend_of(replicas[i % 2], f"race{n}")
                                     for i in range(6)))
        assert len(set(got)) == 1, got


async def test_an_ejected_pinned_backend_is_repinned_once_then_the_session_sticks(
        fakes, start_router, redis_server):
    ups = [await fakes(n) for n in ("a", "b", "c")]
    r = await start_router(config(ups, redis(redis_server), ejection=EJECT_AT_ONCE))
    # s0 and s3 land on the same backend (round robin over three).
    first = {s: await backend_of(r, s) for s in ("s0", "s1", "s2", "s3")}
    assert first["s0"] == first["s3"]
    bad = next(u for u in ups if first["s0"].startswith(u.name + "/"))
    bad.recorder.override = "status:500"
    assert len(bad.seen) == 2
    # s0: its backend fails (and is ejected); another answers and the pin moves there.
    moved = await backend_of(r, "s0")
    assert moved != first["s0"]
    assert len(bad.seen) == 3  # the pinned backend was tried first
    # s3: its backend is ejected now: re-pinned before anything goes upstream.
    moved3 = await backend_of(r, "s3")
    assert moved3 != first["s3"] and len(bad.seen) == 3
    assert pins(r, "repin") == 2
    for _ in range(4):
        assert await backend_of(r, "s0") == moved
        assert await backend_of(r, "s3") == moved3
    assert pins(r, "repin") == 2 and len(bad.seen) == 3
    status, info = await api(r, "GET", "/api/v1/sessions/s0")
    assert (status, info["backend"], info["requests"]) == (200, moved, 6)


async def test_a_pin_expires_after_its_ttl_and_the_next_request_pins_afresh(
        fakes, start_router, redis_server):
    ups = [await fakes(n) for n in ("a", "b")]
    r = await start_router(config(ups, redis(redis_server), sessions={"ttl_s": 2}))
    await backend_of(r, "s")
    await asyncio.sleep(1.2)
    await backend_of(r, "s")  # within the TTL: slides it
    await asyncio.sleep(1.2)
    status, info = await api(r, "GET", "/api/v1/sessions/s")
    assert status == 200 and info["requests"] == 2  # past 2 s after creation, still alive

    async def expired() -> bool:  # 2 s after its last use
        return (await api(r, "GET", "/api/v1/sessions/s"))[0] == 404

    await eventually(expired, 10, "the session's expiry", every_s=0.05)
    await backend_of(r, "s")
    assert pins(r, "new") == 2
    status, info = await api(r, "GET", "/api/v1/sessions/s")
    assert status == 200 and info["requests"] == 1


async def test_the_users_session_ttl_setting_applies(fakes, start_router):
    up = await fakes("a")
    r = await start_router(config([up], MEMORY))
    assert (await api(r, "PUT", "/api/v1/automation/settings",
                      json={"session_ttl_s": 60}))[0] == 200
    await backend_of(r, "s")
    await backend_of(r, "s")
    _, info = await api(r, "GET", "/api/v1/sessions/s")
    assert 55 <= info["expires_at"] - info["last_used_at"] <= 61


async def test_sessions_are_per_user_and_another_users_session_is_404(
        fakes, start_router, redis_server):
    ups = [await fakes(n) for n in ("a", "b")]
    r = await start_router(config(ups, redis(redis_server)))
    await backend_of(r, "shared-name")
    await backend_of(r, "shared-name")
    # bob (another key, another user) sees no such session and cannot end it...
    assert (await api(r, "GET", "/api/v1/sessions/shared-name", key=OTHER_KEY))[0] == 404
    assert (await api(r, "DELETE", "/api/v1/sessions/shared-name", key=OTHER_KEY))[0] == 404
    # ...and the same id is his own session, with its own pin.
    await backend_of(r, "shared-name", key=OTHER_KEY)
    _, bobs = await api(r, "GET", "/api/v1/sessions/shared-name", key=OTHER_KEY)
    _, alices = await api(r, "GET", "/api/v1/sessions/shared-name")
    assert (bobs["requests"], alices["requests"]) == (1, 2)
    assert (await api(r, "DELETE", "/api/v1/sessions/shared-name"))[0] == 204
    assert (await api(r, "GET", "/api/v1/sessions/shared-name"))[0] == 404
    assert (await api(r, "GET", "/api/v1/sessions/shared-name", key=OTHER_KEY))[0] == 200
    assert (await api(r, "DELETE", "/api/v1/sessions/shared-name"))[0] == 404


async def test_session_endpoints_need_a_credential(fakes, start_router):
    r = await start_router(config([await fakes("a")], MEMORY))
    for method, path in (("GET", "/api/v1/sessions/x"), ("DELETE", "/api/v1/sessions/x"),
                         ("GET", "/api/v1/automation/settings"),
                         ("PUT", "/api/v1/automation/settings")):
        async with r.http.request(method, r.url + path) as resp:
            assert resp.status == 401


# --- route mismatch ----------------------------------------------------------------------------

async def test_a_session_used_with_another_route_is_409_unless_it_has_the_same_backends(
        fakes, start_router):
    ups = [await fakes(n) for n in ("a", "b")]
    r = await start_router(config(ups, MEMORY))
    pinned = await backend_of(r, "s")
    status, _, body = await ask(r, "s", model="solo")
    assert status == 409
    assert body["error"]["code"] == "session_route_mismatch"
    assert "'m'" in body["error"]["message"]
    # `same` has the same backend set: the session goes on, on its backend.
    for _ in range(3):
        assert await backend_of(r, "s", model="same") == pinned


# --- automation settings -----------------------------------------------------------------------

async def test_settings_default_from_the_config_and_put_replaces_them(fakes, start_router):
    ups = [await fakes(n) for n in ("a", "b")]
    r = await start_router(config(ups, MEMORY, sessions={"auto_create": True, "ttl_s": 900},
                                  default_route="m"))
    assert await api(r, "GET", "/api/v1/automation/settings") == (200, {
        "auto_create_session": True, "session_ttl_s": 900, "default_model": "m"})
    new = {"auto_create_session": False, "session_ttl_s": 3600, "default_model": "solo"}
    assert await api(r, "PUT", "/api/v1/automation/settings", json=new) == (200, new)
    assert await api(r, "GET", "/api/v1/automation/settings") == (200, new)
    # A PUT replaces: what it leaves out goes back to the defaults.
    assert await api(r, "PUT", "/api/v1/automation/settings",
                     json={"session_ttl_s": 60}) == (200, {
                         "auto_create_session": True, "session_ttl_s": 60, "default_model": "m"})
    # Settings are per user.
    assert (await api(r, "GET", "/api/v1/automation/settings", key=OTHER_KEY))[1][
        "session_ttl_s"] == 900


@pytest.mark.parametrize(("body", "loc", "type_"), [
    ({"session_ttl_s": 59}, ["body", "session_ttl_s"], "greater_than_equal"),
    ({"session_ttl_s": 604801}, ["body", "session_ttl_s"], "less_than_equal"),
    ({"session_ttl_s": "3600"}, ["body", "session_ttl_s"], "int_type"),
    ({"session_ttl_s": 3600.5}, ["body", "session_ttl_s"], "int_type"),
    ({"auto_create_session": "yes"}, ["body", "auto_create_session"], "bool_type"),
    ({"default_model": "nope"}, ["body", "default_model"], "value_error"),
    ({"default_model": 3}, ["body", "default_model"], "string_type"),
    ({"sticky": True}, ["body", "sticky"], "extra_forbidden"),
    ([1, 2], ["body"], "model_type"),
])
async def test_bad_settings_are_422_in_the_seeds_shape(fakes, start_router, body, loc, type_):
    r = await start_router(config([await fakes("a")], MEMORY))
    status, answer = await api(r, "PUT", "/api/v1/automation/settings", json=body)
    assert status == 422
    assert [(d["loc"], d["type"]) for d in answer["detail"]] == [(loc, type_)]
    assert all(isinstance(d["msg"], str) and d["msg"] for d in answer["detail"])
    # Nothing was stored.
    assert (await api(r, "GET", "/api/v1/automation/settings"))[1]["session_ttl_s"] == 3600


async def test_settings_that_are_not_json_are_422(fakes, start_router):
    r = await start_router(config([await fakes("a")], MEMORY))
    status, answer = await api(r, "PUT", "/api/v1/automation/settings", data=b"{nope")
    assert status == 422 and answer["detail"][0]["loc"] == ["body"]


async def test_every_problem_is_listed(fakes, start_router):
    r = await start_router(config([await fakes("a")], MEMORY))
    status, answer = await api(r, "PUT", "/api/v1/automation/settings",
                               json={"session_ttl_s": 1, "auto_create_session": 1, "x": 0})
    assert status == 422
    assert sorted(d["loc"][1] for d in answer["detail"]) == [
        "auto_create_session", "session_ttl_s", "x"]


async def test_default_model_must_be_a_route_the_credential_may_use(fakes, start_router):
    ups = [await fakes(n) for n in ("a", "b")]
    r = await start_router(config(ups, MEMORY))
    # bob's key may use only the first route (`m`).
    status, answer = await api(r, "PUT", "/api/v1/automation/settings", key=OTHER_KEY,
                               json={"default_model": "solo"})
    assert status == 422 and answer["detail"][0]["loc"] == ["body", "default_model"]
    assert (await api(r, "PUT", "/api/v1/automation/settings", key=OTHER_KEY,
                      json={"default_model": "m"}))[0] == 200


async def test_a_request_without_model_goes_to_the_users_default_model(fakes, start_router):
    ups = [await fakes(n) for n in ("a", "b")]
    r = await start_router(config(ups, MEMORY, default_route="m"))
    assert (await api(r, "PUT", "/api/v1/automation/settings",
                      json={"default_model": "solo"}))[0] == 200
    for _ in range(3):
        status, headers, _ = await ask(r, model=None)
        assert status == 200 and headers["x-router-backend"] == "a/gpt-x"
    # Another user without settings gets the config's default route.
    got = {(await ask(r, model=None, key=OTHER_KEY))[1]["x-router-backend"] for _ in range(4)}
    assert got == {"a/gpt-x", "b/gpt-x"}


# --- auto-creation -----------------------------------------------------------------------------

async def test_without_auto_creation_no_session_is_made(fakes, start_router):
    r = await start_router(config([await fakes("a")], MEMORY))
    status, headers, body = await ask(r)
    assert status == 200 and "x-session-id" not in headers and "session_id" not in body
    status, headers, text = await ask(r, stream=True)
    assert status == 200 and "x-session-id" not in headers and "session_id" not in text


async def test_auto_creation_returns_the_new_id_in_the_header_and_the_json_body(
        fakes, start_router, redis_server):
    ups = [await fakes(n) for n in ("a", "b")]
    r = await start_router(config(ups, redis(redis_server)))
    assert (await api(r, "PUT", "/api/v1/automation/settings",
                      json={"auto_create_session": True}))[0] == 200
    status, headers, body = await ask(r)
    assert status == 200
    sid = headers["x-session-id"]
    assert body["session_id"] == sid and len(sid) >= 22  # >= 128 bits, URL-safe
    assert set(sid) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert body["object"] == "chat.completion" and body["choices"]  # the rest untouched
    status, info = await api(r, "GET", f"/api/v1/sessions/{sid}")
    assert status == 200 and info["backend"] == headers["x-router-backend"]
    # The client goes on with it: the same backend, no new id.
    for _ in range(3):
        assert await backend_of(r, sid) == headers["x-router-backend"]
    # Each request without an id is a new session.
    assert (await ask(r))[1]["x-session-id"] != sid
    assert pins(r, "new") == 2


async def test_auto_creation_puts_the_id_in_the_first_sse_chunk_only(fakes, start_router):
    r = await start_router(config([await fakes("a")], MEMORY, sessions={"auto_create": True}))
    status, headers, text = await ask(r, stream=True)
    assert status == 200
    sid = headers["x-session-id"]
    events = [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert chunks[0]["session_id"] == sid
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert all("session_id" not in c for c in chunks[1:])
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                      if c.get("choices"))
    assert content  # the stream itself is intact


async def test_a_client_session_id_is_echoed_and_never_sent_upstream(fakes, start_router):
    up = await fakes("a")
    r = await start_router(config([up], MEMORY, sessions={"auto_create": True}))
    status, headers, body = await ask(r, "mine")
    assert status == 200 and headers["x-session-id"] == "mine"
    assert "session_id" not in body  # only an id the router made is written into the body
    assert all("session_id" not in s.body for s in up.seen)


# --- without a shared store --------------------------------------------------------------------

async def test_memory_store_pins_in_one_process(fakes, start_router):
    ups = [await fakes(n) for n in ("a", "b", "c")]
    r = await start_router(config(ups, MEMORY))
    placed = {f"s{i}": await backend_of(r, f"s{i}") for i in range(6)}
    assert len(set(placed.values())) == 3
    for _ in range(3):
        for session, backend in placed.items():
            assert await backend_of(r, session) == backend
    assert (pins(r, "new"), pins(r, "hit")) == (6, 18)
    assert (await api(r, "DELETE", "/api/v1/sessions/s0"))[0] == 204
    assert (await api(r, "GET", "/api/v1/sessions/s0"))[0] == 404


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_with_redis_down_replicas_still_agree_by_hashing(fakes, start_router):
    ups = [await fakes(n) for n in ("a", "b", "c")]
    down = {"url": f"redis://127.0.0.1:{_closed_port()}/0", "timeout_ms": 200,
            "on_failure": "open"}
    cfg = config(ups, down)
    replicas = [await start_router(cfg), await start_router(cfg)]
    placed: dict[str, set[str]] = {f"s{i}": set() for i in range(12)}
    for round_ in range(3):
        for i, session in enumerate(placed):
            placed[session].add(await backend_of(replicas[(i + round_) % 2], session))
    assert all(len(b) == 1 for b in placed.values()), placed
    spread = Counter(next(iter(b)) for b in placed.values())
    assert len(spread) >= 2  # hashed, not all on one
    errors = sum(r.worker.metrics.registry.get_sample_value(
        "router_store_errors_total", {"op": "session"}) or 0 for r in replicas)
    assert errors > 0
    # One request at a time: the load stays even, so every request went to its session's
    # hashed first choice (a `hit`); nothing tells a new session from a known one here.
    assert [sum(pins(r, o) for r in replicas) for o in ("new", "hit", "repin")] == [0, 36, 0]


async def test_without_a_shared_store_a_busy_backend_takes_no_session_past_its_share(
        fakes, start_router):
    """memory:// with several workers: pins are computed. A backend holding more than
    ceil(1.25 x its share x (in flight + 1)) requests takes no more sessions until the load
    evens out: they go to their next choice (`repin`), then come back."""
    ups = [await fakes(n) for n in ("a", "b", "c")]
    r = await start_router(config(ups, MEMORY, server={"workers": 2}))
    home = {f"s{i}": await backend_of(r, f"s{i}") for i in range(40)}
    assert [pins(r, o) for o in ("new", "hit", "repin")] == [0, 40, 0]
    assert (await api(r, "GET", "/api/v1/sessions/s0"))[0] == 404  # nothing stored
    a, on_a = ups[0], [s for s, b in home.items() if b == "a/gpt-x"]
    other = next(s for s, b in home.items() if b != "a/gpt-x")
    assert len(on_a) >= 4
    a.recorder.override = "hang"
    held = [asyncio.ensure_future(ask(r, s)) for s in on_a[:3]]
    try:
        await eventually(lambda: a.recorder.inflight == 3, 10.0, "3 requests held on a")
        # a holds all 3 requests in flight: past ceil(1.25 x 1/3 x 4) = 2.
        for _ in range(3):
            moved = await backend_of(r, on_a[3])
            assert moved != "a/gpt-x"
        assert pins(r, "repin") == 3
        assert await backend_of(r, other) == home[other]  # the others' sessions stay put
        assert pins(r, "hit") == 40 + 3 + 1  # the held three went home too
    finally:
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    a.recorder.override = None
    state = r.worker.states["a/gpt-x"]
    await eventually(lambda: state.inflight == 0, 10.0, "the end of a's requests")
    assert await backend_of(r, on_a[3]) == "a/gpt-x"  # the load is even again: back home
    assert (pins(r, "hit"), pins(r, "repin")) == (45, 3)


async def test_without_a_shared_store_an_auto_created_session_counts_as_new(
        fakes, start_router):
    ups = [await fakes(n) for n in ("a", "b", "c")]
    r = await start_router(config(ups, MEMORY, server={"workers": 2},
                                  sessions={"auto_create": True}))
    status, headers, body = await ask(r)
    assert status == 200 and body["session_id"] == headers["x-session-id"]
    sid, backend = headers["x-session-id"], headers["x-router-backend"]
    for _ in range(3):
        assert await backend_of(r, sid) == backend
    assert [pins(r, o) for o in ("new", "hit", "repin")] == [1, 3, 0]


# --- what counts as a use of a session ----------------------------------------------------

@pytest.mark.parametrize("backing", ["redis", "memory"])
async def test_a_request_the_limiter_refuses_is_not_a_use_of_its_session(
        fakes, start_router, request, backing):
    store = redis(request.getfixturevalue("redis_server")) if backing == "redis" else MEMORY
    ups = [await fakes(n) for n in ("a", "b")]
    r = await start_router(with_limits(config(ups, store), rpm=3))
    pinned = {await backend_of(r, "s") for _ in range(3)}
    assert len(pinned) == 1
    before = await requests_on(r, "s", 3)
    pin = await r.worker.store.get_pin("alice", "s")
    for _ in range(2):
        status, _, body = await ask(r, "s")
        assert status == 429 and body["error"]["code"] == "rpm"
    # Refused: neither counted nor touched (last use and expiry as they were; Redis answers
    # the expiry as its clock + PTTL, which may round a millisecond apart).
    after = await r.worker.store.get_pin("alice", "s")
    assert dataclasses.replace(after, expires_at=0) == dataclasses.replace(pin, expires_at=0)
    assert abs(after.expires_at - pin.expires_at) <= 0.005
    assert await requests_on(r, "s", 3) == before
    assert (pins(r, "new"), pins(r, "hit")) == (1, 2)


@pytest.mark.parametrize("backing", ["redis", "memory"])
async def test_with_limits_every_admitted_request_counts_once_on_its_pin(
        fakes, start_router, request, backing):
    """The pin is read with the admission (not touched: it might be refused), then counted:
    a hit by a call sent without waiting, a new or moved pin in its claim."""
    store = redis(request.getfixturevalue("redis_server")) if backing == "redis" else MEMORY
    ups = [await fakes(n) for n in ("a", "b", "c")]
    r = await start_router(with_limits(config(ups, store, ejection=EJECT_AT_ONCE),
                                       rpm=10_000, concurrency=50))
    first = {s: await backend_of(r, s) for s in ("s0", "s1", "s2", "s3")}
    assert first["s0"] == first["s3"]
    for session in first:
        assert await backend_of(r, session) == first[session]
    bad = next(u for u in ups if first["s0"].startswith(u.name + "/"))
    bad.recorder.override = "status:500"
    moved = await backend_of(r, "s0")  # placed on its pin, failed there, answered elsewhere
    assert moved != first["s0"]
    moved3 = await backend_of(r, "s3")  # its backend is ejected now: re-pinned up front
    assert moved3 != first["s3"]
    assert await backend_of(r, "s3") == moved3
    assert [pins(r, o) for o in ("new", "hit", "repin")] == [4, 6, 2]
    info = await requests_on(r, "s0", 3)
    assert info["backend"] == moved
    assert (await requests_on(r, "s3", 4))["backend"] == moved3
    assert (await requests_on(r, "s1", 2))["backend"] == first["s1"]


async def test_with_redis_down_and_on_failure_closed_a_session_request_is_503(
        fakes, start_router):
    down = {"url": f"redis://127.0.0.1:{_closed_port()}/0", "timeout_ms": 200,
            "on_failure": "closed"}
    r = await start_router(config([await fakes("a")], down))
    status, _, body = await ask(r, "s")
    assert status == 503 and body["error"]["code"] == "store_unavailable"
