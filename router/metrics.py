"""Prometheus collectors (SPEC 8), created once per worker; label children cached for the hot path.

Label values come only from the config (route and backend names) or small fixed sets: never keys,
users, session ids or raw model strings from clients (an unknown model is route="unknown").

One worker: each label child is a plain object updated without a lock (the worker is one event
loop) and read when /metrics is scraped; an observation is an attribute add (a histogram's is a
C bisect and two adds). With `server.workers > 1` every worker writes prometheus-client's own
collectors to a shared multiprocess directory and /metrics sums them (its multiprocess mode).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator, Sequence
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
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

__all__ = ["CONTENT_TYPE", "DisabledMetrics", "Metrics"]

# Time to first byte: 5 ms to 60 s. Whole requests (streams included): 10 ms to 10 min.
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                    300.0, 600.0)
UNKNOWN = "unknown"


class _Value:
    """A counter's or gauge's child in one worker."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class _Buckets:
    """A histogram's child in one worker: a count per bucket (not cumulative; the last is +Inf)
    and the sum. `bisect_left` finds the first bound >= the value: Prometheus's `le`."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Family:
    """One metric of one worker: its children by label values, rendered at scrape time."""

    def __init__(self, kind: str, name: str, doc: str, labelnames: Sequence[str],
                 buckets: tuple[float, ...] = ()) -> None:
        self.kind, self.name, self.doc = kind, name, doc
        self.labelnames = tuple(labelnames)
        self.buckets = buckets
        self.children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self.children[values] = (
                _Buckets(self.buckets) if self.kind == "histogram" else _Value())
        return child

    def family(self) -> Metric:
        # The scrape runs in a thread: list() copies the dict (and each list) in one step.
        children = list(self.children.items())
        if self.kind == "histogram":
            hist = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
            bounds = [*map(floatToGoString, self.buckets), "+Inf"]
            for values, child in children:
                counts, total, running = list(child.counts), child.sum, 0
                cumulative = []
                for bound, n in zip(bounds, counts, strict=True):
                    running += n
                    cumulative.append((bound, float(running)))
                hist.add_metric(values, cumulative, total)
            return hist
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        out = cls(self.name, self.doc, labels=self.labelnames)
        for values, child in children:
            out.add_metric(values, child.value)
        return out


class _Families:
    """The registry's view of one worker's families."""

    def __init__(self) -> None:
        self.families: list[_Family] = []

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.family()


class Metrics:
    enabled = True

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        # A private registry per worker: tests run several workers in one process.
        self.registry = CollectorRegistry(auto_describe=True)
        self._own = _Families()
        if self.multiprocess_dir is None:
            self.registry.register(self._own)
        self.requests = self._counter("router_requests_total", "Requests answered, by outcome",
                                      "route", "backend", "status", "stream")
        self.duration = self._histogram("router_request_duration_seconds",
                                        "Whole request duration, streams to their end",
                                        DURATION_BUCKETS, "route", "stream")
        self.ttfb = self._histogram("router_time_to_first_byte_seconds",
                                    "Time from dispatch to the upstream's first byte",
                                    TTFB_BUCKETS, "route", "backend")
        self.upstream_duration = self._histogram(
            "router_upstream_duration_seconds", "Upstream exchange duration, head to last byte",
            DURATION_BUCKETS, "backend")
        self.tokens = self._counter("router_tokens_total", "Tokens reported by upstreams",
                                    "route", "backend", "kind")
        self.rate_limited = self._counter("router_rate_limited_total",
                                          "Requests refused by a limit", "limit")
        self.auth_failures = self._counter("router_auth_failures_total", "Rejected credentials",
                                           "credential", "reason")
        self.inflight = self._gauge("router_inflight_requests", "Requests being served",
                                    "livesum", "route")
        self.active_streams = self._gauge("router_active_streams", "Streams being relayed",
                                          "livesum")
        self.backend_up = self._gauge("router_backend_up",
                                      "1 when the backend takes traffic (not ejected, probe up)",
                                      "livemin", "backend")
        self.ejections = self._counter("router_backend_ejections_total", "Backends ejected",
                                       "backend", "reason")
        self.retries = self._counter("router_retries_total", "Attempts after the first",
                                     "route", "reason")
        self.fanout = self._counter("router_fanout_total", "Fan-out upstream outcomes",
                                    "mode", "outcome")
        self.session_pins = self._counter("router_session_pins_total", "Session pin lookups",
                                          "outcome")
        self.config_reloads = self._counter("router_config_reloads_total", "Config reloads",
                                            "result")
        self.store_errors = self._counter("router_store_errors_total", "Store calls that failed",
                                          "op")
        self._children: dict[tuple[Any, ...], Any] = {}
        # Series known in advance exist from the start, so `increase()` sees their first event.
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        for outcome in ("new", "hit", "repin"):
            self.session_pins.labels(outcome)

    # Each collector is this worker's own (_Family; an unlabelled one is its only child) or,
    # in multiprocess mode, prometheus-client's.

    def _counter(self, name: str, doc: str, *labelnames: str) -> Any:
        if self.multiprocess_dir is not None:
            return Counter(name, doc, labelnames, registry=self.registry)
        return self._family("counter", name, doc, labelnames)

    def _gauge(self, name: str, doc: str, mode: str, *labelnames: str) -> Any:
        if self.multiprocess_dir is not None:
            return Gauge(name, doc, labelnames, registry=self.registry,
                         multiprocess_mode=mode)  # type: ignore[arg-type]
        return self._family("gauge", name, doc, labelnames)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...],
                   *labelnames: str) -> Any:
        if self.multiprocess_dir is not None:
            return Histogram(name, doc, labelnames, buckets=buckets, registry=self.registry)
        return self._family("histogram", name, doc, labelnames, buckets)

    def _family(self, kind: str, name: str, doc: str, labelnames: Sequence[str],
                buckets: tuple[float, ...] = ()) -> Any:
        family = _Family(kind, name, doc, labelnames, buckets)
        self._own.families.append(family)
        return family if labelnames else family.labels()

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


COLLECTOR_TYPES = (MetricWrapperBase, _Family, _Value, _Buckets)


def collectors(metrics: Metrics) -> dict[str, Any]:
    """The metrics' collectors by attribute name."""
    return {name: value for name, value in vars(metrics).items()
            if isinstance(value, COLLECTOR_TYPES)}


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
        for name in collectors(self):
            setattr(self, name, OFF)
        self._children.clear()

    def child(self, metric: Any, *labels: str) -> Any:
        return OFF

    def render(self) -> bytes:
        return b""
