"""Authorization header -> one Principal. The token's shape picks the verifier."""

from __future__ import annotations

from router.auth.api_keys import StaticKeys, digest
from router.auth.principal import Principal
from router.errors import Unauthorized

__all__ = ["Authenticator", "Principal", "StaticKeys", "digest"]

MAX_TOKEN_LEN = 4096


class Authenticator:
    def __init__(self, api_keys: StaticKeys) -> None:
        self._api_keys = api_keys

    def authenticate(self, headers: list[str]) -> Principal:
        """`headers` holds every Authorization header value the request carried."""
        if not headers:
            raise Unauthorized("missing Authorization header", credentials_sent=False)
        if len(headers) > 1:
            raise Unauthorized("more than one Authorization header")
        scheme, _, token = headers[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("expected 'Authorization: Bearer <token>'")
        if len(token) > MAX_TOKEN_LEN or not token.isascii() or not token.isprintable():
            raise Unauthorized("malformed bearer token")
        if token.startswith("sk-"):
            return self._api_keys.verify(token)
        # Router JWTs and OAuth2 access tokens get their verifiers in the auth issue.
        raise Unauthorized("unrecognised credential: expected an API key 'sk-...'")
