"""A small OpenID Connect provider on loopback: discovery, JWKS, introspection, userinfo.

Keys (RSA and EC) are added, dropped and rotated on demand; every endpoint counts its calls, and
`mode` scripts failures ("ok", "500", "slow"). `token()` mints JWT access tokens with the
current keys, `opaque()` registers an opaque token for introspection and userinfo.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

CLIENT_ID = "router-client"
CLIENT_SECRET = "router-client-secret"
AUDIENCE = "router-api"


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        algo = jwt.get_algorithm_by_name(self.alg)
        data: dict[str, Any] = json.loads(algo.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "alg": self.alg, "use": "sig"}


def new_key(alg: str = "RS256", kid: str | None = None) -> SigningKey:
    private: Any = (rsa.generate_private_key(public_exponent=65537, key_size=2048)
                    if alg.startswith(("RS", "PS")) else ec.generate_private_key(ec.SECP256R1()))
    return SigningKey(kid or f"{alg.lower()}-{secrets.token_hex(4)}", alg, private)


@dataclass
class FakeIdp:
    url: str = ""
    keys: list[SigningKey] = field(default_factory=list)  # published in the JWKS
    retired: list[SigningKey] = field(default_factory=list)  # still sign, no longer published
    calls: Counter[str] = field(default_factory=Counter)
    mode: str = "ok"  # "ok" | "500" | "slow": for every endpoint
    slow_s: float = 2.0
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)  # opaque token -> claims
    _runner: web.AppRunner | None = None

    @property
    def issuer(self) -> str:
        return self.url

    # --- keys and tokens --------------------------------------------------------------------

    def add_key(self, alg: str = "RS256", kid: str | None = None) -> SigningKey:
        key = new_key(alg, kid)
        self.keys.append(key)
        return key

    def drop_key(self, key: SigningKey) -> None:
        self.keys.remove(key)
        self.retired.append(key)

    def token(self, *, key: SigningKey | None = None, headers: dict[str, Any] | None = None,
              exp_in: float | None = 300, drop: tuple[str, ...] = (), **claims: Any) -> str:
        """A JWT access token: iss, aud, sub, scope, iat, exp by default; overrides in kwargs."""
        key = key or self.keys[0]
        now = int(time.time())
        body: dict[str, Any] = {"iss": self.issuer, "aud": AUDIENCE, "sub": "alice",
                                "scope": "openid chat", "iat": now,
                                "jti": secrets.token_hex(8)}
        if exp_in is not None:
            body["exp"] = now + int(exp_in)
        body.update(claims)
        for name in drop:
            body.pop(name, None)
        return jwt.encode(body, key.private, algorithm=key.alg,
                          headers={"kid": key.kid, **(headers or {})})

    def opaque(self, **claims: Any) -> str:
        token = "opq_" + secrets.token_urlsafe(24)
        self.tokens[token] = {"sub": "carol", "scope": "openid chat",
                              "exp": int(time.time()) + 300, **claims}
        return token

    # --- server -----------------------------------------------------------------------------

    async def start(self, port: int = 0) -> FakeIdp:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_post("/introspect", self._introspect)
        app.router.add_get("/userinfo", self._userinfo)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _misbehave(self) -> web.Response | None:
        if self.mode == "500":
            return web.json_response({"error": "server_error"}, status=500)
        if self.mode == "slow":
            await asyncio.sleep(self.slow_s)
        return None

    async def _discovery(self, request: web.Request) -> web.Response:
        self.calls["discovery"] += 1
        return await self._misbehave() or web.json_response({
            "issuer": self.issuer,
            "jwks_uri": f"{self.url}/jwks",
            "userinfo_endpoint": f"{self.url}/userinfo",
            "introspection_endpoint": f"{self.url}/introspect",
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        })

    async def _jwks(self, request: web.Request) -> web.Response:
        self.calls["jwks"] += 1
        return await self._misbehave() or web.json_response(
            {"keys": [k.jwk() for k in self.keys]})

    async def _introspect(self, request: web.Request) -> web.Response:
        self.calls["introspect"] += 1
        if (failed := await self._misbehave()) is not None:
            return failed
        expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {expected}":
            return web.json_response({"error": "invalid_client"}, status=401)
        form = await request.post()
        claims = self.tokens.get(str(form.get("token", "")))
        if claims is None:
            return web.json_response({"active": False})
        return web.json_response({"active": True, "iss": self.issuer, "token_type": "Bearer",
                                  "client_id": CLIENT_ID, **claims})

    async def _userinfo(self, request: web.Request) -> web.Response:
        self.calls["userinfo"] += 1
        if (failed := await self._misbehave()) is not None:
            return failed
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        claims = self.tokens.get(token) if scheme == "Bearer" else None
        if claims is None:
            return web.json_response({"error": "invalid_token"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return web.json_response({k: v for k, v in claims.items()
                                  if k not in ("exp", "scope")})


async def start_idp(*algs: str) -> FakeIdp:
    idp = FakeIdp()
    for alg in algs or ("RS256", "ES256"):
        idp.add_key(alg)
    return await idp.start()
