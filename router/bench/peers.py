"""`--peers`: the router beside nginx and LiteLLM (and the upstream itself), in one run.

Every proxy runs on the router's CPU with the same fast upstream and load generators on the other
CPU; the rounds go over the targets in turn (the order reversed every other round) so drift in a
shared machine hits them alike, and each figure is reported as min/median/max over the rounds.
Scenarios per target and round: closed-loop throughput (wrk, c=64, non-streamed, with the proxy's
CPU per request from /proc), open-loop latency at a fixed rate (the generator's send lag too),
closed-loop c=1 latency and stream first byte, 20-chunk streams at 32 concurrent (streams/s,
first byte, time per chunk); after the rounds, the proxy's RSS with many streams open. LiteLLM
is slow: its phases are shorter and, when it cannot keep the open-loop rate, it is marked
saturated and measured at a rate it can keep.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from router.bench.direct import hold_streams
from router.bench.floor_peer import start_floor
from router.bench.harness import (
    KEY,
    LIMITED_KEY,
    LOAD_CPU,
    ROUTER_CPU,
    Machine,
    Processes,
    client,
    start_router,
    start_upstream,
    throughput,
)
from router.bench.litellm_peer import start_litellm
from router.bench.nginx_peer import start_nginx
from router.bench.plan import Plan
from router.bench.proctree import tree_cpu_seconds, tree_rss_mb
from router.bench.progress import Progress

CHUNKS = 20
CHUNKS_MODEL = f"bench-chunks-{CHUNKS}"
MODELS = ("bench-fast", "bench-stream", "bench-hold", CHUNKS_MODEL)
SCENARIOS = ("throughput", "openloop", "c1", "streams")
# The most streams held open through a slow target (LiteLLM opens a few dozen a second).
SLOW_OPEN_STREAMS = 1000
# A target whose closed-loop req/s is below this multiple of the open-loop rate cannot keep it.
HEADROOM = 1.25


@dataclass(frozen=True)
class PeersSettings:
    targets: tuple[str, ...]
    rounds: int
    phase_s: float
    slow_phase_s: float  # LiteLLM's phases
    warmup_s: float  # per target before the rounds, not counted
    rate: float
    connections: int
    stream_connections: int
    c1_count: int
    slow_c1_count: int
    open_streams: int
    results_dir: str
    settle_s: float = 0.5  # after the open streams' ramp, before their RSS is read


def settings(plan: Plan) -> PeersSettings:
    return PeersSettings(targets=plan.peer_targets, rounds=plan.peers_rounds,
                         phase_s=plan.peers_phase_s, slow_phase_s=min(plan.peers_phase_s, 3.0),
                         warmup_s=2.0,
                         rate=plan.rate, connections=plan.connections, stream_connections=32,
                         c1_count=200, slow_c1_count=30, open_streams=plan.peers_streams,
                         results_dir=plan.results_dir)


@dataclass
class Target:
    """One thing measured: a proxy (its process) or the upstream itself (`direct`)."""

    name: str
    port: int
    key: str
    pid: int | None
    version: str
    describe: str
    slow: bool = False
    rate: float = 0.0  # the open-loop rate, decided after its first throughput
    saturated: bool = False
    failed: str | None = None
    rounds: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {name: [] for name in SCENARIOS})
    rss: dict[str, float] | None = None


def _chunks_route(config: dict[str, object]) -> None:
    routes: dict[str, object] = config["routes"]  # type: ignore[assignment]
    routes[CHUNKS_MODEL] = {"backends": [{"provider": "up", "model": CHUNKS_MODEL}],
                            "retries": 0}


def _start_targets(procs: Processes, machine: Machine, tmp: Path, s: PeersSettings,
                   up_port: int, progress: Progress
                   ) -> tuple[list[Target], dict[str, str]]:
    """The targets asked for that could start; the others with the reason."""
    started: list[Target] = []
    skipped: dict[str, str] = {}
    for name in s.targets:
        progress.step(f"starting {name}")
        try:
            started.append(_start(procs, machine, tmp, name, s, up_port))
        except FileNotFoundError as exc:  # not installed: said, not an error
            skipped[name] = str(exc)
        except RuntimeError as exc:
            skipped[name] = f"did not start: {str(exc)[:500]}"
        if name in skipped:
            progress.say(f"{name} skipped: {skipped[name].splitlines()[0]}")
    return started, skipped


def _start(procs: Processes, machine: Machine, tmp: Path, name: str, s: PeersSettings,
           up_port: int) -> Target:
    if name == "direct":
        return Target(name, up_port, KEY, None, "router/bench/upstream.py",
                      "the fast upstream itself, no proxy")
    if name == "router":
        proc, port, _ = start_router(
            procs, machine, tmp, up_port, "memory://", "router-peers",
            sections={"logging": {"level": "info", "access_log": True}}, edit=_chunks_route)
        return Target(name, port, LIMITED_KEY, proc.pid, "this checkout",
                      "every feature on: API key with rpm/tpm/concurrency limits (store "
                      "memory://), metrics, JSON access log; one worker")
    if name == "router-bare":
        proc, port, _ = start_router(procs, machine, tmp, up_port, None, "router-bare",
                                     sections={"metrics": {"enabled": False}},
                                     edit=_chunks_route)
        return Target(name, port, KEY, proc.pid, "this checkout",
                      "API key without limits, metrics off, access log off; one worker")
    if name == "floor":
        f = start_floor(procs, machine, tmp, up_port)
        return Target(name, f.port, KEY, f.proc.pid, f.version,
                      "aiohttp relaying through the router's upstream client, no router logic "
                      "(router/bench/floor_peer.py): what the router's stack costs by itself")
    if name == "nginx":
        n = start_nginx(procs, machine, tmp, up_port, s.open_streams)
        return Target(name, n.port, KEY, n.proc.pid, n.version,
                      "plain proxy_pass, keepalive 64 upstream pool, proxy_buffering off, "
                      "one worker (master_process off), access_log off")
    started = start_litellm(procs, machine, tmp, up_port, MODELS)
    return Target(name, started.port, KEY, started.proc.pid, started.version,
                  "litellm --num_workers 1, model_list openai/<model> at the upstream, "
                  "master key", slow=True)


# -- one scenario, one target -------------------------------------------------------------------

def _warm_up(procs: Processes, machine: Machine, tmp: Path, s: PeersSettings, plan: Plan,
             t: Target) -> None:
    """Connection pools, caches, the interpreter's first paths: not counted."""
    throughput(procs, machine, tmp, t.port, plan, min(1.0, s.warmup_s) if t.slow else s.warmup_s,
               key=t.key)


