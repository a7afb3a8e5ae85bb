"""Who is calling: the one object every credential type turns into.

A principal's `user` is the identity its sessions and automation settings are kept under, and
its `id` the one its limits and usage are counted under. Both are namespaced by where the
credential comes from, so equal strings from different places never meet:

    API key (YAML or managed)       user: its configured name, e.g. `bob`; id: the key's id
    router JWT from `router token`  user and id: `jwt:<sub>`
    IdP access token                user and id: `oidc:<issuer>#<sub>`, or the router user
                                    `auth.oauth2.users` maps the subject to (id unchanged)
    router JWT from the exchange    the principal it was minted from, whatever its kind

API-key names and ids may not start with a reserved prefix (the config and the admin API
refuse them), so no configured name can pose as another kind's identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from router.config import Limits
from router.config.model import MANAGED_KEY_ID, RESERVED_PREFIXES

CredentialKind = Literal["api_key", "router_jwt", "oauth2"]
# The credential a principal stands for. A router JWT minted by the exchange endpoint keeps
# the origin of the credential it came from: it dies with that credential where it can.
Origin = Literal["config_key", "managed_key", "oauth2", "router_jwt"]
MINTED_ORIGINS: frozenset[str] = frozenset({"config_key", "managed_key", "oauth2"})

__all__ = ["MANAGED_KEY_ID", "MINTED_ORIGINS", "RESERVED_PREFIXES", "CredentialKind", "Origin",
           "Principal", "idp_identity", "jwt_identity"]


def jwt_identity(sub: str) -> str:
    """A subject of a router JWT issued directly (`router token issue --sub`)."""
    return f"jwt:{sub}"


def idp_identity(issuer: str, sub: str) -> str:
    """A subject of an identity provider. An issuer has no `#` (the config refuses one), so
    the pair reads back unambiguously."""
    return f"oidc:{issuer}#{sub}"


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    kind: CredentialKind
    user: str
    limits: Limits
    models: frozenset[str] | None  # None: every route
    admin: bool = False
    scopes: frozenset[str] = frozenset()
    origin: Origin = "config_key"
    expires_at: float | None = None  # the credential's own end (epoch s); None: none known

    def may_use(self, route: str) -> bool:
        return self.models is None or route in self.models
