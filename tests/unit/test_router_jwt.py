"""Router JWTs without a server: issue/verify for every algorithm, every claim rule, the
header parsing in front of them, and the words a rejection uses."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pydantic import ValidationError

from router.auth import (
    Authenticator,
    KeyCache,
    ManagedKeys,
    StaticKeys,
    bearer_token,
    peek_issuer,
)
from router.auth.api_keys import key_principal
from router.auth.principal import Principal
from router.auth.router_jwt import RouterTokens, jwt_failure
from router.config.model import ApiKeyConfig, JwtConfig, Limits
from router.errors import Unauthorized
from router.store import KeyRecord, MemoryStore

SECRET = "s" * 32
ALGORITHMS = ["HS256", "RS256", "ES256", "EdDSA"]
LIMITS = Limits(rpm=7, concurrency=2)
MINTING_KEY = ApiKeyConfig(id="key-1", key_sha256="0" * 64, user="alice")


# -- helpers --------------------------------------------------------------------------------------

def private_key(alg: str) -> Any:
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def write_pair(directory: Path, alg: str, name: str = "jwt") -> tuple[Any, Path, Path]:
    """A fresh key pair for `alg` as PEM files: (private key object, private path, public path)."""
    key = private_key(alg)
    priv = directory / f"{name}-{alg}.key"
    pub = directory / f"{name}-{alg}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, priv, pub


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def seg(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def hs256_raw(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 JWT built by hand: PyJWT refuses to HMAC with a PEM key (key confusion)."""
    signing_input = f"{seg(header)}.{seg(claims)}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": "router", "aud": "router", "sub": "alice", "iat": now,
                            "exp": now + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


