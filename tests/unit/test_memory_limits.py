"""The in-memory store's concurrency leases: expired ones give their slots back, whatever order
they expire in."""

from __future__ import annotations

from router.config.model import Limits
from router.store.memory import MemoryStore

LIMITS = Limits(concurrency=2)


async def test_expired_leases_free_their_slots_in_any_order() -> None:
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    assert (await store.admit("k", LIMITS, 1, "a", 60.0)).allowed
    # A reload shortened the lease TTL: this lease expires before the one held ahead of it.
    assert (await store.admit("k", LIMITS, 1, "b", 10.0)).allowed
    assert not (await store.admit("k", LIMITS, 1, "c", 10.0)).allowed
    now[0] += 20  # b expired, a has not
    admitted = await store.admit("k", LIMITS, 1, "c", 10.0)
    assert admitted.allowed and admitted.in_flight == 2
    now[0] += 50  # all expired: both slots free
    assert (await store.admit("k", LIMITS, 1, "d", 10.0)).in_flight == 1


async def test_a_refreshed_lease_outlives_older_ones() -> None:
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    await store.admit("k", LIMITS, 1, "a", 10.0)
    await store.admit("k", LIMITS, 1, "b", 10.0)
    now[0] += 5
    await store.refresh_leases({"k": ["a"]}, 10.0)  # a now expires after b
    now[0] += 6  # b expired; a, refreshed, holds
    admitted = await store.admit("k", LIMITS, 1, "c", 10.0)
    assert admitted.allowed and admitted.in_flight == 2
    assert not (await store.admit("k", LIMITS, 1, "d", 10.0)).allowed


async def test_a_settlement_before_any_admission_charges_tokens_from_now() -> None:
    """As limits.lua does: a positive delta for a principal the store has not seen yet is a
    charge (a negative one is nothing to give back)."""
    now = [1000.0]
    store = MemoryStore(clock=lambda: now[0])
    tpm = Limits(tpm=600)
    store.settle_now("fresh", tpm, 100, None)
    store.settle_now("other", tpm, -100, None)
    assert (await store.admit("fresh", tpm, 1, "", 60.0)).tokens_remaining == 600 - 100 - 1
    assert (await store.admit("other", tpm, 1, "", 60.0)).tokens_remaining == 600 - 1
