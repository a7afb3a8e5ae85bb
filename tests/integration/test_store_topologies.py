"""The store on the other Redis topologies, with real processes on loopback: a three-master
Redis Cluster (managed keys through the store and through a router; no CROSSSLOT) and a
Sentinel setup through a `SENTINEL FAILOVER` (keys written before it still resolve; new
writes land on the new master). Also the url formats and their validation."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError

from router.auth.api_keys import digest, new_key
from router.config.model import Limits, StoreConfig
from router.store import KeyRecord, StoreError, is_shared, open_store
from router.store.connect import MASTER_CHECK_S, StoreUrl, parse_store_url
from router.store.redis import IDS, VERSION, RedisStore, digest_key, record_key
from tests.conftest import eventually
from tests.integration.test_admin_keys import chat_status, config, create, revoke, wait_status
from tests.redis_cluster import Cluster, SentinelSetup, cli, info, start_cluster, start_sentinel

T = TypeVar("T")

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None
                                 or shutil.which("redis-cli") is None,
                                 reason="redis-server is not installed (make test installs it)")


def record(key: str, **fields: Any) -> KeyRecord:
    values: dict[str, Any] = {"id": "key_" + secrets.token_hex(8), "digest": digest(key),
                              "user": "ann", "limits": None, "models": ("*",), "admin": False,
                              "created_at": time.time()}
    return KeyRecord(**{**values, **fields})


def redis_store(url: str) -> RedisStore:
    store = open_store(StoreConfig(url=url, timeout_ms=1000))
    assert isinstance(store, RedisStore)
    return store


async def answered(call: Callable[[], Awaitable[T]]) -> tuple[T] | None:
    """`call()`'s answer (in a tuple: truthy even when the answer is not), or None when it
    failed with a StoreError (a failover makes a few)."""
    try:
        return (await call(),)
    except StoreError:
        return None


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = await asyncio.to_thread(start_cluster, tmp_path / "cluster")
    try:
        yield c
    finally:
        await asyncio.to_thread(c.stop)


@pytest.fixture
async def sentinel(tmp_path: Path) -> AsyncIterator[SentinelSetup]:
    s = await asyncio.to_thread(start_sentinel, tmp_path / "sentinel")
    try:
        yield s
    finally:
        await asyncio.to_thread(s.stop)


def test_url_formats_and_validation() -> None:
    assert parse_store_url("redis+sentinel://:pw@h1:26380,h2/mymaster/2?sentinel_password=sp") \
        == StoreUrl("sentinel", False, (("h1", 26380), ("h2", 26379)), "mymaster", 2, None,
                    "pw", "sp")
    assert parse_store_url("rediss+cluster://u:p%40w@[::1]:7000,h:7001") == StoreUrl(
        "cluster", True, (("::1", 7000), ("h", 7001)), username="u", password="p@w")
    assert parse_store_url("redis+cluster://h:7000/0").nodes == (("h", 7000),)
    for url in ("redis+sentinel://h:1", "redis+sentinel://h:1/", "redis+sentinel://h:1/s/x",
                "redis+cluster://h:1/3", "redis+cluster://:secret@h:port",
                "redis+sentinel://h/s?db=1", "redis+cluster://", "redis+cluster://h:99999"):
        with pytest.raises(ValidationError) as exc:
            StoreConfig(url=url)
        assert "secret" not in exc.value.errors()[0]["msg"]  # what a config error shows
    for url in ("memory://", "redis://h:1/0", "rediss://h", "redis+sentinel://h/s",
                "rediss+sentinel://h/s", "redis+cluster://h:1", "rediss+cluster://h:1"):
        assert StoreConfig(url=url).url == url
        assert is_shared(StoreConfig(url=url)) == (url != "memory://")
    with pytest.raises(ValidationError):
        StoreConfig(url="memcached://h")


@needs_redis
async def test_cluster_managed_keys(cluster: Cluster) -> None:
    store = redis_store(cluster.url)
    try:
        assert await store.ping()
        v0 = await store.keys_version()
        made = [record(new_key(), limits=Limits(rpm=3), models=("fast",)) for _ in range(12)]
        for rec in made:
            await store.create_key(rec)
        # The record and its index sit in different slots (on different masters, for some):
        # the path that a cross-slot transaction would break.
        slots = {int(cli(cluster.servers[0].port, "CLUSTER", "KEYSLOT", k))
                 for rec in made for k in (record_key(rec.id), digest_key(rec.digest))}
        assert len(slots) > 12
        v1 = await store.keys_version()
        assert v1 != v0
        for rec in made:
            assert await store.key_by_digest(rec.digest) == rec
        await store.touch_keys({rec.id: 1234.5 for rec in made})
        listed = await store.list_keys()
        assert [r.id for r in listed] == [r.id for r in sorted(made, key=lambda r: r.created_at)]
        assert {r.last_used_at for r in listed} == {1234.5}

        gone = made[0]
        assert await store.revoke_key(gone.id)
        v2 = await store.keys_version()
        assert v2 not in (v0, v1)
        assert await store.key_by_digest(gone.digest) is None
        assert not await store.revoke_key(gone.id)
        assert await store.keys_version() == v2  # nothing changed, no new version
        await store.touch_keys({gone.id: 99.0})  # must not resurrect it
        assert gone.id not in {r.id for r in await store.list_keys()}
        assert (await store.key_by_digest(made[1].digest)).id == made[1].id

        # A revoke cut short after the index and the record went: repeating it finishes it
        # (the id leaves the listing and the version moves, so caches drop the key).
        cut = made[1]
        await store._redis.delete(digest_key(cut.digest))
        await store._redis.delete(record_key(cut.id))
        before = await store.keys_version()
        assert await store.revoke_key(cut.id)
        assert await store.keys_version() != before
        assert not await store._redis.sismember(IDS, cut.id)
        assert int(await store._redis.get(VERSION) or 0) == 12 + 2
    finally:
        await store.close()


@needs_redis
async def test_cluster_drains(cluster: Cluster) -> None:
    """The drained set is one key (one slot): SADD, SREM and SMEMBERS without CROSSSLOT."""
    store, other = redis_store(cluster.url), redis_store(cluster.url)
    try:
        # A cluster client learns the slots on its first call, which a loaded machine slows.
        for client in (store, other):
            await eventually(client.ping, 10, "the cluster answers")
        assert await store.drained() == frozenset()
        assert await store.drain("a/x") and await store.drain("b/y")
        assert not await store.drain("a/x")
        assert await other.drained() == {"a/x", "b/y"}
        assert await other.undrain("a/x") and not await other.undrain("a/x")
        assert await store.drained() == {"b/y"}
    finally:
        await store.close()
        await other.close()


@needs_redis
async def test_cluster_through_a_router(start_router: Any, cluster: Cluster) -> None:
    r = await start_router(config(cluster.url, timeout_ms=1000))
    status, made = await create(r, {"user": "dora", "limits": {"rpm": 100}, "models": ["*"]})
    assert status == 201
    assert (await chat_status(r, made["key"]))[0] == 200
    assert await revoke(r, made["id"]) == 204
    await wait_status(r, made["key"], 401, within_s=3.0)
    assert await revoke(r, made["id"]) == 404


@needs_redis
async def test_sentinel_failover_keeps_keys_and_moves_writes(sentinel: SentinelSetup) -> None:
    store = redis_store(sentinel.url)
    try:
        old_master = sentinel.servers[0].port
        before = record(new_key())
        await store.create_key(before)
        version = await store.keys_version()
        assert await store.key_by_digest(before.digest) == before
        assert cli(old_master, "GET", digest_key(before.digest)).strip() == before.id

        new_master = await asyncio.to_thread(sentinel.failover)
        assert new_master != old_master

        (found,) = await eventually(lambda: answered(lambda: store.key_by_digest(before.digest)),
                                    15.0, "a lookup after the failover", every_s=0.05)
        assert found == before
        assert await store.keys_version() == version  # the replica had it all
        # The old master still takes writes until the sentinel demotes it (seconds later):
        # past MASTER_CHECK_S the client has moved every connection to the new one.
        await asyncio.sleep(MASTER_CHECK_S)
        after = record(new_key())
        await eventually(lambda: answered(lambda: store.create_key(after)), 15.0,
                         "a write after the failover", every_s=0.05)
        assert cli(new_master, "GET", digest_key(after.digest)).strip() == after.id
        assert info(new_master, "replication")["role"] == "master"
        assert await store.key_by_digest(after.digest) == after
        assert await store.revoke_key(before.id)
        assert await store.key_by_digest(before.digest) is None
        assert {r.id for r in await store.list_keys()} == {after.id}
    finally:
        await store.close()


@needs_redis
@pytest.mark.parametrize("topology", ["cluster", "sentinel"])
async def test_one_admission_per_topology(topology: str, tmp_path: Path) -> None:
    setup = await asyncio.to_thread(start_cluster if topology == "cluster" else start_sentinel,
                                    tmp_path / topology)
    store = redis_store(setup.url)
    try:
        limits = Limits(rpm=2, tpm=1000, concurrency=5)
        first = await store.admit("key_aaaa", limits, 10, "lease-1", 30.0)
        assert first.allowed and first.requests_remaining == 1 and first.in_flight == 1
        # Leases of several principals (several slots on a Cluster) are refreshed together.
        await store.admit("key_cccc", Limits(concurrency=5), 10, "lease-c", 30.0)
        await store.refresh_leases({"key_aaaa": ["lease-1"], "key_cccc": ["lease-c"]}, 30.0)
        await store.settle("key_aaaa", limits, -5, "lease-1")
        assert (await store.admit("key_aaaa", limits, 10, "lease-2", 30.0)).allowed
        third = await store.admit("key_aaaa", limits, 10, "lease-3", 30.0)
        assert not third.allowed and third.denied == "rpm" and third.retry_after_ms > 0
        # Another principal's keys hash to another slot; the script reloads after a flush.
        for port in (s.port for s in setup.servers[:3 if topology == "cluster" else 1]):
            cli(port, "SCRIPT", "FLUSH")
        assert (await store.admit("key_bbbb", limits, 10, "lease-4", 30.0)).allowed
    finally:
        await store.close()
        await asyncio.to_thread(setup.stop)
