"""Access tokens of an external OpenID Connect provider (`auth.oauth2`).

JWTs are checked against the provider's JWKS; opaque tokens through RFC 7662 introspection, else
the provider's userinfo endpoint. Discovery and the JWKS are fetched with aiohttp, at start-up and
on a timer, in the background: a warm JWT verify makes no network call. `OidcClient` holds the
network side and the caches and lives across reloads while `auth.oauth2` is unchanged;
`OidcVerifier` binds it to one config's limits, admin claim and subject mapping.

A subject is `oidc:<issuer>#<sub>` (its limits and usage always, its sessions and settings
unless `auth.oauth2.users` maps it to a router user): never the API-key user of the same name.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import orjson

from router.auth.principal import Principal, idp_identity
from router.auth.router_jwt import jwt_failure, jwt_reason
from router.config.model import AdminClaim, Limits, OAuth2Config
from router.errors import Forbidden, IdpUnavailable, RouterError, Unauthorized
from router.tasks import spawn

log = logging.getLogger("router.auth.oidc")

MAX_BODY = 1 << 20  # discovery, JWKS, introspection and userinfo answers
MAX_OPAQUE_CACHE = 10_000
OPAQUE_RETRY_AFTER_S = 5
UNSAFE_HEADERS = ("jku", "x5u", "x5c", "jwk")
# The algorithms each key type can verify; a JWK's own `alg` narrows this further.
_BY_KTY: dict[tuple[str, str | None], frozenset[str]] = {
    ("RSA", None): frozenset({"RS256", "RS384", "RS512", "PS256"}),
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
}
_ACCESS_TOKEN_TYPES = frozenset({"access_token", "bearer"})

Claims = dict[str, Any]


class IdpDown(Exception):
    """The provider did not answer usefully (connection, timeout, 5xx, unreadable body)."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    key: Any
    algorithms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Discovery:
    jwks_uri: str
    userinfo_endpoint: str | None


