"""`metrics.enabled: false` (the router without per-request metrics, for the bench and for
operators who scrape nothing) and `metrics.path`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from router.config import load_config
from router.metrics import COLLECTOR_TYPES, DisabledMetrics, Metrics
from tests.conftest import KEY, USER_MSG, openai_provider, router_config

ROOT = Path(__file__).resolve().parents[2]


def config(up: Any, **metrics: Any) -> dict[str, Any]:
    return router_config(
        {"up": openai_provider(up, probe=False)},
        {"m": {"retries": 0, "backends": [{"provider": "up", "model": "gpt-x"}]},
         "broken": {"retries": 0, "backends": [{"provider": "up", "model": "status:500"}]}},
        metrics=metrics)


async def test_metrics_off_serves_everything_but_metrics(fakes: Any, start_router: Any) -> None:
    up = await fakes("up")
    r = await start_router(config(up, enabled=False))
    assert isinstance(r.worker.metrics, DisabledMetrics)
    for body, status in (({"model": "m", "messages": USER_MSG}, 200),
                         ({"model": "m", "messages": USER_MSG, "stream": True}, 200),
                         ({"model": "broken", "messages": USER_MSG}, 502),
                         ({"model": "nope", "messages": USER_MSG}, 404),
                         ({"model": "m", "messages": "bad"}, 422)):
        async with r.chat(body) as resp:
            assert resp.status == status
            raw = await resp.read()
            if body.get("stream"):
                assert raw.rstrip().endswith(b"data: [DONE]")
    async with r.chat({"model": "m", "messages": USER_MSG}, key="sk-wrong-" + "w" * 30) as resp:
        assert resp.status == 401  # the auth-failure counter is a no-op too
    # A scraper without credentials learns that metrics are off (404), not that it needs a key.
    async with r.http.get(f"{r.url}/metrics") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "metrics_disabled"
    async with r.http.get(f"{r.url}/openapi.json") as resp:
        assert "/metrics" not in (await resp.json())["paths"]
    assert r.worker.metrics.render() == b""
    assert not [name for name, value in vars(r.worker.metrics).items()
                if isinstance(value, COLLECTOR_TYPES)]  # no collector exists to write to


def test_disabled_metrics_has_every_event_of_metrics() -> None:
    on, off = Metrics(), DisabledMetrics()
    collectors = {name for name, value in vars(on).items() if isinstance(value, COLLECTOR_TYPES)}
    events = {name for name, value in vars(Metrics).items()
              if callable(value) and not name.startswith("_")}
    assert len(events) >= 16
    for name in events:  # an event added later cannot be missed by the no-op variant
        assert name in vars(DisabledMetrics), name
    for name, args in EVENT_ARGS.items():
        getattr(off, name)(*args)
    off.in_flight("m").dec()
    assert set(EVENT_ARGS) | {"in_flight", "render"} == events
    assert off.render() == b""
    assert collectors and not [name for name, value in vars(off).items()
                               if isinstance(value, COLLECTOR_TYPES)]


EVENT_ARGS: dict[str, tuple[Any, ...]] = {
    "request_done": ("m", "up/x", 200, False, 0.1), "first_byte": ("m", "up/x", 0.1),
    "upstream_done": ("up/x", 0.1), "tokens": ("m", "up/x", 3, 5), "stream_opened": (),
    "stream_closed": (), "rate_limited": ("rpm",), "auth_failed": ("api_key", "unknown"),
    "backend_up": ("up/x", True), "ejected": ("up/x", "timeout"), "retried": ("m", "timeout"),
    "fanout": ("race", "won"), "session_pin": ("hit",), "config_reloaded": (True,),
    "store_error": ("admit",), "affinity": ("m", "first"), "admin_action": ("drain",)}


async def test_metrics_path(fakes: Any, start_router: Any) -> None:
    up = await fakes("up")
    r = await start_router(config(up, path="/internal/prometheus"))
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 200
    async with r.http.get(f"{r.url}/internal/prometheus") as resp:  # no credential needed
        assert resp.status == 200
        text = await resp.text()
    assert 'router_requests_total{backend="up/gpt-x",route="m",status="200",stream="false"} 1.0' \
        in text
    async with r.http.get(f"{r.url}/metrics") as resp:  # an ordinary path now: credentials
        assert resp.status == 401
    async with r.http.get(f"{r.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 404
    async with r.http.get(f"{r.url}/openapi.json") as resp:
        paths = json.loads(await resp.read())["paths"]
    assert "/internal/prometheus" in paths and "/metrics" not in paths


def test_spec_config_shape_loads() -> None:
    config = load_config(ROOT / "tests" / "fixtures" / "configs" / "good" / "full.yaml",
                         env={"ROUTER_TEST_OPENAI_KEY": "sk-up"})
    assert config.metrics.enabled and config.metrics.path == "/metrics"
    assert config.usage.enabled and config.usage.flush_interval_s == 2
    assert config.usage.retention_days == 35
