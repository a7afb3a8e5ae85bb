"""Consistent hashing with bounded load (sessions without a shared store): where keys go when
the load is even, that no backend takes a key past its bound, and who gets a key whose first
choice is overloaded, ejected or gone."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from router.config import MockProviderConfig
from router.providers.mock import MockProvider
from router.routing.health import BackendState
from router.routing.strategies import bounded_rendezvous, rendezvous_order
from router.routing.table import Backend

_PROVIDER = MockProvider("mock", MockProviderConfig(type="mock"))
C = 1.25
KEYS = [f"alice\0session-{i}" for i in range(3000)]


def backend(name: str, *, weight: float = 1.0, inflight: int = 0) -> Backend:
    return Backend(name=name, provider=_PROVIDER, model=name, weight=weight,
                   max_concurrency=None, state=BackendState(inflight=inflight))


def fleet(n: int, **kw: int) -> list[Backend]:
    return [backend(f"b{i}", **kw) for i in range(n)]


def bound(b: Backend, candidates: list[Backend], total: int) -> int:
    """The most requests `b` may hold once `total` are in flight: one past its bound."""
    share = b.weight / sum(c.weight for c in candidates)
    return math.ceil(C * share * total) + 1


def test_with_even_load_every_key_goes_to_the_head_of_its_order():
    for load in (0, 7):
        bs = fleet(4, inflight=load)
        for key in KEYS[:500]:
            got, home = bounded_rendezvous(key, bs, bs, C)
            assert got is rendezvous_order(key, bs)[0] and home


def test_replicas_agree_whatever_order_they_list_the_backends_in():
    bs = fleet(4)
    shuffled = random.Random(7).sample(bs, len(bs))
    for key in KEYS[:500]:
        assert bounded_rendezvous(key, bs, bs, C) == bounded_rendezvous(key, shuffled,
                                                                        shuffled, C)


def test_even_load_spreads_keys_by_weight():
    bs = [backend("big", weight=3), backend("small", weight=1)]
    spread = Counter(getattr(bounded_rendezvous(k, bs, bs, C)[0], "name", None) for k in KEYS)
    assert 0.70 < spread["big"] / len(KEYS) < 0.80  # 3/4 expected


def test_removing_a_backend_moves_only_its_own_keys():
    bs = fleet(5)
    before = {k: bounded_rendezvous(k, bs, bs, C)[0] for k in KEYS[:1000]}
    gone = bs[2]
    rest = [b for b in bs if b is not gone]
    for key, was in before.items():
        now, home = bounded_rendezvous(key, bs, rest, C)  # configured, but not a candidate
        if was is gone:
            assert now is rendezvous_order(key, bs)[1] and not home
        else:
            assert now is was and home


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (3, 1, 1), (1, 2, 5)])
def test_keys_held_open_never_push_a_backend_past_its_bound(weights):
    """Sessions placed one after another, none finishing: at every step each backend holds at
    most ceil(C x its share x the total) + 1 of them, however the keys hash."""
    bs = [backend(f"b{i}", weight=w) for i, w in enumerate(weights)]
    for total, key in enumerate(KEYS, start=1):
        got, _ = bounded_rendezvous(key, bs, bs, C)
        assert got is not None
        got.state.inflight += 1
        for b in bs:
            assert b.state.inflight <= bound(b, bs, total), (total, b.name, b.state.inflight)


def test_keys_that_all_hash_to_one_backend_spill_to_the_others():
    bs = fleet(4)
    heads = [k for k in KEYS if rendezvous_order(k, bs)[0] is bs[0]][:400]
    assert len(heads) == 400
    moved = 0
    for total, key in enumerate(heads, start=1):
        got, home = bounded_rendezvous(key, bs, bs, C)
        assert got is not None
        moved += not home
        assert home == (got is bs[0])
        got.state.inflight += 1
        assert bs[0].state.inflight <= bound(bs[0], bs, total)
    # b0 keeps about C/4 of them; the rest went where each key's order sends it next.
    assert bs[0].state.inflight == math.ceil(C * 400 / 4) or \
        bs[0].state.inflight == math.ceil(C * 400 / 4) + 1
    assert moved == 400 - bs[0].state.inflight
    assert all(b.state.inflight > 0 for b in bs[1:])


def test_an_overloaded_backend_is_skipped_for_the_next_in_the_keys_order():
    bs = fleet(3)
    key = next(k for k in KEYS if rendezvous_order(k, bs)[0] is bs[0])
    second = rendezvous_order(key, bs)[1]
    bs[0].state.inflight = 3  # all 3 in flight; its bound: ceil(1.25 x 1/3 x (3 + 1)) = 2
    assert bounded_rendezvous(key, bs, bs, C) == (second, False)
    bs[0].state.inflight = 2  # at its bound (ceil(1.25 x 1/3 x 3) = 2), not past it
    assert bounded_rendezvous(key, bs, bs, C) == (bs[0], True)


def test_low_load_does_not_move_keys():
    """A backend with a few requests while the others idle keeps its keys: the bound's + 1."""
    bs = fleet(3)
    mine = [k for k in KEYS if rendezvous_order(k, bs)[0] is bs[0]][:50]
    for inflight in (1, 2):
        bs[0].state.inflight = inflight
        assert all(bounded_rendezvous(k, bs, bs, C) == (bs[0], True) for k in mine)


def test_a_higher_load_factor_tolerates_more_imbalance():
    bs = fleet(3)
    key = next(k for k in KEYS if rendezvous_order(k, bs)[0] is bs[0])
    bs[0].state.inflight = 6
    assert bounded_rendezvous(key, bs, bs, 1.25)[1] is False
    assert bounded_rendezvous(key, bs, bs, 3.0) == (bs[0], True)


def test_no_candidate_no_backend():
    bs = fleet(2)
    assert bounded_rendezvous("k", bs, [], C) == (None, False)


def test_some_candidate_is_always_within_its_bound():
    """Whatever the loads, a key finds a backend (the bounds add up to more than the load)."""
    rng = random.Random(11)
    for _ in range(300):
        bs = [backend(f"b{i}", weight=rng.choice((0.5, 1, 2)), inflight=rng.randrange(50))
              for i in range(rng.randrange(1, 6))]
        candidates = [b for b in bs if rng.random() < 0.8] or bs[:1]
        for key in itertools.islice(KEYS, 20):
            got, _ = bounded_rendezvous(key, bs, candidates, C)
            assert got in candidates
