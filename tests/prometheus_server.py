"""A real Prometheus (Debian's `prometheus` package) on a free loopback port, for tests.

`async with running_prometheus(tmp_path, ["127.0.0.1:PORT"]) as prom:` writes a temp config that
scrapes the targets every second (job "router"), starts `prometheus` with its TSDB under
tmp_path, waits for /-/ready, and on exit stops that one process by its PID (SIGTERM, then
SIGKILL). `prom.query(expr)` runs an instant query through the HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
JOB = "router"
START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PromQLError(AssertionError):
    pass


@dataclass
class Prometheus:
    proc: asyncio.subprocess.Process
    url: str
    log_path: Path
    http: aiohttp.ClientSession

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def api(self, path: str, **params: Any) -> Any:
        async with self.http.get(f"{self.url}/api/v1/{path}", params=params) as resp:
            body = await resp.json()
        if body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at now; the result as a list of {metric, value} (vector or scalar)."""
        data = await self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    async def last_scrape(self) -> float:
        """Timestamp (s) of the job's latest successful scrape (the oldest over its targets),
        0 when none yet. timestamp() must take the selector itself: over any other expression it
        gives the evaluation time."""
        stamps = await self.query(f'timestamp(up{{job="{JOB}"}})')
        values = await self.query(f'up{{job="{JOB}"}}')
        if not stamps or any(float(r["value"][1]) != 1 for r in values):
            return 0.0
        return min(float(r["value"][1]) for r in stamps)

    async def wait_scrape_after(self, t: float, within_s: float = 10.0) -> float:
        """Wait until every target of the job was scraped successfully after wall time t."""
        deadline = time.monotonic() + within_s
        while True:
            scraped = await self.last_scrape()
            if scraped > t:
                return scraped
            if time.monotonic() > deadline:
                targets = await self.api("targets")
                raise AssertionError(f"no scrape after {t} within {within_s} s: {targets}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()


def write_config(path: Path, targets: Sequence[str], rule_files: Sequence[Path] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics",
                            "static_configs": [{"targets": list(targets)}]}],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@contextlib.asynccontextmanager
async def running_prometheus(workdir: Path, targets: Sequence[str], *,
                             rule_files: Sequence[Path] = ()) -> AsyncIterator[Prometheus]:
    if PROMETHEUS is None:
        raise RuntimeError("the prometheus binary is not installed")
    config_path = workdir / "prometheus.yml"
    write_config(config_path, targets, rule_files)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    prom: Prometheus | None = None
    try:
        for attempt in range(3):
            port = free_port()
            log_path = workdir / f"prometheus-{port}.log"
            with log_path.open("wb") as log_file:
                proc = await asyncio.create_subprocess_exec(
                    PROMETHEUS, f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / f'data-{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                    stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                    start_new_session=True)
            prom = Prometheus(proc, f"http://127.0.0.1:{port}", log_path, http)
            if await _until_ready(prom):
                break
            await prom.stop()
            if "address already in use" not in prom.log():
                raise AssertionError("prometheus did not become ready:\n" + prom.log()[-3000:])
        else:
            raise AssertionError("prometheus found no free port")
        yield prom
    finally:
        if prom is not None:
            await prom.stop()
        await http.close()


async def _until_ready(prom: Prometheus) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if prom.proc.returncode is not None:
            return False
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with prom.http.get(f"{prom.url}/-/ready") as resp:
                if resp.status == 200:
                    return True
        await asyncio.sleep(0.1)
    return False


async def promtool(*args: str, stdin: bytes | None = None) -> tuple[int, str]:
    """Run promtool; (exit code, stdout + stderr)."""
    if PROMTOOL is None:
        raise RuntimeError("the promtool binary is not installed")
    proc = await asyncio.create_subprocess_exec(
        PROMTOOL, *args, stdin=asyncio.subprocess.PIPE if stdin is not None else
        asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")
