"""The state store behind limits, session pins and managed keys, chosen by `store.url`.

Only `memory://` exists so far; Redis (single, sentinel, cluster) implements the same protocol
in the limits issue. Every store call on the request path is one round trip.
"""

from __future__ import annotations

from typing import Protocol

from router.config.model import StoreConfig
from router.store.memory import MemoryStore

__all__ = ["MemoryStore", "Store", "open_store"]


class Store(Protocol):
    async def ping(self) -> bool:
        """Whether the store answers now (readiness)."""
        ...

    async def close(self) -> None: ...


def open_store(config: StoreConfig) -> Store:
    if config.url.startswith("memory://"):
        return MemoryStore()
    raise ValueError(f"unsupported store url scheme in {config.url.split('://')[0]!r}")
