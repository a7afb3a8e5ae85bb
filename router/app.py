"""build_app(): the request pipeline, outermost first.

    request id -> error boundary -> auth -> handler

Each stage is one middleware below; handlers.py holds the endpoints.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from router import handlers
from router.errors import InternalError, MethodNotAllowed, NotFound, PayloadTooLarge, RouterError
from router.relay import ActiveStreams
from router.runtime import RuntimeRef
from router.state import (
    PRINCIPAL,
    REQUEST_ID,
    RUNTIME,
    RUNTIME_NOW,
    STATUS,
    STORE,
    STREAMS,
    UPSTREAM,
    ServerStatus,
)
from router.store import Store
from router.upstream import UpstreamClient

log = logging.getLogger("router.app")
access = logging.getLogger("router.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Everything else requires a credential: forgetting to protect a new route is impossible.
UNAUTHENTICATED = frozenset({"/healthz", "/readyz", "/openapi.json"})

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@web.middleware
async def request_id_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Names the request, counts it in flight, and writes its access-log line."""
    given = request.headers.get("x-request-id")
    request[REQUEST_ID] = given if given and _REQUEST_ID_OK.match(given) else os.urandom(12).hex()
    request[RUNTIME_NOW] = request.app[RUNTIME].current
    status = request.app[STATUS]
    status.inflight += 1
    started = time.monotonic()
    code = 499
    try:
        resp = await handler(request)
        code = resp.status
        return resp
    finally:
        status.inflight -= 1
        if request[RUNTIME_NOW].config.logging.access_log:
            principal = request.get(PRINCIPAL)
            access.info("request", extra={"access": {
                "request_id": request[REQUEST_ID],
                "method": request.method,
                "path": request.path,
                "status": code,
                "principal": principal.id if principal else None,
                "duration_ms": round((time.monotonic() - started) * 1000, 3),
            }})


@web.middleware
async def error_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The only place that catches Exception: every failure leaves as the contract's shape."""
    try:
        return await handler(request)
    except RouterError as exc:
        log.log(exc.log_level, "%s %s -> %d %s", request.method, request.path, exc.status,
                exc.message)
        return exc.to_response()
    except web.HTTPException as exc:
        if exc.status == 404:
            return NotFound(f"no such endpoint: {request.method} {request.path[:200]}") \
                .to_response()
        if exc.status == 405:
            return MethodNotAllowed(f"method {request.method} is not allowed here").to_response()
        if exc.status == 413:
            return PayloadTooLarge("request body is too large").to_response()
        if exc.status < 400:
            raise
        return _http_error(exc)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return InternalError("internal error").to_response()


def _http_error(exc: web.HTTPException) -> web.Response:
    class _Err(RouterError):
        status = exc.status
        type = "invalid_request_error"
        code = None

    return _Err(exc.reason).to_response()


@web.middleware
async def auth_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path not in UNAUTHENTICATED:
        authenticator = request[RUNTIME_NOW].auth
        request[PRINCIPAL] = authenticator.authenticate(request.headers.getall("Authorization", []))
    return await handler(request)


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers["x-request-id"] = rid


def build_app(ref: RuntimeRef, upstream: UpstreamClient, store: Store) -> web.Application:
    app = web.Application(
        middlewares=[request_id_stage, error_stage, auth_stage],
        client_max_size=ref.current.config.server.max_body_bytes,
    )
    app[RUNTIME] = ref
    app[STREAMS] = ActiveStreams()
    app[STATUS] = ServerStatus()
    app[UPSTREAM] = upstream
    app[STORE] = store
    app.on_response_prepare.append(_stamp_request_id)
    for prefix in ("/api/v1", "/v1"):
        app.router.add_post(f"{prefix}/chat/completions", handlers.chat_completions)
        app.router.add_get(f"{prefix}/models", handlers.list_models, allow_head=False)
    app.router.add_get("/healthz", handlers.healthz, allow_head=False)
    app.router.add_get("/readyz", handlers.readyz, allow_head=False)
    app.router.add_get("/openapi.json", handlers.openapi, allow_head=False)
    return app
