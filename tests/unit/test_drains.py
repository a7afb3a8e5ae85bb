"""A worker's view of the drained backends: applied to the states by name, kept when the store
fails, and never undone by a read that a local drain overtook."""

from __future__ import annotations

import asyncio

from router.drains import Drains
from router.metrics import Metrics
from router.routing.health import BackendState
from router.store import MemoryStore, StoreError


class SlowStore(MemoryStore):
    """A store whose reads can be held, or fail."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.failing = False

    async def drained(self) -> frozenset[str]:
        names = await super().drained()  # what the store held when the read began
        if self.failing:
            raise StoreError("the store did not answer in time (drains)")
        if self.gate is not None:
            await self.gate.wait()
        return names


async def store_errors(metrics: Metrics) -> float:
    text = (await asyncio.to_thread(metrics.render)).decode()  # a scrape reads /proc
    line = next((x for x in text.splitlines()
                 if x.startswith('router_store_errors_total{op="drains"}')), None)
    return 0.0 if line is None else float(line.split()[-1])


async def test_the_set_is_applied_by_name_including_to_states_added_later() -> None:
    store = SlowStore()
    states = {"a": BackendState(), "b": BackendState()}
    drains = Drains(store, states, Metrics(), shared=True)
    assert drains.scope == "store"
    await store.drain("a")
    await store.drain("gone")  # a backend no config names now: harmless
    await drains.refresh()
    assert (states["a"].drained, states["b"].drained) == (True, False)
    states["c"] = BackendState()
    await store.drain("c")
    await drains.refresh()
    assert states["c"].drained
    await store.undrain("a")
    await drains.refresh()
    assert not states["a"].drained
    assert Drains(store, {}, Metrics(), shared=False).scope == "process"


async def test_a_read_overtaken_by_a_drain_here_does_not_undo_it() -> None:
    store = SlowStore()
    states = {"a": BackendState()}
    drains = Drains(store, states, Metrics(), shared=True)
    store.gate = asyncio.Event()
    stale = asyncio.ensure_future(drains.refresh())  # reads the set before the drain
    await asyncio.sleep(0)
    store.gate.set()
    store.gate = None
    assert await drains.drain("a")
    await stale
    assert states["a"].drained and drains.names == {"a"}
    await drains.refresh()
    assert states["a"].drained


async def test_a_failing_store_keeps_the_last_set_and_counts_each_failure() -> None:
    store = SlowStore()
    states = {"a": BackendState(), "b": BackendState()}
    metrics = Metrics()
    drains = Drains(store, states, metrics, shared=True)
    await drains.drain("a")
    store.failing = True
    await drains.refresh()
    await drains.refresh()
    assert states["a"].drained and not states["b"].drained
    assert await store_errors(metrics) == 2
    store.failing = False
    await store.undrain("a")
    await drains.refresh()
    assert not states["a"].drained
