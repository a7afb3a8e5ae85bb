"""Sessions: a `session_id` pins a conversation to one backend of its route, in the
store every replica shares, so a self-hosted backend keeps reusing its prefix (KV) cache; and
each user's automation settings (auto-creation, pin TTL, default model).

The pin and the settings are read with the limits' admission (one store round trip, see
Limiter.admit); only a new or moved pin costs a second call before dispatch (claim_pin: SET NX
or compare-and-set, so racing replicas agree on one winner). A pin read with an admission is
not touched by that read (the limiter may refuse the request): an admitted request counts on
it by a call sent without waiting for it (use_pin), or in its claim. Without a working store,
replicas agree without talking: consistent hashing with bounded load over the route's
available backends with room (strategies.bounded_rendezvous).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from router.auth import Principal
from router.config.model import Config, SessionsConfig
from router.errors import RouterError, ValidationFailed
from router.metrics import Metrics
from router.routing.strategies import bounded_rendezvous
from router.routing.table import Backend, Route, RoutingTable
from router.schema import WHOLE, parse_body
from router.store import SessionStore, StoreError, is_shared
from router.store.base import SESSION_UNAVAILABLE, Pin, SessionQuery, SessionState
from router.tasks import count_failure, serve_without_store

SESSION_ID_BYTES = 18  # 144 bits -> 24 URL-safe characters
MIN_TTL_S, MAX_TTL_S = 60, 604800
MAX_SETTINGS_BYTES = 16 * 1024


class SessionConflict(RouterError):
    status = 409
    type = "invalid_request_error"
    code = "session_route_mismatch"
    log_level = logging.INFO


class AutomationSettings(BaseModel):
    """The body of PUT /api/v1/automation/settings; it replaces the stored settings whole. A
    field left out (or null) takes the config's default (`sessions.*`, `default_route`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    auto_create_session: bool | None = None
    session_ttl_s: Annotated[int, Field(ge=MIN_TTL_S, le=MAX_TTL_S), WHOLE] | None = None
    default_model: str | None = Field(None, min_length=1, max_length=256)


@dataclass(frozen=True, slots=True)
class Settings:
    """A user's settings in effect: what they stored, else the config's defaults."""

    auto_create_session: bool
    session_ttl_s: int
    default_model: str | None  # None: the config's default_route

    def view(self, default_route: str) -> dict[str, Any]:
        return {"auto_create_session": self.auto_create_session,
                "session_ttl_s": self.session_ttl_s,
                "default_model": self.default_model or default_route}


def effective(stored: dict[str, object] | None, defaults: SessionsConfig) -> Settings:
    """Stored settings over the config's defaults; a damaged stored field counts as absent."""
    stored = stored or {}
    auto = stored.get("auto_create_session")
    ttl = stored.get("session_ttl_s")
    model = stored.get("default_model")
    return Settings(
        auto if isinstance(auto, bool) else defaults.auto_create,
        ttl if isinstance(ttl, int) and not isinstance(ttl, bool) else defaults.ttl_s,
        model if isinstance(model, str) else None,
    )


def parse_settings(raw: bytes, routes: Collection[str], principal: Principal) -> dict[str, Any]:
    """Body bytes -> the settings to store (fields given, not null), or ValidationFailed in the
    422 `detail` shape. `default_model` must be a route this credential may use."""
    spec = parse_body(raw, AutomationSettings)
    model = spec.default_model
    if model is not None and (model not in routes or not principal.may_use(model)):
        raise ValidationFailed([{"loc": ["body", "default_model"],
                                 "msg": f"not a model this credential may use: {model[:100]!r}",
                                 "type": "value_error"}])
    return spec.model_dump(exclude_none=True)


class SettingsCache:
    """Each user's stored settings as this worker last read them, for `ttl_s`: a request with
    no `session_id` then needs no store call at all (the common case, auto-creation off).

    A PUT updates this worker's copy at once; other workers and replicas see it within `ttl_s`.
    """

    def __init__(self, ttl_s: float = 2.0, max_users: int = 100_000) -> None:
        self._ttl_s = ttl_s
        self._max = max_users
        self._entries: dict[str, tuple[dict[str, object] | None, float]] = {}

    def get(self, user: str) -> tuple[bool, dict[str, object] | None]:
        entry = self._entries.get(user)
        if entry is None or time.monotonic() - entry[1] > self._ttl_s:
            return False, None
        return True, entry[0]

    def put(self, user: str, settings: dict[str, object] | None) -> None:
        if len(self._entries) >= self._max and user not in self._entries:
            del self._entries[next(iter(self._entries))]  # the oldest
        self._entries[user] = (settings, time.monotonic())


