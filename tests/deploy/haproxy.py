"""A real haproxy in front of `router serve` replicas on loopback, standing in for a Kubernetes
Service: health checks on /readyz take a draining replica out of rotation, a connection that
fails is retried on another replica, and each answer says which replica served it.

haproxy runs in the foreground (`-db`) from a config written to a temp directory, and is
ended by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.e2e.conftest import free_port

BACKEND = "routers"
SERVED_BY = "x-served-by"  # the answering replica's server name (r0, r1, ...), set by haproxy
CHECK_EVERY_MS = 200
FALL = 2  # failed checks in a row that take a replica out
RISE = 2  # good checks in a row that put it back
START_TIMEOUT_S = 10.0


def server_name(i: int) -> str:
    return f"r{i}"


# How the front balances. `http`: request by request, as an ingress controller or a cloud
# load balancer in HTTP mode does (it can retry a request that got no answer). `tcp`:
# connection by connection, as kube-proxy does for a Service: a client's keep-alive connection
# stays on the replica it reached until one side closes it.
MODES = ("http", "tcp")

_HTTP_ONLY = """\
    option httplog
    timeout http-request 10s
    # A request whose connection to a replica fails, or that a replica closes without an
    # answer, is tried again (on another replica: redispatch), up to 3 times.
    retry-on conn-failure empty-response
"""


def haproxy_config(port: int, stats_port: int, replica_ports: Sequence[int],
                   mode: str = "http") -> str:
    """A frontend on `port` balancing round robin over the replicas, which it takes out and
    puts back by their /readyz; stats as CSV on `stats_port` at /stats;csv. haproxy 2.x."""
    servers = "\n".join(f"    server {server_name(i)} 127.0.0.1:{p} check"
                        for i, p in enumerate(replica_ports))
    http = mode == "http"
    return f"""\
global
    maxconn 4096
    log stderr format raw local0 info

defaults
    mode {mode}
    log global
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout queue 10s
    timeout check 1s
    retries 3
    option redispatch
{_HTTP_ONLY if http else "    option tcplog"}

frontend front
    bind 127.0.0.1:{port}
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter {CHECK_EVERY_MS}ms fall {FALL} rise {RISE}
{f"    http-response set-header {SERVED_BY} %[srv_name]" if http else ""}
{servers}

listen stats
    mode http
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
    stats refresh 0
"""


@dataclass(frozen=True)
class ServerStats:
    """One replica as haproxy sees it (a row of its stats CSV)."""

    name: str
    status: str  # UP, DOWN, "UP 1/2" (rising), "DOWN 1/2" (falling), MAINT...
    sessions: int  # requests (connections) sent to it in all
    retries: int  # connections to it tried again
    redispatches: int  # requests moved from it to another replica
    connection_errors: int
    response_errors: int

    @property
    def up(self) -> bool:
        return self.status == "UP"

    @property
    def down(self) -> bool:
        return self.status == "DOWN"


@dataclass
class Haproxy:
    proc: asyncio.subprocess.Process
    port: int
    stats_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def servers(self, http: aiohttp.ClientSession) -> dict[str, ServerStats]:
        async with http.get(f"http://127.0.0.1:{self.stats_port}/stats;csv") as resp:
            text = await resp.text()
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {row["svname"]: ServerStats(
            row["svname"], row["status"], int(row["stot"] or 0), int(row["wretr"] or 0),
            int(row["wredis"] or 0), int(row["econ"] or 0), int(row["eresp"] or 0))
            for row in rows
            if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")}

    async def until(self, http: aiohttp.ClientSession, name: str, status: str,
                    within_s: float = 15.0) -> float:
        """Wait until haproxy reports `name` in `status` (UP or DOWN); the time it took."""
        start = time.monotonic()
        deadline = start + within_s
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                server = (await self.servers(http)).get(name)
                if server is not None and server.status == status:
                    return time.monotonic() - start
            if time.monotonic() > deadline:
                raise AssertionError(f"haproxy did not see {name} {status} within "
                                     f"{within_s:.0f} s:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


@contextlib.asynccontextmanager
async def running_haproxy(binary: str, directory: Path, replica_ports: Sequence[int],
                          mode: str = "http") -> AsyncIterator[Haproxy]:
    """haproxy in front of the replicas, its stats page answering; stopped on exit. Its
    config and log go into `directory`."""
    for attempt in range(3):  # another process may take a free port first: pick others
        port, stats_port = free_port(), free_port()
        config = directory / "haproxy.cfg"
        config.write_text(haproxy_config(port, stats_port, replica_ports, mode))
        log_path = directory / f"haproxy-{attempt}.log"
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                binary, "-db", "-f", str(config), stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file, stderr=log_file)
        front = Haproxy(proc, port, stats_port, log_path)
        try:
            if await _until_serving(front):
                break
        except BaseException:
            await front.stop()
            raise
        await front.stop()
    else:
        raise AssertionError("haproxy did not start:\n" + front.log()[-3000:])
    try:
        yield front
    finally:
        await front.stop()


async def _until_serving(front: Haproxy) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if front.proc.returncode is not None:
                return False
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await front.servers(http)
                return True
            await asyncio.sleep(0.05)
    return False
