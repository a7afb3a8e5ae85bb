"""The Redis store against a real redis-server (records, digests only, timeouts, restarts) and the
per-worker managed-key cache on top of it (revocation, misses, expiry, staleness, last use)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from router.auth.api_keys import KeyCache, ManagedKeys, digest, new_key
from router.config.model import Limits
from router.errors import Unauthorized
from router.store import KeyRecord, MemoryStore, StoreError
from router.store.base import SessionQuery
from router.store.redis import RedisStore, record_key
from tests.conftest import ADMIN_KEY, USER_MSG, bearer
from tests.integration.test_admin_keys import config, create
from tests.redis_server import RedisServer, start_redis

DEFAULTS = Limits(rpm=60)


def record(key: str, **fields: Any) -> KeyRecord:
    values: dict[str, Any] = {"id": "key_" + secrets.token_hex(8), "digest": digest(key),
                              "user": "ann", "limits": None, "models": ("*",), "admin": False,
                              "created_at": time.time()}
    return KeyRecord(**{**values, **fields})


async def dump(store: RedisStore) -> str:
    """Every key and value in the Redis, as one string."""
    r = store._redis
    parts: list[str] = []
    async for name in r.scan_iter("*"):
        kind = await r.type(name)
        parts.append(str(name))
        if kind == "string":
            parts.append(str(await r.get(name)))
        elif kind == "hash":
            parts.append(str(await r.hgetall(name)))
        elif kind == "set":
            parts.append(str(await r.smembers(name)))
        else:
            parts.append(f"<{kind}>")
    return "\n".join(parts)


async def test_records_round_trip(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, timeout_s=0.5)
    try:
        assert await store.ping()
        v0 = await store.keys_version()
        key = new_key()
        rec = record(key, limits=Limits(rpm=5, tpm=100), models=("fast",), admin=True,
                     expires_at=time.time() + 3600)
        await store.create_key(rec)
        v1 = await store.keys_version()
        assert v1 != v0
        assert await store.key_by_digest(rec.digest) == rec
        assert await store.key_by_digest(digest(key + "x")) is None
        assert await store.key_by_id(rec.id) == rec
        assert await store.key_by_id("key_ffffffffffffffff") is None
        await store.touch_keys({rec.id: 1234.5, "key_ffffffffffffffff": 1.0})
        (listed,) = await store.list_keys()
        assert listed.last_used_at == 1234.5 and listed.limits == Limits(rpm=5, tpm=100)

        assert await store.revoke_key(rec.id)
        assert await store.keys_version() not in (v0, v1)
        assert await store.key_by_digest(rec.digest) is None
        assert await store.key_by_id(rec.id) is None
        assert not await store.revoke_key(rec.id)
        await store.touch_keys({rec.id: 99.0})  # a late last-use write must not resurrect it
        assert await store.list_keys() == []
        assert await store._redis.exists(record_key(rec.id)) == 0

        # A damaged record is skipped, never an exception.
        damaged = record(new_key())
        await store.create_key(damaged)
        await store._redis.hdel(record_key(damaged.id), "models")
        assert await store.key_by_digest(damaged.digest) is None
        assert await store.key_by_id(damaged.id) is None
        assert await store.list_keys() == []
        # A revoke cut short after the index went: the key's tokens end with the key.
        half = record(new_key())
        await store.create_key(half)
        await store._redis.delete(f"router:keydigest:{half.digest}")
        assert await store.key_by_id(half.id) is None
        assert await store.revoke_key(half.id)
        assert await store.revoke_key(damaged.id)
    finally:
        await store.close()


async def test_redis_holds_only_digests(start_router: Any, redis_server: RedisServer) -> None:
    r = await start_router(config(redis_server.url))
    keys = []
    for user in ("ann", "bob", "cy"):
        status, made = await create(r, {"user": user, "admin": user == "cy"})
        assert status == 201
        keys.append(made["key"])
        async with r.chat({"model": "fast", "messages": USER_MSG}, key=made["key"]) as resp:
            assert resp.status == 200
    async with r.http.post(f"{r.url}/api/v1/chat/completions", headers=bearer("sk-" + "x" * 43),
                           json={"model": "fast", "messages": USER_MSG}) as resp:
        assert resp.status == 401  # a miss leaves nothing behind either
    await r.worker.key_cache.flush()
    store = RedisStore(redis_server.url, timeout_s=0.5)
    try:
        text = await dump(store)
    finally:
        await store.close()
    for key in (*keys, ADMIN_KEY):
        assert key not in text
        body = key.removeprefix("sk-")
        assert not any(body[i:i + 12] in text for i in range(len(body) - 11))
    for key in keys:
        assert hashlib.sha256(key.encode()).hexdigest() in text  # the lookup index
    assert "last_used_at" in text


async def test_errors_and_timeouts_are_store_errors(redis_server: RedisServer,
                                                    tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mute = RedisStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.05)
    try:
        for call in (mute.keys_version(), mute.key_by_digest("0" * 64), mute.list_keys()):
            started = time.monotonic()
            with pytest.raises(StoreError) as info:
                await call
            assert "did not answer in time" in str(info.value)
            assert time.monotonic() - started < 0.3
        assert not await mute.ping()
    finally:
        await mute.close()
        server.close()

    # Redis restarted without its data: the pool reconnects, and the version token differs
    # even though the counter starts over.
    store = RedisStore(redis_server.url, timeout_s=0.5)
    try:
        await store.create_key(record(new_key()))
        before = await store.keys_version()
        redis_server.stop()
        with pytest.raises(StoreError):
            await store.keys_version()
        again = start_redis(tmp_path / "again", port=redis_server.port)
        try:
            await store.create_key(record(new_key()))
            after = await store.keys_version()
            assert after != before and after.endswith(":1") and before.endswith(":1")
        finally:
            again.stop()
    finally:
        await store.close()


async def test_a_flushed_script_is_loaded_again_and_each_call_runs_once(
        redis_server: RedisServer) -> None:
    """NOSCRIPT (first use, SCRIPT FLUSH, a restarted Redis) on the scripts' lean link, as it
    connects and once it is up, for one or both of a batch's calls: each call runs once."""
    store = RedisStore(redis_server.url, timeout_s=0.5)
    limits = Limits(rpm=10)
    session = SessionQuery("ann", "s1", 60.0)
    try:
        assert (await store.admit("key_a", limits, 1, "", 30.0)).requests_remaining == 9
        await store.put_settings("ann", {"auto_create_session": True})
        for remaining in (8, 7):
            await store._redis.script_flush()
            both = await store.admit("key_a", limits, 1, "", 30.0, session)
            assert both.allowed and both.requests_remaining == remaining
            assert both.session is not None
            assert both.session.settings == {"auto_create_session": True}
        await store._redis.script_flush()
        await store.session_state(session)  # sessions.lua is back, limits.lua is not
        one = await store.admit("key_a", limits, 1, "", 30.0, session)
        assert one.requests_remaining == 6 and one.session is not None
    finally:
        await store.close()


