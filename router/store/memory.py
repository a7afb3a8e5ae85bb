"""The embedded store: process memory, for one worker and for `make run`. It implements every
protocol of base.py; its sections follow their order."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from router.config.model import Limits
from router.store.base import (
    HOUR_S,
    LIMIT_NAMES,
    Admission,
    KeyRecord,
    Pin,
    SessionQuery,
    SessionState,
    UsageCount,
)

PERIOD_MS = 60_000.0
DAY_MS = 86_400_000
EPS = 0.001


@dataclasses.dataclass(slots=True, eq=False)
class _Bucket:
    """One principal's limits (limits.lua's keys for it): GCRA arrival times in ms (`tpm_tat`
    None until first charged), the day's tokens, and the concurrency leases (lease -> expiry,
    ms)."""

    rpm_tat: float = 0.0
    tpm_tat: float | None = None
    day: int = -1  # the UTC day number `day_used` counts
    day_used: int = 0
    leases: dict[str, float] = dataclasses.field(default_factory=dict)


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock  # epoch seconds: the day's budget ends at UTC midnight
        self._buckets: dict[str, _Bucket] = {}  # principal -> its limits' state
        self._finished: asyncio.Future[Any] | None = None  # see _done
        self._keys: dict[str, KeyRecord] = {}  # id -> record
        self._by_digest: dict[str, str] = {}  # digest -> id
        self._version = 0
        self._pins: dict[tuple[str, str], tuple[Pin, float]] = {}  # (user, id) -> (pin, ttl s)
        self._settings: dict[str, dict[str, object]] = {}  # user -> stored settings
        self._sweep_at = 1024  # pins held before expired ones are swept (amortised O(1))
        self._usage: dict[int, tuple[float, dict[str, UsageCount]]] = {}  # hour -> (expiry, ..)
        self._drained: set[str] = set()  # backend names

    # Lifecycle: nothing to connect to or close.

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    # Managed API keys.

    async def create_key(self, record: KeyRecord) -> None:
        self._keys[record.id] = record
        self._by_digest[record.digest] = record.id
        self._version += 1

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        key_id = self._by_digest.get(digest)
        return None if key_id is None else self._keys.get(key_id)

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    async def list_keys(self) -> list[KeyRecord]:
        return sorted(self._keys.values(), key=lambda r: (r.created_at, r.id))

    async def revoke_key(self, key_id: str) -> bool:
        record = self._keys.pop(key_id, None)
        if record is None:
            return False
        self._by_digest.pop(record.digest, None)
        self._version += 1
        return True

    async def touch_keys(self, used: Mapping[str, float]) -> None:
        for key_id, at in used.items():
            record = self._keys.get(key_id)
            if record is not None:
                self._keys[key_id] = dataclasses.replace(record, last_used_at=at)

    async def keys_version(self) -> str:
        return str(self._version)

    # Limits: the same semantics as limits.lua (see there), in this process only.

    async def admit(self, principal: str, limits: Limits, tokens: int, lease: str,
                    lease_ttl_s: float, session: SessionQuery | None = None) -> Admission:
        admission = self.admit_now(principal, limits, tokens, lease, lease_ttl_s)
        if session is None:
            return admission
        # Only an admitted request counts as a use of its pin.
        state = await self.session_state(session) if admission.allowed else \
            self._read_state(session)
        return admission._replace(session=state)

    def admit_now(self, principal: str, limits: Limits, tokens: int, lease: str,
                  lease_ttl_s: float) -> Admission:
        """`admit` without a session to answer, decided at once (no await)."""
        now = self._clock() * 1000
        bucket = self._buckets.get(principal)
        if bucket is None:
            bucket = self._buckets[principal] = _Bucket()
        denied = 0
        retry = 0.0
        r_tat = r_reset = t_tat = t_reset = 0.0
        r_rem = t_rem = 0
        if limits.rpm:
            r_tat, r_rem, r_reset, ahead = _gcra(bucket.rpm_tat, now, limits.rpm, 1)
            if ahead:
                denied, retry = 1, ahead
        if limits.tpm:
            t_tat, t_rem, t_reset, ahead = _gcra(bucket.tpm_tat or 0.0, now, limits.tpm, tokens)
            if ahead:
                denied, retry = denied or 2, max(retry, ahead)
        day_no = int(now // DAY_MS)
        midnight = (day_no + 1) * DAY_MS
        used = 0
        if limits.tokens_per_day:
            used = bucket.day_used if bucket.day == day_no else 0
            if used + min(tokens, limits.tokens_per_day) > limits.tokens_per_day:
                denied = denied or 3
                retry = max(retry, midnight - now)
        leases = bucket.leases
        if limits.concurrency:
            # Leases are held in the order they expire as a rule (each is added, or refreshed,
            # with the latest expiry): the expired ones are at the front. A reload that shortens
            # lease_ttl_s breaks the rule for a while, so a refusal looks at every lease first.
            while leases:
                first = next(iter(leases))
                if leases[first] > now:
                    break
                del leases[first]
            if len(leases) >= limits.concurrency:
                for gone in [k for k, expiry in leases.items() if expiry <= now]:
                    del leases[gone]
            if len(leases) >= limits.concurrency:
                denied = denied or 4
                retry = max(retry, 1000.0)
        if not denied:
            if limits.rpm:
                bucket.rpm_tat = r_tat
            if limits.tpm:
                bucket.tpm_tat = t_tat
            if limits.tokens_per_day:
                used += tokens
                bucket.day, bucket.day_used = day_no, used
            if limits.concurrency:
                leases[lease] = now + lease_ttl_s * 1000
        return Admission(
            not denied, LIMIT_NAMES[denied - 1] if denied else None, math.ceil(retry),
            r_rem, round(r_reset), t_rem, round(t_reset),
            max(0, (limits.tokens_per_day or 0) - used), round(midnight - now), len(leases))

    def settle(self, principal: str, limits: Limits, token_delta: int,
               lease: str | None) -> asyncio.Future[Any]:
        self.settle_now(principal, limits, token_delta, lease)
        return self._done()

    def settle_now(self, principal: str, limits: Limits, token_delta: int,
                   lease: str | None) -> None:
        """`settle`, done at once (it cannot fail)."""
        bucket = self._buckets.get(principal)
        if bucket is None:
            if token_delta <= 0:
                return  # nothing held, nothing to give back
            bucket = self._buckets[principal] = _Bucket()  # charged from now, as limits.lua does
        if lease is not None:
            bucket.leases.pop(lease, None)
        if not token_delta:
            return
        now = self._clock() * 1000
        if limits.tpm:
            tat = bucket.tpm_tat
            if tat is not None or token_delta > 0:
                bucket.tpm_tat = (now if tat is None else tat) + \
                    token_delta * PERIOD_MS / limits.tpm
        if limits.tokens_per_day and bucket.day == int(now // DAY_MS):
            bucket.day_used = max(0, bucket.day_used + token_delta)

    async def refresh_leases(self, leases: Mapping[str, Sequence[str]],
                             lease_ttl_s: float) -> None:
        expiry = self._clock() * 1000 + lease_ttl_s * 1000
        for principal, ids in leases.items():
            bucket = self._buckets.get(principal)
            if bucket is None:
                continue
            held = bucket.leases
            for lease in ids:
                if held.pop(lease, None) is not None:
                    held[lease] = expiry  # at the end: the latest expiry

    def _done(self) -> asyncio.Future[Any]:
        """The outcome of a call this store answered at once: one finished future per event
        loop, shared (it is only ever read)."""
        done = self._finished
        if done is None or done.get_loop() is not asyncio.get_running_loop():
            done = self._finished = asyncio.get_running_loop().create_future()
            done.set_result(None)
        return done

    # Sessions: the same semantics as sessions.lua.

    def _live_pin(self, user: str, session_id: str, now: float) -> tuple[Pin, float] | None:
        found = self._pins.get((user, session_id))
        if found is not None and found[0].expires_at <= now:
            del self._pins[(user, session_id)]
            return None
        return found

    def _read_state(self, query: SessionQuery) -> SessionState:
        settings = self._settings.get(query.user)
        if query.session_id is None:
            return SessionState(settings, None)
        found = self._live_pin(query.user, query.session_id, self._clock())
        return SessionState(settings, None if found is None else found[0])

    def _touch(self, user: str, session_id: str, default_ttl_s: float,
               fixed_ttl: bool) -> Pin | None:
        now = self._clock()
        found = self._live_pin(user, session_id, now)
        if found is None:
            return None
        settings = None if fixed_ttl else self._settings.get(user)
        ttl = settings.get("session_ttl_s") if settings else None
        ttl_s = float(ttl) if isinstance(ttl, int) else default_ttl_s
        pin = dataclasses.replace(found[0], last_used_at=now, requests=found[0].requests + 1,
                                  expires_at=now + ttl_s)
        self._pins[(user, session_id)] = (pin, ttl_s)
        return pin

    async def session_state(self, query: SessionQuery) -> SessionState:
        settings = self._settings.get(query.user)
        if query.session_id is None:
            return SessionState(settings, None, touched=True)
        pin = self._touch(query.user, query.session_id, query.default_ttl_s, query.fixed_ttl)
        return SessionState(settings, pin, touched=True)

    def use_pin(self, user: str, session_id: str, ttl_s: float) -> asyncio.Future[Any]:
        self._touch(user, session_id, ttl_s, fixed_ttl=True)
        return self._done()

    async def claim_pin(self, user: str, session_id: str, backend: str, route: str,
                        ttl_s: float, replaces: str | None, count: bool = True) -> Pin:
        now = self._clock()
        found = self._live_pin(user, session_id, now)
        if found is not None and (replaces is None or found[0].backend != replaces):
            if not count:
                return found[0]
            # Another request pinned it first: this one goes there too.
            pin = dataclasses.replace(found[0], last_used_at=now,
                                      requests=found[0].requests + 1, expires_at=now + ttl_s)
            self._pins[(user, session_id)] = (pin, ttl_s)
            return pin
        if found is None:
            if len(self._pins) >= self._sweep_at:
                self._pins = {k: v for k, v in self._pins.items() if v[0].expires_at > now}
                self._sweep_at = max(1024, 2 * len(self._pins))
            pin = Pin(backend, route, now, now, 1, now + ttl_s)
        else:
            pin = dataclasses.replace(found[0], backend=backend, route=route, last_used_at=now,
                                      requests=found[0].requests + count,
                                      expires_at=now + ttl_s)
        self._pins[(user, session_id)] = (pin, ttl_s)
        return pin

    async def get_pin(self, user: str, session_id: str) -> Pin | None:
        found = self._live_pin(user, session_id, self._clock())
        return None if found is None else found[0]

    async def delete_pin(self, user: str, session_id: str) -> bool:
        return self._live_pin(user, session_id, self._clock()) is not None and \
            self._pins.pop((user, session_id), None) is not None

    async def get_settings(self, user: str) -> dict[str, object] | None:
        settings = self._settings.get(user)
        return None if settings is None else dict(settings)

    async def put_settings(self, user: str, settings: Mapping[str, object]) -> None:
        self._settings[user] = dict(settings)

    # Usage: hourly buckets that expire `retention_s` after their hour, as in Redis.

    async def add_usage(self, buckets: Mapping[int, Sequence[UsageCount]],
                        retention_s: float) -> None:
        now = self._clock()
        for hour in [h for h, (expiry, _) in self._usage.items() if expiry <= now]:
            del self._usage[hour]
        for hour, counts in buckets.items():
            expiry = (hour + 1) * HOUR_S + retention_s
            if expiry <= now:
                continue
            bucket = self._usage.setdefault(hour, (expiry, {}))[1]
            self._usage[hour] = (expiry, bucket)
            for count in counts:
                held = bucket.get(count.principal)
                bucket[count.principal] = count if held is None else held.plus(count)

    async def usage(self, first_hour: int, end_hour: int) -> list[UsageCount]:
        now = self._clock()
        totals: dict[str, UsageCount] = {}
        for hour in sorted(self._usage):  # oldest first: the latest user name wins
            expiry, bucket = self._usage[hour]
            if first_hour <= hour < end_hour and expiry > now:
                for count in bucket.values():
                    held = totals.get(count.principal)
                    totals[count.principal] = count if held is None else held.plus(count)
        return list(totals.values())

    # Drains: this process only (another worker or replica has its own memory).

    async def drained(self) -> frozenset[str]:
        return frozenset(self._drained)

    async def drain(self, backend: str) -> bool:
        if backend in self._drained:
            return False
        self._drained.add(backend)
        return True

    async def undrain(self, backend: str) -> bool:
        if backend not in self._drained:
            return False
        self._drained.discard(backend)
        return True


def _gcra(tat: float, now: float, limit: int, cost: int) -> tuple[float, int, float, float]:
    """One GCRA bucket (limits.lua's): the new theoretical arrival time, the remaining count,
    the time to its reset and, when the request does not fit, how long until it would (else
    0)."""
    interval = PERIOD_MS / limit
    tat = max(tat, now)
    ahead = tat + min(cost, limit) * interval - now
    if ahead > PERIOD_MS + EPS:
        return tat, max(0, math.floor((PERIOD_MS - (tat - now)) / interval + EPS)), tat - now, \
            ahead - PERIOD_MS
    new = tat + cost * interval
    return new, max(0, math.floor((PERIOD_MS - (new - now)) / interval + EPS)), new - now, 0.0
