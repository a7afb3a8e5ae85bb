"""Redis killed and restarted under mixed traffic: once `/readyz` answers 200 again, every store
path answers (managed keys created and used for the first time, automation settings read and
written, sessions read, chats with limits and sessions), with the default `store.timeout_ms`.

redis-py's pool holds connections that died with the old Redis; each must be noticed before it
is used, or its command tried once more on a fresh connection, never answered with a 503. The
same for connections reset on the way (a proxy), and a key lookup that times out once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from router.auth.api_keys import digest, new_key
from router.store import StoreError
from router.store.redis import RedisStore
from tests.conftest import (
    ADMIN_KEY,
    ADMIN_KEY_ENTRY,
    KEY,
    USER_MSG,
    RouterUnderTest,
    bearer,
    eventually,
    router_config,
)
from tests.integration.test_store_redis import record
from tests.redis_cluster import cli, spawn, start_cluster, wait_until
from tests.redis_server import RedisServer, start_redis

ROUTES = {"fast": {"backends": [{"provider": "mock", "model": "m1"}]}}
SETTINGS = "/api/v1/automation/settings"
FIRST_USES = 40  # concurrent first uses of new managed keys (and as many settings reads)
READY_WITHIN_S = 10.0


def config(store_url: str) -> dict[str, Any]:
    # `closed`: a store failure is a 503 (no local fallback hides it), and /readyz asks Redis.
    # store.timeout_ms is left at its default: the defaults must hold these bursts.
    cfg = router_config({"mock": {"type": "mock"}}, ROUTES,
                        store={"url": store_url, "on_failure": "closed"})
    cfg["auth"]["api_keys"].append(ADMIN_KEY_ENTRY)
    cfg["auth"]["default_limits"] = {"rpm": 100_000, "tpm": 100_000_000}  # every chat admits
    return cfg


async def call(r: RouterUnderTest, method: str, path: str, key: str = KEY,
               body: Any = None) -> int:
    async with r.http.request(method, r.url + path, json=body, headers=bearer(key)) as resp:
        await resp.read()
        return resp.status


async def chat(r: RouterUnderTest, key: str = KEY, session: str | None = None) -> int:
    body: dict[str, Any] = {"model": "fast", "messages": USER_MSG}
    if session is not None:
        body["session_id"] = session
    return await call(r, "POST", "/v1/chat/completions", key, body)


async def create_key(r: RouterUnderTest, user: str) -> tuple[int, str]:
    async with r.http.post(r.url + "/api/v1/admin/keys", json={"user": user},
                           headers=bearer(ADMIN_KEY)) as resp:
        doc = await resp.json()
        return resp.status, doc.get("key", "")


def mixed(r: RouterUnderTest, n: int) -> list[Any]:
    """One of each kind of store path, `n` times over (the answers that are not 503 are all
    expected ones: a session may be gone with the old Redis's data)."""
    calls: list[Any] = []
    for i in range(n):
        calls += [chat(r), chat(r, session=f"s{i}"), call(r, "GET", SETTINGS),
                  call(r, "PUT", SETTINGS, body={"session_ttl_s": 60 + i}),
                  call(r, "GET", f"/api/v1/sessions/s{i}")]
    return calls


async def test_every_store_path_recovers_after_a_redis_restart(
        start_router: Any, redis_server: RedisServer) -> None:
    r = await start_router(config(redis_server.url))
    # Warm: the pool opens as many connections as a busy router would hold.
    warm = await asyncio.gather(*mixed(r, 12), *(call(r, "GET", SETTINGS) for _ in range(40)))
    assert set(warm) <= {200, 404}, Counter(warm)

    log: list[tuple[float, str, int]] = []  # (started, what, status) of the steady traffic
    stop = asyncio.Event()

    async def steady() -> None:
        i = 0
        while not stop.is_set():
            session = f"t{i % 5}"
            for what, request in (("chat", chat(r)),
                                  ("session chat", chat(r, session=session)),
                                  ("settings", call(r, "GET", SETTINGS)),
                                  ("session", call(r, "GET", f"/api/v1/sessions/{session}"))):
                started = time.monotonic()
                log.append((started, what, await request))
            i += 1
            await asyncio.sleep(0.01)

    traffic = asyncio.create_task(steady())
    try:
        await asyncio.sleep(0.2)
        os.kill(redis_server.proc.pid, signal.SIGKILL)
        redis_server.proc.wait()
        await asyncio.sleep(0.3)  # traffic meets a dead Redis
        again = await asyncio.to_thread(start_redis, redis_server.workdir, redis_server.port)
        try:

            async def ready() -> bool:
                return await call(r, "GET", "/readyz") == 200

            await eventually(ready, READY_WITHIN_S, "/readyz 200 again")
            ready_at = time.monotonic()

            # Right after: new managed keys, then their first uses and as many settings reads,
            # all at once, then every other path at once.
            made = await asyncio.gather(*(create_key(r, f"u{i}") for i in range(FIRST_USES)))
            assert Counter(s for s, _ in made) == {201: FIRST_USES}, Counter(s for s, _ in made)
            burst = await asyncio.gather(*(chat(r, key) for _, key in made),
                                         *(call(r, "GET", SETTINGS) for _ in range(FIRST_USES)))
            assert Counter(burst) == {200: 2 * FIRST_USES}, Counter(burst)
            rest = await asyncio.gather(*mixed(r, 8))
            assert set(rest) <= {200, 404}, Counter(rest)
            await asyncio.sleep(0.2)
        finally:
            stop.set()
            await traffic
            again.stop()
    finally:
        if not traffic.done():
            traffic.cancel()
    after = [(what, status) for started, what, status in log if started >= ready_at]
    assert after, "no steady traffic after the restart"
    assert all(status in (200, 404) for _, status in after), Counter(after)


class ResettingProxy:
    """A loopback TCP proxy to Redis that can reset every connection through it at once (as a
    load balancer or a NAT on the way may): the client sees an RST, not an end of file, so a
    pool cannot tell such a connection is dead until it uses it."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self._links.append((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    def reset(self) -> None:
        links, self._links = self._links, []
        for client, upstream in links:
            sock = client.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.transport.abort()  # linger 0: an RST
            upstream.transport.abort()

    async def close(self) -> None:
        self.reset()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()


async def test_connections_reset_on_the_way_cost_one_more_try(redis_server: RedisServer) -> None:
    """Every pooled connection reset at once: each idempotent operation is tried once more on
    a fresh connection and succeeds; nothing answers StoreError."""
    proxy = ResettingProxy(redis_server.port)
    await proxy.start()
    store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", timeout_s=1.0)
    try:
        key = new_key()
        made = record(key)
        await store.create_key(made)
        await store.put_settings("ann", {"session_ttl_s": 60})
        reads = 16
        await asyncio.gather(*(store.get_settings("ann") for _ in range(reads)))  # a full pool
        for _ in range(2):  # twice: the connections the first round reopened are reset too
            proxy.reset()
            await asyncio.sleep(0.05)  # the resets have reached the client's sockets
            got = await asyncio.gather(
                *(store.key_by_digest(digest(key)) for _ in range(reads // 2)),
                *(store.get_settings("ann") for _ in range(reads // 2)),
                store.key_by_id(made.id),  # a minted token's key
                store.keys_version(), store.list_keys(), store.ping(),
                store.put_settings("ann", {"session_ttl_s": 90}),
                store.create_key(record(new_key())),
                return_exceptions=True)
            assert not [g for g in got if isinstance(g, BaseException)], got
            assert all(g == made for g in got[:reads // 2])
            assert got[-3] is True  # ping
    finally:
        await store.close()
        await proxy.close()


async def test_a_key_lookup_that_times_out_is_tried_once_more(tmp_path: Path) -> None:
    """Redis busy past the store timeout (DEBUG SLEEP): a key lookup tries once more and finds
    the key; a settings read (one try) fails within one timeout; a hung Redis costs a key lookup
    two timeouts, never more."""
    server = start_redis(tmp_path / "redis-debug", None, "--enable-debug-command", "yes")
    timeout_s = 0.3
    store = RedisStore(server.url, timeout_s=timeout_s)
    try:
        key = new_key()
        await store.create_key(record(key))
        async with Redis.from_url(server.url) as sleeper:
            await sleeper.ping()  # connected: the sleep below leaves at once
            busy = asyncio.create_task(sleeper.execute_command("DEBUG", "SLEEP", "0.4"))
            await asyncio.sleep(0.05)  # the sleep has reached Redis
            started = time.monotonic()
            found = await store.key_by_digest(digest(key))
            elapsed = time.monotonic() - started
            await busy
        assert found is not None and found.digest == digest(key)
        assert timeout_s < elapsed < 2 * timeout_s + 0.2, elapsed

        async with Redis.from_url(server.url) as sleeper:
            await sleeper.ping()
            busy = asyncio.create_task(sleeper.execute_command("DEBUG", "SLEEP", "0.4"))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.get_settings("ann")
            assert time.monotonic() - started < timeout_s + 0.2
            await busy

        os.kill(server.proc.pid, signal.SIGSTOP)  # hung: both tries time out
        try:
            started = time.monotonic()
            with pytest.raises(StoreError) as info:
                await store.key_by_digest(digest(key))
            elapsed = time.monotonic() - started
            assert "did not answer in time" in str(info.value)
            assert 2 * timeout_s - 0.05 < elapsed < 2 * timeout_s + 0.2, elapsed
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
    finally:
        await store.close()
        server.stop()


def cluster_ok(port: int) -> bool:
    return "cluster_state:ok" in cli(port, "CLUSTER", "INFO")


async def test_a_cluster_restart_costs_no_failed_call(tmp_path: Path) -> None:
    """Every node of a Redis Cluster killed and restarted (the slot map kept in nodes.conf, the
    data lost): redis-py's Cluster client has no check on checkout, so each idempotent call
    meets a dead connection first and must be tried once more."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    cluster = await asyncio.to_thread(start_cluster, tmp_path / "cluster")
    store = RedisStore(cluster.url, timeout_s=1.0)
    try:
        await store.ping()

        async def reads(n: int) -> list[Any]:
            return await asyncio.gather(*(store.key_by_digest(f"{i:064x}") for i in range(n)),
                                        *(store.get_settings(f"u{i}") for i in range(n)),
                                        return_exceptions=True)

        assert await reads(20) == [None] * 40  # the connections to every node are open
        for n, node in enumerate(cluster.servers):
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait()
            args = [str(a) for a in node.proc.args]  # type: ignore[union-attr]
            cluster.servers[n] = await asyncio.to_thread(
                spawn, node.workdir, node.port, *args[1:args.index("--port")])
        for node in cluster.servers:
            await asyncio.to_thread(wait_until, "cluster_state:ok",
                                    partial(cluster_ok, node.port))
        assert await reads(20) == [None] * 40
    finally:
        await store.close()
        cluster.stop()
