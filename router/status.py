"""What `GET /api/v1/admin/status` answers: this worker's view of its config, its store and every
backend's state, as plain data. Names and numbers only: never a key, a secret or an upstream URL.

A backend's `state`, the first that holds:
    drained      an operator took it out of rotation (router/drains.py)
    probe_down   its provider fails the active probe
    resting      its upstream answered 429: back at `rest_until`
    ejected      passive ejection after consecutive failures: back at `rest_until`
    up           in rotation
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from router import __version__
from router.config.model import StoreConfig
from router.config.store_url import parse_store_url
from router.routing.health import BackendState
from router.routing.table import Backend, RoutingTable

State = Literal["up", "ejected", "resting", "probe_down", "drained"]
STATES: tuple[State, ...] = ("up", "ejected", "resting", "probe_down", "drained")

MAX_ERROR_CHARS = 4000  # a reload error's text (one line per problem) as the status shows it


@dataclass(frozen=True, slots=True)
class Reload:
    """How one config reload ended; `at` in epoch seconds."""

    at: float
    ok: bool
    error: str | None = None  # the problems, each with its YAML path and line


@dataclass(slots=True)
class ConfigStatus:
    """The config file this worker serves, and its last reload (written by server.py's
    watcher; None until a reload is tried)."""

    path: str
    sha256: str | None = None  # of the file as loaded; None when it could not be read again
    loaded_at: float = 0.0  # epoch seconds: when the config now serving was loaded
    last_reload: Reload | None = None

    def loaded(self, sha256: str | None) -> None:
        """A config from the file now serves (start-up, or a reload that succeeded)."""
        self.sha256 = sha256
        self.loaded_at = time.time()

    def reloaded(self, sha256: str | None) -> None:
        self.loaded(sha256)
        self.last_reload = Reload(self.loaded_at, ok=True)

    def refused(self, error: str) -> None:
        """A reload failed: the config that was serving still does."""
        if len(error) > MAX_ERROR_CHARS:
            error = error[:MAX_ERROR_CHARS] + "..."
        self.last_reload = Reload(time.time(), ok=False, error=error)


def file_sha256(path: str | Path) -> str | None:
    """The hex SHA-256 of the file's bytes (blocking: call it off the event loop)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def store_kind(config: StoreConfig) -> str:
    """`memory`, `redis`, `sentinel` or `cluster` (never the url: it may carry a password)."""
    if config.url.startswith("memory://"):
        return "memory"
    return parse_store_url(config.url).kind


def backend_state(state: BackendState, now: float) -> State:
    """The word for a backend's state (see the module's docstring); `now` is monotonic."""
    if state.drained:
        return "drained"
    if state.probe_down:
        return "probe_down"
    if now < state.resting_until:
        return "resting"
    if now < state.ejected_until:
        return "ejected"
    return "up"


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds (`...T12:00:00.250Z`)."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def backend_view(backend: Backend, now: float, wall: float) -> dict[str, Any]:
    """One backend as the status shows it: `now` monotonic, `wall` the same instant in epoch
    seconds (a rest's end is kept on the monotonic clock)."""
    state = backend.state
    until = (state.resting_until if now < state.resting_until
             else state.ejected_until if now < state.ejected_until else None)
    ewma = state.ewma_ttfb_s
    return {
        "name": backend.name,
        "provider": backend.provider.name,
        "model": backend.model,
        "state": backend_state(state, now),
        "inflight": state.inflight,
        "latency_ewma_ms": None if ewma is None else round(ewma * 1000, 1),
        "ejections": state.ejections,
        "rest_until": None if until is None else iso(wall + (until - now)),
    }


def routes_view(table: RoutingTable) -> dict[str, Any]:
    now, wall = time.monotonic(), time.time()
    return {name: {"strategy": route.config.strategy, "fanout": route.config.fanout,
                   "backends": [backend_view(b, now, wall) for b in route.backends]}
            for name, route in table.routes.items()}


def status_document(table: RoutingTable, workers: int, config: ConfigStatus,
                    store: StoreConfig, store_healthy: bool, started_at: float
                    ) -> dict[str, Any]:
    """The whole answer; `started_at` is when this worker started (monotonic)."""
    last = config.last_reload
    return {
        "version": __version__,
        "uptime_s": round(time.monotonic() - started_at, 1),
        "worker": {"pid": os.getpid(), "workers": workers},
        "config": {
            "path": config.path,
            "sha256": config.sha256,
            "loaded_at": iso(config.loaded_at),
            "last_reload": None if last is None else {
                "at": iso(last.at), "result": "success" if last.ok else "failure",
                "error": last.error},
        },
        "store": {"kind": store_kind(store), "healthy": store_healthy},
        "routes": routes_view(table),
    }
