"""A real `redis-server` on a free loopback port, no persistence, stopped by its PID: the limits
benchmark's store, and the one the test suite runs against."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM this server (and only it), SIGKILL if it lingers."""
        if self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def ping(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: Path, port: int | None = None, *extra: str,
                launcher: Sequence[str] = ()) -> RedisServer:
    """Start redis-server and wait until it answers PING (a taken free port: try another).

    `port`: restart a server on the port it had (its clients reconnect to the same URL);
    `extra`: more server options (e.g. "--enable-debug-command", "yes"); `launcher`: what runs
    it (e.g. `taskset -c 1`)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian: `apt-get install "
                           "redis-server`; `make test` installs it as root)")
    workdir.mkdir(parents=True, exist_ok=True)
    for _ in range(1 if port else 3):
        listen = port or free_port()
        proc = subprocess.Popen(
            [*launcher, binary, "--port", str(listen), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--logfile",
             str(workdir / "redis.log"), "--daemonize", "no", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        server = RedisServer(proc, listen, workdir)
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if ping(listen):
                return server
            time.sleep(0.01)
        with contextlib.suppress(OSError):
            server.stop()
    raise RuntimeError(f"redis-server did not start:\n{server.log()[-2000:]}")
