"""Balancing strategies: one synchronous `select()` each, no I/O; stats come in the candidates.
Also the keyed choice sessions fall back to without a shared store and prefix affinity uses
(rendezvous_place)."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from router.routing.table import Backend


# Why a keyed placement chose its backend (rendezvous_place).
Placed = Literal["first", "spill", "skip"]


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
    # The request's prompt prefix places it (router/routing/affinity.py); what its prefix does
    # not place (an attempt after the placed backend failed, an endpoint other than chat) goes
    # to the least busy.
    "prefix_affinity": LeastBusy,
}


def rendezvous_order(key: str, backends: Sequence[Backend]) -> list[Backend]:
    """`backends` by weighted rendezvous (highest random weight) score for `key`, best first.
    Every replica computes the same order, whatever order the backends come in; removing a
    backend moves only the keys it headed."""
    scored: list[tuple[float, str, Backend]] = []
    for backend in backends:
        digest = hashlib.blake2b(f"{key}\0{backend.name}".encode(), digest_size=8).digest()
        u = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)  # in (0, 1)
        scored.append((-backend.weight / math.log(u), backend.name, backend))
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [b for _, _, b in scored]


def bounded_rendezvous(key: str, backends: Sequence[Backend], candidates: Collection[Backend],
                       load_factor: float) -> tuple[Backend | None, bool]:
    """Consistent hashing with bounded load (see `rendezvous_place`). Returns (backend, home):
    `home` is True when it is the head of the order over all `backends` (False: moved off its
    ejected, full or overloaded head); (None, False) when there is no candidate."""
    backend, outcome = rendezvous_place(key, backends, candidates, load_factor)
    return backend, outcome == "first"


def rendezvous_place(key: str, backends: Sequence[Backend], candidates: Collection[Backend],
                     load_factor: float) -> tuple[Backend | None, Placed]:
    """Consistent hashing with bounded load: the first of `key`'s rendezvous order over all
    `backends` that is a candidate (available, with room) and not past its bound, i.e. with at
    most ceil(load_factor x its weight's share x (in-flight over the candidates + 1)) requests
    in flight. Some candidate is always within its bound, and no backend takes a new key past
    it, so none holds much more than `load_factor` times its share. While the load is even,
    every key goes to the head of its order: replicas agree without talking.

    Returns the backend and why: `first` (the head of the order over all `backends`), `spill`
    (the head is a candidate past its bound), `skip` (the head is not a candidate: ejected,
    resting or full); (None, "skip") when there is no candidate."""
    usable = set(candidates)
    if not usable:
        return None, "skip"
    total = sum(b.state.inflight for b in usable) + 1  # this request included
    weight = sum(b.weight for b in usable)
    outcome: Placed = "first"
    for rank, backend in enumerate(rendezvous_order(key, backends)):
        if backend not in usable:
            if rank == 0:
                outcome = "skip"
        elif backend.state.inflight <= math.ceil(load_factor * total * backend.weight / weight):
            return backend, outcome
        elif rank == 0:
            outcome = "spill"
    return None, "skip"  # only when a candidate is not one of `backends`
