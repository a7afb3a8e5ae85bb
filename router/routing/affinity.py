"""Prefix affinity (`strategy: prefix_affinity`): a chat request goes to the backend its
prompt's leading part picks, where a KV (prefix) cache likely holds it already.

The key is a hash of that leading part only (by default the messages up to and including the
first `user` one, and the `tools`), read from the parsed body with a bound on the bytes hashed;
the backend comes from the weighted rendezvous hashing with bounded load that sessions fall back
to (router/routing/strategies.py), so every replica places the same prefix on the same backend
without a store, and a backend past its share of the load spills to the prefix's next choice.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.jsonbody import dump_json
from router.routing.strategies import rendezvous_place

if TYPE_CHECKING:
    from router.config import AffinityConfig
    from router.metrics import Metrics
    from router.routing.table import Backend, Route

# At most this much of the prompt is hashed (tools first, then the leading messages): prompts
# that agree on their first 64 KiB share that much cache anyway, wherever they differ later.
MAX_PREFIX_BYTES = 64 * 1024
SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True, slots=True)
class Affinity:
    """A route's prefix rule (`first_user`, `system`, or a number of messages) and load bound."""

    prefix: str | int
    load_factor: float

    @classmethod
    def of(cls, config: AffinityConfig) -> Affinity:
        return cls(config.prefix, config.load_factor)

    def place(self, route: Route, body: Mapping[str, Any], metrics: Metrics) -> Backend | None:
        """The backend a request without a session pin goes to first: its prefix's first
        choice among the available backends with room, unless past its load bound. None when
        no backend is available with room (dispatch then answers as it would without
        affinity) or the body has no messages."""
        key = prefix_key(body, self.prefix)
        if key is None:
            return None
        now = time.monotonic()
        candidates = [b for b in route.backends if b.state.available(now) and b.has_room()]
        backend, outcome = rendezvous_place(key, route.backends, candidates, self.load_factor)
        if backend is not None:
            metrics.affinity(route.name, outcome)
        return backend


def leading(messages: list[Any], prefix: str | int) -> list[Any]:
    """The messages that make up the prefix: the first `prefix` of them; for `system` the
    leading system (or developer) messages, or, without one, what `first_user` takes; for
    `first_user` those up to and including the first `user` message (all, without one)."""
    if isinstance(prefix, int):
        return messages[:prefix]
    if prefix == "system":
        count = 0
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in SYSTEM_ROLES:
                break
            count += 1
        if count:
            return messages[:count]
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return messages[:i + 1]
    return messages


def prefix_key(body: Mapping[str, Any], prefix: str | int) -> str | None:
    """A checksum of the body's `tools` and leading messages, at most MAX_PREFIX_BYTES of them,
    with their length: the same in every process for the same prefix (no per-process salt). A
    message's text is cut before it is encoded, so a long document costs no more than its first
    64 KiB. CRC-32 runs at several GB/s (a 13 KiB prefix: about 3 µs, blake2b 15 µs); the key
    only picks a backend, so two prefixes that collide merely share one."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    crc = 0
    budget = MAX_PREFIX_BYTES
    tools = body.get("tools")
    if tools:
        data = dump_json(tools)[:budget]
        crc = zlib.crc32(data, crc)
        budget -= len(data)
    for message in leading(messages, prefix):
        if budget <= 0:
            break
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            # The message's other fields (role, name), then its text cut to the budget.
            head = dump_json({k: v for k, v in message.items() if k != "content"})
            text = content[:budget].encode(errors="surrogatepass")[:budget]
            data = head + b"\0" + text
        else:
            data = dump_json(message)[:budget]
        crc = zlib.crc32(b"\x1e", zlib.crc32(data, crc))  # a separator: [ab][c] is not [a][bc]
        budget -= len(data)
    return f"{crc:08x}-{MAX_PREFIX_BYTES - budget:x}"
