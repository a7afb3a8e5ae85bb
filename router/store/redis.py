"""The shared store: one Redis (`redis://`, `rediss://` for TLS), one connection pool per worker.

Every operation runs under `store.timeout_ms` and surfaces as StoreError; redis-py's own
retries are off, so a dead Redis costs one refused connect, never a retry loop.

Layout (a managed key's record is hash-tagged by its id, so a per-key script on Redis Cluster,
such as the limiter's, can read it from the same slot):
    router:key:{ID}         hash: the record (digest, user, limits, models, admin, times)
    router:keydigest:HEX    string: the id whose key hashes to HEX (the lookup index)
    router:{keys}:ids       set of ids (the listing)
    router:{keys}:version   counter, bumped by every create and revoke
    router:{keys}:epoch     random, set when missing: a Redis that lost its data (restarted
                            without persistence) never repeats a version a replica has seen
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Mapping
from typing import TypeVar

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from router.config.model import Limits
from router.store.base import KeyRecord, StoreError

T = TypeVar("T")

IDS = "router:{keys}:ids"
VERSION = "router:{keys}:version"
EPOCH = "router:{keys}:epoch"
BATCH = 500  # ids per round trip when listing or touching

# Only a record that still exists gets its last-use time: a revoked key must stay deleted.
TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'last_used_at', ARGV[1]) end
return 0
"""


def record_key(key_id: str) -> str:
    return f"router:key:{{{key_id}}}"


def digest_key(digest: str) -> str:
    return f"router:keydigest:{digest}"


class RedisStore:
    def __init__(self, url: str, *, timeout_s: float, max_connections: int = 64) -> None:
        self._timeout_s = timeout_s
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,  # waiting for a free connection counts against the same budget
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
            client_name="router",
            # No CLIENT SETINFO: one round trip less per new connection, and redis-py would
            # otherwise read its package metadata from disk (blocking) for every connection.
            driver_info=None,
        )
        self._redis = Redis.from_pool(self._pool)

    async def _call(self, what: str, op: Awaitable[T]) -> T:
        """The boundary: a timeout over the whole operation, driver errors -> StoreError."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await op
        except TimeoutError:
            raise StoreError(f"the store did not answer in time ({what})") from None
        except (RedisError, OSError) as exc:
            raise StoreError(f"the store failed ({what}: {type(exc).__name__})") from exc

    async def ping(self) -> bool:
        try:
            return bool(await self._call("ping", self._redis.ping()))
        except StoreError:
            return False

    async def close(self) -> None:
        await self._redis.aclose()

    async def create_key(self, record: KeyRecord) -> None:
        async def op() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                # The record before its index: a half-written key is an orphan, never a
                # usable key without a record.
                pipe.hset(record_key(record.id), mapping=_fields(record))
                pipe.sadd(IDS, record.id)
                pipe.set(digest_key(record.digest), record.id)
                pipe.incr(VERSION)
                await pipe.execute()

        await self._call("create key", op())

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        async def op() -> KeyRecord | None:
            key_id = await self._redis.get(digest_key(digest))
            if key_id is None:
                return None
            fields = await self._redis.hgetall(record_key(_text(key_id)))
            record = _record({_text(k): _text(v) for k, v in fields.items()})
            return record if record is not None and record.digest == digest else None

        return await self._call("key lookup", op())

    async def list_keys(self) -> list[KeyRecord]:
        ids = sorted(map(_text, await self._call("list keys", self._redis.smembers(IDS))))
        records: list[KeyRecord] = []
        for start in range(0, len(ids), BATCH):
            batch = ids[start:start + BATCH]
            rows = await self._call("list keys", self._hgetall_many(batch))
            records += [r for r in map(_record, rows) if r is not None]
        return sorted(records, key=lambda r: (r.created_at, r.id))

    async def _hgetall_many(self, ids: list[str]) -> list[dict[str, str]]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hgetall(record_key(key_id))
            rows: list[dict[str, str]] = await pipe.execute()  # decode_responses: all str
        return rows

    async def revoke_key(self, key_id: str) -> bool:
        async def op() -> bool:
            digest = await self._redis.hget(record_key(key_id), "digest")
            if digest is None:  # no such key (or a damaged record, which cannot authenticate)
                removed = await self._redis.delete(record_key(key_id))
                return bool(removed + await self._redis.srem(IDS, key_id))
            async with self._redis.pipeline(transaction=True) as pipe:
                # The index first: once it is gone the key no longer authenticates.
                pipe.delete(digest_key(_text(digest)))
                pipe.delete(record_key(key_id))
                pipe.srem(IDS, key_id)
                pipe.incr(VERSION)
                await pipe.execute()
            return True

        return await self._call("revoke key", op())

    async def touch_keys(self, used: Mapping[str, float]) -> None:
        items = list(used.items())
        for start in range(0, len(items), BATCH):
            await self._call("touch keys", self._touch(items[start:start + BATCH]))

    async def _touch(self, items: list[tuple[str, float]]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id, at in items:
                pipe.eval(TOUCH, 1, record_key(key_id), repr(at))
            await pipe.execute()

    async def keys_version(self) -> str:
        async def op() -> str:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(EPOCH, secrets.token_hex(8), nx=True)
                pipe.mget(EPOCH, VERSION)
                _, (epoch, version) = await pipe.execute()
            return f"{epoch}:{version or 0}"

        return await self._call("keys version", op())


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode()


def _fields(record: KeyRecord) -> dict[FieldT, EncodableT]:
    fields: dict[FieldT, EncodableT] = {
        "id": record.id,
        "digest": record.digest,
        "user": record.user,
        "limits": "" if record.limits is None else record.limits.model_dump_json(
            exclude_none=True),
        "models": orjson.dumps(list(record.models)).decode(),
        "admin": "1" if record.admin else "0",
        "created_at": repr(record.created_at),
        "expires_at": "" if record.expires_at is None else repr(record.expires_at),
    }
    if record.last_used_at is not None:
        fields["last_used_at"] = repr(record.last_used_at)
    return fields


def _record(fields: Mapping[str, str]) -> KeyRecord | None:
    """A stored hash -> KeyRecord; None for an empty or damaged one (never an exception)."""
    try:
        limits = fields.get("limits") or None
        expires = fields.get("expires_at") or None
        used = fields.get("last_used_at") or None
        models = orjson.loads(fields["models"])
        return KeyRecord(
            id=fields["id"],
            digest=fields["digest"],
            user=fields["user"],
            limits=None if limits is None else Limits.model_validate_json(limits),
            models=tuple(str(m) for m in models),
            admin=fields.get("admin") == "1",
            created_at=float(fields["created_at"]),
            expires_at=None if expires is None else float(expires),
            last_used_at=None if used is None else float(used),
        )
    except (KeyError, ValueError, TypeError):
        return None
