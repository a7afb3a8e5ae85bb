"""W3C trace context: forwarded upstream unchanged (to every provider type), its trace id in the
access log; a malformed traceparent neither forwarded nor logged."""

from __future__ import annotations

import pytest

from tests.conftest import USER_MSG, anthropic_provider, openai_provider, router_config

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
STATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


def lower(headers):
    return {k.lower(): v for k, v in headers.items()}


async def test_trace_context_goes_upstream_and_into_the_access_log(fakes, claude_fakes,
                                                                   start_router):
    up, claude = await fakes("up"), await claude_fakes("claude")
    r = await start_router(router_config(
        {"up": openai_provider(up), "claude": anthropic_provider(claude, probe=False)},
        {"m": {"backends": [{"provider": "up", "model": "gpt-x"}]},
         "c": {"backends": [{"provider": "claude", "model": "claude-x"}]}},
        logging={"level": "info", "format": "json", "access_log": True}))
    access = r.access_log()
    trace = {"traceparent": PARENT, "tracestate": STATE}
    for model in ("m", "c"):
        async with r.chat({"model": model, "messages": USER_MSG}, headers=trace) as resp:
            assert resp.status == 200
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True},
                      headers=trace) as resp:
        await resp.read()
    for seen in (up.seen[0], claude.seen[0], up.seen[1]):
        headers = lower(seen.headers)
        assert (headers["traceparent"], headers["tracestate"]) == (PARENT, STATE)
    lines = access()
    assert [line["trace_id"] for line in lines] == [TRACE_ID] * 3


@pytest.mark.parametrize("parent", [
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    f"00-{TRACE_ID}-0000000000000000-01",  # all-zero parent id
    f"ff-{TRACE_ID}-00f067aa0ba902b7-01",  # version ff
    f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01",  # upper case
    f"00-{TRACE_ID}-00f067aa0ba902b7",  # no flags
    "garbage",
])
async def test_a_malformed_traceparent_is_neither_forwarded_nor_logged(fakes, start_router,
                                                                       parent):
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up)}, {"m": {"backends": [{"provider": "up", "model": "x"}]}},
        logging={"level": "info", "format": "json", "access_log": True}))
    access = r.access_log()
    async with r.chat({"model": "m", "messages": USER_MSG},
                      headers={"traceparent": parent, "tracestate": STATE}) as resp:
        assert resp.status == 200
    headers = lower(up.seen[0].headers)
    assert "traceparent" not in headers and "tracestate" not in headers
    (line,) = access()
    assert line["trace_id"] is None
