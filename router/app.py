"""build_app(): the request pipeline, outermost first.

    request id -> error boundary -> auth -> handler

`pipeline` runs the stages in that order; handlers.py holds the endpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from router import routes
from router.access_log import AccessLog
from router.drains import Drains
from router.errors import (
    HttpError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RouterError,
    StoreUnavailable,
    Unauthorized,
)
from router.ids import request_id
from router.limits import Limiter
from router.log import redact, redact_message, redact_path
from router.metrics import Metrics
from router.relay import ActiveStreams, responses_stream_ended
from router.responses import AskPrevious, FollowPrevious, PinResponse, ResponsePins
from router.runtime import RuntimeRef
from router.schema import (
    SAFE_ID,
    OpenApiDocument,
    parse_chat_request,
    parse_completion_request,
    parse_embedding_request,
    parse_response_request,
)
from router.sessions import Sessions
from router.stages import (
    Admit,
    BeginSession,
    ChooseRoute,
    CountInFlight,
    FollowSession,
    Forward,
    Pipeline,
    PlaceByPrefix,
    PlaceSession,
    Read,
    ReadSession,
    Relay,
)
from router.state import (
    ACCESS_LOG,
    ANSWER_HEADERS,
    CHAT,
    COMPLETIONS,
    CONFIG_STATUS,
    DRAINS,
    EMBEDDINGS,
    FACTS,
    LIMITER,
    METRICS,
    OPEN_PATHS,
    OPENAPI,
    PRINCIPAL,
    REQUEST_ID,
    RESPONSE_PINS,
    RESPONSES,
    RUNTIME,
    RUNTIME_NOW,
    SESSIONS,
    STATUS,
    STORE,
    STREAMS,
    USAGE,
    Facts,
    ServerStatus,
)
from router.status import ConfigStatus
from router.store import Store, StoreError
from router.tracing import trace_id
from router.usage import UsageMeter

log = logging.getLogger("router.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The route table's open endpoints. Everything else requires a credential: forgetting to protect
# a new route is impossible. (`metrics.path` moves /metrics: build_app serves the moved table.)
UNAUTHENTICATED = routes.open_paths(routes.ENDPOINTS)


def request_pipeline(app: web.Application) -> Middleware:
    """The middleware that runs the stages in order, in one frame: request id -> error
    boundary -> auth -> handler. The app's parts it uses are looked up once, here.

    Each stage is a plain call below; one middleware instead of a chain of them saves a
    coroutine hop per stage on every request.
    """
    ref, status, metrics = app[RUNTIME], app[STATUS], app[METRICS]
    usage, access_log, open_paths = app[USAGE], app[ACCESS_LOG], app[OPEN_PATHS]

    @web.middleware
    async def pipeline(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        runtime = request[RUNTIME_NOW] = ref.current
        facts = request[FACTS] = Facts()
        name_request(request)
        status.inflight += 1
        resp: web.StreamResponse | None = None
        try:
            try:
                if request.path not in open_paths:
                    request[PRINCIPAL] = await runtime.auth.authenticate(
                        request.headers.getall("Authorization", []))
                resp = await handler(request)
            except Exception as caught:
                exc = translate(request, caught)
                resp = error_response(request, exc)
                facts.error = exc.code if isinstance(exc, RouterError) else "internal_error"
            return resp
        finally:
            status.inflight -= 1
            code = resp.status if resp is not None else 499
            if facts.endpoint is not None:
                metrics.request_done(facts.route, facts.backend, code, facts.stream,
                                     time.monotonic() - started, facts.endpoint)
                if runtime.config.usage.enabled:
                    principal = request.get(PRINCIPAL)
                    if principal is not None:
                        usage.record(principal, facts.tokens, code >= 400)
            if runtime.config.logging.access_log and access_log.enabled:
                log_access(access_log, request, facts, code, started)
    return pipeline


def name_request(request: web.Request) -> None:
    """The client's x-request-id when it is sane, else a new one; echoed and sent upstream."""
    given = request.headers.get("x-request-id")
    request[REQUEST_ID] = given if given and SAFE_ID.fullmatch(given) else request_id()


