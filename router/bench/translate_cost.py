"""`--translate`: what a translated provider (Anthropic's Messages API) costs per streamed chunk,
against an OpenAI-compatible upstream whose bytes pass through.

One router, four routes on the same fast upstream: OpenAI-style streams of 8 and of 64 tokens
(passthrough) and Anthropic-style streams of 8 and of 64 text deltas (translated event by event
into chat.completion.chunk events), each token written on its own 1 ms after the last, as a
model streams them (so every chunk is one read and one write for the router). Each route is
loaded with streamed requests at a fixed concurrency while the router's CPU time is read from
/proc; the CPU per stream of the 64-token answer minus that of the 8-token one, over the 56
extra chunks, is the cost of one chunk, without the per-request work both lengths share.
"""

from __future__ import annotations

import sys
from pathlib import Path

from router.bench.harness import (
    Machine,
    Processes,
    client,
    cpu_seconds,
    median,
    start_router,
    start_upstream,
)
from router.bench.plan import Plan

LONG_TOKENS = 64
SHORT_TOKENS = 8
CONNECTIONS = 32
# (route, provider, upstream model)
ROUTES = (
    ("pass-8", "up", f"bench-paced-{SHORT_TOKENS}"),
    ("pass-64", "up", f"bench-paced-{LONG_TOKENS}"),
    ("claude-8", "claude", f"bench-paced-{SHORT_TOKENS}"),
    ("claude-64", "claude", f"bench-paced-{LONG_TOKENS}"),
)
COLUMNS = ["stream", "streams/s (64 tokens)", "router CPU per stream (8 / 64 tokens)",
           "CPU per chunk", "vs passthrough"]


def _edit(upstream_port: int) -> object:
    def edit(config: dict[str, object]) -> None:
        providers = config["providers"]
        routes = config["routes"]
        assert isinstance(providers, dict) and isinstance(routes, dict)
        providers["claude"] = {"type": "anthropic", "api_key": "bench", "probe": False,
                               "max_connections": 16384,
                               "base_url": f"http://127.0.0.1:{upstream_port}"}
        for name, provider, model in ROUTES:
            routes[name] = {"backends": [{"provider": provider, "model": model}], "retries": 0}
    return edit


def run(procs: Processes, machine: Machine, tmp: Path, plan: Plan,
        notes: list[str]) -> list[tuple[str, ...]]:
    upstream, up_port = start_upstream(procs, machine)
    proc, port, log = start_router(procs, machine, tmp, up_port, name="router-translate",
                                   edit=_edit(up_port))  # type: ignore[arg-type]
    seconds = min(plan.duration, 5.0)
    rounds = 1 if plan.duration <= 3.0 else 3
    print(f"router bench: translated streams, router :{port}; {rounds} rounds x 4 x "
          f"{seconds:.0f} s", file=sys.stderr, flush=True)
    cpu: dict[str, list[float]] = {name: [] for name, *_ in ROUTES}
    rps: dict[str, list[float]] = {name: [] for name, *_ in ROUTES}
    failures = 0

    def load(route: str, duration: float) -> tuple[float, int, float]:
        before = cpu_seconds(proc.pid)
        r = client(procs, machine, "closed", port, "--model", route, "--stream",
                   "--connections", str(CONNECTIONS), "--duration", str(duration),
                   timeout=duration + 60)
        used = cpu_seconds(proc.pid) - before
        ok = int(r["ok"])  # type: ignore[call-overload]
        bad = int(r["non200"]) + int(r["errors"])  # type: ignore[call-overload]
        return float(r["rps"]), bad, used / max(1, ok)  # type: ignore[arg-type]

    for name, *_ in ROUTES:  # warm-up: pools, label children
        load(name, 1.0)
    for n in range(rounds):
        for name, *_ in (ROUTES if n % 2 == 0 else ROUTES[::-1]):
            r, bad, per_stream = load(name, seconds)
            failures += bad
            rps[name].append(r)
            cpu[name].append(per_stream)

    rows: list[tuple[str, ...]] = []
    per_chunk: dict[str, float] = {}
    for kind, label in (("pass", "passthrough (openai)"), ("claude", "translated (anthropic)")):
        short, long_ = median(cpu[f"{kind}-8"]), median(cpu[f"{kind}-64"])
        per_chunk[kind] = (long_ - short) / (LONG_TOKENS - SHORT_TOKENS)
        ratio = "-" if kind == "pass" else f"{per_chunk[kind] / per_chunk['pass']:.2f}x"
        rows.append((label, f"{median(rps[f'{kind}-64']):,.0f}",
                     f"{short * 1e6:.0f} / {long_ * 1e6:.0f} µs",
                     f"{per_chunk[kind] * 1e6:.1f} µs", ratio))
    notes.append(f"translated streams: {CONNECTIONS} concurrent streamed requests per route, "
                 f"median of {rounds} x {seconds:.0f} s; CPU per chunk = (CPU per 64-token "
                 f"stream - CPU per 8-token stream) / {LONG_TOKENS - SHORT_TOKENS}; target: "
                 "translated <= 2x passthrough per chunk")
    if failures:
        notes.append(f"translated streams: {failures} failed requests (non-2xx/socket)")
    if proc.poll() is not None:
        notes.append(f"translated streams: the router exited early; log: {log}")
    if upstream.poll() is not None:
        notes.append("translated streams: the upstream exited early")
    return rows
