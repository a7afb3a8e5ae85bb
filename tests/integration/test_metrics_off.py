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
    assert r.worker.metrics.child(r.worker.metrics.requests, "m", "x", "200", "false") is \
        r.worker.metrics.requests  # every collector is the one no-op


def test_disabled_metrics_has_every_collector_of_metrics() -> None:
    on, off = Metrics(), DisabledMetrics()
    collectors = {name for name, value in vars(on).items() if isinstance(value, COLLECTOR_TYPES)}
    assert len(collectors) >= 16
    for name in collectors:  # a collector added later cannot be missed by the no-op variant
        value = getattr(off, name)
        value.inc()
        value.labels("a", "b").observe(1.0)
        value.set(1)
        value.dec()
        assert not isinstance(value, COLLECTOR_TYPES), name


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