def translate(request: web.Request, exc: Exception) -> Exception:
    """Foreign failures a client should see as such, as RouterErrors: aiohttp's own refusals,
    and the store's failure (503, retry shortly). Anything else is a bug (500)."""
    if isinstance(exc, web.HTTPException):
        return _from_http(request, exc)
    if isinstance(exc, StoreError):
        return StoreUnavailable(str(exc))
    return exc


def error_response(request: web.Request, exc: Exception) -> web.Response:
    """The error boundary, the only place that catches Exception: every failure (translated)
    leaves in the contract's shape, without a stack trace."""
    if isinstance(exc, Unauthorized):
        request.app[METRICS].auth_failed(exc.credential, exc.reason)
    if isinstance(exc, RouterError):
        log.log(exc.log_level, "%s %s -> %d %s", redact(request.method),
                redact_path(request.path), exc.status, redact_message(exc.message))
        # What the answer already carried (rate-limit headers, x-session-id), under the error's.
        exc.headers = {**request.get(ANSWER_HEADERS, {}), **exc.headers}
        return exc.to_response()
    log.error("unhandled error on %s %s", redact(request.method), redact_path(request.path),
              exc_info=exc)
    return InternalError("internal error").to_response()


def _from_http(request: web.Request, exc: web.HTTPException) -> RouterError:
    if exc.status == 404:
        return NotFound(f"no such endpoint: {request.method} {request.path[:200]!r}")
    if exc.status == 405:
        allow = exc.headers.get("Allow")
        return MethodNotAllowed(f"method {request.method} is not allowed here",
                                headers={"Allow": allow} if allow else None)
    if exc.status == 413:
        return PayloadTooLarge("request body is too large")
    return HttpError(exc.status, exc.reason)


def log_access(access_log: AccessLog, request: web.Request, facts: Facts, status: int,
               started: float) -> None:
    """One line per request: who, what, where it went, how it went. Never a secret or a
    message's content (the path is logged without its query string, each of its segments
    through `redact`)."""
    principal = request.get(PRINCIPAL)
    access_log.write({
        "request_id": request[REQUEST_ID],
        "method": redact(request.method),
        "path": access_log.path(request.path),
        "status": status,
        "principal": principal.id if principal else None,
        "route": facts.route,
        "backend": facts.backend,
        "stream": facts.stream,
        "attempts": facts.attempts,
        "ttfb_ms": facts.ttfb_ms,
        "prompt_tokens": facts.tokens[0] if facts.tokens else None,
        "completion_tokens": facts.tokens[1] if facts.tokens else None,
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
        "error": facts.error,
        "trace_id": trace_id(request.headers),
    })


def _response_head(status: ServerStatus
                   ) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """What every response's head gets as it is sent: the request id; and while the server
    drains, `Connection: close`. A keep-alive client stays on the replica it reached for the
    connection's life whatever the load balancer decides (kube-proxy balances connections,
    not requests), so told to close it reconnects to a replica that stays, instead of
    sending its next request into the connection the drain's end closes."""

    async def finish_head(request: web.Request, response: web.StreamResponse) -> None:
        rid = request.get(REQUEST_ID)
        if rid is not None:
            response.headers["x-request-id"] = rid
        if status.draining:
            response.force_close()  # the connection ends after this answer ...
            response.headers["Connection"] = "close"  # ... and the client knows it
    return finish_head


