"""`router serve` as a real subprocess on a free loopback port, from a temp YAML file.

Every process started here is ended by the fixture (SIGTERM, then SIGKILL to its own process
group, which holds only it and its workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0  # generous: a loaded 2-core machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RouterProcess:
    proc: asyncio.subprocess.Process
    port: int
    config_path: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def wait_log(self, needle: str, count: int = 1, within_s: float = 15.0) -> str:
        await eventually(lambda: self.log().count(needle) >= count, within_s,
                         f"{count} x {needle!r} in the router log")
        return self.log()

    def write_config(self, config: dict[str, Any] | str) -> None:
        """Replace the file atomically, as an editor or a config manager would."""
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, within_s: float) -> int:
        try:
            return await asyncio.wait_for(asyncio.shield(self.proc.wait()), within_s)
        except TimeoutError:
            state = process_state(self.pid)
            if state not in ("gone", "Z"):
                # Started with PYTHONFAULTHANDLER: SIGABRT writes every thread's stack to
                # the log, which says where the exit got stuck (a worker's, then its
                # supervisor's, which would otherwise not wait for them).
                for pid in [*self.children(), self.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGABRT)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.proc.wait()), 3.0)
            raise AssertionError(f"router did not exit within {within_s:.1f} s "
                                 f"(process state then: {state}):\n"
                                 + self.log()[-6000:]) from None

    def children(self) -> list[int]:
        return children_of(self.pid)


def process_state(pid: int) -> str:
    """The kernel's one-letter state of the process (R, S, D, Z, ...), or "gone"."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            out.append(int(entry.name))
    return sorted(out)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


StartRouter = Callable[..., Awaitable[RouterProcess]]


@pytest.fixture
async def router_process(tmp_path: Path) -> AsyncIterator[StartRouter]:
    """`await router_process(config, *args, env=..., ready=True, nofile=(soft, hard), port=N)`
    starts `router serve` (`nofile`: the open-files limits it starts with; `port`: this port,
    as a restarted replica takes its predecessor's, instead of a free one)."""
    started: list[RouterProcess] = []

    async def start(config: dict[str, Any] | str, *args: str, env: dict[str, str] | None = None,
                    ready: bool = True, nofile: tuple[int, int] | None = None,
                    port: int | None = None) -> RouterProcess:
        def limit_files() -> None:  # in the child, before exec
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        n = len(started)
        path = tmp_path / f"router-{n}.yaml"
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
        for _attempt in range(3 if port is None else 1):
            listen = free_port() if port is None else port
            log_path = tmp_path / f"router-{n}-{listen}.log"
            full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
                        **(env or {})}
            with log_path.open("wb") as log_file:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "router", "serve", "--config", str(path),
                    "--port", str(listen), *args,
                    stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                    cwd=ROOT, env=full_env, start_new_session=True,
                    preexec_fn=limit_files if nofile is not None else None)
            rp = RouterProcess(proc, listen, path, log_path)
            started.append(rp)
            if not ready:
                return rp
            if await _until_ready(rp):
                return rp
            if "in use" not in rp.log():  # lost a race for the port: try another
                break
        raise AssertionError("router did not become ready:\n" + rp.log()[-3000:])

    yield start
    for rp in started:
        if rp.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                rp.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rp.proc.wait(), 10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rp.pid, signal.SIGKILL)  # its own group: whatever of it is left
        await rp.proc.wait()
        # The worker exited anyway; the run's summary says so (pytest_terminal_summary).
        with contextlib.suppress(OSError):
            LEFT_BEHIND.extend(f"{rp.log_path.name}: {line[-500:]}"
                               for line in rp.log().splitlines()
                               if "did not end when cancelled" in line)


# Tasks a router named as not ending when cancelled after its drain, shown after the run.
LEFT_BEHIND: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if LEFT_BEHIND:
        terminalreporter.section("router tasks that did not end when cancelled")
        for line in LEFT_BEHIND:
            terminalreporter.write_line(line)


async def _until_ready(rp: RouterProcess) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if rp.proc.returncode is not None:
                return False
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(rp.url + "/readyz") as resp:
                    if resp.status == 200:
                        return True
            await asyncio.sleep(0.05)
    return False
