"""Misbehaving clients (and the upstream silences they meet): bounded in time, others unaffected.

Real sockets on loopback. Raw sockets play the clients no HTTP library would be: half a request
head, an over-long header, a reader that stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.config.model import LoggingConfig
from router.log import JsonFormatter, TextFormatter, setup_logging
from tests.conftest import (
    KEY,
    USER_MSG,
    eventually,
    openai_provider,
    router_config,
    sse_events,
)

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
PARTIAL_HEAD = b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"


# -- helpers -----------------------------------------------------------------------------------

async def _single(fakes, start_router, model: str, *, server: dict[str, Any] | None = None,
                  **route: Any):
    """A router whose route `m` has one backend: a fake upstream serving `model`."""
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up, probe=False)},
        {"m": {"backends": [{"provider": "up", "model": model}], **route}},
        server=server or {}))
    return up, r


def _port(r) -> int:
    return int(r.url.rsplit(":", 1)[1])


def _inflight(r) -> int:
    return sum(b.state.inflight for b in r.worker.ref.current.table.backends())


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes; a reset counts as closed too."""
    parts = []
    try:
        while chunk := await reader.read(65536):
            parts.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(parts)


async def _raw_exchange(port: int, data: bytes, within: float = 5.0) -> bytes:
    """Send `data` on a fresh connection; return all the server answers before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(_read_to_eof(reader), within)
    finally:
        writer.close()


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), answer[:200]
    return int(answer.split(b" ", 2)[1])


def _chat_request(body: dict[str, Any], extra_headers: list[tuple[str, str]] = ()) -> bytes:
    payload = json.dumps(body).encode()
    lines = ["POST /api/v1/chat/completions HTTP/1.1", "Host: 127.0.0.1",
             f"Authorization: Bearer {KEY}", "Content-Type: application/json",
             f"Content-Length: {len(payload)}"]
    lines += [f"{k}: {v}" for k, v in extra_headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def _strip_keepalives(raw: bytes) -> tuple[bytes, int]:
    """`raw` without its keep-alive comments, and how many there were. Each comment must sit
    between whole events (at the start or right after a blank line), never inside one."""
    count = 0
    pos = raw.find(KEEPALIVE)
    while pos != -1:
        assert pos == 0 or raw[:pos].endswith(b"\n\n"), raw[max(0, pos - 80):pos + 20]
        count += 1
        pos = raw.find(KEEPALIVE, pos + len(KEEPALIVE))
    return raw.replace(KEEPALIVE, b""), count


async def _direct(fake, body: dict[str, Any]) -> bytes:
    """The bytes a fake sends when called directly."""
    async with aiohttp.ClientSession() as http, \
            http.post(f"{fake.base_url}/chat/completions", json=body) as resp:
        return await resp.read()


async def _read_raw(resp: aiohttp.ClientResponse) -> bytes:
    return b"".join([chunk async for chunk in resp.content.iter_any()])


async def _chat_ok(r) -> None:
    # A connection of its own each time: with keepalive_timeout_s 0.5 a pooled one could be
    # reused just as the server closes it for idleness (a race of any keep-alive client).
    async with r.chat({"model": "m", "messages": USER_MSG},
                      headers={"Connection": "close"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["object"] == "chat.completion"


# -- 1. slowloris ------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["stall", "trickle"])
async def test_partial_request_head_is_closed_while_others_are_served(fakes, start_router,
                                                                      style):
    _, r = await _single(fakes, start_router, "gpt-x", server={"keepalive_timeout_s": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(r))
    opened = time.monotonic()

    async def trickle() -> None:
        # Header bytes keep coming, one every 0.1 s: the head never completes.
        with contextlib.suppress(ConnectionError):
            for byte in b"X-Slow: " + b"a" * 200:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)

    writer.write(PARTIAL_HEAD)
    await writer.drain()
    dribbler = asyncio.ensure_future(trickle()) if style == "trickle" else None
    try:
        await _chat_ok(r)  # another connection is served meanwhile
        answer = await asyncio.wait_for(_read_to_eof(reader), 3.0)
        closed_after = time.monotonic() - opened
    finally:
        if dribbler is not None:
            dribbler.cancel()
        writer.close()
    assert answer == b""  # closed without an answer: it never sent a request
    assert closed_after < 3.0
    await _chat_ok(r)


async def test_fifty_slowloris_connections_all_closed_in_time(fakes, start_router):
    _, r = await _single(fakes, start_router, "gpt-x", server={"keepalive_timeout_s": 0.5})
    conns = [await asyncio.open_connection("127.0.0.1", _port(r)) for _ in range(50)]
    start = time.monotonic()
    try:
        for _, writer in conns:
            writer.write(PARTIAL_HEAD)
        await asyncio.gather(*(w.drain() for _, w in conns))
        await asyncio.gather(*(_chat_ok(r) for _ in range(5)))
        answers = await asyncio.wait_for(
            asyncio.gather(*(_read_to_eof(reader) for reader, _ in conns)), 4.0)
    finally:
        for _, writer in conns:
            writer.close()
    assert answers == [b""] * 50
    assert time.monotonic() - start < 4.0
    await _chat_ok(r)


# -- 2. malformed request heads ----------------------------------------------------------------

@pytest.fixture
def router_logging(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The router's own logging setup (as `router serve` installs it), captured by caplog."""
    root = logging.getLogger()
    server_log = logging.getLogger("aiohttp.server")
    saved = (root.handlers[:], root.level, server_log.filters[:], server_log.level)
    setup_logging(LoggingConfig(level="info", format="text"))
    root.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="aiohttp.server")
    yield caplog
    root.handlers[:], root.level, server_log.filters[:], server_log.level = saved


