"""`--sessions`: what session pinning buys a backend with a prefix (KV) cache."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from router.bench.harness import (
    LOAD_CPU,
    Machine,
    Processes,
    client,
    latency,
    ms,
    start_router,
    start_upstream,
)

SESSION_PREFILL_MS, SESSION_WARM_MS = 80.0, 5.0
SESSION_COUNT, SESSION_TURNS = 40, 5
SESSION_MODEL = "bench-kv"


def _add_session_route(config: dict[str, object], ports: Sequence[int]) -> None:
    providers: dict[str, object] = config["providers"]  # type: ignore[assignment]
    routes: dict[str, object] = config["routes"]  # type: ignore[assignment]
    for n, up_port in enumerate(ports):
        providers[f"kv{n}"] = {"type": "openai", "probe": False, "max_connections": 4096,
                               "base_url": f"http://127.0.0.1:{up_port}/v1"}
    routes[SESSION_MODEL] = {"strategy": "round_robin", "retries": 0, "backends": [
        {"provider": f"kv{n}", "model": SESSION_MODEL, "name": f"kv{n}"}
        for n in range(len(ports))]}
    config["store"] = {"url": "memory://"}
    config["sessions"] = {"auto_create": False}  # without session_id: plain round robin


def _prefix_stats(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/prefix-stats", timeout=5) as resp:
        stats: dict[str, int] = json.loads(resp.read())
    return stats


def run(procs: Processes, machine: Machine, tmp: Path, notes: list[str]
        ) -> list[tuple[str, ...]]:
    """One router, one round_robin route over two prefix-cache upstreams; the same
    conversations (fresh ones per variant) with and without `session_id`."""
    cache = ["--prefill-ms", str(SESSION_PREFILL_MS), "--warm-ms", str(SESSION_WARM_MS)]
    ups = [start_upstream(procs, machine, *cache) for _ in range(2)]
    up_ports = [p for _, p in ups]
    router, port, log = start_router(procs, machine, tmp, up_ports[0], name="router-sessions",
                                     edit=lambda config: _add_session_route(config, up_ports))
    print(f"router bench: sessions, upstreams :{up_ports[0]} :{up_ports[1]}, router :{port} "
          f"(pid {router.pid}); {SESSION_COUNT} conversations x {SESSION_TURNS} turns x 2",
          file=sys.stderr, flush=True)
    base = ["--model", SESSION_MODEL, "--sessions", str(SESSION_COUNT),
            "--turns", str(SESSION_TURNS)]
    client(procs, machine, "sessions", port, *base, "--tag", "warmup", "--pin", timeout=60)
    rows: list[tuple[str, ...]] = []
    for label, tag, pin in (("round robin (no session_id)", "rr", False),
                            ("pinned (session_id)", "pin", True)):
        before = [_prefix_stats(p) for p in up_ports]
        r = client(procs, machine, "sessions", port, *base, "--tag", tag,
                   *(["--pin"] if pin else []), timeout=60)
        after = [_prefix_stats(p) for p in up_ports]
        warm = sum(a["warm"] - b["warm"] for a, b in zip(after, before, strict=True))
        cold = sum(a["cold"] - b["cold"] for a, b in zip(after, before, strict=True))
        per_up = [a["warm"] + a["cold"] - b["warm"] - b["cold"]
                  for a, b in zip(after, before, strict=True)]
        total = max(1, warm + cold)
        later = max(1, total - SESSION_COUNT)  # a conversation's first turn is always cold
        f = latency(r, "ttfb_ms")
        t2 = latency(r, "later_ms")
        rows.append((label, ms(f["p50"]), ms(f["p95"]), ms(f["mean"]),
                     f"{ms(t2['p50'])} / {ms(t2['p95'])}",
                     f"{100 * warm / total:.0f}% ({warm}/{total})",
                     f"{100 * (warm / later):.0f}%", "/".join(map(str, per_up))))
        if r["errors"]:
            notes.append(f"sessions, {label}: {r['errors']} failed requests")
    notes.append(f"sessions: {SESSION_COUNT} conversations at once x {SESSION_TURNS} streamed "
                 f"turns each (history growing), route round_robin over 2 upstreams (CPU "
                 f"{LOAD_CPU}) simulating a prefix cache keyed by the first message: cold "
                 f"(first time on that upstream) {SESSION_PREFILL_MS:g} ms, warm "
                 f"{SESSION_WARM_MS:g} ms before the first byte; no eviction; store memory://")
    if router.poll() is not None or any(u.poll() is not None for u, _ in ups):
        notes.append(f"sessions: the router or an upstream exited early; log: {log}")
    return rows
