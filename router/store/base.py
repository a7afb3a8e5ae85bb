"""What every store offers (the `Store` protocol), its one error, and the managed-key record.

A managed API key is stored only as its SHA-256 digest: the plaintext exists once, in the answer
that created it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from router.config.model import Limits
from router.errors import RouterError


class StoreError(RouterError):
    """The store did not answer in time or failed: 503, the request may be retried."""

    status = 503
    type = "server_error"
    code = "store_unavailable"
    log_level = logging.WARNING

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A managed API key as stored. `digest` is the SHA-256 of the key; times are epoch seconds."""

    id: str
    digest: str
    user: str
    limits: Limits | None  # None: auth.default_limits
    models: tuple[str, ...]  # ("*",) or route names
    admin: bool
    created_at: float
    expires_at: float | None = None
    last_used_at: float | None = None


class Store(Protocol):
    """Shared state. Each method is one bounded operation (a timeout covers all of it) and
    raises StoreError, never a driver's exception."""

    async def ping(self) -> bool:
        """Whether the store answers now (readiness); never raises."""
        ...

    async def close(self) -> None: ...

    async def create_key(self, record: KeyRecord) -> None: ...

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        """The live record whose key hashes to `digest`, or None (unknown or revoked)."""
        ...

    async def list_keys(self) -> list[KeyRecord]: ...

    async def revoke_key(self, key_id: str) -> bool:
        """Delete the key; False when there was no such key."""
        ...

    async def touch_keys(self, used: Mapping[str, float]) -> None:
        """Record last-use times (key id -> epoch seconds) in one batch; unknown ids are skipped."""
        ...

    async def keys_version(self) -> str:
        """An opaque token that changes whenever a key is created or revoked (or the store lost
        its data): the change signal every replica polls to drop its cached keys."""
        ...
