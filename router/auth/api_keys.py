"""`sk-` API keys: looked up by SHA-256 digest; the plaintext is never stored."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from router.auth.principal import Principal
from router.config import ApiKeyConfig, Limits
from router.errors import Unauthorized


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class StaticKeys:
    """Keys from the YAML file (`auth.api_keys`), plus the optional loopback-only dev key."""

    def __init__(self, keys: Iterable[ApiKeyConfig], default_limits: Limits,
                 dev_key: str | None = None) -> None:
        self._by_digest: dict[str, Principal] = {}
        for key in keys:
            models = None if "*" in key.models else frozenset(key.models)
            self._by_digest[key.key_sha256] = Principal(
                id=key.id, kind="api_key", user=key.user,
                limits=key.limits or default_limits, models=models, admin=key.admin,
            )
        if dev_key is not None:
            self._by_digest[digest(dev_key)] = Principal(
                id="dev", kind="api_key", user="dev", limits=default_limits, models=None,
            )

    def verify(self, token: str) -> Principal:
        # Looked up by digest: timing can reveal at most a digest prefix, never the key.
        principal = self._by_digest.get(digest(token))
        if principal is None:
            raise Unauthorized("invalid API key", code="invalid_api_key", reason="unknown_key")
        return principal
