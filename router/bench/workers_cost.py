"""`--workers`: what `server.workers: 2` gives over one worker on this machine's two CPUs.

One worker runs pinned to the router's CPU, as in every other figure. Two workers (one
supervisor, two processes sharing the port) float over both CPUs, where the fast upstream and
wrk also run: they take CPU the workers would otherwise have, so the raw req/s ratio
understates what a second core gives the router. The table therefore also shows the CPU each
part used and the router's req/s per core of CPU it used; "per router core" is the figure that
carries over to a machine where the upstream and the load are elsewhere.

Every feature is on: the bench key with limits (memory://, kept per worker, far above the
load), metrics, and the JSON access log.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from router.bench.harness import (
    BENCH_LIMITS,
    LOAD_CPU,
    ROUTER_CPU,
    Machine,
    Processes,
    cpu_seconds,
    cpu_times,
    median,
    start_router,
    start_upstream,
    throughput,
)
from router.bench.plan import Plan
from router.bench.proctree import tree_cpu_seconds

WORKERS = (1, 2)


@dataclass
class WorkersSample:
    rps: float
    router_cores: float  # CPU seconds per second, the supervisor and its workers together
    upstream_cores: float
    busy: float  # both CPUs' busy share, 0..2 (what the host stole is not busy)
    failures: int


def _every_feature(workers: int) -> Callable[[dict[str, object]], None]:
    def edit(data: dict[str, object]) -> None:
        server = data["server"]
        assert isinstance(server, dict)
        server["workers"] = workers
        keys = data["auth"]["api_keys"]  # type: ignore[index]
        keys[0]["limits"] = BENCH_LIMITS
        data["logging"] = {"level": "info", "format": "json", "access_log": True}
    return edit


def run(procs: Processes, machine: Machine, tmp: Path, plan: Plan,
        notes: list[str]) -> list[tuple[str, ...]]:
    upstream, up_port = start_upstream(procs, machine)
    routers = []
    for n in WORKERS:
        # Both CPUs named: the bench itself runs on the load CPU, and a child inherits that.
        proc, port, log = start_router(procs, machine, tmp, up_port, "memory://",
                                       f"router-workers-{n}", edit=_every_feature(n),
                                       cpus=ROUTER_CPU if n == 1 else f"{ROUTER_CPU},{LOAD_CPU}")
        routers.append((n, proc, port, log))
    seconds = plan.workers_phase_s
    print(f"router bench: workers, {plan.workers_rounds} rounds x {seconds:.0f} s per variant",
          file=sys.stderr, flush=True)
    for _, _, port, _ in routers:  # warm-up: pools, caches, both workers' connections
        throughput(procs, machine, tmp, port, plan, 2)
    samples: dict[int, list[WorkersSample]] = {n: [] for n in WORKERS}
    for r in range(plan.workers_rounds):
        for n, proc, port, _ in (routers if r % 2 == 0 else routers[::-1]):
            cpu0, up0, t0 = tree_cpu_seconds(proc.pid), cpu_seconds(upstream.pid), \
                time.monotonic()
            machine0 = [cpu_times(c) for c in (ROUTER_CPU, LOAD_CPU)]
            t = throughput(procs, machine, tmp, port, plan, seconds)
            wall = time.monotonic() - t0
            busy = sum((b1 - b0) / max(1, n1 - n0) for (b0, _, n0), (b1, _, n1)
                       in zip(machine0, [cpu_times(c) for c in (ROUTER_CPU, LOAD_CPU)],
                              strict=True))
            samples[n].append(WorkersSample(
                t.rps, (tree_cpu_seconds(proc.pid) - cpu0) / wall,
                (cpu_seconds(upstream.pid) - up0) / wall, busy, t.failures))
    rows: list[tuple[str, ...]] = []
    base_rps = median([s.rps for s in samples[1]])
    base_per_core = median([s.rps / max(s.router_cores, 1e-9) for s in samples[1]])
    for n, proc, _, log in routers:
        ss = samples[n]
        rps = median([s.rps for s in ss])
        per_core = median([s.rps / max(s.router_cores, 1e-9) for s in ss])
        rows.append((f"{n} worker{'s' if n > 1 else ''}"
                     + (" (pinned to one CPU)" if n == 1 else " (both CPUs)"),
                     f"{rps:,.0f}", "-" if n == 1 else f"{rps / base_rps:.2f}x",
                     f"{median([s.router_cores for s in ss]):.2f}",
                     f"{median([s.upstream_cores for s in ss]):.2f}",
                     f"{median([s.busy for s in ss]):.2f}",
                     f"{1e6 / per_core:.0f} µs", f"{per_core:,.0f}",
                     "-" if n == 1 else f"{per_core / base_per_core:.2f}x "
                     f"(2 cores: {2 * per_core / base_per_core:.2f}x)"))
        failed = sum(s.failures for s in ss)
        if failed:
            notes.append(f"workers: {n} worker(s) had {failed} failed requests")
        if proc.poll() is not None:
            notes.append(f"workers: the {n}-worker router exited early; log: {log}")
    tool = "wrk" if machine.wrk else "python client"
    notes.append(f"workers: c={plan.connections} non-streamed ({tool}, on CPU 1 with the "
                 f"upstream), median of {plan.workers_rounds} x {seconds:.0f} s; "
                 "cores = CPU seconds per second (router: supervisor and workers together); "
                 "'2 cores' = req/s per router core times two, against one pinned worker: what "
                 "two cores left to the router alone would give at the same cost per request")
    return rows


COLUMNS = ["variant", "req/s", "vs 1 worker", "router cores", "upstream cores", "busy of 2 CPUs",
           "router CPU/req", "req/s per router core", "per core vs 1 worker"]
