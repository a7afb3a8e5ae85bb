"""Fixtures: real servers on loopback. Fake upstreams, and the router's own Worker on port 0."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

import router.store.redis  # noqa: F401 - reads its Lua files at import: before any event loop
from router.config import load_config
from router.server import Worker
from router.state import ACCESS_LOG
from tests.fakes import anthropic_upstream
from tests.fakes.gemini_upstream import start_gemini
from tests.fakes.openai_upstream import Recorder, start_fake
from tests.redis_server import RedisServer, start_redis

# The real servers the suite runs against. Elsewhere their tests are skipped when one is missing;
# under CI (`make test` installs them) a missing one fails the run instead of hiding tests.
REQUIRED_TOOLS = ("redis-server", "prometheus", "promtool", "haproxy")


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing and os.environ.get("CI"):
        raise pytest.UsageError(f"CI is set but not installed: {', '.join(missing)} (the "
                                "tests that need them would be skipped; make test installs them)")


KEY = "sk-test-" + "k" * 40
KEY_SHA = hashlib.sha256(KEY.encode()).hexdigest()
OTHER_KEY = "sk-test-" + "o" * 40
ADMIN_KEY = "sk-test-" + "a" * 40
# The admin key's entry for `auth.api_keys` (router_config's keys are not admins).
ADMIN_KEY_ENTRY = {"id": "root", "key_sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),
                   "user": "root", "admin": True}
USER_MSG = [{"role": "user", "content": "hello there"}]


@dataclass
class Fake:
    name: str
    base_url: str
    recorder: Recorder

    @property
    def seen(self) -> list[Any]:
        return self.recorder.seen


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[..., Awaitable[Fake]]]:
    runners: list[web.AppRunner] = []

    async def start(name: str = "fake") -> Fake:
        runner, url, recorder = await start_fake(name)
        runners.append(runner)
        return Fake(name, url, recorder)

    yield start
    for runner in runners:
        await runner.cleanup()


ANTHROPIC_KEY = "sk-ant-test-0123456789abcdef"
GEMINI_KEY = "AIza-test-gemini-key-0123456789"


@pytest.fixture
async def claude_fakes() -> AsyncIterator[Callable[..., Awaitable[Fake]]]:
    """`await claude_fakes(name)`: a fake Anthropic Messages API on a free port."""
    runners: list[web.AppRunner] = []

    async def start(name: str = "claude") -> Fake:
        runner, url, recorder = await anthropic_upstream.start_fake()
        runners.append(runner)
        return Fake(name, url, recorder)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def gemini_fakes() -> AsyncIterator[Callable[..., Awaitable[Fake]]]:
    """`await gemini_fakes(name)`: a fake Gemini API on a free port."""
    runners: list[web.AppRunner] = []

    async def start(name: str = "gem") -> Fake:
        runner, url, recorder = await start_gemini()
        runners.append(runner)
        return Fake(name, url, recorder)

    yield start
    for runner in runners:
        await runner.cleanup()


def anthropic_provider(fake: Fake, **extra: Any) -> dict[str, Any]:
    return {"type": "anthropic", "base_url": fake.base_url, "api_key": ANTHROPIC_KEY, **extra}


def gemini_provider(fake: Fake, **extra: Any) -> dict[str, Any]:
    return {"type": "gemini", "base_url": fake.base_url, "api_key": GEMINI_KEY,
            "probe": False, **extra}


def router_config(providers: dict[str, Any], routes: dict[str, Any],
                  **extra: Any) -> dict[str, Any]:
    """A test config: loopback, port 0, one test key, probes and file watching off."""
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 5, "reload_poll_s": 0,
                   "drain_delay_s": 0},
        "auth": {"api_keys": [
            {"id": "test", "key_sha256": KEY_SHA, "user": "alice"},
            {"id": "narrow", "key_sha256": hashlib.sha256(OTHER_KEY.encode()).hexdigest(),
             "user": "bob", "models": [next(iter(routes))]},
        ]},
        "providers": providers,
        "routes": routes,
        "health": {"enabled": False},
        "logging": {"level": "warning", "format": "text"},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@dataclass
class RouterUnderTest:
    worker: Worker
    url: str
    path: Path
    http: aiohttp.ClientSession

    def chat(self, body: dict[str, Any], *, key: str | None = KEY,
             headers: dict[str, str] | None = None,
             prefix: str = "/api/v1") -> Any:
        """POST a chat completion; use as `async with r.chat(...) as resp`."""
        hdrs = dict(headers or {})
        if key is not None:
            hdrs["Authorization"] = f"Bearer {key}"
        return self.http.post(f"{self.url}{prefix}/chat/completions", json=body, headers=hdrs)

    def access_log(self, *, json: bool = True) -> Callable[[], list[Any]]:
        """From now on, the router's access-log lines whatever its `logging.level`: a call
        returns those written so far, parsed (JSON objects, or text lines)."""
        log = self.worker.app[ACCESS_LOG]
        written: list[bytes] = []
        log.enabled, log.json, log.out = True, json, written.append

        def lines() -> list[Any]:
            log.flush()
            raw = b"".join(written).decode().splitlines()
            return [orjson.loads(line) for line in raw] if json else raw
        return lines

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        self.path.write_text(text)


@pytest.fixture
async def start_router(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RouterUnderTest]]]:
    started: list[RouterUnderTest] = []

    async def start(config: dict[str, Any]) -> RouterUnderTest:
        path = tmp_path / f"router-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        worker = Worker(str(path), await asyncio.to_thread(load_config, path))
        port = await worker.start()
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        rut = RouterUnderTest(worker, f"http://127.0.0.1:{port}", path, http)
        started.append(rut)
        return rut

    yield start
    for rut in started:
        await rut.http.close()
        if rut.worker.site is not None:
            await rut.worker.stop()


ROUTED_BODY_CAP = 256 * 1024  # `routed`'s server.max_body_bytes: room for 100k-deep nesting


@pytest.fixture
async def routed(fakes: Any, start_router: Any) -> tuple[RouterUnderTest, Fake]:
    """A router with one route `m` in front of one fake upstream, and the admin key (for the
    admin endpoints' bodies); yields (router, fake)."""
    up = await fakes("up")
    config = router_config({"up": openai_provider(up)},
                           {"m": {"backends": [{"provider": "up", "model": "gpt-x"}]}},
                           server={"max_body_bytes": ROUTED_BODY_CAP})
    config["auth"]["api_keys"].append(ADMIN_KEY_ENTRY)
    return await start_router(config), up


def openai_provider(fake: Fake, **extra: Any) -> dict[str, Any]:
    return {"type": "openai", "base_url": fake.base_url, **extra}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh `redis-server` on a free loopback port for this test (no persistence)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_blocking_calls_in_the_router() -> Any:
    """A blocking call made by router code on the event loop fails the test (as aiohttp does
    in its own suite). Only the `router` package is scanned: test helpers may block, and so may
    `router.bench` (the benchmark's process helpers, which the tests use to run redis-server)."""
    from blockbuster import blockbuster_ctx

    with blockbuster_ctx("router", excluded_modules=["router.bench"]) as bb:
        yield bb


async def eventually(check: Callable[[], Any], within_s: float = 5.0,
                     what: str = "the condition", every_s: float = 0.02) -> Any:
    """Poll `check()` (a value, or an awaitable of one) until it is truthy and return that
    value; the test fails once `within_s` has passed without it."""
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within_s} s")
        await asyncio.sleep(every_s)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sse_events(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE event in a body; comments (keep-alives) left out."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block or block.startswith(":"):
            continue
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data.append(line.removeprefix("data: "))
        out.append((name, "\n".join(data)))
    return out