def chat_stages(app: web.Application) -> Pipeline:
    """The work of POST /chat/completions, in order (router/stages.py)."""
    sessions, metrics, streams = app[SESSIONS], app[METRICS], app[STREAMS]
    return Pipeline([
        Read(parse_chat_request, streams),  # body, stream flag, the route when named
        BeginSession(sessions),  # what the admission asks about the session
        Admit(app[LIMITER]),  # limits: one store round trip; settled when the answer ends
        ReadSession(sessions),  # the user's settings in effect
        ChooseRoute(),
        PlaceSession(sessions, metrics),  # the session's id and its backend
        PlaceByPrefix(metrics),  # prefix_affinity, when no session placed it
        CountInFlight(metrics),
        Forward(metrics),  # dispatch, or fan-out
        FollowSession(sessions),  # a moved pin; a new session named in the answer
    ], Relay(streams, metrics))


def passthrough_stages(app: web.Application, parse: Callable[[bytes], dict[str, Any]], *,
                       streamed: bool = True) -> Pipeline:
    """The work of an endpoint that goes upstream without sessions or fan-out's merging
    (embeddings, text completions), in order: the same stages as chat's but those."""
    metrics, streams = app[METRICS], app[STREAMS]
    return Pipeline([
        Read(parse, streams, streamed=streamed),
        Admit(app[LIMITER]),
        ChooseRoute(),
        CountInFlight(metrics),
        Forward(metrics),
    ], Relay(streams, metrics))


def responses_stages(app: web.Application) -> Pipeline:
    """The work of POST /responses, in order: the passthrough stages, one backend at a time
    (a stored response lives on one), with `previous_response_id` followed to the backend
    that made it and the new response's id pinned to the one that answered."""
    metrics, streams, pins = app[METRICS], app[STREAMS], app[RESPONSE_PINS]
    return Pipeline([
        Read(parse_response_request, streams),
        AskPrevious(),  # the previous response's pin, asked with the admission
        Admit(app[LIMITER]),
        ChooseRoute(),
        FollowPrevious(pins),  # its backend, or 404 without an upstream call
        CountInFlight(metrics),
        Forward(metrics, fans_out=False),
        PinResponse(pins),  # JSON: before the answer is relayed; a stream: at its first event
    ], Relay(streams, metrics, responses_stream_ended))


def build_app(ref: RuntimeRef, store: Store, metrics: Metrics, *, drains: Drains,
              config_status: ConfigStatus) -> web.Application:
    """The app of one worker; `drains` and `config_status` are the worker's (server.py keeps
    them in step with the store and the config file)."""
    app = web.Application(client_max_size=ref.current.config.server.max_body_bytes)
    app[RUNTIME] = ref
    app[STREAMS] = ActiveStreams()
    started = ref.current.config  # the worker count and store hold until restart
    app[STATUS] = ServerStatus(workers=started.server.workers, store=started.store)
    app[STORE] = store
    app[METRICS] = metrics
    app[LIMITER] = Limiter(store, metrics, ref)
    app[SESSIONS] = Sessions(store, metrics)
    app[CHAT] = chat_stages(app)
    app[EMBEDDINGS] = passthrough_stages(app, parse_embedding_request, streamed=False)
    app[COMPLETIONS] = passthrough_stages(app, parse_completion_request)
    app[RESPONSE_PINS] = ResponsePins(store, metrics)
    app[RESPONSES] = responses_stages(app)
    app[USAGE] = UsageMeter(store, ref, metrics)
    app[DRAINS] = drains
    app[CONFIG_STATUS] = config_status
    # Like the listener, the metrics path is fixed until restart.
    table = routes.endpoints(ref.current.config.metrics.path, metrics.enabled)
    app[OPEN_PATHS] = routes.open_paths(table)
    app[ACCESS_LOG] = access_log = AccessLog(
        ref.current.config.logging,
        plain_paths=[path for endpoint in table for path in endpoint.paths if "{" not in path])
    app[OPENAPI] = OpenApiDocument(routes.openapi_document(table))
    app.on_response_prepare.append(_response_head(app[STATUS]))
    app.middlewares.append(request_pipeline(app))

    async def close_access_log(_: web.Application) -> None:
        access_log.close()
    app.on_cleanup.append(close_access_log)
    for endpoint in table:
        for path in endpoint.paths:
            app.router.add_route(endpoint.method, path, endpoint.handler)
    return app
