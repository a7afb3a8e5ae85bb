"""The Responses API's state: a response the upstream stored lives only on the backend that
created it, so each created response id is pinned to that backend in the store every replica
shares (the session pin's machinery, under the creating principal's user), and every later
request that names it goes there: `previous_response_id` in a new response, and GET, DELETE,
cancel and input_items on the response itself. Another user's response id is just as absent
as an unknown one: 404 `response_not_found`, without an upstream call.

A pin is named `resp/{id}`: a session id cannot hold a `/`, so no session can name one. It
lives `sessions.ttl_s` from its last use (its creation, a later response continuing it, or a
call on the response itself); DELETE of the response forgets it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from urllib.parse import urlencode

import orjson
from aiohttp import web

from router.call import Call
from router.errors import (
    NotFound,
    RouterError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from router.limits import Limiter, Ticket, Used
from router.metrics import Metrics
from router.providers.base import Exchange, StoredCall, StoredResponses, leaks_secret, read_all
from router.providers.sse import event_data
from router.routing.dispatch import count_upstream_failure
from router.routing.table import Backend, Route, RoutingTable
from router.schema import SAFE_ID
from router.stages import Stage
from router.state import ANSWER_HEADERS, FACTS, METRICS, PRINCIPAL, REQUEST_ID, RUNTIME_NOW
from router.store import SessionStore, StoreError
from router.store.base import Pin, SessionQuery
from router.tasks import count_failure
from router.tracing import trace_headers

log = logging.getLogger("router.responses")

MAX_FIRST_EVENT = 1 << 20  # a stream's first event is read this far at most for its id
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")
# Query parameters of GET on a stored response that go upstream (`stream` would turn the
# answer into a stream, which these endpoints relay whole: it stays behind).
_QUERY_DROPPED = frozenset({"stream", "api-version"})
NOTHING_USED = Used((0, 0), 0)  # a stored response's calls use no tokens


class ResponseConflict(RouterError):
    status = 409
    type = "invalid_request_error"
    code = "response_route_mismatch"
    log_level = logging.INFO


def response_not_found() -> NotFound:
    return NotFound("no such response", code="response_not_found")


def pin_name(response_id: str) -> str:
    return f"resp/{response_id}"


class ResponsePins:
    """Response ids and the backends that created them, per user, in the store. A pin is
    found in the admission's round trip when the request has limits (read there, counted
    after it is admitted), else in one call that also slides its TTL."""

    def __init__(self, store: SessionStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._slid = count_failure(metrics, "use_pin", "slide a response pin")

    async def pin(self, user: str, response_id: str, backend: Backend, route: Route,
                  ttl_s: float) -> None:
        """Pin the response to `backend`; a store failure is counted and logged (the answer
        still goes to the client: it exists upstream whether or not the router remembers)."""
        try:
            await self._store.claim_pin(user, pin_name(response_id), backend.name, route.name,
                                        ttl_s, None)
        except StoreError as exc:
            self._metrics.store_error("claim_pin")
            log.warning("could not pin a response to its backend: %s", exc)

    @staticmethod
    def query(user: str, response_id: str, ttl_s: float) -> SessionQuery:
        """What the admission asks the store about a response named by the request (its TTL
        slides to `ttl_s`, whatever the user's session settings)."""
        return SessionQuery(user, pin_name(response_id), ttl_s, fixed_ttl=True)

    async def find(self, query: SessionQuery, ticket: Ticket | None) -> Pin | None:
        """The user's pin (None: not theirs, unknown, or expired), its TTL slid: from the
        admission's answer (`ticket`) when it asked, else in one store call."""
        asked = None if ticket is None else ticket.session
        if asked is None or not asked.available:
            return (await self._store.session_state(query)).pin
        if asked.pin is not None and not asked.touched:  # read with the admission: use it now
            assert query.session_id is not None
            sent = self._store.use_pin(query.user, query.session_id, query.default_ttl_s)
            sent.add_done_callback(self._slid)
        return asked.pin

    async def forget(self, user: str, response_id: str) -> None:
        try:
            await self._store.delete_pin(user, pin_name(response_id))
        except StoreError as exc:  # it expires on its own
            self._metrics.store_error("delete_pin")
            log.warning("could not forget a deleted response's pin: %s", exc)


def pinned_backend(table: RoutingTable, pin: Pin) -> tuple[Route, Backend] | None:
    """The backend a pin names, with a route that holds it (the pin's own first)."""
    routes = table.routes
    first = routes.get(pin.route)
    for route in ([first] if first is not None else []) + list(routes.values()):
        for backend in route.backends:
            if backend.name == pin.backend:
                return route, backend
    return None


class AskPrevious(Stage):
    """`previous_response_id`: its pin is asked for in the admission's round trip."""

    def __call__(self, call: Call) -> None:
        previous = call.body.get("previous_response_id")
        if previous is not None:
            call.previous = ResponsePins.query(call.principal.user, previous,
                                               call.runtime.config.sessions.ttl_s)


class FollowPrevious(Stage):
    """`previous_response_id`: the request goes to the backend that created that response (a
    backend of the route with the same name, else one of the same provider: the upstream
    keeps responses per account, not per model). No pin for this user: 404."""

    def __init__(self, pins: ResponsePins) -> None:
        self.pins = pins

    def __call__(self, call: Call) -> Awaitable[None] | None:
        if call.previous is None:
            return None
        return self._follow(call, call.previous)

    async def _follow(self, call: Call, previous: SessionQuery) -> None:
        route = call.route
        assert route is not None
        pin = await self.pins.find(previous, call.ticket)
        if pin is None:
            raise response_not_found()
        backend = next((b for b in route.backends if b.name == pin.backend), None)
        if backend is None:
            provider = pin.backend.partition("/")[0]
            backend = next((b for b in route.backends if b.provider.name == provider), None)
        if backend is None:
            raise ResponseConflict(f"the previous response was made by a backend the model "
                                   f"{route.name!r} does not use; use the model {pin.route!r}")
        call.prefer = backend


class PinResponse(Stage):
    """The created response's id, pinned to the backend that answered before the client sees
    the id: from the JSON answer, or from a stream's first event (`response.created`; only
    that event is parsed). A client may name the id at once, to any replica."""

    def __init__(self, pins: ResponsePins) -> None:
        self.pins = pins

    def __call__(self, call: Call) -> Awaitable[None]:
        return self._pin(call)

    async def _pin(self, call: Call) -> None:
        opened, route = call.opened, call.route
        assert opened is not None and route is not None
        if not call.stream:
            response_id = _id_of(_json(opened.first))
        else:
            event = await _first_event(call)
            payload = None if event is None else _json(event_data(event))
            response = None if payload is None else payload.get("response")
            response_id = _id_of(response if isinstance(response, dict) else None)
        if response_id is not None:
            await self.pins.pin(call.principal.user, response_id, opened.backend, route,
                                call.runtime.config.sessions.ttl_s)


def _json(raw: bytes) -> dict[str, object] | None:
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _id_of(response: dict[str, object] | None) -> str | None:
    """A response's id, if it is one a request could name (SAFE_ID)."""
    response_id = None if response is None else response.get("id")
    return response_id if isinstance(response_id, str) and SAFE_ID.fullmatch(response_id) \
        else None


async def _first_event(call: Call) -> bytes | None:
    """The stream's first whole event; the first chunk is extended with the bytes this took
    (the relay still writes every byte as it came)."""
    opened = call.opened
    assert opened is not None
    first = opened.first
    while True:
        ends = [at + len(end) for end in _EVENT_ENDS if (at := first.find(end)) >= 0]
        if ends:
            return first[:min(ends)]
        if len(first) > MAX_FIRST_EVENT:
            return None
        more = await anext(opened.exchange.chunks, b"")
        if not more:
            return None
        first = opened.first = first + more


async def relay_stored(request: web.Request, pins: ResponsePins, limiter: Limiter,
                       method: str, action: str = "") -> web.Response:
    """GET, DELETE or POST (cancel) on a stored response of the caller's: forwarded to the
    backend that created it, with the client's query, and its answer relayed as it came.
    Admitted like any request that uses no tokens (one request against `rpm`, a slot against
    `concurrency`), with the pin asked in the same store round trip."""
    facts = request[FACTS]
    facts.endpoint = "responses"  # counted in the request metrics like the POST
    response_id = request.match_info["id"]
    if not SAFE_ID.fullmatch(response_id):
        raise response_not_found()  # no request could have created it: no store call
    runtime, principal = request[RUNTIME_NOW], request[PRINCIPAL]
    pin_query = pins.query(principal.user, response_id, runtime.config.sessions.ttl_s)
    ticket = await limiter.admit(principal, {}, runtime.config, session=pin_query,
                                 tokens=False)
    if ticket is not None:
        request[ANSWER_HEADERS] = ticket.headers  # an error carries them too
    try:
        resp = await _relay_stored(request, pins, pin_query, ticket, method, action)
    finally:
        limiter.settle(ticket, NOTHING_USED)
    if ticket is not None:
        resp.headers.update(ticket.headers)
    return resp


async def _relay_stored(request: web.Request, pins: ResponsePins, pin_query: SessionQuery,
                        ticket: Ticket | None, method: str, action: str) -> web.Response:
    facts, runtime, metrics = request[FACTS], request[RUNTIME_NOW], request.app[METRICS]
    pin = await pins.find(pin_query, ticket)
    if pin is None:
        raise response_not_found()
    found = pinned_backend(runtime.table, pin)
    if found is None or not isinstance(found[1].provider, StoredResponses):
        raise NotFound("the backend that made this response is no longer configured",
                       code="response_not_found")
    route, backend = found
    facts.route, facts.backend = route.name, backend.name
    response_id = request.match_info["id"]
    query_string = "" if method != "GET" else urlencode(
        [(k, v) for k, v in request.rel_url.query.items() if k not in _QUERY_DROPPED])
    stored = StoredCall(method, response_id, action, query_string, request[REQUEST_ID],
                        route.timeouts, trace_headers(request.headers))
    exchange = await _ask(found[1].provider, stored, route, backend, metrics)
    try:
        body = await read_all(exchange.chunks, runtime.config.server.max_response_bytes)
    finally:
        exchange.close()
    status = exchange.status
    if status >= 400 and leaks_secret(body.decode("utf-8", "replace"), backend.provider.secrets):
        body = orjson.dumps({"error": {"message": f"upstream answered HTTP {status}",
                                       "type": "upstream_error", "code": None}})
    elif method == "DELETE" and 200 <= status < 300:
        await pins.forget(pin_query.user, response_id)
    resp = web.Response(status=status, body=body,
                        headers={"x-router-backend": backend.name})
    resp.content_type = exchange.content_type.partition(";")[0].strip() or "application/json"
    return resp


async def _ask(provider: StoredResponses, call: StoredCall, route: Route, backend: Backend,
               metrics: Metrics) -> Exchange:
    """The backend's answer, asked again up to the route's `retries` times when the request
    could not reach it (nothing was sent), or for a GET (reading twice changes nothing) when
    its connection broke before the answer (not after a timeout: waiting that long again
    helps nobody). Failures count towards the backend's ejection, as a chat request's do."""
    attempt = 0
    while True:
        try:
            exchange = await provider.stored_response(call)
        except UpstreamError as exc:
            count_upstream_failure(route, backend, metrics, exc.code or "error")
            again = isinstance(exc, UpstreamUnavailable) or (
                call.method == "GET" and not isinstance(exc, UpstreamTimeout))
            if not again or attempt >= route.config.retries:
                raise
            attempt += 1
            metrics.retried(route.name, exc.code or "error")
        else:
            backend.state.record_success()
            return exchange
