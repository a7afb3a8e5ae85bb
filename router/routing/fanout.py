"""Fan-out: one request sent to several backends of its route at once.

`race` sends `fanout_width` copies at once and the first committed answer wins; `hedge` sends
one, then one more each `hedge_after_ms` without an answer (at most `max_hedges` more); `all`
asks every backend and merges the answers (router/routing/merge.py). Every copy is an ordinary
`attempt()` (first-byte timeout, in-flight count, ejection, metrics). The copies that lose are
cancelled at the moment of the win, which closes their upstream connections and frees their
slots. Only the route's own backends are asked: retries and fallbacks belong to `fanout: none`.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial

from router.errors import RouterError
from router.routing import merge
from router.routing.dispatch import (
    Opened,
    Outbound,
    UpstreamAnswer,
    attempt_or_error,
    finish_if_opened,
    spawn_counted,
    unavailable,
)
from router.routing.table import Backend, Route

RACE_WIDTH = 4  # race's default: every backend of the route, at most this many

Copy = asyncio.Task[Opened | RouterError]


async def fan_out(route: Route, out: Outbound) -> Opened:
    """The answer of a route whose `fanout` is race, hedge or all (never none)."""
    mode = route.config.fanout
    if mode == "all":
        return await merge.ask_all(route, out)
    copies = _Copies(route, mode, out)
    try:
        return await (copies.race() if mode == "race" else copies.hedge())
    finally:
        copies.cancel_pending()  # the client left (or every copy failed: nothing pending)


def hedge_delay(route: Route) -> float | None:
    """Seconds to wait for an answer before the next copy; None: do not hedge (yet)."""
    after = route.config.hedge_after_ms
    if after == "p95":
        return route.ttfb.p95()  # None until the route has seen enough first bytes
    return after / 1000


class _Copies:
    """The copies of one race or hedge in flight, and how the finished ones ended."""

    def __init__(self, route: Route, mode: str, out: Outbound) -> None:
        self.route = route
        self.mode = mode
        self.out = out
        self.metrics = out.metrics
        self.started = time.monotonic()
        self.live: dict[Copy, Backend] = {}
        self.tried: set[str] = set()
        self.sent = 0
        self.last_error: RouterError | None = None

    async def race(self) -> Opened:
        width = self.route.config.fanout_width or min(len(self.route.backends), RACE_WIDTH)
        while self.sent < width and self.launch():
            pass
        while self.live:
            winner = await self.settle(None)
            if winner is not None:
                return winner
        raise self.last_error or unavailable(self.route)

    async def hedge(self) -> Opened:
        delay = hedge_delay(self.route)
        budget = 1 + self.route.config.max_hedges
        next_at: float | None = None
        while True:
            if not self.live:
                # Nothing in flight (the start, or every copy failed): the next goes at once,
                # unless the upstream blamed the request itself (another would say the same).
                if isinstance(self.last_error, UpstreamAnswer):
                    raise self.last_error
                if self.sent >= budget or not self.launch():
                    raise self.last_error or unavailable(self.route)
                next_at = None if delay is None else time.monotonic() + delay
            timeout = None
            if next_at is not None and self.sent < budget:
                timeout = max(0.0, next_at - time.monotonic())
            winner = await self.settle(timeout)
            if winner is not None:
                self.route.ttfb.record(winner.ttfb_s)
                return winner
            if next_at is not None and self.live and time.monotonic() >= next_at \
                    and self.sent < budget:
                # No answer in time: one more copy, to a backend not asked yet.
                launched = self.launch()
                next_at = time.monotonic() + delay if launched and delay is not None else None

    def launch(self) -> bool:
        """Send one more copy to the strategy's next choice; False when no backend is left."""
        backend = self.route.pick(self.tried)
        if backend is None:
            return False
        self.tried.add(backend.name)
        self.sent += 1
        task = spawn_counted(backend, partial(
            attempt_or_error, self.route, backend, self.out, self.sent,
            until_content=self.mode == "race"), f"fanout-{self.mode}")
        self.live[task] = backend
        return True

    async def settle(self, wait_s: float | None) -> Opened | None:
        """Wait up to `wait_s` for copies to finish: the winner (the others are cancelled at
        once), or None when none won yet (failures are kept in `last_error`)."""
        done, _ = await asyncio.wait(self.live, timeout=wait_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        winner: Opened | None = None
        for task in done:
            del self.live[task]
            result = task.result()
            if isinstance(result, RouterError):
                self.last_error = result
                self._count("failed")
            elif winner is None:
                winner = result
            else:  # two answers in the same instant: the other is a loser all the same
                result.finish(upstream_failed=False)
                self._count("cancelled")
        if winner is None:
            return None
        self._count("won")
        self.cancel_pending()
        winner.attempts = self.sent
        winner.ttfb_s = time.monotonic() - self.started  # as the client sees it
        return winner

    def cancel_pending(self) -> None:
        """Cancel every copy in flight: its attempt closes the upstream exchange and frees
        the backend's slot as the cancellation lands (the next turn of the loop)."""
        for task in self.live:
            task.cancel()
            task.add_done_callback(finish_if_opened)
            self._count("cancelled")
        self.live.clear()

    def _count(self, outcome: str) -> None:
        self.metrics.fanout(self.mode, outcome)

