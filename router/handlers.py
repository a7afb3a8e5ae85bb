"""Endpoint functions. Auth and errors are the pipeline's job (app.py); an upstream endpoint's
work is its stages' (stages.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from router import sessions
from router.body import read_body
from router.call import Call
from router.errors import Forbidden, ModelNotFound, NotFound
from router.metrics import CONTENT_TYPE
from router.prober import publish_backend_up
from router.responses import relay_stored
from router.schema import SAFE_ID
from router.state import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    LIMITER,
    METRICS,
    OPENAPI,
    PRINCIPAL,
    RESPONSE_PINS,
    RESPONSES,
    RUNTIME,
    RUNTIME_NOW,
    SESSIONS,
    STATUS,
    STORE,
)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /chat/completions: its stages (app.py) do the work."""
    return await request.app[CHAT](Call.of(request, "chat"))


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await request.app[EMBEDDINGS](Call.of(request, "embeddings"))


async def completions(request: web.Request) -> web.StreamResponse:
    return await request.app[COMPLETIONS](Call.of(request, "completions"))


async def responses(request: web.Request) -> web.StreamResponse:
    """POST /responses: its stages (app.py) do the work."""
    return await request.app[RESPONSES](Call.of(request, "responses"))


async def get_response(request: web.Request) -> web.StreamResponse:
    return await relay_stored(request, request.app[RESPONSE_PINS], request.app[LIMITER],
                              "GET")


async def delete_response(request: web.Request) -> web.StreamResponse:
    return await relay_stored(request, request.app[RESPONSE_PINS], request.app[LIMITER],
                              "DELETE")


async def cancel_response(request: web.Request) -> web.StreamResponse:
    return await relay_stored(request, request.app[RESPONSE_PINS], request.app[LIMITER],
                              "POST", "cancel")


async def list_input_items(request: web.Request) -> web.StreamResponse:
    return await relay_stored(request, request.app[RESPONSE_PINS], request.app[LIMITER],
                              "GET", "input_items")


async def get_settings(request: web.Request) -> web.Response:
    runtime = request[RUNTIME_NOW]
    settings = await request.app[SESSIONS].settings(request[PRINCIPAL].user, runtime.config)
    return _json(settings.view(runtime.table.default_route))


async def put_settings(request: web.Request) -> web.Response:
    """Replace the caller's automation settings (fields left out take the config's defaults)."""
    runtime = request[RUNTIME_NOW]
    principal = request[PRINCIPAL]
    raw = await read_body(request, sessions.MAX_SETTINGS_BYTES,
                          runtime.config.server.body_timeout_s)
    stored = sessions.parse_settings(raw, runtime.table.routes, principal)
    settings = await request.app[SESSIONS].put_settings(principal.user, stored, runtime.config)
    return _json(settings.view(runtime.table.default_route))


def _session_id(request: web.Request) -> str:
    """The path's session id; one that no request could have created is absent without asking
    the store."""
    session_id = request.match_info["id"]
    if not SAFE_ID.fullmatch(session_id):
        raise NotFound("no such session", code="session_not_found")
    return session_id


async def get_session(request: web.Request) -> web.Response:
    session_id = _session_id(request)
    pin = await request.app[SESSIONS].get(request[PRINCIPAL].user, session_id)
    if pin is None:
        raise NotFound("no such session", code="session_not_found")
    return _json(sessions.public(session_id, pin))


async def delete_session(request: web.Request) -> web.Response:
    if not await request.app[SESSIONS].delete(request[PRINCIPAL].user, _session_id(request)):
        raise NotFound("no such session", code="session_not_found")
    return web.Response(status=204)


async def issue_token(request: web.Request) -> web.Response:
    """Exchange an API key or an IdP access token for a router JWT (OAuth2-style answer)."""
    principal = request[PRINCIPAL]
    tokens = request[RUNTIME_NOW].auth.router_tokens
    if tokens is None or not tokens.can_issue:
        raise NotFound("token issuance is not configured (auth.jwt with a signing key)")
    if principal.kind == "router_jwt":
        raise Forbidden("exchange an API key or an IdP access token, not a router token",
                        code="token_exchange_refused")
    token, expires_in = tokens.issue(principal)
    resp = _json({"access_token": token, "token_type": "Bearer", "expires_in": expires_in})
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def list_models(request: web.Request) -> web.Response:
    runtime = request[RUNTIME_NOW]
    principal = request[PRINCIPAL]
    data = [_model(name) for name in runtime.table.routes if principal.may_use(name)]
    return _json({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """One route as a model object; a route this credential may not use is just as absent."""
    name = request.match_info["id"]
    if name not in request[RUNTIME_NOW].table.routes or not request[PRINCIPAL].may_use(name):
        raise ModelNotFound(f"the model {name[:100]!r} does not exist")
    return _json(_model(name))


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "router"}


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    publish_backend_up(request.app[RUNTIME], metrics)
    body = await asyncio.to_thread(metrics.render)  # multiprocess mode reads files
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def metrics_disabled(request: web.Request) -> web.Response:
    raise NotFound("metrics are off (metrics.enabled: false)", code="metrics_disabled")


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: a config is loaded (it always is once serving), not draining, and the store
    answers, unless `store.on_failure: open` lets us serve without it."""
    if request.app[STATUS].draining:
        return _json({"status": "draining"}, status=503)
    config = request.app[RUNTIME].current.config
    if config.store.on_failure == "closed" and not await request.app[STORE].ping():
        return _json({"status": "store unreachable"}, status=503)
    return _json({"status": "ready"})


async def openapi(request: web.Request) -> web.Response:
    routes = request[RUNTIME_NOW].table.routes
    return web.Response(body=request.app[OPENAPI].render(routes), content_type="application/json")


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status,
                        content_type="application/json")
