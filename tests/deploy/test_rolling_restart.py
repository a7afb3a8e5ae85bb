"""A rolling restart as Kubernetes does it, on loopback: three `router serve` replicas sharing one
Redis behind a real haproxy that health-checks /readyz (standing in for the Service and its
endpoints), steady JSON and streamed traffic, and each replica in turn sent SIGTERM, waited for,
and started again on its port. Nothing a client sent may fail, every stream ends whole, and a
key's rpm limit stays exact across the change. haproxy balances in HTTP mode (request by
request, as an ingress does) and in TCP mode (connection by connection, as kube-proxy does).

Run with -s to see the figures.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import KEY, USER_MSG, openai_provider, router_config
from tests.deploy.haproxy import (
    CHECK_EVERY_MS,
    FALL,
    MODES,
    SERVED_BY,
    Haproxy,
    running_haproxy,
    server_name,
)
from tests.e2e.conftest import RouterProcess, free_port

REPLICAS = 3
# Longer than haproxy takes to see a failing /readyz (FALL checks CHECK_EVERY_MS apart), so no
# new request reaches a replica once its listener closes.
DRAIN_DELAY_S = 2.0
# Streams: short ones, long ones, and long ones started on the replica about to stop (route
# `pinned`, only for those), so still running when its listener closes.
STREAM_CHUNKS, LONG_CHUNKS = 20, 30
MODELS = {"m": "gpt-x", "s": f"chunks:{STREAM_CHUNKS}+gap:0.02",
          "long": f"chunks:{LONG_CHUNKS}+gap:0.1", "pinned": f"chunks:{LONG_CHUNKS}+gap:0.1"}
# One key per restart, limited to RPM requests a minute: GCRA with a burst of RPM, so a fresh
# key admits exactly RPM and refills one request every 60/RPM s (12 s, longer than one
# restart). The key's requests go in PHASES around its replica's restart, BURST at a time.
RPM = 5
PHASES = ("before SIGTERM", "draining", "exited", "back up")
BURST = 3


def limited_key(i: int) -> str:
    return "sk-test-" + f"l{i}" * 20


def replica_config(up: Any, redis_url: str) -> dict[str, Any]:
    config = router_config(
        {"up": openai_provider(up, probe=False)},
        {name: {"backends": [{"provider": "up", "model": model}]}
         for name, model in MODELS.items()},
        store={"url": redis_url, "timeout_ms": 2000},
        server={"drain_delay_s": DRAIN_DELAY_S, "shutdown_grace_s": 10},
        logging={"level": "info", "format": "text"})
    config["auth"]["api_keys"] += [
        {"id": f"limited{i}", "key_sha256": hashlib.sha256(limited_key(i).encode()).hexdigest(),
         "user": f"limited{i}", "limits": {"rpm": RPM}}
        for i in range(REPLICAS)]
    return config


@dataclass(frozen=True)
class Outcome:
    """One client request through haproxy."""

    kind: str  # a model of MODELS
    start: float
    end: float
    status: int | None  # None: no answer (a connection error)
    served_by: str
    problem: str | None  # None: a whole, well-formed answer

    @property
    def failed(self) -> bool:
        return self.problem is not None


def expected_content(chunks: int) -> str:
    return "".join(f"tok{i} " for i in range(chunks))


def check_json(raw: bytes) -> str | None:
    body = orjson.loads(raw)
    content = body["choices"][0]["message"]["content"]
    return None if content == expected_content(5) else f"content {content!r}"


def check_stream(raw: bytes, chunks: int) -> str | None:
    """Every chunk, the finish chunk, then `data: [DONE]` last."""
    data = [line.removeprefix(b"data: ") for line in raw.split(b"\n")
            if line.startswith(b"data: ")]
    if not data or data[-1] != b"[DONE]":
        return f"no [DONE] at the end ({len(data)} data lines)"
    content, finish = [], None
    for item in data[:-1]:
        choice = orjson.loads(item)["choices"][0]
        content.append(choice["delta"].get("content") or "")
        finish = choice["finish_reason"] or finish
    if "".join(content) != expected_content(chunks) or finish != "stop":
        return f"incomplete stream: {''.join(content)!r}, finish {finish!r}"
    return None


@dataclass
class Load:
    """Clients posting chat completions through the front until told to stop: each kind of
    client loops on its model, one request at a time."""

    http: aiohttp.ClientSession
    fresh: aiohttp.ClientSession  # a new connection for every request
    url: str
    outcomes: list[Outcome] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    extra: list[asyncio.Future[None]] = field(default_factory=list)

    async def request(self, kind: str, served: asyncio.Future[str] | None = None,
                      http: aiohttp.ClientSession | None = None) -> Outcome:
        """One request, checked; `served` is told the replica as soon as the head is in."""
        body: dict[str, Any] = {"model": kind, "messages": USER_MSG}
        if kind != "m":
            body["stream"] = True
        start = time.monotonic()
        status, served_by, problem = None, "", None
        try:
            async with (http or self.http).post(
                    f"{self.url}/v1/chat/completions", json=body,
                    headers={"Authorization": f"Bearer {KEY}"}) as resp:
                status, served_by = resp.status, resp.headers.get(SERVED_BY, "")
                if served is not None:
                    served.set_result(served_by)
                raw = await resp.read()
            if status != 200:
                problem = f"status {status}: {raw[:200]!r}"
            elif kind == "m":
                problem = check_json(raw)
            else:
                problem = check_stream(raw, STREAM_CHUNKS if kind == "s" else LONG_CHUNKS)
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if served is not None and not served.done():
            served.set_result(served_by)
        return Outcome(kind, start, time.monotonic(), status, served_by, problem)

    async def record(self, kind: str, served: asyncio.Future[str]) -> None:
        self.outcomes.append(await self.request(kind, served, self.fresh))

    async def long_stream_on(self, replica: RouterProcess) -> None:
        """Start long streams, each on a new connection, until one runs on `replica` (as its
        own metrics say), so that one is in flight there when its listener closes. Each is
        recorded as it ends."""
        for _ in range(40):  # round robin over three: (2/3)^40 that none lands there
            served: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self.extra.append(asyncio.ensure_future(self.record("pinned", served)))
            await served
            if await streams_running(self.http, replica.url, "pinned"):
                return
        raise AssertionError(f"no long stream reached the replica on port {replica.port}")

    async def client(self, kind: str, pause_s: float) -> None:
        while not self.stopping.is_set():
            self.outcomes.append(await self.request(kind))
            await asyncio.sleep(pause_s)

    async def run(self, clients: dict[str, int], pause_s: float) -> None:
        await asyncio.gather(*(self.client(kind, pause_s)
                               for kind, n in clients.items() for _ in range(n)))
        await asyncio.gather(*self.extra)


async def streams_running(http: aiohttp.ClientSession, url: str, route: str) -> float:
    """router_inflight_requests{route} on one replica, asked directly."""
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f'router_inflight_requests{{route="{route}"}}'))


def in_flight_at_listener_close(log: str) -> int:
    found = re.search(r"draining (\d+) in-flight requests", log)
    assert found, "no drain in the router log:\n" + log[-3000:]
    return int(found.group(1))


@dataclass(frozen=True)
class Limited:
    """One request of a limited key: its phase of the restart, status and replica."""

    phase: str
    start: float
    end: float
    status: int | None
    served_by: str
    code: str | None  # the error code of a refusal


async def limited_burst(http: aiohttp.ClientSession, url: str, key: str,
                        phase: str) -> list[Limited]:
    async def one() -> Limited:
        start = time.monotonic()
        async with http.post(f"{url}/v1/chat/completions",
                             json={"model": "m", "messages": USER_MSG},
                             headers={"Authorization": f"Bearer {key}"}) as resp:
            body = orjson.loads(await resp.read())
            code = None if resp.status == 200 else body["error"]["code"]
            return Limited(phase, start, time.monotonic(), resp.status,
                           resp.headers.get(SERVED_BY, ""), code)
    return list(await asyncio.gather(*(one() for _ in range(BURST))))


@dataclass
class Restart:
    """One replica's restart, timed from its SIGTERM."""

    replica: int
    sigterm_at: float = 0.0
    out_after_s: float = 0.0  # haproxy marked it DOWN
    exited_after_s: float = 0.0
    exit_code: int | None = None
    in_flight_at_close: int = 0  # requests still being served when the listener closed
    log: str = ""  # the stopped process's
    back_after_s: float = 0.0  # haproxy marked the new process UP
    sessions_when_back: int = 0  # haproxy's count of sessions sent to the replica by then
    limited: list[Limited] = field(default_factory=list)

    @property
    def back_at(self) -> float:
        return self.sigterm_at + self.back_after_s


