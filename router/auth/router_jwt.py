"""Router-signed JWTs: issued by `POST /api/v1/auth/token` and `router token issue`, verified here.

The algorithm comes from the config, never from a token's header; `iss`, `aud`, `exp`, `iat` and
`sub` are required, `nbf` is honoured, with the configured leeway.

A token minted by the exchange names its origin (`via`: config_key, managed_key or oauth2) and
the principal it came from (`pid`, `sub`): it is that principal, and the Authenticator checks
that its key still exists. A token without `via` was issued directly (`router token issue`):
its subject is a namespace of its own, `jwt:<sub>`.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_pem_public_key,
)

from router.auth.principal import (
    MANAGED_KEY_ID,
    MINTED_ORIGINS,
    Origin,
    Principal,
    jwt_identity,
)
from router.config.files import read_jwt_keys
from router.config.model import JwtConfig, Limits
from router.errors import Unauthorized

REQUIRED = ["exp", "iat", "iss", "aud", "sub"]
VERIFIED_CACHE_SIZE = 10_000
KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS256": (rsa.RSAPublicKey, rsa.RSAPrivateKey),
    "ES256": (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey),
    "EdDSA": (ed25519.Ed25519PublicKey, ed25519.Ed25519PrivateKey,
              ed448.Ed448PublicKey, ed448.Ed448PrivateKey),
}


class RouterTokens:
    def __init__(self, config: JwtConfig, default_limits: Limits) -> None:
        self.issuer = config.issuer
        self._config = config
        self._default_limits = default_limits
        self._algorithms = [config.algorithm]
        self._signing_key: Any = None
        self._verify_key: Any
        if config.algorithm == "HS256":
            assert config.secret is not None  # the config validator guarantees it
            self._verify_key = self._signing_key = config.secret.encode()
        else:
            if config.public_pem is None:  # a section built in code, not by load_config
                config = read_jwt_keys(config)  # FileProblems (a ValueError) when unreadable
            assert config.public_pem is not None
            self._verify_key = load_pem_public_key(config.public_pem)
            if config.private_pem is not None:
                self._signing_key = load_pem_private_key(config.private_pem, password=None)
            kinds = KEY_TYPES[config.algorithm]
            for key in (self._verify_key, self._signing_key):
                if key is not None and not isinstance(key, kinds):
                    raise TypeError(f"a {type(key).__name__} does not fit {config.algorithm}")
        # Verified tokens, so a warm token costs a dict lookup and a clock check instead of a
        # signature check (~80 µs for HS256 in PyJWT). Bounded; a reload starts a new one.
        self._verified: dict[str, tuple[Principal, float, float]] = {}

    @property
    def can_issue(self) -> bool:
        return self._signing_key is not None

    def issue(self, principal: Principal, ttl_s: int | None = None) -> tuple[str, int]:
        """A token for `principal`: same user, scopes, limits, models and admin flag; it ends
        no later than the credential it stands for. A router_jwt principal (the CLI's) gets a
        token of its own namespace, others one that is them (`via`)."""
        if self._signing_key is None:
            raise RuntimeError("no private key configured: this router can verify, not issue")
        if ttl_s is not None and ttl_s < 1:
            raise ValueError("a token's lifetime must be at least 1 s")
        ttl = min(ttl_s or self._config.ttl_s, self._config.ttl_s)
        now = int(time.time())
        if principal.expires_at is not None:
            ttl = max(0, min(ttl, math.floor(principal.expires_at) - now))
        claims: dict[str, Any] = {
            "iss": self._config.issuer,
            "aud": self._config.audience,
            "sub": principal.user,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": secrets.token_urlsafe(12),
            "pid": principal.id,
            "lim": principal.limits.model_dump(exclude_none=True),
        }
        if principal.origin in MINTED_ORIGINS:
            claims["via"] = principal.origin
        if principal.scopes:
            claims["scope"] = " ".join(sorted(principal.scopes))
        if principal.models is not None:
            claims["mdl"] = sorted(principal.models)
        if principal.admin:
            claims["adm"] = True
        token = jwt.encode(claims, self._signing_key, algorithm=self._config.algorithm)
        return token, ttl

    def verify(self, token: str) -> Principal:
        cached = self._verified.get(token)
        if cached is not None:
            principal, not_before, expires = cached
            now = time.time()
            if not_before <= now < expires:
                return principal
            del self._verified[token]
        principal, not_before, expires = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]  # the oldest entry
        self._verified[token] = (principal, not_before, expires)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float, float]:
        try:
            claims = jwt.decode(
                token, self._verify_key, algorithms=self._algorithms,
                audience=self._config.audience, issuer=self._config.issuer,
                leeway=self._config.leeway_s, options={"require": REQUIRED},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(jwt_failure(exc), reason=jwt_reason(exc)) from None
        leeway = self._config.leeway_s
        not_before = max(float(claims.get("nbf", 0)), float(claims["iat"])) - leeway
        return self._principal(claims), not_before, float(claims["exp"]) + leeway

    def _principal(self, claims: dict[str, Any]) -> Principal:
        sub = claims["sub"]
        pid = claims.get("pid")
        via = claims.get("via")
        if not isinstance(sub, str) or not (pid is None or isinstance(pid, str)):
            raise Unauthorized("token carries an invalid subject")
        origin: Origin
        if via is None:
            # Issued directly. A token without `via` whose pid is a managed key's id was
            # minted by an earlier version from that key: it still dies with the key.
            if pid is not None and MANAGED_KEY_ID.match(pid):
                principal_id, user, origin = pid, sub, "managed_key"
            else:
                principal_id = user = jwt_identity(sub)
                origin = "router_jwt"
        elif via in MINTED_ORIGINS and pid:
            principal_id, user, origin = pid, sub, via
        else:
            raise Unauthorized("token names an unknown origin")
        limits = self._default_limits
        lim = claims.get("lim")
        if isinstance(lim, dict):
            try:
                limits = Limits.model_validate(lim)
            except ValueError:
                raise Unauthorized("token carries invalid limits") from None
        models = claims.get("mdl")
        scope = claims.get("scope")
        return Principal(
            id=principal_id,
            kind="router_jwt",
            user=user,
            limits=limits,
            models=frozenset(str(m) for m in models) if isinstance(models, list) else None,
            admin=claims.get("adm") is True,
            scopes=frozenset(scope.split()) if isinstance(scope, str) else frozenset(),
            origin=origin,
        )


def jwt_reason(exc: Exception) -> str:
    """A metric label for a JWT failure: pyjwt's exception class, a fixed set."""
    name = type(exc).__name__.removesuffix("Error")
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_") or "invalid"


# What was wrong with a JWT, most specific first (ExpiredSignatureError is a DecodeError too).
_FAILURES: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid (nbf/iat in the future)"),
    (jwt.InvalidAudienceError, "token has the wrong audience"),
    (jwt.InvalidIssuerError, "token has the wrong issuer"),
    (jwt.InvalidSignatureError, "token signature does not verify"),
    (jwt.InvalidAlgorithmError, "token algorithm is not allowed"),
    (jwt.DecodeError, "malformed token"),
)


def jwt_failure(exc: Exception) -> str:
    """What was wrong with a JWT, in words a client can act on (never the token itself)."""
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token lacks the required claim {exc.claim!r}"
    for kind, message in _FAILURES:
        if isinstance(exc, kind):
            return message
    return "invalid token"
