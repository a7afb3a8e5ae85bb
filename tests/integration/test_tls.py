"""TLS on both sides, with real servers on loopback and a throwaway CA (tests/tls.py):

- the store on `rediss://` (redis-server with TLS only): the limiter's scripts (RespLink) and
  managed keys (redis-py) through it, and a server the configured CA does not vouch for;
- https upstreams through both upstream clients: answers byte for byte as over http, the
  provider's `ca_file`, SSL_CERT_FILE, and an untrusted certificate failing cleanly.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from pydantic import ValidationError
from redis.asyncio import Redis

import router.upstream
from router.config.model import OpenAIProviderConfig, StoreConfig
from router.store.connect import StoreUrl, connect, parse_store_url
from router.store.redis import limit_keys
from router.upstream import AiohttpUpstream, UpstreamClient
from router.upstream_lean import LeanUpstream
from tests.conftest import ADMIN_KEY, ADMIN_KEY_ENTRY, KEY, USER_MSG, Fake, router_config
from tests.fakes.openai_upstream import start_fake
from tests.tls import Pki, TlsRedisServer, make_pki, start_redis_tls

CLIENTS = ["lean", "aiohttp"]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def other_pki(tmp_path: Path) -> Pki:
    """An unrelated CA (and a certificate of its own, unused)."""
    return make_pki(tmp_path / "other-pki", "Unrelated")


@pytest.fixture
def redis_tls(tmp_path: Path, pki: Pki) -> Iterator[TlsRedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    server = start_redis_tls(tmp_path / "redis-tls", pki)
    yield server
    server.stop()


@pytest.fixture
async def tls_fakes(pki: Pki) -> AsyncIterator[Any]:
    """Start fakes speaking HTTPS with `pki`'s server certificate."""
    runners: list[web.AppRunner] = []
    ctx = await asyncio.to_thread(pki.server_context)

    async def start(name: str = "fake") -> Fake:
        runner, url, recorder = await start_fake(name, ssl_context=ctx)
        runners.append(runner)
        return Fake(name, url, recorder)

    yield start
    for runner in runners:
        await runner.cleanup()


# --- the store over TLS ----------------------------------------------------------------------

def tls_config(store_url: str, **store: Any) -> dict[str, Any]:
    """A mock backend, a key with rpm=2, an admin key, the store at `store_url`."""
    config = router_config({"mock": {"type": "mock"}},
                           {"m": {"backends": [{"provider": "mock", "model": "m1"}]}},
                           store={"url": store_url, **store})
    config["auth"]["api_keys"][0]["limits"] = {"rpm": 2}
    config["auth"]["api_keys"].append(
        ADMIN_KEY_ENTRY)
    return config


async def chat(r: Any, key: str = KEY) -> tuple[int, Any]:
    async with r.chat({"model": "m", "messages": USER_MSG}, key=key) as resp:
        return resp.status, await resp.json()


def test_rediss_url_takes_tls_parameters_and_nothing_else() -> None:
    assert parse_store_url("rediss://h:6380/0?ssl_ca_certs=/etc/ca%20x.pem") == StoreUrl(
        "redis", True, tls_options=(("ssl_ca_certs", "/etc/ca x.pem"),))
    assert parse_store_url(
        "rediss+cluster://h:7000?ssl_cert_reqs=required&ssl_check_hostname=false"
        "&ssl_certfile=/c.pem&ssl_keyfile=/k.pem").tls_options == (
        ("ssl_cert_reqs", "required"), ("ssl_certfile", "/c.pem"),
        ("ssl_check_hostname", False), ("ssl_keyfile", "/k.pem"))
    sentinel = parse_store_url("rediss+sentinel://h/svc?sentinel_password=sp&ssl_ca_certs=/ca")
    assert sentinel.sentinel_password == "sp"
    assert sentinel.tls_options == (("ssl_ca_certs", "/ca"),)
    for url in ("rediss://h?ssl_ca_cert=/ca",  # a typo: refused at load, not on every call
                "rediss://:secret@h?bogus=1", "redis://h?ssl_ca_certs=/ca",
                "redis+cluster://h:1?ssl_ca_certs=/ca", "rediss://h?ssl_cert_reqs=maybe",
                "rediss://h?ssl_check_hostname=perhaps", "rediss://h?ssl_ca_certs=",
                "rediss+sentinel://h/s?ssl_keyfile"):
        with pytest.raises(ValidationError) as exc:
            StoreConfig(url=url)
        assert "secret" not in exc.value.errors()[0]["msg"]
    with pytest.raises(ValidationError, match="need a rediss scheme"):
        StoreConfig(url="redis://h?ssl_ca_certs=/ca")


