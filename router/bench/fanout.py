"""`router bench --fanout`: what race and hedge do to tail latency, and what they cost upstream.

Two upstreams with latency distributions (this module, run as ``python -m router.bench.fanout``):
``steady`` answers after FAST_MS (±20%), ``tail`` the same 90% of the time and after TAIL_MS
the other 10%. One router (round robin over both) serves four routes: ``fanout: none``,
``race``, ``hedge`` after HEDGE_MS and ``hedge`` after the route's observed p95. Each gets the
same open-loop load (router/bench/client.py, non-streamed); the table shows its latency and how
many upstream requests one client request cost (counted by the upstreams themselves), and how
many of those the router cancelled (the connection closed before the answer).

The upstream answers each request after its own delay and counts what it saw:
``GET /stats`` answers ``{"requests": n, "answered": n, "cancelled": n}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import select
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

import orjson
import yaml

from router.bench.harness import LOAD_CPU, ROUTER_CPU, Machine, Processes
from router.bench.redis_server import free_port
from router.bench.upstream import COMPLETION, MODELS, SSE_FAST, _response

FAST_MS, TAIL_MS, TAIL_SHARE = 20.0, 300.0, 0.10
HEDGE_MS = 50.0
RATE, DURATION_S, WARMUP_S = 80.0, 5.0, 1.0  # 400 measured requests per route, 80 warm-up
KEY = "sk-bench-" + "f" * 40
MODES: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("none (round robin)", "fo-none", {}),
    ("race (both)", "fo-race", {"fanout": "race"}),
    (f"hedge after {HEDGE_MS:g} ms", "fo-hedge-ms", {"fanout": "hedge",
                                                    "hedge_after_ms": HEDGE_MS}),
    ("hedge after p95", "fo-hedge-p95", {"fanout": "hedge", "hedge_after_ms": "p95"}),
)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


# -- the upstream -------------------------------------------------------------------------------

class Stats:
    def __init__(self, fast_s: float, tail_s: float, tail_share: float, seed: int) -> None:
        self.fast_s, self.tail_s, self.tail_share = fast_s, tail_s, tail_share
        self.rng = random.Random(seed)
        self.counts = {"requests": 0, "answered": 0, "cancelled": 0}

    def delay(self) -> float:
        if self.rng.random() < self.tail_share:
            return self.tail_s
        return self.fast_s * self.rng.uniform(0.8, 1.2)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; a request is answered after its own delay (the router sends
    one at a time per connection). Closed before the answer: counted as cancelled."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._stats.counts["cancelled"] += 1
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while self._timer is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end])
            match = _CONTENT_LENGTH.search(head)
            total = end + 4 + (int(match.group(1)) if match else 0)
            if len(self._buf) < total:
                return
            body = bytes(self._buf[end + 4:total])
            del self._buf[:total]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        if head.startswith(b"GET /stats"):
            transport.write(_response(orjson.dumps(self._stats.counts)))
        elif head.startswith(b"GET"):
            transport.write(MODELS)
        else:
            self._stats.counts["requests"] += 1
            streamed = b'"stream":true' in body or b'"stream": true' in body
            self._timer = asyncio.get_running_loop().call_later(
                self._stats.delay(), self._send, SSE_FAST if streamed else COMPLETION)

    def _send(self, answer: bytes) -> None:
        self._timer = None
        if self._transport is None:
            return
        self._stats.counts["answered"] += 1
        self._transport.write(answer)
        if self._buf:
            self.data_received(b"")


async def serve(port: int, stats: Stats) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(stats), "127.0.0.1", port,
                                      backlog=4096, reuse_address=True)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.bench.fanout")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fast-ms", type=float, default=FAST_MS)
    parser.add_argument("--tail-ms", type=float, default=TAIL_MS)
    parser.add_argument("--tail-share", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    stats = Stats(args.fast_ms / 1000, args.tail_ms / 1000, args.tail_share, args.seed)
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.port, stats))
    return 0


# -- the scenario -------------------------------------------------------------------------------

def _read_port(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    assert proc.stdout is not None
    deadline, buf = time.monotonic() + timeout, b""
    while time.monotonic() < deadline and not buf.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        piece = os.read(proc.stdout.fileno(), 1) if ready else b""
        if not piece:
            break
        buf += piece
    if not buf.startswith(b"PORT "):
        raise RuntimeError(f"{proc.args!r} said {buf!r}")
    return int(buf.split()[1])


def _get(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        stats: dict[str, int] = json.loads(resp.read())
    return stats


def _post_ok(port: int, model: str) -> bool:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 data=body.encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return int(resp.status) == 200
    except OSError:
        return False


def _config(port: int, up_ports: dict[str, int]) -> dict[str, Any]:
    backends = [{"provider": name, "model": "bench-fast", "name": name} for name in up_ports]
    return {
        "server": {"host": "127.0.0.1", "port": port, "reload_poll_s": 0,
                   "shutdown_grace_s": 1},
        "auth": {"api_keys": [{"id": "bench", "user": "bench",
                               "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}]},
        "providers": {name: {"type": "openai", "probe": False, "max_connections": 4096,
                             "base_url": f"http://127.0.0.1:{p}/v1"}
                      for name, p in up_ports.items()},
        "routes": {model: {"strategy": "round_robin", "retries": 0, "backends": backends, **extra}
                   for _, model, extra in MODES},
        "health": {"enabled": False},
        "logging": {"level": "warning", "access_log": False},
    }


def run(procs: Processes, machine: Machine, tmp: Path, notes: list[str]) -> list[tuple[str, ...]]:
    """Start the two upstreams and a router, load each route in turn; one row per route."""
    ups: dict[str, int] = {}
    for name, share, seed in (("steady", 0.0, 1), ("tail", TAIL_SHARE, 2)):
        proc = procs.start(machine.on(LOAD_CPU, [
            sys.executable, "-m", "router.bench.fanout", "--fast-ms", str(FAST_MS),
            "--tail-ms", str(TAIL_MS), "--tail-share", str(share), "--seed", str(seed)]),
            stdout=subprocess.PIPE)
        ups[name] = _read_port(proc)
    port = free_port()
    config = tmp / "router-fanout.yaml"
    config.write_text(yaml.safe_dump(_config(port, ups)))
    log = tmp / "router-fanout.log"
    with log.open("wb") as err:
        router = procs.start(machine.on(ROUTER_CPU, [sys.executable, "-m", "router", "serve",
                                                     "--config", str(config)]),
                             stdout=err, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not _post_ok(port, "fo-none"):
        if time.monotonic() > deadline or router.poll() is not None:
            raise RuntimeError(f"the fan-out router did not answer; log: {log}")
        time.sleep(0.1)
    print(f"router bench: fan-out, upstreams steady :{ups['steady']} tail :{ups['tail']}, "
          f"router :{port} (pid {router.pid}); {len(MODES)} routes x "
          f"{RATE * (DURATION_S + WARMUP_S):.0f} requests", file=sys.stderr, flush=True)
    rows: list[tuple[str, ...]] = []
    for label, model, _ in MODES:
        before = [_get(f"http://127.0.0.1:{p}/stats") for p in ups.values()]
        argv = machine.on(LOAD_CPU, [sys.executable, "-m", "router.bench.client", "openloop",
                                     "--port", str(port), "--key", KEY, "--model", model,
                                     "--rate", str(RATE), "--duration", str(DURATION_S),
                                     "--warmup", str(WARMUP_S)])
        client = procs.start(argv, stdout=subprocess.PIPE)
        out, _ = client.communicate(timeout=DURATION_S + WARMUP_S + 60)
        result = json.loads(out.decode().strip().splitlines()[-1])
        time.sleep(0.5)  # let cancelled upstream requests be counted
        after = [_get(f"http://127.0.0.1:{p}/stats") for p in ups.values()]
        sent = int(RATE * (DURATION_S + WARMUP_S))

        def delta(key: str, before: list[dict[str, int]] = before,
                  after: list[dict[str, int]] = after) -> int:
            return sum(a[key] - b[key] for a, b in zip(after, before, strict=True))

        lat = result["latency_ms"]
        errors = sum(result["errors"].values())
        rows.append((label, f"{lat['p50']:.1f} ms", f"{lat['p95']:.1f} ms",
                     f"{lat['p99']:.1f} ms", f"{lat['max']:.1f} ms",
                     f"{delta('requests') / sent:.3f}", f"{delta('cancelled') / sent:.3f}",
                     str(errors)))
    notes.append(f"fan-out: two upstreams (CPU {LOAD_CPU}): steady {FAST_MS:g} ms ±20%; tail "
                 f"the same {100 - 100 * TAIL_SHARE:g}% of the time, {TAIL_MS:g} ms the other "
                 f"{100 * TAIL_SHARE:g}%; routes round robin over both, non-streamed, open loop "
                 f"{RATE:g} req/s, {WARMUP_S:g} s warm-up + {DURATION_S:g} s measured per route; "
                 "upstream requests counted by the upstreams (warm-up included)")
    if router.poll() is not None:
        notes.append(f"fan-out: the router exited early; log: {log}")
    return rows


COLUMNS = ["route", "p50", "p95", "p99", "max", "upstream requests per request",
           "cancelled upstream requests per request", "errors"]


if __name__ == "__main__":
    sys.exit(main())
