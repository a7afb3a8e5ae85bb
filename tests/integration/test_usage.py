"""The per-principal usage report (GET /api/v1/admin/usage) with real parts: the router on
loopback, the fake upstream's `usage`, a real redis-server or memory://, a three-master Redis
Cluster. Flushes are explicit (UsageMeter.flush), never waited for."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from router.config.model import StoreConfig
from router.state import STORE, USAGE
from router.store import open_store
from router.store.base import HOUR_S, UsageCount
from router.store.redis import usage_key  # (imported before any loop: it reads its scripts)
from router.usage import LAST_INSTANT, report_window
from tests.conftest import (
    ADMIN_KEY,
    ADMIN_KEY_ENTRY,
    KEY,
    OTHER_KEY,
    USER_MSG,
    RouterUnderTest,
    bearer,
    openai_provider,
    router_config,
)
from tests.redis_cluster import Cluster, cli, start_cluster
from tests.redis_server import RedisServer, start_redis

USAGE_PATH = "/api/v1/admin/usage"


def config(up: Any, store_url: str, **usage: Any) -> dict[str, Any]:
    cfg = router_config(
        {"up": openai_provider(up, probe=False)},
        {"m": {"retries": 0, "backends": [{"provider": "up", "model": "gpt-x"}]},
         "other": {"retries": 0, "backends": [{"provider": "up", "model": "gpt-y"}]},
         "broken": {"retries": 0, "backends": [{"provider": "up", "model": "status:500"}]}},
        store={"url": store_url, "timeout_ms": 1000},
        # Flushed by the tests themselves; the background flush waits a minute.
        usage={"enabled": True, "flush_interval_s": 60, **usage})
    cfg["auth"]["api_keys"].append(
        ADMIN_KEY_ENTRY)
    return cfg


async def report(r: RouterUnderTest, key: str = ADMIN_KEY, **query: str) -> tuple[int, Any]:
    async with r.http.get(f"{r.url}{USAGE_PATH}", params=query, headers=bearer(key)) as resp:
        text = await resp.text()
        return resp.status, json.loads(text)


async def chat(r: RouterUnderTest, key: str, model: str = "m",
               stream: bool = False) -> tuple[int, tuple[int, int]]:
    """Status and the (prompt, completion) usage the client was told."""
    body: dict[str, Any] = {"model": model, "messages": USER_MSG}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with r.chat(body, key=key) as resp:
        raw = await resp.read()
        status = resp.status
    if status != 200:
        return status, (0, 0)
    if not stream:
        u = json.loads(raw)["usage"]
        return status, (u["prompt_tokens"], u["completion_tokens"])
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage":{' in line.replace(b" ", b""):
            u = json.loads(line[6:])["usage"]
            if u:
                return status, (u["prompt_tokens"], u["completion_tokens"])
    raise AssertionError(f"no usage event in the stream: {raw[-500:]!r}")


def by_principal(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["principal"]: row for row in doc["principals"]}


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        yield "memory://"
        return
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    server = start_redis(tmp_path / "redis")
    yield server.url
    server.stop()


async def test_two_keys_flush_and_report(fakes: Any, start_router: Any, store_url: str) -> None:
    up = await fakes("up")
    r = await start_router(config(up, store_url))
    alice = [await chat(r, KEY), await chat(r, KEY), await chat(r, KEY, stream=True)]
    bob = [await chat(r, OTHER_KEY)]
    assert [s for s, _ in alice + bob] == [200, 200, 200, 200]
    assert all(t[0] > 0 and t[1] > 0 for _, t in alice + bob)
    assert (await chat(r, OTHER_KEY, model="other"))[0] == 403  # "narrow" may use "m" only
    assert (await chat(r, KEY, model="broken"))[0] == 502
    async with r.chat({"model": "m", "messages": USER_MSG}, key="sk-nobody-" + "x" * 30) as resp:
        assert resp.status == 401  # nobody to count it against

    status, doc = await report(r)
    assert status == 200 and doc["principals"] == []  # nothing flushed yet
    await r.worker.app[USAGE].flush()
    status, doc = await report(r)
    assert status == 200, doc
    rows = by_principal(doc)
    assert set(rows) == {"test", "narrow"}  # the admin's report calls are not chat requests
    assert rows["test"] == {
        "principal": "test", "user": "alice", "requests": 4, "errors": 1,
        "prompt_tokens": sum(t[0] for _, t in alice),
        "completion_tokens": sum(t[1] for _, t in alice)}
    assert rows["narrow"] == {
        "principal": "narrow", "user": "bob", "requests": 2, "errors": 1,
        "prompt_tokens": bob[0][1][0], "completion_tokens": bob[0][1][1]}
    assert [row["principal"] for row in doc["principals"]] == ["test", "narrow"]  # busiest first
    assert doc["bucket_s"] == 3600
    assert doc["from"].endswith(":00:00Z") and doc["to"].endswith(":00:00Z")
    text = json.dumps(doc)
    assert KEY not in text and OTHER_KEY not in text and ADMIN_KEY not in text

    # Flushes add up; an empty flush adds nothing.
    await chat(r, KEY)
    await r.worker.app[USAGE].flush()
    await r.worker.app[USAGE].flush()
    assert by_principal((await report(r))[1])["test"]["requests"] == 5


async def test_window_filtering(fakes: Any, start_router: Any, store_url: str) -> None:
    up = await fakes("up")
    r = await start_router(config(up, store_url))
    now_hour = int(time.time()) // HOUR_S
    store = r.worker.app[STORE]
    # Buckets of earlier hours, written as a flush from those hours would have written them.
    await store.add_usage({now_hour - 30: [UsageCount("old", "olga", 7, 70, 700, 0)],
                           now_hour - 5: [UsageCount("old", "olga", 1, 10, 100, 1),
                                          UsageCount("test", "alice", 2, 20, 200, 0)]},
                          retention_s=35 * 86400)
    await chat(r, KEY)
    await r.worker.app[USAGE].flush()

    # Default window: the last 24 hours (the -30 h bucket is outside).
    rows = by_principal((await report(r))[1])
    assert rows["old"]["requests"] == 1 and rows["test"]["requests"] == 3
    # Unix seconds: [from, to) covers the hours it overlaps.
    status, doc = await report(r, **{"from": str((now_hour - 31) * HOUR_S),
                                     "to": str((now_hour - 4) * HOUR_S - 1)})
    assert status == 200, doc
    rows = by_principal(doc)
    assert rows["old"] == {"principal": "old", "user": "olga", "requests": 8,
                           "prompt_tokens": 80, "completion_tokens": 800, "errors": 1}
    assert rows["test"]["requests"] == 2  # the -5 h bucket only, not this hour's request
    assert doc["from"] == iso((now_hour - 31) * HOUR_S)
    assert doc["to"] == iso((now_hour - 4) * HOUR_S)
    # ISO 8601 (with a zone, or none meaning UTC): exactly the -30 h hour.
    start = iso((now_hour - 30) * HOUR_S)
    status, doc = await report(r, **{"from": start,
                                     "to": iso((now_hour - 29) * HOUR_S).replace("Z", "")})
    assert status == 200, doc
    assert [(x["principal"], x["requests"]) for x in doc["principals"]] == [("old", 7)]
    # A window before any traffic.
    status, doc = await report(r, **{"from": "2001-01-01T00:00:00Z",
                                     "to": "2001-01-02T00:00:00+00:00"})
    assert status == 200 and doc["principals"] == []


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


async def test_admin_only_and_bad_parameters(fakes: Any, start_router: Any) -> None:
    up = await fakes("up")
    r = await start_router(config(up, "memory://"))
    status, doc = await report(r, key=KEY)
    assert status == 403 and doc["error"]["code"] == "admin_required"
    async with r.http.get(f"{r.url}{USAGE_PATH}") as resp:
        assert resp.status == 401
    for query, loc in (({"from": "yesterday"}, ["query", "from"]),
                       ({"to": "2026-13-01T00:00:00Z"}, ["query", "to"]),
                       ({"from": "-5"}, ["query", "from"]),
                       ({"from": "1e9"}, ["query", "from"]),
                       ({"to": "999999999999"}, ["query", "to"]),
                       ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
                        ["query", "to"]),
                       ({"from": "1000", "to": "1000"}, ["query", "to"]),
                       ({"from": "2020-01-01", "to": "2022-01-01"}, ["query", "from"])):
        status, doc = await report(r, **query)
        assert status == 422, (query, doc)
        assert [d["loc"] for d in doc["detail"]] == [loc], (query, doc)
        assert all(set(d) == {"loc", "msg", "type"} for d in doc["detail"])
    status, doc = await report(r, **{"from": "nope", "to": "nope"})
    assert status == 422 and {tuple(d["loc"]) for d in doc["detail"]} == {
        ("query", "from"), ("query", "to")}
    async with r.http.get(f"{r.url}/openapi.json") as resp:
        op = (await resp.json())["paths"][USAGE_PATH]["get"]
    assert [p["name"] for p in op["parameters"]] == ["from", "to"]
    assert set(op["responses"]) == {"200", "401", "403", "422", "503"}


def test_report_window_aligns_to_hours() -> None:
    now = 1_000 * HOUR_S + 1800
    assert report_window({}, now) == (1_000 - 24, 1_001)
    assert report_window({"from": str(990 * HOUR_S), "to": str(995 * HOUR_S)}, now) == (990, 995)
    assert report_window({"from": str(990 * HOUR_S + 1), "to": str(995 * HOUR_S + 1)},
                         now) == (990, 996)
    assert report_window({"from": "1970-01-01T01:30:00+01:00", "to": "1970-01-01T02:00:00Z"},
                         now) == (0, 2)


def test_every_instant_the_document_allows_is_a_bound() -> None:
    """Empty means absent; a valid time before 1970 (or past the last hour kept) is that bound,
    whatever its zone, as the OpenAPI document's `date-time` promises."""
    now = 1_000 * HOUR_S + 1800
    assert report_window({"to": "", "from": ""}, now) == (1_000 - 24, 1_001)
    assert report_window({"from": "1969-12-31T00:00:00Z", "to": "1970-01-01T02:00:00Z"},
                         now) == (0, 2)
    assert report_window({"from": "0001-01-01T00:00:00+01:00", "to": "3600"}, now) == (0, 1)
    last = LAST_INSTANT // HOUR_S
    for to in ("9999-12-31T23:59:59Z", "9999-12-31T23:59:59-23:59"):
        assert report_window({"from": "9999-12-31T00:00:00Z", "to": to}, now) == (last - 23, last)


