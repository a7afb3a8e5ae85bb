"""Bad request bodies through the real router over HTTP: 422 in the seed's shape, 413, 415.

Every rejected request must leave the fake upstream untouched, and nothing may answer 500.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tests.conftest import KEY, ROUTED_BODY_CAP, USER_MSG, openai_provider, router_config

CAP = ROUTED_BODY_CAP  # server.max_body_bytes of `routed`: room for 100k-deep nesting
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_HEADERS = {**AUTH, "Content-Type": "application/json"}


async def post_raw(r: Any, data: Any, headers: dict[str, str] | None = None,
                   **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with r.http.post(f"{r.url}/api/v1/chat/completions", data=data,
                           headers={**JSON_HEADERS, **(headers or {})}, **kwargs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def detail_of(status: int, body: bytes) -> list[dict[str, Any]]:
    assert status == 422, body[:300]
    detail = orjson.loads(body)["detail"]
    assert isinstance(detail, list) and detail
    for entry in detail:
        assert set(entry) == {"loc", "msg", "type"}
        assert entry["loc"][0] == "body"
        assert isinstance(entry["msg"], str) and entry["msg"]
        assert isinstance(entry["type"], str) and entry["type"]
    return detail


def with_message(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi", **fields}]}


def body_with(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": USER_MSG, **fields}


MISSING = object()

# (request body, the one `loc` the 422 must name)
FIELD_CASES: list[tuple[str, dict[str, Any], list[Any]]] = [
    ("model-int", body_with(model=123), ["body", "model"]),
    ("model-empty", body_with(model=""), ["body", "model"]),
    ("model-too-long", body_with(model="m" * 300), ["body", "model"]),
    ("model-list", body_with(model=["m"]), ["body", "model"]),
    ("messages-missing", {"model": "m"}, ["body", "messages"]),
    ("messages-empty", body_with(messages=[]), ["body", "messages"]),
    ("messages-null", body_with(messages=None), ["body", "messages"]),
    ("messages-string", body_with(messages="hello"), ["body", "messages"]),
    ("messages-object", body_with(messages={"role": "user", "content": "x"}),
     ["body", "messages"]),
    ("message-not-object", body_with(messages=["hello"]), ["body", "messages", 0]),
    ("role-invalid", body_with(messages=[{"role": "wizard", "content": "x"}]),
     ["body", "messages", 0, "role"]),
    ("role-missing", body_with(messages=[{"content": "x"}]), ["body", "messages", 0, "role"]),
    ("role-int", body_with(messages=[{"role": 1, "content": "x"}]),
     ["body", "messages", 0, "role"]),
    ("role-invalid-second", body_with(messages=[*USER_MSG, {"role": "User", "content": "x"}]),
     ["body", "messages", 1, "role"]),
    ("content-int", with_message(content=5), ["body", "messages", 0, "content"]),
    ("content-object", with_message(content={"text": "x"}), ["body", "messages", 0, "content"]),
    ("content-bool", with_message(content=True), ["body", "messages", 0, "content"]),
    ("name-int", with_message(name=5), ["body", "messages", 0, "name"]),
    ("tool-calls-string", with_message(tool_calls="call"), ["body", "messages", 0, "tool_calls"]),
    ("tool-call-id-int", with_message(tool_call_id=9), ["body", "messages", 0, "tool_call_id"]),
    ("temperature-high", body_with(temperature=2.5), ["body", "temperature"]),
    ("temperature-negative", body_with(temperature=-0.1), ["body", "temperature"]),
    ("temperature-string", body_with(temperature="hot"), ["body", "temperature"]),
    ("temperature-bool", body_with(temperature=True), ["body", "temperature"]),
    ("top-p-high", body_with(top_p=1.5), ["body", "top_p"]),
    ("top-p-negative", body_with(top_p=-1), ["body", "top_p"]),
    ("n-zero", body_with(n=0), ["body", "n"]),
    ("n-huge", body_with(n=129), ["body", "n"]),
    ("n-float", body_with(n=1.5), ["body", "n"]),
    ("n-string", body_with(n="2"), ["body", "n"]),
    ("max-tokens-zero", body_with(max_tokens=0), ["body", "max_tokens"]),
    ("max-tokens-negative", body_with(max_tokens=-1), ["body", "max_tokens"]),
    ("max-tokens-2e31", body_with(max_tokens=2**31), ["body", "max_tokens"]),
    ("max-tokens-2e64", body_with(max_tokens=2**64), ["body", "max_tokens"]),
    ("max-tokens-float", body_with(max_tokens=10.5), ["body", "max_tokens"]),
    ("max-tokens-string", body_with(max_tokens="10"), ["body", "max_tokens"]),
    ("presence-high", body_with(presence_penalty=2.5), ["body", "presence_penalty"]),
    ("presence-low", body_with(presence_penalty=-3), ["body", "presence_penalty"]),
    ("frequency-high", body_with(frequency_penalty=3), ["body", "frequency_penalty"]),
    ("frequency-string", body_with(frequency_penalty="0"), ["body", "frequency_penalty"]),
    ("stream-string", body_with(stream="true"), ["body", "stream"]),
    ("stream-int", body_with(stream=1), ["body", "stream"]),
    ("stop-int", body_with(stop=5), ["body", "stop"]),
    ("stop-object", body_with(stop={"a": 1}), ["body", "stop"]),
    ("stop-five", body_with(stop=["a", "b", "c", "d", "e"]), ["body", "stop"]),
    ("tools-string", body_with(tools="search"), ["body", "tools"]),
    ("tools-object", body_with(tools={"type": "function"}), ["body", "tools"]),
    ("tool-no-function", body_with(tools=[{"type": "function"}]),
     ["body", "tools", 0, "function"]),
    ("tool-bad-type", body_with(tools=[{"type": "retrieval", "function": {"name": "f"}}]),
     ["body", "tools", 0, "type"]),
    ("tool-no-name", body_with(tools=[{"type": "function", "function": {}}]),
     ["body", "tools", 0, "function", "name"]),
    ("tool-bad-name", body_with(tools=[{"type": "function", "function": {"name": "a b!"}}]),
     ["body", "tools", 0, "function", "name"]),
    ("tool-parameters-list",
     body_with(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
     ["body", "tools", 0, "function", "parameters"]),
    ("tool-choice-word", body_with(tool_choice="sometimes"), ["body", "tool_choice"]),
    ("tool-choice-int", body_with(tool_choice=5), ["body", "tool_choice"]),
    ("tool-choice-list", body_with(tool_choice=["auto"]), ["body", "tool_choice"]),
    ("session-id-empty", body_with(session_id=""), ["body", "session_id"]),
    ("session-id-int", body_with(session_id=5), ["body", "session_id"]),
    ("session-id-long", body_with(session_id="s" * 200), ["body", "session_id"]),
]


@pytest.mark.parametrize(("body", "loc"), [c[1:] for c in FIELD_CASES],
                         ids=[c[0] for c in FIELD_CASES])
async def test_wrong_field_is_422_with_one_entry_at_its_loc(routed, body, loc):
    r, up = routed
    async with r.chat(body) as resp:
        status, raw = resp.status, await resp.read()
        assert resp.content_type == "application/json"
    detail = detail_of(status, raw)
    assert [e["loc"] for e in detail] == [loc]
    assert up.seen == []


@pytest.mark.parametrize(("body", "prefix"), [
    (with_message(content=[1, 2]), ["body", "messages", 0, "content"]),
    (body_with(stop=[1]), ["body", "stop"]),
    (body_with(tools=[5]), ["body", "tools", 0]),
], ids=["content-list-of-ints", "stop-list-of-ints", "tools-list-of-ints"])
async def test_wrong_item_inside_a_union_is_located_under_the_field(routed, body, prefix):
    r, up = routed
    async with r.chat(body) as resp:
        detail = detail_of(resp.status, await resp.read())
    for entry in detail:
        assert entry["loc"][:len(prefix)] == prefix
    assert up.seen == []


async def test_several_problems_give_one_entry_each(routed):
    r, up = routed
    body = {
        "model": 5,
        "messages": [{"role": "wizard", "content": "x"}, {"role": "user", "content": 7},
                     {"role": "tool"}],
        "temperature": 9,
        "stream": "yes",
        "stop": ["a", "b", "c", "d", "e"],
        "session_id": "",
    }
    async with r.chat(body) as resp:
        detail = detail_of(resp.status, await resp.read())
    locs = [e["loc"] for e in detail]
    assert sorted(map(str, locs)) == sorted(map(str, [
        ["body", "model"],
        ["body", "messages", 0, "role"],
        ["body", "messages", 1, "content"],
        ["body", "temperature"],
        ["body", "stream"],
        ["body", "stop"],
        ["body", "session_id"],
    ]))
    assert len(locs) == len({str(loc) for loc in locs})
    assert up.seen == []


async def test_valid_edges_are_accepted(routed):
    """The boundaries themselves are legal: nothing in range is refused."""
    r, up = routed
    body = body_with(temperature=2, top_p=0, n=1, max_tokens=1, presence_penalty=-2,
                     frequency_penalty=2, stream=False, stop=["a", "b", "c", "d"],
                     tool_choice="none", session_id="s",
                     tools=[{"type": "function", "function": {"name": "f.x-1_y",
                                                              "parameters": {}}}],
                     messages=[{"role": "system", "content": None},
                               {"role": "user", "content": [{"type": "text", "text": "x"}]},
                               {"role": "assistant", "tool_calls": [{}]},
                               {"role": "tool", "content": "r", "tool_call_id": "c1"}])
    async with r.chat(body) as resp:
        assert resp.status == 200, await resp.text()
    async with r.chat(body_with(stop="\n\nHuman:")) as resp:  # a stop string of any length
        assert resp.status == 200, await resp.text()
    assert len(up.seen) == 2
    assert up.seen[1].body["stop"] == "\n\nHuman:"


def content(raw: bytes) -> bytes:
    return b'{"model": "m", "messages": [{"role": "user", "content": ' + raw + b"}]}"


def extra(raw: bytes) -> bytes:
    return b'{"model": "m", "messages": [{"role": "user", "content": "x"}], ' + raw + b"}"


NOT_JSON_CASES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("text", b"hello"),
    ("truncated", b'{"model": "m", "messages": [{"role": "user", "content": "hi"'),
    ("trailing-garbage", b'{"model": "m", "messages": []} xx'),
    ("single-quotes", b"{'model': 'm'}"),
    ("invalid-utf8", content(b'"\xff\xfe"')),
    ("overlong-utf8", content(b'"\xc0\xaf"')),
    ("lone-surrogate", content(b'"\\ud800"')),
    ("lone-low-surrogate", content(b'"a\\udc00"')),
    ("deep-array", content(b"[" * 100_000 + b"]" * 100_000)),
    ("deep-array-top", b"[" * 100_000 + b"]" * 100_000),
    ("deep-object", b'{"a":' * 20_000 + b"1" + b"}" * 20_000),
    ("nan", extra(b'"temperature": NaN')),
    ("infinity", extra(b'"top_p": Infinity')),
    ("1e309", extra(b'"temperature": 1e309')),
    ("max-tokens-1e309", extra(b'"max_tokens": 1e309')),
    ("minus-1e309-extra", extra(b'"seed": -1e309')),
    ("huge-integer", extra(b'"max_tokens": 1' + b"0" * 400)),
    ("array", b'[{"model": "m", "messages": [{"role": "user", "content": "x"}]}]'),
    ("string", b'"hello"'),
    ("number", b"42"),
    ("null", b"null"),
    ("utf16", '{"model": "m", "messages": []}'.encode("utf-16")),
    ("duplicate-top-level-key", b'{"model": "m", "model": "m", "messages": '
                                b'[{"role": "user", "content": "x"}]}'),
    ("duplicate-key-in-a-message", b'{"model": "m", "messages": '
                                   b'[{"role": "user", "role": "system", "content": "x"}]}'),
    ("duplicate-key-with-colons-in-values", b'{"model": "m", "messages": [{"role": "user", '
                                            b'"content": "a: b", "content": "c: d"}]}'),
]


@pytest.mark.parametrize("raw", [c[1] for c in NOT_JSON_CASES], ids=[c[0] for c in NOT_JSON_CASES])
async def test_body_that_is_not_a_json_object_is_422_at_body(routed, raw, caplog):
    r, up = routed
    status, _, body = await post_raw(r, raw)
    detail = detail_of(status, body)
    assert [e["loc"] for e in detail] == [["body"]]
    assert up.seen == []
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


async def test_unknown_fields_pass_through_to_the_upstream(routed):
    r, up = routed
    extras = {
        "stream_options": {"include_usage": True},
        "response_format": {"type": "json_object"},
        "seed": 42,
        "user": "u-1",
        "logit_bias": {"50256": -100},
        "x_vendor": {"nested": [1, 2.5, None, "é"]},
    }
    body = {"model": "m", "messages": [{"role": "user", "content": "hi", "cache_control": "x"}],
            **extras}
    async with r.chat(body) as resp:
        assert resp.status == 200
    sent = up.seen[0].body
    for key, value in extras.items():
        assert sent[key] == value, key
    assert sent["messages"] == body["messages"]


async def test_body_over_cap_by_content_length_is_413(routed):
    r, up = routed
    big = orjson.dumps(body_with(messages=[{"role": "user", "content": "a" * CAP}]))
    status, _, body = await post_raw(r, big)
    assert status == 413
    assert orjson.loads(body)["error"]["code"] == "request_too_large"
    assert up.seen == []


async def test_body_at_cap_is_accepted(routed):
    r, up = routed
    base = orjson.dumps(body_with(messages=[{"role": "user", "content": ""}]))
    exact = orjson.dumps(body_with(messages=[{"role": "user", "content": "a" * (CAP - len(base))}]))
    assert len(exact) == CAP
    status, _, body = await post_raw(r, exact)
    assert status == 200, body[:200]
    assert len(up.seen) == 1


async def chunked(payload: bytes, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(payload), size):
        yield payload[i:i + size]


async def test_chunked_body_over_cap_is_413(routed):
    r, up = routed
    big = orjson.dumps(body_with(messages=[{"role": "user", "content": "a" * (2 * CAP)}]))
    status, _, body = await post_raw(r, chunked(big))
    assert status == 413
    assert orjson.loads(body)["error"]["code"] == "request_too_large"
    assert up.seen == []


async def test_chunked_body_under_cap_works(routed):
    r, up = routed
    payload = orjson.dumps(body_with(messages=[{"role": "user", "content": "a" * 50_000}]))
    status, _, _ = await post_raw(r, chunked(payload, 1000))
    assert status == 200
    assert up.seen[0].body["messages"][0]["content"] == "a" * 50_000


async def test_expect_100_continue_over_cap_is_413(routed):
    r, up = routed
    big = b"x" * (CAP + 1)
    status, _, _ = await post_raw(r, big, expect100=True)
    assert status == 413
    assert up.seen == []


def bomb(inflated: int) -> bytes:
    """A small gzip whose JSON inflates to `inflated` bytes."""
    inner = (b'{"model": "m", "messages": [{"role": "user", "content": "'
             + b" " * inflated + b'"}]}')
    return gzip.compress(inner, compresslevel=9)


async def test_gzip_bomb_is_413(routed):
    r, up = routed
    small = bomb(50 * 1024 * 1024)
    assert len(small) < CAP // 2  # it fits under the cap until inflated
    status, _, body = await post_raw(r, small, {"Content-Encoding": "gzip"})
    assert status == 413
    assert orjson.loads(body)["error"]["code"] == "request_too_large"
    assert up.seen == []


async def test_gzip_just_over_cap_is_413(routed):
    r, up = routed
    status, _, _ = await post_raw(r, bomb(CAP), {"Content-Encoding": "gzip"})
    assert status == 413
    assert up.seen == []


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP"])
async def test_compressed_body_under_cap_works(routed, encoding):
    r, up = routed
    payload = orjson.dumps(body_with(seed=3, messages=[{"role": "user", "content": "zip " * 1000}]))
    data = zlib.compress(payload) if encoding == "deflate" else gzip.compress(payload)
    status, _, body = await post_raw(r, data, {"Content-Encoding": encoding})
    assert status == 200, body[:200]
    assert up.seen[0].body["messages"][0]["content"] == "zip " * 1000
    assert up.seen[0].body["seed"] == 3
    sent_encoding = {k.lower(): v for k, v in up.seen[0].headers.items()}.get("content-encoding")
    assert sent_encoding in (None, "identity")


async def test_gzip_that_is_not_gzip_is_422(routed):
    r, up = routed
    status, _, body = await post_raw(r, b"this is not gzip at all", {"Content-Encoding": "gzip"})
    assert [e["loc"] for e in detail_of(status, body)] == [["body"]]
    assert up.seen == []


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br"])
async def test_unsupported_content_encoding_is_415(routed, encoding):
    r, up = routed
    status, _, body = await post_raw(r, orjson.dumps(body_with()), {"Content-Encoding": encoding})
    assert status == 415
    assert orjson.loads(body)["error"]["code"] == "unsupported_media_type"
    assert up.seen == []


async def test_validation_happens_on_both_paths_and_after_auth(routed):
    r, up = routed
    async with r.chat(body_with(temperature=9), prefix="/v1") as resp:
        assert resp.status == 422
    async with r.chat(body_with(temperature=9), key=None) as resp:
        assert resp.status == 401  # no credential: nothing about the body is revealed
    assert up.seen == []


async def test_body_that_trickles_past_body_timeout_is_408(fakes, start_router):
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up)},
        {"m": {"backends": [{"provider": "up", "model": "gpt-x"}]}},
        server={"body_timeout_s": 0.5}))
    port = int(r.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = orjson.dumps({"model": "m", "messages": USER_MSG})
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10])
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert up.seen == []


async def test_whole_number_floats_in_integer_fields_are_accepted_and_forwarded_as_sent(
        fakes: Any, start_router: Any) -> None:
    """JSON Schema counts 2.0 as an integer: accepted, sent upstream byte for byte as the client
    wrote it, and read as 2 by the router itself (fan-out's choices, the in-process mock)."""
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up), "mock": {"type": "mock", "chunks": 2}},
        {"m": {"backends": [{"provider": "up", "model": "gpt-x"}]},
         "both": {"fanout": "all", "backends": [{"provider": "up", "model": "gpt-x"},
                                                {"provider": "mock", "model": "mk"}]},
         "local": {"backends": [{"provider": "mock", "model": "mk"}]}},
        auth={"default_limits": {"tpm": 1_000_000}}))
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2.0, ' \
          b'"max_tokens": 16.0}'
    status, _, body = await post_raw(r, raw)
    assert status == 200, body
    assert up.seen[-1].body["n"] == 2.0 and isinstance(up.seen[-1].body["n"], float)
    assert up.seen[-1].body["max_tokens"] == 16.0
    assert len(orjson.loads(body)["choices"]) == 2
    for model in ("local", "both"):
        for stream in (False, True):
            payload = orjson.dumps(body_with(model=model, n=2.0, stream=stream))
            status, _, body = await post_raw(r, payload)
            assert status == 200, (model, stream, body[:300])
    status, _, body = await post_raw(r, orjson.dumps(body_with(n=1.5)))
    assert detail_of(status, body)[0]["loc"] == ["body", "n"]
