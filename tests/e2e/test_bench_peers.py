"""`router bench --peers` end to end against real processes (the fast upstream, the router,
Debian's nginx) with tiny phases: the JSON's shape, and its ratios taken from the medians of the
rounds it holds. Skipped when nginx is not installed (`make bench-deps`)."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from router.bench import peers
from router.bench.harness import Machine, processes
from router.bench.nginx_peer import nginx_binary
from router.bench.peers_report import METRICS, document, write
from router.bench.plan import parse


@pytest.mark.timeout(60)
def test_peers_run_against_nginx(tmp_path: Path) -> None:
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (`make bench-deps` installs it)")
    out = tmp_path / "results"
    plan = parse(["--peers-only", "--rate", "100", "--peer-targets", "direct,router,floor,nginx",
                  "--peer-rounds", "2", "--results", str(out)])
    tiny = dataclasses.replace(peers.settings(plan), phase_s=0.3, warmup_s=0.3, c1_count=10,
                               open_streams=10, settle_s=0.1)
    # Unpinned and without wrk: the Python client's closed loop takes sub-second phases.
    machine = Machine(pinned=False, wrk=None)
    with processes() as procs:
        run = peers.run(procs, machine, tmp_path, plan, [], tiny)
    written, _ = write(document(run), out)
    doc = json.loads(written[0].read_text())
    assert written[1].read_text().startswith(f"Peers, run {doc['run_id']}")

    assert doc["kind"] == "router-bench-peers" and doc["settings"]["rounds"] == 2
    assert list(doc["targets"]) == ["direct", "router", "floor", "nginx"]
    for name, entry in doc["targets"].items():
        assert entry["status"] == "measured", (name, entry.get("failure"))
        assert not entry["saturated"] and entry["open_loop_rate"] == 100
        for scenario in peers.SCENARIOS:
            assert len(entry["rounds"][scenario]) == 2, (name, scenario)
        for m in METRICS:
            if m.key.startswith("cpu_") and name == "direct":
                continue  # no proxy process
            summary = entry["summary"][m.key]
            assert summary is not None and summary["n"] == 2, (name, m.key)
            assert summary["min"] <= summary["median"] <= summary["max"]
        assert entry["summary"]["rps"]["median"] > 0
        assert entry["rounds"]["openloop"][0]["cdf_ms"][-1][0] == 100
        if name != "direct":
            assert entry["rss"]["with_first_chunk"] == 10
            assert entry["summary"]["rss_open_mb"]["median"] > 1

    # Each ratio is between the medians of this run's rounds, as stored in the same document.
    def med(target: str, path: tuple[str, ...], scenario: str) -> float:
        values = []
        for r in doc["targets"][target]["rounds"][scenario]:
            node = r
            for part in path:
                node = node[part]
            values.append(float(node))
        return statistics.median(values)

    rps = doc["ratios"]["rps"]
    assert rps["router/nginx"] == pytest.approx(med("router", ("rps",), "throughput")
                                                / med("nginx", ("rps",), "throughput"))
    assert rps["router/direct"] == pytest.approx(med("router", ("rps",), "throughput")
                                                 / med("direct", ("rps",), "throughput"))
    assert doc["ratios"]["streams_per_s"]["router/nginx"] == pytest.approx(
        med("router", ("streams_per_s",), "streams")
        / med("nginx", ("streams_per_s",), "streams"))
    added = doc["added_vs_direct_ms"]["nginx"]["open_p50_ms"]
    assert added == pytest.approx(med("nginx", ("latency_ms", "p50"), "openloop")
                                  - med("direct", ("latency_ms", "p50"), "openloop"))
    added = doc["added_vs_direct_ms"]["router"]["c1_stream_ttfb_p50_ms"]
    assert added == pytest.approx(med("router", ("stream_ttfb_ms", "p50"), "c1")
                                  - med("direct", ("stream_ttfb_ms", "p50"), "c1"))
    assert set(doc["added_vs_direct_ms"]) == {"router", "floor", "nginx"}
    assert doc["ratios"]["rps"]["router/floor"] == pytest.approx(
        med("router", ("rps",), "throughput") / med("floor", ("rps",), "throughput"))
