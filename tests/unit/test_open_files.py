"""How many sockets a stream may hold, from the config: the client's, plus the upstream
connections its route keeps open at once (none to an in-process mock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from router.config import Config, load_config
from router.open_files import SPARE_FILES, files_needed, sockets_per_stream
from tests.conftest import router_config

MOCK = {"type": "mock"}
DEMO = Path(__file__).resolve().parents[2] / "config" / "router.yaml"
NET = {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "probe": False}


def config(route: dict[str, Any], *providers: dict[str, Any], max_streams: int = 100,
           **more_routes: dict[str, Any]) -> Config:
    backends = [{"provider": f"p{n}", "model": "x"} for n in range(len(providers))]
    cfg = router_config({f"p{n}": p for n, p in enumerate(providers)},
                        {"r": {**route, "backends": backends}, **more_routes},
                        server={"max_streams": max_streams})
    return Config.model_validate(cfg)


def test_a_stream_to_a_mock_holds_only_the_client_socket() -> None:
    assert sockets_per_stream(config({}, MOCK, MOCK)) == 1
    assert sockets_per_stream(config({"fanout": "all"}, MOCK, MOCK)) == 1


def test_a_stream_to_a_network_backend_holds_two() -> None:
    assert sockets_per_stream(config({}, NET)) == 2
    assert sockets_per_stream(config({"retries": 3}, NET, NET, NET)) == 2  # one after another
    cfg = config({}, NET, max_streams=10_000)
    assert files_needed(cfg) == 2 * 10_000 + SPARE_FILES


def test_fan_out_holds_one_upstream_socket_per_copy_in_flight() -> None:
    assert sockets_per_stream(config({"fanout": "race"}, NET, NET, NET)) == 4
    assert sockets_per_stream(config({"fanout": "race", "fanout_width": 2}, NET, NET, NET)) == 3
    assert sockets_per_stream(config({"fanout": "all"}, NET, MOCK, NET)) == 3  # mocks: none
    assert sockets_per_stream(config({"fanout": "hedge", "max_hedges": 1}, NET, NET, NET)) == 3
    assert sockets_per_stream(config({"fanout": "hedge", "max_hedges": 5}, NET, NET)) == 3


def test_the_route_that_holds_most_decides() -> None:
    other = {"backends": [{"provider": "p1", "model": "y"}]}  # a network route next to a mock one
    cfg = Config.model_validate(router_config(
        {"p0": MOCK, "p1": NET},
        {"r": {"backends": [{"provider": "p0", "model": "x"}], "fallbacks": ["net"]},
         "net": other}))
    assert sockets_per_stream(cfg) == 2


def test_the_shipped_demo_fits_a_common_hard_limit() -> None:
    demo = load_config(DEMO, env={})
    assert sockets_per_stream(demo) == 1
    assert files_needed(demo) <= 4096
