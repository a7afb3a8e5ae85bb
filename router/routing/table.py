"""Routes and their backends, built from the config; what a request may try, in order."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from router.config import Config, RouteConfig
from router.providers import Provider
from router.routing.affinity import Affinity
from router.routing.health import BackendState, TtfbWindow
from router.routing.strategies import STRATEGIES, Strategy
from router.upstream import Timeouts


@dataclass(eq=False, slots=True)
class Backend:
    name: str
    provider: Provider
    model: str
    weight: float
    max_concurrency: int | None
    state: BackendState

    def has_room(self) -> bool:
        return self.max_concurrency is None or self.state.inflight < self.max_concurrency


@dataclass(eq=False, slots=True)
class Route:
    name: str
    config: RouteConfig
    backends: tuple[Backend, ...]
    strategy: Strategy
    fallbacks: tuple[Route, ...] = field(default=())
    # What it serves ("chat", "embeddings", ...): its config's `endpoints`, else what all of
    # its backends' providers serve.
    endpoints: frozenset[str] = field(default=frozenset(("chat",)))
    timeouts: Timeouts = field(init=False)
    ttfb: TtfbWindow = field(init=False, default_factory=TtfbWindow)  # recorded by hedges only
    # `strategy: prefix_affinity`: the chat request's prompt prefix places it (None: the
    # strategy alone picks, and the request path does no prefix work at all).
    affinity: Affinity | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        c = self.config
        self.timeouts = Timeouts(c.connect_timeout_s, c.timeout_s, c.idle_timeout_s)
        if c.strategy == "prefix_affinity":
            self.affinity = Affinity.of(c.affinity)

    def pick(self, exclude: set[str]) -> Backend | None:
        """The strategy's choice among available backends with room, not yet tried.

        When every backend is ejected or probed down, all are candidates again: the last backend
        is never ejected (Envoy's panic threshold, at 100%). A backend resting after an upstream
        429 stays out even then: its upstream told us when to come back; so does a drained one:
        an operator took it out.
        """
        now = time.monotonic()
        # Every request's path: one pass when some backend is healthy and has room.
        candidates = [b for b in self.backends if b.name not in exclude
                      and b.state.available(now) and b.has_room()]
        if candidates:
            return self.strategy.select(candidates)
        untried = [b for b in self.backends if b.name not in exclude]
        healthy = [b for b in untried if b.state.available(now)]
        if not healthy and not any(b.state.available(now) for b in self.backends):
            healthy = [b for b in untried if not b.state.held_out(now)]
        candidates = [b for b in healthy if b.has_room()]
        if not candidates:
            return None
        return self.strategy.select(candidates)

    def rest_remaining(self) -> float | None:
        """Seconds until a backend of this route is out of its 429 rest, if all are resting."""
        now = time.monotonic()
        if not all(b.state.resting(now) for b in self.backends):
            return None
        return min(b.state.resting_until for b in self.backends) - now

    def chain(self) -> Iterator[Route]:
        """This route, then its fallbacks (depth first), each route once."""
        seen: set[str] = set()
        stack: list[Route] = [self]
        while stack:
            route = stack.pop(0)
            if route.name in seen:
                continue
            seen.add(route.name)
            yield route
            stack[0:0] = list(route.fallbacks)


class RoutingTable:
    def __init__(self, config: Config, providers: Mapping[str, Provider],
                 states: dict[str, BackendState]) -> None:
        """`states` is shared across reloads; backends keep their counters by name."""
        self.routes: dict[str, Route] = {}
        self.default_route = config.default_route or next(iter(config.routes))
        for name, rc in config.routes.items():
            backends = tuple(
                Backend(
                    name=bc.display_name,
                    provider=providers[bc.provider],
                    model=bc.model,
                    weight=bc.weight,
                    max_concurrency=bc.max_concurrency,
                    state=states.setdefault(bc.display_name, BackendState()),
                )
                for bc in rc.backends
            )
            served = frozenset.intersection(*(config.providers[bc.provider].ENDPOINTS
                                              for bc in rc.backends))
            self.routes[name] = Route(name, rc, backends, STRATEGIES[rc.strategy](),
                                      endpoints=frozenset(rc.endpoints or served))
        for name, rc in config.routes.items():
            self.routes[name].fallbacks = tuple(self.routes[f] for f in rc.fallbacks)

    def backends(self) -> Iterator[Backend]:
        seen: set[str] = set()
        for route in self.routes.values():
            for backend in route.backends:
                if backend.name not in seen:
                    seen.add(backend.name)
                    yield backend
