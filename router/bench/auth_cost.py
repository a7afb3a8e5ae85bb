"""`--auth`: what each credential type adds per request once warm."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from router.bench.harness import (
    KEY,
    LOAD_CPU,
    ROUTER_CPU,
    WRK_NON2XX,
    WRK_REQUESTS,
    WRK_RPS,
    WRK_SOCKET,
    Machine,
    Processes,
    cpu_seconds,
    mark,
    median,
)
from router.bench.plan import Plan
from router.bench.redis_server import free_port

AUTH_ALGORITHMS = ("HS256", "RS256", "ES256", "EdDSA")
TARGET_AUTH_US = {"API key": 30.0, "HS256": 30.0, "RS256": 150.0}
MODELS_PATH = "/v1/models"


@dataclass
class AuthRouter:
    alg: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    token: str = ""

    def auth_totals(self) -> tuple[int, float]:
        """(calls, thread CPU seconds) spent in authenticate so far (auth_router.py)."""
        before = self.log.read_text(errors="replace").count("AUTHSTATS")
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines()
                     if ln.startswith("AUTHSTATS")]
            if len(lines) > before:
                _, calls, seconds = lines[-1].split()
                return int(calls), float(seconds)
            time.sleep(0.02)
        raise RuntimeError(f"the {self.alg} auth router printed no AUTHSTATS")


@dataclass
class AuthSample:
    rps: float
    cpu_us: float  # router CPU time per request
    auth_us: float  # thread CPU time inside Authenticator.authenticate per call
    busy: float  # router CPU share during the phase (1.0 = one core)
    failures: int


def _auth_jwt_section(alg: str, tmp: Path) -> dict[str, object]:
    if alg == "HS256":
        return {"algorithm": "HS256", "secret": "bench-" + "s" * 40}
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    priv, pub = tmp / f"jwt-{alg}.key", tmp / f"jwt-{alg}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return {"algorithm": alg, "private_key_file": str(priv), "public_key_file": str(pub)}


def _http(port: int, method: str, path: str, token: str, timeout: float = 2.0
          ) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=b"" if method == "POST" else None,
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def _start_auth_router(procs: Processes, machine: Machine, tmp: Path, alg: str) -> AuthRouter:
    from router.bench.auth_router import BYPASS

    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "reload_poll_s": 0,
                   "shutdown_grace_s": 1, "drain_delay_s": 0},
        "auth": {"api_keys": [{"id": "bench", "user": "bench",
                               "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
                 "jwt": _auth_jwt_section(alg, tmp)},
        "providers": {"mock": {"type": "mock"}},
        "routes": {"bench-fast": {"backends": [{"provider": "mock", "model": "m"}]}},
        "health": {"enabled": False},
        "logging": {"level": "warning", "access_log": False},
    }
    path = tmp / f"router-auth-{alg}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp / f"router-auth-{alg}.log"
    with log.open("wb") as err:
        proc = procs.start(machine.on(ROUTER_CPU, [sys.executable, "-m",
                                                   "router.bench.auth_router", "--config",
                                                   str(path), "--port", str(port)]),
                           stdout=err, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if _http(port, "GET", MODELS_PATH, BYPASS)[0] == 200:
                return AuthRouter(alg, proc, port, log)
        except OSError:
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the {alg} auth router did not answer; its log:\n{tail}")


def _wrk_get(procs: Processes, machine: Machine, plan: Plan, router: AuthRouter, token: str,
             seconds: float) -> AuthSample:
    assert machine.wrk is not None
    argv = machine.on(LOAD_CPU, [machine.wrk, "-t1", f"-c{plan.connections}",
                                 f"-d{max(1, round(seconds))}s",
                                 "-H", f"Authorization: Bearer {token}",
                                 f"http://127.0.0.1:{router.port}{MODELS_PATH}"])
    calls0, auth0 = router.auth_totals()
    cpu0, t0 = cpu_seconds(router.proc.pid), time.monotonic()
    proc = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=seconds + 60)
    cpu, span = cpu_seconds(router.proc.pid) - cpu0, time.monotonic() - t0
    calls1, auth1 = router.auth_totals()
    text = out.decode(errors="replace")
    rps, count = WRK_RPS.search(text), WRK_REQUESTS.search(text)
    if rps is None or count is None:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{text}")
    non2xx = WRK_NON2XX.search(text)
    failures = int(non2xx.group(1)) if non2xx else 0
    sock = WRK_SOCKET.search(text)
    if sock is not None:
        failures += sum(int(x) for x in sock.groups())
    return AuthSample(rps=float(rps.group(1)), cpu_us=cpu * 1e6 / max(1, int(count.group(1))),
                      auth_us=(auth1 - auth0) * 1e6 / max(1, calls1 - calls0),
                      busy=cpu / span, failures=failures)


def run(procs: Processes, machine: Machine, tmp: Path, plan: Plan,
        notes: list[str]) -> list[tuple[str, ...]]:
    """Per-request cost of each credential type once warm: GET /v1/models (no upstream) on a
    router holding that credential, against the same process with authentication skipped.

    One router per JWT algorithm (a router signs with one); all on the router's CPU, measured
    one at a time, the variants interleaved over the rounds so drift hits all of them alike.
    """
    from router.bench.auth_router import BYPASS

    if machine.wrk is None:
        notes.append("auth costs skipped: they need wrk")
        return []
    routers = [_start_auth_router(procs, machine, tmp, alg) for alg in AUTH_ALGORITHMS]
    for r in routers:  # the router signs its own token, as a client would get it
        status, body = _http(r.port, "POST", "/api/v1/auth/token", KEY)
        if status != 200:
            raise RuntimeError(f"{r.alg} token exchange answered {status}: {body[:200]!r}")
        r.token = json.loads(body)["access_token"]
    variants: list[tuple[str, AuthRouter, str]] = []
    for r in routers:
        variants.append((f"none ({r.alg} router)", r, BYPASS))
        if r.alg == "HS256":
            variants.append(("API key", r, KEY))
        variants.append((f"{r.alg} router JWT", r, r.token))
    for label, r, token in variants:
        status, body = _http(r.port, "GET", MODELS_PATH, token)
        if status != 200:
            raise RuntimeError(f"{label}: GET {MODELS_PATH} answered {status}: {body[:200]!r}")
    seconds = plan.auth_phase_s
    print(f"router bench: auth costs, {len(variants)} variants x {plan.auth_rounds} rounds x "
          f"{seconds:.0f} s", file=sys.stderr, flush=True)
    for _, r, token in variants:  # warm-up: caches, branch predictors, pydantic, key objects
        _wrk_get(procs, machine, plan, r, token, 1)
    samples: dict[str, list[AuthSample]] = {label: [] for label, _, _ in variants}
    for n in range(plan.auth_rounds):
        order = variants if n % 2 == 0 else variants[::-1]
        for label, r, token in order:
            samples[label].append(_wrk_get(procs, machine, plan, r, token, seconds))

    rows: list[tuple[str, ...]] = []
    failures = {label: sum(s.failures for s in ss) for label, ss in samples.items()}
    low_busy = min(s.busy for ss in samples.values() for s in ss)
    for label, r, _ in variants:
        base, mine = samples[f"none ({r.alg} router)"], samples[label]
        auth_us = median([s.auth_us for s in mine])
        if label.startswith("none"):
            if r.alg == "HS256":
                rows.append(("none (baseline)", f"{median([s.rps for s in mine]):,.0f}", "-",
                             "-", "-", f"{auth_us:.1f} µs", "-"))
            continue
        rps_b, rps_c = median([s.rps for s in base]), median([s.rps for s in mine])
        added = 1e6 / rps_c - 1e6 / rps_b
        added_cpu = median([s.cpu_us for s in mine]) - median([s.cpu_us for s in base])
        key = "API key" if label == "API key" else r.alg
        target = TARGET_AUTH_US.get(key)
        worst = max(added, added_cpu)
        verdict = f"< {target:g} µs {mark(worst < target)}" if target else "-"
        rows.append((label, f"{rps_b:,.0f}", f"{rps_c:,.0f}", f"{added:+.1f} µs",
                     f"{added_cpu:+.1f} µs", f"{auth_us:.1f} µs", verdict))
    for label, count in failures.items():
        if count:
            notes.append(f"auth costs: {label} had {count} failed requests (non-2xx/socket)")
    if low_busy < 0.9:
        idle = sorted({label for label, ss in samples.items() if min(s.busy for s in ss) < 0.9})
        notes.append(f"auth costs: the router's CPU was as low as {100 * low_busy:.0f}% busy "
                     f"({', '.join(idle)}): req/s was not CPU-bound there, the load generator "
                     "or a neighbour was; the CPU µs column does not depend on it")
    base_rps = [median([s.rps for s in samples[f"none ({r.alg} router)"]]) for r in routers]
    noise = max((max(s.rps for s in ss) - min(s.rps for s in ss)) / median([s.rps for s in ss])
                for ss in samples.values())
    spread = (f"; the widest round-to-round spread of one variant is {100 * noise:.1f}% "
              f"(~{noise * 1e6 / median(base_rps):.1f} µs/req at the baseline rate)"
              if plan.auth_rounds > 1 else "")
    notes.append(f"auth costs: baselines of the {len(routers)} routers span "
                 f"{min(base_rps):,.0f}-{max(base_rps):,.0f} req/s{spread}; `in authenticate()` "
                 "is thread CPU per call inside the router (the baseline's is the bench hook)")
    for r in routers:
        if r.proc.poll() is not None:
            notes.append(f"the {r.alg} auth router exited early (code {r.proc.returncode})")
    return rows
