"""The router's own one-worker collectors export exactly what prometheus-client's would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import DURATION_BUCKETS, TTFB_BUCKETS, Metrics


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples if not s.name.endswith("_created")}


def test_same_samples_as_prometheus_client() -> None:
    ours = Metrics()
    assert ours.multiprocess_dir is None
    r = CollectorRegistry()
    requests = Counter("router_requests_total", "x", ["route", "backend", "status", "stream"],
                       registry=r)
    duration = Histogram("router_request_duration_seconds", "x", ["route", "stream"],
                         buckets=DURATION_BUCKETS, registry=r)
    ttfb = Histogram("router_time_to_first_byte_seconds", "x", ["route", "backend"],
                     buckets=TTFB_BUCKETS, registry=r)
    inflight = Gauge("router_inflight_requests", "x", ["route"], registry=r)
    streams = Gauge("router_active_streams", "x", registry=r)
    # Values on bucket bounds (le is inclusive), between them, past the last, and zero.
    values = [0.0, 0.005, 0.0049, 0.01, 0.0101, 0.3, 60.0, 600.0, 700.0, 1e-9]
    for v in values:
        for route in ("a", "b"):
            ours.child(ours.duration, route, "false").observe(v)
            duration.labels(route, "false").observe(v)
            ours.child(ours.ttfb, route, "up/x").observe(v)
            ttfb.labels(route, "up/x").observe(v)
        ours.child(ours.requests, "a", "up/x", "200", "false").inc()
        requests.labels("a", "up/x", "200", "false").inc()
    ours.child(ours.requests, "a", "none", "502", "true").inc(3)
    requests.labels("a", "none", "502", "true").inc(3)
    for g in (ours.child(ours.inflight, "a"), inflight.labels("a")):
        g.inc()
        g.inc(2)
        g.dec()
    for g in (ours.child(ours.inflight, "b"), inflight.labels("b")):
        g.set(7)
    ours.active_streams.inc()
    streams.inc()

    mine = samples(ours.render())
    theirs = samples(generate_latest(r))
    assert {k: v for k, v in mine.items() if k[0] in {n for n, _ in theirs}} == theirs
    assert mine[("router_request_duration_seconds_count", (("route", "a"),
                                                            ("stream", "false")))] == len(values)
    # The series known in advance exist from the start.
    assert mine[("router_config_reloads_total", (("result", "failure"),))] == 0
    assert mine[("router_session_pins_total", (("outcome", "repin"),))] == 0
