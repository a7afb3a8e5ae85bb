"""Backend health: passive ejection, growing cool-downs, Retry-After rests, drains, what a route
picks, and the word the status gives each state."""

from __future__ import annotations

import time

from router.config import MockProviderConfig
from router.config.model import EjectionConfig, RouteConfig
from router.providers.mock import MockProvider
from router.routing.health import BackendState
from router.routing.strategies import RoundRobin
from router.routing.table import Backend, Route
from router.status import backend_state

POLICY = EjectionConfig(consecutive_failures=3, base_cooldown_s=10, max_cooldown_s=25)


def eject(state: BackendState, policy: EjectionConfig = POLICY) -> float:
    """Fail until ejected; returns the cool-down that was applied (from the clock around it)."""
    for _ in range(policy.consecutive_failures - 1):
        assert state.record_failure(policy) is False
    before = state.clock()
    assert state.record_failure(policy) is True
    return state.ejected_until - before


def test_a_new_backend_is_available():
    state = BackendState()
    assert state.available(time.monotonic())
    assert state.inflight == 0 and state.ewma_ttfb_s is None


def test_ejected_after_n_consecutive_failures_not_before():
    state = BackendState()
    now = time.monotonic()
    assert state.record_failure(POLICY) is False
    assert state.record_failure(POLICY) is False
    assert state.available(now)
    assert state.record_failure(POLICY) is True
    assert not state.available(time.monotonic())
    assert state.available(state.ejected_until)  # back once the cool-down is over


def test_cooldown_grows_base_times_n_capped_at_max():
    state = BackendState()
    cooldowns = [eject(state) for _ in range(4)]
    # 10, 20, then 30 and 40 capped at 25 (the clock moves a little between reads).
    for got, want in zip(cooldowns, [10, 20, 25, 25], strict=True):
        assert want <= got <= want + 0.5, cooldowns
    assert state.ejections == 4


def test_a_success_resets_the_failure_count():
    state = BackendState()
    state.record_failure(POLICY)
    state.record_failure(POLICY)
    state.record_success()
    assert state.record_failure(POLICY) is False
    assert state.record_failure(POLICY) is False
    assert state.available(time.monotonic())
    assert state.record_failure(POLICY) is True


def test_a_success_after_the_cooldown_restarts_the_growth():
    quick = EjectionConfig(consecutive_failures=1, base_cooldown_s=0.1, max_cooldown_s=1)
    now = [1000.0]
    state = BackendState(clock=lambda: now[0])
    eject(state, quick)
    eject(state, quick)
    assert state.ejections == 2
    now[0] += 0.25  # past the 0.2 s cool-down
    state.record_success()
    assert state.ejections == 0
    assert state.available(now[0])
    assert 0.1 <= eject(state, quick) < 0.15  # base again, not base x 3


def test_rest_makes_the_backend_unavailable_for_that_long():
    state = BackendState()
    before = time.monotonic()
    state.rest(7)
    assert not state.available(before + 6.9)
    assert state.available(time.monotonic() + 7.0)
    assert state.consecutive_failures == 0  # a rest is not a failure


def test_rest_never_shortens_an_ejection_or_a_longer_rest():
    state = BackendState()
    eject(state)  # 10 s
    until = state.ejected_until
    state.rest(1)
    assert state.ejected_until == until
    assert not state.available(time.monotonic() + 5)
    state.rest(60)
    rest_until = state.resting_until
    state.rest(2)
    assert state.resting_until == rest_until
    assert not state.available(time.monotonic() + 40)
    assert state.resting(time.monotonic() + 40)


def test_probe_down_makes_a_backend_unavailable_until_it_is_up():
    state = BackendState()
    state.probe_down = True
    assert not state.available(time.monotonic())
    state.probe_down = False
    assert state.available(time.monotonic())


def test_ttfb_ewma_starts_at_the_first_sample_and_moves_towards_new_ones():
    state = BackendState()
    state.record_ttfb(1.0)
    assert state.ewma_ttfb_s == 1.0
    state.record_ttfb(0.0)
    assert state.ewma_ttfb_s is not None and 0.0 < state.ewma_ttfb_s < 1.0
    for _ in range(50):
        state.record_ttfb(0.2)
    assert abs(state.ewma_ttfb_s - 0.2) < 1e-3


# --- what a route offers the strategy --------------------------------------------------------

_PROVIDER = MockProvider("mock", MockProviderConfig(type="mock"))


def make_route(*names: str, max_concurrency: int | None = None) -> Route:
    backends = tuple(Backend(n, _PROVIDER, n, 1.0, max_concurrency, BackendState())
                     for n in names)
    config = RouteConfig(backends=[{"provider": "mock", "model": n} for n in names])
    return Route("r", config, backends, RoundRobin())


def test_route_skips_ejected_and_already_tried_backends():
    route = make_route("a", "b", "c")
    eject(route.backends[0].state)
    assert {route.pick(set()).name for _ in range(6)} == {"b", "c"}
    assert {route.pick({"b"}).name for _ in range(3)} == {"c"}
    # b was tried, c is tried: the ejected a is not a candidate while c and b are healthy.
    assert route.pick({"b", "c"}) is None


def test_route_never_ejects_its_last_backend():
    route = make_route("only")
    eject(route.backends[0].state)
    picked = route.pick(set())
    assert picked is not None and picked.name == "only"


def test_route_with_every_backend_down_offers_them_all():
    route = make_route("a", "b")
    eject(route.backends[0].state)
    route.backends[1].state.probe_down = True
    assert {route.pick(set()).name for _ in range(4)} == {"a", "b"}
    assert route.pick({"a", "b"}) is None


def test_route_skips_backends_at_their_concurrency_cap():
    route = make_route("a", "b", max_concurrency=1)
    route.backends[0].state.inflight = 1
    assert {route.pick(set()).name for _ in range(4)} == {"b"}
    route.backends[1].state.inflight = 1
    assert route.pick(set()) is None


# --- drained by an operator --------------------------------------------------------------------

def test_a_drained_backend_is_unavailable_until_undrained():
    state = BackendState()
    state.drained = True
    assert not state.available(time.monotonic())
    state.drained = False
    assert state.available(time.monotonic())


def test_a_drained_backend_stays_out_even_when_every_other_is_down():
    """Panic offers ejected and probed-down backends again, never a drained (or resting) one:
    an operator took it out, as its upstream's Retry-After does."""
    route = make_route("a", "b", "c")
    route.backends[0].state.drained = True
    eject(route.backends[1].state)
    route.backends[2].state.probe_down = True
    assert {route.pick(set()).name for _ in range(4)} == {"b", "c"}
    route.backends[1].state.rest(60)
    route.backends[2].state.drained = True
    assert route.pick(set()) is None
    solo = make_route("only")
    solo.backends[0].state.drained = True
    assert solo.pick(set()) is None


def test_the_state_word_names_the_first_reason_a_backend_is_out():
    state = BackendState()
    now = time.monotonic()
    assert backend_state(state, now) == "up"
    eject(state)
    assert backend_state(state, time.monotonic()) == "ejected"
    state.rest(60)
    assert backend_state(state, time.monotonic()) == "resting"
    state.probe_down = True
    assert backend_state(state, time.monotonic()) == "probe_down"
    state.drained = True
    assert backend_state(state, time.monotonic()) == "drained"
    # An ejection whose cool-down is over is up again (until the next failure decides).
    later = BackendState()
    eject(later)
    assert backend_state(later, later.ejected_until) == "up"