async def restart(i: int, replicas: list[RouterProcess], front: Haproxy, start_router: Any,
                  config: dict[str, Any], http: aiohttp.ClientSession, load: Load) -> Restart:
    """SIGTERM, as the kubelet sends after the preStop hook; wait for the exit; start a new
    process on the same port; wait until haproxy sends it traffic. A long stream is running
    on the replica when it is told to stop; the limited key's bursts go at each step."""
    name, old, key = server_name(i), replicas[i], limited_key(i)
    done = Restart(i)
    await load.long_stream_on(old)
    done.limited += await limited_burst(http, front.url, key, PHASES[0])
    done.sigterm_at = time.monotonic()
    old.send(signal.SIGTERM)
    done.limited += await limited_burst(http, front.url, key, PHASES[1])
    done.out_after_s = await front.until(http, name, "DOWN")
    done.exit_code = await old.wait_exit(20)
    done.exited_after_s = time.monotonic() - done.sigterm_at
    done.log = old.log()
    done.in_flight_at_close = in_flight_at_listener_close(done.log)
    done.limited += await limited_burst(http, front.url, key, PHASES[2])
    replicas[i] = await start_router(config, port=old.port)
    await front.until(http, name, "UP")
    done.back_after_s = time.monotonic() - done.sigterm_at
    done.sessions_when_back = (await front.servers(http))[name].sessions
    done.limited += await limited_burst(http, front.url, key, PHASES[3])
    return done


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", MODES)
async def test_rolling_restart_behind_haproxy_loses_nothing(fakes, router_process, redis_server,
                                                            tmp_path: Path, mode: str):
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (make test installs it)")
    up = await fakes("up")
    config = replica_config(up, redis_server.url)
    ports = [free_port() for _ in range(REPLICAS)]
    replicas = list(await asyncio.gather(*(router_process(config, port=p) for p in ports)))
    first_pids = [rp.pid for rp in replicas]
    timeout = aiohttp.ClientTimeout(total=30)
    async with running_haproxy(haproxy, tmp_path, ports, mode) as front, \
            aiohttp.ClientSession(timeout=timeout) as control, \
            aiohttp.ClientSession(timeout=timeout) as clients, \
            aiohttp.ClientSession(timeout=timeout,
                                  connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        for i in range(REPLICAS):
            await front.until(control, server_name(i), "UP")
        load = Load(clients, fresh, front.url)
        started = time.monotonic()
        traffic = asyncio.ensure_future(load.run({"m": 3, "s": 3, "long": 2}, pause_s=0.01))
        try:
            await asyncio.sleep(0.5)  # steady load first
            restarts = [await restart(i, replicas, front, router_process, config, control,
                                      load) for i in range(REPLICAS)]
            await asyncio.sleep(0.5)
            # New connections reach every replica (round robin), the restarted ones too:
            # behind a TCP front, kept-alive connections stay where they were.
            for _ in range(2 * REPLICAS):
                load.outcomes.append(await load.request("m", http=fresh))
        finally:
            load.stopping.set()
            await traffic
        duration = time.monotonic() - started
        servers = await front.servers(control)

    outcomes = load.outcomes
    failures = [o for o in outcomes if o.failed]
    kinds = Counter(o.kind for o in outcomes)
    streams = kinds["s"] + kinds["long"] + kinds["pinned"]
    print(f"\nrolling restart behind haproxy ({mode} mode): {len(outcomes)} requests "
          f"({kinds['m']} JSON, {streams} streams) in {duration:.1f} s; {len(failures)} failed")
    for r in restarts:
        print(f"  {server_name(r.replica)}: out of haproxy {r.out_after_s:.2f} s after SIGTERM, "
              f"{r.in_flight_at_close} in flight when its listener closed, exited "
              f"({r.exit_code}) after {r.exited_after_s:.2f} s, back up after "
              f"{r.back_after_s:.2f} s")
    print("  haproxy per replica: " + ", ".join(
        f"{s.name} {s.status} sessions={s.sessions} retries={s.retries} "
        f"redispatches={s.redispatches} conn_errors={s.connection_errors} "
        f"resp_errors={s.response_errors}" for s in servers.values()))
    print(f"  limited keys (rpm {RPM}): " + "; ".join(
        f"{server_name(r.replica)}: " + ", ".join(
            f"{phase} {[x.status for x in r.limited if x.phase == phase]}" for phase in PHASES)
        for r in restarts))

    assert not failures, "failed client requests:\n" + "\n".join(
        f"{o.kind} via {o.served_by or '?'} at {o.start - started:.2f} s: {o.problem}"
        for o in failures[:20])
    assert kinds["m"] > 100 and kinds["s"] > 20 and kinds["long"] > 5
    for r in restarts:
        name = server_name(r.replica)
        assert r.exit_code == 0, f"{name} exited with {r.exit_code}"
        # haproxy took it out while it still served: its listener closed later
        assert r.out_after_s < DRAIN_DELAY_S
        # a stream was still running when the listener closed; it ended whole (above)
        assert r.in_flight_at_close >= 1
        assert "grace over" not in r.log and "Traceback" not in r.log
        assert servers[name].sessions > r.sessions_when_back, f"{name} not used once back"
        if mode == "http":
            assert any(o.served_by == name and o.start > r.back_at for o in outcomes), \
                f"{name} served nothing after its restart"
    assert all(rp.pid != first for rp, first in zip(replicas, first_pids, strict=True))
    assert all(s.up for s in servers.values()), servers
    # haproxy's retries could hide a lost request: none was needed.
    assert all(s.retries == s.redispatches == 0 for s in servers.values()), servers
    assert all(rp.proc.returncode is None for rp in replicas)

    for r in restarts:
        window = max(x.end for x in r.limited) - min(x.start for x in r.limited)
        assert window < 60 / RPM, f"the limited requests took {window:.1f} s: a refill is due"
        statuses = Counter(x.status for x in r.limited)
        assert statuses == {200: RPM, 429: len(PHASES) * BURST - RPM}, r.limited
        assert {x.code for x in r.limited if x.status == 429} == {"rpm"}  # the limit that refused
        # the first RPM in order of arrival: before SIGTERM and while draining
        assert all(x.status == 429 for x in r.limited if x.phase in PHASES[2:])
    assert CHECK_EVERY_MS * FALL / 1000 < DRAIN_DELAY_S
