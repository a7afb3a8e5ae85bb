"""Open files at start-up: how many sockets the config's streams can hold at once, and lifting
the process's limit on open files toward it (workers inherit it)."""

from __future__ import annotations

import logging
import resource
from collections.abc import Mapping

from router.config import Config
from router.config.model import MockProviderConfig, ProviderConfig, RouteConfig

log = logging.getLogger("router.server")

SPARE_FILES = 256  # listener, store and log files, idle upstream connections


def upstream_sockets(route: RouteConfig, providers: Mapping[str, ProviderConfig]) -> int:
    """The most upstream connections one request of `route` holds at once. An in-process
    provider (`mock`) holds none; fan-out holds one per copy in flight (race and all: its width,
    hedge: the first copy and its hedges), never more than the route's network backends."""
    network = sum(1 for backend in route.backends
                  if not isinstance(providers[backend.provider], MockProviderConfig))
    if network == 0:
        return 0
    if route.fanout == "hedge":
        copies = 1 + route.max_hedges
    elif route.fanout in ("race", "all"):
        copies = route.fanout_width or len(route.backends)
    else:  # retries and fallbacks go one after another
        copies = 1
    return min(copies, network)


def sockets_per_stream(config: Config) -> int:
    """The client's socket plus the most upstream sockets a request of any route may hold at
    once (a fallback is one of the routes, tried after the other's attempts end)."""
    return 1 + max((upstream_sockets(route, config.providers)
                    for route in config.routes.values()), default=0)


def files_needed(config: Config) -> int:
    """Open files for `server.max_streams` streams at once, plus SPARE_FILES."""
    return config.server.max_streams * sockets_per_stream(config) + SPARE_FILES


def raise_open_files_limit(config: Config) -> None:
    """Lift the soft limit on open files to the hard one (a common soft default is 1024: about
    500 streams to a network backend), and warn when even the hard limit is short of what
    `server.max_streams` streams need on this config's providers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d: %s", soft, exc)
    needed = files_needed(config)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("open-files limit %d is below the %d that server.max_streams %d needs "
                    "(%d sockets per stream); raise it (LimitNOFILE= in the systemd unit, "
                    "ulimit -n) or lower server.max_streams", soft, needed,
                    config.server.max_streams, sockets_per_stream(config))
