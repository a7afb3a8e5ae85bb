"""Credentials over HTTP: router JWTs of every algorithm through a real router, what a refusal
looks like on the wire, and the API-key -> router-JWT exchange at POST /api/v1/auth/token."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from router.config import ConfigError, load_config
from tests.conftest import ADMIN_KEY, ADMIN_KEY_ENTRY, KEY, OTHER_KEY, USER_MSG, router_config
from tests.unit.test_router_jwt import (
    ALGORITHMS,
    SECRET,
    b64,
    claims,
    hs256_raw,
    private_key,
    seg,
    write_pair,
)

LIMITED_KEY = "sk-test-" + "l" * 40
ROUTES = {"first": {"backends": [{"provider": "mock", "model": "m1"}]},
          "second": {"backends": [{"provider": "mock", "model": "m2"}]}}


def jwt_section(alg: str, tmp_path: Path, *, private: bool = True,
                **extra: Any) -> tuple[dict[str, Any], Any]:
    """An `auth.jwt` config section and the key that signs for it."""
    if alg == "HS256":
        return {"algorithm": "HS256", "secret": SECRET, **extra}, SECRET
    key, priv, pub = write_pair(tmp_path, alg)
    section = {"algorithm": alg, "public_key_file": str(pub), **extra}
    if private:
        section["private_key_file"] = str(priv)
    return section, key


def config(jwt_cfg: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    cfg = router_config({"mock": {"type": "mock"}}, ROUTES, **extra)
    cfg["auth"]["api_keys"] += [
        ADMIN_KEY_ENTRY,
        {"id": "limited", "key_sha256": hashlib.sha256(LIMITED_KEY.encode()).hexdigest(),
         "user": "carol", "limits": {"rpm": 1000, "concurrency": 3}},
    ]
    if jwt_cfg is not None:
        cfg["auth"]["jwt"] = jwt_cfg
    return cfg


async def start_jwt_router(start_router: Any, tmp_path: Path, alg: str = "HS256",
                           **extra: Any) -> tuple[Any, Any]:
    section, key = jwt_section(alg, tmp_path, **extra)
    return await start_router(config(section)), key


async def chat_status(r: Any, token: str | None, model: str = "first") -> int:
    async with r.chat({"model": model, "messages": USER_MSG}, key=token) as resp:
        return int(resp.status)


async def expect_401(r: Any, token: str, *words: str) -> str:
    async with r.chat({"model": "first", "messages": USER_MSG}, key=token) as resp:
        text = await resp.text()
        assert resp.status == 401, text
        challenge = resp.headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer ")
        assert 'error="invalid_token"' in challenge
        assert "error_description=" in challenge
    body = json.loads(text)
    message = body["error"]["message"]
    for word in words:
        assert word in message, message
        assert word in challenge, challenge
    if len(token) > 8:
        assert token not in text and token not in challenge
        for part in token.split("."):
            if len(part) > 8:
                assert part not in text, "a piece of the token was echoed"
    return str(message)


async def exchange(r: Any, key: str) -> tuple[int, Any, Any]:
    async with r.http.post(f"{r.url}/api/v1/auth/token",
                           headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


async def raw_request(r: Any, head: bytes) -> bytes:
    """Send raw request bytes and return the first line of the answer (aiohttp's client would
    refuse to send some of these heads)."""
    host, port = r.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
    return answer


def read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# -- every algorithm through the router -----------------------------------------------------------

@pytest.mark.parametrize("alg", ALGORITHMS)
async def test_router_jwt_of_each_algorithm_gets_a_completion(alg, start_router, tmp_path):
    r, key = await start_jwt_router(start_router, tmp_path, alg)
    token = jwt.encode(claims(), key, algorithm=alg)
    async with r.chat({"model": "first", "messages": USER_MSG}, key=token) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["object"] == "chat.completion"
    # and the exchanged one, signed by the router itself
    status, _, answer = await exchange(r, KEY)
    assert status == 200
    assert jwt.get_unverified_header(answer["access_token"])["alg"] == alg
    assert await chat_status(r, answer["access_token"]) == 200
    # another key of the same algorithm does not verify
    other = jwt.encode(claims(), "x" * 32 if alg == "HS256" else private_key(alg), algorithm=alg)
    await expect_401(r, other, "signature")


@pytest.mark.parametrize("alg", ALGORITHMS)
async def test_expiry_at_the_leeway_boundary(alg, start_router, tmp_path):
    r, key = await start_jwt_router(start_router, tmp_path, alg)
    now = int(time.time())
    assert await chat_status(r, jwt.encode(claims(exp=now - 27), key, algorithm=alg)) == 200
    await expect_401(r, jwt.encode(claims(exp=now - 32), key, algorithm=alg), "expired")


async def test_nbf_and_iat_in_the_future(start_router, tmp_path):
    r, key = await start_jwt_router(start_router, tmp_path)
    now = int(time.time())
    assert await chat_status(r, jwt.encode(claims(nbf=now + 27), key)) == 200
    await expect_401(r, jwt.encode(claims(nbf=now + 32), key), "not yet valid")
    await expect_401(r, jwt.encode(claims(iat=now + 120), key), "not yet valid")


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "aud"])
async def test_missing_claims(claim, start_router, tmp_path):
    r, key = await start_jwt_router(start_router, tmp_path, "ES256")
    await expect_401(r, jwt.encode(claims(**{claim: None}), key, algorithm="ES256"), claim)


async def test_missing_issuer(start_router, tmp_path):
    r, key = await start_jwt_router(start_router, tmp_path)
    await expect_401(r, jwt.encode(claims(iss=None), key), "issuer")


@pytest.mark.parametrize(("field", "value", "word"), [
    ("iss", "router/", "issuer"), ("iss", "Router", "issuer"), ("iss", "elsewhere", "issuer"),
    ("aud", "router/", "audience"), ("aud", "ROUTER", "audience"), ("aud", "api", "audience"),
])
async def test_wrong_issuer_or_audience(field, value, word, start_router, tmp_path):
    r, key = await start_jwt_router(start_router, tmp_path, "RS256")
    await expect_401(r, jwt.encode(claims(**{field: value}), key, algorithm="RS256"), word)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none(alg, start_router, tmp_path):
    r, _ = await start_jwt_router(start_router, tmp_path)
    for sig in ("", b64(b"z" * 32)):
        await expect_401(r, f"{seg({'alg': alg, 'typ': 'JWT'})}.{seg(claims())}.{sig}",
                         "algorithm")


@pytest.mark.parametrize("alg", ["RS256", "EdDSA"])
async def test_key_confusion_hs256_with_the_public_pem(alg, start_router, tmp_path):
    section, _ = jwt_section(alg, tmp_path)
    r = await start_router(config(section))
    pem = read_bytes(section["public_key_file"])
    token = hs256_raw({"alg": "HS256", "typ": "JWT"}, claims(), pem)
    await expect_401(r, token, "algorithm")


@pytest.mark.parametrize("header", ["jku", "x5u", "x5c", "jwk"])
async def test_key_location_headers(header, start_router, tmp_path):
    r, key = await start_jwt_router(start_router, tmp_path)
    value: Any = {"jku": "http://127.0.0.1:9/jwks", "x5u": "http://127.0.0.1:9/c.pem",
                  "x5c": ["MIIB"], "jwk": {"kty": "oct", "k": b64(SECRET.encode())}}[header]
    await expect_401(r, jwt.encode(claims(), key, headers={header: value}), header)


async def test_mangled_tokens_are_401(start_router, tmp_path):
    r, key = await start_jwt_router(start_router, tmp_path)
    good = jwt.encode(claims(), key)
    head, payload, sig = good.split(".")
    flipped_sig = sig[:-6] + ("A" if sig[-6] != "A" else "B") + sig[-5:]
    flipped_payload = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
    for token in (f"{head}.{payload}.{flipped_sig}", f"{head}.{flipped_payload}.{sig}",
                  f"{head}.{payload}", f"{good}.{sig}", f"{head}.!!!.{sig}",
                  "abc.def.ghi", "opaque-garbage", "sk-nope"):
        async with r.chat({"model": "first", "messages": USER_MSG}, key=token) as resp:
            assert resp.status == 401, token
            assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
            assert good not in await resp.text()


async def test_a_padded_segment_is_not_a_jwt(start_router, tmp_path):
    r, key = await start_jwt_router(start_router, tmp_path)
    good = jwt.encode(claims(), key)
    assert await chat_status(r, good) == 200
    await expect_401(r, good + "=")


# -- the Authorization header itself --------------------------------------------------------------

async def test_no_credentials_get_a_bare_challenge(start_router, tmp_path):
    r, _ = await start_jwt_router(start_router, tmp_path)
    async with r.chat({"model": "first", "messages": USER_MSG}, key=None) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert "error=" not in resp.headers["WWW-Authenticate"]
    async with r.http.post(f"{r.url}/api/v1/auth/token") as resp:
        assert resp.status == 401
        assert "error=" not in resp.headers["WWW-Authenticate"]


async def test_odd_authorization_headers_are_400_or_401_never_500(start_router, tmp_path):
    r, key = await start_jwt_router(start_router, tmp_path)
    good = jwt.encode(claims(), key)
    body = b'{"model":"first","messages":[{"role":"user","content":"hi"}]}'

    def head(*auth: bytes) -> bytes:
        lines = [b"POST /v1/chat/completions HTTP/1.1", b"Host: router",
                 b"Content-Type: application/json", b"Connection: close",
                 b"Content-Length: " + str(len(body)).encode(),
                 *(b"Authorization: " + a for a in auth)]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    cases = {
        "two headers, both valid": head(b"Bearer " + good.encode(), b"Bearer " + good.encode()),
        "two headers, key and jwt": head(b"Bearer " + KEY.encode(), b"Bearer " + good.encode()),
        "basic": head(b"Basic YWxpY2U6c2VjcmV0"),
        "no token": head(b"Bearer"),
        "utf-8 token": head("Bearer caf\u00e9.\u00fc.x".encode()),
        "latin-1 byte": head(b"Bearer abc\xe9.def.ghi"),
        "control byte": head(b"Bearer abc\x01def"),
        "9 KB token": head(b"Bearer " + b"a" * 9 * 1024),
        "9 KB JWT-shaped": head(b"Bearer " + good.encode() + b"A" * 9 * 1024),
        "7.5 KB JWT-shaped": head(b"Bearer " + seg({"alg": "HS256", "p": "x" * 5600}).encode()
                                  + b"." + good.split(".", 1)[1].encode()),
        "api key in the query": head(),
    }
    for name, raw in cases.items():
        if name == "api key in the query":
            raw = raw.replace(b"/v1/chat/completions", f"/v1/chat/completions?key={KEY}".encode())
        answer = await raw_request(r, raw)
        status = status_of(answer)
        assert status in (400, 401), (name, answer[:300])
        if name == "9 KB token":
            continue  # aiohttp's own 400 for an over-long header line
        if status == 401:
            assert b'error="invalid_token"' in answer or name == "api key in the query", name
        assert good.encode() not in answer and KEY.encode() not in answer


# -- the token exchange ---------------------------------------------------------------------------

async def test_exchange_an_api_key_for_a_router_jwt(start_router, tmp_path):
    r, key = await start_jwt_router(start_router, tmp_path, ttl_s=900)
    status, headers, answer = await exchange(r, KEY)
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    assert set(answer) == {"access_token", "token_type", "expires_in"}
    assert answer["token_type"] == "Bearer" and answer["expires_in"] == 900
    raw = jwt.decode(answer["access_token"], key, algorithms=["HS256"], audience="router")
    assert raw["sub"] == "alice" and raw["exp"] - raw["iat"] == 900
    assert "adm" not in raw and "mdl" not in raw
    assert await chat_status(r, answer["access_token"], "first") == 200
    assert await chat_status(r, answer["access_token"], "second") == 200


async def test_exchanged_token_keeps_the_model_restriction(start_router, tmp_path):
    r, _ = await start_jwt_router(start_router, tmp_path, "EdDSA")
    status, _, answer = await exchange(r, OTHER_KEY)
    assert status == 200
    token = answer["access_token"]
    assert jwt.decode(token, options={"verify_signature": False})["mdl"] == ["first"]
    assert await chat_status(r, token, "first") == 200
    async with r.chat({"model": "second", "messages": USER_MSG}, key=token) as resp:
        assert resp.status == 403
    async with r.http.get(f"{r.url}/v1/models",
                          headers={"Authorization": f"Bearer {token}"}) as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == ["first"]


async def test_exchanged_token_keeps_user_limits_and_admin(start_router, tmp_path):
    r, _ = await start_jwt_router(start_router, tmp_path, "RS256")
    _, _, admin = await exchange(r, ADMIN_KEY)
    raw = jwt.decode(admin["access_token"], options={"verify_signature": False})
    assert raw["sub"] == "root" and raw["adm"] is True and raw["pid"] == "root"
    _, _, limited = await exchange(r, LIMITED_KEY)
    raw = jwt.decode(limited["access_token"], options={"verify_signature": False})
    assert raw["sub"] == "carol" and raw["pid"] == "limited" and "adm" not in raw
    assert raw["lim"] == {"rpm": 1000, "concurrency": 3}
    assert await chat_status(r, limited["access_token"]) == 200


async def test_a_router_jwt_cannot_buy_another(start_router, tmp_path):
    r, _ = await start_jwt_router(start_router, tmp_path)
    _, _, answer = await exchange(r, KEY)
    status, _, body = await exchange(r, answer["access_token"])
    assert status == 403
    assert body["error"]["code"] == "token_exchange_refused"


async def test_a_token_minted_from_a_yaml_key_ends_when_a_reload_removes_the_key(
        start_router, tmp_path):
    section, _ = jwt_section("HS256", tmp_path, ttl_s=3600)
    cfg = config(section)
    r = await start_router(cfg)
    _, _, doomed = await exchange(r, LIMITED_KEY)
    _, _, kept = await exchange(r, KEY)
    for answer in (doomed, kept):
        assert await chat_status(r, answer["access_token"]) == 200  # verified and cached
    cfg["auth"]["api_keys"] = [k for k in cfg["auth"]["api_keys"] if k["id"] != "limited"]
    r.write_config(cfg)
    assert await r.worker.watcher.reload("test")
    await expect_401(r, doomed["access_token"], "no longer configured")
    assert await chat_status(r, kept["access_token"]) == 200


async def test_a_reload_that_cannot_read_a_key_file_changes_nothing(start_router, tmp_path):
    """The key files are read while the new config loads: one that is gone refuses the reload,
    and tokens signed with the key in use keep verifying."""
    section, key = jwt_section("RS256", tmp_path)
    cfg = config(section)
    r = await start_router(cfg)
    token = jwt.encode(claims(), key, algorithm="RS256")
    assert await chat_status(r, token) == 200
    before = r.worker.ref.current
    gone = str(tmp_path / "rotated-away.pem")
    cfg["auth"]["jwt"] = {**section, "public_key_file": gone}
    r.write_config(cfg)
    assert not await r.worker.watcher.reload("test")
    assert r.worker.ref.current is before
    assert await chat_status(r, token) == 200
    with pytest.raises(ConfigError) as info:
        await asyncio.to_thread(load_config, r.path)
    (problem,) = info.value.problems
    assert problem.render().startswith(f"auth.jwt.public_key_file: cannot read {gone}: ")


async def test_a_token_minted_from_a_yaml_key_follows_the_key_as_reloaded(
        start_router, tmp_path):
    """The token is that key's principal: a reload that takes the admin flag or a model from
    the key takes them from its tokens too, at once (not when they expire)."""
    section, _ = jwt_section("HS256", tmp_path, ttl_s=3600)
    cfg = config(section)
    r = await start_router(cfg)
    _, _, minted = await exchange(r, ADMIN_KEY)
    token = minted["access_token"]
    keys_url = f"{r.url}/api/v1/admin/keys"
    async with r.http.get(keys_url, headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200  # an admin, verified and cached
    assert await chat_status(r, token, model="second") == 200
    cfg["auth"]["api_keys"] = [  # (new dicts: ADMIN_KEY_ENTRY is shared by other tests)
        {**key, "admin": False, "models": ["first"]} if key["id"] == ADMIN_KEY_ENTRY["id"]
        else key for key in cfg["auth"]["api_keys"]]
    r.write_config(cfg)
    assert await r.worker.watcher.reload("test")
    async with r.http.get(keys_url, headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 403
    assert await chat_status(r, token, model="second") == 403
    assert await chat_status(r, token, model="first") == 200


async def settings_of(r: Any, token: str) -> Any:
    async with r.http.get(f"{r.url}/api/v1/automation/settings",
                          headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_a_directly_issued_token_is_not_the_api_key_user_of_its_sub(start_router, tmp_path):
    r, key = await start_jwt_router(start_router, tmp_path)
    async with r.http.put(f"{r.url}/api/v1/automation/settings", json={"session_ttl_s": 900},
                          headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 200
    assert (await settings_of(r, KEY))["session_ttl_s"] == 900  # alice, by her API key
    _, _, minted = await exchange(r, KEY)  # is alice
    assert (await settings_of(r, minted["access_token"]))["session_ttl_s"] == 900
    direct = jwt.encode(claims(sub="alice"), key, algorithm="HS256")  # `router token issue`
    assert (await settings_of(r, direct))["session_ttl_s"] != 900
    # Nor does a hand-made token become a key's principal by naming its id without `via`.
    posing = jwt.encode(claims(sub="alice", pid="test"), key, algorithm="HS256")
    assert (await settings_of(r, posing))["session_ttl_s"] != 900


async def test_exchange_needs_a_valid_credential(start_router, tmp_path):
    r, _ = await start_jwt_router(start_router, tmp_path)
    status, headers, _ = await exchange(r, "sk-test-unknown" + "u" * 30)
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_exchange_without_auth_jwt_is_404(start_router):
    r = await start_router(config(None))
    status, _, body = await exchange(r, KEY)
    assert status == 404
    assert "auth.jwt" in body["error"]["message"]


async def test_exchange_with_a_verify_only_config_is_404(start_router, tmp_path):
    section, key = jwt_section("RS256", tmp_path, private=False)
    r = await start_router(config(section))
    status, _, _ = await exchange(r, KEY)
    assert status == 404
    # it still verifies tokens signed elsewhere with the matching private key
    assert await chat_status(r, jwt.encode(claims(), key, algorithm="RS256")) == 200


async def test_a_key_that_does_not_fit_the_algorithm_never_gives_500(start_router, tmp_path):
    _, priv, pub = write_pair(tmp_path, "ES256")
    section = {"algorithm": "RS256", "public_key_file": str(pub), "private_key_file": str(priv)}
    try:
        r = await start_router(config(section))
    except ConfigError:
        return  # refused at start: the right outcome
    forged = hs256_raw({"alg": "RS256", "typ": "JWT"}, claims(), b"whatever")
    assert await chat_status(r, forged) == 401
    status, _, _ = await exchange(r, KEY)
    assert status != 500