def _throughput(procs: Processes, machine: Machine, tmp: Path, s: PeersSettings, plan: Plan,
                t: Target) -> dict[str, Any]:
    seconds = s.slow_phase_s if t.slow else s.phase_s
    cpu0 = tree_cpu_seconds(t.pid) if t.pid else 0.0
    r = throughput(procs, machine, tmp, t.port, plan, seconds, key=t.key)
    cpu = tree_cpu_seconds(t.pid) - cpu0 if t.pid else None
    return {"rps": r.rps, "requests": r.requests, "failures": r.failures, "tool": r.detail,
            "seconds": seconds,
            "cpu_us_per_req": None if cpu is None else cpu * 1e6 / max(1, r.requests)}


def _openloop(procs: Processes, machine: Machine, s: PeersSettings, t: Target) -> dict[str, Any]:
    seconds = s.slow_phase_s if t.slow else s.phase_s
    r = client(procs, machine, "openloop", t.port, "--rate", f"{t.rate:g}", "--duration",
               str(seconds), "--warmup", f"{min(0.5 if t.slow else 1.0, seconds):g}",
               timeout=seconds + 60,
               key=t.key)
    errors: dict[str, int] = r["errors"]  # type: ignore[assignment]
    lat: dict[str, float] = r["latency_ms"]  # type: ignore[assignment]
    sent = int(r["sent"])  # type: ignore[call-overload]
    failed = sum(errors.values())
    # Could not keep up after all: answers missing or failing, or the sends fell behind.
    if failed > 0.01 * sent or int(lat.get("n", 0)) < 0.95 * sent:
        t.saturated = True
    return {"rate": t.rate, "seconds": seconds, "sent": sent, "latency_ms": lat,
            "send_lag_ms": r["send_lag_ms"], "late_sends": r["late_sends"], "errors": errors,
            "cdf_ms": r["cdf_ms"]}


def _c1(procs: Processes, machine: Machine, s: PeersSettings, t: Target) -> dict[str, Any]:
    """One connection, one request at a time: a JSON answer's latency, then a 20-chunk
    stream's first byte (the relay's own delay, with no queue in front of it)."""
    count = s.slow_c1_count if t.slow else s.c1_count
    r = client(procs, machine, "ttfb", t.port, "--count", str(count), timeout=120, key=t.key)
    streamed = client(procs, machine, "ttfb", t.port, "--count", str(count), "--stream",
                      "--model", CHUNKS_MODEL, timeout=120, key=t.key)
    return {"count": count, "latency_ms": r["total_ms"], "stream_ttfb_ms": streamed["ttfb_ms"],
            "errors": int(r["errors"]) + int(streamed["errors"])}  # type: ignore[call-overload]


def _streams(procs: Processes, machine: Machine, s: PeersSettings, t: Target
             ) -> dict[str, Any]:
    seconds = s.slow_phase_s if t.slow else s.phase_s
    cpu0 = tree_cpu_seconds(t.pid) if t.pid else 0.0
    r = client(procs, machine, "streams", t.port, "--stream", "--model", CHUNKS_MODEL,
               "--chunks", str(CHUNKS), "--connections", str(s.stream_connections),
               "--duration", str(seconds), timeout=seconds + 60, key=t.key)
    cpu = tree_cpu_seconds(t.pid) - cpu0 if t.pid else None
    done = int(r["done"])  # type: ignore[call-overload]
    return {"seconds": seconds, "concurrent": s.stream_connections, "chunks": CHUNKS,
            "streams_per_s": r["streams_per_s"], "ttfb_ms": r["ttfb_ms"],
            "per_chunk_ms": r["per_chunk_ms"], "errors": r["errors"],
            "cpu_us_per_stream": None if cpu is None else cpu * 1e6 / max(1, done)}


