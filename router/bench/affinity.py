"""`--affinity`: what prefix affinity buys backends with a bounded prefix (KV) cache, against
round robin, least busy, and session pinning (with ids), through two router replicas."""

from __future__ import annotations

import json
import sys
import time
import timeit
import urllib.request
from collections import Counter
from pathlib import Path

import orjson

from router.bench.client import affinity_body
from router.bench.harness import (
    LOAD_CPU,
    Machine,
    Processes,
    client,
    latency,
    ms,
    start_redis,
    start_router,
    start_upstream,
)
from router.routing.affinity import prefix_key

BACKENDS = 4
CONVERSATIONS, TURNS, SYSTEMS = 48, 6, 4
ARRIVALS_PER_S, THINK_MS = 12.0, 300.0
KV_CAPACITY_TOKENS, KV_TOKEN_US, KV_BASE_MS = 16_000, 50.0, 2.0
LOAD_FACTOR = 1.25
VARIANTS = (  # (label, route, strategy, with session_id)
    ("round_robin", "kv-rr", "round_robin", False),
    ("least_busy", "kv-lb", "least_busy", False),
    ("prefix_affinity", "kv-affinity", "prefix_affinity", False),
    ("session pinning (session_id)", "kv-pinned", "round_robin", True),
)
COLUMNS = ["variant", "cache hit ratio (tokens)", "warm requests", "TTFB p50", "TTFB p95",
           "turns 2+ p50", "load spread (max/mean in-flight)", "requests per backend",
           "same backend, turns 2+"]


def _add_routes(config: dict[str, object], ports: list[int], store_url: str) -> None:
    providers: dict[str, object] = config["providers"]  # type: ignore[assignment]
    routes: dict[str, object] = config["routes"]  # type: ignore[assignment]
    for n, port in enumerate(ports):
        providers[f"kv{n}"] = {"type": "openai", "probe": False, "max_connections": 4096,
                               "base_url": f"http://127.0.0.1:{port}/v1"}
    for _, name, strategy, _ in VARIANTS:
        route: dict[str, object] = {"strategy": strategy, "retries": 0, "backends": [
            {"provider": f"kv{n}", "model": "bench-kv", "name": f"kv{n}"}
            for n in range(len(ports))]}
        if strategy == "prefix_affinity":
            route["affinity"] = {"prefix": "first_user", "load_factor": LOAD_FACTOR}
        routes[name] = route
    # Pins shared by both replicas; without a session_id no request calls the store.
    config["store"] = {"url": store_url}
    config["sessions"] = {"auto_create": False}


def _kv(port: int, what: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/kv-{what}", timeout=5) as resp:
        stats: dict[str, float] = json.loads(resp.read())
    return stats


def hashing_cost_us() -> tuple[float, int]:
    """The prefix key of the bench's largest request (its last turn), in-process: µs each."""
    body = orjson.loads(affinity_body("bench-kv", "cost", 0, TURNS - 1, SYSTEMS, False))
    runs = 2000
    seconds = timeit.timeit(lambda: prefix_key(body, "first_user"), number=runs)
    return seconds / runs * 1e6, len(orjson.dumps(body))


def run(procs: Processes, machine: Machine, tmp: Path, notes: list[str]
        ) -> list[tuple[str, ...]]:
    kv = ["--kv-capacity", str(KV_CAPACITY_TOKENS), "--kv-token-us", str(KV_TOKEN_US),
          "--kv-base-ms", str(KV_BASE_MS)]
    ups = [start_upstream(procs, machine, *kv) for _ in range(BACKENDS)]
    up_ports = [p for _, p in ups]
    store_url = f"redis://127.0.0.1:{start_redis(procs, machine, tmp)}"
    replicas = [start_router(procs, machine, tmp, up_ports[0], name=f"router-affinity-{i}",
                             edit=lambda config: _add_routes(config, up_ports, store_url))
                for i in range(2)]
    ports = ",".join(str(port) for _, port, _ in replicas)
    print(f"router bench: affinity, upstreams {up_ports}, routers {ports}; {CONVERSATIONS} "
          f"conversations x {TURNS} turns x {len(VARIANTS)} variants", file=sys.stderr,
          flush=True)
    rows: list[tuple[str, ...]] = []
    for label, route, _, pin in VARIANTS:
        for port in up_ports:
            _kv(port, "reset")
        started = time.monotonic()
        r = client(procs, machine, "affinity", replicas[0][1], "--ports", ports,
                   "--model", route, "--sessions", str(CONVERSATIONS), "--turns", str(TURNS),
                   "--systems", str(SYSTEMS), "--arrivals", str(ARRIVALS_PER_S),
                   "--think-ms", str(THINK_MS), "--tag", route,
                   *(["--pin"] if pin else []), timeout=60)
        wall = time.monotonic() - started
        stats = [_kv(port, "stats") for port in up_ports]
        prompt = sum(s["prompt_tokens"] for s in stats)
        cached = sum(s["cached_tokens"] for s in stats)
        warm = sum(s["warm"] for s in stats)
        requests = [int(s["requests"]) for s in stats]
        busy = [s["busy_area"] / wall for s in stats]  # mean in-flight prefills per backend
        spread = max(busy) / (sum(busy) / len(busy)) if sum(busy) else 0.0
        placed: list[list[list[object]]] = r["placed"]  # type: ignore[assignment]
        same = total = 0
        for turns in placed:
            home = Counter(str(b) for _, b in turns).most_common(1)
            for _, backend in turns[1:]:
                total += 1
                same += home[0][0] == backend if home else 0
        f, later = latency(r, "ttfb_ms"), latency(r, "later_ms")
        rows.append((label, f"{100 * cached / max(1, prompt):.1f}%",
                     f"{100 * warm / max(1, sum(requests)):.0f}%", ms(f["p50"]), ms(f["p95"]),
                     ms(later["p50"]), f"{spread:.2f}", "/".join(map(str, requests)),
                     f"{100 * same / max(1, total):.0f}%"))
        if r["errors"]:
            notes.append(f"affinity, {label}: {r['errors']} failed requests")
    cost, size = hashing_cost_us()
    notes.append(
        f"affinity: {CONVERSATIONS} conversations (Poisson arrivals, {ARRIVALS_PER_S:g}/s) x "
        f"{TURNS} streamed turns (think time {THINK_MS:g} ms mean), {SYSTEMS} shared system "
        f"prompts of ~2,400 tokens and a ~800-token document each, no session_id but for the "
        f"pinned row; every request to one of 2 router replicas at random; {BACKENDS} upstreams "
        f"(CPU {LOAD_CPU}) with an LRU prefix cache of {KV_CAPACITY_TOKENS:,} tokens each, "
        f"prefill {KV_TOKEN_US:g} µs per uncached token (+{KV_BASE_MS:g} ms), concurrent "
        f"prefills sharing the backend; load_factor {LOAD_FACTOR}; pins in redis-server")
    notes.append(f"affinity: the prefix key costs {cost:.1f} µs per request in-process (the "
                 f"largest request, {size / 1024:.0f} KiB: tools and messages up to the first "
                 "user message, at most 64 KiB hashed)")
    if any(p.poll() is not None for p, _, _ in replicas) \
            or any(u.poll() is not None for u, _ in ups):
        notes.append("affinity: a router or an upstream exited early; logs: "
                     + ", ".join(str(log) for _, _, log in replicas))
    return rows
