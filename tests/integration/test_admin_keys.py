"""Managed API keys end to end against a real redis-server: the admin API, the keys on the chat
path of two routers sharing one Redis (revocation on A is seen by B within a second),
`router keys` as a subprocess, and a store that is down or silent."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from router.store.redis import RedisStore, record_key
from tests.conftest import (
    ADMIN_KEY,
    ADMIN_KEY_ENTRY,
    KEY,
    USER_MSG,
    RouterUnderTest,
    bearer,
    router_config,
)
from tests.redis_server import RedisServer, free_port

ROUTES = {"fast": {"backends": [{"provider": "mock", "model": "m1"}]},
          "other": {"backends": [{"provider": "mock", "model": "m2"}]}}
KEYS = "/api/v1/admin/keys"
ROOT = Path(__file__).resolve().parents[2]


def config(store_url: str, **store: Any) -> dict[str, Any]:
    cfg = router_config({"mock": {"type": "mock"}}, ROUTES, store={"url": store_url, **store})
    cfg["auth"]["api_keys"].append(
        ADMIN_KEY_ENTRY)
    return cfg


async def create(r: RouterUnderTest, body: Any, key: str = ADMIN_KEY) -> tuple[int, Any]:
    async with r.http.post(f"{r.url}{KEYS}", json=body, headers=bearer(key)) as resp:
        return resp.status, await resp.json()


async def chat_status(r: RouterUnderTest, key: str, model: str = "fast") -> tuple[int, Any]:
    async with r.chat({"model": model, "messages": USER_MSG}, key=key) as resp:
        return resp.status, await resp.json()


async def listing(r: RouterUnderTest, key: str = ADMIN_KEY) -> tuple[int, str]:
    async with r.http.get(f"{r.url}{KEYS}", headers=bearer(key)) as resp:
        return resp.status, await resp.text()


async def revoke(r: RouterUnderTest, key_id: str, key: str = ADMIN_KEY) -> int:
    async with r.http.delete(f"{r.url}{KEYS}/{key_id}", headers=bearer(key)) as resp:
        return resp.status


async def wait_status(r: RouterUnderTest, key: str, status: int, within_s: float) -> float:
    """Seconds until a chat with `key` answers `status`; fails past `within_s`."""
    started = time.monotonic()
    while True:
        got, _ = await chat_status(r, key)
        elapsed = time.monotonic() - started
        if got == status:
            return elapsed
        assert elapsed < within_s, f"still {got} after {elapsed:.2f} s"
        await asyncio.sleep(0.02)


async def test_create_use_list_revoke_across_two_routers(start_router: Any,
                                                         redis_server: RedisServer) -> None:
    a = await start_router(config(redis_server.url))
    b = await start_router(config(redis_server.url))
    status, made = await create(a, {"user": "dora", "limits": {"rpm": 100}, "models": ["*"]})
    assert status == 201
    key, key_id = made["key"], made["id"]
    assert key.startswith("sk-") and len(key) >= 46
    assert made["user"] == "dora" and made["limits"] == {"rpm": 100}
    assert made["models"] == ["*"] and made["admin"] is False and made["expires_at"] is None

    for router in (a, b):  # B has never seen the key: it asks the store once
        status, body = await chat_status(router, key)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"]

    await a.worker.key_cache.flush()  # last-use times are written in the background
    status, text = await listing(a)
    assert status == 200
    assert "sk-" not in text and hashlib.sha256(key.encode()).hexdigest() not in text
    (row,) = [k for k in yaml.safe_load(text)["data"] if k["id"] == key_id]
    assert row["user"] == "dora" and row["limits"] == {"rpm": 100}
    assert row["created_at"].endswith("Z") and row["last_used_at"] is not None
    assert set(row) == {"id", "object", "user", "limits", "models", "admin", "created_at",
                        "last_used_at", "expires_at"}

    assert await revoke(a, key_id) == 204
    assert (await chat_status(a, key))[0] == 401  # the revoking router forgets at once
    assert await wait_status(b, key, 401, within_s=1.0) <= 1.0
    assert await revoke(a, key_id) == 404
    assert await revoke(b, "key_0123456789abcdef") == 404
    assert await revoke(b, "not-an-id") == 404


JWT_SECRET = "router-jwt-secret-" + "x" * 32


async def exchange(r: RouterUnderTest, key: str) -> str:
    async with r.http.post(f"{r.url}/api/v1/auth/token", headers=bearer(key)) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    token: str = body["access_token"]
    return token


async def test_a_token_minted_from_a_revoked_key_dies_on_every_router_within_a_second(
        start_router: Any, redis_server: RedisServer) -> None:
    cfg = config(redis_server.url)
    cfg["auth"]["jwt"] = {"secret": JWT_SECRET, "ttl_s": 3600}
    a = await start_router(cfg)
    b = await start_router(cfg)
    (_, doomed), (_, kept) = [await create(a, {"user": name}) for name in ("dora", "dan")]
    token_a, token_b = await exchange(a, doomed["key"]), await exchange(b, doomed["key"])
    other = await exchange(b, kept["key"])
    for router in (a, b):  # every token verified once: warm in every router's caches
        for token in (token_a, token_b, other):
            status, body = await chat_status(router, token)
            assert status == 200, body

    assert await revoke(a, doomed["id"]) == 204
    status, body = await chat_status(a, token_b)  # the revoking router forgets at once
    assert status == 401 and "revoked" in body["error"]["message"], body
    for token in (token_a, token_b):
        assert await wait_status(b, token, 401, within_s=1.0) <= 1.0
        assert (await chat_status(a, token))[0] == 401
    for router in (a, b):  # a token of another key is untouched
        assert (await chat_status(router, other))[0] == 200
        assert (await chat_status(router, kept["key"]))[0] == 200


async def test_only_admins_manage_keys(start_router: Any, redis_server: RedisServer) -> None:
    r = await start_router(config(redis_server.url))
    _, plain = await create(r, {"user": "eve"})
    _, boss = await create(r, {"user": "boss", "admin": True})
    for key in (KEY, plain["key"]):  # a YAML key and a managed key, neither admin
        status, body = await create(r, {"user": "mallory"}, key=key)
        assert status == 403 and body["error"]["code"] == "admin_required"
        assert (await listing(r, key))[0] == 403
        assert await revoke(r, plain["id"], key) == 403
    async with r.http.get(f"{r.url}{KEYS}") as resp:
        assert resp.status == 401
    status, text = await listing(r, boss["key"])  # a managed admin key may
    assert status == 200 and plain["id"] in text and "sk-" not in text
    status, body = await chat_status(r, plain["key"])
    assert status == 200, body


BAD_BODIES: list[tuple[bytes, list[Any]]] = [
    (b"{not json", ["body"]),
    (b"[1, 2]", ["body"]),
    (b"{}", ["body", "user"]),
    (b'{"user": ""}', ["body", "user"]),
    (b'{"user": 7}', ["body", "user"]),
    (b'{"user": "jwt:bob"}', ["body", "user"]),  # the namespace of directly issued tokens
    (b'{"user": "oidc:https://idp.example.com#bob"}', ["body", "user"]),
    (b'{"user": "u", "limits": {"rpm": 0}}', ["body", "limits", "rpm"]),
    (b'{"user": "u", "limits": {"rpm": "5"}}', ["body", "limits", "rpm"]),
    (b'{"user": "u", "limits": {"rps": 5}}', ["body", "limits", "rps"]),
    (b'{"user": "u", "limits": {"rpm": 5.5}}', ["body", "limits", "rpm"]),
    (b'{"user": "u", "limits": {"concurrency": 55372011245727924030013440}}',
     ["body", "limits", "concurrency"]),
    (b'{"user": "u", "limits": {"tpm": 5.5e25}}', ["body", "limits", "tpm"]),
    (b'{"user": "u", "models": []}', ["body", "models"]),
    (b'{"user": "u", "models": ["fast", "nope"]}', ["body", "models", 1]),
    (b'{"user": "u", "models": ["*", "fast"]}', ["body", "models", 0]),
    (b'{"user": "u", "expires_at": "tomorrow"}', ["body", "expires_at"]),
    (b'{"user": "u", "admin": "yes"}', ["body", "admin"]),
    (b'{"user": "u", "key": "sk-mine"}', ["body", "key"]),
]


async def test_bad_bodies_are_422(start_router: Any, redis_server: RedisServer) -> None:
    r = await start_router(config(redis_server.url))
    headers = {**bearer(ADMIN_KEY), "Content-Type": "application/json"}
    for body, loc in BAD_BODIES:
        async with r.http.post(f"{r.url}{KEYS}", data=body, headers=headers) as resp:
            assert resp.status == 422, body
            detail = (await resp.json())["detail"]
        assert loc in [d["loc"] for d in detail], (body, detail)
        assert all(set(d) == {"loc", "msg", "type"} for d in detail)
    status, text = await listing(r)
    assert status == 200 and '"data":[]' in text  # nothing was created


async def test_models_expiry_and_default_limits(start_router: Any,
                                                redis_server: RedisServer) -> None:
    r = await start_router(config(redis_server.url))
    status, narrow = await create(r, {"user": "fay", "models": ["fast"],
                                      "expires_at": "2999-01-01T00:00:00+01:00"})
    assert status == 201 and narrow["expires_at"] == "2998-12-31T23:00:00Z"
    assert (await chat_status(r, narrow["key"], "fast"))[0] == 200
    status, body = await chat_status(r, narrow["key"], "other")
    assert status == 403 and body["error"]["code"] == "model_not_allowed"

    # An expiry already past is accepted as written: the key exists and never authenticates.
    status, past = await create(r, {"user": "hal", "expires_at": "2001-01-01T00:00:00Z",
                                    "limits": {"rpm": 5.0}})
    assert status == 201 and past["expires_at"] == "2001-01-01T00:00:00Z"
    assert past["limits"]["rpm"] == 5  # a whole-number float is an integer
    status, body = await chat_status(r, past["key"])
    assert status == 401 and "expired" in body["error"]["message"]

    # A key whose expiry passes after it was made (written straight to the store).
    _, short = await create(r, {"user": "gus", "expires_at": "2999-01-01T00:00:00Z"})
    store = RedisStore(redis_server.url, timeout_s=1.0)
    await store._redis.hset(record_key(short["id"]), "expires_at", repr(time.time() - 1))
    await store.close()
    r.worker.key_cache.changed()
    status, body = await chat_status(r, short["key"])
    assert status == 401 and "expired" in body["error"]["message"]
    assert short["key"] not in str(body)


async def test_store_down_at_start(start_router: Any) -> None:
    """Nothing listens on the store's port: the router serves, static keys work, managed keys
    fail closed with 503 at once."""
    r = await start_router(config(f"redis://127.0.0.1:{free_port()}/0"))
    async with r.http.get(f"{r.url}/healthz") as resp:
        assert resp.status == 200
    async with r.http.get(f"{r.url}/readyz") as resp:
        assert resp.status == 200  # on_failure: open
    assert (await chat_status(r, KEY))[0] == 200
    managed_shape = "sk-" + "Z" * 43
    started = time.monotonic()
    status, body = await chat_status(r, managed_shape)
    assert status == 503 and body["error"]["code"] == "store_unavailable"
    assert time.monotonic() - started < 1.0
    assert (await chat_status(r, "sk-not-a-managed-key"))[0] == 401  # no lookup needed
    assert (await listing(r))[0] == 503
    assert (await create(r, {"user": "x"}))[0] == 503


async def test_silent_store_times_out(start_router: Any) -> None:
    """A store that accepts connections and never answers: 503 within the store timeout."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r = await start_router(config(f"redis://127.0.0.1:{port}/0", timeout_ms=100))
        for _ in range(3):
            started = time.monotonic()
            status, body = await chat_status(r, "sk-" + "Q" * 43)
            assert status == 503 and body["error"]["code"] == "store_unavailable"
            assert time.monotonic() - started < 0.6
        assert (await chat_status(r, KEY))[0] == 200
    finally:
        server.close()


