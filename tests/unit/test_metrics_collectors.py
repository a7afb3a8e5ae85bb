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
            ours.request_done(route, "up/x", 200, False, v)
            requests.labels(route, "up/x", "200", "false").inc()
            duration.labels(route, "false").observe(v)
            ours.first_byte(route, "up/x", v)
            ttfb.labels(route, "up/x").observe(v)
    for _ in range(3):
        ours.request_done("a", "none", 502, True, 0.5)
        requests.labels("a", "none", "502", "true").inc()
        duration.labels("a", "true").observe(0.5)
    for g in (ours.in_flight("a"), inflight.labels("a")):
        g.inc()
        g.inc(2)
        g.dec()
    for _ in range(7):
        ours.in_flight("b").inc()
        inflight.labels("b").inc()
    ours.stream_opened()
    streams.inc()

    mine = samples(ours.render())
    theirs = samples(generate_latest(r))
    assert {k: v for k, v in mine.items() if k[0] in {n for n, _ in theirs}} == theirs
    assert mine[("router_request_duration_seconds_count", (("route", "a"),
                                                            ("stream", "false")))] == len(values)
    # The series known in advance exist from the start.
    assert mine[("router_config_reloads_total", (("result", "failure"),))] == 0
    assert mine[("router_session_pins_total", (("outcome", "repin"),))] == 0
    assert mine[("router_admin_actions_total", (("action", "undrain"),))] == 0


def test_each_event_writes_its_series() -> None:
    """The label names and their values, as each event writes them (the order is the module's
    own business, the names are the contract)."""
    m = Metrics()
    before = samples(m.render())
    m.request_done("r", "up/x", 429, True, 0.2)
    m.request_done("e", "up/e", 200, False, 0.1, "embeddings")
    m.first_byte("r", "up/x", 0.1)
    m.upstream_done("up/x", 0.3)
    m.tokens("r", "up/x", 3, 0)  # no completion tokens: no completion series
    m.in_flight("r").inc()
    m.stream_opened()
    m.rate_limited("tpm")
    m.auth_failed("api_key", "unknown_key")
    m.backend_up("up/x", False)
    m.backend_up("up/y", True)
    m.ejected("up/x", "timeout")
    m.retried("r", "upstream_error")
    m.fanout("race", "won")
    m.session_pin("hit")
    m.affinity("r", "spill")
    m.config_reloaded(ok=False)
    m.store_error("admit")
    m.admin_action("drain")
    after = {k: v for k, v in samples(m.render()).items()
             if k[0].startswith("router_") and not k[0].endswith("_bucket")
             and v != before.get(k)}
    assert after == {
        ("router_requests_total", (("backend", "up/x"), ("route", "r"), ("status", "429"),
                                   ("stream", "true"))): 1,
        ("router_endpoint_requests_total", (("endpoint", "chat"), ("route", "r"),
                                            ("status", "429"))): 1,
        ("router_request_duration_seconds_count", (("route", "r"), ("stream", "true"))): 1,
        ("router_request_duration_seconds_sum", (("route", "r"), ("stream", "true"))): 0.2,
        ("router_requests_total", (("backend", "up/e"), ("route", "e"), ("status", "200"),
                                   ("stream", "false"))): 1,
        ("router_endpoint_requests_total", (("endpoint", "embeddings"), ("route", "e"),
                                            ("status", "200"))): 1,
        ("router_request_duration_seconds_count", (("route", "e"), ("stream", "false"))): 1,
        ("router_request_duration_seconds_sum", (("route", "e"), ("stream", "false"))): 0.1,
        ("router_time_to_first_byte_seconds_count", (("backend", "up/x"), ("route", "r"))): 1,
        ("router_time_to_first_byte_seconds_sum", (("backend", "up/x"), ("route", "r"))): 0.1,
        ("router_upstream_duration_seconds_count", (("backend", "up/x"),)): 1,
        ("router_upstream_duration_seconds_sum", (("backend", "up/x"),)): 0.3,
        ("router_tokens_total", (("backend", "up/x"), ("kind", "prompt"), ("route", "r"))): 3,
        ("router_inflight_requests", (("route", "r"),)): 1,
        ("router_active_streams", ()): 1,
        ("router_rate_limited_total", (("limit", "tpm"),)): 1,
        ("router_auth_failures_total", (("credential", "api_key"),
                                        ("reason", "unknown_key"))): 1,
        ("router_backend_up", (("backend", "up/x"),)): 0,
        ("router_backend_up", (("backend", "up/y"),)): 1,
        ("router_backend_ejections_total", (("backend", "up/x"), ("reason", "timeout"))): 1,
        ("router_retries_total", (("reason", "upstream_error"), ("route", "r"))): 1,
        ("router_fanout_total", (("mode", "race"), ("outcome", "won"))): 1,
        ("router_session_pins_total", (("outcome", "hit"),)): 1,
        ("router_affinity_total", (("outcome", "spill"), ("route", "r"))): 1,
        ("router_config_reloads_total", (("result", "failure"),)): 1,
        ("router_store_errors_total", (("op", "admit"),)): 1,
        ("router_admin_actions_total", (("action", "drain"),)): 1,
    }