async def test_sentinel_and_cluster_clients_get_the_tls_options() -> None:
    """Not tested against TLS sentinels or clusters: the options reach every connection."""
    query = "?ssl_ca_certs=/ca.pem&ssl_check_hostname=false"
    client = connect("rediss+sentinel://h/svc" + query, timeout_s=1.0)
    try:
        pool = client.redis.connection_pool
        sentinels = pool.sentinel_manager.sentinels  # type: ignore[attr-defined]
        for kwargs in (pool.connection_kwargs, sentinels[0].connection_pool.connection_kwargs):
            assert kwargs["ssl_ca_certs"] == "/ca.pem" and kwargs["ssl_check_hostname"] is False
    finally:
        await client.aclose()
    client = connect("rediss+cluster://h:7000" + query, timeout_s=1.0)
    try:
        kwargs = client.redis.connection_kwargs  # type: ignore[attr-defined]
        assert kwargs["ssl_ca_certs"] == "/ca.pem" and kwargs["ssl_check_hostname"] is False
    finally:
        await client.aclose()


async def test_limits_and_managed_keys_on_a_rediss_store(start_router: Any,
                                                        redis_tls: Any) -> None:
    # A generous timeout: the first calls load the CA and shake hands on a loaded box.
    r = await start_router(tls_config(redis_tls.url, on_failure="closed", timeout_ms=5000))
    assert [(await chat(r))[0] for _ in range(3)] == [200, 200, 429]
    link = r.worker.store._link  # the limiter's scripts went over the lean link, on TLS
    assert link is not None and link.connected
    assert link._transport.get_extra_info("ssl_object") is not None

    # The limiter's keys are in that Redis, read back over TLS by redis-py.
    redis = Redis.from_url(redis_tls.url, decode_responses=True)
    try:
        assert await redis.exists(limit_keys("test")[0]) == 1
    finally:
        await redis.aclose()

    # Managed keys (redis-py's pool, not the script link) through the same store.
    async with r.http.post(f"{r.url}/api/v1/admin/keys", json={"user": "dora"},
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        assert resp.status == 201, await resp.text()
        made = await resp.json()
    status, body = await chat(r, made["key"])
    assert status == 200, body


@pytest.mark.parametrize("on_failure", ["closed", "open"])
async def test_a_rediss_server_the_ca_does_not_vouch_for_fails_cleanly(
        start_router: Any, redis_tls: Any, other_pki: Any, on_failure: str) -> None:
    url = redis_tls.url.replace(quote(str(redis_tls.pki.ca)), quote(str(other_pki.ca)))
    assert url != redis_tls.url
    r = await start_router(tls_config(url, on_failure=on_failure, timeout_ms=5000))
    status, body = await chat(r)
    if on_failure == "open":
        assert status == 200, body
        assert body["choices"][0]["message"]["content"]
    else:
        assert status == 503
        assert set(body) == {"error"}
        assert body["error"]["code"] == "store_unavailable"
        assert "Traceback" not in str(body)
    # Managed keys the router never saw cannot be checked either way: 503, not a 401 or 500.
    status, body = await chat(r, "sk-" + "x" * 43)
    assert status == 503 and body["error"]["code"] == "store_unavailable"


# --- https upstreams -------------------------------------------------------------------------

async def raw(r: Any, model: str, stream: bool) -> tuple[int, str, bytes]:
    async with r.chat({"model": model, "messages": USER_MSG, "stream": stream}) as resp:
        return resp.status, resp.content_type, await resp.read()


@pytest.mark.parametrize("client", CLIENTS)
async def test_https_upstream_answers_byte_for_byte_as_http(
        fakes: Any, tls_fakes: Any, start_router: Any, pki: Pki, client: str) -> None:
    plain, secure = await fakes("up"), await tls_fakes("up")
    assert secure.base_url.startswith("https://127.0.0.1:")
    r = await start_router(router_config(
        {"plain": {"type": "openai", "base_url": plain.base_url},
         "secure": {"type": "openai", "base_url": secure.base_url, "ca_file": str(pki.ca)}},
        {"http": {"backends": [{"provider": "plain", "model": "chunks:7"}]},
         "https": {"backends": [{"provider": "secure", "model": "chunks:7"}]},
         # ~0.5 MB of stream: past the lean client's read buffer, so reading pauses
         "http-big": {"backends": [{"provider": "plain", "model": "chunks:3000"}]},
         "https-big": {"backends": [{"provider": "secure", "model": "chunks:3000"}]}},
        server={"upstream_client": client}))
    # The second round reuses the connections.
    for route, stream in [("", False), ("", True), ("", False), ("", True), ("-big", True)]:
        over_http = await raw(r, "http" + route, stream)
        over_https = await raw(r, "https" + route, stream)
        assert over_http[0] == 200, over_http
        assert over_https == over_http
        if stream:
            assert over_https[1] == "text/event-stream"
            assert over_https[2].rstrip().endswith(b"data: [DONE]")
        else:
            assert over_https[1] == "application/json"
    assert len(over_https[2]) > 256 * 1024
    assert len(secure.seen) == len(plain.seen) == 5


@pytest.mark.parametrize("client", CLIENTS)
async def test_an_untrusted_upstream_certificate_fails_cleanly(
        tls_fakes: Any, start_router: Any, other_pki: Pki, client: str) -> None:
    secure = await tls_fakes("up")
    # Neither the system's CAs (no ca_file) nor an unrelated CA vouch for the fake.
    for provider in ({"type": "openai", "base_url": secure.base_url},
                     {"type": "openai", "base_url": secure.base_url,
                      "ca_file": str(other_pki.ca)}):
        r = await start_router(router_config(
            {"up": provider},
            {"m": {"backends": [{"provider": "up", "model": "gpt-x"}], "retries": 0}},
            server={"upstream_client": client}))
        async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
            assert resp.status in (502, 503)
            assert resp.content_type == "application/json"
            body = await resp.json()
        assert set(body) == {"error"}
        assert body["error"]["code"] == "backend_unavailable"
        assert body["error"]["message"] == "the upstream's TLS certificate is not trusted"
        assert "Traceback" not in str(body)
        assert r.worker.states["up/gpt-x"].consecutive_failures == 1
    assert secure.seen == []  # no request got through the handshake


async def test_lean_client_honours_ssl_cert_file(tls_fakes: Any, start_router: Any, pki: Pki,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ca_file the lean client trusts what OpenSSL trusts, SSL_CERT_FILE included
    (read when the first https connection is made; aiohttp reads it at import)."""
    secure = await tls_fakes("up")
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    monkeypatch.setattr(router.upstream, "_TLS", {})  # this process's default context: anew
    r = await start_router(router_config(
        {"up": {"type": "openai", "base_url": secure.base_url}},
        {"m": {"backends": [{"provider": "up", "model": "gpt-x"}]}}))
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("client", CLIENTS)
async def test_probe_over_https(tls_fakes: Any, pki: Pki, other_pki: Pki, client: str) -> None:
    secure = await tls_fakes("up")
    upstream: UpstreamClient = (LeanUpstream if client == "lean" else AiohttpUpstream)(
        max_connections=4, max_per_host=4)
    try:
        url = f"{secure.base_url}/models"
        assert await upstream.get_status(url, {}, 10.0, str(pki.ca)) == 200
        assert await upstream.get_status(url, {}, 10.0, str(other_pki.ca)) == 0
        assert await upstream.get_status(url, {}, 10.0, str(pki.ca) + ".missing") == 0
    finally:
        await upstream.close()


def test_ca_file_needs_an_https_base_url() -> None:
    assert OpenAIProviderConfig(type="openai", base_url="https://h/v1", ca_file="/ca.pem")
    with pytest.raises(ValidationError, match="https"):
        OpenAIProviderConfig(type="openai", base_url="http://h/v1", ca_file="/ca.pem")
