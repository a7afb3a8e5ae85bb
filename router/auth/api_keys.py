"""`sk-` API keys: looked up by SHA-256 digest; the plaintext is never stored.

Static keys come from the YAML file; managed keys from the store, through a per-worker cache so
the hot path makes no store round trip. Each worker polls the store's key version every
`poll_s` and drops its cache when it moves: a revocation reaches every replica within a second.
Router JWTs minted from a key are checked against the same cache, by the key's id, so they end
with the key.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace

from router.auth.principal import Principal
from router.config import ApiKeyConfig, Limits
from router.errors import Unauthorized
from router.store import KeyRecord, KeyStore, StoreError

log = logging.getLogger("router.auth")

# What `new_key()` makes; any other `sk-` token cannot be a managed key and costs no lookup.
MANAGED_KEY = re.compile(r"^sk-[A-Za-z0-9_-]{43}$")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A managed key: 32 random bytes, URL-safe."""
    return "sk-" + secrets.token_urlsafe(32)


def invalid_key() -> Unauthorized:
    return Unauthorized("invalid API key", code="invalid_api_key", reason="unknown_key")


def revoked_source() -> Unauthorized:
    return Unauthorized("the API key this token was minted from was revoked",
                        reason="revoked_source")


class StaticKeys:
    """Keys from the YAML file (`auth.api_keys`), plus the optional loopback-only dev key."""

    def __init__(self, keys: Iterable[ApiKeyConfig], default_limits: Limits,
                 dev_key: str | None = None) -> None:
        self._by_digest: dict[str, Principal] = {}
        for key in keys:
            models = None if "*" in key.models else frozenset(key.models)
            self._by_digest[key.key_sha256] = Principal(
                id=key.id, kind="api_key", user=key.user,
                limits=key.limits or default_limits, models=models, admin=key.admin,
                origin="config_key",
            )
        if dev_key is not None:
            self._by_digest[digest(dev_key)] = Principal(
                id="dev", kind="api_key", user="dev", limits=default_limits, models=None,
                origin="config_key",
            )
        # What a router JWT minted from each key is, under this config: the key's principal
        # as it is configured now (a reload that takes its admin flag or a model away takes
        # them from its tokens too).
        self._minted = {p.id: replace(p, kind="router_jwt") for p in self._by_digest.values()}

    def minted(self, key_id: str) -> Principal | None:
        """The principal a token minted from key `key_id` stands for, None once the key is
        gone from the config (its tokens end with it)."""
        return self._minted.get(key_id)

    def get(self, key_digest: str) -> Principal | None:
        return self._by_digest.get(key_digest)

    def verify(self, token: str) -> Principal:
        # Looked up by digest: timing can reveal at most a digest prefix, never the key.
        principal = self._by_digest.get(digest(token))
        if principal is None:
            raise invalid_key()
        return principal


def key_principal(record: KeyRecord, default_limits: Limits) -> Principal:
    return Principal(
        id=record.id, kind="api_key", user=record.user,
        limits=record.limits or default_limits,
        models=None if "*" in record.models else frozenset(record.models),
        admin=record.admin, origin="managed_key", expires_at=record.expires_at,
    )


@dataclass(slots=True)
class _Entry:
    record: KeyRecord
    principal: Principal
    defaults: Limits | None  # the default limits `principal` carries; None: the key's own


