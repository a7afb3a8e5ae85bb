"""JSON bodies that parsers disagree about: the router forwards them exactly or refuses them with
a 422, on every endpoint that reads JSON, and never answers 5xx.

Each case is one an attacker or a careless client has sent: deep nesting, a repeated key hidden
behind an escaped colon, integers past 64 bits, control characters in a session id.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from tests.conftest import (
    ADMIN_KEY,
    KEY,
    USER_MSG,
    bearer,
    openai_provider,
    router_config,
)

DEPTH_LIMIT = 254  # levels, the body's own object counting as one (README: Limits on bodies)
JSON = {"Content-Type": "application/json"}


def nested(levels: int) -> bytes:
    """`levels` nested arrays: inside a top-level object's field they make levels + 1."""
    return b"[" * levels + b"]" * levels


def chat_with(extra: bytes) -> bytes:
    return b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], ' + extra + b"}"


async def post(r: Any, path: str, raw: bytes, key: str = KEY,
               method: str = "POST") -> tuple[int, dict[str, Any]]:
    async with r.http.request(method, f"{r.url}{path}", data=raw,
                              headers={**bearer(key), **JSON}) as resp:
        return resp.status, orjson.loads(await resp.read())


async def refused_at_body(r: Any, up: Any, raw: bytes, path: str = "/v1/chat/completions",
                          key: str = KEY, method: str = "POST") -> str:
    """Send `raw`: a 422 with one entry at `["body"]`, nothing sent upstream; its message."""
    status, body = await post(r, path, raw, key=key, method=method)
    assert locs(status, body) == [["body"]], path
    assert up.seen == []
    return str(body["detail"][0]["msg"])


def locs(status: int, body: dict[str, Any]) -> list[list[Any]]:
    assert status == 422, body
    return [entry["loc"] for entry in body["detail"]]


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
async def test_nesting_up_to_the_limit_reaches_the_upstream_unchanged(routed, prefix):
    r, up = routed
    raw = chat_with(b'"x": ' + nested(DEPTH_LIMIT - 1))
    status, _ = await post(r, f"{prefix}/chat/completions", raw)
    assert status == 200
    assert orjson.loads(up.seen[0].raw)["x"] == orjson.loads(raw)["x"]


@pytest.mark.parametrize("levels", [DEPTH_LIMIT, 300, 1023, 1024, 5000])
async def test_nesting_past_the_limit_is_422_at_body_on_every_json_endpoint(routed, levels):
    r, up = routed
    deep = nested(levels)
    for path, key, method, raw in [
        ("/v1/chat/completions", KEY, "POST", chat_with(b'"x": ' + deep)),
        ("/api/v1/automation/settings", KEY, "PUT", b'{"x": ' + deep + b"}"),
        ("/api/v1/admin/keys", ADMIN_KEY, "POST", b'{"user": "u", "x": ' + deep + b"}"),
    ]:
        assert "254" in await refused_at_body(r, up, raw, path, key=key, method=method)


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "model": "m", "messages": [{"role": "user", "content": "x"}], '
    b'"user": "\\u003a"}',
    b'{"model": "m", "messages": [{"role": "user", "role": "user", "content": "\\u003A"}]}',
    b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "x": {"a": 1, "a": 2}, '
    b'"y": "\\u003a\\u003a"}',
    b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
    b'"x": {"a": {}, "\\u0061": {}}}',
], ids=["top-level", "in-a-message", "nested", "escaped-key"])
async def test_a_repeated_key_is_422_whatever_escapes_surround_it(routed, raw):
    r, up = routed
    assert "repeats a key" in await refused_at_body(r, up, raw)


async def test_escaped_colons_alone_are_fine(routed):
    r, up = routed
    status, _ = await post(r, "/v1/chat/completions", chat_with(b'"user": "\\u003a:\\u003A"'))
    assert status == 200
    assert up.seen[0].body["user"] == ":::"


