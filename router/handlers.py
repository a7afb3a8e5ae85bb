"""Thin endpoint functions: parse -> route -> relay. Auth and errors are the pipeline's job."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from router import sessions
from router.auth import Principal
from router.body import read_body, wants_stream
from router.errors import (
    Forbidden,
    ModelNotFound,
    NotFound,
    Overloaded,
    RouterError,
)
from router.limits import Used
from router.metrics import CONTENT_TYPE
from router.prober import publish_backend_up
from router.relay import relay_json, relay_stream
from router.routing.dispatch import Opened, dispatch
from router.routing.fanout import fan_out
from router.routing.table import Route
from router.runtime import Runtime
from router.schema import SAFE_ID, parse_chat_request
from router.state import (
    ANSWER_HEADERS,
    FACTS,
    LIMITER,
    METRICS,
    OPENAPI,
    PRINCIPAL,
    REQUEST_ID,
    RUNTIME,
    RUNTIME_NOW,
    SETTINGS_CACHE,
    STATUS,
    STORE,
    STREAMS,
)
from router.store import StoreError
from router.store.base import SessionState


async def chat_completions(request: web.Request) -> web.StreamResponse:
    runtime = request[RUNTIME_NOW]
    principal = request[PRINCIPAL]
    config = runtime.config
    server = config.server
    body = parse_chat_request(await read_body(request, server.max_body_bytes,
                                              server.body_timeout_s))
    stream = wants_stream(body.get("stream"), request.headers.get("Accept"))
    facts = request[FACTS]
    facts.stream = stream
    name: str | None = body.get("model")
    if name is not None:  # else the user's default_model, known once the settings are read
        _route_for(runtime, principal, name)
    streams = request.app[STREAMS]
    if stream and len(streams) >= server.max_streams:
        raise Overloaded("too many open streams; retry shortly", headers={"Retry-After": "1"})
    body["stream"] = stream
    session_id: str | None = body.get("session_id")
    # Admission: after the route is known, before anything goes upstream. The user's session
    # settings and pin come back in the same store round trip.
    # Without a session_id, settings this worker read lately are enough: no store call at all
    # unless the principal has limits.
    settings_cache = request.app[SETTINGS_CACHE]
    known, stored = settings_cache.get(principal.user) if session_id is None else (False, None)
    query = None if known else sessions.query(principal, session_id, config)
    limiter = request.app[LIMITER]
    metrics = request.app[METRICS]
    store = request.app[STORE]
    ticket = await limiter.admit(principal, body, config, session=query)
    headers = dict(ticket.headers) if ticket is not None else {}
    inflight = None
    opened: Opened | None = None
    try:
        if query is None:
            state = SessionState(stored, None)
        else:
            state = ticket.session if ticket is not None and ticket.session is not None \
                else await sessions.read_state(store, query, config, metrics)
            if state.available:
                settings_cache.put(principal.user, state.settings)
        settings = sessions.effective(state.settings, config.sessions)
        if name is None:
            name = settings.default_model if settings.default_model in runtime.table.routes \
                else runtime.table.default_route
        route = _route_for(runtime, principal, name)
        facts.route = name
        fanout = route.config.fanout
        # `all` asks every backend: there is no one backend to pin a session to.
        created = session_id is None and settings.auto_create_session and fanout != "all"
        if created:
            session_id = sessions.new_session_id()
        placed = None
        if session_id is not None:
            headers["x-session-id"] = session_id
            if fanout != "all":
                placed = await sessions.place(store, metrics, config, runtime.table, route,
                                              principal.user, session_id, state,
                                              settings.session_ttl_s, created=created)
        inflight = metrics.in_flight(name)
        inflight.inc()
        if fanout == "none" or placed is not None:  # a pinned session ignores race and hedge
            opened = await dispatch(route, body, stream=stream, request_id=request[REQUEST_ID],
                                    max_response_bytes=server.max_response_bytes,
                                    metrics=metrics, prefer=placed)
        else:
            opened = await fan_out(route, body, stream=stream, request_id=request[REQUEST_ID],
                                   max_response_bytes=server.max_response_bytes,
                                   metrics=metrics)
        if session_id is not None and opened.backend is not placed \
                and not sessions.hashing_only(state, config):
            try:
                await sessions.settle(store, metrics, principal.user, session_id, route,
                                      placed, opened.backend, settings.session_ttl_s)
            except BaseException:  # cancelled (the client left): nobody will relay it
                opened.finish(upstream_failed=False)
                raise
        facts.backend = opened.backend.name
        facts.attempts = opened.attempts
        facts.ttfb_ms = round(opened.ttfb_s * 1000, 3)
        facts.tokens = opened.tokens
        headers["x-router-backend"] = opened.backend.name
        if stream:
            if created:
                opened.first = sessions.inject_first_event(opened.first, session_id or "")
            try:
                return await relay_stream(request, opened, headers, streams, metrics)
            finally:
                facts.tokens = opened.tokens  # the relay read them from the stream
        if created:
            opened.first = sessions.inject_json(opened.first, session_id or "")
        return relay_json(opened, headers)
    except (RouterError, StoreError):
        request[ANSWER_HEADERS] = headers
        raise
    finally:
        if inflight is not None:
            inflight.dec()
        # The answer ended, the client left, or it failed.
        limiter.settle(ticket, None if opened is None else Used(opened.tokens, opened.relayed()))


def _route_for(runtime: Runtime, principal: Principal, name: str) -> Route:
    route = runtime.table.routes.get(name)
    if route is None:
        raise ModelNotFound(f"the model {name[:100]!r} does not exist")
    if not principal.may_use(name):
        raise Forbidden(f"this credential may not use the model {name!r}")
    return route


async def get_settings(request: web.Request) -> web.Response:
    runtime = request[RUNTIME_NOW]
    stored = await request.app[STORE].get_settings(request[PRINCIPAL].user)
    settings = sessions.effective(stored, runtime.config.sessions)
    return _json(settings.view(runtime.table.default_route))


async def put_settings(request: web.Request) -> web.Response:
    """Replace the caller's automation settings (fields left out take the config's defaults)."""
    runtime = request[RUNTIME_NOW]
    principal = request[PRINCIPAL]
    raw = await read_body(request, sessions.MAX_SETTINGS_BYTES,
                          runtime.config.server.body_timeout_s)
    stored = sessions.parse_settings(raw, runtime.table.routes, principal)
    await request.app[STORE].put_settings(principal.user, stored)
    request.app[SETTINGS_CACHE].put(principal.user, stored)
    settings = sessions.effective(stored, runtime.config.sessions)
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
    pin = await request.app[STORE].get_pin(request[PRINCIPAL].user, session_id)
    if pin is None:  # another user's session is just as absent
        raise NotFound("no such session", code="session_not_found")
    return _json(sessions.public(session_id, pin))


async def delete_session(request: web.Request) -> web.Response:
    if not await request.app[STORE].delete_pin(request[PRINCIPAL].user, _session_id(request)):
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
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "router"}
            for name in runtime.table.routes if principal.may_use(name)]
    return _json({"object": "list", "data": data})


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
