"""Background tasks: created through one helper that keeps a reference and logs failures.
And what a failed store call costs: its count, and whether a request goes on without the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from router.store.base import StoreError

if TYPE_CHECKING:
    from router.config.model import Config
    from router.metrics import Metrics

log = logging.getLogger("router.tasks")

_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    task = asyncio.create_task(coro, name=name)  # noqa: TID251 - this is the helper
    _running.add(task)
    task.add_done_callback(_done)
    return task


def _done(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


def count_failure(metrics: Metrics, op: str, what: str
                  ) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback for a store call nobody waits for (settle, use_pin): a failure counts in
    router_store_errors_total{op} and logs one warning line (its message, no traceback)."""
    def done(outcome: asyncio.Future[Any]) -> None:
        exc = None if outcome.cancelled() else outcome.exception()
        if exc is not None:
            metrics.store_error(op)
            log.warning("could not %s: %s", what,
                        exc if isinstance(exc, StoreError) else type(exc).__name__)

    return done


def serve_without_store(metrics: Metrics, config: Config, op: str) -> bool:
    """A store call a request waits for failed: count it in router_store_errors_total{op}, and
    say whether the request goes on without the store (`store.on_failure: open`: limits decided
    in this process's memory, sessions placed by consistent hashing) or is refused (`closed`:
    the caller re-raises, and the client gets the 503)."""
    metrics.store_error(op)
    return config.store.on_failure != "closed"
