"""What a store offers, one small protocol per concern, the records they exchange, and their one
error. A caller depends on the protocol it uses (the limiter on `LimitStore`, the key cache on
`KeyStore`, ...); a store implements them all, as `Store`.

    Lifecycle       ping, close
    KeyStore        managed API keys (router/auth/api_keys.py, router/admin.py)
    LimitStore      admit, settle, refresh_leases (router/limits.py)
    SessionStore    pins and automation settings (router/sessions.py)
    UsageStore      hourly usage buckets (router/usage.py)
    DrainStore      backends an operator took out of rotation (router/drains.py)

A managed API key is stored only as its SHA-256 digest: the plaintext exists once, in the answer
that created it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from router.config.model import Limits


class StoreError(Exception):
    """The store did not answer in time or failed. The message names the operation and how it
    failed, never a key or a value; what a failure means to a client is decided above."""


class Lifecycle(Protocol):
    """Readiness and shutdown. Each method of every store protocol is one bounded operation (a
    timeout covers all of it) and raises StoreError, never a driver's exception."""

    async def ping(self) -> bool:
        """Whether the store answers now (readiness); never raises."""
        ...

    async def close(self) -> None: ...


# -- Managed API keys ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A managed API key as stored. `digest` is the SHA-256 of the key; times are epoch seconds."""

    id: str
    digest: str
    user: str
    limits: Limits | None  # None: auth.default_limits
    models: tuple[str, ...]  # ("*",) or route names
    admin: bool
    created_at: float
    expires_at: float | None = None
    last_used_at: float | None = None


class KeyStore(Protocol):
    """Managed API keys: records by id, found by their key's digest."""

    async def create_key(self, record: KeyRecord) -> None: ...

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        """The live record whose key hashes to `digest`, or None (unknown or revoked)."""
        ...

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        """The live record of key `key_id`, or None (unknown or revoked)."""
        ...

    async def list_keys(self) -> list[KeyRecord]: ...

    async def revoke_key(self, key_id: str) -> bool:
        """Delete the key; False when there was no such key."""
        ...

    async def touch_keys(self, used: Mapping[str, float]) -> None:
        """Record last-use times (key id -> epoch seconds) in one batch; unknown ids are skipped."""
        ...

    async def keys_version(self) -> str:
        """An opaque token that changes whenever a key is created or revoked (or the store lost
        its data): the change signal every replica polls to drop its cached keys."""
        ...


# -- Limits ----------------------------------------------------------------------------------------

# The limit an Admission names when it refuses, in the order they are checked.
LIMIT_NAMES = ("rpm", "tpm", "tokens_per_day", "concurrency")


class Admission(NamedTuple):
    """One limiter decision, with what the rate-limit headers need (after this request's
    charge when allowed; times in ms). Fields of limits the principal lacks are meaningless.
    (A tuple: made on every limited request, where a frozen dataclass costs 4x as much.)"""

    allowed: bool
    denied: str | None  # one of LIMIT_NAMES when refused
    retry_after_ms: int
    requests_remaining: int
    requests_reset_ms: int  # until the requests budget is whole again
    tokens_remaining: int
    tokens_reset_ms: int
    day_remaining: int
    day_reset_ms: int  # until the next UTC midnight
    in_flight: int
    session: SessionState | None = None  # asked with the admission (LimitStore.admit's `session`)


class LimitStore(Protocol):
    """Per-principal limits: one call admits and charges a request, one settles it."""

    async def admit(self, principal: str, limits: Limits, tokens: int, lease: str,
                    lease_ttl_s: float, session: SessionQuery | None = None) -> Admission:
        """Check every limit of `principal` and, only if all pass, charge them all: one request,
        `tokens` (the estimate) against tpm and tokens_per_day, and a concurrency lease `lease`
        that expires after `lease_ttl_s` unless refreshed. With `session`, answer it in the same
        round trip (`Admission.session`, as SessionStore would), whether admitted or not; only
        read then, since the request may be refused (see SessionStore.use_pin)."""
        ...

    def settle(self, principal: str, limits: Limits, token_delta: int,
               lease: str | None) -> asyncio.Future[Any]:
        """The request ended: release `lease` and adjust tpm and the day's tokens by
        `token_delta` (actual - estimate). Under way when this returns, awaited or not (no task
        per request): the future only reports the outcome, failing with StoreError."""
        ...

    async def refresh_leases(self, leases: Mapping[str, Sequence[str]],
                             lease_ttl_s: float) -> None:
        """Extend live leases (principal -> lease ids) by `lease_ttl_s` from now."""
        ...


