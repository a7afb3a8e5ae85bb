"""Balancing strategies: one synchronous `select()` each, no I/O; stats come in the candidates."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from router.routing.table import Backend


class Strategy(Protocol):
    def select(self, candidates: Sequence[Backend]) -> Backend:
        """Pick one of `candidates` (never empty: all available, under their concurrency cap)."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def select(self, candidates: Sequence[Backend]) -> Backend:
        backend = candidates[self._next % len(candidates)]
        self._next += 1
        return backend


class Weighted:
    """Smooth weighted round robin (as nginx): exact shares, no bursts to one backend."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def select(self, candidates: Sequence[Backend]) -> Backend:
        total = 0.0
        best: Backend | None = None
        best_score = 0.0
        for b in candidates:
            score = self._current.get(b.name, 0.0) + b.weight
            self._current[b.name] = score
            total += b.weight
            if best is None or score > best_score:
                best, best_score = b, score
        assert best is not None
        self._current[best.name] -= total
        return best


class LeastBusy:
    """Fewest in-flight requests; ties go round robin so idle backends share the load."""

    def __init__(self) -> None:
        self._tie = 0

    def select(self, candidates: Sequence[Backend]) -> Backend:
        low = min(b.state.inflight for b in candidates)
        tied = [b for b in candidates if b.state.inflight == low]
        self._tie += 1
        return tied[self._tie % len(tied)]


class Latency:
    """Lowest EWMA of time to first byte; a backend never measured goes first."""

    def __init__(self) -> None:
        self._tie = 0

    def select(self, candidates: Sequence[Backend]) -> Backend:
        unmeasured = [b for b in candidates if b.state.ewma_ttfb_s is None]
        if unmeasured:
            self._tie += 1
            return unmeasured[self._tie % len(unmeasured)]
        return min(candidates, key=lambda b: b.state.ewma_ttfb_s or 0.0)


class Random:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, candidates: Sequence[Backend]) -> Backend:
        return self._rng.choice(candidates)


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "round_robin": RoundRobin,
    "weighted": Weighted,
    "least_busy": LeastBusy,
    "latency": Latency,
    "random": Random,
}
