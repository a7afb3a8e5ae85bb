"""Identifiers the router makes per request: a request's id and a concurrency lease's.

Both need only be unique, not unguessable (neither grants anything): they come from a
per-process generator seeded from the OS (and seeded again in a forked child) instead of a
system call per request. Anything a client could use to reach something (a session id, an API
key, a token's id) comes from `secrets`.
"""

from __future__ import annotations

import os
import random

_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def request_id() -> str:
    """24 hex digits (96 bits)."""
    return f"{_ids.getrandbits(96):024x}"


def lease_id() -> str:
    """16 hex digits (64 bits)."""
    return f"{_ids.getrandbits(64):016x}"