# -- Sessions --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Pin:
    """A session's backend as stored; times are epoch seconds."""

    backend: str
    route: str
    created_at: float
    last_used_at: float
    requests: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class SessionQuery:
    """What a chat request asks the store about its user: the automation settings, and the pin
    of `session_id` (None: settings only), touched (sliding TTL, one more request)."""

    user: str
    session_id: str | None
    default_ttl_s: float  # the pin's TTL when the user's settings name none
    fixed_ttl: bool = False  # the pin's TTL is default_ttl_s whatever the settings (a response's)


@dataclass(frozen=True, slots=True)
class SessionState:
    """The answer: the user's stored settings (a JSON object, None when never set) and the pin;
    `available` is False when the store could not be asked (fail-open). `touched`: the pin
    already counts this request (False when it was only read, alongside an admission that
    could refuse the request: see SessionStore.use_pin)."""

    settings: dict[str, object] | None
    pin: Pin | None
    available: bool = True
    touched: bool = False


SESSION_UNAVAILABLE = SessionState(None, None, available=False)


class SessionStore(Protocol):
    """Pins per (user, session id) with a sliding TTL, and each user's automation settings."""

    async def session_state(self, query: SessionQuery) -> SessionState:
        """The user's settings and the touched pin (one more request, last use now, TTL
        slid). LimitStore.admit with `session` only reads them, since it may refuse the
        request."""
        ...

    def use_pin(self, user: str, session_id: str, ttl_s: float) -> asyncio.Future[Any]:
        """One more request on the pin (if it still exists), as session_state's touch but with
        its TTL slid to `ttl_s` (the caller's, read with the settings): for an admitted request
        whose pin was only read with its admission. Under way when this returns, as
        LimitStore.settle's: the future only reports the outcome (StoreError)."""
        ...

    async def claim_pin(self, user: str, session_id: str, backend: str, route: str,
                        ttl_s: float, replaces: str | None, count: bool = True) -> Pin:
        """Pin the session to `backend` unless another replica got there first: with
        `replaces` None only if no pin exists (SET NX), else only if the pin still names
        `replaces`. Returns the pin that holds afterwards (ours or the winner's). `count`:
        this request is one more on that pin (a new pin starts at one request regardless)."""
        ...

    async def get_pin(self, user: str, session_id: str) -> Pin | None:
        """The pin as it is, untouched."""
        ...

    async def delete_pin(self, user: str, session_id: str) -> bool: ...

    async def get_settings(self, user: str) -> dict[str, object] | None: ...

    async def put_settings(self, user: str, settings: Mapping[str, object]) -> None:
        """Replace the user's stored settings (a JSON object)."""
        ...


# -- Usage -----------------------------------------------------------------------------------------

HOUR_S = 3600  # a usage bucket


@dataclass(frozen=True, slots=True)
class UsageCount:
    """One principal's usage (router/usage.py): what it added in a flush, or the sum a report
    reads. `user` names the principal's user (the latest seen), never a key."""

    principal: str
    user: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int

    def plus(self, later: UsageCount) -> UsageCount:
        return UsageCount(self.principal, later.user or self.user,
                          self.requests + later.requests,
                          self.prompt_tokens + later.prompt_tokens,
                          self.completion_tokens + later.completion_tokens,
                          self.errors + later.errors)


class UsageStore(Protocol):
    """Per-principal counts in hourly buckets (hours since the epoch)."""

    async def add_usage(self, buckets: Mapping[int, Sequence[UsageCount]],
                        retention_s: float) -> None:
        """Add each hour's counts to that hour's bucket (one batch for all of them); a bucket
        is forgotten `retention_s` after its hour ends."""
        ...

    async def usage(self, first_hour: int, end_hour: int) -> list[UsageCount]:
        """Per-principal sums over the buckets of hours [first_hour, end_hour)."""
        ...


# -- Drains --------------------------------------------------------------------------------------

class DrainStore(Protocol):
    """Backends (by name) taken out of rotation by hand, on every replica that shares the store.
    Each replica polls `drained()`; the set outlives config reloads and restarts."""

    async def drained(self) -> frozenset[str]:
        """The names of the drained backends (one read)."""
        ...

    async def drain(self, backend: str) -> bool:
        """Take `backend` out of rotation; False when it already was."""
        ...

    async def undrain(self, backend: str) -> bool:
        """Put `backend` back into rotation; False when it was not drained."""
        ...


# -- All of them -----------------------------------------------------------------------------------

class Store(Lifecycle, KeyStore, LimitStore, SessionStore, UsageStore, DrainStore, Protocol):
    """Shared state: what `open_store` returns and MemoryStore and RedisStore implement. Code
    that serves more than one concern (the app, the worker) holds a Store; the rest the
    protocol it uses."""