# -- the run ------------------------------------------------------------------------------------

@dataclass
class PeersRun:
    """What one run measured, before it is summarised (router/bench/peers_report.py)."""

    run_id: str
    started_at: float
    finished_at: float
    settings: PeersSettings
    machine: dict[str, Any]
    targets: list[Target]
    skipped: dict[str, str]
    notes: list[str]


def run(procs: Processes, machine: Machine, tmp: Path, plan: Plan, notes: list[str],
        s: PeersSettings | None = None) -> PeersRun:
    """`s`: the settings, when not the plan's (the test's tiny run)."""
    s = settings(plan) if s is None else s
    started_at = time.time()
    steps = (1 + len(s.targets) + len(s.targets)
             + s.rounds * len(SCENARIOS) * len(s.targets) + len(s.targets))
    progress = Progress("peers", steps)
    upstream, up_port = start_upstream(procs, machine)
    progress.step("upstream")
    targets, skipped = _start_targets(procs, machine, tmp, s, up_port, progress)

    def attempt(t: Target, what: str, measure: Callable[[Target], dict[str, Any] | None]
                ) -> None:
        """One measurement; a target that fails one is reported as failed and dropped."""
        progress.step(f"{what} · {t.name}")
        if t.failed is not None:
            return
        try:
            result = measure(t)
        except (RuntimeError, OSError) as exc:
            t.failed = f"{what}: {str(exc)[:300]}"
            progress.say(f"{t.name} failed ({t.failed.splitlines()[0]})")
            return
        if result is not None:
            t.rounds[what].append(result)

    scenarios: tuple[tuple[str, Callable[[Target], dict[str, Any]]], ...] = (
        ("throughput", partial(_throughput, procs, machine, tmp, s, plan)),
        ("openloop", partial(_openloop, procs, machine, s)),
        ("c1", partial(_c1, procs, machine, s)),
        ("streams", partial(_streams, procs, machine, s)),
    )
    for t in targets:
        attempt(t, "warm-up", partial(_warm_up, procs, machine, tmp, s, plan))
    for n in range(s.rounds):
        order = targets if n % 2 == 0 else targets[::-1]
        progress.round(n + 1, s.rounds)
        for what, measure in scenarios:  # one scenario over all targets, then the next
            for t in order:
                attempt(t, what, measure)
                if n == 0 and what == "throughput" and t.failed is None:
                    _decide_rate(t, s)
    for t in targets:
        progress.step(f"{s.open_streams:,} open streams · {t.name}")
        if t.pid is None or t.failed is not None:
            continue
        if t.slow and s.open_streams > SLOW_OPEN_STREAMS:
            # Opening them would take many minutes at the few streams a second it opens.
            notes.append(f"peers: {t.name}, open streams: not measured with more than "
                         f"{SLOW_OPEN_STREAMS:,} (asked for {s.open_streams:,})")
            continue
        try:
            held = hold_streams(procs, machine, t.port, t.pid, s.open_streams, key=t.key,
                                rss=tree_rss_mb, ready_timeout=90 + s.open_streams / 10,
                                settle_s=s.settle_s)
        except (RuntimeError, OSError) as exc:
            notes.append(f"peers: {t.name}, open streams: {str(exc)[:200]}")
            continue
        t.rss = {"idle_mb": held.rss_idle, "open_mb": held.rss_open,
                 "after_mb": held.rss_after, "streams": s.open_streams,
                 "with_first_chunk": held.ready, "open_at_ready": held.open_at_ready,
                 "ramp_s": held.ramp_s}
    progress.done()
    if upstream.poll() is not None:
        notes.append("peers: the upstream exited early")
    return PeersRun(run_id=uuid.uuid4().hex[:12], started_at=started_at,
                    finished_at=time.time(), settings=s,
                    machine=_machine(machine), targets=targets, skipped=skipped,
                    notes=list(notes))


def _decide_rate(t: Target, s: PeersSettings) -> None:
    """The open-loop rate for every round: the plan's, or (marked saturated) a rate the target
    keeps when its closed-loop req/s has too little headroom over it."""
    rps = float(t.rounds["throughput"][-1]["rps"]) if t.rounds["throughput"] else 0.0
    if rps >= HEADROOM * s.rate:
        t.rate = s.rate
    else:
        t.saturated = True
        t.rate = max(1.0, round(rps / (2 * HEADROOM)))


def _machine(machine: Machine) -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "pinned": machine.pinned,
            "proxy_cpu": ROUTER_CPU if machine.pinned else None,
            "load_cpu": LOAD_CPU if machine.pinned else None,
            "load_generator": "wrk" if machine.wrk else "python client",
            "loadavg": list(os.getloadavg()), "kernel": platform.release(),
            "python": platform.python_version(), "argv": sys.argv[1:]}


def settings_dict(s: PeersSettings) -> dict[str, Any]:
    return asdict(s)
