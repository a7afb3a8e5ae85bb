"""The shared store: Redis (`redis://`, `rediss://` for TLS, Sentinel or Cluster: connect.py), one
connection pool per worker.

Every operation runs under `store.timeout_ms` and surfaces as StoreError; redis-py's own
retries are off. An operation that may safely run twice (reads, settings, key records) gets one
more try when its connection turns out dead (a restarted Redis), a key lookup also when it timed
out: a dead Redis costs at most two refused connects, never a retry loop.

Layout (a managed key's record is hash-tagged by its id, so a per-key script on Redis Cluster,
such as the limiter's, can read it from the same slot):
    router:key:{ID}         hash: the record (digest, user, limits, models, admin, times)
    router:keydigest:HEX    string: the id whose key hashes to HEX (the lookup index)
                            (in its own slot on a Cluster: no transaction spans the
                            record and its index; see create_key and revoke_key)
    router:{keys}:ids       set of ids (the listing)
    router:{keys}:version   counter, bumped by every create and revoke
    router:{keys}:epoch     random, set when missing: a Redis that lost its data (restarted
                            without persistence) never repeats a version a replica has seen
    router:lim:{PRINCIPAL}:rpm|tpm     GCRA arrival times (limits.lua); :conc leases (zset);
    router:lim:{PRINCIPAL}:day         the day's tokens, expiring at UTC midnight
    router:settings:{U}     string: a user's automation settings (JSON)
    router:sess:{U}:ID      hash: session ID's pin (backend, route, created, last, n), sliding
                            TTL; U is a digest of the user, so a user's keys share one slot
                            and user names never show in a key listing (sessions.lua)
    router:usage:{HOUR}     hash: an hour's per-principal counts, expiring after retention
    router:{drains}:backends  set: names of the backends drained by hand (every replica polls
                            it with one SMEMBERS; one key, so one slot on a Cluster)

The store's methods come in the order of base.py's protocols (lifecycle, keys, limits,
sessions, usage, drains); how script calls reach Redis (EVALSHA, batching) is scripts.py's.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import orjson
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from router.config.model import Limits
from router.store.base import (
    HOUR_S,
    LIMIT_NAMES,
    Admission,
    KeyRecord,
    Pin,
    SessionQuery,
    SessionState,
    StoreError,
    UsageCount,
)
from router.store.connect import connect, parse_store_url
from router.store.resp import Command, RespLink
from router.store.scripts import Script, ScriptBatch, quiet, resolve, run_scripts
from router.tasks import spawn

T = TypeVar("T")

BATCH = 500  # key ids, usage counts or hours per round trip


# -- Managed API keys ------------------------------------------------------------------------------

IDS = "router:{keys}:ids"
VERSION = "router:{keys}:version"
EPOCH = "router:{keys}:epoch"

# Only a record that still exists gets its last-use time: a revoked key must stay deleted.
TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'last_used_at', ARGV[1]) end
return 0
"""

# The listing and the version share the {keys} slot: forgetting an id and announcing that
# something changed are one atomic step. ARGV[2] == '1': the caller already deleted something.
FORGET = """
local n = redis.call('SREM', KEYS[1], ARGV[1])
if n == 1 or ARGV[2] == '1' then redis.call('INCR', KEYS[2]) end
return n
"""