class KeyCache:
    """Managed keys of one worker: digest -> record, plus short-lived misses.

    `trust_stale`: while the store is unreachable, cached keys keep working (`on_failure:
    open`), or stop `STALE_AFTER_S` after the last good version read (`closed`).
    """

    NEGATIVE_TTL_S = 2.0
    MAX_MISSES = 10_000  # random keys cannot grow memory without bound
    MAX_ENTRIES = 100_000
    STALE_AFTER_S = 2.0

    def __init__(self, store: KeyStore, *, trust_stale: bool = True, poll_s: float = 0.5,
                 flush_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.store = store
        self._trust_stale = trust_stale
        self._poll_s = poll_s
        self._flush_s = flush_s
        self._clock = clock
        self._wall = wall
        self._entries: dict[str, _Entry] = {}
        self._misses: OrderedDict[str, float] = OrderedDict()  # digest or id -> until (clock)
        self._ids: dict[str, float | None] = {}  # live key id -> its expires_at
        self._used: dict[str, float] = {}  # key id -> last use (wall), flushed in batches
        self._generation = 0  # bumped by every drop, so a lookup racing a drop is not cached
        self._version: str | None = None
        self._confirmed = -float("inf")  # clock of the last good version read
        self._store_down = False

    async def verify(self, token: str, key_digest: str, default_limits: Limits) -> Principal:
        entry = self._entries.get(key_digest)
        if entry is None or not (self._trust_stale or self._fresh()):
            if not MANAGED_KEY.match(token):
                raise invalid_key()
            entry = await self._lookup(key_digest, default_limits)
        now = self._wall()
        expires_at = entry.record.expires_at
        if expires_at is not None and now >= expires_at:
            raise Unauthorized("API key expired", code="expired_api_key", reason="expired")
        self._used[entry.record.id] = now
        if entry.defaults is not None and entry.defaults is not default_limits:
            entry.principal = key_principal(entry.record, default_limits)  # config reloaded
            entry.defaults = default_limits
        return entry.principal

    async def check_minted(self, key_id: str) -> None:
        """A router JWT minted from managed key `key_id` is good while the key is. The ids
        share the keys' cache and its version polling: a revocation ends both together, and
        a warm token costs a dict lookup."""
        if key_id in self._ids and (self._trust_stale or self._fresh()):
            expires_at = self._ids[key_id]
        else:
            expires_at = await self._lookup_id(key_id)
        if expires_at is not None and self._wall() >= expires_at:
            raise Unauthorized("the API key this token was minted from has expired",
                               code="expired_api_key", reason="expired")

    async def _lookup_id(self, key_id: str) -> float | None:
        record, cache = await self._fetch(key_id, self.store.key_by_id, revoked_source)
        if cache:
            self._remember_id(record)
        return record.expires_at

    async def _fetch(self, name: str, load: Callable[[str], Awaitable[KeyRecord | None]],
                     missing: Callable[[], Unauthorized]) -> tuple[KeyRecord, bool]:
        """A key's record from the store behind the negative cache (StoreError: 503, fail
        closed), and whether it may be cached (no key changed while it was read)."""
        until = self._misses.get(name)
        if until is not None:
            if until > self._clock():
                raise missing()
            del self._misses[name]
        generation = self._generation
        record = await load(name)
        cache = generation == self._generation
        if record is None:
            if cache:
                self._miss(name)
            raise missing()
        return record, cache

    def _remember_id(self, record: KeyRecord) -> None:
        if len(self._ids) >= self.MAX_ENTRIES:
            del self._ids[next(iter(self._ids))]
        self._ids[record.id] = record.expires_at

    def _miss(self, name: str) -> None:
        self._misses[name] = self._clock() + self.NEGATIVE_TTL_S
        if len(self._misses) > self.MAX_MISSES:
            self._misses.popitem(last=False)

    def _fresh(self) -> bool:
        return self._clock() - self._confirmed <= self.STALE_AFTER_S

    async def _lookup(self, key_digest: str, default_limits: Limits) -> _Entry:
        record, cache = await self._fetch(key_digest, self.store.key_by_digest, invalid_key)
        entry = _Entry(record, key_principal(record, default_limits),
                       default_limits if record.limits is None else None)
        if cache:
            if len(self._entries) >= self.MAX_ENTRIES:
                del self._entries[next(iter(self._entries))]
            self._entries[key_digest] = entry
            self._remember_id(record)  # a token minted now finds its key warm
        return entry

    def changed(self) -> None:
        """Keys were created or revoked: forget everything cached."""
        self._entries.clear()
        self._ids.clear()
        self._misses.clear()
        self._generation += 1

    async def refresh(self) -> None:
        """Read the store's key version; drop the cache when it moved."""
        try:
            version = await self.store.keys_version()
        except StoreError as exc:
            if not self._store_down:
                self._store_down = True
                log.warning("managed API keys: %s; cached keys %s", exc,
                            "keep working" if self._trust_stale else "stop working shortly")
            return
        if self._store_down:
            self._store_down = False
            log.info("managed API keys: the store answers again")
        self._confirmed = self._clock()
        if version != self._version:
            self._version = version
            self.changed()

    async def flush(self) -> None:
        """Write the batched last-use times; kept for the next try when the store fails."""
        if not self._used:
            return
        used, self._used = self._used, {}
        try:
            await self.store.touch_keys(used)
        except StoreError:
            for key_id, at in used.items():
                self._used[key_id] = max(at, self._used.get(key_id, at))

    async def run(self) -> None:
        """The worker's background task: poll the version, flush last-use times."""
        next_flush = self._clock() + self._flush_s
        while True:
            await self.refresh()
            if self._clock() >= next_flush:
                next_flush = self._clock() + self._flush_s
                await self.flush()
            await asyncio.sleep(self._poll_s)


class ManagedKeys:
    """The cache as one runtime sees it: with that config's default limits."""

    def __init__(self, cache: KeyCache, default_limits: Limits) -> None:
        self.cache = cache
        self._default_limits = default_limits

    async def verify(self, token: str, key_digest: str) -> Principal:
        return await self.cache.verify(token, key_digest, self._default_limits)

    async def check_minted(self, key_id: str) -> None:
        await self.cache.check_minted(key_id)
