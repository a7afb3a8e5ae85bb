"""The limiter: after auth and routing, one store call admits (and charges) a chat request or
refuses it with 429; a second one, off the latency path, settles it when the answer ends.

rpm and tpm are GCRA with burst = the limit (a fresh key admits exactly `limit` at once; any
60 s window admits at most limit + burst); concurrency is a set of leases; tokens_per_day a counter
ending at UTC midnight. The store's clock decides (Redis `TIME`), never this process's.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from router.auth import Principal
from router.config.model import Config, Limits
from router.errors import RouterError
from router.ids import lease_id
from router.metrics import Metrics
from router.runtime import RuntimeRef
from router.store import LimitStore, MemoryStore, StoreError
from router.store.base import SESSION_UNAVAILABLE, Admission, SessionQuery, SessionState
from router.tasks import count_failure, serve_without_store

log = logging.getLogger("router.limits")

WINDOW_S = 60
DAY_S = 86400

MAX_COMPLETION = 2**31 - 1  # the largest max_tokens the request validator takes


class RateLimited(RouterError):
    """The router's own 429 (an upstream's is `upstream_rate_limited`)."""

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"
    log_level = logging.INFO


@dataclass(slots=True)
class Ticket:
    """An admitted request: what it was charged, and the headers its answer carries."""

    principal: str
    limits: Limits
    estimate: int  # tokens charged up front
    prompt_estimate: int
    completion_reserved: int
    lease: str | None
    store: LimitStore  # the store that admitted it (the fallback while the shared one is down)
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False
    session: SessionState | None = None  # the session query's answer, when one was asked


class Limiter:
    def __init__(self, store: LimitStore, metrics: Metrics, ref: RuntimeRef) -> None:
        self._ref = ref  # the current config's lease TTL
        self._store = store
        self._fallback = MemoryStore()  # per process: decides while the store is down (open)
        self._metrics = metrics
        self._live: dict[str, Ticket] = {}  # lease -> ticket: refreshed while in flight
        # A failed settlement: the lease expires on its own, the charge stays at the estimate.
        self._settled = count_failure(metrics, "settle", "settle a request's limits")

    @staticmethod
    def limits(principal: Principal) -> bool:
        """Whether the principal has any limit (else admission needs no store call)."""
        limits = principal.limits
        return bool(limits.rpm or limits.tpm or limits.concurrency or limits.tokens_per_day)

    async def admit(self, principal: Principal, body: Mapping[str, Any], config: Config,
                    session: SessionQuery | None = None, *, completes: bool = True,
                    tokens: bool = True) -> Ticket | None:
        """Charge every limit of `principal` or raise RateLimited (nothing charged); None when
        the principal has no limits (no store call at all). `session` is answered in the same
        round trip (`Ticket.session`; SESSION_UNAVAILABLE when the store failed).
        `completes`: the answer has completion tokens (not so for embeddings). `tokens` False:
        a call that uses none (on a stored response), held to `rpm` and `concurrency` only."""
        limits = principal.limits if tokens else _without_tokens(principal.limits)
        if not (limits.rpm or limits.tpm or limits.concurrency or limits.tokens_per_day):
            return None
        prompt, completion = _estimate(body, config, completes)
        lease = lease_id() if limits.concurrency else None
        ttl_s = config.limits.lease_ttl_s
        store = self._store
        try:
            admission = await store.admit(principal.id, limits, prompt + completion,
                                          lease or "", ttl_s, session)
        except asyncio.CancelledError:
            # The client left while the store answered: the slot may have been taken; give it
            # back now rather than when its lease expires (the token estimate stays charged).
            if lease is not None:
                store.settle(principal.id, limits, 0, lease).add_done_callback(self._settled)
            raise
        except StoreError:
            if not serve_without_store(self._metrics, config, "admit"):
                raise
            store = self._fallback
            admission = await store.admit(principal.id, limits, prompt + completion,
                                          lease or "", ttl_s)
        return self._ticket(principal.id, limits, prompt, completion, lease, store, admission,
                            session)

    def at_once(self, session: SessionQuery | None) -> bool:
        """Whether `admit_now` can decide: the store is this process's memory and there is no
        session to ask."""
        return session is None and type(self._store) is MemoryStore

    def admit_now(self, principal: Principal, body: Mapping[str, Any], config: Config, *,
                  completes: bool = True) -> Ticket | None:
        """`admit` when `at_once`: the same decision, without an await."""
        limits = principal.limits
        if not (limits.rpm or limits.tpm or limits.concurrency or limits.tokens_per_day):
            return None
        store = self._store
        if type(store) is not MemoryStore:
            raise TypeError("admit_now needs the in-memory store (see at_once)")
        prompt, completion = _estimate(body, config, completes)
        lease = lease_id() if limits.concurrency else None
        admission = store.admit_now(principal.id, limits, prompt + completion, lease or "",
                                    config.limits.lease_ttl_s)
        return self._ticket(principal.id, limits, prompt, completion, lease, store, admission,
                            None)

    def _ticket(self, principal: str, limits: Limits, prompt: int, completion: int,
                lease: str | None, store: LimitStore, admission: Admission,
                session: SessionQuery | None) -> Ticket:
        """The admitted request's ticket, or RateLimited when the store refused it."""
        headers = rate_headers(limits, admission)
        if not admission.allowed:
            limit = admission.denied or "rpm"
            self._metrics.rate_limited(limit)
            retry = max(1, math.ceil(admission.retry_after_ms / 1000))
            raise RateLimited(f"rate limit exceeded ({limit}); retry after {retry} s",
                              headers={**headers, "Retry-After": str(retry)}, code=limit)
        ticket = Ticket(principal, limits, prompt + completion, prompt, completion, lease,
                        store, headers, session=None if session is None
                        else admission.session or SESSION_UNAVAILABLE)
        if lease is not None:
            self._live[lease] = ticket
        return ticket

    def settle(self, ticket: Ticket | None, used: Used | None) -> None:
        """The request ended (answer sent, stream over, client gone, upstream failed): release
        its slot and charge what it really used, in the background."""
        if ticket is None or ticket.settled:
            return
        ticket.settled = True
        if ticket.lease is not None:
            self._live.pop(ticket.lease, None)
        delta = 0
        if ticket.limits.tpm or ticket.limits.tokens_per_day:
            delta = actual_tokens(ticket, used) - ticket.estimate
        if ticket.lease is None and not delta:
            return
        store = ticket.store
        if type(store) is MemoryStore:  # this process's memory: done now, nothing to report
            store.settle_now(ticket.principal, ticket.limits, delta, ticket.lease)
            return
        # Sent by the store at once (batched with this loop turn's other calls): no task here.
        store.settle(ticket.principal, ticket.limits, delta, ticket.lease
                     ).add_done_callback(self._settled)

    async def refresh_forever(self) -> None:
        """Keep in-flight requests' leases alive: one pipeline per worker every TTL/3."""
        while True:
            ttl_s = self._ref.current.config.limits.lease_ttl_s
            await asyncio.sleep(ttl_s / 3)
            by_store: dict[int, tuple[LimitStore, dict[str, list[str]]]] = {}
            for lease, ticket in list(self._live.items()):
                _, leases = by_store.setdefault(id(ticket.store), (ticket.store, {}))
                leases.setdefault(ticket.principal, []).append(lease)
            for store, leases in by_store.values():
                try:
                    await store.refresh_leases(leases, ttl_s)
                except StoreError as exc:
                    self._metrics.store_error("refresh")
                    log.warning("could not refresh concurrency leases: %s", exc)