def new_session_id() -> str:
    return secrets.token_urlsafe(SESSION_ID_BYTES)


@dataclass(slots=True, eq=False)
class Session:
    """A chat request's session as its stages learn it: what the admission asks the store
    (`query`), the state and settings read, the id (the client's or one just made), and the
    backend it was placed on."""

    id: str | None
    query: SessionQuery | None  # None: the user's settings were known without the store
    state: SessionState = SESSION_UNAVAILABLE
    settings: Settings | None = None  # known once read
    created: bool = False  # the router made the id for this request
    placed: Backend | None = None

    @property
    def ttl_s(self) -> int:
        assert self.settings is not None
        return self.settings.session_ttl_s


class Sessions:
    """Pins and users' automation settings, on the store every replica shares.

    A chat request goes through `begin` (before admission), `fetch` (unless the admission asked
    for it) and `read` (after it), `name` and `place` (once its route is known) and `follow`
    (once a backend answered); the session and settings endpoints use the rest."""

    def __init__(self, store: SessionStore, metrics: Metrics,
                 cache: SettingsCache | None = None) -> None:
        self._store = store
        self._metrics = metrics
        self._cache = cache or SettingsCache()

    def begin(self, user: str, session_id: str | None, config: Config) -> Session:
        """A request's session, before admission. Without a `session_id`, settings this worker
        read lately are enough: no store call at all unless the principal has limits."""
        if session_id is None:
            known, stored = self._cache.get(user)
            if known:
                return Session(None, None, SessionState(stored, None))
        return Session(session_id, SessionQuery(user, session_id, config.sessions.ttl_s))

    async def fetch(self, session: Session, config: Config) -> None:
        """The session's state in one store call, when the admission did not ask for it."""
        assert session.query is not None
        try:
            session.state = await self._store.session_state(session.query)
        except StoreError:
            if not serve_without_store(self._metrics, config, "session"):
                raise
            session.state = SESSION_UNAVAILABLE

    def read(self, session: Session, asked: SessionState | None, config: Config) -> Settings:
        """The user's settings in effect, from the session's state: `asked` (what the
        admission brought back, if the query went with it), else what `fetch` read, else the
        settings this worker knew."""
        if session.query is not None:
            if asked is not None:
                session.state = asked
            if session.state.available:
                self._cache.put(session.query.user, session.state.settings)
        session.settings = effective(session.state.settings, config.sessions)
        return session.settings

    @staticmethod
    def name(session: Session, route: Route) -> str | None:
        """The request's session id: the client's, else a new one when the user's settings
        say so. Never for `fanout: all`, which asks every backend: there is no one backend to
        pin a session to."""
        if session.id is None:
            assert session.settings is not None
            if route.config.fanout != "all" and session.settings.auto_create_session:
                session.id = new_session_id()
                session.created = True
        return session.id

    async def place(self, session: Session, user: str, route: Route, config: Config,
                    table: RoutingTable, choose: Callable[[], Backend | None] | None = None
                    ) -> Backend | None:
        """The backend a named session's request goes to first: its pin when that backend is
        available with room (`hit`), else the strategy's choice (`choose`'s, when given and it
        has one: a prefix_affinity route's), pinned (`new`, `repin`). None when no backend can
        take it (dispatch then answers as it would without a session), and without a session
        or for `fanout: all`."""
        if session.id is not None and route.config.fanout != "all":
            session.placed = await self._place(session, session.id, user, route, config,
                                               table, choose)
        return session.placed

    async def _place(self, session: Session, session_id: str, user: str, route: Route,
                     config: Config, table: RoutingTable,
                     choose: Callable[[], Backend | None] | None) -> Backend | None:
        metrics, state = self._metrics, session.state
        now = time.monotonic()
        candidates = [b for b in route.backends if b.state.available(now) and b.has_room()]
        if hashing_only(state, config):
            return hashed(metrics, config, route, user, session_id, candidates,
                          session.created)
        pin = state.pin
        replaces: str | None = None
        if pin is not None:
            check_route(pin, route, table)
            pinned = next((b for b in candidates if b.name == pin.backend), None)
            if pinned is not None:
                metrics.session_pin("hit")
                if not state.touched:  # read with an admission: count this admitted request
                    self._store.use_pin(user, session_id, session.ttl_s).add_done_callback(
                        count_failure(metrics, "use_pin", "count a session request"))
                return pinned
            replaces = pin.backend
        choice = (choose() if choose is not None else None) or route.pick(set())
        if choice is None:
            return None
        try:
            held = await self._store.claim_pin(user, session_id, choice.name, route.name,
                                               session.ttl_s, replaces,
                                               count=pin is None or not state.touched)
        except StoreError:
            if not serve_without_store(metrics, config, "claim_pin"):
                raise
            return hashed(metrics, config, route, user, session_id, candidates,
                          session.created) or choice
        if held.backend != choice.name:
            # Another replica pinned it first: follow the winner.
            metrics.session_pin("hit")
            return next((b for b in route.backends if b.name == held.backend), choice)
        metrics.session_pin("new" if pin is None else "repin")
        return choice

    async def follow(self, session: Session, user: str, route: Route, served: Backend,
                     config: Config) -> None:
        """The placed backend failed and another answered: move the pin there (only if it
        still names the failed one). Awaited, on this rare path, so the next request finds
        it moved."""
        placed = session.placed
        if session.id is None or placed is None or placed is served \
                or hashing_only(session.state, config):
            return
        try:
            held = await self._store.claim_pin(user, session.id, served.name, route.name,
                                               session.ttl_s, placed.name,
                                               count=False)  # counted when placed
        except StoreError:
            self._metrics.store_error("claim_pin")
            return
        if held.backend == served.name:
            self._metrics.session_pin("repin")

    async def settings(self, user: str, config: Config) -> Settings:
        return effective(await self._store.get_settings(user), config.sessions)

    async def put_settings(self, user: str, stored: dict[str, Any], config: Config
                           ) -> Settings:
        """Replace the user's stored settings; this worker sees them at once."""
        await self._store.put_settings(user, stored)
        self._cache.put(user, stored)
        return effective(stored, config.sessions)

    async def get(self, user: str, session_id: str) -> Pin | None:
        """The user's session as it is, untouched (another user's is just as absent)."""
        return await self._store.get_pin(user, session_id)

    async def delete(self, user: str, session_id: str) -> bool:
        return await self._store.delete_pin(user, session_id)


