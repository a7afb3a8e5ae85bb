"""The router's metrics: one method per event (`request_done`, `first_byte`, ...), so the metric
names, label names and label order live in this module only; `DisabledMetrics` has the same
methods, each a no-op. Collectors are created once per worker, label children cached per event.

Label values come only from the config (route and backend names) or small fixed sets: never keys,
users, session ids or raw model strings from clients (an unknown model is route="unknown").

One worker: each label child is a plain object updated without a lock (the worker is one event
loop) and read when /metrics is scraped; an observation is an attribute add (a histogram's is a
C bisect and two adds). With `server.workers > 1` every worker writes prometheus-client's own
collectors to a shared multiprocess directory and /metrics sums them (its multiprocess mode).

Each worker's process figures (`process_resident_memory_bytes`, `process_open_fds`,
`process_cpu_seconds_total`, ... from prometheus-client's ProcessCollector, Linux only) are read
at scrape time. One worker: unlabelled, as any Python exporter has them. Several: one series per
live worker with a `pid` label (memory, file descriptors and start times do not add up into one
meaningful figure); whichever worker answers reads its siblings' /proc entries.
"""

from __future__ import annotations

import os
import re
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
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

__all__ = ["CONTENT_TYPE", "DisabledMetrics", "InFlight", "Metrics"]

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


class _Count(Protocol):
    def inc(self, amount: float = ...) -> None: ...


class InFlight(Protocol):
    """A level one request raises while it is served and lowers when it ends."""

    def inc(self, amount: float = ...) -> None: ...

    def dec(self, amount: float = ...) -> None: ...


class _Level(InFlight, Protocol):
    def set(self, value: float) -> None: ...


class _Observe(Protocol):
    def observe(self, amount: float) -> None: ...


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Children(dict[K, V], Generic[K, V]):
    """One event's label children by its label values: a hit is one dict lookup (the C path of
    `d[key]`); a miss creates the children once (`__missing__`)."""

    def __init__(self, make: Callable[[K], V]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: K) -> V:
        value = self[key] = self._make(key)
        return value

    def create(self, *keys: K) -> None:
        for key in keys:
            if key not in self:
                self[key] = self._make(key)


def _flag(value: bool) -> str:
    return "true" if value else "false"


