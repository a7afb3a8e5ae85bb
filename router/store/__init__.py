"""The state store behind limits, session pins, managed keys, usage and drains, chosen by
`store.url`; its protocols, one per concern, are in base.py.

`memory://` keeps state in the process (one worker); `redis://`, `rediss://` (TLS),
`redis+sentinel://` and `redis+cluster://` (and their `rediss+` TLS forms) share it between
workers and replicas (url formats: router/config/store_url.py).
"""

from __future__ import annotations

from router.config.model import StoreConfig
from router.config.store_url import REDIS_PREFIXES
from router.store.base import (
    DrainStore,
    KeyRecord,
    KeyStore,
    Lifecycle,
    LimitStore,
    SessionStore,
    Store,
    StoreError,
    UsageStore,
)
from router.store.memory import MemoryStore

__all__ = ["DrainStore", "KeyRecord", "KeyStore", "Lifecycle", "LimitStore", "MemoryStore",
           "SessionStore", "Store", "StoreError", "UsageStore", "is_shared", "open_store"]


def open_store(config: StoreConfig, *, timeout_s: float | None = None) -> Store:
    """The store for `config.url`; no connection is made until the first call.

    `timeout_s` overrides `store.timeout_ms` (the CLI, off the request path, waits longer).
    """
    if config.url.startswith("memory://"):
        return MemoryStore()
    if config.url.startswith(REDIS_PREFIXES):
        from router.store.redis import RedisStore

        return RedisStore(config.url, timeout_s=timeout_s or config.timeout_ms / 1000)
    raise ValueError(f"unsupported store url scheme {config.url.split('://')[0]!r}")


def is_shared(config: StoreConfig) -> bool:
    """Whether every worker and replica sees the same state (not `memory://`)."""
    return not config.url.startswith("memory://")
