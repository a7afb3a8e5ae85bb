"""Who is calling: the one object every credential type turns into."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from router.config import Limits

CredentialKind = Literal["api_key", "router_jwt", "oauth2"]


@dataclass(frozen=True, slots=True)
class Principal:
    id: str
    kind: CredentialKind
    user: str
    limits: Limits
    models: frozenset[str] | None  # None: every route
    admin: bool = False
    scopes: frozenset[str] = frozenset()

    def may_use(self, route: str) -> bool:
        return self.models is None or route in self.models