# The epoch (set when missing) and the version, in one step on the {keys} slot.
VERSION_READ = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('MGET', KEYS[1], KEYS[2])
"""


def record_key(key_id: str) -> str:
    return f"router:key:{{{key_id}}}"


def digest_key(digest: str) -> str:
    return f"router:keydigest:{digest}"


# -- Limits ----------------------------------------------------------------------------------------

LIMITS_LUA = (Path(__file__).parent / "limits.lua").read_text(encoding="utf-8")
LIMITS_SHA = hashlib.sha1(LIMITS_LUA.encode(), usedforsecurity=False).hexdigest()
LIMITS: Script = (LIMITS_SHA, LIMITS_LUA)


def limit_keys(principal: str) -> list[str]:
    """rpm, tpm, concurrency, tokens_per_day: one hash tag, so the script is single-slot."""
    base = f"router:lim:{{{principal}}}:"
    return [base + "rpm", base + "tpm", base + "conc", base + "day"]


# -- Sessions --------------------------------------------------------------------------------------

SESSIONS_LUA = (Path(__file__).parent / "sessions.lua").read_text(encoding="utf-8")
SESSIONS_SHA = hashlib.sha1(SESSIONS_LUA.encode(), usedforsecurity=False).hexdigest()
SESSIONS: Script = (SESSIONS_SHA, SESSIONS_LUA)


def user_tag(user: str) -> str:
    return hashlib.sha256(user.encode()).hexdigest()[:32]


def settings_key(user: str) -> str:
    return f"router:settings:{{{user_tag(user)}}}"


def pin_key(user: str, session_id: str) -> str:
    return f"router:sess:{{{user_tag(user)}}}:{session_id}"


def session_call(query: SessionQuery, op: str = "read") -> tuple[list[str], list[EncodableT]]:
    """The keys and arguments of sessions.lua's `read` (with an admission, which may refuse
    the request: the pin is counted after, by use_pin) or `touch` for `query`."""
    keys = [settings_key(query.user)]
    if query.session_id is not None:
        keys.append(pin_key(query.user, query.session_id))
    return keys, [op, int(query.default_ttl_s * 1000), int(query.fixed_ttl)]


# -- Usage -----------------------------------------------------------------------------------------

# One hour's usage bucket: counters by field ("r:" requests, "p:" prompt and "c:" completion
# tokens, "e:" errors, each followed by the principal id) and "u:" the principal's user.
# ARGV: expiry (epoch s), the number of counters, counter/increment pairs, user field/value pairs.
USAGE_ADD = """
local n = tonumber(ARGV[2])
for i = 3, 2 + 2 * n, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 3 + 2 * n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIREAT', KEYS[1], ARGV[1])
return 0
"""
USAGE_FIELDS = "rpce"  # requests, prompt, completion, errors: UsageCount's order


def usage_key(hour: int) -> str:
    """A bucket per hour (hours since the epoch), tagged by its hour: on a Cluster the hours
    spread over the slots and each flush is a single-slot script."""
    return f"router:usage:{{{hour}}}"


# -- Drains ----------------------------------------------------------------------------------------

DRAINED = "router:{drains}:backends"


# -- The store -------------------------------------------------------------------------------------

class RedisStore:
    """Every protocol of base.py, over one Redis, a Sentinel-watched master or a Cluster."""

    def __init__(self, url: str, *, timeout_s: float, max_connections: int = 64) -> None:
        self._timeout_s = timeout_s
        # The url's topology (one Redis, Sentinel, Cluster), timeouts, no retries: connect.py.
        self._client = connect(url, timeout_s=timeout_s, max_connections=max_connections)
        self._redis = self._client.redis
        self._cluster = isinstance(self._redis, RedisCluster)
        # redis-py refuses EVALSHA in Cluster pipelines: there, each call goes alone.
        plain = parse_store_url(url).kind == "redis"  # not Sentinel, not Cluster
        self._link = RespLink(self._redis, timeout_s) if plain else None
        self._batch = None if self._cluster else ScriptBatch(self._redis, self._link)

    # How every operation runs: bounded in time, a driver's failure turned into StoreError.

    async def _call(self, what: str, op: Awaitable[T]) -> T:
        """The boundary: a timeout over the whole operation, driver errors -> StoreError."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await op
        except (TimeoutError, RedisError, OSError) as exc:
            raise _failure(what, exc) from _cause(exc)

    async def _idempotent(self, what: str, make: Callable[[], Awaitable[T]], *,
                          after_timeout: bool = False) -> T:
        """An operation that may safely run twice. When its connection turns out dead (Redis
        restarted, or something on the way reset it, before the pool could tell) it runs once
        more, on another connection; with `after_timeout`, also when the first try timed out.
        Each try is bounded by the store timeout: at most two tries, never a loop."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await make()
        except (TimeoutError, RedisTimeoutError) as exc:
            if not after_timeout:
                raise _failure(what, exc) from _cause(exc)
        except (RedisConnectionError, ConnectionError):
            pass  # redis-py closed that connection: the next try opens or takes another
        except (RedisError, OSError) as exc:
            raise _failure(what, exc) from exc
        return await self._call(what, make())

    async def _script(self, script: Script, keys: list[str], args: list[EncodableT]) -> Any:
        """EVALSHA, batched where the store can; a missing script is loaded (run_scripts)."""
        if self._batch is not None:
            return await self._batch.call(script, keys, args)
        (reply,) = await run_scripts(self._one_at_a_time, [(script, keys, args)])
        if isinstance(reply, BaseException):
            raise reply
        return reply

    async def _one_at_a_time(self, commands: list[Command]) -> list[Any]:
        """A Send for Cluster, whose pipelines redis-py refuses EVALSHA: a NOSCRIPT reply comes
        back as a value, as from a pipeline; any other failure raises."""
        replies: list[Any] = []
        for command in commands:
            try:
                replies.append(await self._redis.execute_command(*command))  # type: ignore[no-untyped-call]
            except NoScriptError as exc:
                replies.append(exc)
        return replies

    def _sent(self, what: str, script: Script, keys: list[str],
              args: list[EncodableT]) -> asyncio.Future[Any]:
        """A call nobody waits for (settle, use_pin): under way when this returns; the future
        only reports how it ended (StoreError). On the lean link: no task and no timer."""
        batch = self._batch
        if batch is not None and batch.bounded:
            return batch.call(script, keys, args)
        return _reported(self._call(what, self._script(script, keys, args)), what)

    # Lifecycle.

    async def ping(self) -> bool:
        try:
            return bool(await self._idempotent("ping", self._redis.ping))
        except StoreError:
            return False

    async def close(self) -> None:
        if self._link is not None:
            self._link.close()
        await self._client.aclose()

    # Managed API keys: single-slot calls (see the layout above).

    async def create_key(self, record: KeyRecord) -> None:
        async def op() -> None:
            # The record, the index and the listing live in different slots (Redis Cluster
            # refuses one transaction over them): one single-slot call each, in this order.
            # The record and its listing before the index: a half-written key is a listed,
            # revocable orphan whose plaintext nobody was given, never an index without a record.
            await self._redis.hset(record_key(record.id), mapping=_fields(record))
            await self._redis.sadd(IDS, record.id)
            await self._redis.set(digest_key(record.digest), record.id)
            await self._redis.incr(VERSION)

        # Every step may run twice: the version only has to move.
        await self._idempotent("create key", op)

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        async def op() -> KeyRecord | None:
            key_id = await self._redis.get(digest_key(digest))
            if key_id is None:
                return None
            fields = await self._redis.hgetall(record_key(_text(key_id)))
            record = _record({_text(k): _text(v) for k, v in fields.items()})
            return record if record is not None and record.digest == digest else None

        # A burst of first uses on a cold pool may time out once: one more try, then 503.
        return await self._idempotent("key lookup", op, after_timeout=True)

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        async def op() -> KeyRecord | None:
            # Live while its index names it: revoke_key deletes the index first.
            fields = await self._redis.hgetall(record_key(key_id))
            record = _record({_text(k): _text(v) for k, v in fields.items()})
            if record is None or record.id != key_id:
                return None
            indexed = await self._redis.get(digest_key(record.digest))
            return record if indexed is not None and _text(indexed) == key_id else None

        return await self._idempotent("key lookup", op, after_timeout=True)

    async def list_keys(self) -> list[KeyRecord]:
        ids = sorted(map(_text, await self._idempotent("list keys",
                                                        partial(self._redis.smembers, IDS))))
        records: list[KeyRecord] = []
        for start in range(0, len(ids), BATCH):
            batch = ids[start:start + BATCH]
            rows = await self._idempotent("list keys", partial(self._hgetall_many, batch))
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
            # Single-slot calls, as in create_key. The index first: once it is gone the key no
            # longer authenticates. The version moves last, whenever anything was deleted; a
            # revoke cut short leaves the id listed, so repeating it finishes the job.
            digest = await self._redis.hget(record_key(key_id), "digest")
            if digest is not None:  # (None: no such key, or a damaged record)
                await self._redis.delete(digest_key(_text(digest)))
            removed = await self._redis.delete(record_key(key_id))
            changed = digest is not None or removed > 0
            forgot = await self._redis.eval(FORGET, 2, IDS, VERSION, key_id,
                                            "1" if changed else "0")
            return changed or forgot == 1

        # Run again, it ends in the same state (only its answer could say "no such key").
        return await self._idempotent("revoke key", op)

    async def touch_keys(self, used: Mapping[str, float]) -> None:
        items = list(used.items())
        for start in range(0, len(items), BATCH):
            await self._idempotent("touch keys",
                                   partial(self._touch, items[start:start + BATCH]))

    async def _touch(self, items: list[tuple[str, float]]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id, at in items:
                pipe.eval(TOUCH, 1, record_key(key_id), repr(at))
            await pipe.execute()

    async def keys_version(self) -> str:
        async def op() -> str:
            # A script, not MULTI: redis-py's Cluster transactions block the event loop.
            epoch, version = await self._redis.eval(VERSION_READ, 2, EPOCH, VERSION,
                                                    secrets.token_hex(8))
            return f"{epoch}:{version or 0}"

        return await self._idempotent("keys version", op)

    # Limits: one script (limits.lua), loaded once per Redis (SCRIPT LOAD) and run by EVALSHA.

    async def admit(self, principal: str, limits: Limits, tokens: int, lease: str,
                    lease_ttl_s: float, session: SessionQuery | None = None) -> Admission:
        args: list[EncodableT] = ["admit", limits.rpm or 0, limits.tpm or 0,
                                  limits.concurrency or 0, limits.tokens_per_day or 0, tokens,
                                  lease, int(lease_ttl_s * 1000)]
        state = None
        keys = limit_keys(principal)
        batch = self._batch
        if batch is not None and batch.bounded:
            # The hot path: no timer, no coroutine per call; the batch's futures fail with
            # StoreError, and the link bounds the wait.
            limits_reply = batch.call(LIMITS, keys, args)
            session_reply = None if session is None else \
                batch.call(SESSIONS, *session_call(session))
            try:
                row = await limits_reply
                if session_reply is not None:
                    state = _state(await session_reply)
            except BaseException:
                for reply in (limits_reply, session_reply):
                    if reply is not None:
                        reply.add_done_callback(quiet)
                raise
        elif session is None:
            row = await self._call("admit", self._script(LIMITS, keys, args))
        else:
            row, srow = await self._call("admit", self._admit_and_session(
                keys, args, *session_call(session)))
            state = _state(srow)
        # Lua numbers come back as integers.
        allowed, denied, retry, r_rem, r_reset, t_rem, t_reset, d_rem, d_reset, in_flight = row
        return Admission(allowed == 1, LIMIT_NAMES[denied - 1] if denied else None, retry,
                         r_rem, r_reset, t_rem, t_reset, d_rem, d_reset, in_flight, state)

    async def _admit_and_session(self, keys: list[str], args: list[EncodableT],
                                 skeys: list[str], sargs: list[EncodableT]) -> tuple[Any, Any]:
        """Both scripts in one pipeline: one round trip. A script the server lacks (NOSCRIPT)
        is loaded and only that one is rerun. On a Cluster (the limits' keys are tagged by the
        principal, the session's by the user; redis-py refuses EVALSHA in cluster pipelines)
        the two calls go out at once, so the wait is still one round trip."""
        row, srow = await asyncio.gather(self._script(LIMITS, keys, args),
                                         self._script(SESSIONS, skeys, sargs))
        return row, srow

    def settle(self, principal: str, limits: Limits, token_delta: int,
               lease: str | None) -> asyncio.Future[Any]:
        args: list[EncodableT] = ["settle", limits.tpm or 0, limits.tokens_per_day or 0,
                                  token_delta, lease or ""]
        return self._sent("settle", LIMITS, limit_keys(principal), args)

    async def refresh_leases(self, leases: Mapping[str, Sequence[str]],
                             lease_ttl_s: float) -> None:
        async def op() -> None:
            if self._cluster:  # redis-py refuses EVALSHA in Cluster pipelines: one call each
                await asyncio.gather(*(
                    self._script(LIMITS, limit_keys(principal),
                                        ["refresh", int(lease_ttl_s * 1000), *ids])
                    for principal, ids in leases.items()))
                return
            # One round trip for all. The admissions that made these leases loaded the script;
            # after a SCRIPT FLUSH the next admission reloads it and the next refresh succeeds.
            async with self._redis.pipeline(transaction=False) as pipe:
                for principal, ids in leases.items():
                    pipe.evalsha(LIMITS_SHA, 4, *limit_keys(principal), "refresh",
                                 int(lease_ttl_s * 1000), *ids)
                await pipe.execute()

        if leases:
            await self._idempotent("refresh leases", op)

    # Sessions: one script (sessions.lua); settings are read with the pin, in its slot.

    async def session_state(self, query: SessionQuery) -> SessionState:
        keys, args = session_call(query, "touch")
        return _state(await self._call("session", self._script(SESSIONS, keys, args)),
                      touched=True)

    def use_pin(self, user: str, session_id: str, ttl_s: float) -> asyncio.Future[Any]:
        keys, args = session_call(SessionQuery(user, session_id, ttl_s, fixed_ttl=True), "touch")
        return self._sent("use pin", SESSIONS, keys, args)

    async def claim_pin(self, user: str, session_id: str, backend: str, route: str,
                        ttl_s: float, replaces: str | None, count: bool = True) -> Pin:
        row = await self._call("claim pin", self._script(SESSIONS,
            [pin_key(user, session_id)],
            ["claim", backend, route, int(ttl_s * 1000), replaces or "", int(count)]))
        pin = _pin(row)
        if pin is None:  # only if the key vanished between the write and the read: never
            raise StoreError("the store lost a pin it just wrote")
        return pin

    async def get_pin(self, user: str, session_id: str) -> Pin | None:
        return _pin(await self._idempotent("get pin", partial(self._script, SESSIONS,
            [pin_key(user, session_id)], ["get"])))

    async def delete_pin(self, user: str, session_id: str) -> bool:
        return bool(await self._idempotent("delete pin",
                                           partial(self._redis.delete, pin_key(user, session_id))))

    async def get_settings(self, user: str) -> dict[str, object] | None:
        return _settings(await self._idempotent("get settings",
                                                partial(self._redis.get, settings_key(user))))

    async def put_settings(self, user: str, settings: Mapping[str, object]) -> None:
        await self._idempotent("put settings", partial(
            self._redis.set, settings_key(user), orjson.dumps(dict(settings))))

    # Usage: one script call per hour bucket touched (a flush usually touches one), one after
    # the other (a fresh Cluster client fails concurrent first calls).

    async def add_usage(self, buckets: Mapping[int, Sequence[UsageCount]],
                        retention_s: float) -> None:
        calls: list[tuple[str, list[EncodableT]]] = []
        for hour, counts in buckets.items():
            expire_at = int((hour + 1) * HOUR_S + retention_s)
            for start in range(0, len(counts), BATCH):
                counters: list[EncodableT] = []
                users: list[EncodableT] = []
                for c in counts[start:start + BATCH]:
                    values = (c.requests, c.prompt_tokens, c.completion_tokens, c.errors)
                    for kind, n in zip(USAGE_FIELDS, values, strict=True):
                        if n:
                            counters += [f"{kind}:{c.principal}", n]
                    users += [f"u:{c.principal}", c.user]
                calls.append((usage_key(hour),
                              [expire_at, len(counters) // 2, *counters, *users]))

        async def op() -> None:
            for key, args in calls:
                await self._redis.eval(USAGE_ADD, 1, key, *args)

        if calls:
            await self._call("usage", op())

    async def usage(self, first_hour: int, end_hour: int) -> list[UsageCount]:
        hours = list(range(first_hour, end_hour))
        totals: dict[str, UsageCount] = {}
        for start in range(0, len(hours), BATCH):
            rows = await self._idempotent("usage report",
                                          partial(self._usage_rows, hours[start:start + BATCH]))
            for row in rows:  # oldest first: the latest user name wins
                for count in _usage_counts(row):
                    held = totals.get(count.principal)
                    totals[count.principal] = count if held is None else held.plus(count)
        return list(totals.values())

    async def _usage_rows(self, hours: list[int]) -> list[dict[Any, Any]]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for hour in hours:
                pipe.hgetall(usage_key(hour))
            rows: list[dict[Any, Any]] = await pipe.execute()
        return rows

    # Drains: one set; SADD and SREM may run twice and end in the same state.

    async def drained(self) -> frozenset[str]:
        names = await self._idempotent("drains", partial(self._redis.smembers, DRAINED))
        return frozenset(map(_text, names))

    async def drain(self, backend: str) -> bool:
        return bool(await self._idempotent("drain", partial(self._redis.sadd, DRAINED,
                                                            backend)))

    async def undrain(self, backend: str) -> bool:
        return bool(await self._idempotent("undrain", partial(self._redis.srem, DRAINED,
                                                              backend)))


def _failure(what: str, exc: BaseException) -> StoreError:
    if isinstance(exc, TimeoutError):  # the store timeout (asyncio's)
        return StoreError(f"the store did not answer in time ({what})")
    return StoreError(f"the store failed ({what}: {type(exc).__name__})")


def _cause(exc: BaseException) -> BaseException | None:
    """The driver's error, kept as the cause (for the log); asyncio's timeout says nothing."""
    return None if isinstance(exc, TimeoutError) else exc


def _reported(op: Awaitable[Any], name: str) -> asyncio.Future[Any]:
    """Run `op` in the background; its outcome (a StoreError included) goes to the future."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def run() -> None:
        try:
            resolve(future, await op)
        except StoreError as exc:
            resolve(future, exc)

    spawn(run(), name)
    return future


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


def _settings(raw: bytes | str | None) -> dict[str, object] | None:
    if raw is None:
        return None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _pin(row: Sequence[Any]) -> Pin | None:
    """sessions.lua's {backend, route, created, last, n, expires} -> Pin (None: no pin)."""
    backend, route, created, last, n, expires = row
    if backend is None:
        return None
    return Pin(_text(backend), _text(route), int(created) / 1000, int(last) / 1000, int(n),
               int(expires) / 1000)


def _state(row: Sequence[Any], touched: bool = False) -> SessionState:
    return SessionState(_settings(row[0]), _pin(row[1:]), touched=touched)


def _usage_counts(row: Mapping[Any, Any]) -> list[UsageCount]:
    """One bucket's hash -> a count per principal; a damaged field is skipped."""
    found: dict[str, list[Any]] = {}
    for raw_field, raw_value in row.items():
        kind, _, principal = _text(raw_field).partition(":")
        slot = found.setdefault(principal, ["", 0, 0, 0, 0])
        if kind == "u":
            slot[0] = _text(raw_value)
            continue
        index = USAGE_FIELDS.find(kind)
        if index >= 0 and len(kind) == 1:
            try:
                slot[index + 1] = int(raw_value)
            except ValueError:
                continue
    return [UsageCount(principal, *slot) for principal, slot in found.items()]
