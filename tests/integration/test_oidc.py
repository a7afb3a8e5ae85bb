"""OAuth2 access tokens of an external OpenID Connect provider, through a real router.

Two providers on loopback: our own scriptable one (tests/fakes/idp.py: JWKS rotation, counted
fetches, introspection and userinfo failing on demand) and the real `oidc-provider-mock`, logged
into with the authorization-code flow.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import socket
import threading
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from router.auth.oidc import OidcClient
from router.config.model import IntrospectionConfig, OAuth2Config
from router.errors import IdpUnavailable, Unauthorized
from router.state import USAGE
from tests.conftest import (
    ADMIN_KEY,
    ADMIN_KEY_ENTRY,
    OTHER_KEY,
    USER_MSG,
    RouterUnderTest,
    router_config,
)
from tests.fakes.idp import AUDIENCE, CLIENT_ID, CLIENT_SECRET, FakeIdp, start_idp

SECRET = "router-jwt-secret-" + "x" * 32
ROUTES = {"m": {"backends": [{"provider": "mock", "model": "m1"}]}}
SETTINGS = "/api/v1/automation/settings"


def oidc_config(issuer: str, *, auth: dict[str, Any] | None = None,
                usage: dict[str, Any] | None = None, **oauth2: Any) -> dict[str, Any]:
    cfg = router_config({"mock": {"type": "mock", "chunks": 1}}, ROUTES,
                        **({} if usage is None else {"usage": usage}))
    cfg["auth"]["oauth2"] = {"issuer": issuer, "audience": AUDIENCE,
                             "required_scopes": ["chat"], **oauth2}
    cfg["auth"]["jwt"] = {"secret": SECRET}
    cfg["auth"].update(auth or {})
    return cfg


@pytest.fixture
async def idp() -> AsyncIterator[FakeIdp]:
    fake = await start_idp("RS256", "ES256")
    yield fake
    await fake.close()


async def chat(r: RouterUnderTest, token: str) -> tuple[int, dict[str, Any], Any]:
    async with r.chat({"model": "m", "messages": USER_MSG}, key=token) as resp:
        return resp.status, await resp.json(), resp.headers


async def ok(r: RouterUnderTest, token: str) -> None:
    status, body, _ = await chat(r, token)
    assert status == 200, body
    assert body["object"] == "chat.completion"


async def refused(r: RouterUnderTest, token: str, words: str, status: int = 401) -> Any:
    got, body, headers = await chat(r, token)
    assert got == status, body
    assert words in body["error"]["message"], body
    assert token not in json.dumps(body) and token not in str(headers)
    if status == 401:
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    return body, headers


def seg(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims_of(token: str) -> dict[str, Any]:
    payload: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return payload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def exchange(r: RouterUnderTest, token: str) -> str:
    async with r.http.post(f"{r.url}/api/v1/auth/token",
                           headers={"Authorization": f"Bearer {token}"}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    assert body["token_type"] == "Bearer" and body["expires_in"] > 0
    access: str = body["access_token"]
    return access


# --- JWT access tokens ---------------------------------------------------------------------

async def test_valid_tokens_of_either_key_type_reach_the_backend(idp, start_router):
    r = await start_router(oidc_config(idp.issuer))
    rsa_key, ec_key = idp.keys
    await ok(r, idp.token(key=rsa_key))
    await ok(r, idp.token(key=ec_key, scope=None, scp=["chat", "openid"]))
    assert idp.calls["jwks"] == 1  # the start-up fetch; warm verifies make no call


async def test_exchanged_for_a_router_jwt_with_the_same_user_and_scopes(idp, start_router):
    r = await start_router(oidc_config(idp.issuer))
    routed = await exchange(r, idp.token(sub="dana", scope="openid chat extra"))
    claims = claims_of(routed)
    assert claims["iss"] == "router" and claims["sub"] == f"oidc:{idp.issuer}#dana"
    assert claims["pid"] == f"oidc:{idp.issuer}#dana" and claims["via"] == "oauth2"
    assert claims["scope"] == "chat extra openid"
    assert "adm" not in claims
    await ok(r, routed)


@pytest.mark.parametrize(("overrides", "words"), [
    ({"exp_in": -120}, "expired"),
    ({"nbf": int(time.time()) + 600}, "not yet valid"),
    ({"iat": int(time.time()) + 600}, "not yet valid"),
    ({"exp_in": None}, "'exp'"),
    ({"aud": "someone-else"}, "audience"),
    ({"aud": AUDIENCE.upper()}, "audience"),
    ({"drop": ("aud",)}, "'aud'"),
    ({"drop": ("sub",)}, "'sub'"),
])
async def test_bad_claims_are_401(idp, start_router, overrides, words):
    r = await start_router(oidc_config(idp.issuer))
    await refused(r, idp.token(**overrides), words)


async def test_expiry_honours_the_leeway(idp, start_router):
    r = await start_router(oidc_config(idp.issuer, leeway_s=30))
    await ok(r, idp.token(exp_in=-25))
    await refused(r, idp.token(exp_in=-35), "expired")


@pytest.mark.parametrize("issuer", ["{}/", "{}/other", "UPPER", "missing"])
async def test_wrong_or_missing_issuer_is_401(idp, start_router, issuer):
    r = await start_router(oidc_config(idp.issuer))
    if issuer == "missing":
        token = idp.token(drop=("iss",))
    else:
        iss = idp.issuer.upper() if issuer == "UPPER" else issuer.format(idp.issuer)
        token = idp.token(iss=iss)
    await refused(r, token, "issuer")


async def test_missing_scope_is_403_insufficient_scope(idp, start_router):
    r = await start_router(oidc_config(idp.issuer, required_scopes=["chat", "openid"]))
    body, headers = await refused(r, idp.token(scope="openid"), "chat", status=403)
    assert body["error"]["code"] == "insufficient_scope"
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    await refused(r, idp.token(scope=None, scp=["openid"]), "chat", status=403)
    await ok(r, idp.token(scope=None, scp="openid chat"))


async def test_alg_none_and_unlisted_algorithms_are_401(idp, start_router):
    r = await start_router(oidc_config(idp.issuer, algorithms=["ES256"]))
    rsa_key, ec_key = idp.keys
    body = seg(claims_of(idp.token()))
    for alg in ("none", "None", "NONE"):
        await refused(r, f"{seg({'alg': alg, 'kid': rsa_key.kid})}.{body}.", "algorithm")
    # RS256 is a fine algorithm, but not one this issuer is pinned to.
    await refused(r, idp.token(key=rsa_key), "algorithm")
    await ok(r, idp.token(key=ec_key))


async def test_hs256_signed_with_the_rsa_public_key_is_401(idp, start_router):
    r = await start_router(oidc_config(idp.issuer))
    rsa_key = idp.keys[0]
    public = rsa_key.private.public_key()
    for secret in (public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
                   json.dumps(rsa_key.jwk()).encode()):
        head = seg({"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid})
        body = seg(claims_of(idp.token()))
        mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        sig = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        await refused(r, f"{head}.{body}.{sig}", "algorithm")


async def test_key_location_headers_are_never_followed(idp, start_router):
    connections = 0

    async def attacker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(attacker, "127.0.0.1", 0)
    evil = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/jwks.json"
    try:
        r = await start_router(oidc_config(idp.issuer))
        for header in ({"jku": evil}, {"x5u": evil}, {"jku": evil, "kid": "attacker"},
                       {"jwk": {"kty": "oct", "k": "c2VjcmV0"}}, {"x5c": ["MIIB"]}):
            await refused(r, idp.token(headers=header), "jku/x5u/x5c/jwk")
        await asyncio.sleep(0.05)
        assert connections == 0
        assert idp.calls["jwks"] <= 1  # at most the start-up fetch
    finally:
        server.close()
        await server.wait_closed()


async def test_garbage_kid_and_token_shapes_are_401(idp, start_router):
    r = await start_router(oidc_config(idp.issuer))
    good = idp.token()
    head, body, sig = good.split(".")
    kids: list[Any] = ["../../etc/passwd", "' OR 1=1 --", "k" * 4000, 7, ["a"], {"x": 1}, None]
    for kid in kids:
        token = f"{seg({'alg': 'RS256', 'kid': kid})}.{body}.{sig}"
        status, payload, _ = await chat(r, token)
        assert status == 401, payload
    for token in (f"{head}.{body}.{sig[:-4]}AAAA", f"{head}.{body}", f"{head}.!!!.{sig}",
                  f"{head}.{body}.{sig}.x", "x" * 8000):
        status, payload, _ = await chat(r, token)
        assert status in (400, 401), payload
    assert idp.calls["jwks"] <= 2  # one on-demand refetch at most


async def test_an_unknown_kid_storm_fetches_the_jwks_at_most_once(idp, start_router):
    r = await start_router(oidc_config(idp.issuer))
    await ok(r, idp.token())  # the start-up fetch is done
    assert idp.calls["jwks"] == 1
    _, body, sig = idp.token().split(".")
    tokens = [f"{seg({'alg': 'RS256', 'kid': secrets.token_hex(8)})}.{body}.{sig}"
              for _ in range(10_000)]
    auth = r.worker.ref.current.auth
    results = await asyncio.gather(*(auth.authenticate([f"Bearer {t}"]) for t in tokens),
                                   return_exceptions=True)
    assert all(isinstance(x, Unauthorized) and "unknown key" in x.message for x in results)
    # And over HTTP, concurrently, after the burst: still no further fetch.
    statuses = await asyncio.gather(*(chat(r, t) for t in tokens[:200]))
    assert {s for s, _, _ in statuses} == {401}
    assert idp.calls["jwks"] == 2
    await ok(r, idp.token())


@contextlib.asynccontextmanager
async def clocked_client(idp: FakeIdp, now: list[float], **oauth2: Any
                         ) -> AsyncIterator[OidcClient]:
    """The router's client of `idp`, started, on a clock the test moves (`now[0]`): windows and
    cache lifetimes pass without waiting for them."""
    client = OidcClient(OAuth2Config(issuer=idp.issuer, audience=AUDIENCE, **oauth2),
                        clock=lambda: now[0])
    client.start()
    try:
        yield client
    finally:
        await client.close()


async def test_the_refetch_window_reopens_after_jwks_min_refetch_s(idp):
    now = [1000.0]
    async with clocked_client(idp, now, jwks_min_refetch_s=1) as client:
        await client.jwt_claims(idp.token())  # joins the start-up fetch
        stranger = idp.token(headers={"kid": "stranger"})
        for _ in range(2):
            with pytest.raises(Unauthorized, match="unknown key"):
                await client.jwt_claims(stranger)
        assert idp.calls["jwks"] == 2
        now[0] += 1.05
        with pytest.raises(Unauthorized, match="unknown key"):
            await client.jwt_claims(stranger)
        assert idp.calls["jwks"] == 3


async def test_a_new_key_works_after_exactly_one_refetch(idp, start_router):
    r = await start_router(oidc_config(idp.issuer))
    await ok(r, idp.token())
    new = idp.add_key("RS256")
    await ok(r, idp.token(key=new))
    assert idp.calls["jwks"] == 2
    await ok(r, idp.token(key=new))
    assert idp.calls["jwks"] == 2


async def test_a_dropped_key_stops_working_after_the_next_fetch(idp, start_router):
    r = await start_router(oidc_config(idp.issuer))
    old = idp.keys[0]
    await ok(r, idp.token(key=old))
    idp.drop_key(old)
    new = idp.add_key("ES256")
    await ok(r, idp.token(key=old))  # cached until a fetch says otherwise
    await ok(r, idp.token(key=new))  # the refetch
    await refused(r, idp.token(key=old), "unknown key")


async def test_a_warm_cache_keeps_verifying_through_an_outage(idp, start_router):
    r = await start_router(oidc_config(idp.issuer))
    await ok(r, idp.token())
    idp.mode = "500"
    await ok(r, idp.token())
    await refused(r, idp.token(headers={"kid": "rotated"}), "unknown key")  # fetch failed
    await ok(r, idp.token(key=idp.keys[1]))
    idp.mode = "ok"


async def test_cold_start_with_the_idp_down_is_503_then_recovers(start_router, caplog):
    port = free_port()
    idp = FakeIdp(url=f"http://127.0.0.1:{port}")
    idp.add_key("RS256")
    r = await start_router(oidc_config(idp.issuer, jwks_min_refetch_s=1,
                                       discovery_refresh_s=10, required_scopes=["openid"]))
    token = idp.token()
    status, body, headers = await chat(r, token)
    assert status == 503, body
    assert body["error"]["code"] == "idp_unavailable"
    assert "identity provider" in body["error"]["message"]
    assert headers["Retry-After"] == "1"
    opaque = idp.opaque()
    status, body, headers = await chat(r, opaque)  # userinfo needs discovery: 503 too
    assert status == 503 and int(headers["Retry-After"]) >= 1, body
    await idp.start(port)
    try:
        for _ in range(50):  # the background retry runs every jwks_min_refetch_s
            if (status := (await chat(r, token))[0]) != 503:
                break
            await asyncio.sleep(0.1)
        assert status == 200
        await ok(r, opaque)
    finally:
        await idp.close()
    assert token not in caplog.text and opaque not in caplog.text


async def test_requests_racing_the_first_fetch_join_it(start_router):
    idp = FakeIdp(url=f"http://127.0.0.1:{free_port()}")
    idp.add_key("RS256")
    client = OidcClient(OAuth2Config(issuer=idp.issuer, audience=AUDIENCE))
    client.start()
    try:
        with pytest.raises(IdpUnavailable) as err:
            await client.jwt_claims(idp.token())  # joins the start-up fetch, which fails
        assert err.value.headers["Retry-After"] == "1"
        with pytest.raises(IdpUnavailable) as err:
            await client.jwt_claims(idp.token())  # the on-demand refetch, which fails too
        assert err.value.headers["Retry-After"] == "30"
    finally:
        await client.close()


async def test_admin_claim_maps_to_an_admin_principal(idp, start_router):
    r = await start_router(oidc_config(
        idp.issuer, auth={"admin_claim": {"claim": "groups", "value": "admins"}}))
    for groups, admin in ((["staff", "admins"], True), ("admins", True), (["staff"], False),
                          ("admins-not", False), (None, False)):
        routed = await exchange(r, idp.token(groups=groups))
        assert claims_of(routed).get("adm", False) is admin, groups


async def test_reload_keeps_the_client_while_oauth2_is_unchanged(idp, start_router):
    cfg = oidc_config(idp.issuer)
    r = await start_router(cfg)
    await ok(r, idp.token())
    client = r.worker.ref.current.oidc
    cfg["auth"]["default_limits"] = {"rpm": 12345}
    r.write_config(cfg)
    assert await r.worker.watcher.reload("test")
    assert r.worker.ref.current.oidc is client
    await ok(r, idp.token())
    assert idp.calls["jwks"] == 1 and idp.calls["discovery"] == 1
    cfg["auth"]["oauth2"]["leeway_s"] = 10
    r.write_config(cfg)
    assert await r.worker.watcher.reload("test")
    assert r.worker.ref.current.oidc is not client
    await ok(r, idp.token())
    assert idp.calls["discovery"] == 2


async def test_a_mapping_change_keeps_the_client(idp, start_router):
    cfg = oidc_config(idp.issuer)
    r = await start_router(cfg)
    client = r.worker.ref.current.oidc
    cfg["auth"]["oauth2"]["users"] = {"bob": "bob"}
    r.write_config(cfg)
    assert await r.worker.watcher.reload("test")
    assert r.worker.ref.current.oidc is client


# --- identities: an IdP subject is not the API-key user of the same name -------------------

async def api(r: RouterUnderTest, method: str, path: str, token: str,
              json: Any = None) -> tuple[int, Any]:
    async with r.http.request(method, r.url + path, json=json,
                              headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json(content_type=None)


async def with_session(r: RouterUnderTest, token: str, session: str) -> None:
    body = {"model": "m", "messages": USER_MSG, "session_id": session}
    async with r.chat(body, key=token) as resp:
        assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_an_idp_subject_is_not_the_api_key_user_with_the_same_name(idp, start_router,
                                                                          store, request):
    cfg = oidc_config(idp.issuer, usage={"enabled": True, "flush_interval_s": 60})
    if store == "redis":
        cfg["store"] = {"url": request.getfixturevalue("redis_server").url, "timeout_ms": 500}
    cfg["auth"]["api_keys"].append(ADMIN_KEY_ENTRY)
    r = await start_router(cfg)
    # bob by API key (OTHER_KEY): settings of his own and a session
    assert (await api(r, "PUT", SETTINGS, OTHER_KEY, {"session_ttl_s": 900}))[0] == 200
    await with_session(r, OTHER_KEY, "s1")
    # `sub: bob` at the IdP, directly and through a router JWT minted from it
    token = idp.token(sub="bob")
    routed = await exchange(r, token)
    for who in (token, routed):
        assert (await api(r, "GET", "/api/v1/sessions/s1", who))[0] == 404
        assert (await api(r, "DELETE", "/api/v1/sessions/s1", who))[0] == 404
        assert (await api(r, "GET", SETTINGS, who))[1]["session_ttl_s"] != 900
    assert claims_of(routed)["sub"] == f"oidc:{idp.issuer}#bob"
    assert (await api(r, "PUT", SETTINGS, token, {"session_ttl_s": 1200}))[0] == 200
    assert (await api(r, "GET", SETTINGS, routed))[1]["session_ttl_s"] == 1200
    assert (await api(r, "GET", SETTINGS, OTHER_KEY))[1]["session_ttl_s"] == 900
    assert (await api(r, "GET", "/api/v1/sessions/s1", OTHER_KEY))[0] == 200
    # The usage report tells them apart.
    await ok(r, token)
    await r.worker.app[USAGE].flush()
    status, doc = await api(r, "GET", "/api/v1/admin/usage", ADMIN_KEY)
    assert status == 200, doc
    users = {row["principal"]: row["user"] for row in doc["principals"]}
    assert users == {"narrow": "bob",
                     f"oidc:{idp.issuer}#bob": f"oidc:{idp.issuer}#bob"}


async def test_a_mapped_subject_is_that_router_user(idp, start_router):
    r = await start_router(oidc_config(idp.issuer, users={"00u-bob-42": "bob"}))
    assert (await api(r, "PUT", SETTINGS, OTHER_KEY, {"session_ttl_s": 900}))[0] == 200
    await with_session(r, OTHER_KEY, "s1")
    mapped = idp.token(sub="00u-bob-42")
    routed = await exchange(r, mapped)
    assert claims_of(routed)["sub"] == "bob"
    assert claims_of(routed)["pid"] == f"oidc:{idp.issuer}#00u-bob-42"  # its own limits
    for who in (mapped, routed):
        assert (await api(r, "GET", SETTINGS, who))[1]["session_ttl_s"] == 900
        assert (await api(r, "GET", "/api/v1/sessions/s1", who))[0] == 200
    unmapped = idp.token(sub="bob")  # the mapping is by subject only
    assert (await api(r, "GET", "/api/v1/sessions/s1", unmapped))[0] == 404
    assert (await api(r, "DELETE", "/api/v1/sessions/s1", mapped))[0] == 204
    assert (await api(r, "GET", "/api/v1/sessions/s1", OTHER_KEY))[0] == 404


# --- opaque access tokens ------------------------------------------------------------------

def introspecting(idp: FakeIdp, secret: str = CLIENT_SECRET, **oauth2: Any) -> dict[str, Any]:
    return oidc_config(idp.issuer, introspection={
        "url": f"{idp.url}/introspect", "client_id": CLIENT_ID, "client_secret": secret},
        **oauth2)


async def test_introspection_active_token_is_cached(idp, start_router):
    r = await start_router(introspecting(idp))
    token = idp.opaque(sub="carol", groups=["x"])
    routed = await exchange(r, token)
    assert claims_of(routed)["pid"] == f"oidc:{idp.issuer}#carol"
    await ok(r, token)
    await ok(r, token)
    assert idp.calls["introspect"] == 1
    assert idp.calls["userinfo"] == 0


async def test_introspection_inactive_or_unknown_is_401(idp, start_router):
    r = await start_router(introspecting(idp))
    await refused(r, "opq_never_issued_" + "z" * 20, "not active")
    await refused(r, idp.opaque(scope="openid"), "chat", status=403)
    await refused(r, idp.opaque(token_type="refresh_token"), "not an access token")
    await refused(r, idp.opaque(iss="https://elsewhere.example"), "issuer")


async def test_introspection_failures_are_503_not_401(idp, start_router, caplog):
    r = await start_router(introspecting(idp, timeout_s=0.3))
    token = idp.opaque()
    for mode in ("500", "slow"):
        idp.mode = mode
        started = time.monotonic()
        status, body, headers = await chat(r, token)
        assert status == 503, body
        assert body["error"]["code"] == "idp_unavailable"
        assert int(headers["Retry-After"]) >= 1
        assert time.monotonic() - started < 2
    idp.mode = "ok"
    await ok(r, token)  # failures were not cached
    assert token not in caplog.text


async def test_introspection_with_refused_client_credentials_is_503(idp, start_router):
    r = await start_router(introspecting(idp, secret="wrong"))
    status, body, _ = await chat(r, idp.opaque())
    assert status == 503, body


async def test_opaque_cache_lives_until_token_exp_at_most_the_ttl(idp):
    now = [1000.0]
    introspection = IntrospectionConfig(url=f"{idp.url}/introspect", client_id=CLIENT_ID,
                                        client_secret=CLIENT_SECRET)
    token = idp.opaque()
    async with clocked_client(idp, now, introspection=introspection,
                              cache_ttl_s=0.3) as client:
        await client.opaque_claims(token)
        await client.opaque_claims(token)
        assert idp.calls["introspect"] == 1
        now[0] += 0.35
        await client.opaque_claims(token)
        assert idp.calls["introspect"] == 2
    async with clocked_client(idp, now, introspection=introspection,
                              cache_ttl_s=300) as client:
        # Whole seconds: at most 3 s left, so the entry lives at most 3 s on the clock.
        short = idp.opaque(exp=int(time.time()) + 3)
        await client.opaque_claims(short)
        await client.opaque_claims(short)
        assert idp.calls["introspect"] == 3
        now[0] += 3.05
        await client.opaque_claims(short)  # still a live token, but the cache entry has lapsed
        assert idp.calls["introspect"] == 4


async def test_concurrent_requests_with_one_new_opaque_token_share_one_call(idp, start_router):
    r = await start_router(introspecting(idp))
    idp.mode, idp.slow_s = "slow", 0.2
    token = idp.opaque()
    statuses = await asyncio.gather(*(chat(r, token) for _ in range(20)))
    assert {s for s, _, _ in statuses} == {200}
    assert idp.calls["introspect"] == 1


async def test_userinfo_verifies_opaque_tokens_without_introspection(idp, start_router):
    r = await start_router(oidc_config(idp.issuer, required_scopes=["openid"]))
    token = idp.opaque(sub="erin")
    assert claims_of(await exchange(r, token))["pid"] == f"oidc:{idp.issuer}#erin"
    await ok(r, token)
    assert idp.calls["userinfo"] == 1
    await refused(r, "opq_unknown_" + "q" * 20, "rejected")
    idp.mode = "500"
    status, body, headers = await chat(r, idp.opaque())
    assert status == 503 and "Retry-After" in headers, body
    idp.mode = "ok"


async def test_userinfo_proves_only_the_openid_scope(idp, start_router):
    r = await start_router(oidc_config(idp.issuer, required_scopes=["chat"]))
    await refused(r, idp.opaque(), "chat", status=403)


async def test_opaque_tokens_are_refused_when_neither_path_is_configured(idp, start_router):
    r = await start_router(oidc_config(idp.issuer, userinfo=False))
    await refused(r, idp.opaque(), "unrecognised credential")
    assert idp.calls["userinfo"] == 0 and idp.calls["introspect"] == 0


# --- the real provider: oidc-provider-mock ---------------------------------------------------

@pytest.fixture
async def oidc_provider_mock(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """`oidc-provider-mock` (a Flask app) served by werkzeug in a thread on a free port."""
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")  # plain http on loopback
    monkeypatch.setattr(logging.getLogger("werkzeug"), "level", logging.ERROR)
    with warnings.catch_warnings():
        import authlib.deprecate  # noqa: F401 - its import installs an "always" filter
        warnings.simplefilter("ignore", DeprecationWarning)  # authlib.jose, at import
        import oidc_provider_mock
        import werkzeug.serving
    server = werkzeug.serving.make_server("127.0.0.1", 0, oidc_provider_mock.app(),
                                          threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    await asyncio.to_thread(server.shutdown)
    server.server_close()
    thread.join(2)


async def login(http: aiohttp.ClientSession, issuer: str, sub: str) -> dict[str, Any]:
    """The authorization-code flow as a browser and a client would drive it."""
    async with http.get(f"{issuer}/.well-known/openid-configuration") as resp:
        meta = await resp.json()
    callback = "http://127.0.0.1:9/callback"  # never followed: the code is read off the redirect
    state = secrets.token_urlsafe(8)
    params = {"client_id": "router-test", "redirect_uri": callback, "response_type": "code",
              "scope": "openid email profile", "state": state, "nonce": "n-1"}
    async with http.get(meta["authorization_endpoint"], params=params) as resp:
        assert resp.status == 200
        assert 'name="sub"' in await resp.text()  # the login form
    async with http.post(meta["authorization_endpoint"], params=params, data={"sub": sub},
                         allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        location = urlparse(resp.headers["Location"])
    query = parse_qs(location.query)
    assert f"{location.scheme}://{location.netloc}{location.path}" == callback
    assert query["state"] == [state]
    form = {"grant_type": "authorization_code", "code": query["code"][0],
            "redirect_uri": callback}
    async with http.post(meta["token_endpoint"], data=form, headers={
            "Authorization": aiohttp.encode_basic_auth("router-test", "s3cret")}) as resp:
        tokens: dict[str, Any] = await resp.json()
        assert resp.status == 200, tokens
    return tokens


@pytest.mark.filterwarnings("ignore:get_jwt_config:DeprecationWarning")
async def test_oidc_provider_mock_login_then_router_and_router_jwt(oidc_provider_mock,
                                                                 start_router):
    issuer = oidc_provider_mock
    r = await start_router(oidc_config(issuer, required_scopes=["openid"]))
    tokens = await login(r.http, issuer, "alice@example.com")
    assert tokens["token_type"] == "Bearer"
    access = tokens["access_token"]
    assert access.count(".") != 2  # its access tokens are opaque: checked through userinfo
    await ok(r, access)

    routed = await exchange(r, access)
    claims = claims_of(routed)
    assert claims["sub"] == claims["pid"] == f"oidc:{issuer}#alice@example.com"
    assert "openid" in claims["scope"].split()
    await ok(r, routed)

    # Its ID token is a JWT whose signature verifies against the provider's JWKS, but it is
    # addressed to the client, not to this API: refused as an access token.
    id_token = tokens["id_token"]
    assert claims_of(id_token)["iss"] == issuer
    await refused(r, id_token, "audience")
    await refused(r, tokens["refresh_token"], "rejected")
