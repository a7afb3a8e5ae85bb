"""The stages of an upstream endpoint's work. Each reads the request's `Call` and extends it;
app.py lists them, outermost first, into one `Pipeline` per endpoint, which ends in the stage
that answers (`Relay`).

A stage is called with the call and returns None when it is done, or an awaitable when it must
wait (a body to read, a store to ask, an upstream to answer): most requests pass most stages
without waiting, and then without the cost of a coroutine. A stage that must act when the answer
ends (settle the limits, count the request out, release the upstream answer) has an
`end(call)`: it runs once the answer is over, however it ended (answered, failed, or the client
left), for every stage that ran, the last one first, as a middleware's `finally` would. The
pipeline runs the stages one after another rather than nested inside each other, so a request
that waits on I/O resumes through two frames, not ten.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import CoroutineType
from typing import Any, cast

from aiohttp import web

from router.auth import Principal
from router.body import read_body, wants_stream
from router.call import Call
from router.errors import (
    Forbidden,
    ModelNotFound,
    Overloaded,
    RouterError,
    UnsupportedEndpoint,
)
from router.limits import Limiter
from router.metrics import Metrics
from router.relay import ActiveStreams, relay_json, relay_stream
from router.routing.dispatch import Opened, Outbound, dispatch
from router.routing.fanout import fan_out
from router.routing.table import Route
from router.runtime import Runtime
from router.sessions import Sessions, inject_first_event, inject_json
from router.state import ANSWER_HEADERS
from router.store import StoreError
from router.store.base import SessionQuery, SessionState
from router.tracing import trace_headers

log = logging.getLogger("router.stages")

# The last stage: the response, or an awaitable of it (a stream is written as it arrives).
Answer = Callable[[Call], web.StreamResponse | Coroutine[Any, Any, web.StreamResponse]]


class Stage:
    """One step of the work: reads the call, sets its part of it (or raises a RouterError).
    Returns None when done, or an awaitable that finishes the step."""

    def __call__(self, call: Call) -> Awaitable[None] | None:
        raise NotImplementedError

    def end(self, call: Call) -> None:
        """Runs when the answer has ended, if this stage ran; should not raise (if it does,
        it is logged and the other stages' ends still run). A stage that has nothing to undo
        leaves it alone (the pipeline then skips it)."""


class Pipeline:
    """An endpoint's stages in order, then the one that answers. An error carries the headers
    the answer had gathered (rate limits, x-session-id)."""

    __slots__ = ("_answer", "_ends", "_stages")

    def __init__(self, stages: Sequence[Stage], answer: Answer) -> None:
        self._stages = tuple(stages)
        self._ends = tuple(s if type(s).end is not Stage.end else None for s in self._stages)
        self._answer = answer

    async def __call__(self, call: Call) -> web.StreamResponse:
        ran = 0
        try:
            for stage in self._stages:
                pending = stage(call)
                if pending is not None:
                    await pending
                ran += 1
            answer = self._answer(call)
            # A type test, not isinstance: StreamResponse is an ABC, slow to test against.
            if type(answer) is CoroutineType:
                return await cast(Coroutine[Any, Any, web.StreamResponse], answer)
            return cast(web.StreamResponse, answer)
        except (RouterError, StoreError):
            call.request[ANSWER_HEADERS] = call.headers
            raise
        finally:
            ends = self._ends
            while ran:
                ran -= 1
                ender = ends[ran]
                if ender is not None:
                    try:
                        ender.end(call)
                    except Exception:  # a bug: still give every other stage its end
                        log.exception("the end of stage %s failed", type(ender).__name__)


def route_for(runtime: Runtime, principal: Principal, name: str) -> Route:
    route = runtime.table.routes.get(name)
    if route is None:
        raise ModelNotFound(f"the model {name[:100]!r} does not exist")
    if not principal.may_use(name):
        raise Forbidden(f"this credential may not use the model {name!r}")
    return route


class Read(Stage):
    """The body, validated by `parse` (422 with a `detail` list), and whether the answer
    streams. A model named in the body is checked at once (404, 403), before any store call;
    so is the cap on open streams."""

    def __init__(self, parse: Callable[[bytes], dict[str, Any]],
                 streams: ActiveStreams, *, streamed: bool = True) -> None:
        self.parse = parse
        self.streams = streams
        self.streamed = streamed  # False: the endpoint never streams (embeddings)

    def __call__(self, call: Call) -> Awaitable[None]:
        return self._read(call)

    async def _read(self, call: Call) -> None:
        server = call.runtime.config.server
        body = self.parse(await read_body(call.request, server.max_body_bytes,
                                          server.body_timeout_s))
        stream = self.streamed and wants_stream(body.get("stream"),
                                                call.request.headers.get("Accept"))
        call.facts.stream = stream
        model = body.get("model")
        if model is not None:  # else the user's default model, known once settings are read
            call.route = route_for(call.runtime, call.principal, model)
            call.model = model
        if stream and len(self.streams) >= server.max_streams:
            raise Overloaded("too many open streams; retry shortly", headers={"Retry-After": "1"})
        if self.streamed:
            body["stream"] = stream
        call.body, call.stream = body, stream


class BeginSession(Stage):
    """What the admission asks the store about the request's session and the user's
    settings, in the same round trip (nothing, when this worker read the settings lately)."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def __call__(self, call: Call) -> None:
        call.session = self.sessions.begin(call.principal.user, call.body.get("session_id"),
                                           call.runtime.config)


class Admit(Stage):
    """The principal's limits: one store call admits and charges the request, or refuses it
    (429). When the answer ends, however it ends, the request is settled on what it used."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    def __call__(self, call: Call) -> Awaitable[None] | None:
        limiter = self.limiter
        if not limiter.limits(call.principal):
            return None  # no limits: no store call (ticket None)
        session = call.session
        query = call.previous if session is None else session.query
        if not limiter.at_once(query):
            return self._admit(call, query)
        ticket = call.ticket = limiter.admit_now(call.principal, call.body, call.runtime.config,
                                                 completes=call.endpoint != "embeddings")
        if ticket is not None:
            call.headers.update(ticket.headers)
        return None

    async def _admit(self, call: Call, query: SessionQuery | None) -> None:
        ticket = call.ticket = await self.limiter.admit(
            call.principal, call.body, call.runtime.config, session=query,
            completes=call.endpoint != "embeddings")
        if ticket is not None:
            call.headers.update(ticket.headers)

    def end(self, call: Call) -> None:
        self.limiter.settle(call.ticket, call.used())


class ReadSession(Stage):
    """The session's state and the user's settings in effect (from the admission's answer,
    else one store call); without a model in the body, the user's default model."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def __call__(self, call: Call) -> Awaitable[None] | None:
        session = call.session
        assert session is not None
        ticket = call.ticket
        asked = None if ticket is None else ticket.session
        if asked is None and session.query is not None:
            return self._fetch(call)  # not asked with an admission: one store call now
        self._settle(call, asked)
        return None

    async def _fetch(self, call: Call) -> None:
        assert call.session is not None
        await self.sessions.fetch(call.session, call.runtime.config)
        self._settle(call, None)

    def _settle(self, call: Call, asked: SessionState | None) -> None:
        assert call.session is not None
        settings = self.sessions.read(call.session, asked, call.runtime.config)
        if call.model is None and settings.default_model in call.runtime.table.routes:
            call.model = settings.default_model


class ChooseRoute(Stage):
    """The route: the model asked for, else the user's default model, else the config's
    `default_route`; it must serve the endpoint (400 `unsupported_endpoint` naming why)."""

    def __call__(self, call: Call) -> None:
        runtime = call.runtime
        if call.route is None:
            call.route = route_for(runtime, call.principal,
                                   call.model or runtime.table.default_route)
        route = call.route
        call.facts.route = route.name
        if call.endpoint not in route.endpoints:
            raise UnsupportedEndpoint(
                f"the model {route.name!r} does not serve {call.endpoint} (it serves "
                f"{', '.join(sorted(route.endpoints))}: its backends' providers, or its "
                "`endpoints`)")


class PlaceSession(Stage):
    """The session's id (the client's, or a new one) and the backend it goes to first."""

    def __init__(self, sessions: Sessions, metrics: Metrics) -> None:
        self.sessions = sessions
        self.metrics = metrics

    def __call__(self, call: Call) -> Awaitable[None] | None:
        session, route = call.session, call.route
        assert session is not None and route is not None
        session_id = self.sessions.name(session, route)
        if session_id is None:
            return None
        call.headers["x-session-id"] = session_id  # on an error answer too
        if route.config.fanout == "all":
            return None  # nothing to place: `all` asks every backend
        return self._place(call)

    async def _place(self, call: Call) -> None:
        session, route = call.session, call.route
        assert session is not None and route is not None
        affinity = route.affinity  # a new pin goes where the prompt's prefix is cached
        choose = None if affinity is None else \
            (lambda: affinity.place(route, call.body, self.metrics))
        call.prefer = await self.sessions.place(session, call.principal.user, route,
                                                call.runtime.config, call.runtime.table,
                                                choose)


class PlaceByPrefix(Stage):
    """A `prefix_affinity` route's request that no session placed: the backend its prompt
    prefix picks goes first (router/routing/affinity.py). Other routes: one attribute read."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def __call__(self, call: Call) -> None:
        route = call.route
        assert route is not None
        affinity = route.affinity
        if affinity is not None and call.prefer is None:
            call.prefer = affinity.place(route, call.body, self.metrics)


class CountInFlight(Stage):
    """The route's in-flight gauge, for as long as the request is being answered."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def __call__(self, call: Call) -> None:
        assert call.route is not None
        self.metrics.in_flight(call.route.name).inc()

    def end(self, call: Call) -> None:
        assert call.route is not None
        self.metrics.in_flight(call.route.name).dec()


class Forward(Stage):
    """The upstream answer: backends tried in order (strategy, retries, fallbacks) or, for a
    fanned-out route not pinned by a session, several at once. The answer is released when
    the request ends (the relay releases it itself; this covers a failure before it)."""

    def __init__(self, metrics: Metrics, *, fans_out: bool = True) -> None:
        self.metrics = metrics
        self.fans_out = fans_out  # False: one backend at a time, whatever the route's fanout

    def __call__(self, call: Call) -> Awaitable[None]:
        return self._forward(call)

    async def _forward(self, call: Call) -> None:
        route = call.route
        assert route is not None
        out = Outbound(call.body, call.stream, call.request_id,
                       call.runtime.config.server.max_response_bytes, self.metrics,
                       trace_headers(call.request.headers), call.endpoint)
        if route.config.fanout == "none" or call.prefer is not None or not self.fans_out:
            opened = await dispatch(route, out, call.prefer)  # a pin ignores race and hedge
        else:
            opened = await fan_out(route, out)
        call.opened = opened
        facts = call.facts
        facts.backend = opened.backend.name
        facts.attempts = opened.attempts
        facts.ttfb_ms = round(opened.ttfb_s * 1000, 3)
        facts.tokens = opened.tokens
        call.headers["x-router-backend"] = opened.backend.name

    def end(self, call: Call) -> None:
        if call.opened is not None:
            call.opened.finish(upstream_failed=False)  # a no-op once the relay finished it


class FollowSession(Stage):
    """A session whose placed backend failed moves to the one that answered; a session the
    router just made is named in the answer (`session_id`, the one rewrite of upstream bytes)."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def __call__(self, call: Call) -> Awaitable[None] | None:
        session, opened = call.session, call.opened
        assert session is not None and opened is not None
        if session.created and session.id is not None:
            inject = inject_first_event if call.stream else inject_json
            opened.first = inject(opened.first, session.id)
        if session.placed is None or session.placed is opened.backend:
            return None  # answered where it was placed: the pin stays
        return self._follow(call)

    async def _follow(self, call: Call) -> None:
        session, route, opened = call.session, call.route, call.opened
        assert session is not None and route is not None and opened is not None
        await self.sessions.follow(session, call.principal.user, route, opened.backend,
                                   call.runtime.config)


class Relay:
    """The answer to the client: a JSON body whole, or the stream event by event. Every
    pipeline that goes upstream ends in it."""

    def __init__(self, streams: ActiveStreams, metrics: Metrics,
                 ended: Callable[[bytes], bool] | None = None) -> None:
        self.streams = streams
        self.metrics = metrics
        self.ended = ended  # a stream without `[DONE]`: whether its last events end it

    def __call__(self, call: Call
                 ) -> web.StreamResponse | Coroutine[Any, Any, web.StreamResponse]:
        opened = call.opened
        assert opened is not None
        if not call.stream:
            return relay_json(opened, call.headers)
        return self._stream(call, opened)

    async def _stream(self, call: Call, opened: Opened) -> web.StreamResponse:
        try:
            return await relay_stream(call.request, opened, call.headers, self.streams,
                                      self.metrics, self.ended)
        finally:
            call.facts.tokens = opened.tokens  # the relay read them from the stream
