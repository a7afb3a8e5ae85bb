"""What one `router bench` run measures, from its command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

# `--peers`: every target, in the order of the tables; `direct` is the upstream itself.
PEER_TARGETS = ("direct", "router", "router-bare", "floor", "nginx", "litellm")


@dataclass(frozen=True)
class Plan:
    duration: float
    rate: float
    connections: int
    ttfb_count: int
    streams: int
    profile: bool
    auth: bool = False
    auth_only: bool = False
    auth_rounds: int = 3
    auth_phase_s: float = 2.0
    limits: bool = False
    limits_only: bool = False
    limits_rounds: int = 3
    limits_phase_s: float = 5.0
    sessions: bool = False
    sessions_only: bool = False
    fanout: bool = False
    fanout_only: bool = False
    metrics: bool = False
    metrics_only: bool = False
    metrics_rounds: int = 5
    metrics_phase_s: float = 5.0
    translate: bool = False
    translate_only: bool = False
    peers: bool = False
    peers_only: bool = False
    peer_targets: tuple[str, ...] = PEER_TARGETS
    peers_rounds: int = 3
    peers_phase_s: float = 5.0
    peers_streams: int = 1000
    results_dir: str = "bench-results"
    affinity: bool = False
    affinity_only: bool = False
    workers: bool = False
    workers_only: bool = False
    workers_rounds: int = 3
    workers_phase_s: float = 5.0


# The optional measurements: (flag, what it measures), for --NAME and --NAME-only.
EXTRAS = (
    ("auth", "the per-request cost of each credential type (API key, HS256/RS256/ES256/EdDSA "
             "router JWT; about 70 s)"),
    ("limits", "the limiter's cost against a real redis-server (router with vs without "
               "limits, same run; about 60 s)"),
    ("sessions", "session pinning vs round robin on two upstreams simulating a prefix cache "
                 "(about 10 s)"),
    ("affinity", "prefix affinity vs round robin, least busy and session pinning on four "
                 "upstreams simulating a bounded prefix cache, two router replicas (about 45 s)"),
    ("fanout", "fan-out: p99 of none, race and hedge over two upstreams, one with a heavy "
               "tail (about 30 s)"),
    ("translate", "the CPU per streamed chunk of a translated provider (Anthropic) against "
                  "passthrough (about 40 s)"),
    ("metrics", "the per-request cost of metrics (and of the usage report): routers with "
                "metrics off / on / on + usage, same run; about 100 s"),
    ("workers", "server.workers: 2 on both CPUs against one pinned worker, every feature on: "
                "req/s, CPU used by each part, req/s per router core (about 40 s)"),
    ("peers", "the router beside nginx and LiteLLM (and direct): throughput, latency, streams, "
              "memory and CPU per request, 3 rounds, written to --results as JSON, Markdown "
              "and PNG (about 6 min; --quick about 3)"),
)


def parse(argv: Sequence[str], description: str | None = None) -> Plan:
    parser = argparse.ArgumentParser(prog="router bench", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per measured load phase (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="3 s phases, 100 streamed requests: a smoke run")
    parser.add_argument("--rate", type=float, default=300.0,
                        help="open-loop rate for the latency figures (default 300 req/s)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--streams", type=int, default=1000,
                        help="streams held open for the RSS figure (default 1000, at most 10,000)")
    parser.add_argument("--profile", action="store_true",
                        help="also sample the router with py-spy under the c=64 load")
    for name, what in EXTRAS:  # --NAME runs it with the rest, --NAME-only alone
        parser.add_argument(f"--{name}", action="store_true", help=f"also measure {what}")
        parser.add_argument(f"--{name}-only", action="store_true", help=f"measure only {what}")
    parser.add_argument("--peer-targets", default=",".join(PEER_TARGETS),
                        help="--peers: which targets, comma-separated (default: "
                             f"{','.join(PEER_TARGETS)})")
    parser.add_argument("--peer-rounds", type=int, default=3,
                        help="--peers: rounds over the targets (default 3; min/median/max)")
    parser.add_argument("--results", default="bench-results",
                        help="--peers: directory for the JSON, Markdown and PNG "
                             "(default bench-results)")
    argv = list(argv)
    if argv[:1] == ["--"]:  # `router bench -- --quick`: argparse's REMAINDER keeps the `--`
        argv = argv[1:]
    args = parser.parse_args(argv)
    targets = tuple(t.strip() for t in args.peer_targets.split(",") if t.strip())
    unknown = sorted(set(targets) - set(PEER_TARGETS))
    if unknown:
        parser.error(f"--peer-targets: unknown {', '.join(unknown)} "
                     f"(known: {', '.join(PEER_TARGETS)})")
    duration = min(args.duration, 3.0) if args.quick else args.duration
    duration = max(1.0, min(duration, 120.0))
    plan_streams = max(1, min(args.streams, 10_000))
    return Plan(duration=duration, rate=max(1.0, min(args.rate, 5000.0)),
                connections=max(1, min(args.connections, 1024)),
                ttfb_count=100 if args.quick else 200,
                streams=plan_streams, profile=args.profile,
                auth=args.auth, auth_only=args.auth_only,
                auth_rounds=1 if args.quick else 3, auth_phase_s=2.0,
                limits=args.limits, limits_only=args.limits_only,
                limits_rounds=1 if args.quick else 3, limits_phase_s=min(duration, 5.0),
                fanout=args.fanout, fanout_only=args.fanout_only,
                sessions=args.sessions, sessions_only=args.sessions_only,
                metrics=args.metrics, metrics_only=args.metrics_only,
                metrics_rounds=1 if args.quick else 5, metrics_phase_s=min(duration, 5.0),
                translate=args.translate, translate_only=args.translate_only,
                peers=args.peers, peers_only=args.peers_only,
                peer_targets=tuple(t for t in PEER_TARGETS if t in targets),
                peers_rounds=max(1, min(args.peer_rounds, 20)),
                peers_phase_s=2.0 if args.quick else min(duration, 5.0),
                peers_streams=min(plan_streams, 200) if args.quick else plan_streams,
                results_dir=args.results,
                affinity=args.affinity, affinity_only=args.affinity_only,
                workers=args.workers, workers_only=args.workers_only,
                workers_rounds=1 if args.quick else 3, workers_phase_s=min(duration, 5.0))
