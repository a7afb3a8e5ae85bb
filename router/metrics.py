"""Prometheus collectors (SPEC 8), created once per worker; label children cached for the hot path.

Label values come only from the config (route and backend names) or small fixed sets: never keys,
users, session ids or raw model strings from clients (an unknown model is route="unknown").
With `server.workers > 1` every worker writes to a shared multiprocess directory and /metrics
sums them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics import MetricWrapperBase

__all__ = ["CONTENT_TYPE", "DisabledMetrics", "Metrics"]

# Time to first byte: 5 ms to 60 s. Whole requests (streams included): 10 ms to 10 min.
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                    300.0, 600.0)
UNKNOWN = "unknown"


class Metrics:
    enabled = True

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        # A private registry per worker: tests run several workers in one process.
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("router_requests_total", "Requests answered, by outcome",
                                ["route", "backend", "status", "stream"], registry=r)
        self.duration = Histogram("router_request_duration_seconds",
                                  "Whole request duration, streams to their end",
                                  ["route", "stream"], buckets=DURATION_BUCKETS, registry=r)
        self.ttfb = Histogram("router_time_to_first_byte_seconds",
                              "Time from dispatch to the upstream's first byte",
                              ["route", "backend"], buckets=TTFB_BUCKETS, registry=r)
        self.upstream_duration = Histogram("router_upstream_duration_seconds",
                                           "Upstream exchange duration, head to last byte",
                                           ["backend"], buckets=DURATION_BUCKETS, registry=r)
        self.tokens = Counter("router_tokens_total", "Tokens reported by upstreams",
                              ["route", "backend", "kind"], registry=r)
        self.rate_limited = Counter("router_rate_limited_total", "Requests refused by a limit",
                                    ["limit"], registry=r)
        self.auth_failures = Counter("router_auth_failures_total", "Rejected credentials",
                                     ["credential", "reason"], registry=r)
        self.inflight = Gauge("router_inflight_requests", "Requests being served",
                              ["route"], registry=r, multiprocess_mode="livesum")
        self.active_streams = Gauge("router_active_streams", "Streams being relayed",
                                    registry=r, multiprocess_mode="livesum")
        self.backend_up = Gauge("router_backend_up",
                                "1 when the backend takes traffic (not ejected, probe up)",
                                ["backend"], registry=r, multiprocess_mode="livemin")
        self.ejections = Counter("router_backend_ejections_total", "Backends ejected",
                                 ["backend", "reason"], registry=r)
        self.retries = Counter("router_retries_total", "Attempts after the first",
                               ["route", "reason"], registry=r)
        self.fanout = Counter("router_fanout_total", "Fan-out upstream outcomes",
                              ["mode", "outcome"], registry=r)
        self.session_pins = Counter("router_session_pins_total", "Session pin lookups",
                                    ["outcome"], registry=r)
        self.config_reloads = Counter("router_config_reloads_total", "Config reloads",
                                      ["result"], registry=r)
        self.store_errors = Counter("router_store_errors_total", "Store calls that failed",
                                    ["op"], registry=r)
        self._children: dict[tuple[Any, ...], Any] = {}
        # Series known in advance exist from the start, so `increase()` sees their first event.
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        for outcome in ("new", "hit", "repin"):
            self.session_pins.labels(outcome)

    def child(self, metric: Any, *labels: str) -> Any:
        """A cached label child: one dict lookup per observation on the hot path."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        summed = CollectorRegistry()
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            summed, path=self.multiprocess_dir)
        return generate_latest(summed)


class _Off:
    """Every collector of DisabledMetrics: an observation is one empty call."""

    __slots__ = ()

    def labels(self, *labels: str) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        return None

    def dec(self, amount: float = 1) -> None:
        return None

    def set(self, value: float) -> None:
        return None

    def observe(self, amount: float) -> None:
        return None


OFF = _Off()


class DisabledMetrics(Metrics):
    """`metrics.enabled: false`: the same attributes, each collector a no-op, so the request
    path has no branch either way; nothing is recorded and nothing is rendered (the supervisor
    gives such workers no multiprocess directory)."""

    enabled = False

    def __init__(self) -> None:
        super().__init__()
        for name, value in list(vars(self).items()):
            if isinstance(value, MetricWrapperBase):
                setattr(self, name, OFF)
        self._children.clear()

    def child(self, metric: Any, *labels: str) -> Any:
        return OFF

    def render(self) -> bytes:
        return b""
