"""Drains: backends an operator took out of rotation by hand, on every replica at once.

The set lives in the store (DrainStore). Each worker keeps the last set it read and marks its
backends' states with it (`BackendState.drained`, which `available()` reads); a background task
reads the set again every POLL_S with one store call, never on a request's path, so a drain made
through any replica reaches every other within a second. With `memory://` the set is this
process's own: a drain takes effect here only, and the admin API says so (`scope`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Literal

from router.metrics import Metrics
from router.routing.health import BackendState
from router.store import DrainStore, StoreError

log = logging.getLogger("router.drains")

POLL_S = 0.5  # a change reaches every worker within this (plus one store round trip)

Scope = Literal["store", "process"]


class Drains:
    """This worker's view of the drained backends, and the one place that changes it."""

    def __init__(self, store: DrainStore, states: Mapping[str, BackendState], metrics: Metrics,
                 *, shared: bool, poll_s: float = POLL_S) -> None:
        """`states` is the worker's states by backend name (kept across reloads); `shared`:
        the store is every replica's (not `memory://`)."""
        self._store = store
        self._states = states
        self._metrics = metrics
        self._poll_s = poll_s
        self.scope: Scope = "store" if shared else "process"
        self.names: frozenset[str] = frozenset()
        self._changes = 0  # drains and undrains made here: a read begun before one is stale
        self._store_down = False

    def apply(self) -> None:
        """Mark every known backend's state; a reload calls it for the backends it added."""
        names = self.names
        for name, state in self._states.items():
            state.drained = name in names

    async def refresh(self) -> None:
        """Read the store's set and apply it. A failed read keeps the last set known (and is
        counted in router_store_errors_total{op="drains"})."""
        changes = self._changes
        try:
            names = await self._store.drained()
        except StoreError as exc:
            self._metrics.store_error("drains")
            if not self._store_down:
                self._store_down = True
                log.warning("drained backends: %s; keeping the last set known", exc)
            return
        if self._store_down:
            self._store_down = False
            log.info("drained backends: the store answers again")
        if changes != self._changes:  # a drain or undrain here overtook this read
            return
        if names != self.names:
            log.info("drained backends now: %s", ", ".join(sorted(names)) or "none")
            self.names = names
        self.apply()

    async def drain(self, backend: str) -> bool:
        """Take `backend` out of rotation (in the store, then here at once); False when it
        already was. StoreError when the store cannot be written."""
        changed = await self._store.drain(backend)
        self._changes += 1
        self.names = self.names | {backend}
        self.apply()
        return changed

    async def undrain(self, backend: str) -> bool:
        changed = await self._store.undrain(backend)
        self._changes += 1
        self.names = self.names - {backend}
        self.apply()
        return changed

    async def run(self) -> None:
        """The worker's background task."""
        while True:
            await self.refresh()
            await asyncio.sleep(self._poll_s)
