"""The operator console's API on a real router in front of real fake upstreams: the status's
shape and what drives each state (a failing upstream, a 429, a failing probe, a bad reload),
admins only, no secrets; drains and undrains as clients, sessions and metrics see them."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from typing import Any

import orjson

import router
from tests.conftest import (
    ADMIN_KEY,
    ADMIN_KEY_ENTRY,
    KEY,
    USER_MSG,
    bearer,
    eventually,
    openai_provider,
    router_config,
)
from tests.integration.test_routing import ask, b, route

UPSTREAM_SECRET = "sk-upstream-secret-0123456789abcdef"
STATUS = "/api/v1/admin/status"
DRAIN = "/api/v1/admin/backends/drain"
UNDRAIN = "/api/v1/admin/backends/undrain"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def admin_config(providers: dict[str, Any], routes: dict[str, Any], **extra: Any
                 ) -> dict[str, Any]:
    config = router_config(providers, routes, **extra)
    config["auth"]["api_keys"].append(ADMIN_KEY_ENTRY)
    return config


async def status(r: Any, key: str = ADMIN_KEY) -> tuple[int, Any, bytes]:
    async with r.http.get(r.url + STATUS, headers=bearer(key)) as resp:
        raw = await resp.read()
        return resp.status, orjson.loads(raw), raw


async def post(r: Any, path: str, body: Any, key: str = ADMIN_KEY) -> tuple[int, Any]:
    async with r.http.post(r.url + path, json=body, headers=bearer(key)) as resp:
        return resp.status, await resp.json()


def backends(doc: Any, route_name: str = "m") -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in doc["routes"][route_name]["backends"]}


def states(doc: Any, route_name: str = "m") -> dict[str, str]:
    return {name: entry["state"] for name, entry in backends(doc, route_name).items()}


async def metrics(r: Any) -> str:
    async with r.http.get(r.url + "/metrics") as resp:
        return await resp.text()


# --- the status --------------------------------------------------------------------------------

async def test_the_status_is_this_workers_view_without_a_secret(fakes: Any, start_router: Any
                                                                 ) -> None:
    a, c = await fakes("a"), await fakes("c")
    r = await start_router(admin_config(
        {"a": openai_provider(a, api_key=UPSTREAM_SECRET), "c": openai_provider(c)},
        {"m": route(b("a"), b("c", name="second")),
         "other": {"backends": [b("c")], "strategy": "least_busy"}}))
    for _ in range(2):
        assert (await ask(r))[0] == 200

    code, doc, raw = await status(r)
    assert code == 200
    assert set(doc) == {"version", "uptime_s", "worker", "config", "store", "routes"}
    assert doc["version"] == router.__version__
    assert 0 <= doc["uptime_s"] < 60
    assert doc["worker"] == {"pid": os.getpid(), "workers": 1}
    config = doc["config"]
    assert set(config) == {"path", "sha256", "loaded_at", "last_reload"}
    assert config["path"] == str(r.path)
    assert config["sha256"] == hashlib.sha256(r.path.read_bytes()).hexdigest()
    assert ISO.match(config["loaded_at"]) and config["last_reload"] is None
    assert doc["store"] == {"kind": "memory", "healthy": True}
    assert set(doc["routes"]) == {"m", "other"}
    assert {k: v for k, v in doc["routes"]["other"].items() if k != "backends"} == {
        "strategy": "least_busy", "fanout": "none"}
    m = doc["routes"]["m"]
    assert (m["strategy"], m["fanout"]) == ("round_robin", "none")
    assert [entry["name"] for entry in m["backends"]] == ["a/gpt-x", "second"]
    first = m["backends"][0]
    assert set(first) == {"name", "provider", "model", "state", "inflight", "latency_ewma_ms",
                          "ejections", "rest_until"}
    assert first["provider"] == "a" and first["model"] == "gpt-x"
    assert first["state"] == "up" and first["inflight"] == 0 and first["ejections"] == 0
    assert first["rest_until"] is None
    assert isinstance(first["latency_ewma_ms"], float) and first["latency_ewma_ms"] >= 0
    # Names and numbers only: neither the upstream's key nor its URL (nor the caller's key).
    for secret in (UPSTREAM_SECRET, a.base_url, c.base_url, "127.0.0.1", ADMIN_KEY, KEY):
        assert secret.encode() not in raw, secret


async def test_the_console_api_is_for_admins_only(fakes: Any, start_router: Any) -> None:
    up = await fakes("up")
    r = await start_router(admin_config({"up": openai_provider(up)}, {"m": route(b("up"))}))
    for method, path, body in (("GET", STATUS, None), ("POST", DRAIN, {"backend": "up/gpt-x"}),
                               ("POST", UNDRAIN, {"backend": "up/gpt-x"})):
        async with r.http.request(method, r.url + path, json=body) as resp:
            assert resp.status == 401
        async with r.http.request(method, r.url + path, json=body, headers=bearer(KEY)) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "admin_required"
    assert (await ask(r))[:2] == (200, "up/gpt-x")  # nothing was drained


async def test_the_page_is_served_without_a_credential_under_a_strict_policy(
        fakes: Any, start_router: Any) -> None:
    up = await fakes("up")
    r = await start_router(admin_config({"up": openai_provider(up)}, {"m": route(b("up"))}))
    async with r.http.get(r.url + "/admin") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()
        csp = resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/]+=*'", csp)
    # Self-contained: no external script, style, font or image.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "sessionStorage" in page and "Authorization" in page
    async with r.http.get(r.url + "/openapi.json") as resp:
        paths = (await resp.json())["paths"]
    assert "security" not in paths["/admin"]["get"]
    assert paths[STATUS]["get"]["security"] == [{"bearer": []}]


async def test_each_state_is_driven_by_what_it_names(fakes: Any, start_router: Any) -> None:
    """A failing upstream ejects, a 429 with Retry-After rests, a failing probe takes the
    provider down; each is in the status with the time it comes back, where it has one."""
    bad, limited, sick, good = (await fakes("bad"), await fakes("limited"), await fakes("sick"),
                                await fakes("good"))
    sick.recorder.override = "models-500"  # only its probe fails
    r = await start_router(admin_config(
        {"bad": openai_provider(bad), "limited": openai_provider(limited),
         "sick": openai_provider(sick), "good": openai_provider(good)},
        {"m": {"backends": [b("bad", "status:500"), b("limited", "status:429+retry-after:30"),
                            b("sick"), b("good")], "retries": 3,
               "ejection": {"consecutive_failures": 1, "base_cooldown_s": 30}}},
        health={"enabled": True, "interval_s": 0.2, "timeout_s": 1}))

    async def settled() -> dict[str, Any] | None:
        await ask(r)
        doc = (await status(r))[1]
        return doc if states(doc) == {"bad/status:500": "ejected",
                                      "limited/status:429+retry-after:30": "resting",
                                      "sick/gpt-x": "probe_down", "good/gpt-x": "up"} else None

    doc = await eventually(settled, 10, "every state")
    entries = backends(doc)
    ejected, resting = entries["bad/status:500"], entries["limited/status:429+retry-after:30"]
    assert ejected["ejections"] == 1
    assert ISO.match(ejected["rest_until"]) and ISO.match(resting["rest_until"])
    assert entries["good/gpt-x"]["rest_until"] is None
    assert entries["sick/gpt-x"]["rest_until"] is None


async def test_a_refused_reload_is_reported_with_its_error_and_line(
        fakes: Any, start_router: Any) -> None:
    up = await fakes("up")
    config = admin_config({"up": openai_provider(up)}, {"m": route(b("up"))})
    r = await start_router(config)
    first = (await status(r))[1]["config"]
    r.write_config({**config, "routes": {"m": route(b("nope"))}})
    assert not await r.worker.watcher.reload("test")
    refused = (await status(r))[1]["config"]
    assert refused["sha256"] == first["sha256"] and refused["loaded_at"] == first["loaded_at"]
    last = refused["last_reload"]
    assert last["result"] == "failure" and ISO.match(last["at"])
    assert "routes.m.backends[0].provider: unknown provider 'nope' (line " in last["error"]

    r.write_config({**config, "routes": {"m": route(b("up")), "n": route(b("up"))}})
    assert await r.worker.watcher.reload("test")
    loaded = (await status(r))[1]
    assert loaded["config"]["last_reload"]["result"] == "success"
    assert loaded["config"]["last_reload"]["error"] is None
    assert loaded["config"]["sha256"] == hashlib.sha256(r.path.read_bytes()).hexdigest()
    assert loaded["config"]["sha256"] != first["sha256"]
    assert set(loaded["routes"]) == {"m", "n"}


# --- drains ------------------------------------------------------------------------------------

async def test_a_drained_backend_gets_no_new_requests_until_undrained(
        fakes: Any, start_router: Any) -> None:
    a, c = await fakes("a"), await fakes("c")
    r = await start_router(admin_config(
        {"a": openai_provider(a), "c": openai_provider(c)},
        {"m": route(b("a"), b("c")), "solo": route(b("a"))}))
    code, answer = await post(r, DRAIN, {"backend": "a/gpt-x"})
    assert code == 200
    assert answer == {"backend": "a/gpt-x", "drained": True, "changed": True,
                      "scope": "process"}
    assert (await post(r, DRAIN, {"backend": "a/gpt-x"}))[1]["changed"] is False
    before = len(a.seen)
    for _ in range(6):
        assert (await ask(r))[:2] == (200, "c/gpt-x")
    # A route whose only backend is drained has nothing to send to: an operator's drain is
    # not overridden by the panic rule that keeps the last ejected backend in use.
    assert (await ask(r, "solo"))[0] == 503
    assert len(a.seen) == before
    doc = (await status(r))[1]
    assert states(doc) == {"a/gpt-x": "drained", "c/gpt-x": "up"}
    assert states(doc, "solo") == {"a/gpt-x": "drained"}
    text = await metrics(r)
    assert 'router_backend_up{backend="a/gpt-x"} 0.0' in text
    assert 'router_backend_up{backend="c/gpt-x"} 1.0' in text
    assert 'router_admin_actions_total{action="drain"} 2.0' in text

    assert await post(r, UNDRAIN, {"backend": "a/gpt-x"}) == (200, {
        "backend": "a/gpt-x", "drained": False, "changed": True, "scope": "process"})
    assert {(await ask(r))[1] for _ in range(2)} == {"a/gpt-x", "c/gpt-x"}
    assert states((await status(r))[1]) == {"a/gpt-x": "up", "c/gpt-x": "up"}
    text = await metrics(r)
    assert 'router_backend_up{backend="a/gpt-x"} 1.0' in text
    assert 'router_admin_actions_total{action="undrain"} 1.0' in text


async def test_drain_requests_that_name_no_backend_are_refused(fakes: Any, start_router: Any
                                                               ) -> None:
    up = await fakes("up")
    r = await start_router(admin_config({"up": openai_provider(up)}, {"m": route(b("up"))}))
    for path in (DRAIN, UNDRAIN):
        code, body = await post(r, path, {"backend": "up/other"})
        assert code == 404 and body["error"]["code"] == "backend_not_found"
        for bad in ({}, {"backend": ""}, {"backend": 3}, {"backend": "up/gpt-x", "x": 1}):
            code, body = await post(r, path, bad)
            assert code == 422, bad
            assert body["detail"], bad
    assert 'router_admin_actions_total{action="drain"} 0.0' in await metrics(r)


async def test_a_drain_survives_config_reloads(fakes: Any, start_router: Any) -> None:
    a, c = await fakes("a"), await fakes("c")
    config = admin_config({"a": openai_provider(a), "c": openai_provider(c)},
                          {"m": route(b("a"), b("c"))})
    r = await start_router(config)
    assert (await post(r, DRAIN, {"backend": "a/gpt-x"}))[0] == 200
    # A reload without the backend, then one with it back (and in a new route): still drained.
    r.write_config({**config, "routes": {"m": route(b("c"))}})
    assert await r.worker.watcher.reload("test")
    r.write_config({**config, "routes": {"m": route(b("a"), b("c")), "n": route(b("a"))}})
    assert await r.worker.watcher.reload("test")
    doc = (await status(r))[1]
    assert states(doc) == {"a/gpt-x": "drained", "c/gpt-x": "up"}
    assert states(doc, "n") == {"a/gpt-x": "drained"}
    for _ in range(4):
        assert (await ask(r))[:2] == (200, "c/gpt-x")


async def test_a_drained_backend_that_left_the_config_can_be_undrained(
        fakes: Any, start_router: Any) -> None:
    a, c = await fakes("a"), await fakes("c")
    config = admin_config({"a": openai_provider(a), "c": openai_provider(c)},
                          {"m": route(b("a"), b("c"))})
    r = await start_router(config)
    assert (await post(r, DRAIN, {"backend": "a/gpt-x"}))[0] == 200
    r.write_config({**config, "routes": {"m": route(b("c"))}})
    assert await r.worker.watcher.reload("test")
    assert (await post(r, DRAIN, {"backend": "a/gpt-x"}))[0] == 404
    assert (await post(r, UNDRAIN, {"backend": "a/gpt-x"}))[1]["changed"] is True
    assert (await post(r, UNDRAIN, {"backend": "a/gpt-x"}))[0] == 404


async def test_a_session_pinned_to_a_drained_backend_moves_on_its_next_request(
        fakes: Any, start_router: Any) -> None:
    a, c = await fakes("a"), await fakes("c")
    r = await start_router(admin_config({"a": openai_provider(a), "c": openai_provider(c)},
                                        {"m": route(b("a"), b("c"))}))

    async def chat() -> str:
        async with r.chat({"model": "m", "messages": USER_MSG, "session_id": "s-1"}) as resp:
            assert resp.status == 200
            return resp.headers["x-router-backend"]

    pinned = await chat()
    assert await chat() == pinned
    assert (await post(r, DRAIN, {"backend": pinned}))[0] == 200
    moved = await chat()
    assert moved != pinned
    assert await chat() == moved
    async with r.http.get(f"{r.url}/api/v1/sessions/s-1", headers=bearer(KEY)) as resp:
        assert (await resp.json())["backend"] == moved


async def test_drains_in_a_shared_store_are_polled_and_kept_when_it_fails(
        fakes: Any, start_router: Any, redis_server: Any) -> None:
    """With Redis, two routers (as two replicas) see one drain; when the store stops answering,
    each keeps the set it knew, counts the failed reads, and says the store is unhealthy."""
    a, c = await fakes("a"), await fakes("c")
    config = admin_config({"a": openai_provider(a), "c": openai_provider(c)},
                          {"m": route(b("a"), b("c"))}, store={"url": redis_server.url})
    one, two = await start_router(config), await start_router(config)
    code, answer = await post(one, DRAIN, {"backend": "a/gpt-x"})
    assert (code, answer["scope"]) == (200, "store")

    async def drained_on_two() -> bool:
        return states((await status(two))[1])["a/gpt-x"] == "drained"

    await eventually(drained_on_two, 1.5, "the drain on the other router")
    before = len(a.seen)
    for _ in range(4):
        assert (await ask(two))[:2] == (200, "c/gpt-x")
    assert len(a.seen) == before

    await asyncio.to_thread(redis_server.stop)

    async def counted() -> bool:
        return 'router_store_errors_total{op="drains"}' in await metrics(two)

    await eventually(counted, 5, "a failed read of the drains")
    doc = (await status(two))[1]
    assert doc["store"] == {"kind": "redis", "healthy": False}
    assert states(doc)["a/gpt-x"] == "drained"
