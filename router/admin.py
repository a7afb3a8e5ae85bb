"""Managed API keys and the usage report: the admin endpoints, and what `router keys` shares.

    POST   /api/v1/admin/keys       -> 201 {"id", "key": "sk-...", ...}  (the key, this once)
    GET    /api/v1/admin/keys       -> 200 {"object": "list", "data": [...]}  (never a key or hash)
    DELETE /api/v1/admin/keys/{id}  -> 204, 404 when unknown
    GET    /api/v1/admin/usage?from=&to=  -> 200 per-principal requests and tokens (usage.py)

Admin principals only (403 otherwise). The store keeps the key's SHA-256 digest, never the key.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from router import usage
from router.auth.api_keys import digest, new_key
from router.body import read_body
from router.config.model import Limits, StoreConfig, UserName
from router.errors import Forbidden, NotFound, ValidationFailed
from router.schema import WHOLE, parse_body
from router.state import PRINCIPAL, RUNTIME_NOW, STORE
from router.store import KeyRecord, KeyStore, open_store

T = TypeVar("T")

MAX_BODY_BYTES = 64 * 1024
KEY_ID = re.compile(r"key_[0-9a-f]{16}")


# A limit is a count: at most 2**53, which every JSON reader and the store hold exactly.
Count = Annotated[int, Field(gt=0, le=2**53), WHOLE]


class KeyLimits(Limits):
    """A new key's limits: the config's, each an integer (100.0 counts, 100.5 does not) of at
    most 2**53."""

    rpm: Count | None = None
    tpm: Count | None = None
    concurrency: Count | None = None
    tokens_per_day: Count | None = None


class NewKey(BaseModel):
    """The body of POST /api/v1/admin/keys (and the flags of `router keys create`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # Not `jwt:...` or `oidc:...`: the identities of other credential kinds.
    user: Annotated[UserName, Field(max_length=256, json_schema_extra={
        "not": {"pattern": "^(jwt|oidc):"}})]
    limits: KeyLimits | None = None  # null: auth.default_limits
    models: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=lambda: ["*"], min_length=1, max_length=1024)
    # ISO 8601; without a zone: UTC. One already past makes a key that never authenticates
    # (accepted as written: what is a valid instant does not depend on the clock).
    expires_at: datetime | None = None
    admin: bool = False


def parse_new_key(raw: bytes, routes: Collection[str]) -> NewKey:
    """Body bytes -> NewKey, or ValidationFailed in the 422 `detail` shape."""
    spec = parse_body(raw, NewKey)
    problems: list[dict[str, Any]] = []
    if spec.models != ["*"]:
        for i, name in enumerate(spec.models):
            if name not in routes:
                msg = ("'*' (every route) stands alone" if name == "*"
                       else f"unknown route {name[:100]!r}")
                problems.append({"loc": ["body", "models", i], "msg": msg,
                                 "type": "value_error"})
    if problems:
        raise ValidationFailed(problems)
    return spec


def new_record(spec: NewKey, now: float) -> tuple[str, KeyRecord]:
    """A fresh key and its record; the key is returned to be shown once, then forgotten."""
    key = new_key()
    record = KeyRecord(
        id="key_" + secrets.token_hex(8),
        digest=digest(key),
        user=spec.user,
        limits=spec.limits,
        models=tuple(spec.models),
        admin=spec.admin,
        created_at=now,
        expires_at=None if spec.expires_at is None else _epoch(spec.expires_at),
    )
    return key, record


def public(record: KeyRecord) -> dict[str, Any]:
    """What may be shown of a key: everything but the digest."""
    return {
        "id": record.id,
        "object": "api_key",
        "user": record.user,
        "limits": None if record.limits is None else record.limits.model_dump(exclude_none=True),
        "models": list(record.models),
        "admin": record.admin,
        "created_at": iso(record.created_at),
        "last_used_at": iso(record.last_used_at),
        "expires_at": iso(record.expires_at),
    }


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _epoch(at: datetime) -> float:
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).timestamp()


def require_admin(request: web.Request) -> None:
    """403 `admin_required` unless the caller is an admin principal."""
    if not request[PRINCIPAL].admin:
        raise Forbidden("this endpoint needs an admin credential", code="admin_required")


def _changed(request: web.Request) -> None:
    """This worker forgets its cached keys now; the others see the store's version move."""
    managed = request[RUNTIME_NOW].auth.managed
    if managed is not None:
        managed.cache.changed()


def _json(payload: Any, status: int = 200) -> web.Response:
    resp = web.Response(body=orjson.dumps(payload), status=status,
                        content_type="application/json")
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def create_key(request: web.Request) -> web.Response:
    require_admin(request)
    runtime = request[RUNTIME_NOW]
    raw = await read_body(request, MAX_BODY_BYTES, runtime.config.server.body_timeout_s)
    now = time.time()
    spec = parse_new_key(raw, runtime.table.routes)
    key, record = new_record(spec, now)
    await request.app[STORE].create_key(record)
    _changed(request)
    return _json({**public(record), "key": key}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    require_admin(request)
    records = await request.app[STORE].list_keys()
    return _json({"object": "list", "data": [public(r) for r in records]})


async def revoke_key(request: web.Request) -> web.Response:
    require_admin(request)
    key_id = request.match_info["id"]
    if not KEY_ID.fullmatch(key_id) or not await request.app[STORE].revoke_key(key_id):
        raise NotFound(f"no API key with id {key_id[:64]!r}", code="key_not_found")
    _changed(request)
    return web.Response(status=204)


async def usage_report(request: web.Request) -> web.Response:
    require_admin(request)
    first, end = usage.report_window(request.query, time.time())
    counts = await request.app[STORE].usage(first, end)
    return _json(usage.report(first, end, counts))


CLI_TIMEOUT_S = 5.0  # `router keys` is not on the request path: a slower network is fine


async def with_store(config: StoreConfig, op: Callable[[KeyStore], Awaitable[T]]) -> T:
    """Run one `router keys` operation against the configured store, then close it."""
    store = open_store(config, timeout_s=max(CLI_TIMEOUT_S, config.timeout_ms / 1000))
    try:
        return await op(store)
    finally:
        await store.close()