T = TypeVar("T")


def _per_limits(cache: dict[int, tuple[Limits, T]], limits: Limits,
                make: Callable[[Limits], T]) -> T:
    """`make(limits)`, made once per Limits object (managed keys come and go: at most 4,096
    are kept)."""
    known = cache.get(id(limits))
    if known is None or known[0] is not limits:
        if len(cache) >= 4096:
            cache.clear()
        known = cache[id(limits)] = (limits, make(limits))
    return known[1]


_WITHOUT_TOKENS: dict[int, tuple[Limits, Limits]] = {}


def _without_tokens(limits: Limits) -> Limits:
    """`limits` but its token limits (tpm, tokens_per_day)."""
    return _per_limits(_WITHOUT_TOKENS, limits,
                       lambda held: Limits(rpm=held.rpm, concurrency=held.concurrency))


def _estimate(body: Mapping[str, Any], config: Config, completes: bool) -> tuple[int, int]:
    """The request's (prompt, completion) token estimate: what it is charged on admission."""
    prompt = prompt_estimate(body)
    if not completes:
        return prompt, 0  # embeddings: the input is all there is
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") \
        or body.get("max_output_tokens")  # the Responses API's
    if isinstance(max_tokens, float) and max_tokens.is_integer() and max_tokens < 2**31:
        max_tokens = int(max_tokens)  # 1000.0 is as much an integer as 1000
    # Capped like `max_tokens` (max_completion_tokens passes through unvalidated): the store's
    # counters take 64-bit integers, and no answer is longer.
    if isinstance(max_tokens, int) and max_tokens > 0:
        return prompt, min(max_tokens, MAX_COMPLETION)
    return prompt, config.limits.default_max_tokens