class Signer:
    """A RouterTokens for one algorithm plus the raw key to forge tokens the router would sign."""

    def __init__(self, alg: str, tmp_path: Path, **extra: Any) -> None:
        self.alg = alg
        if alg == "HS256":
            self.key: Any = SECRET
            self.public_pem = b""
            self.config = JwtConfig(algorithm="HS256", secret=SECRET, **extra)
        else:
            self.key, priv, pub = write_pair(tmp_path, alg)
            self.public_pem = pub.read_bytes()
            self.config = JwtConfig(algorithm=alg, private_key_file=str(priv),  # type: ignore[arg-type]
                                    public_key_file=str(pub), **extra)
        self.tokens = RouterTokens(self.config, LIMITS)
        # The YAML key that test_issued_token_round_trips_the_principal's token stands for.
        self.auth = Authenticator(StaticKeys([MINTING_KEY], LIMITS), self.tokens)

    def sign(self, payload: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(payload, self.key, algorithm=self.alg, headers=headers)

    async def check(self, token: str) -> Principal:
        return await self.auth.authenticate([f"Bearer {token}"])


@pytest.fixture(params=ALGORITHMS)
def signer(request: pytest.FixtureRequest, tmp_path: Path) -> Signer:
    return Signer(request.param, tmp_path)


@pytest.fixture
def hs(tmp_path: Path) -> Signer:
    return Signer("HS256", tmp_path)


async def refused(signer: Signer, token: str, *words: str) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        await signer.check(token)
    exc = info.value
    for word in words:
        assert word in exc.message, exc.message
    assert token not in exc.message
    challenge = exc.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
    assert token not in challenge
    return exc


# -- issue and verify -----------------------------------------------------------------------------

async def test_issued_token_round_trips_the_principal(signer: Signer):
    # (An IdP principal: one minted from a YAML key is that key as configured now.)
    who = Principal(id="oidc:idp#alice", kind="oauth2", user="oidc:idp#alice",
                    limits=Limits(rpm=3, tpm=900), models=frozenset({"m1", "m2"}), admin=True,
                    scopes=frozenset({"b", "a"}), origin="oauth2")
    token, ttl = signer.tokens.issue(who)
    assert ttl == signer.config.ttl_s
    assert jwt.get_unverified_header(token)["alg"] == signer.alg
    got = await signer.check(token)
    assert got == Principal(id="oidc:idp#alice", kind="router_jwt", user="oidc:idp#alice",
                            limits=Limits(rpm=3, tpm=900), models=frozenset({"m1", "m2"}),
                            admin=True, scopes=frozenset({"a", "b"}), origin="oauth2")
    raw = jwt.decode(token, options={"verify_signature": False})
    assert {"iss", "aud", "sub", "iat", "nbf", "exp", "jti"} <= raw.keys()
    assert raw["exp"] - raw["iat"] == ttl


async def test_unrestricted_non_admin_principal_stays_so(hs: Signer):
    who = Principal(id="k", kind="oauth2", user="bob", limits=Limits(), models=None,
                    origin="oauth2")
    token, _ = hs.tokens.issue(who)
    got = await hs.check(token)
    assert got.models is None and got.admin is False and got.scopes == frozenset()
    assert got.limits == Limits()


def test_ttl_is_capped_by_the_config(tmp_path: Path):
    s = Signer("HS256", tmp_path, ttl_s=120)
    who = Principal(id="k", kind="api_key", user="u", limits=Limits(), models=None)
    assert s.tokens.issue(who, ttl_s=10_000)[1] == 120
    assert s.tokens.issue(who, ttl_s=60)[1] == 60
    token, _ = s.tokens.issue(who, ttl_s=10_000)
    raw = jwt.decode(token, options={"verify_signature": False})
    assert raw["exp"] - raw["iat"] == 120


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_verify_only_config_cannot_issue(alg: str, tmp_path: Path):
    key, _, pub = write_pair(tmp_path, alg)
    tokens = RouterTokens(JwtConfig(algorithm=alg, public_key_file=str(pub)),  # type: ignore[arg-type]
                          Limits())
    assert not tokens.can_issue
    with pytest.raises(RuntimeError):
        tokens.issue(Principal(id="k", kind="api_key", user="u", limits=Limits(), models=None))
    assert tokens.verify(jwt.encode(claims(), key, algorithm=alg)).user == "jwt:alice"


def test_config_refuses_short_secret_and_missing_public_key():
    with pytest.raises(ValidationError):
        JwtConfig(algorithm="HS256", secret="s" * 31)
    with pytest.raises(ValidationError):
        JwtConfig(algorithm="HS256")
    with pytest.raises(ValidationError):
        JwtConfig(algorithm="RS256", private_key_file="/x.key")


def test_a_key_of_the_wrong_type_is_refused_at_load(tmp_path: Path):
    _, priv, pub = write_pair(tmp_path, "ES256")
    with pytest.raises((ValueError, TypeError)):
        RouterTokens(JwtConfig(algorithm="RS256", private_key_file=str(priv),
                               public_key_file=str(pub)), Limits())


# -- where a token comes from: its identity, and the credential it dies with ---------------------

async def test_a_directly_issued_token_is_its_own_namespace(hs: Signer):
    got = await hs.check(hs.sign(claims(sub="alice")))
    assert (got.id, got.user, got.origin) == ("jwt:alice", "jwt:alice", "router_jwt")
    # Naming a YAML key's id does not make a token that key's principal.
    got = await hs.check(hs.sign(claims(sub="alice", pid="key-1")))
    assert (got.id, got.user) == ("jwt:alice", "jwt:alice")


async def test_an_unknown_origin_or_one_without_a_principal_is_refused(hs: Signer):
    await refused(hs, hs.sign(claims(via="carrier-pigeon", pid="key-1")), "unknown origin")
    await refused(hs, hs.sign(claims(via="config_key")), "unknown origin")
    await refused(hs, hs.sign(claims(via="config_key", pid="gone")), "no longer configured")


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        self.lookups += 1
        return await super().key_by_id(key_id)


async def test_a_token_minted_from_a_managed_key_lives_while_the_key_does(tmp_path: Path):
    store = CountingStore()
    cache = KeyCache(store)
    auth = Authenticator(StaticKeys([], LIMITS), Signer("HS256", tmp_path).tokens,
                         managed=ManagedKeys(cache, LIMITS))
    assert auth.router_tokens is not None
    record = KeyRecord(id="key_0123456789abcdef", digest="0" * 64, user="dora", limits=None,
                       models=("*",), admin=False, created_at=time.time(),
                       expires_at=time.time() + 120)
    await store.create_key(record)
    token, ttl = auth.router_tokens.issue(key_principal(record, LIMITS))
    assert 118 <= ttl <= 120  # no longer than the key
    for _ in range(3):
        got = await auth.authenticate([f"Bearer {token}"])
        assert (got.id, got.user, got.origin) == (record.id, "dora", "managed_key")
    assert store.lookups == 1  # warm: no store call
    await store.revoke_key(record.id)
    cache.changed()  # what the version poll does when the store's key version moves
    with pytest.raises(Unauthorized, match="revoked"):
        await auth.authenticate([f"Bearer {token}"])
    # A token an earlier version minted (no `via`, the key's id in `pid`) dies with it too.
    legacy = jwt.encode(claims(sub="dora", pid=record.id), SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="revoked"):
        await auth.authenticate([f"Bearer {legacy}"])
    # Without a key store to ask, such a token cannot be vouched for.
    with pytest.raises(Unauthorized, match="revoked"):
        await Authenticator(StaticKeys([], LIMITS), auth.router_tokens).authenticate(
            [f"Bearer {token}"])


def test_a_token_minted_from_an_idp_token_ends_no_later_than_it(hs: Signer):
    who = Principal(id="oidc:https://idp#bob", kind="oauth2", user="oidc:https://idp#bob",
                    limits=Limits(), models=None, origin="oauth2", expires_at=time.time() + 90)
    token, ttl = hs.tokens.issue(who)
    assert 88 <= ttl <= 90
    raw = jwt.decode(token, options={"verify_signature": False})
    assert raw["via"] == "oauth2" and raw["sub"] == raw["pid"] == "oidc:https://idp#bob"


# -- time claims ----------------------------------------------------------------------------------

async def test_exp_within_the_leeway_is_accepted_past_it_refused(signer: Signer):
    now = int(time.time())
    assert (await signer.check(signer.sign(claims(exp=now - 28)))).user == "jwt:alice"
    exc = await refused(signer, signer.sign(claims(exp=now - 31)), "expired")
    assert exc.status == 401


async def test_nbf_in_the_future(hs: Signer):
    now = int(time.time())
    assert (await hs.check(hs.sign(claims(nbf=now + 28)))).user == "jwt:alice"
    await refused(hs, hs.sign(claims(nbf=now + 31)), "not yet valid")


async def test_iat_in_the_future_beyond_leeway(hs: Signer):
    await refused(hs, hs.sign(claims(iat=int(time.time()) + 120)), "not yet valid")


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "aud"])
async def test_missing_required_claim_is_named(signer: Signer, claim: str):
    await refused(signer, signer.sign(claims(**{claim: None})), repr(claim))