async def test_redis_restart_mid_run(start_router: Any, redis_server: RedisServer,
                                     tmp_path: Path) -> None:
    """Cached keys keep working while Redis is away (on_failure: open), unknown ones get 503;
    after Redis returns (empty), the key is gone for good."""
    from tests.redis_server import start_redis

    r = await start_router(config(redis_server.url))
    _, made = await create(r, {"user": "hal"})
    assert (await chat_status(r, made["key"]))[0] == 200
    redis_server.stop()
    assert (await chat_status(r, made["key"]))[0] == 200
    assert (await chat_status(r, "sk-" + "R" * 43))[0] == 503
    again = start_redis(tmp_path / "redis2", port=redis_server.port)
    try:
        await wait_status(r, made["key"], 401, within_s=3.0)  # no persistence: version moved
    finally:
        again.stop()


def write_config(path: Path, cfg: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "keys", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_create_list_revoke(start_router: Any, redis_server: RedisServer,
                                      tmp_path: Path) -> None:
    r = await start_router(config(redis_server.url))
    path = write_config(tmp_path / "cli.yaml", config(redis_server.url))

    code, out, err = await cli("create", "--config", path, "--user", "ivy", "--models", "fast",
                               "--rpm", "30", "--concurrency", "2")
    assert code == 0, err
    key = out.strip()
    assert key.startswith("sk-") and "\n" not in key and key not in err
    assert (await chat_status(r, key))[0] == 200  # a running router takes it at once
    assert (await chat_status(r, key, "other"))[0] == 403

    code, out, err = await cli("list", "--config", path)
    assert code == 0, err
    assert "ivy" in out and "rpm=30" in out and "sk-" not in out
    code, out, _ = await cli("list", "--config", path, "--json")
    (row,) = yaml.safe_load(out)
    assert row["user"] == "ivy" and row["limits"] == {"rpm": 30, "concurrency": 2}
    assert hashlib.sha256(key.encode()).hexdigest() not in out

    code, out, err = await cli("revoke", "--config", path, row["id"])
    assert code == 0, err
    assert await wait_status(r, key, 401, within_s=1.0) <= 1.0
    code, _, err = await cli("revoke", "--config", path, row["id"])
    assert code == 1 and "no key" in err

    memory = write_config(tmp_path / "memory.yaml", config("memory://"))
    down = write_config(tmp_path / "down.yaml", config(f"redis://127.0.0.1:{free_port()}/0"))
    bad, in_memory, unreachable = await asyncio.gather(
        cli("create", "--config", path, "--user", "ivy", "--models", "fast", "--rpm", "0"),
        cli("list", "--config", memory),
        cli("create", "--config", down, "--user", "x"))
    assert bad[0] == 1 and "limits.rpm" in bad[2]
    assert in_memory[0] == 1 and "redis://" in in_memory[2]
    assert unreachable[0] == 1 and "store" in unreachable[2]
    assert all("Traceback" not in err for _, _, err in (bad, in_memory, unreachable))
