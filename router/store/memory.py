"""The embedded store: process memory, for one worker and for `make run`."""

from __future__ import annotations


class MemoryStore:
    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None
