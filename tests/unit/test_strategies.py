"""Balancing strategies: who gets picked, how often, and in what pattern."""

from __future__ import annotations

import random
from collections import Counter
from itertools import pairwise

import pytest

from router.config import MockProviderConfig
from router.providers.mock import MockProvider
from router.routing.health import BackendState
from router.routing.strategies import (
    STRATEGIES,
    Latency,
    LeastBusy,
    Random,
    RoundRobin,
    Strategy,
    Weighted,
)
from router.routing.table import Backend

_PROVIDER = MockProvider("mock", MockProviderConfig(type="mock"))


def backend(name: str, *, weight: float = 1.0, inflight: int = 0,
            ewma: float | None = None) -> Backend:
    return Backend(name=name, provider=_PROVIDER, model=name, weight=weight,
                   max_concurrency=None,
                   state=BackendState(inflight=inflight, ewma_ttfb_s=ewma))


def picks(strategy: Strategy, candidates: list[Backend], n: int) -> list[str]:
    return [strategy.select(candidates).name for _ in range(n)]


def test_every_configured_strategy_name_has_an_implementation():
    assert set(STRATEGIES) == {"round_robin", "weighted", "least_busy", "latency", "random",
                               "prefix_affinity"}
    for make in STRATEGIES.values():
        assert make().select([backend("only")]).name == "only"


def test_round_robin_cycles_in_order_and_evenly():
    bs = [backend("a"), backend("b"), backend("c")]
    seq = picks(RoundRobin(), bs, 30)
    assert seq[:6] == ["a", "b", "c", "a", "b", "c"]
    assert Counter(seq) == {"a": 10, "b": 10, "c": 10}


def test_round_robin_still_covers_everyone_when_the_candidate_set_shrinks():
    rr = RoundRobin()
    a, b, c = backend("a"), backend("b"), backend("c")
    picks(rr, [a, b, c], 1)
    assert Counter(picks(rr, [a, c], 10)) == {"a": 5, "c": 5}


def test_weighted_gives_exact_shares_3_to_1():
    bs = [backend("big", weight=3), backend("small", weight=1)]
    seq = picks(Weighted(), bs, 400)
    assert Counter(seq) == {"big": 300, "small": 100}
    # Exact in every window of 4, not only on average.
    for i in range(0, 400, 4):
        assert Counter(seq[i:i + 4]) == {"big": 3, "small": 1}


def test_weighted_is_smooth_no_bursts():
    bs = [backend("big", weight=3), backend("small", weight=1)]
    seq = picks(Weighted(), bs, 400)
    # The weight-1 backend never gets two in a row, the weight-3 one never gets 4 in a row.
    assert all(not (x == y == "small") for x, y in pairwise(seq))
    assert all(seq[i:i + 4] != ["big"] * 4 for i in range(len(seq) - 3))
    # nginx's smooth WRR for {5, 1, 1}: a a b a c a a, interleaved rather than aaaaa b c.
    five = [backend("a", weight=5), backend("b", weight=1), backend("c", weight=1)]
    assert picks(Weighted(), five, 7) == ["a", "a", "b", "a", "c", "a", "a"]


def test_weighted_with_fractional_weights():
    bs = [backend("x", weight=0.5), backend("y", weight=1.5)]
    assert Counter(picks(Weighted(), bs, 200)) == {"x": 50, "y": 150}


def test_weighted_equal_weights_alternate():
    bs = [backend("a"), backend("b")]
    assert picks(Weighted(), bs, 6) == ["a", "b", "a", "b", "a", "b"]


def test_least_busy_picks_the_backend_with_fewest_inflight():
    bs = [backend("a", inflight=5), backend("b", inflight=1), backend("c", inflight=3)]
    assert set(picks(LeastBusy(), bs, 10)) == {"b"}


def test_least_busy_spreads_ties_over_the_idle_backends():
    bs = [backend("a", inflight=0), backend("b", inflight=4), backend("c", inflight=0)]
    assert Counter(picks(LeastBusy(), bs, 10)) == {"a": 5, "c": 5}


def test_least_busy_follows_the_load_as_it_changes():
    a, b = backend("a"), backend("b")
    lb = LeastBusy()
    chosen: list[str] = []
    for _ in range(6):  # requests that stay in flight: each pick takes a slot
        pick = lb.select([a, b])
        pick.state.inflight += 1
        chosen.append(pick.name)
    assert Counter(chosen) == {"a": 3, "b": 3}
    assert a.state.inflight == b.state.inflight == 3


def test_latency_picks_the_lowest_ewma():
    bs = [backend("slow", ewma=0.9), backend("fast", ewma=0.1), backend("mid", ewma=0.3)]
    assert set(picks(Latency(), bs, 10)) == {"fast"}


def test_latency_tries_unmeasured_backends_first():
    fast = backend("fast", ewma=0.01)
    new1, new2 = backend("new1"), backend("new2")
    seq = picks(Latency(), [fast, new1, new2], 4)
    assert "fast" not in seq
    assert set(seq) == {"new1", "new2"}


def test_latency_moves_away_from_a_backend_that_got_slow():
    a, b = backend("a", ewma=0.1), backend("b", ewma=0.2)
    lat = Latency()
    assert lat.select([a, b]) is a
    for _ in range(5):
        a.state.record_ttfb(1.0)
    assert lat.select([a, b]) is b


def test_random_with_a_seeded_rng_covers_everyone_and_is_reproducible():
    bs = [backend("a"), backend("b"), backend("c")]
    first = picks(Random(random.Random(42)), bs, 300)
    again = picks(Random(random.Random(42)), bs, 300)
    assert first == again
    counts = Counter(first)
    assert set(counts) == {"a", "b", "c"}
    assert all(60 <= n <= 140 for n in counts.values()), counts


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_only_picks_from_the_candidates(name):
    strategy = STRATEGIES[name]()
    bs = [backend("a", ewma=0.2), backend("b", ewma=0.1)]
    for _ in range(20):
        assert strategy.select(bs) in bs
    assert {strategy.select(bs[:1]).name for _ in range(5)} == {"a"}
