"""`router bench` / `python -m router.bench`: direct-vs-router figures in one run.

A fast upstream (router/bench/upstream.py) and the load generators share CPU 1; the router runs
alone on CPU 0 (`taskset`). Each figure is measured twice, straight at the upstream and through
the router, and printed as one markdown table:

* requests/s, non-streamed, 64 connections, closed loop (wrk, or the Python client without it);
* added latency p50/p99 at a fixed moderate rate, open loop (router/bench/client.py);
* streaming time to the first SSE `data:` chunk, p50/p99;
* the router's RSS with 1,000 streams open at once (VmRSS from /proc).

`--auth` adds the per-request cost of each credential type once warm (API key, router JWT
signed HS256/RS256/ES256/EdDSA): GET /v1/models on a router holding that credential against
the same process with authentication skipped (router/bench/auth_router.py); `--auth-only` runs
just that.

`--limits` adds the limiter's cost: one router process with `store.url: redis://` on a real
`redis-server` (on the load CPU), one key without limits (no store call) and one with rpm, tpm and
concurrency far above the load (every request admitted through limits.lua, its slot released
after): req/s at c=64 (target: with limits >= 85% of without), router CPU per request, Redis
commands per request, and the added p50/p99 at a fixed open-loop rate. `--limits-only` runs just
that.

`--sessions` adds what session pinning buys a backend with a prefix (KV) cache: two upstreams
that remember the conversations they have served (a conversation's first request on one waits
SESSION_PREFILL_MS before its first byte, later ones SESSION_WARM_MS), one route of both with
round_robin, SESSION_COUNT conversations x SESSION_TURNS streamed turns, once with `session_id`
(pinned) and once without (plain round robin): time to first byte and the share of warm
requests. Store `memory://`; `--sessions-only` runs just that.

`--metrics` adds what per-request metrics cost: three router processes on the router's CPU, the
same config but `metrics.enabled: false`, the default (metrics on), and metrics on with the usage
report (`usage.enabled`, store memory://); req/s at c=64, router CPU per request and the open-loop
p50/p99, the variants alternating over the rounds. `--metrics-only` runs just that.

`--affinity` adds what prefix affinity buys backends with a bounded prefix (KV) cache
(router/bench/affinity.py): four upstreams simulating one (router/bench/kv_cache.py: an LRU of
message blocks, prefill time growing with the uncached part, concurrent prefills sharing the
backend), two router replicas, multi-turn conversations sharing a few long system prompts with
Poisson arrivals and no `session_id`, each request to either replica; round_robin, least_busy,
prefix_affinity and (for reference) session pinning with ids: cache hit ratio, TTFB p50/p95,
load spread, and how often a conversation's turns stay on one backend. `--affinity-only` runs
just that.

`--fanout` adds what fan-out does to tail latency (router/bench/fanout.py): two upstreams, one
with a heavy tail, and one router whose routes over both use `fanout: none`, `race`, `hedge` after
a fixed delay and `hedge` after the observed p95; p50/p95/p99 of each under the same open-loop
load, and the upstream requests each client request cost. `--fanout-only` runs just that.

`--translate` adds what a translated provider costs per streamed chunk
(router/bench/translate_cost.py): streams of 8 and of 64 tokens from an OpenAI-compatible
upstream (passed through) and from an Anthropic-style one (translated event by event), router CPU
per stream from /proc; the slope between the two lengths is the CPU per chunk (target: translated
<= 2x passthrough). `--translate-only` runs just that.

`--peers` adds the router beside its peers in one run (router/bench/peers.py): the upstream
itself (`direct`), the router with every feature on and bare, Debian's nginx (plain `proxy_pass`)
and the LiteLLM proxy (its own venv, `make bench-deps`), each on the router's CPU: closed-loop
req/s at c=64 with the proxy's CPU per request, open-loop latency p50/p90/p99/p99.9 at `--rate`
(the generator's send lag too), c=1 latency, 20-chunk streams at 32 concurrent, RSS with many
streams open; min/median/max over `--peer-rounds` rounds, written to `--results` as JSON,
Markdown and (with matplotlib) PNG. A peer that is not installed is skipped, saying why.
`--peers-only` runs just that.

`--profile` adds a py-spy sample of the router under the 64-connection load (own time per
function). Not a test: `make test` never runs it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from router.bench import (
    affinity,
    auth_cost,
    direct,
    limits_cost,
    metrics_cost,
    pinning,
    translate_cost,
    workers_cost,
)
from router.bench.harness import (
    LOAD_CPU,
    ROUTER_CPU,
    Machine,
    Processes,
    ensure_wrk,
    processes,
    raise_nofile,
)
from router.bench.plan import Plan, parse


def main(argv: Sequence[str] | None = None) -> int:
    plan = parse(sys.argv[1:] if argv is None else argv, __doc__)
    notes: list[str] = []
    raise_nofile(max(8192, plan.streams * 4 + 1024))
    pinned = bool(shutil.which("taskset")) and len(os.sched_getaffinity(0)) >= 2
    if not pinned:
        notes.append("not pinned (needs taskset and 2 CPUs): figures mix router and load")
    else:
        os.sched_setaffinity(0, {LOAD_CPU})  # this orchestrator stays off the router's CPU
    machine = Machine(pinned=pinned, wrk=ensure_wrk(notes), notes=notes)
    setup_notes = list(notes)  # about the machine, not about one measurement
    started = time.monotonic()
    rows: list[tuple[str, str, str, str, str]] = []
    profile: list[tuple[str, float, float]] | str | None = None
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmpdir, processes() as procs:
        tmp = Path(tmpdir)
        if not (plan.auth_only or plan.limits_only or plan.sessions_only or plan.fanout_only
                or plan.metrics_only or plan.translate_only or plan.peers_only
                or plan.affinity_only or plan.workers_only):
            code, profile = direct.run(procs, machine, tmp, plan, rows, notes)
            if code:
                return code

        def fanout_run() -> list[tuple[str, ...]]:
            from router.bench import fanout  # only when asked for

            return fanout.run(procs, machine, tmp, notes)

        peers_tables: list[str] = []

        def peers_run() -> list[tuple[str, ...]]:
            peers_tables.append(run_peers(procs, machine, tmp, plan, setup_notes, notes))
            return []

        extras: list[tuple[str, bool, Callable[[], list[tuple[str, ...]]]]] = [
            ("auth", plan.auth or plan.auth_only,
             lambda: auth_cost.run(procs, machine, tmp, plan, notes)),
            ("limits", plan.limits or plan.limits_only,
             lambda: limits_cost.run(procs, machine, tmp, plan, notes)),
            ("sessions", plan.sessions or plan.sessions_only,
             lambda: pinning.run(procs, machine, tmp, notes)),
            ("affinity", plan.affinity or plan.affinity_only,
             lambda: affinity.run(procs, machine, tmp, notes)),
            ("fanout", plan.fanout or plan.fanout_only, fanout_run),
            ("metrics", plan.metrics or plan.metrics_only,
             lambda: metrics_cost.run(procs, machine, tmp, plan, notes)),
            ("translate", plan.translate or plan.translate_only,
             lambda: translate_cost.run(procs, machine, tmp, plan, notes)),
            ("workers", plan.workers or plan.workers_only,
             lambda: workers_cost.run(procs, machine, tmp, plan, notes)),
            ("peers", plan.peers or plan.peers_only, peers_run),
        ]
        extra_rows: dict[str, list[tuple[str, ...]]] = {}
        for name, wanted, run in extras:
            if not wanted:
                continue
            try:
                extra_rows[name] = run()
            except RuntimeError as exc:
                print(f"router bench: {exc}", file=sys.stderr)
                return 1
    auth_rows = extra_rows.get("auth", [])
    limits_rows = extra_rows.get("limits", [])
    sessions_rows = extra_rows.get("sessions", [])
    affinity_rows = extra_rows.get("affinity", [])
    fanout_rows = extra_rows.get("fanout", [])
    metrics_rows = extra_rows.get("metrics", [])
    translate_rows = extra_rows.get("translate", [])
    workers_rows = extra_rows.get("workers", [])

    if rows:
        _table("", ["metric", "direct", "router", "router vs direct", "target"], rows)
    if auth_rows:
        _table(f"Auth cost per request, warm: GET /v1/models (no upstream), c={plan.connections}, "
               f"wrk, median of {plan.auth_rounds} x {plan.auth_phase_s:.0f} s; baseline = the "
               "same router process with authentication skipped",
               ["credential", "baseline req/s", "with credential req/s", "added µs/req (req/s)",
                "added CPU µs/req", "in authenticate()", "target (on the larger added)"],
               auth_rows)
    if limits_rows:
        _table("Limits cost: the same router with and without limits, one real redis-server",
               ["metric", "without limits", "with limits", "with vs without", "target"],
               limits_rows)
    if sessions_rows:
        _table("Sessions: pinning vs round robin, two upstreams simulating a prefix (KV) cache",
               ["variant", "TTFB p50", "TTFB p95", "TTFB mean", "turns 2+ p50 / p95", "warm",
                "warm, turns 2+", "requests per upstream"], sessions_rows)
    if affinity_rows:
        _table("Prefix affinity: four upstreams simulating a bounded prefix (KV) cache, two "
               "router replicas, conversations without session_id", affinity.COLUMNS,
               affinity_rows)
    if fanout_rows:
        from router.bench.fanout import COLUMNS

        _table("Fan-out: none vs race vs hedge, two upstreams, one with a heavy tail", COLUMNS,
               fanout_rows)
    if translate_rows:
        _table("Translated provider: CPU per streamed chunk, Anthropic-style vs passthrough",
               translate_cost.COLUMNS, translate_rows)
    if metrics_rows:
        _table("Metrics cost: the same router with metrics off, on, and on with the usage report",
               ["variant", "req/s", "vs metrics off", "added µs/req (req/s)", "router CPU/req",
                "added CPU/req", "latency p50 / p99, open loop"], metrics_rows)
    if workers_rows:
        _table("Workers: server.workers 2 on both CPUs against one pinned worker, every feature "
               "on", workers_cost.COLUMNS, workers_rows)
    for table in peers_tables:
        print()
        print(table, end="")
    print()
    placement = (f"router on CPU {ROUTER_CPU}; upstream, load generators on CPU {LOAD_CPU}"
                 if pinned else "unpinned")
    print(f"- {placement}; one router worker; upstream router/bench/upstream.py (uvloop)")
    for note in notes:
        print(f"- {note}")
    if isinstance(profile, str):
        print(f"- profile: {profile}")
    elif profile:
        print()
        print(f"py-spy, router under c={plan.connections} (own time, share of samples):")
        print()
        print("| own % | total % | function |")
        print("|---:|---:|---|")
        for name, own_pct, total_pct in profile:
            print(f"| {own_pct:.1f} | {total_pct:.1f} | `{name}` |")
        print("\n(own time in `Runner.run` is uvloop's C event loop: epoll and socket calls)")
    print(f"\n(bench took {time.monotonic() - started:.0f} s)")
    return 0


def run_peers(procs: Processes, machine: Machine, tmp: Path, plan: Plan,
              setup_notes: list[str], notes: list[str]) -> str:
    """The peers run (`setup_notes` go into its files), its files under `plan.results_dir`
    (named in `notes`); its Markdown."""
    from router.bench import peers, peers_report  # only when asked for

    doc = peers_report.document(peers.run(procs, machine, tmp, plan, list(setup_notes)))
    written, why_not = peers_report.write(doc, Path(plan.results_dir))
    notes.append("peers: written " + ", ".join(str(p) for p in written))
    if why_not:
        notes.append(f"peers: {why_not}")
    return peers_report.markdown(doc)


def _table(title: str, columns: list[str], rows: Sequence[tuple[str, ...]]) -> None:
    """One markdown table: the first column and a target column left, numbers right."""
    print()
    if title:
        print(title)
        print()
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" if i == 0 or c.startswith("target") else "---:"
                         for i, c in enumerate(columns)) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