async def test_missing_iss_is_refused(signer: Signer):
    await refused(signer, signer.sign(claims(iss=None)), "issuer")
    with pytest.raises(Unauthorized, match="'iss'"):
        signer.tokens.verify(signer.sign(claims(iss=None)))


@pytest.mark.parametrize("value", ["soon", [1], {"a": 1}, 12, 1e30])
async def test_exp_of_the_wrong_type_or_absurd(hs: Signer, value: Any):
    if value == 1e30:  # far future, but a float: accepted or refused, never a crash
        with contextlib.suppress(Unauthorized):
            await hs.check(hs.sign(claims(exp=value)))
        return
    await refused(hs, hs.sign(claims(exp=value)))


async def test_non_string_subject_is_refused(hs: Signer):
    await refused(hs, hs.sign(claims(sub=42)))


async def test_invalid_limits_claim_is_refused(hs: Signer):
    await refused(hs, hs.sign(claims(lim={"rpm": -1})), "limits")
    await refused(hs, hs.sign(claims(lim={"bogus": 1})), "limits")


# -- issuer and audience: exact compare -----------------------------------------------------------

@pytest.mark.parametrize("iss", ["router/", "Router", "ROUTER", " router", "https://router",
                                 "other"])
async def test_wrong_issuer(hs: Signer, iss: str):
    await refused(hs, hs.sign(claims(iss=iss)), "issuer")
    with pytest.raises(Unauthorized, match="issuer"):
        hs.tokens.verify(hs.sign(claims(iss=iss)))