def prompt_estimate(body: Mapping[str, Any]) -> int:
    """About one token per 4 characters of message content (text parts only), or of a
    completion's `prompt` or an embedding's `input` (a token id counts as one token), or of a
    response's `instructions` and `input` (text, or items whose content is text or parts)."""
    texts = body.get("prompt", body.get("input"))
    if texts is not None:
        estimate = _texts_estimate(texts)
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            estimate += len(instructions) // 4
        return estimate
    chars = 0
    for message in body.get("messages") or ():
        chars += _message_chars(message)
    return chars // 4


def _message_chars(message: object) -> int:
    """A message's (or a Responses input item's) text content, in characters."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content
                   if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _texts_estimate(texts: object) -> int:
    """A prompt or input: text, texts, token ids or lists of token ids (validated shapes), or
    a response's input items."""
    if isinstance(texts, str):
        return len(texts) // 4
    if not isinstance(texts, list):
        return 0
    tokens = chars = 0
    for item in texts:
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, list):
            tokens += len(item)
        elif isinstance(item, dict):
            chars += _message_chars(item)
        else:
            tokens += 1  # one token id
    return tokens + chars // 4


@dataclass(frozen=True, slots=True)
class Used:
    """What an answered request used: the upstream's (prompt, completion) tokens when it
    reported them, and the answer's bytes that reached the client."""

    tokens: tuple[int, int] | None
    relayed_bytes: int


def actual_tokens(ticket: Ticket, used: Used | None) -> int:
    """What the request used: the upstream's usage when it reported it, else the prompt
    estimate plus the bytes relayed / 4 (at most the reservation); nothing if no answer came."""
    if used is None:
        return 0
    if used.tokens is not None:
        return sum(used.tokens)
    return ticket.prompt_estimate + min(used.relayed_bytes // 4, ticket.completion_reserved)


def rate_headers(limits: Limits, a: Admission) -> dict[str, str]:
    """OpenAI's x-ratelimit-* and the IETF RateLimit-Policy / RateLimit, for the limits held."""
    fixed: dict[str, str] = _per_limits(_FIXED, limits, _fixed_headers)
    headers = dict(fixed)
    state: list[str] = []
    if limits.rpm:
        headers["x-ratelimit-remaining-requests"] = str(a.requests_remaining)
        headers["x-ratelimit-reset-requests"] = duration(a.requests_reset_ms)
        state.append(f'"rpm";r={a.requests_remaining};t={_secs(a.requests_reset_ms)}')
    if limits.tpm:
        headers["x-ratelimit-remaining-tokens"] = str(a.tokens_remaining)
        headers["x-ratelimit-reset-tokens"] = duration(a.tokens_reset_ms)
        state.append(f'"tpm";r={a.tokens_remaining};t={_secs(a.tokens_reset_ms)}')
    if limits.tokens_per_day:
        state.append(f'"tpd";r={a.day_remaining};t={_secs(a.day_reset_ms)}')
    if state:
        headers["RateLimit"] = ", ".join(state)
    return headers


_FIXED: dict[int, tuple[Limits, dict[str, str]]] = {}


def _fixed_headers(limits: Limits) -> dict[str, str]:
    """The rate-limit headers that are the same on every answer: the limits and the policy."""
    headers: dict[str, str] = {}
    policy: list[str] = []
    if limits.rpm:
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        policy.append(f'"rpm";q={limits.rpm};w={WINDOW_S}')
    if limits.tpm:
        headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
        policy.append(f'"tpm";q={limits.tpm};w={WINDOW_S}')
    if limits.tokens_per_day:
        policy.append(f'"tpd";q={limits.tokens_per_day};w={DAY_S}')
    if policy:
        headers["RateLimit-Policy"] = ", ".join(policy)
    return headers


def _secs(ms: int) -> int:
    return -(-ms // 1000) if ms > 0 else 0


def duration(ms: int) -> str:
    """OpenAI's format: `17ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`."""
    ms = max(0, ms)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"
