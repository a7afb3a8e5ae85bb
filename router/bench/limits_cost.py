"""`--limits`: what the limiter costs against a real redis-server."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from router.bench.harness import (
    BENCH_LIMITS,
    CHAT_PATH,
    KEY,
    LIMITED_KEY,
    LOAD_CPU,
    Machine,
    Processes,
    client,
    cpu_seconds,
    latency,
    mark,
    median,
    ms,
    start_redis,
    start_router,
    start_upstream,
    throughput,
)
from router.bench.plan import Plan

TARGET_LIMITS_RATIO = 0.85


def _redis_round_trips(port: int) -> int:
    """Commands clients sent (EVALSHA counts once, not the calls its script makes)."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    scripted = ("get", "set", "del", "time", "incrby", "pexpire", "pexpireat", "exists", "zadd",
                "zrem", "zcard", "zremrangebyscore")  # what limits.lua calls
    return sum(int(v["calls"]) for k, v in stats.items()
               if k.removeprefix("cmdstat_") not in scripted and k != "cmdstat_info")


def _limited_headers(port: int) -> dict[str, str]:
    body = json.dumps({"model": "bench-fast", "messages": [{"role": "user", "content": "hi"}]})
    req = urllib.request.Request(f"http://127.0.0.1:{port}{CHAT_PATH}", data=body.encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {LIMITED_KEY}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return {k.lower(): v for k, v in resp.headers.items()}


@dataclass
class LimitsSample:
    rps: float
    cpu_us: float  # router CPU per request
    redis_per_req: float  # Redis round trips per request (admit + settle: EVALSHA each)
    failures: int


def run(procs: Processes, machine: Machine, tmp: Path, plan: Plan,
        notes: list[str]) -> list[tuple[str, ...]]:
    """Router with vs without limits in one router process on one real Redis: the same
    requests with a key without limits (no store call) and a key whose limits are never
    reached; the variants alternate over the rounds so drift hits both alike."""
    redis_port = start_redis(procs, machine, tmp)
    upstream, up_port = start_upstream(procs, machine)
    store_url = f"redis://127.0.0.1:{redis_port}/0"
    router, port, log = start_router(procs, machine, tmp, up_port, store_url, "router-limits")
    headers = _limited_headers(port)
    if "x-ratelimit-limit-requests" not in headers:
        raise RuntimeError("the limited key's answer carries no x-ratelimit-* headers: "
                           "limits are not applied")
    variants = (("without limits", KEY), ("with limits", LIMITED_KEY))
    seconds = plan.limits_phase_s
    print(f"router bench: limits cost, redis :{redis_port}, router :{port} (pid {router.pid}); "
          f"2 variants x {plan.limits_rounds} rounds x {seconds:.0f} s + open loop",
          file=sys.stderr, flush=True)
    for _, key in variants:  # warm-up: the script loaded, the pool and the caches warm
        throughput(procs, machine, tmp, port, plan, 2, key)
    samples: dict[str, list[LimitsSample]] = {label: [] for label, _ in variants}
    for n in range(plan.limits_rounds):
        for label, key in (variants if n % 2 == 0 else variants[::-1]):
            cmds0, cpu0 = _redis_round_trips(redis_port), cpu_seconds(router.pid)
            t = throughput(procs, machine, tmp, port, plan, seconds, key)
            time.sleep(0.2)  # the last settles (off the latency path) reach Redis
            cmds = _redis_round_trips(redis_port) - cmds0
            cpu = cpu_seconds(router.pid) - cpu0
            done = max(1, t.requests)
            samples[label].append(LimitsSample(t.rps, cpu * 1e6 / done, cmds / done,
                                               t.failures))
    extra = ["--rate", str(plan.rate), "--duration", str(seconds), "--warmup", "1"]
    lat = {label: latency(client(procs, machine, "openloop", port, *extra,
                                 timeout=seconds + 60, key=key), "latency_ms")
           for label, key in variants}

    base, mine = samples["without limits"], samples["with limits"]
    rps_b, rps_l = median([s.rps for s in base]), median([s.rps for s in mine])
    cpu_b, cpu_l = median([s.cpu_us for s in base]), median([s.cpu_us for s in mine])
    ratio = rps_l / rps_b
    detail = "wrk" if machine.wrk else "python client"
    lb, ll = lat["without limits"], lat["with limits"]
    rows: list[tuple[str, ...]] = [
        (f"req/s, non-streamed, c={plan.connections} ({detail})", f"{rps_b:,.0f}",
         f"{rps_l:,.0f}", f"{100 * ratio:.1f}%",
         f">= {100 * TARGET_LIMITS_RATIO:.0f}% {mark(ratio >= TARGET_LIMITS_RATIO)}"),
        ("router CPU per request", f"{cpu_b:.0f} µs", f"{cpu_l:.0f} µs",
         f"{cpu_l - cpu_b:+.0f} µs", "-"),
        ("Redis commands sent per request", f"{median([s.redis_per_req for s in base]):.2f}",
         f"{median([s.redis_per_req for s in mine]):.2f}", "-", "-"),
        (f"latency p50, open loop {plan.rate:.0f} req/s", ms(lb["p50"]), ms(ll["p50"]),
         f"{ll['p50'] - lb['p50']:+.2f} ms", "-"),
        (f"latency p99, open loop {plan.rate:.0f} req/s", ms(lb["p99"]), ms(ll["p99"]),
         f"{ll['p99'] - lb['p99']:+.2f} ms", "-"),
    ]
    for label, ss in samples.items():
        failed = sum(s.failures for s in ss)
        if failed:
            notes.append(f"limits cost: {label} had {failed} failed requests (non-2xx/socket)")
    base_trips = median([s.redis_per_req for s in base])
    if base_trips > 0.05:
        notes.append(f"limits cost: the baseline (a key without limits) still sent "
                     f"{base_trips:.2f} Redis commands per request: it is not store-free "
                     "(another per-request store call, e.g. a session read)")
    spread = max((max(s.rps for s in ss) - min(s.rps for s in ss)) / median([s.rps for s in ss])
                 for ss in samples.values())
    notes.append(f"limits cost: one router process, store.url redis://127.0.0.1:{redis_port} "
                 f"(redis-server on CPU {LOAD_CPU}); with = a key with rpm/tpm/concurrency "
                 f"{BENCH_LIMITS['rpm']:,}/{BENCH_LIMITS['tpm']:,}/{BENCH_LIMITS['concurrency']:,}"
                 f" (admit + settle per request), without = a key with no limits (no store "
                 f"call); req/s median of {plan.limits_rounds} x {seconds:.0f} s"
                 + (f", widest round-to-round spread {100 * spread:.1f}%"
                    if plan.limits_rounds > 1 else ""))
    if router.poll() is not None or upstream.poll() is not None:
        notes.append(f"limits cost: the router or upstream exited early; log: {log}")
    return rows
