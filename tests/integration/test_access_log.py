"""One access-log line per request, with what ops need and nothing secret."""

from __future__ import annotations

import logging

import orjson

from router.log import JsonFormatter
from tests.conftest import KEY, USER_MSG, openai_provider, router_config


async def test_access_line_per_request_in_json_without_secrets(fakes, start_router, caplog):
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up, api_key="sk-upstream-canary-123456")},
        {"m": {"backends": [{"provider": "up", "model": "gpt-x"}]}},
        logging={"level": "info", "format": "json", "access_log": True}))
    caplog.set_level(logging.INFO, logger="router.access")
    async with r.chat({"model": "m", "messages": [{"role": "user", "content": "secret plan"}]},
                      headers={"x-request-id": "req-log-1"}) as resp:
        assert resp.status == 200
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
        await resp.read()
    async with r.chat({"model": "m", "messages": USER_MSG}, key="sk-not-a-real-key") as resp:
        assert resp.status == 401
    records = [rec for rec in caplog.records if rec.name == "router.access"]
    assert len(records) == 3
    lines = [orjson.loads(JsonFormatter().format(rec)) for rec in records]
    first = lines[0]
    assert first["request_id"] == "req-log-1"
    assert first["principal"] == "test"
    assert (first["route"], first["backend"], first["status"]) == ("m", "up/gpt-x", 200)
    assert first["stream"] is False and first["attempts"] == 1
    assert first["ttfb_ms"] >= 0 and first["duration_ms"] >= first["ttfb_ms"]
    assert first["prompt_tokens"] > 0 and first["completion_tokens"] > 0
    assert lines[1]["stream"] is True
    assert (lines[2]["status"], lines[2]["principal"], lines[2]["error"]) == \
        (401, None, "invalid_api_key")
    text = "\n".join(JsonFormatter().format(rec) for rec in caplog.records)
    for secret in (KEY, "sk-not-a-real-key", "sk-upstream-canary", "secret plan"):
        assert secret not in text
