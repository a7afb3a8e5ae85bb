"""Per-principal usage for GET /api/v1/admin/usage: requests, tokens and errors of each principal,
kept out of the metrics (principals are unbounded).

A request's end adds to a dict in this process (`UsageMeter.record`, O(1), no store call); a
background flush adds what gathered to the store's hourly buckets every `usage.flush_interval_s`
in one batch, and once more at shutdown. Each worker and replica flushes its own deltas: the
buckets sum them. A flush that fails keeps its deltas for the next one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from router.auth import Principal
from router.errors import ValidationFailed
from router.metrics import Metrics
from router.runtime import RuntimeRef
from router.store import StoreError, UsageStore
from router.store.base import HOUR_S, UsageCount

log = logging.getLogger("router.usage")

MAX_WINDOW_S = 366 * 86400  # a report reads one bucket per hour: at most a year and a day
DEFAULT_WINDOW_S = 86400
LAST_INSTANT = 253_402_297_200  # 9999-12-31T23:00:00Z: the report's `to` still has a year
_EPOCH = re.compile(r"[0-9]{1,11}(\.[0-9]{0,9})?")  # up to year 5138: below LAST_INSTANT


class UsageMeter:
    """This worker's usage since its last flush: (hour, principal id) -> [user, requests,
    prompt tokens, completion tokens, errors]."""

    def __init__(self, store: UsageStore, ref: RuntimeRef, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._ref = ref
        self._metrics = metrics
        self._clock = clock
        self._pending: dict[tuple[int, str], list[Any]] = {}
        self._lock = asyncio.Lock()  # one flush at a time: a flush that returns has landed
        self._failing = False

    def record(self, principal: Principal, tokens: tuple[int, int] | None,
               failed: bool) -> None:
        key = (int(self._clock()) // HOUR_S, principal.id)
        row = self._pending.get(key)
        if row is None:
            row = self._pending[key] = [principal.user, 0, 0, 0, 0]
        row[1] += 1
        if tokens is not None:
            row[2] += tokens[0]
            row[3] += tokens[1]
        if failed:
            row[4] += 1

    async def flush(self) -> None:
        """Add what gathered to the store; on failure keep it for the next flush (a flush that
        timed out after Redis applied it may then count twice: at least once, not at most)."""
        async with self._lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, {}
            buckets: dict[int, list[UsageCount]] = {}
            for (hour, principal), (user, *counts) in pending.items():
                buckets.setdefault(hour, []).append(UsageCount(principal, user, *counts))
            retention_s = self._ref.current.config.usage.retention_days * 86400.0
            try:
                await self._store.add_usage(buckets, retention_s)
            except BaseException as exc:
                self._keep(pending)
                if not isinstance(exc, StoreError):
                    raise  # cancelled (shutdown): the final flush sends them
                self._metrics.store_error("usage")
                if not self._failing:
                    log.warning("usage flush failed, kept for the next one: %s", exc)
                self._failing = True
                return
            if self._failing:
                log.info("usage flush works again")
            self._failing = False

    def _keep(self, pending: Mapping[tuple[int, str], list[Any]]) -> None:
        for key, (user, *counts) in pending.items():
            row = self._pending.get(key)
            if row is None:
                self._pending[key] = [user, *counts]
            else:
                for i, n in enumerate(counts, 1):
                    row[i] += n

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._ref.current.config.usage.flush_interval_s)
            await self.flush()


def report_window(query: Mapping[str, str], now: float) -> tuple[int, int]:
    """`from` and `to` (ISO 8601, no zone meaning UTC, or epoch seconds; default: the last 24
    hours) -> the hours [first, end) that cover [from, to), or ValidationFailed."""
    problems: list[dict[str, Any]] = []
    bounds: dict[str, float] = {}
    for name, default in (("to", now), ("from", None)):
        raw = query.get(name)
        if not raw:  # absent or empty (`?to=`): the default
            if default is not None:
                bounds[name] = default
            continue
        parsed = instant(raw)
        if parsed is None:
            problems.append({"loc": ["query", name], "msg": "expected an ISO 8601 time (e.g. "
                             "2026-01-31T00:00:00Z) or unix seconds", "type": "value_error"})
        else:
            bounds[name] = parsed
    if problems:
        raise ValidationFailed(problems)
    end = bounds["to"]
    start = bounds.get("from", end - DEFAULT_WINDOW_S)
    if start >= end:
        raise ValidationFailed([{"loc": ["query", "to"], "msg": "`to` must be after `from`",
                                 "type": "value_error"}])
    if end - start > MAX_WINDOW_S:
        raise ValidationFailed([{"loc": ["query", "from"],
                                 "msg": "the window is longer than 366 days",
                                 "type": "value_error"}])
    return int(start // HOUR_S), math.ceil(end / HOUR_S)


def instant(raw: str) -> float | None:
    raw = raw.strip()
    if _EPOCH.fullmatch(raw):
        ts = float(raw)
    else:
        try:
            at = datetime.fromisoformat(raw)
        except ValueError:
            return None
        try:
            ts = (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).timestamp()
        except (OverflowError, ValueError):  # year 1 or 9999 moved past the calendar by its zone
            ts = 0.0 if at.year < 1970 else LAST_INSTANT
    # Usage began in 1970 and the last hour kept is LAST_INSTANT: any valid time outside is
    # the same bound.
    return min(max(ts, 0.0), LAST_INSTANT)


def report(first_hour: int, end_hour: int, counts: list[UsageCount]) -> dict[str, Any]:
    """The report's JSON: the window as hours were summed, busiest principals first."""
    rows = sorted(counts, key=lambda c: (-c.requests, c.principal))
    return {
        "object": "usage_report",
        "from": _iso(first_hour * HOUR_S),
        "to": _iso(end_hour * HOUR_S),
        "bucket_s": HOUR_S,
        "principals": [{"principal": c.principal, "user": c.user, "requests": c.requests,
                        "prompt_tokens": c.prompt_tokens,
                        "completion_tokens": c.completion_tokens, "errors": c.errors}
                       for c in rows],
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