@pytest.mark.parametrize("aud", ["router/", "Router", "ROUTER", "other", ["other"]])
async def test_wrong_audience(signer: Signer, aud: Any):
    await refused(signer, signer.sign(claims(aud=aud)), "audience")


# -- algorithms, keys, headers --------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_in_any_case(signer: Signer, alg: str):
    token = f"{seg({'alg': alg, 'typ': 'JWT'})}.{seg(claims())}."
    await refused(signer, token, "algorithm")
    with pytest.raises(Unauthorized):
        signer.tokens.verify(token)  # even past the shape check
    with_sig = token + b64(b"x" * 32)
    await refused(signer, with_sig)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_key_confusion_hs256_signed_with_the_public_key(alg: str, tmp_path: Path):
    s = await asyncio.to_thread(Signer, alg, tmp_path)  # reads key files: not on the loop
    for secret in (s.public_pem, s.public_pem.strip()):
        token = hs256_raw({"alg": "HS256", "typ": "JWT"}, claims(), secret)
        await refused(s, token, "algorithm")


async def test_another_algorithm_with_a_valid_signature_of_its_own(tmp_path: Path):
    rs = await asyncio.to_thread(Signer, "RS256", tmp_path)
    other = private_key("ES256")
    await refused(rs, jwt.encode(claims(), other, algorithm="ES256"), "algorithm")


async def test_signed_by_another_key(signer: Signer, tmp_path: Path):
    if signer.alg == "HS256":
        token = jwt.encode(claims(), "t" * 32, algorithm="HS256")
    else:
        token = jwt.encode(claims(), private_key(signer.alg), algorithm=signer.alg)
    await refused(signer, token, "signature")


