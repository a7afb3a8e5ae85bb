"""/metrics as Prometheus scrapes it: SPEC 8 names, bounded labels, values that follow traffic."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import KEY, USER_MSG, openai_provider, router_config


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_follow_traffic_without_unbounded_labels(fakes, start_router):
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up), "bad": openai_provider(up)},
        {"m": {"retries": 1, "backends": [{"provider": "up", "model": "gpt-x"}]},
         "broken": {"retries": 0, "backends": [{"provider": "bad", "model": "status:500"}]}}))
    for body in ({"model": "m", "messages": USER_MSG},
                 {"model": "m", "messages": USER_MSG, "stream": True},
                 {"model": "broken", "messages": USER_MSG},
                 {"model": "no-such-model-abc123", "messages": USER_MSG},
                 {"model": "m", "messages": "nope"}):
        async with r.chat(body) as resp:
            await resp.read()
    async with r.chat({"model": "m", "messages": USER_MSG}, key="sk-wrong-key") as resp:
        assert resp.status == 401
    async with r.http.get(f"{r.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    s = _samples(text)
    total = "router_requests_total"
    assert _value(s, total, route="m", backend="up/gpt-x", status="200", stream="false") == 1
    assert _value(s, total, route="m", backend="up/gpt-x", status="200", stream="true") == 1
    assert _value(s, total, route="broken", backend="none", status="502", stream="false") == 1
    # A client's made-up model name never becomes a label value.
    assert "no-such-model-abc123" not in text
    assert _value(s, total, route="unknown", backend="none", status="404", stream="false") == 1
    assert _value(s, total, route="unknown", backend="none", status="422", stream="false") == 1
    assert _value(s, "router_endpoint_requests_total", endpoint="chat", route="m",
                  status="200") == 2  # streamed or not
    assert _value(s, "router_auth_failures_total", credential="api_key",
                  reason="unknown_key") == 1
    assert _value(s, "router_tokens_total", route="m", backend="up/gpt-x", kind="prompt") > 0
    assert _value(s, "router_time_to_first_byte_seconds_count", route="m",
                  backend="up/gpt-x") == 2
    assert _value(s, "router_request_duration_seconds_count", route="m", stream="true") == 1
    assert _value(s, "router_backend_up", backend="up/gpt-x") == 1
    assert _value(s, "router_active_streams") == 0
    assert _value(s, "router_inflight_requests", route="m") == 0
    assert KEY not in text and "sk-wrong-key" not in text


async def test_metrics_carry_the_worker_process_figures(fakes, start_router):
    """prometheus-client's process collector: memory, file descriptors and CPU of the worker,
    unlabelled when one worker serves."""
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up)},
        {"m": {"retries": 0, "backends": [{"provider": "up", "model": "gpt-x"}]}}))
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 200
    async with r.http.get(f"{r.url}/metrics") as resp:
        assert resp.status == 200
        s = _samples(await resp.text())
    assert _value(s, "process_resident_memory_bytes") > 1_000_000
    assert _value(s, "process_open_fds") > 0
    assert _value(s, "process_max_fds") > 0
    assert _value(s, "process_cpu_seconds_total") > 0
    assert _value(s, "process_start_time_seconds") > 0
    assert not [k for k in s if k[0].startswith("process_") and k[1]]  # no labels
