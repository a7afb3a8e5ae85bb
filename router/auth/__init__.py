"""Authorization header -> one Principal. The token's shape picks the verifier:

`sk-...` -> API key; a JWT whose `iss` is ours -> router JWT; a JWT whose `iss` is the IdP's ->
the IdP's JWKS; anything else -> the IdP's introspection/userinfo (when configured).

A router JWT minted from an API key lives only while that key does: a managed key's id is
checked in the worker's key cache (revocation reaches it within a second), a YAML key's in the
running config (a reload that removes the key ends its tokens). One minted from an IdP token
cannot be revoked here: it ends at its `exp`, no later than the IdP token's and at most
`auth.jwt.ttl_s` after it was minted.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Protocol

import orjson

from router.auth.api_keys import KeyCache, ManagedKeys, StaticKeys, digest, revoked_source
from router.auth.principal import Principal
from router.auth.router_jwt import RouterTokens
from router.errors import Unauthorized

__all__ = ["Authenticator", "IdpVerifier", "KeyCache", "ManagedKeys", "Principal", "RouterTokens",
           "StaticKeys", "digest"]

MAX_TOKEN_LEN = 8192
# Compact JWS (RFC 7515): unpadded base64url segments, so a token has exactly one spelling.
COMPACT_JWS = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
UNSAFE_HEADERS = ("jku", "x5u", "x5c", "jwk")  # a token must not tell us where its key is


class IdpVerifier(Protocol):
    """Access tokens of an external OpenID Connect provider (router/auth/oidc.py)."""

    issuer: str
    accepts_opaque: bool

    async def verify_jwt(self, token: str) -> Principal: ...
    async def verify_opaque(self, token: str) -> Principal: ...


class Authenticator:
    def __init__(self, api_keys: StaticKeys, router_tokens: RouterTokens | None = None,
                 idp: IdpVerifier | None = None, managed: ManagedKeys | None = None) -> None:
        self.api_keys = api_keys
        self.router_tokens = router_tokens
        self.idp = idp
        self.managed = managed  # store-backed keys, asked after the YAML ones

    async def authenticate(self, headers: list[str]) -> Principal:
        """`headers` holds every Authorization header value the request carried."""
        token = ""
        try:
            token = bearer_token(headers)
            return await self._verify(token)
        except Unauthorized as exc:
            exc.credential = credential_kind(token)
            raise

    async def _verify(self, token: str) -> Principal:
        if token.startswith("sk-"):
            if self.managed is None:
                return self.api_keys.verify(token)
            key_digest = digest(token)
            return self.api_keys.get(key_digest) or await self.managed.verify(token, key_digest)
        if token.count(".") == 2:
            issuer = peek_issuer(token)
            if self.router_tokens is not None and issuer == self.router_tokens.issuer:
                principal = self.router_tokens.verify(token)
                if principal.origin == "managed_key":
                    if self.managed is None:
                        raise revoked_source()
                    await self.managed.check_minted(principal.id)
                elif principal.origin == "config_key":
                    current = self.api_keys.minted(principal.id)
                    if current is None:
                        raise Unauthorized("the API key this token was minted from is no "
                                           "longer configured", reason="revoked_source")
                    return current
                return principal
            if self.idp is not None and issuer == self.idp.issuer:
                return await self.idp.verify_jwt(token)
            raise Unauthorized("token issuer is not trusted")
        if self.idp is not None and self.idp.accepts_opaque:
            return await self.idp.verify_opaque(token)
        raise Unauthorized("unrecognised credential: expected an API key 'sk-...' or a JWT")


def credential_kind(token: str) -> str:
    """The credential type a token looks like (a metric label; nothing is verified here)."""
    if not token:
        return "none"
    if token.startswith("sk-"):
        return "api_key"
    return "jwt" if token.count(".") == 2 else "opaque"


def bearer_token(headers: list[str]) -> str:
    if not headers:
        raise Unauthorized("missing Authorization header", credentials_sent=False)
    if len(headers) > 1:
        raise Unauthorized("more than one Authorization header")
    scheme, _, token = headers[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("expected 'Authorization: Bearer <token>'")
    if len(token) > MAX_TOKEN_LEN or not token.isascii() or not token.isprintable() \
            or " " in token:
        raise Unauthorized("malformed bearer token")
    return token


def peek_issuer(token: str) -> str | None:
    """The unverified `iss` of a JWT, only to pick its verifier; refuses key-location headers."""
    if not COMPACT_JWS.match(token):
        raise Unauthorized("malformed token")
    head, payload, _ = token.split(".")
    header = _b64json(head)
    if any(name in header for name in UNSAFE_HEADERS):
        raise Unauthorized("token header names its own key (jku/x5u/x5c/jwk): refused")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise Unauthorized("token algorithm is not allowed")
    issuer = _b64json(payload).get("iss")
    return issuer if isinstance(issuer, str) else None


def _b64json(segment: str) -> dict[str, object]:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise Unauthorized("malformed token") from None
    if not isinstance(data, dict):
        raise Unauthorized("malformed token")
    return data