def hashing_only(state: SessionState, config: Config) -> bool:
    """No store every replica shares: pins are computed, not stored (consistent hashing)."""
    return not state.available or (not is_shared(config.store) and config.server.workers > 1)


def check_route(pin: Pin, route: Route, table: RoutingTable) -> None:
    """A session belongs to its route; another route with the same backends is the same place."""
    if pin.route == route.name:
        return
    other = table.routes.get(pin.route)
    if other is None:
        return  # its route is gone from the config: the session moves (re-pinned if need be)
    if {b.name for b in other.backends} != {b.name for b in route.backends}:
        raise SessionConflict(f"this session belongs to the model {pin.route!r}; use that "
                              "model, or start a new session")


def hashed(metrics: Metrics, config: Config, route: Route, user: str, session_id: str,
           candidates: Sequence[Backend], created: bool) -> Backend | None:
    """No pin to read or write: the session's backend is computed (consistent hashing with
    bounded load over the available backends with room). Only an id the router just made is
    known to be `new`; for any other, nothing tells a new session from a known one: going to
    its hashed first choice counts as `hit`, being moved off it (ejected, full, past its load
    bound) as `repin`."""
    backend, home = bounded_rendezvous(f"{user}\0{session_id}", route.backends, candidates,
                                       config.sessions.hash_load_factor)
    if backend is not None:
        outcome = "new" if created else "hit" if home else "repin"
        metrics.session_pin(outcome)
    return backend


def inject_json(body: bytes, session_id: str) -> bytes:
    """`session_id` as the first field of the top-level JSON object (already checked to be
    one): the one place the router rewrites an answer, without parsing it again."""
    start = body.find(b"{")
    if start < 0:
        return body
    rest = body[start + 1:]
    tail = rest.lstrip()
    if not tail:
        return body  # the object continues in a later chunk: leave it be
    sep = b"" if tail.startswith(b"}") else b","
    return body[:start + 1] + b'"session_id":' + orjson.dumps(session_id) + sep + rest


def inject_first_event(chunk: bytes, session_id: str) -> bytes:
    """The same, in the JSON of the first SSE `data:` event of a stream's first chunk."""
    at = chunk.find(b"data:")
    if at < 0:
        return chunk
    brace = at + 5
    while brace < len(chunk) and chunk[brace] in b" \t":
        brace += 1
    if brace >= len(chunk) or chunk[brace] != ord("{"):
        return chunk
    return chunk[:brace] + inject_json(chunk[brace:], session_id)


def public(session_id: str, pin: Pin) -> dict[str, Any]:
    return {"id": session_id, "object": "session", "backend": pin.backend, "route": pin.route,
            "created_at": int(pin.created_at), "last_used_at": int(pin.last_used_at),
            "requests": pin.requests, "expires_at": math.ceil(pin.expires_at)}