async def test_cache_sees_revocation_through_the_version(redis_server: RedisServer) -> None:
    a = RedisStore(redis_server.url, timeout_s=0.5)
    b = RedisStore(redis_server.url, timeout_s=0.5)
    cache = KeyCache(b)
    try:
        await cache.refresh()
        key = new_key()
        rec = record(key, limits=Limits(tpm=7), models=("fast",))
        await a.create_key(rec)
        principal = await cache.verify(key, digest(key), DEFAULTS)
        assert principal.id == rec.id and principal.limits == Limits(tpm=7)
        assert principal.models == frozenset({"fast"}) and principal.kind == "api_key"
        await a.revoke_key(rec.id)
        assert await cache.verify(key, digest(key), DEFAULTS) is principal  # cached...
        await cache.refresh()  # ...until the version moves
        with pytest.raises(Unauthorized):
            await cache.verify(key, digest(key), DEFAULTS)
    finally:
        await a.close()
        await b.close()


async def test_cache_closed_mode_stops_trusting_a_silent_store(redis_server: RedisServer
                                                               ) -> None:
    now = [1000.0]
    store = RedisStore(redis_server.url, timeout_s=0.05)
    closed = KeyCache(store, trust_stale=False, clock=lambda: now[0])
    opened = KeyCache(store, trust_stale=True, clock=lambda: now[0])
    key = new_key()
    try:
        await store.create_key(record(key))
        for cache in (closed, opened):
            await cache.refresh()
            await cache.verify(key, digest(key), DEFAULTS)
        redis_server.stop()
        for cache in (closed, opened):
            await cache.refresh()  # fails; logged once
        now[0] += KeyCache.STALE_AFTER_S + 0.1
        await opened.verify(key, digest(key), DEFAULTS)  # on_failure: open keeps serving it
        with pytest.raises(StoreError):
            await closed.verify(key, digest(key), DEFAULTS)
    finally:
        await store.close()