@pytest.mark.parametrize("header", [
    {"jku": "http://127.0.0.1:9/jwks.json"},
    {"x5u": "http://127.0.0.1:9/cert.pem"},
    {"x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]},
    {"jwk": {"kty": "oct", "k": b64(b"k" * 32)}},
])
async def test_key_location_headers_are_refused(signer: Signer, header: dict[str, Any]):
    token = signer.sign(claims(), headers=header)  # validly signed: refused for the header alone
    await refused(signer, token, "header")


# -- shape ----------------------------------------------------------------------------------------

def _flip(token: str, index: int) -> str:
    c = token[index]
    return token[:index] + ("A" if c != "A" else "B") + token[index + 1:]


async def test_bit_flips_anywhere_are_refused(signer: Signer):
    token = signer.sign(claims())
    head, payload, _ = token.split(".")
    for index in (len(head) + 5, len(head) + len(payload) - 3, len(token) - 10, 3):
        flipped = _flip(token, index)
        if flipped == token:
            continue
        await refused(signer, flipped)


@pytest.mark.parametrize("mangle", [
    lambda t: t.rsplit(".", 1)[0],                    # two segments
    lambda t: t + ".x",                               # four segments
    lambda t: t + "." + t,                            # six
    lambda t: "." + t.split(".", 1)[1],               # empty header
    lambda t: t.split(".")[0] + ".!!!!." + t.split(".")[2],   # bad base64url payload
    lambda t: "%%%." + t.split(".", 1)[1],            # bad base64url header
    lambda t: b64(b"[1,2]") + "." + t.split(".", 1)[1],       # header not an object
    lambda t: b64(b"\xff\xfe") + "." + t.split(".", 1)[1],    # header not UTF-8
    lambda t: "a." + t.split(".", 1)[1],              # base64 length 1 mod 4
    lambda t: t.split(".")[0] + "." + seg("string") + "." + t.split(".")[2],
    lambda t: t[:-2],                                 # truncated signature
    lambda t: "..",
    lambda t: "not-a-token",
])
async def test_malformed_tokens_are_401(hs: Signer, mangle: Any):
    token = mangle(hs.sign(claims()))
    exc = await refused(hs, token)
    assert exc.status == 401


@pytest.mark.parametrize("value", [
    [],
    ["Bearer a.b.c", "Bearer a.b.c"],
    ["Basic YWxpY2U6c2VjcmV0"],
    ["Bearer"],
    ["Bearer   "],
    ["Token abc"],
    ["Bearer " + "a" * 9000],
    ["Bearer caf\u00e9.b.c"],
    ["Bearer a\x00b"],
    ["Bearer a b"],
])
def test_bad_authorization_headers(value: list[str]):
    with pytest.raises(Unauthorized) as info:
        bearer_token(value)
    challenge = info.value.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert ("error=" in challenge) is bool(value)  # no credentials: a bare challenge
    for v in value:
        token = v.partition(" ")[2].strip()
        if len(token) > 3:
            assert token not in info.value.message and token not in challenge


def test_bearer_scheme_is_case_insensitive():
    assert bearer_token(["bearer abc.def.ghi"]) == "abc.def.ghi"
    assert bearer_token(["BEARER  abc "]) == "abc"


def test_peek_issuer_reads_only_the_issuer():
    assert peek_issuer(f"{seg({'alg': 'HS256'})}.{seg({'iss': 'x'})}.sig") == "x"
    assert peek_issuer(f"{seg({'alg': 'HS256'})}.{seg({'iss': 5})}.sig") is None
    with pytest.raises(Unauthorized):
        peek_issuer(f"{seg({'typ': 'JWT'})}.{seg({'iss': 'x'})}.sig")  # no alg at all


async def test_unknown_issuer_and_opaque_tokens(hs: Signer):
    await refused(hs, jwt.encode(claims(iss="https://idp.example"), SECRET), "issuer")
    with pytest.raises(Unauthorized, match="unrecognised"):
        await hs.check("opaque-token-value")


async def test_no_router_tokens_configured_refuses_router_jwts(hs: Signer):
    bare = Authenticator(StaticKeys([], LIMITS))
    with pytest.raises(Unauthorized, match="issuer"):
        await bare.authenticate([f"Bearer {hs.sign(claims())}"])


def test_failure_messages():
    assert jwt_failure(jwt.ExpiredSignatureError()) == "token expired"
    assert "audience" in jwt_failure(jwt.InvalidAudienceError())
    assert "issuer" in jwt_failure(jwt.InvalidIssuerError())
    assert "'exp'" in jwt_failure(jwt.MissingRequiredClaimError("exp"))
    assert "signature" in jwt_failure(jwt.InvalidSignatureError())
    assert "algorithm" in jwt_failure(jwt.InvalidAlgorithmError())
    assert jwt_failure(ValueError("x")) == "invalid token"


def test_challenge_quotes_are_escaped():
    exc = Unauthorized('a "quoted" reason')
    assert exc.headers["WWW-Authenticate"] == (
        'Bearer realm="router", error="invalid_token", '
        "error_description=\"a 'quoted' reason\"")
    bare = Unauthorized("missing", credentials_sent=False)
    assert bare.headers["WWW-Authenticate"] == 'Bearer realm="router"'
