"""Processes and measurements every part of the benchmark shares: the pinned machine, the
fast upstream, a router from a generated config, wrk and the Python load client, /proc."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import select
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from router.bench import redis_server
from router.bench.plan import Plan
from router.bench.redis_server import free_port

KEY = "sk-bench-" + "b" * 40
LIMITED_KEY = "sk-bench-" + "l" * 40  # --limits: the key with (unreachable) limits
ROUTER_CPU, LOAD_CPU = 0, 1
# Far above anything one router reaches: every request is checked and charged, none refused.
BENCH_LIMITS = {"rpm": 10_000_000, "tpm": 10_000_000_000, "concurrency": 100_000}
CHAT_PATH = "/v1/chat/completions"


# -- processes ----------------------------------------------------------------------------------

@dataclass
class Machine:
    pinned: bool
    wrk: str | None
    notes: list[str] = field(default_factory=list)

    def on(self, cpu: int | str, argv: list[str]) -> list[str]:
        """`argv` run on `cpu` (a CPU number, or a taskset list such as "0,1")."""
        return ["taskset", "-c", str(cpu), *argv] if self.pinned else argv


def raise_nofile(want: int) -> None:
    """At least `want` open files for this process and what it starts: the hard limit too
    when it is short and the system lets the bench raise it, else up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):  # not allowed: stay under the hard one
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def ensure_wrk(notes: list[str]) -> str | None:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        notes.append("wrk is missing (as root: `apt-get install wrk`); req/s comes from the "
                     "Python client, which may itself be the limit")
        return None
    print("router bench: installing wrk with apt-get ...", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "install", "-y", "-qq", "wrk"], ["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "wrk"]):
        try:
            subprocess.run(step, env=env, capture_output=True, timeout=300, check=False)
        except subprocess.TimeoutExpired:
            break
        if shutil.which("wrk"):
            return shutil.which("wrk")
    notes.append("could not install wrk; req/s comes from the Python client")
    return None


class Processes:
    """Children started by the bench; each one is ended at exit, by its own pid."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc  # type: ignore[no-any-return]

    def adopt(self, proc: subprocess.Popen[bytes]) -> None:
        """A child started elsewhere (redis-server), ended with the others."""
        self._procs.append(proc)

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


@contextmanager
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        piece = os.read(fd, 1)
        if not piece:
            break
        if piece == b"\n":
            return buf.decode()
        buf += piece
    raise RuntimeError(f"no line from {proc.args!r} within {timeout:.0f} s (got {buf!r})")


def start_upstream(procs: Processes, machine: Machine, *extra: str
                   ) -> tuple[subprocess.Popen[bytes], int]:
    proc = procs.start(machine.on(LOAD_CPU, [sys.executable, "-m", "router.bench.upstream",
                                             "--port", "0", "--hold-s", "90",
                                             "--hold-gap", "2", *extra]),
                       stdout=subprocess.PIPE)
    line = read_line(proc, 15)
    if not line.startswith("PORT "):
        raise RuntimeError(f"upstream said {line!r}")
    return proc, int(line.split()[1])


def router_config(upstream_port: int, router_port: int, store_url: str | None = None
                  ) -> dict[str, object]:
    """`store_url`: the limits bench, with a second key holding BENCH_LIMITS."""
    backends = {name: {"backends": [{"provider": "up", "model": name}], "retries": 0}
                for name in ("bench-fast", "bench-stream", "bench-hold")}
    keys: list[dict[str, object]] = [{"id": "bench", "user": "bench",
                                      "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}]
    extra: dict[str, object] = {}
    if store_url is not None:
        keys.append({"id": "bench-limited", "user": "bench", "limits": BENCH_LIMITS,
                     "key_sha256": hashlib.sha256(LIMITED_KEY.encode()).hexdigest()})
        extra["store"] = {"url": store_url}  # timeout_ms and on_failure: the defaults
    return {
        "server": {"host": "127.0.0.1", "port": router_port, "reload_poll_s": 0,
                   "shutdown_grace_s": 1, "drain_delay_s": 0},
        "auth": {"api_keys": keys},
        **extra,
        # Connections are opened on demand: a cap above any --streams count costs nothing.
        "providers": {"up": {"type": "openai", "probe": False, "max_connections": 16384,
                             "base_url": f"http://127.0.0.1:{upstream_port}/v1"}},
        "routes": backends,
        "health": {"enabled": False},
        "logging": {"level": "warning", "access_log": False},
    }


def post(port: int, model: str, timeout: float = 5.0) -> tuple[int, bytes]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    req = urllib.request.Request(f"http://127.0.0.1:{port}{CHAT_PATH}", data=body.encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def start_router(procs: Processes, machine: Machine, tmp: Path, upstream_port: int,
                 store_url: str | None = None, name: str = "router",
                 sections: dict[str, object] | None = None,
                 edit: Callable[[dict[str, object]], None] | None = None,
                 cpus: int | str = ROUTER_CPU) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`sections`: top-level config sections to add (the metrics bench); `edit`: changes the
    generated config in place before it is written (the sessions bench adds its route);
    `cpus`: where it runs (the workers bench gives a supervisor of two workers both CPUs)."""
    port = free_port()
    config = tmp / f"{name}.yaml"
    data = {**router_config(upstream_port, port, store_url), **(sections or {})}
    if edit is not None:
        edit(data)
    config.write_text(yaml.safe_dump(data))
    log = tmp / f"{name}.log"
    with log.open("wb") as err:
        proc = procs.start(machine.on(cpus, [sys.executable, "-m", "router", "serve",
                                                   "--config", str(config), "--port",
                                                   str(port)]),
                           stdout=err, stderr=subprocess.STDOUT)
    wait_ready(proc, port, [log], 30)
    return proc, port, log


def wait_ready(proc: subprocess.Popen[bytes], port: int, logs: Sequence[Path],
               timeout: float) -> None:
    """Until a non-streamed chat completion through `port` answers 200; RuntimeError with the
    logs' tails when the process exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status, body = post(port, "bench-fast", timeout=5)
        except OSError as exc:
            last = str(exc)
            time.sleep(0.2)
            continue
        if status == 200:
            return
        last = f"HTTP {status}: {body[:300]!r}"
        time.sleep(0.3)
    tails = "\n".join(f"{log}:\n{log.read_text(errors='replace')[-1500:]}"
                      for log in logs if log.exists())
    exited = "" if proc.poll() is None else f", exited {proc.returncode}"
    raise RuntimeError(f"{proc.args!r} did not answer ({last}{exited}); {tails}")


# -- measurements -------------------------------------------------------------------------------

def client(procs: Processes, machine: Machine, mode: str, port: int, *extra: str,
           timeout: float, key: str = KEY) -> dict[str, object]:
    argv = machine.on(LOAD_CPU, [sys.executable, "-m", "router.bench.client", mode, "--port",
                                 str(port), "--key", key, *extra])
    proc = procs.start(argv, stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"{mode} client did not finish within {timeout:.0f} s") from None
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} client failed (exit {proc.returncode})")
    result: dict[str, object] = json.loads(lines[-1])
    return result


@dataclass
class Throughput:
    rps: float
    failures: int
    detail: str
    requests: int = 0


WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_REQUESTS = re.compile(r"(\d+) requests in")


def wrk_script(tmp: Path, key: str = KEY) -> Path:
    body = json.dumps({"model": "bench-fast", "stream": False,
                       "messages": [{"role": "user", "content": "Say hello."}]})
    script = tmp / ("post.lua" if key == KEY else f"post-{key[-8:]}.lua")
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                      'wrk.headers["Content-Type"] = "application/json"\n'
                      f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    return script


def throughput(procs: Processes, machine: Machine, tmp: Path, port: int, plan: Plan,
               duration: float, key: str = KEY) -> Throughput:
    if machine.wrk is None:
        r = client(procs, machine, "closed", port, "--connections", str(plan.connections),
                   "--duration", str(duration), timeout=duration + 60, key=key)
        failures = int(r["non200"]) + int(r["errors"])  # type: ignore[call-overload]
        done = int(r["ok"]) + int(r["non200"])  # type: ignore[call-overload]
        return Throughput(float(r["rps"]), failures, "python client",  # type: ignore[arg-type]
                          done)
    argv = machine.on(LOAD_CPU, [machine.wrk, "-t1", f"-c{plan.connections}",
                                 f"-d{max(1, round(duration))}s", "-s",
                                 str(wrk_script(tmp, key)),
                                 f"http://127.0.0.1:{port}{CHAT_PATH}"])
    proc = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=duration + 60)
    text = out.decode(errors="replace")
    rps = WRK_RPS.search(text)
    if rps is None:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{text}")
    non2xx = WRK_NON2XX.search(text)
    failures = int(non2xx.group(1)) if non2xx else 0
    sock = WRK_SOCKET.search(text)
    if sock is not None:
        failures += sum(int(x) for x in sock.groups())
    count = WRK_REQUESTS.search(text)
    return Throughput(float(rps.group(1)), failures, "wrk",
                      int(count.group(1)) if count else 0)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_times(cpu: int) -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of one CPU, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            v = [int(x) for x in line.split()[1:]]
            idle = v[3] + v[4]
            steal = v[7] if len(v) > 7 else 0
            total = sum(v[:8])
            return total - idle - steal, steal, total
    return 0, 0, 1


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def median(xs: list[float]) -> float:
    ys = sorted(xs)
    mid = len(ys) // 2
    return ys[mid] if len(ys) % 2 else (ys[mid - 1] + ys[mid]) / 2


def start_redis(procs: Processes, machine: Machine, tmp: Path) -> int:
    """A real redis-server on a free loopback port, on the load CPU (the router keeps CPU 0)."""
    server = redis_server.start_redis(tmp / "redis", launcher=machine.on(LOAD_CPU, []))
    procs.adopt(server.proc)
    return server.port


# -- report -------------------------------------------------------------------------------------

def ms(x: float) -> str:
    return f"{x:.2f} ms"


def mark(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def latency(r: dict[str, object], key: str) -> dict[str, float]:
    return r[key]  # type: ignore[return-value]