class Metrics:
    """This worker's collectors, written through one method per event."""

    enabled = True

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        # A private registry per worker (tests run several workers in one process) holding the
        # router's own metrics; a scrape adds the process figures (read from /proc only then).
        self.registry = CollectorRegistry(auto_describe=True)
        self._own = _Families()
        self._scraped = CollectorRegistry()
        if self.multiprocess_dir is None:
            self.registry.register(self._own)
            self._scraped.register(self._own)
            self._scraped.register(_ThisProcess())
        requests = self._counter("router_requests_total", "Requests answered, by outcome",
                                 "route", "backend", "status", "stream")
        by_endpoint = self._counter("router_endpoint_requests_total",
                                    "Requests answered, by API endpoint and outcome",
                                    "endpoint", "route", "status")
        duration = self._histogram("router_request_duration_seconds",
                                   "Whole request duration, streams to their end",
                                   DURATION_BUCKETS, "route", "stream")
        ttfb = self._histogram("router_time_to_first_byte_seconds",
                               "Time from dispatch to the upstream's first byte",
                               TTFB_BUCKETS, "route", "backend")
        upstream_duration = self._histogram(
            "router_upstream_duration_seconds", "Upstream exchange duration, head to last byte",
            DURATION_BUCKETS, "backend")
        tokens = self._counter("router_tokens_total", "Tokens reported by upstreams",
                               "route", "backend", "kind")
        rate_limited = self._counter("router_rate_limited_total", "Requests refused by a limit",
                                     "limit")
        auth_failures = self._counter("router_auth_failures_total", "Rejected credentials",
                                      "credential", "reason")
        inflight = self._gauge("router_inflight_requests", "Requests being served",
                               "livesum", "route")
        self._active_streams: _Level = self._gauge("router_active_streams",
                                                   "Streams being relayed", "livesum")
        backend_up = self._gauge("router_backend_up",
                                 "1 when the backend takes traffic (not ejected, resting, "
                                 "probed down or drained)",
                                 "livemin", "backend")
        ejections = self._counter("router_backend_ejections_total", "Backends ejected",
                                  "backend", "reason")
        retries = self._counter("router_retries_total", "Attempts after the first",
                                "route", "reason")
        fanout = self._counter("router_fanout_total", "Fan-out upstream outcomes",
                               "mode", "outcome")
        session_pins = self._counter("router_session_pins_total", "Session pin lookups",
                                     "outcome")
        affinity = self._counter("router_affinity_total",
                                 "Requests placed by their prompt prefix (prefix_affinity)",
                                 "route", "outcome")
        config_reloads = self._counter("router_config_reloads_total", "Config reloads",
                                       "result")
        store_errors = self._counter("router_store_errors_total", "Store calls that failed",
                                     "op")
        admin_actions = self._counter("router_admin_actions_total",
                                      "Operator actions through the admin API", "action")

        # The label order of every metric, in one place: each event's children by its key.
        def done(key: tuple[str, str, int, bool, str]) -> tuple[_Count, _Count, _Observe]:
            route, backend, status, stream, endpoint = key
            return (requests.labels(route, backend, str(status), _flag(stream)),
                    by_endpoint.labels(endpoint, route, str(status)),
                    duration.labels(route, _flag(stream)))

        self._done = _Children(done)
        self._ttfb: _Children[tuple[str, str], _Observe] = _Children(
            lambda key: ttfb.labels(*key))
        self._upstream: _Children[str, _Observe] = _Children(upstream_duration.labels)
        self._tokens: _Children[tuple[str, str, str], _Count] = _Children(
            lambda key: tokens.labels(*key))
        self._rate_limited: _Children[str, _Count] = _Children(rate_limited.labels)
        self._auth_failures: _Children[tuple[str, str], _Count] = _Children(
            lambda key: auth_failures.labels(*key))
        self._inflight: _Children[str, InFlight] = _Children(inflight.labels)
        self._backend_up: _Children[str, _Level] = _Children(backend_up.labels)
        self._ejections: _Children[tuple[str, str], _Count] = _Children(
            lambda key: ejections.labels(*key))
        self._retries: _Children[tuple[str, str], _Count] = _Children(
            lambda key: retries.labels(*key))
        self._fanout: _Children[tuple[str, str], _Count] = _Children(
            lambda key: fanout.labels(*key))
        self._session_pins: _Children[str, _Count] = _Children(session_pins.labels)
        self._affinity: _Children[tuple[str, str], _Count] = _Children(
            lambda key: affinity.labels(*key))
        self._config_reloads: _Children[bool, _Count] = _Children(
            lambda ok: config_reloads.labels("success" if ok else "failure"))
        self._store_errors: _Children[str, _Count] = _Children(store_errors.labels)
        self._admin_actions: _Children[str, _Count] = _Children(admin_actions.labels)
        # Series known in advance exist from the start, so `increase()` sees their first event.
        self._config_reloads.create(True, False)
        self._session_pins.create("new", "hit", "repin")
        self._admin_actions.create("drain", "undrain")

    # The events. Label values are the config's names or small fixed sets (see the docstring).

    def request_done(self, route: str, backend: str, status: int, stream: bool,
                     seconds: float, endpoint: str = "chat") -> None:
        """A request to an upstream endpoint answered (`status` 499: the client left first),
        `seconds` after it arrived: router_requests_total, router_endpoint_requests_total
        (`endpoint`: chat, responses, embeddings, completions) and
        router_request_duration_seconds."""
        count, by_endpoint, duration = self._done[route, backend, status, stream, endpoint]
        count.inc()
        by_endpoint.inc()
        duration.observe(seconds)

    def in_flight(self, route: str) -> InFlight:
        """router_inflight_requests{route}: the caller raises it, and lowers it when done."""
        return self._inflight[route]

    def first_byte(self, route: str, backend: str, seconds: float) -> None:
        self._ttfb[route, backend].observe(seconds)

    def upstream_done(self, backend: str, seconds: float) -> None:
        self._upstream[backend].observe(seconds)

    def tokens(self, route: str, backend: str, prompt: int, completion: int) -> None:
        """Tokens an upstream reported; a kind with none adds no series."""
        if prompt > 0:
            self._tokens[route, backend, "prompt"].inc(prompt)
        if completion > 0:
            self._tokens[route, backend, "completion"].inc(completion)

    def stream_opened(self) -> None:
        self._active_streams.inc()

    def stream_closed(self) -> None:
        self._active_streams.dec()

    def rate_limited(self, limit: str) -> None:
        self._rate_limited[limit].inc()

    def auth_failed(self, credential: str, reason: str) -> None:
        self._auth_failures[credential, reason].inc()

    def backend_up(self, backend: str, up: bool) -> None:
        self._backend_up[backend].set(1 if up else 0)

    def ejected(self, backend: str, reason: str) -> None:
        self._ejections[backend, reason].inc()

    def retried(self, route: str, reason: str) -> None:
        self._retries[route, reason].inc()

    def fanout(self, mode: str, outcome: str) -> None:
        self._fanout[mode, outcome].inc()

    def session_pin(self, outcome: str) -> None:
        self._session_pins[outcome].inc()

    def affinity(self, route: str, outcome: str) -> None:
        """A request placed by its prompt prefix: `first` (the prefix's first choice), `spill`
        (that one is past its load bound) or `skip` (it is ejected, resting, drained or full)."""
        self._affinity[route, outcome].inc()

    def config_reloaded(self, ok: bool) -> None:
        self._config_reloads[ok].inc()

    def store_error(self, op: str) -> None:
        self._store_errors[op].inc()

    def admin_action(self, action: str) -> None:
        """An operator acted through the admin API: `drain`, `undrain` (a backend)."""
        self._admin_actions[action].inc()

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self._scraped)
        summed = CollectorRegistry()
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            summed, path=self.multiprocess_dir)
        summed.register(_WorkerProcesses(self.multiprocess_dir))
        return generate_latest(summed)

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


