"""`router bench` / `python -m tests.bench`: direct-vs-router figures in one run.

A fast upstream (tests/bench/upstream.py) and the load generators share CPU 1; the router runs
alone on CPU 0 (`taskset`). Each figure is measured twice, straight at the upstream and through
the router, and printed as one markdown table:

* requests/s, non-streamed, 64 connections, closed loop (wrk, or the Python client without it);
* added latency p50/p99 at a fixed moderate rate, open loop (tests/bench/client.py);
* streaming time to the first SSE `data:` chunk, p50/p99;
* the router's RSS with 1,000 streams open at once (VmRSS from /proc).

`--profile` adds a py-spy sample of the router under the 64-connection load (own time per
function). Not a test: `make test` never runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-bench-" + "b" * 40
ROUTER_CPU, LOAD_CPU = 0, 1
TARGET_RPS = 4500.0
TARGET_ADDED_P50_MS = 1.0
TARGET_RSS_MB = 150.0
CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Plan:
    duration: float
    rate: float
    connections: int
    ttfb_count: int
    streams: int
    profile: bool


def _parse(argv: Sequence[str]) -> Plan:
    parser = argparse.ArgumentParser(prog="router bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per measured load phase (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="3 s phases, 100 streamed requests: a smoke run")
    parser.add_argument("--rate", type=float, default=300.0,
                        help="open-loop rate for the latency figures (default 300 req/s)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--streams", type=int, default=1000,
                        help="streams held open for the RSS figure (default 1000)")
    parser.add_argument("--profile", action="store_true",
                        help="also sample the router with py-spy under the c=64 load")
    argv = list(argv)
    if argv[:1] == ["--"]:  # `router bench -- --quick`: argparse's REMAINDER keeps the `--`
        argv = argv[1:]
    args = parser.parse_args(argv)
    duration = min(args.duration, 3.0) if args.quick else args.duration
    duration = max(1.0, min(duration, 120.0))
    return Plan(duration=duration, rate=max(1.0, min(args.rate, 5000.0)),
                connections=max(1, min(args.connections, 1024)),
                ttfb_count=100 if args.quick else 200,
                streams=max(1, min(args.streams, 5000)), profile=args.profile)


# -- processes ----------------------------------------------------------------------------------

@dataclass
class Machine:
    pinned: bool
    wrk: str | None
    notes: list[str] = field(default_factory=list)

    def on(self, cpu: int, argv: list[str]) -> list[str]:
        return ["taskset", "-c", str(cpu), *argv] if self.pinned else argv


def _raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _ensure_wrk(notes: list[str]) -> str | None:
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
        proc = subprocess.Popen(argv, cwd=ROOT, **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc  # type: ignore[no-any-return]

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


@contextmanager
def _processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
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


def _start_upstream(procs: Processes, machine: Machine) -> tuple[subprocess.Popen[bytes], int]:
    proc = procs.start(machine.on(LOAD_CPU, [sys.executable, "-m", "tests.bench.upstream",
                                             "--port", "0", "--hold-s", "90",
                                             "--hold-gap", "2"]),
                       stdout=subprocess.PIPE)
    line = _read_line(proc, 15)
    if not line.startswith("PORT "):
        raise RuntimeError(f"upstream said {line!r}")
    return proc, int(line.split()[1])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _router_config(upstream_port: int, router_port: int) -> dict[str, object]:
    backends = {name: {"backends": [{"provider": "up", "model": name}], "retries": 0}
                for name in ("bench-fast", "bench-stream", "bench-hold")}
    return {
        "server": {"host": "127.0.0.1", "port": router_port, "reload_poll_s": 0,
                   "shutdown_grace_s": 1},
        "auth": {"api_keys": [{"id": "bench", "user": "bench",
                               "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}]},
        "providers": {"up": {"type": "openai", "probe": False, "max_connections": 4096,
                             "base_url": f"http://127.0.0.1:{upstream_port}/v1"}},
        "routes": backends,
        "health": {"enabled": False},
        "logging": {"level": "warning", "access_log": False},
    }


def _post(port: int, model: str, timeout: float = 5.0) -> tuple[int, bytes]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    req = urllib.request.Request(f"http://127.0.0.1:{port}{CHAT_PATH}", data=body.encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def _start_router(procs: Processes, machine: Machine, tmp: Path, upstream_port: int
                  ) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = _free_port()
    config = tmp / "router.yaml"
    config.write_text(yaml.safe_dump(_router_config(upstream_port, port)))
    log = tmp / "router.log"
    with log.open("wb") as err:
        proc = procs.start(machine.on(ROUTER_CPU, [sys.executable, "-m", "router", "serve",
                                                   "--config", str(config), "--port",
                                                   str(port)]),
                           stdout=err, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            status, body = _post(port, "bench-fast", timeout=2)
        except OSError as exc:
            last = str(exc)
            time.sleep(0.1)
            continue
        if status == 200:
            return proc, port, log
        last = f"HTTP {status}: {body[:300]!r}"
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the router did not answer ({last}); its log:\n{tail}")


# -- measurements -------------------------------------------------------------------------------

def _client(procs: Processes, machine: Machine, mode: str, port: int, *extra: str,
            timeout: float) -> dict[str, object]:
    argv = machine.on(LOAD_CPU, [sys.executable, "-m", "tests.bench.client", mode, "--port",
                                 str(port), "--key", KEY, *extra])
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


_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def _wrk_script(tmp: Path) -> Path:
    body = json.dumps({"model": "bench-fast", "stream": False,
                       "messages": [{"role": "user", "content": "Say hello."}]})
    script = tmp / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                      'wrk.headers["Content-Type"] = "application/json"\n'
                      f'wrk.headers["Authorization"] = "Bearer {KEY}"\n')
    return script


def _throughput(procs: Processes, machine: Machine, tmp: Path, port: int, plan: Plan,
                duration: float) -> Throughput:
    if machine.wrk is None:
        r = _client(procs, machine, "closed", port, "--connections", str(plan.connections),
                    "--duration", str(duration), timeout=duration + 60)
        failures = int(r["non200"]) + int(r["errors"])  # type: ignore[call-overload]
        return Throughput(float(r["rps"]), failures, "python client")  # type: ignore[arg-type]
    argv = machine.on(LOAD_CPU, [machine.wrk, "-t1", f"-c{plan.connections}",
                                 f"-d{max(1, round(duration))}s", "-s",
                                 str(_wrk_script(tmp)), f"http://127.0.0.1:{port}{CHAT_PATH}"])
    proc = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=duration + 60)
    text = out.decode(errors="replace")
    rps = _WRK_RPS.search(text)
    if rps is None:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{text}")
    non2xx = _WRK_NON2XX.search(text)
    failures = int(non2xx.group(1)) if non2xx else 0
    sock = _WRK_SOCKET.search(text)
    if sock is not None:
        failures += sum(int(x) for x in sock.groups())
    return Throughput(float(rps.group(1)), failures, "wrk")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_times(cpu: int) -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of one CPU, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            v = [int(x) for x in line.split()[1:]]
            idle = v[3] + v[4]
            steal = v[7] if len(v) > 7 else 0
            total = sum(v[:8])
            return total - idle - steal, steal, total
    return 0, 0, 1


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Held:
    ready: int
    open_at_ready: int
    ramp_s: float
    rss_idle: float
    rss_open: float
    rss_after: float


def _hold_streams(procs: Processes, machine: Machine, port: int, router_pid: int,
                  count: int) -> Held:
    rss_idle = _rss_mb(router_pid)
    argv = machine.on(LOAD_CPU, [sys.executable, "-m", "tests.bench.client", "hold", "--port",
                                 str(port), "--key", KEY, "--stream", "--model", "bench-hold",
                                 "--count", str(count), "--max-hold", "60"])
    proc = procs.start(argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    line = _read_line(proc, 90).split()
    time.sleep(0.5)  # let the router settle after the ramp
    rss_open = _rss_mb(router_pid)
    assert proc.stdin is not None
    proc.stdin.write(b"\n")
    proc.stdin.flush()
    out, _ = proc.communicate(timeout=30)
    result = json.loads(out.decode().strip().splitlines()[-1])
    time.sleep(1.0)
    return Held(ready=int(line[1]), open_at_ready=int(line[2]), ramp_s=float(result["ramp_s"]),
                rss_idle=rss_idle, rss_open=rss_open, rss_after=_rss_mb(router_pid))


def _profile(procs: Processes, machine: Machine, tmp: Path, port: int, router_pid: int,
             plan: Plan) -> list[tuple[str, float, float]] | str:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return "py-spy is not installed (`pip install py-spy`)"
    out = tmp / "profile.txt"
    seconds = max(2, round(plan.duration))
    sampler = procs.start(machine.on(LOAD_CPU, [spy, "record", "--pid", str(router_pid),
                                                "--duration", str(seconds), "--rate", "250",
                                                "--format", "raw", "--nonblocking",
                                                "--output", str(out)]),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    _throughput(procs, machine, tmp, port, plan, seconds + 1)
    try:
        _, err = sampler.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        sampler.kill()
        return "py-spy did not finish"
    if sampler.returncode != 0 or not out.exists():
        return f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}"
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for row in out.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        samples += n
        own[_frame(frames[-1])] += n
        for name in {_frame(f) for f in frames}:
            total[name] += n
    if samples == 0:
        return "py-spy recorded no samples"
    return [(name, 100 * n / samples, 100 * total[name] / samples)
            for name, n in own.most_common(10)]


def _frame(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`: lines merged, paths shortened."""
    match = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if match is None:
        return frame
    path = match.group(2)
    for marker in ("site-packages/", "/work/main/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = "/".join(path.rsplit("/", 2)[-2:])
    return f"{match.group(1)} ({path})"


# -- report -------------------------------------------------------------------------------------

def _ms(x: float) -> str:
    return f"{x:.2f} ms"


def _mark(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def _latency(r: dict[str, object], key: str) -> dict[str, float]:
    return r[key]  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> int:
    plan = _parse(sys.argv[1:] if argv is None else argv)
    notes: list[str] = []
    _raise_nofile(max(8192, plan.streams * 4 + 1024))
    pinned = bool(shutil.which("taskset")) and len(os.sched_getaffinity(0)) >= 2
    if not pinned:
        notes.append("not pinned (needs taskset and 2 CPUs): figures mix router and load")
    else:
        os.sched_setaffinity(0, {LOAD_CPU})  # this orchestrator stays off the router's CPU
    machine = Machine(pinned=pinned, wrk=_ensure_wrk(notes), notes=notes)
    started = time.monotonic()
    rows: list[tuple[str, str, str, str, str]] = []
    profile: list[tuple[str, float, float]] | str | None = None
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmpdir, _processes() as procs:
        tmp = Path(tmpdir)
        try:
            upstream, up_port = _start_upstream(procs, machine)
            router, port, log = _start_router(procs, machine, tmp, up_port)
        except RuntimeError as exc:
            print(f"router bench: {exc}", file=sys.stderr)
            return 1
        d = plan.duration
        print(f"router bench: upstream :{up_port}, router :{port} (pid {router.pid}); "
              f"about {int(4 * d + 15 + (d + 3) * plan.profile)} s", file=sys.stderr, flush=True)

        _throughput(procs, machine, tmp, up_port, plan, 2)  # warm-up, not counted
        t_direct = _throughput(procs, machine, tmp, up_port, plan, d)
        _throughput(procs, machine, tmp, port, plan, 2)
        cpu_r, cpu_u = _cpu_seconds(router.pid), _cpu_seconds(upstream.pid)
        core0 = _cpu_times(ROUTER_CPU)
        t0 = time.monotonic()
        t_router = _throughput(procs, machine, tmp, port, plan, d)
        span = time.monotonic() - t0
        cpu_r = (_cpu_seconds(router.pid) - cpu_r) / span * 100
        cpu_u = (_cpu_seconds(upstream.pid) - cpu_u) / span * 100
        busy, steal, total = (b - a for a, b in zip(core0, _cpu_times(ROUTER_CPU), strict=True))
        rows.append((f"req/s, non-streamed, c={plan.connections} ({t_direct.detail})",
                     f"{t_direct.rps:,.0f}", f"{t_router.rps:,.0f}",
                     f"{t_router.rps / t_direct.rps:.3f}x",
                     f">= {TARGET_RPS:,.0f} {_mark(t_router.rps >= TARGET_RPS)}"))
        if t_direct.failures or t_router.failures:
            notes.append(f"throughput failures (non-2xx + socket errors): direct "
                         f"{t_direct.failures}, router {t_router.failures}")
        notes.append(f"CPU during router c={plan.connections}: router {cpu_r:.0f}%, "
                     f"upstream {cpu_u:.0f}% (100% = one core); CPU {ROUTER_CPU} busy "
                     f"{100 * busy / max(1, total):.0f}%, stolen by the host "
                     f"{100 * steal / max(1, total):.0f}%")
        others = 100 * busy / max(1, total) - cpu_r
        if others > 10:
            notes.append(f"other processes took ~{others:.0f}% of CPU {ROUTER_CPU} during the "
                         "router run: its req/s is low; run again on a quiet machine")

        extra = ["--rate", str(plan.rate), "--duration", str(d), "--warmup", "1"]
        o_direct = _client(procs, machine, "openloop", up_port, *extra, timeout=d + 60)
        o_router = _client(procs, machine, "openloop", port, *extra, timeout=d + 60)
        ld, lr = _latency(o_direct, "latency_ms"), _latency(o_router, "latency_ms")
        added50 = lr["p50"] - ld["p50"]
        rows.append((f"latency p50, open loop {plan.rate:.0f} req/s", _ms(ld["p50"]),
                     _ms(lr["p50"]), f"+{_ms(added50)}",
                     f"added <= {TARGET_ADDED_P50_MS:g} ms "
                     f"{_mark(added50 <= TARGET_ADDED_P50_MS)}"))
        rows.append((f"latency p99, open loop {plan.rate:.0f} req/s", _ms(ld["p99"]),
                     _ms(lr["p99"]), f"+{_ms(lr['p99'] - ld['p99'])}", "-"))
        for name, r in (("direct", o_direct), ("router", o_router)):
            if r["errors"] or r["late_sends"]:
                notes.append(f"open loop {name}: errors {r['errors']}, "
                             f"sends >5 ms late {r['late_sends']}")

        extra = ["--stream", "--model", "bench-stream", "--count", str(plan.ttfb_count)]
        s_direct = _client(procs, machine, "ttfb", up_port, *extra, timeout=120)
        s_router = _client(procs, machine, "ttfb", port, *extra, timeout=120)
        fd, fr = _latency(s_direct, "ttfb_ms"), _latency(s_router, "ttfb_ms")
        for p in ("p50", "p99"):
            rows.append((f"stream time to first chunk {p} (n={plan.ttfb_count})",
                         _ms(fd[p]), _ms(fr[p]), f"+{_ms(fr[p] - fd[p])}", "-"))
        if s_direct["errors"] or s_router["errors"]:
            notes.append(f"stream errors: direct {s_direct['errors']}, "
                         f"router {s_router['errors']}")

        held = _hold_streams(procs, machine, port, router.pid, plan.streams)
        rows.append(("router RSS, idle after the load above", "-", f"{held.rss_idle:.0f} MB",
                     "-", "-"))
        rows.append((f"router RSS, {plan.streams:,} open streams", "-",
                     f"{held.rss_open:.0f} MB",
                     f"+{held.rss_open - held.rss_idle:.0f} MB "
                     f"({(held.rss_open - held.rss_idle) * 1024 / max(1, held.ready):.0f} "
                     f"KB/stream)",
                     f"<= {TARGET_RSS_MB:g} MB {_mark(held.rss_open <= TARGET_RSS_MB)}"))
        notes.append(f"open streams: {held.ready}/{plan.streams} had their first chunk "
                     f"({held.open_at_ready} still open) after {held.ramp_s:.1f} s; "
                     f"router RSS after closing them: {held.rss_after:.0f} MB")

        if plan.profile:
            profile = _profile(procs, machine, tmp, port, router.pid, plan)
        if router.poll() is not None:
            notes.append(f"the router exited early (code {router.returncode}); log: {log}")

    print()
    print("| metric | direct | router | router vs direct | target |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    pinning = (f"router on CPU {ROUTER_CPU}; upstream, load generators on CPU {LOAD_CPU}"
               if pinned else "unpinned")
    print(f"- {pinning}; one router worker; upstream tests/bench/upstream.py (uvloop)")
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


if __name__ == "__main__":
    sys.exit(main())