async def test_cache_misses_are_bounded_and_brief() -> None:
    now = [0.0]
    store = MemoryStore()
    cache = KeyCache(store, clock=lambda: now[0])
    for _ in range(KeyCache.MAX_MISSES + 50):
        key = new_key()
        with pytest.raises(Unauthorized):
            await cache.verify(key, digest(key), DEFAULTS)
    assert len(cache._misses) == KeyCache.MAX_MISSES
    # A key created by another worker after this one missed it: found once the miss expires
    # (or at once, when the version moves).
    key = new_key()
    with pytest.raises(Unauthorized):
        await cache.verify(key, digest(key), DEFAULTS)
    await store.create_key(record(key))
    with pytest.raises(Unauthorized):
        await cache.verify(key, digest(key), DEFAULTS)
    now[0] += KeyCache.NEGATIVE_TTL_S + 0.1
    assert (await cache.verify(key, digest(key), DEFAULTS)).user == "ann"
    # Tokens that cannot be managed keys never reach the store.
    with pytest.raises(Unauthorized):
        await cache.verify("sk-short", digest("sk-short"), DEFAULTS)


async def test_cache_expiry_defaults_and_last_use() -> None:
    wall = [5000.0]
    store = MemoryStore()
    cache = KeyCache(store, wall=lambda: wall[0])
    key = new_key()
    rec = record(key, expires_at=5010.0)
    await store.create_key(rec)
    view = ManagedKeys(cache, DEFAULTS)
    assert (await view.verify(key, digest(key))).limits is DEFAULTS
    reloaded = Limits(rpm=1)  # a config reload changed auth.default_limits
    assert (await ManagedKeys(cache, reloaded).verify(key, digest(key))).limits is reloaded
    await cache.flush()
    assert (await store.list_keys())[0].last_used_at == 5000.0
    wall[0] = 5010.0
    with pytest.raises(Unauthorized) as info:
        await view.verify(key, digest(key))
    assert "expired" in info.value.message


async def test_cache_does_not_keep_a_lookup_that_raced_a_change() -> None:
    class Paused(MemoryStore):
        gate = asyncio.Event()

        async def key_by_digest(self, key_digest: str) -> KeyRecord | None:
            found = await super().key_by_digest(key_digest)
            await self.gate.wait()
            return found

    store = Paused()
    cache = KeyCache(store)
    key = new_key()
    rec = record(key)
    await store.create_key(rec)
    await cache.refresh()
    lookup = asyncio.ensure_future(cache.verify(key, digest(key), DEFAULTS))
    await asyncio.sleep(0)
    await store.revoke_key(rec.id)
    await cache.refresh()  # the version moved while the lookup was out
    store.gate.set()
    assert (await lookup).id == rec.id  # that request read the record before the revoke
    with pytest.raises(Unauthorized):
        await cache.verify(key, digest(key), DEFAULTS)  # but it was not cached
