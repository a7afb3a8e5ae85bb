"""Usage with several workers on one Redis: each flushes its own deltas and the report sums them;
the last ones are flushed on SIGTERM. The same run has metrics off: the supervisor gives its
workers no multiprocess directory."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from router.config.model import StoreConfig
from router.store import open_store
from router.store.base import HOUR_S
from router.store.redis import RedisStore  # (imported before any loop: it reads its scripts)
from tests.conftest import ADMIN_KEY, ADMIN_KEY_ENTRY, USER_MSG, eventually
from tests.e2e.test_lifecycle import AUTH, client, e2e_config
from tests.redis_server import RedisServer


async def test_workers_flush_their_own_usage(fakes, router_process, redis_server: RedisServer):
    up = await fakes("up")
    config = e2e_config(up, {"m": "gpt-x"})
    config["store"] = {"url": redis_server.url, "timeout_ms": 1000}
    config["usage"] = {"enabled": True, "flush_interval_s": 0.2}
    config["metrics"] = {"enabled": False}
    config["auth"]["api_keys"].append(
        ADMIN_KEY_ENTRY)
    rp = await router_process(config, "--workers", "2")
    await rp.wait_log(f"listening on http://127.0.0.1:{rp.port}", count=2)
    workers = rp.children()
    assert len(workers) == 2
    for pid in workers:
        environ = _environ(pid)
        assert not any(v.startswith(b"PROMETHEUS_MULTIPROC_DIR=") for v in environ)

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with client() as http:
        # Fresh connections spread over both workers (SO_REUSEPORT hashes each connection).
        for _ in range(20):
            async with http.post(f"{rp.url}/v1/chat/completions", headers={
                    **AUTH, "Connection": "close"}, json={"model": "m", "messages": USER_MSG}) \
                    as resp:
                assert resp.status == 200

        async def requests_counted() -> int:
            async with http.get(f"{rp.url}/api/v1/admin/usage",
                                headers={**admin, "Connection": "close"}) as resp:
                assert resp.status == 200
                rows = (await resp.json())["principals"]
            return sum(row["requests"] for row in rows if row["principal"] == "test")

        await eventually(lambda: _equals(requests_counted(), 20), 20, "20 requests reported")
        async with http.get(f"{rp.url}/metrics") as resp:
            assert resp.status == 404

        # Requests answered right before SIGTERM are flushed at shutdown.
        for _ in range(6):
            async with http.post(f"{rp.url}/v1/chat/completions", headers={
                    **AUTH, "Connection": "close"}, json={"model": "m", "messages": USER_MSG}) \
                    as resp:
                assert resp.status == 200
    rp.send(signal.SIGTERM)
    assert await rp.wait_exit(15) == 0
    store = open_store(StoreConfig(url=redis_server.url, timeout_ms=2000))
    assert isinstance(store, RedisStore)
    try:
        hour = int(time.time()) // HOUR_S
        counts = await store.usage(hour - 1, hour + 1)
    finally:
        await store.close()
    assert {c.principal: c.requests for c in counts} == {"test": 26}


async def _equals(value, want) -> bool:
    return await value == want


def _environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
