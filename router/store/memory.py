"""The embedded store: process memory, for one worker and for `make run`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from router.store.base import KeyRecord


class MemoryStore:
    def __init__(self) -> None:
        self._keys: dict[str, KeyRecord] = {}  # id -> record
        self._by_digest: dict[str, str] = {}  # digest -> id
        self._version = 0

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    async def create_key(self, record: KeyRecord) -> None:
        self._keys[record.id] = record
        self._by_digest[record.digest] = record.id
        self._version += 1

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        key_id = self._by_digest.get(digest)
        return None if key_id is None else self._keys.get(key_id)

    async def list_keys(self) -> list[KeyRecord]:
        return sorted(self._keys.values(), key=lambda r: (r.created_at, r.id))

    async def revoke_key(self, key_id: str) -> bool:
        record = self._keys.pop(key_id, None)
        if record is None:
            return False
        self._by_digest.pop(record.digest, None)
        self._version += 1
        return True

    async def touch_keys(self, used: Mapping[str, float]) -> None:
        for key_id, at in used.items():
            record = self._keys.get(key_id)
            if record is not None:
                self._keys[key_id] = dataclasses.replace(record, last_used_at=at)

    async def keys_version(self) -> str:
        return str(self._version)