@pytest.mark.parametrize("stream", [False, True])
async def test_integers_past_64_bits_reach_the_upstream_digit_for_digit(routed, stream):
    r, up = routed
    literals = (b'"seed": 1180591620717411303424', b'"x": [-9223372036854775809, '
                b'{"y": 18446744073709551616}, 1e21, 0.5]')
    raw = chat_with(b", ".join(literals) + b', "stream": ' + (b"true" if stream else b"false"))
    async with r.http.post(f"{r.url}/v1/chat/completions", data=raw,
                           headers={**bearer(KEY), **JSON}) as resp:
        assert resp.status == 200
        assert (b"data: [DONE]" in await resp.read()) is stream
    sent = up.seen[0].raw
    assert b'"seed":1180591620717411303424' in sent
    assert b'"x":[-9223372036854775809,{"y":18446744073709551616},1e+21,0.5]' in sent


@pytest.mark.parametrize("levels", [DEPTH_LIMIT, 600, 5000])
async def test_a_large_integer_does_not_lift_the_depth_limit(routed, levels):
    r, up = routed
    raw = chat_with(b'"seed": 18446744073709551616, "x": ' + nested(levels))
    assert "deeper than 254" in await refused_at_body(r, up, raw)


async def test_a_named_integer_field_past_its_range_is_422_at_its_loc(routed):
    r, up = routed
    status, body = await post(r, "/v1/chat/completions",
                              chat_with(b'"max_tokens": 18446744073709551616'))
    assert locs(status, body) == [["body", "max_tokens"]]
    assert up.seen == []


@pytest.mark.parametrize("extra", [b"", b', "seed": 18446744073709551616'])
async def test_a_lone_surrogate_is_422_at_body(routed, extra):
    r, up = routed
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "a\\udc00"}]' + extra + b"}"
    assert "lone UTF-16 surrogate" in await refused_at_body(r, up, raw)


BAD_SESSION_IDS = ["a\r\nX-Evil: 1", "a\u0000b", "a\nb", "a b", "a/b", "é", "a" * 129, "",
                   "abc\n", "{x}"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("session_id", BAD_SESSION_IDS)
async def test_a_session_id_that_could_not_be_a_header_is_422_before_any_call(
        fakes, start_router, redis_server, session_id, stream):
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up)}, {"m": {"backends": [{"provider": "up", "model": "x"}]}},
        store={"url": redis_server.url}))
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": stream,
                       "session_id": session_id}) as resp:
        body = orjson.loads(await resp.read())
        assert resp.status == 422
        assert "x-session-id" not in resp.headers
    assert locs(resp.status, body) == [["body", "session_id"]]
    assert up.seen == []
    async with Redis.from_url(redis_server.url) as client:
        assert [k async for k in client.scan_iter("router:sess:*")] == []
    async with r.chat({"model": "m", "messages": USER_MSG, "session_id": "ok-1.a:B_2"}) as resp:
        assert resp.status == 200  # the connection and the router are fine afterwards
        assert resp.headers["x-session-id"] == "ok-1.a:B_2"


async def test_a_session_path_id_outside_the_rule_is_404_without_a_store_call(
        fakes, start_router, redis_server):
    """With the store gone, a store call would be a 503: the 404 shows none was made."""
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up)}, {"m": {"backends": [{"provider": "up", "model": "x"}]}},
        store={"url": redis_server.url, "on_failure": "closed"}))
    redis_server.stop()
    for method in ("GET", "DELETE"):
        for path_id in ("a%0D%0AX-Evil:%201", "a%00b", "a%20b", "x" * 129, "abc%0A"):
            async with r.http.request(method, f"{r.url}/api/v1/sessions/{path_id}",
                                      headers=bearer(KEY)) as resp:
                assert resp.status == 404, path_id
                assert (await resp.json())["error"]["code"] == "session_not_found"
        async with r.http.request(method, f"{r.url}/api/v1/sessions/fine-id",
                                  headers=bearer(KEY)) as resp:
            assert resp.status == 503