def _assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    for rec in caplog.records:
        assert rec.exc_info is None or rec.exc_info[0] is None, (rec.name, rec.getMessage())
        assert rec.levelno < logging.ERROR, (rec.name, rec.getMessage())


@pytest.mark.parametrize("case", ["long-header", "129-headers", "garbage-line",
                                  "garbage-after-a-request"])
async def test_malformed_request_head_is_400_without_traceback(fakes, start_router,
                                                               router_logging, case):
    up, r = await _single(fakes, start_router, "gpt-x")
    body = {"model": "m", "messages": USER_MSG}
    if case == "long-header":
        data = _chat_request(body, [("X-Long", "v" * 9 * 1024)])
    elif case == "129-headers":
        # Host, Authorization, Content-Type, Content-Length + 125 more = 129 header lines.
        data = _chat_request(body, [(f"X-H{i}", "1") for i in range(125)])
        assert data.split(b"\r\n\r\n")[0].count(b"\r\n") == 129
    elif case == "garbage-line":
        data = b"\x16\x03\x01 garbage \xff\xfe/\r\n\r\n"  # e.g. TLS to the plain port
    if case == "garbage-after-a-request":
        # Junk on a connection that already sent a good request: aiohttp logs it at ERROR.
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(r))
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            assert _status(first) == 200
            length = int(next(line.split(b":")[1] for line in first.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            await asyncio.wait_for(reader.readexactly(length), 5.0)
            writer.write(b"JUNK\x01 /?? HTTP/1.1\r\n\r\n")
            answer = await asyncio.wait_for(_read_to_eof(reader), 5.0)
        finally:
            writer.close()
    else:
        answer = await _raw_exchange(_port(r), data)
    assert _status(answer) in (400, 431)
    assert up.seen == []  # rejected before any upstream call
    _assert_no_traceback(router_logging)
    lines = [rec for rec in router_logging.records if rec.name == "aiohttp.server"]
    assert len(lines) <= 1  # at most one line per bad request
    await _chat_ok(r)  # and the router is fine


async def test_headers_under_the_limits_are_accepted(fakes, start_router):
    _, r = await _single(fakes, start_router, "gpt-x")
    body = {"model": "m", "messages": USER_MSG}
    data = _chat_request(body, [("X-Long", "v" * 7 * 1024)]
                         + [(f"X-H{i}", "1") for i in range(122)]
                         + [("Connection", "close")])
    assert data.split(b"\r\n\r\n")[0].count(b"\r\n") == 128  # the most allowed
    answer = await _raw_exchange(_port(r), data)
    assert _status(answer) == 200


# -- 3. SSE keep-alive through upstream silence ------------------------------------------------

async def test_keepalive_comments_fill_upstream_silence(fakes, start_router):
    model = "chunks:3+gap:1.5"
    _, r = await _single(fakes, start_router, model, server={"sse_keepalive_s": 0.3})
    twin = await fakes("twin")  # a fresh fake: same id counter as `up` had
    body = {"model": "m", "messages": USER_MSG, "stream": True}

    async def through_router() -> bytes:
        async with r.chat(body) as resp:
            assert resp.status == 200
            return await _read_raw(resp)

    got, want = await asyncio.gather(through_router(), _direct(twin, {**body, "model": model}))
    data, comments = _strip_keepalives(got)
    assert comments >= 1  # 1.5 s of silence, three times: the client heard from us meanwhile
    assert data == want  # the upstream's bytes, untouched and in order
    assert data.endswith(DONE) and data.count(DONE) == 1
    for name, payload in sse_events(data)[:-1]:
        assert name is None
        json.loads(payload)


# -- 4. an upstream that trickles bytes but never completes an event ---------------------------

FIRST_EVENT = (b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
               b'"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n')
TRICKLE = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta"'


class _Trickler:
    """A loopback upstream: response head and one whole event, then one byte of the next event
    every 0.3 s, never finishing it. Records when its client (the router) goes away."""

    def __init__(self) -> None:
        self.disconnected: float | None = None
        self.runner: web.AppRunner | None = None
        self.base_url = ""

    async def handler(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await resp.prepare(request)
            await resp.write(FIRST_EVENT)
            for i in range(10_000):
                await asyncio.sleep(0.3)
                await resp.write(TRICKLE[i % len(TRICKLE):][:1])
        except (asyncio.CancelledError, ConnectionError):
            self.disconnected = time.monotonic()
            raise
        return resp

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handler)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}/v1"


@pytest.fixture
async def trickler() -> Any:
    t = _Trickler()
    await t.start()
    yield t
    assert t.runner is not None
    await t.runner.cleanup()


async def test_trickling_upstream_hits_the_idle_timeout(start_router, trickler):
    # Keep-alive comments every 0.3 s too: the router's own writes must not count as activity.
    r = await start_router(router_config(
        {"up": {"type": "openai", "base_url": trickler.base_url, "probe": False}},
        {"m": {"backends": [{"provider": "up", "model": "x"}], "idle_timeout_s": 1.0}},
        server={"sse_keepalive_s": 0.3}))
    start = time.monotonic()
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
        assert resp.status == 200
        got = await asyncio.wait_for(_read_raw(resp), 6.0)  # a clean end: no payload error
    took = time.monotonic() - start
    assert 0.9 <= took < 4.0
    data, _ = _strip_keepalives(got)
    assert data.startswith(FIRST_EVENT)
    rest = data[len(FIRST_EVENT):]
    events = sse_events(rest)
    assert len(events) == 1, rest  # no half event, no [DONE]: exactly one error event
    name, payload = events[0]
    assert name == "error"
    assert "idle" in json.loads(payload)["error"]["message"]
    assert rest.startswith(b"event: error\n") and rest.endswith(b"\n\n")
    assert DONE not in data
    await eventually(lambda: trickler.disconnected is not None, 2.0)
    await eventually(lambda: _inflight(r) == 0, 1.0)


# -- 5. a client that stops reading ------------------------------------------------------------

async def test_client_that_stops_reading_is_cut_off_and_the_upstream_closed(fakes, start_router):
    model = "chunks:200000"  # ~40 MB if nothing pushed back
    up, r = await _single(fakes, start_router, model, server={"write_stall_timeout_s": 1.0})
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", _port(r)))
        await loop.sock_sendall(sock, _chat_request({"model": "m", "messages": USER_MSG,
                                                     "stream": True}))
        # ... and then never reads.
        await eventually(lambda: len(up.seen) == 1, 5.0)
        await eventually(lambda: up.seen[0].t_disconnected is not None, 9.0)
        assert up.seen[0].t_disconnected - up.seen[0].t_received < 9.0
        assert up.seen[0].t_finished is None  # backpressure held the upstream back meanwhile
        await eventually(lambda: _inflight(r) == 0, 1.0)
    finally:
        sock.close()


# -- 6. a slow but genuine stream lives --------------------------------------------------------

async def test_slow_stream_within_idle_timeout_completes(fakes, start_router):
    up, r = await _single(fakes, start_router, "chunks:4+gap:0.6", idle_timeout_s=1.0)
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
        assert resp.status == 200
        got = await _read_raw(resp)
    events = sse_events(got)
    assert all(name is None for name, _ in events)  # no error event
    assert got.endswith(DONE) and got.count(DONE) == 1
    assert sum(b"tok" in e[1].encode() for e in events) == 4
    assert up.seen[0].t_finished is not None and up.seen[0].t_disconnected is None


# -- a client's fault is not its backend's -----------------------------------------------------

async def test_clients_leaving_mid_stream_do_not_eject_the_backend(fakes, start_router):
    up = await fakes("up")
    model = "chunks:50+gap:0.2"
    r = await start_router(router_config(
        {"up": openai_provider(up, probe=False)},
        {"m": {"backends": [{"provider": "up", "model": model, "name": "a"},
                            {"provider": "up", "model": model, "name": "b"}],
               "strategy": "round_robin", "ejection": {"consecutive_failures": 1}}}))
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
        assert resp.status == 200
        left_from = resp.headers["x-router-backend"]
        got = b""
        while b"tok0" not in got:
            got += await resp.content.readany()
        resp.close()  # the user pressed "stop generating"
    await eventually(lambda: _inflight(r) == 0, 2.0)
    served = []
    for _ in range(4):
        async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
            assert resp.status == 200
            served.append(resp.headers["x-router-backend"])
    assert left_from in served  # still in rotation: the upstream did nothing wrong
    assert sorted(set(served)) == ["a", "b"]


# -- 2b. aiohttp's own refusals keep the error contract ------------------------------------------

CANARY = "sk-CANARY-" + "c" * 24


def _split_answer(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return _status(answer), headers, body


def _bad_head(case: str) -> bytes:
    """A request the HTTP parser refuses; each carries the canary somewhere in its head."""
    body = {"model": "m", "messages": USER_MSG}
    if case == "bad-request-line":
        return f"GET /v1/models?key={CANARY} HTTP/1.1 trailing\r\nHost: x\r\n\r\n".encode()
    if case == "header-without-colon":
        return _chat_request(body, [("X-Fine", "1")]).replace(
            b"X-Fine: 1", f"X-Secret {CANARY}".encode())
    if case == "9kb-header-line":
        return _chat_request(body, [("X-Long", CANARY + "v" * 9 * 1024)])
    if case == "129-headers":
        return _chat_request(body, [("X-Secret", CANARY)]
                             + [(f"X-H{i}", "1") for i in range(124)])
    if case == "control-char-in-value":
        return _chat_request(body, [("X-Secret", CANARY + "\x01")])
    assert case == "invalid-chunked"
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {KEY}\r\nX-Secret: {CANARY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    return head.encode() + f"zz{CANARY}\r\n{{}}\r\n0\r\n\r\n".encode()


@pytest.mark.parametrize("case", ["bad-request-line", "header-without-colon", "9kb-header-line",
                                  "129-headers", "control-char-in-value", "invalid-chunked"])
async def test_refused_request_heads_get_the_json_error_shape(fakes, start_router,
                                                              router_logging, case):
    up, r = await _single(fakes, start_router, "gpt-x")
    data = _bad_head(case)
    start = time.monotonic()
    answer = await _raw_exchange(_port(r), data)  # returns once the router closes
    assert time.monotonic() - start < 5.0
    status, headers, body = _split_answer(answer)
    assert 400 <= status < 500
    assert headers["content-type"].startswith("application/json"), answer[:300]
    assert re.fullmatch(r"[A-Za-z0-9._:\-]{1,128}", headers["x-request-id"])
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["type"] == "invalid_request_error"
    # Nothing of what the client sent comes back: neither the secret nor the request line.
    request_line = data.split(b"\r\n", 1)[0]
    assert CANARY.encode() not in answer and CANARY[:10].encode() not in answer
    for fragment in request_line.split(b" ") + request_line.split(b"?"):
        if len(fragment) > 8:
            assert fragment not in answer, fragment
    assert up.seen == []
    _assert_no_traceback(router_logging)
    for rec in router_logging.records:
        assert CANARY[:10] not in rec.getMessage(), rec.getMessage()
    await _chat_ok(r)


# -- 2c. a body too slow closes; logs carry no client string verbatim; 405 names what is allowed -

async def test_body_too_slow_is_408_and_the_connection_closes(fakes, start_router):
    up, r = await _single(fakes, start_router, "gpt-x", server={"body_timeout_s": 0.5})
    head = _chat_request({"model": "m", "messages": USER_MSG}).split(b"\r\n\r\n")[0]
    head = re.sub(rb"Content-Length: \d+", b"Content-Length: 100", head)
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(r))
    try:
        writer.write(head + b"\r\n\r\n" + b'{"model": ')  # 10 of the 100 bytes, then nothing
        await writer.drain()
        start = time.monotonic()
        answer = await asyncio.wait_for(_read_to_eof(reader), 5.0)
        closed_after = time.monotonic() - start
    finally:
        writer.close()
    status, headers, body = _split_answer(answer)
    assert status == 408
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert headers.get("connection", "").lower() == "close"
    assert closed_after < 2.0  # closed right after the answer, not after a lingering read
    assert up.seen == []


async def test_logs_carry_client_strings_bounded_and_redacted(fakes, start_router,
                                                             router_logging):
    _, r = await _single(fakes, start_router, "gpt-x")
    json_lines = r.access_log()
    auth = {"Authorization": f"Bearer {KEY}"}
    expected = []
    # Quotes in the value: its repr escapes one kind, which must not end the redacted span.
    for model in (CANARY, f"x'\"{CANARY}", f"{CANARY[:12]}'{CANARY[12:]}\"", f'"{CANARY}'):
        async with r.chat({"model": model, "messages": USER_MSG}) as resp:
            expected.append((resp.status, 404))
    async with r.chat({"model": "m", "messages": USER_MSG},
                      headers={"Content-Encoding": CANARY}) as resp:
        expected.append((resp.status, 415))
    # (An unknown method is refused by the HTTP parser itself.)
    for method, path, want in (("GET", f"/api/v1/sessions/{CANARY}", 404),
                               ("GET", f"/v1/{CANARY}/x", 404),
                               (CANARY.upper(), "/v1/models", 400)):
        async with r.http.request(method, r.url + path, headers=auth) as resp:
            await resp.read()
            expected.append((resp.status, want))
    assert [got for got, _ in expected] == [want for _, want in expected]
    records = router_logging.records
    access = [json.dumps(line, ensure_ascii=False) for line in json_lines()]
    # Every request was logged (but the one the HTTP parser refused, before the router) ...
    assert len(access) == len(expected) - 1
    text_lines = r.access_log(json=False)  # the same lines as text
    for model in (CANARY, f'"{CANARY}'):
        async with r.chat({"model": model, "messages": USER_MSG}) as resp:
            assert resp.status == 404
    access += text_lines()
    assert len(access) == len(expected) + 1
    text = "\n".join([JsonFormatter().format(rec) for rec in records]
                     + [TextFormatter().format(rec) for rec in records] + access)
    assert "CANARY" not in text.upper()  # ... none with the client's string verbatim
    assert "CCCCCCCC" not in text.upper()  # (nor its tail)
    assert "sk-C" in text  # but in a bounded form that still says what it was
    assert max(len(line) for line in text.splitlines()) < 1000


async def test_405_names_the_allowed_methods(fakes, start_router):
    _, r = await _single(fakes, start_router, "gpt-x")
    auth = {"Authorization": f"Bearer {KEY}"}
    for method, path, allowed in (("GET", "/v1/chat/completions", {"POST"}),
                                  ("DELETE", "/api/v1/automation/settings", {"GET", "PUT"})):
        async with r.http.request(method, r.url + path, headers=auth) as resp:
            assert resp.status == 405
            assert (await resp.json())["error"]["code"] == "method_not_allowed"
            assert {m.strip() for m in resp.headers["Allow"].split(",")} == allowed
            assert "x-request-id" in resp.headers
