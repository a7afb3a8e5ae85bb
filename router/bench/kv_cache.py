"""A backend's prefix (KV) cache, simulated: what the sessions and prefix-affinity benchmarks
(and the tests' fake upstream) put in front of each answer.

A prompt is a chain of blocks, one per message (the `tools` first, when given): block i is keyed
by the hash of blocks 0..i, as a serving engine keys its KV blocks by everything before them,
and costs its message's length / 4 tokens. The cache keeps blocks in LRU order up to
`capacity_tokens`; a block is touched after the blocks it extends, so leaves go before their
shared parents (a common system prompt outlives the conversations under it). A request's cached
part is the longest chain of its blocks present; the rest is prefilled: `per_token_s` each,
after `base_s`, and concurrent prefills share the backend's compute (processor sharing: k at
once each run k times slower), as they do on one GPU.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson


def blocks(messages: Sequence[Any], tools: Any = None) -> list[tuple[bytes, int]]:
    """(chain key, tokens) of each block of a prompt, in order."""
    parts: list[Any] = ([{"tools": tools}] if tools else []) + list(messages)
    out: list[tuple[bytes, int]] = []
    chain = b""
    for part in parts:
        data = orjson.dumps(part)
        chain = hashlib.blake2b(chain + data, digest_size=16).digest()
        out.append((chain, max(1, len(data) // 4)))
    return out


@dataclass
class CacheStats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    warm: int = 0  # requests with at least half of their prompt cached
    inflight: int = 0
    max_inflight: int = 0
    busy_area: float = 0.0  # integral of in-flight prefills over time (their mean, per second)
    last_change: float = 0.0

    def view(self) -> dict[str, float]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "warm": self.warm,
                "cold": self.requests - self.warm, "max_inflight": self.max_inflight,
                "busy_area": round(self.busy_area, 6)}


@dataclass
class KvCache:
    capacity_tokens: int
    per_token_s: float
    base_s: float = 0.002
    _lru: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    _used: int = 0
    stats: CacheStats = field(default_factory=CacheStats)
    _prefill: SharedPrefill | None = None

    def admit(self, messages: Sequence[Any], tools: Any = None) -> int:
        """The prompt's uncached tokens; its blocks are cached (and touched) from now."""
        chain = blocks(messages, tools)
        total = sum(t for _, t in chain)
        cached = 0
        for key, tokens in chain:
            if key not in self._lru:
                break
            cached += tokens
        for key, tokens in reversed(chain):  # leaves first: parents stay the most recent
            if key in self._lru:
                self._lru.move_to_end(key)
            else:
                self._lru[key] = tokens
                self._used += tokens
        while self._used > self.capacity_tokens and self._lru:
            _, tokens = self._lru.popitem(last=False)
            self._used -= tokens
        s = self.stats
        s.requests += 1
        s.prompt_tokens += total
        s.cached_tokens += cached
        s.warm += 2 * cached >= total
        return total - cached

    async def prefill(self, messages: Sequence[Any], tools: Any = None) -> float:
        """Wait as long as this backend takes to its first token; returns that wait."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        uncached = self.admit(messages, tools)
        if self._prefill is None:
            self._prefill = SharedPrefill()
        self._count(loop.time(), +1)
        try:
            await asyncio.sleep(self.base_s)
            await self._prefill.run(uncached * self.per_token_s)
        finally:
            self._count(loop.time(), -1)
        return loop.time() - started

    def reset(self) -> None:
        self._lru.clear()
        self._used = 0
        self.stats = CacheStats()

    def _count(self, now: float, step: int) -> None:
        s = self.stats
        if s.last_change:
            s.busy_area += s.inflight * (now - s.last_change)
        s.last_change = now
        s.inflight += step
        s.max_inflight = max(s.max_inflight, s.inflight)


class SharedPrefill:
    """Prefill work (seconds of compute alone) sharing one backend: with k running, each
    advances at 1/k of full speed, so a burst of prefills slows every one of them."""

    def __init__(self) -> None:
        self._jobs: dict[asyncio.Future[None], float] = {}  # remaining seconds of work
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, work_s: float) -> None:
        if work_s <= 0:
            return
        loop = asyncio.get_running_loop()
        self._advance(loop.time())
        done: asyncio.Future[None] = loop.create_future()
        self._jobs[done] = work_s
        self._schedule(loop)
        try:
            await done
        finally:
            if self._jobs.pop(done, None) is not None:  # cancelled: give its share back
                self._advance(loop.time())
                self._schedule(loop)

    def _advance(self, now: float) -> None:
        if self._jobs:
            step = (now - self._last) / len(self._jobs)
            for job in self._jobs:
                self._jobs[job] -= step
        self._last = now

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for job, left in list(self._jobs.items()):
            if left <= 1e-6:
                del self._jobs[job]
                if not job.done():
                    job.set_result(None)
        if self._jobs:
            soonest = min(self._jobs.values()) * len(self._jobs)
            self._timer = loop.call_later(soonest, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._advance(loop.time())
        self._schedule(loop)
