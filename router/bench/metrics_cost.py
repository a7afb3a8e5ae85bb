"""`--metrics`: what per-request metrics (and the usage report) cost."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from router.bench.harness import (
    Machine,
    Processes,
    client,
    cpu_seconds,
    latency,
    median,
    ms,
    start_router,
    start_upstream,
    throughput,
)
from router.bench.plan import Plan

METRICS_VARIANTS: tuple[tuple[str, dict[str, object]], ...] = (
    ("metrics off", {"metrics": {"enabled": False}}),
    ("metrics on", {}),  # the default
    ("metrics + usage report", {"usage": {"enabled": True}}),
)


@dataclass
class MetricsSample:
    rps: float
    cpu_us: float  # router CPU per request
    failures: int


def _noop_residue_us() -> float:
    """What the calls left with metrics off still cost per non-streamed request: the pipeline,
    handler and dispatch make about 6 metric event calls (timed here)."""
    import timeit

    from router.metrics import DisabledMetrics

    m = DisabledMetrics()

    def request() -> None:
        m.request_done("r", "b", 200, False, 0.1)
        inflight = m.in_flight("r")
        inflight.inc()
        inflight.dec()
        m.first_byte("r", "b", 0.1)
        m.upstream_done("b", 0.1)
        m.tokens("r", "b", 3, 5)

    n = 100_000
    return min(timeit.repeat(request, number=n, repeat=5)) / n * 1e6


def run(procs: Processes, machine: Machine, tmp: Path, plan: Plan,
        notes: list[str]) -> list[tuple[str, ...]]:
    """The same router with metrics off, on, and on with the usage report: one process each
    (`metrics.enabled` is fixed at start), all on the router's CPU, measured one at a time with
    the variants alternating over the rounds so drift hits all of them alike."""
    upstream, up_port = start_upstream(procs, machine)
    routers = []
    for n, (label, sections) in enumerate(METRICS_VARIANTS):
        proc, port, log = start_router(procs, machine, tmp, up_port, "memory://",
                                       f"router-metrics-{n}", sections=sections)
        routers.append((label, proc, port, log))
    seconds = plan.metrics_phase_s
    print(f"router bench: metrics cost, {len(routers)} routers "
          f"({', '.join(f':{port}' for _, _, port, _ in routers)}); "
          f"{plan.metrics_rounds} rounds x {seconds:.0f} s + open loop", file=sys.stderr,
          flush=True)
    for _, _, port, _ in routers:  # warm-up: pools, caches, label children
        throughput(procs, machine, tmp, port, plan, 2)
    samples: dict[str, list[MetricsSample]] = {label: [] for label, *_ in routers}
    for n in range(plan.metrics_rounds):
        for label, proc, port, _ in (routers if n % 2 == 0 else routers[::-1]):
            cpu0 = cpu_seconds(proc.pid)
            t = throughput(procs, machine, tmp, port, plan, seconds)
            cpu = cpu_seconds(proc.pid) - cpu0
            samples[label].append(MetricsSample(t.rps, cpu * 1e6 / max(1, t.requests),
                                                t.failures))
    extra = ["--rate", str(plan.rate), "--duration", str(seconds), "--warmup", "1"]
    lat = {label: latency(client(procs, machine, "openloop", port, *extra,
                                 timeout=seconds + 60), "latency_ms")
           for label, _, port, _ in routers}

    base_label = METRICS_VARIANTS[0][0]
    rps_b = median([s.rps for s in samples[base_label]])
    cpu_b = median([s.cpu_us for s in samples[base_label]])
    rows: list[tuple[str, ...]] = []
    for label, *_ in routers:
        ss = samples[label]
        rps, cpu = median([s.rps for s in ss]), median([s.cpu_us for s in ss])
        lt = lat[label]
        same = label == base_label
        rows.append((label, f"{rps:,.0f}", "-" if same else f"{100 * rps / rps_b:.1f}%",
                     "-" if same else f"{1e6 / rps - 1e6 / rps_b:+.1f} µs",
                     f"{cpu:.1f} µs", "-" if same else f"{cpu - cpu_b:+.1f} µs",
                     f"{ms(lt['p50'])} / {ms(lt['p99'])}"))
        failed = sum(s.failures for s in ss)
        if failed:
            notes.append(f"metrics cost: {label} had {failed} failed requests "
                         "(non-2xx/socket)")
    spread = max((max(s.rps for s in ss) - min(s.rps for s in ss)) / median([s.rps for s in ss])
                 for ss in samples.values())
    notes.append(f"metrics cost: {len(routers)} router processes (store memory://, no limits), "
                 f"POST non-streamed at c={plan.connections} "
                 f"({'wrk' if machine.wrk else 'python client'}), median of "
                 f"{plan.metrics_rounds} x {seconds:.0f} s"
                 + (f", widest round-to-round spread {100 * spread:.1f}%"
                    if plan.metrics_rounds > 1 else "")
                 + f"; with metrics off the collectors are no-ops whose calls remain, "
                   f"~{_noop_residue_us():.2f} µs per request (timed in-process)")
    for label, proc, _, log in routers:
        if proc.poll() is not None:
            notes.append(f"metrics cost: the {label} router exited early; log: {log}")
    if upstream.poll() is not None:
        notes.append("metrics cost: the upstream exited early")
    return rows