class OidcClient:
    """One provider's discovery, keys and opaque-token cache, for one worker."""

    def __init__(self, config: OAuth2Config, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self._algorithms = frozenset(config.algorithms)
        self._discovery: Discovery | None = None
        self._keys: dict[str, SigningKey] = {}
        self._keys_loaded = False
        self._fetch_task: asyncio.Task[bool] | None = None  # shared by every waiter
        self._last_on_demand = -math.inf
        self._refresher: asyncio.Task[None] | None = None
        self._opaque: dict[bytes, tuple[float, Claims]] = {}
        self._opaque_inflight: dict[bytes, asyncio.Task[Claims | RouterError]] = {}
        self._closed = False
        intro = config.introspection
        self._client_auth = (aiohttp.encode_basic_auth(intro.client_id, intro.client_secret)
                             if intro is not None else "")

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Fetch discovery and keys now and every `discovery_refresh_s`, in the background."""
        if self._refresher is None and not self._closed:
            # The first fetch is in flight before any request can arrive: requests join it
            # instead of spending the on-demand refetch.
            first = self._start_fetch(with_discovery=True)
            self._refresher = spawn(self._refresh_forever(first), "oidc-refresh")

    async def close(self) -> None:
        self._closed = True
        for task in (self._refresher, self._fetch_task, *self._opaque_inflight.values()):
            if task is not None:
                task.cancel()
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)

    async def _refresh_forever(self, first: asyncio.Task[bool]) -> None:
        ok = await asyncio.shield(first)
        while True:
            # A failed fetch is retried sooner, so a cold start recovers without traffic.
            await asyncio.sleep(self.config.discovery_refresh_s if ok
                                else min(self.config.jwks_min_refetch_s,
                                         self.config.discovery_refresh_s))
            ok = await self._fetch_shared(with_discovery=True)

    # --- JWT access tokens ------------------------------------------------------------------

    async def jwt_claims(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed token", reason="malformed") from None
        if any(name in header for name in UNSAFE_HEADERS):
            raise Unauthorized("token header names its own key (jku/x5u/x5c/jwk): refused",
                               reason="key_location_header")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise Unauthorized("token algorithm is not allowed", reason="algorithm")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("token key id (kid) is not a string", reason="bad_kid")
        key = self._key_for(kid)
        if key is None:
            await self._refetch_on_demand()
            key = self._key_for(kid)
            if key is None:
                if not self._keys_loaded:
                    raise IdpUnavailable(
                        "identity provider keys are not available yet (its JWKS could not be "
                        "fetched); retry shortly", retry_after=self._retry_after())
                raise Unauthorized("token signed by an unknown key (kid)", reason="unknown_kid")
        if alg not in key.algorithms:
            raise Unauthorized("token algorithm does not fit its key", reason="algorithm")
        audience = self.config.audience
        require = ["exp", "iss", "sub"] + (["aud"] if audience is not None else [])
        try:
            claims: Claims = jwt.decode(
                token, key.key, algorithms=[alg], issuer=self.config.issuer,
                audience=audience, leeway=self.config.leeway_s,
                options={"require": require, "verify_aud": audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(jwt_failure(exc), reason=jwt_reason(exc)) from None
        return claims

    def _key_for(self, kid: str | None) -> SigningKey | None:
        if kid is not None:
            return self._keys.get(kid)
        # No kid: acceptable only when the provider publishes exactly one key.
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    async def _refetch_on_demand(self) -> None:
        """An unknown kid refetches the JWKS at most once per `jwks_min_refetch_s`, whatever
        the traffic: concurrent callers share the fetch in flight, later ones wait the window."""
        if self._fetch_task is not None:
            await asyncio.shield(self._fetch_task)
            return
        now = self._clock()
        if now - self._last_on_demand < self.config.jwks_min_refetch_s:
            return
        self._last_on_demand = now
        await self._fetch_shared(with_discovery=False)

    def _retry_after(self) -> int:
        elapsed = self._clock() - self._last_on_demand  # inf: no on-demand fetch yet
        wait = self.config.jwks_min_refetch_s - elapsed if math.isfinite(elapsed) else 0
        return max(1, math.ceil(wait))

    async def _fetch_shared(self, *, with_discovery: bool) -> bool:
        return await asyncio.shield(self._start_fetch(with_discovery))

    def _start_fetch(self, with_discovery: bool) -> asyncio.Task[bool]:
        # A task, not an inline await: a caller that is cancelled (its client left) must not
        # cancel the fetch others are waiting for.
        if self._fetch_task is None:
            task = spawn(self._fetch(with_discovery), "oidc-jwks")
            self._fetch_task = task
            task.add_done_callback(self._fetch_done)
        return self._fetch_task

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        if self._fetch_task is task:
            self._fetch_task = None

    async def _fetch(self, with_discovery: bool) -> bool:
        try:
            if with_discovery or self._discovery is None:
                self._discovery = await self._fetch_discovery()
            status, body = await self._request("GET", self._discovery.jwks_uri)
            if status != 200 or not isinstance(body, dict) \
                    or not isinstance(body.get("keys"), list):
                raise IdpDown(f"JWKS answered HTTP {status} without a key set")
        except IdpDown as exc:
            log.warning("identity provider %s: %s (cached keys stay in use)",
                        self.config.issuer, exc)
            return False
        self._keys = parse_jwks(body["keys"], self._algorithms)
        self._keys_loaded = True
        return True

    async def _fetch_discovery(self) -> Discovery:
        url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        status, body = await self._request("GET", url)
        if status != 200 or not isinstance(body, dict):
            raise IdpDown(f"discovery answered HTTP {status}")
        if body.get("issuer") != self.config.issuer:
            raise IdpDown(f"discovery names the issuer {str(body.get('issuer'))[:200]!r}, "
                          f"not the configured {self.config.issuer!r}")
        jwks_uri = body.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise IdpDown("discovery has no usable jwks_uri")
        userinfo = body.get("userinfo_endpoint")
        return Discovery(jwks_uri, userinfo if isinstance(userinfo, str) else None)

    # --- opaque access tokens ---------------------------------------------------------------

    async def opaque_claims(self, token: str) -> Claims:
        """Introspection (or userinfo) claims of an active token; positive answers cached, keyed
        by the token's SHA-256, until min(token exp, cache_ttl_s)."""
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._opaque.get(digest)
        if hit is not None:
            if hit[0] > self._clock():
                return hit[1]
            del self._opaque[digest]
        task = self._opaque_inflight.get(digest)
        if task is None:
            task = spawn(self._lookup_opaque(token, digest), "oidc-opaque")
            self._opaque_inflight[digest] = task
            task.add_done_callback(lambda _t: self._opaque_inflight.pop(digest, None))
        result = await asyncio.shield(task)
        if isinstance(result, RouterError):
            raise result
        return result

    async def _lookup_opaque(self, token: str, digest: bytes) -> Claims | RouterError:
        # Failures are returned, not raised: this runs as a task, whose errors are logged.
        try:
            if self.config.introspection is not None:
                claims = await self._introspect(token)
            else:
                claims = await self._userinfo(token)
        except IdpDown as exc:
            log.warning("identity provider %s: %s", self.config.issuer, exc)
            return IdpUnavailable("identity provider is unavailable: the access token could "
                                  "not be checked; retry shortly",
                                  retry_after=OPAQUE_RETRY_AFTER_S)
        except RouterError as exc:
            return exc
        ttl = self.config.cache_ttl_s
        exp = claims.get("exp")
        if isinstance(exp, int | float):
            ttl = min(ttl, exp - time.time())
        if ttl > 0:
            if len(self._opaque) >= MAX_OPAQUE_CACHE:
                self._prune_opaque()
            self._opaque[digest] = (self._clock() + ttl, claims)
        return claims

    def _prune_opaque(self) -> None:
        now = self._clock()
        for digest in [d for d, (until, _) in self._opaque.items() if until <= now]:
            del self._opaque[digest]
        while len(self._opaque) >= MAX_OPAQUE_CACHE:  # oldest first
            del self._opaque[next(iter(self._opaque))]

    async def _introspect(self, token: str) -> Claims:
        intro = self.config.introspection
        assert intro is not None
        status, body = await self._request(
            "POST", intro.url, data={"token": token, "token_type_hint": "access_token"},
            headers={"Authorization": self._client_auth})
        if status != 200 or not isinstance(body, dict):
            # 401/403 here means the router's own client credentials were refused: the
            # token may be fine, so this is the provider's (or our config's) failure, not 401.
            raise IdpDown(f"introspection answered HTTP {status}")
        if body.get("active") is not True:
            raise Unauthorized("token is not active", reason="inactive")
        token_type = body.get("token_type")
        if isinstance(token_type, str) and token_type.lower() not in _ACCESS_TOKEN_TYPES:
            raise Unauthorized("token is not an access token", reason="token_type")
        self._check_introspected(body)
        if not isinstance(body.get("sub"), str) and isinstance(body.get("username"), str):
            body["sub"] = body["username"]
        return body

    def _check_introspected(self, claims: Claims) -> None:
        now = time.time()
        leeway = self.config.leeway_s
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if isinstance(exp, int | float) and exp < now - leeway:
            raise Unauthorized("token expired", reason="expired_signature")
        if isinstance(nbf, int | float) and nbf > now + leeway:
            raise Unauthorized("token not yet valid (nbf/iat in the future)",
                               reason="immature_signature")
        iss = claims.get("iss")
        if iss is not None and iss != self.config.issuer:
            raise Unauthorized("token has the wrong issuer", reason="invalid_issuer")
        aud, want = claims.get("aud"), self.config.audience
        if want is not None and aud is not None \
                and not (aud == want or (isinstance(aud, list) and want in aud)):
            raise Unauthorized("token has the wrong audience", reason="invalid_audience")

    async def _userinfo(self, token: str) -> Claims:
        if self._discovery is None:
            await self._fetch_shared(with_discovery=True)
        if self._discovery is None:
            raise IdpDown("discovery has not succeeded yet")
        url = self._discovery.userinfo_endpoint
        if url is None:
            raise Unauthorized("opaque tokens are not accepted: the identity provider has no "
                               "userinfo endpoint", reason="opaque_unsupported")
        status, body = await self._request("GET", url,
                                           headers={"Authorization": f"Bearer {token}"})
        if status != 200 or not isinstance(body, dict):  # 5xx are IdpDown already
            # Providers answer an unknown token with 401, 403 or even 400 (authlib).
            raise Unauthorized("the identity provider rejected the token", reason="rejected")
        self._check_introspected(body)
        # A userinfo answer proves the `openid` scope and nothing more.
        scope = body.get("scope")
        body["scope"] = " ".join({"openid", *(scope.split() if isinstance(scope, str) else ())})
        return body

    # --- HTTP -------------------------------------------------------------------------------

    async def _request(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        """Status and JSON body (None when not JSON); transport failures and 5xx are IdpDown."""
        if self._closed:
            raise IdpDown("the client is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout,
                                                  raise_for_status=False)
        try:
            async with self._session.request(method, url, allow_redirects=False,
                                             **kwargs) as resp:
                if resp.status >= 500:
                    raise IdpDown(f"{_where(url)} answered HTTP {resp.status}")
                raw = await resp.content.read(MAX_BODY + 1)
                if len(raw) > MAX_BODY:
                    raise IdpDown(f"{_where(url)} answered more than {MAX_BODY} bytes")
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise IdpDown(f"{_where(url)} unreachable ({type(exc).__name__})") from None
        try:
            return status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return status, None


class OidcVerifier:
    """The `IdpVerifier` of one runtime: an `OidcClient`'s claims -> a Principal."""

    def __init__(self, client: OidcClient, default_limits: Limits,
                 admin_claim: AdminClaim | None, users: Mapping[str, str]) -> None:
        self.client = client
        self.issuer = client.config.issuer
        self._users = users
        self.accepts_opaque = (client.config.introspection is not None
                               or client.config.userinfo)
        self._required = frozenset(client.config.required_scopes)
        self._limits = default_limits
        self._admin_claim = admin_claim

    async def verify_jwt(self, token: str) -> Principal:
        return self._principal(await self.client.jwt_claims(token))

    async def verify_opaque(self, token: str) -> Principal:
        return self._principal(await self.client.opaque_claims(token))

    def _principal(self, claims: Claims) -> Principal:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Unauthorized("token has no subject", reason="no_subject")
        scopes = token_scopes(claims)
        missing = self._required - scopes
        if missing:
            wanted = " ".join(sorted(self._required))
            raise Forbidden(f"token lacks the required scope(s): {' '.join(sorted(missing))}",
                            code="insufficient_scope",
                            headers={"WWW-Authenticate": f'Bearer realm="router", '
                                     f'error="insufficient_scope", scope="{wanted}"'})
        identity = idp_identity(self.issuer, sub)
        exp = claims.get("exp")
        return Principal(id=identity, kind="oauth2", user=self._users.get(sub, identity),
                         limits=self._limits, models=None, admin=self._is_admin(claims),
                         scopes=scopes, origin="oauth2",
                         expires_at=float(exp) if isinstance(exp, int | float) else None)

    def _is_admin(self, claims: Claims) -> bool:
        if self._admin_claim is None:
            return False
        value = claims.get(self._admin_claim.claim)
        want = self._admin_claim.value
        return value == want or (isinstance(value, list) and want in value)


def token_scopes(claims: Claims) -> frozenset[str]:
    """Scopes from a space-separated `scope` or an `scp` list (or string)."""
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return frozenset(found)


def parse_jwks(entries: list[Any], allowed: frozenset[str]) -> dict[str, SigningKey]:
    """kid -> parsed public key with the algorithms it may verify; others are skipped."""
    keys: dict[str, SigningKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        kty, crv = str(entry.get("kty")), entry.get("crv")
        fits = _BY_KTY.get((kty, None if kty == "RSA" else str(crv)), frozenset()) & allowed
        alg = entry.get("alg")
        if alg is not None:
            fits &= {alg}
        kid = entry.get("kid", "")
        if not fits or not isinstance(kid, str) or kid in keys:
            continue
        try:
            key = jwt.PyJWK(entry, algorithm=min(fits)).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            log.warning("identity provider key %r could not be parsed; skipped", kid[:64])
            continue
        keys[kid] = SigningKey(key, tuple(sorted(fits)))
    return keys


def _where(url: str) -> str:
    """The URL without its query (which might carry something private) for a log line."""
    return url.split("?", 1)[0][:200]
