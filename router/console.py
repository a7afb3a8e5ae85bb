"""The operator console: this worker's view of the world, a hand on the wheel, and the page.

    GET  /api/v1/admin/status            -> 200 status.py's document
    POST /api/v1/admin/backends/drain    {"backend": NAME} -> 200 {"backend", "drained": true,
                                            "changed", "scope"}   (404 for an unknown backend)
    POST /api/v1/admin/backends/undrain  {"backend": NAME} -> 200 {..., "drained": false, ...}
    GET  /admin                          -> console.html (served without a credential: the page
                                            asks for an admin key and sends it as Authorization)

The API is for admin principals only (403 `admin_required`). `scope` says who sees a drain:
`store` (every replica sharing the store, within a second) or `process` (`memory://`: this
process only).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from router.admin import require_admin
from router.body import read_body
from router.errors import NotFound
from router.schema import parse_body
from router.state import (
    CONFIG_STATUS,
    DRAINS,
    METRICS,
    PRINCIPAL,
    RUNTIME_NOW,
    STATUS,
    STORE,
)
from router.status import status_document

log = logging.getLogger("router.console")

MAX_BODY_BYTES = 4096


class DrainRequest(BaseModel):
    """The body of POST /api/v1/admin/backends/drain (and /undrain): a backend's name as the
    status lists it (`provider/model`, or the backend's `name` in the config)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    backend: Annotated[str, Field(min_length=1, max_length=512)]


async def admin_status(request: web.Request) -> web.Response:
    require_admin(request)
    runtime, status = request[RUNTIME_NOW], request.app[STATUS]
    assert status.store is not None
    healthy = await request.app[STORE].ping()
    return _json(status_document(runtime.table, status.workers, request.app[CONFIG_STATUS],
                                 status.store, healthy, status.started_at))


async def drain_backend(request: web.Request) -> web.Response:
    return await _set_drained(request, drained=True)


async def undrain_backend(request: web.Request) -> web.Response:
    return await _set_drained(request, drained=False)


async def _set_drained(request: web.Request, *, drained: bool) -> web.Response:
    require_admin(request)
    runtime = request[RUNTIME_NOW]
    raw = await read_body(request, MAX_BODY_BYTES, runtime.config.server.body_timeout_s)
    name = parse_body(raw, DrainRequest).backend
    drains = request.app[DRAINS]
    known = {b.name for b in runtime.table.backends()}
    # A drained backend the config no longer has may still be undrained (it keeps its drain
    # in the store, should it come back).
    if name not in known and (drained or name not in drains.names):
        raise NotFound(f"no backend named {name[:100]!r}", code="backend_not_found")
    changed = await (drains.drain(name) if drained else drains.undrain(name))
    action = "drain" if drained else "undrain"
    request.app[METRICS].admin_action(action)
    log.warning("backend %s %s by %s (%s; scope: %s)", name,
                "drained" if drained else "undrained", request[PRINCIPAL].id,
                "changed" if changed else "no change", drains.scope)
    return _json({"backend": name, "drained": drained, "changed": changed,
                  "scope": drains.scope})


def _json(payload: Any) -> web.Response:
    resp = web.Response(body=orjson.dumps(payload), content_type="application/json")
    resp.headers["Cache-Control"] = "no-store"
    return resp


# -- The page --------------------------------------------------------------------------------------

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


@dataclass(frozen=True)
class Page:
    """console.html and the Content-Security-Policy that lets only its own inline script and
    style run (by their hashes): no other script, style, image, frame or form target, and
    requests only to this origin."""

    body: bytes
    csp: str

    @classmethod
    def load(cls, path: Path) -> Page:
        body = path.read_bytes()
        hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
        for kind, content in _INLINE.findall(body):
            digest = base64.b64encode(hashlib.sha256(content).digest()).decode()
            hashes[kind].append(f"'sha256-{digest}'")
        csp = "; ".join([
            "default-src 'none'",
            "script-src " + " ".join(hashes[b"script"]),
            "style-src " + " ".join(hashes[b"style"]),
            "connect-src 'self'",
            "img-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ])
        return cls(body, csp)


PAGE = Page.load(Path(__file__).with_name("console.html"))  # read once, at import


async def console_page(request: web.Request) -> web.Response:
    resp = web.Response(body=PAGE.body, content_type="text/html", charset="utf-8")
    resp.headers.update({
        "Content-Security-Policy": PAGE.csp,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    })
    return resp