async def test_store_down_is_a_clear_503(fakes: Any, start_router: Any, tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    redis = start_redis(tmp_path / "redis")
    try:
        up = await fakes("up")
        r = await start_router(config(up, redis.url))
        assert (await chat(r, KEY))[0] == 200
        assert (await chat(r, KEY))[0] == 200
        port = redis.port
        redis.stop()
        status, doc = await report(r)
        assert status == 503, doc
        assert doc["error"]["code"] == "store_unavailable"
        assert "Traceback" not in json.dumps(doc)
        # A flush that fails keeps its counts, and counts the failure.
        await r.worker.app[USAGE].flush()
        async with r.http.get(f"{r.url}/metrics") as resp:
            assert 'router_store_errors_total{op="usage"} 1.0' in await resp.text()
        assert (await chat(r, KEY))[0] == 200  # serving goes on (no limits: no store call)
        redis = start_redis(tmp_path / "redis", port=port)  # empty: no persistence
        # The pool's old connections may fail once more after the restart: poll.
        deadline = time.monotonic() + 20
        while True:
            await r.worker.app[USAGE].flush()
            status, doc = await report(r)
            if status == 200 and doc["principals"]:
                break
            assert time.monotonic() < deadline, doc
            await asyncio.sleep(0.05)
        assert by_principal(doc)["test"]["requests"] == 3
    finally:
        redis.stop()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    c = await asyncio.to_thread(start_cluster, tmp_path / "cluster")
    try:
        yield c
    finally:
        await asyncio.to_thread(c.stop)


async def test_usage_on_a_cluster(cluster: Cluster) -> None:
    """Hour buckets land in different slots; a flush and a report span them (no CROSSSLOT)."""
    store = open_store(StoreConfig(url=cluster.url, timeout_ms=2000))
    try:
        hours = range(480_000, 480_012)
        slots = {cli(cluster.servers[0].port, "CLUSTER", "KEYSLOT", usage_key(h)).strip()
                 for h in hours}
        assert len(slots) > 1
        await store.add_usage({h: [UsageCount("p1", "ann", 1, 2, 3, 0),
                                   UsageCount("p2", "bo", 2, 0, 0, 1)] for h in hours},
                              retention_s=86400.0 * 365 * 100)
        await store.add_usage({480_005: [UsageCount("p1", "ann2", 1, 1, 1, 1)]},
                              retention_s=86400.0 * 365 * 100)
        got = {c.principal: c for c in await store.usage(480_000, 480_012)}
        assert got == {"p1": UsageCount("p1", "ann", 13, 25, 37, 1),
                       "p2": UsageCount("p2", "bo", 24, 0, 0, 12)}
        part = {c.principal: c for c in await store.usage(480_003, 480_006)}
        assert part["p1"] == UsageCount("p1", "ann2", 4, 7, 10, 1)
        assert await store.usage(470_000, 470_010) == []
    finally:
        await store.close()


async def test_buckets_expire(tmp_path: Path) -> None:
    """A bucket lives `retention_s` past its hour, on Redis (EXPIREAT) as in memory."""
    stores = [open_store(StoreConfig(url="memory://"))]
    redis: RedisServer | None = None
    if shutil.which("redis-server") is not None:
        redis = start_redis(tmp_path / "redis")
        stores.append(open_store(StoreConfig(url=redis.url, timeout_ms=1000)))
    try:
        now_hour = int(time.time()) // HOUR_S
        for store in stores:
            await store.add_usage({now_hour - 2: [UsageCount("gone", "g", 1, 0, 0, 0)],
                                   now_hour: [UsageCount("kept", "k", 1, 0, 0, 0)]},
                                  retention_s=1800.0)
            got = await store.usage(now_hour - 3, now_hour + 1)
            assert [c.principal for c in got] == ["kept"], store
    finally:
        for store in stores:
            await store.close()
        if redis is not None:
            redis.stop()
