"""One access-log line per request, with what ops need and nothing secret."""

from __future__ import annotations

import re

import orjson

from router.state import ACCESS_LOG
from tests.conftest import KEY, USER_MSG, openai_provider, router_config


async def test_access_line_per_request_in_json_without_secrets(fakes, start_router, caplog):
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up, api_key="sk-upstream-canary-123456")},
        {"m": {"backends": [{"provider": "up", "model": "gpt-x"}]}},
        logging={"level": "info", "format": "json", "access_log": True}))
    written: list[bytes] = []
    r.worker.app[ACCESS_LOG].out = written.append  # the format and level are the config's
    async with r.chat({"model": "m", "messages": [{"role": "user", "content": "secret plan"}]},
                      headers={"x-request-id": "req-log-1"}) as resp:
        assert resp.status == 200
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
        await resp.read()
    async with r.chat({"model": "m", "messages": USER_MSG}, key="sk-not-a-real-key") as resp:
        assert resp.status == 401
    r.worker.app[ACCESS_LOG].flush()
    raw = b"".join(written).decode().splitlines()
    assert len(raw) == 3
    lines = [orjson.loads(line) for line in raw]
    assert [(line["level"], line["logger"], line["msg"]) for line in lines] == \
        [("info", "router.access", "request")] * 3
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
    text = "\n".join(raw) + caplog.text  # nor in any other line
    for secret in (KEY, "sk-not-a-real-key", "sk-upstream-canary", "secret plan"):
        assert secret not in text


async def test_text_lines_and_when_nothing_is_written(fakes, start_router):
    """Text lines read as the router's other text log lines; nothing is written when the
    level drops `info` lines or the access log is off."""
    up = await fakes("up")
    routes = {"m": {"backends": [{"provider": "up", "model": "gpt-x"}]}}
    wrote: dict[str, list[bytes]] = {}
    for name, logging_config in (
            ("text", {"level": "info", "format": "text", "access_log": True}),
            ("warning", {"level": "warning", "format": "json", "access_log": True}),
            ("off", {"level": "info", "format": "json", "access_log": False})):
        r = await start_router(router_config({"up": openai_provider(up)}, routes,
                                             logging=logging_config))
        wrote[name] = []
        r.worker.app[ACCESS_LOG].out = wrote[name].append
        async with r.chat({"model": "m", "messages": USER_MSG},
                          headers={"x-request-id": "req-text-1"}) as resp:
            assert resp.status == 200
        r.worker.app[ACCESS_LOG].flush()
    (line,) = b"".join(wrote["text"]).decode().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO router\.access: request "
                        r"request_id=req-text-1 method=POST path=/api/v1/chat/completions "
                        r"status=200 principal=test route=m backend=up/gpt-x .*", line)
    assert wrote["warning"] == [] and wrote["off"] == []