class _ThisProcess:
    """prometheus-client's ProcessCollector for this worker, made at the first scrape: it reads
    /proc, which the scrape does in a thread, off the event loop."""

    def __init__(self) -> None:
        self._process: ProcessCollector | None = None

    def collect(self) -> Iterable[Metric]:
        if self._process is None:
            self._process = ProcessCollector(registry=None)
        return self._process.collect()


# prometheus-client's multiprocess files are named <kind>[_<mode>]_<pid>.db.
_PID_FILE = re.compile(r"_(\d+)\.db$")


class _WorkerProcesses:
    """The process figures of every live worker, each with a `pid` label. A worker is a pid
    with files in the multiprocess directory whose process is still there and is a sibling of
    this one (the same supervisor): a dead worker's files stay, and its pid may be reused."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._pid = 0
        self._process = ProcessCollector(pid=lambda: self._pid, registry=None)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for pid in sorted(self._workers()):
            self._pid = pid
            for found in self._process.collect():
                family = families.get(found.name)
                if family is None:
                    family = families[found.name] = Metric(found.name, found.documentation,
                                                           found.type)
                for s in found.samples:
                    family.add_sample(s.name, {**s.labels, "pid": str(pid)}, s.value)
        yield from families.values()

    def _workers(self) -> set[int]:
        try:
            names = os.listdir(self._path)
        except OSError:
            return set()
        parent = os.getppid()
        pids = {int(m.group(1)) for m in map(_PID_FILE.search, names) if m is not None}
        return {pid for pid in pids if _parent_of(pid) == parent}


def _parent_of(pid: int) -> int | None:
    """The parent of a running process (None once it has exited, even if not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # pid (comm) state ppid ...: comm may hold spaces and parentheses.
            state, ppid = stat.read().rsplit(b")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return None
    return None if state in (b"Z", b"X") else int(ppid)


COLLECTOR_TYPES = (MetricWrapperBase, _Family, _Value, _Buckets)


class DisabledMetrics(Metrics):
    """`metrics.enabled: false`: every event is a no-op, so the request path has no branch
    either way; no collector exists, nothing is recorded and nothing is rendered (the supervisor
    gives such workers no multiprocess directory)."""

    enabled = False

    def __init__(self) -> None:  # no collectors, no registry
        self.multiprocess_dir = None

    def request_done(self, route: str, backend: str, status: int, stream: bool,
                     seconds: float, endpoint: str = "chat") -> None:
        pass

    def in_flight(self, route: str) -> InFlight:
        return OFF

    def first_byte(self, route: str, backend: str, seconds: float) -> None:
        pass

    def upstream_done(self, backend: str, seconds: float) -> None:
        pass

    def tokens(self, route: str, backend: str, prompt: int, completion: int) -> None:
        pass

    def stream_opened(self) -> None:
        pass

    def stream_closed(self) -> None:
        pass

    def rate_limited(self, limit: str) -> None:
        pass

    def auth_failed(self, credential: str, reason: str) -> None:
        pass

    def backend_up(self, backend: str, up: bool) -> None:
        pass

    def ejected(self, backend: str, reason: str) -> None:
        pass

    def retried(self, route: str, reason: str) -> None:
        pass

    def fanout(self, mode: str, outcome: str) -> None:
        pass

    def session_pin(self, outcome: str) -> None:
        pass

    def affinity(self, route: str, outcome: str) -> None:
        pass

    def config_reloaded(self, ok: bool) -> None:
        pass

    def store_error(self, op: str) -> None:
        pass

    def admin_action(self, action: str) -> None:
        pass

    def render(self) -> bytes:
        return b""


class _Off:
    """The in-flight level of DisabledMetrics."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        return None

    def dec(self, amount: float = 1) -> None:
        return None


OFF = _Off()
