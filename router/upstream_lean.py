"""A lean HTTP/1.1 keep-alive client for upstream calls, over asyncio Protocols and transports.

Why it exists: py-spy put ~25-30% of the router's CPU in aiohttp's client at c=64 (connector
bookkeeping, timer contexts per chunk, stream readers). The router needs only a sliver of HTTP:
POST a body and stream the answer, or GET a status. This module does that with one write per
request, llhttp (through httptools) to read the answer, and timers armed only while actually
waiting. It implements router.upstream's UpstreamClient protocol and translates failures at the
boundary: connect failure -> UpstreamUnavailable, timeouts -> UpstreamTimeout, anything else ->
UpstreamError.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from router.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from router.upstream import Timeouts, UpstreamResponse, tls_context

MAX_HEAD = 64 * 1024  # status line + headers; larger answers are broken (or hostile)
MAX_HEADERS = 128  # header (or trailer) fields in one answer, as aiohttp's client allows
PROBE_BODY_MAX = 1 << 20  # a health probe's body is read this far at most
HIGH_WATER = 64 * 1024  # buffered body bytes above which the socket stops being read
LOW_WATER = 16 * 1024

# _HEAD: waiting for the final answer's head (1xx answers are skipped); _BODY: llhttp frames the
# body (Content-Length or chunked); _EOF: the body runs to the close; _DONE: the answer is whole.
_IDLE, _HEAD, _BODY, _EOF, _DONE = range(5)
_Key = tuple[str, str, int, str | None]  # scheme, host, port, CA file (https)


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class _Conn(asyncio.Protocol):
    """One connection; parses one response at a time and queues its body chunks.

    llhttp refuses what RFC 9112 does not allow (bad status lines, field names that are not
    tokens, bare CR/LF, obs-fold, duplicate or conflicting Content-Length, Content-Length with
    chunked, bad or overflowing chunk sizes); this class adds what llhttp leaves to its caller:
    caps on the head's size and on the number of fields, HTTP/1.x only, no protocol switch, and
    no transfer coding but plain chunked."""

    def __init__(self, host: _Host) -> None:
        self.host = host
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.in_pool = False
        self.idle_since = 0.0
        self._state = _IDLE
        self._parser: httptools.HttpResponseParser | None = None
        self._fields: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # read while the head is incomplete (llhttp buffers a partial field)
        self._field_bytes = 0
        self._queue: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.exc: UpstreamError | None = None
        self.got_bytes = False
        self.keep_alive = False
        self.status = 0
        self.headers: CIMultiDict[str] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state in (_IDLE, _DONE):  # bytes nobody asked for: never reuse this one
            self.keep_alive = False
            self.close_transport()
            return
        self.got_bytes = True
        if state == _EOF:
            self._feed(data)
            return
        if state == _HEAD:
            self._head_bytes += len(data)
        assert self._parser is not None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._fail(cause if isinstance(cause, UpstreamError)
                       else UpstreamError("upstream sent a malformed response"))
            return
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("upstream switched protocols"))
            return
        except httptools.HttpParserError:
            if self._state == _DONE:  # not an answer: bytes after the body
                self.keep_alive = False
            else:
                self._fail(UpstreamError("upstream sent a malformed response"))
            return
        if self._state == _HEAD and self._head_bytes > MAX_HEAD:
            self._fail(UpstreamError("upstream response head is too large"))

    def eof_received(self) -> bool | None:
        self._lost()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()
        if self.in_pool:
            self.host.forget(self)

    def _lost(self) -> None:
        self.closed = True
        self.keep_alive = False
        if self._state == _EOF:
            self._finish_body()
        elif self._state not in (_IDLE, _DONE):
            self._fail(UpstreamError("upstream connection broke mid-response" if self.headers
                                     else "upstream closed the connection without answering"))

    # -- llhttp's callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._state == _DONE:  # a second answer to one request
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:  # trailers come here too
        if self._state != _DONE:
            self._fields.append((name, value))
            self._field_bytes += len(name) + len(value)
            if len(self._fields) > MAX_HEADERS or self._field_bytes > MAX_HEAD:
                raise UpstreamError("upstream sent too many or too large header fields")

    def on_headers_complete(self) -> None:
        if self._state != _HEAD:
            return
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        fields, self._fields, self._field_bytes = self._fields, [], 0
        if status < 200:
            if status == 101 or status < 100:  # a switch was never asked for
                raise UpstreamError("upstream sent an unusable interim answer")
            return  # an interim answer (100, 103): the real one follows
        if parser.get_http_version() not in ("1.1", "1.0"):
            raise UpstreamError("upstream answered in another protocol than HTTP/1.x")
        headers: CIMultiDict[str] = CIMultiDict(
            [(name.decode("latin-1"), value.decode("latin-1").strip()) for name, value in fields])
        self.keep_alive = parser.should_keep_alive()
        codings = headers.getall("Transfer-Encoding", None)
        if codings is not None:
            # Only plain chunked is relayable: any other coding's body runs to the close.
            if len(codings) != 1 or codings[0].lower() != "chunked":
                raise UpstreamError("upstream sent a Transfer-Encoding the router cannot relay")
            self._state = _BODY
        elif status in (204, 304) or "Content-Length" in headers:
            self._state = _BODY
        else:
            self._state, self.keep_alive = _EOF, False
        self.status, self.headers = status, headers
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._state != _DONE:
            self._feed(body)

    def on_message_complete(self) -> None:
        if self._state in (_BODY, _EOF):  # not after an interim answer: its head comes next
            self._finish_body()

    # -- body and waiting ------------------------------------------------------------------
    def _feed(self, chunk: bytes) -> None:
        self._queue.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _finish_body(self) -> None:
        self._state = _DONE
        self._wake()

    def _fail(self, exc: UpstreamError) -> None:
        if self.exc is None:
            self.exc = exc
        self.keep_alive = False
        self.close_transport()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- used by the client and the response ----------------------------------------------
    def usable(self) -> bool:
        t = self.transport
        return not self.closed and t is not None and not t.is_closing() and self._state == _IDLE

    def start(self, payload: bytes) -> None:
        # One parser per answer: llhttp keeps nothing from the last one (a failed one included).
        self._parser = httptools.HttpResponseParser(self)
        self._state, self._buffered, self._head_bytes, self._field_bytes = _HEAD, 0, 0, 0
        self._fields.clear()
        self._queue.clear()
        self.exc, self.got_bytes, self.keep_alive, self.headers = None, False, False, None
        assert self.transport is not None
        self.transport.write(payload)

    @property
    def done(self) -> bool:
        return self._state == _DONE and self.exc is None

    def reset(self) -> None:
        self._state = _IDLE

    async def _wait(self, idle_s: float, deadline: float) -> None:
        left = deadline - self.loop.time()
        if left <= 0:
            raise UpstreamTimeout("upstream did not finish in time")
        fut = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(min(idle_s, left), _expire, fut)
        try:
            await fut
        except TimeoutError:
            self.keep_alive = False
            raise UpstreamTimeout("upstream went silent" if idle_s < left
                                  else "upstream did not finish in time") from None
        finally:
            timer.cancel()
            self._waiter = None

    async def wait_head(self, idle_s: float, deadline: float) -> None:
        while self.headers is None:
            if self.exc is not None:
                raise self.exc
            await self._wait(idle_s, deadline)

    async def next_chunk(self, idle_s: float, deadline: float) -> bytes:
        """The body bytes buffered so far (joined), or b"" at its end."""
        while not self._queue:
            if self.exc is not None:
                raise self.exc
            if self._state == _DONE:
                return b""
            await self._wait(idle_s, deadline)
        if self.loop.time() > deadline:
            raise UpstreamTimeout("upstream did not finish in time")
        queue = self._queue
        chunk = queue.popleft() if len(queue) == 1 else b"".join(queue)
        queue.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()




class _Host:
    """The pool for one (scheme, host, port, CA file): idle connections and a per-host
    limit."""

    def __init__(self, key: _Key, limit: int, keepalive_s: float) -> None:
        self.key, self.limit, self.keepalive_s = key, limit, keepalive_s
        self.idle: list[_Conn] = []
        self.count = 0  # open or opening connections
        self.waiters: deque[asyncio.Future[_Conn | None]] = deque()

    async def acquire(self, connect_s: float, deadline: float) -> tuple[_Conn, bool]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self.idle:
            conn = self.idle.pop()
            conn.in_pool = False
            if conn.usable() and now - conn.idle_since < self.keepalive_s:
                return conn, True
            conn.close_transport()
            self.count -= 1
        wait_s = min(connect_s, deadline - now)
        if self.count >= self.limit:
            fut: asyncio.Future[_Conn | None] = loop.create_future()
            self.waiters.append(fut)
            timer = loop.call_later(wait_s, _expire, fut)
            try:
                got = await fut
            except TimeoutError:
                raise UpstreamTimeout("no upstream connection came free in time") from None
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self.give_back(fut.result())
                raise
            finally:
                timer.cancel()
                fut.cancel()
            if got is not None:
                return got, True
            wait_s = min(connect_s, deadline - loop.time())
        else:
            self.count += 1
        try:
            return await self.connect(wait_s), False
        except BaseException:
            self.free_slot()
            raise

    async def connect(self, timeout_s: float) -> _Conn:
        scheme, host, port, ca_file = self.key
        ctx = await tls_context(ca_file) if scheme == "https" else None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self), host, port, ssl=ctx,
                    server_hostname=host if ctx is not None else None)
        except TimeoutError:
            raise UpstreamTimeout("could not connect to upstream in time") from None
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamUnavailable("the upstream's TLS certificate is not trusted") from exc
        except OSError as exc:
            raise UpstreamUnavailable("could not connect to upstream") from exc
        return conn

    def release(self, conn: _Conn, reusable: bool) -> None:
        if reusable and conn.usable():
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            conn.in_pool, conn.idle_since = True, conn.loop.time()
            self.idle.append(conn)
        else:
            conn.close_transport()
            self.free_slot()

    def free_slot(self) -> None:
        while self.waiters:  # the slot passes to a waiter, who opens a new connection
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.count -= 1

    def give_back(self, got: _Conn | None) -> None:
        if got is None:
            self.free_slot()
        else:
            self.release(got, True)

    def forget(self, conn: _Conn) -> None:
        if conn.in_pool:
            conn.in_pool = False
            self.idle.remove(conn)
            self.free_slot()


class _LeanResponse:
    __slots__ = ("_complete", "_conn", "_deadline", "_host", "_idle_s", "_released", "headers",
                 "status")

    def __init__(self, conn: _Conn, host: _Host, idle_s: float, deadline: float) -> None:
        assert conn.headers is not None
        self._conn, self._host, self._idle_s, self._deadline = conn, host, idle_s, deadline
        self._released = False
        self._complete = False  # released after its whole body
        self.status = conn.status
        self.headers: Mapping[str, str] = conn.headers

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks. Its end or a failure releases the connection; whoever stops
        iterating earlier must call `close()` (nothing releases it when it is dropped)."""
        return _Chunks(self)

    def close(self) -> None:
        # An unfinished body closes the connection: the upstream sees its client leave at once.
        if not self._released:
            self._released = True
            conn = self._conn
            self._complete = conn.done
            reusable = conn.done and conn.keep_alive
            if reusable:
                conn.reset()
            self._host.release(conn, reusable)


class _Chunks:
    """A response's body chunks as they arrive. An iterator object, not an async generator:
    the event loop tracks every async generator it starts (a WeakSet entry, made and dropped,
    about 3 µs per request). The body's end, or a failure, releases the connection."""

    __slots__ = ("_ended", "_resp")

    def __init__(self, resp: _LeanResponse) -> None:
        self._resp = resp
        self._ended = False

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        resp = self._resp
        if self._ended or resp._released:
            if self._ended or resp._complete:
                raise StopAsyncIteration
            raise UpstreamError("the upstream answer was closed before its end")
        try:
            chunk = await resp._conn.next_chunk(resp._idle_s, resp._deadline)
        except BaseException:
            self._ended = True
            resp.close()
            raise
        if not chunk:  # the body is complete: the connection goes back to the pool
            self._ended = True
            resp.close()
            raise StopAsyncIteration
        return chunk


class LeanUpstream:
    """Per-(scheme, host, port, CA file) keep-alive pools, made lazily inside the worker's
    loop."""

    def __init__(self, *, max_connections: int, max_per_host: int,
                 keepalive_s: float = 4.0) -> None:
        # An idle connection is reused for 4 s at most: common servers (uvicorn behind vLLM)
        # close theirs after 5 s, and a stale one costs a retry.
        self._max_per_host = max(1, min(max_per_host, max_connections))
        self._keepalive_s = keepalive_s
        self._hosts: dict[_Key, _Host] = {}
        self._urls: dict[tuple[str, str | None], tuple[_Host, str, str]] = {}

    def _target(self, url: str, ca_file: str | None, keep: bool = True
                ) -> tuple[_Host, str, str]:
        """The URL's pool, request target and authority; kept for the next request unless
        `keep` is False (a URL that names one stored object would only fill the cache)."""
        found = self._urls.get((url, ca_file))
        if found is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UpstreamError("unsupported upstream URL")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            key = (parts.scheme, parts.hostname, port,
                   ca_file if parts.scheme == "https" else None)
            host = self._hosts.get(key)
            if host is None:
                host = self._hosts[key] = _Host(key, self._max_per_host, self._keepalive_s)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            found = (host, path, parts.netloc.rpartition("@")[2])
            if keep:
                self._urls[url, ca_file] = found
        return found

    async def _request(self, method: str, url: str, headers: Mapping[str, str],
                       body: bytes | None, timeouts: Timeouts, ca_file: str | None,
                       keep_url: bool = True) -> _LeanResponse:
        host, path, authority = self._target(url, ca_file, keep_url)
        lines = [f"{method} {path} HTTP/1.1\r\nHost: {authority}\r\n"]
        if body is None:
            body = b""
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.extend([f"{k}: {v}\r\n" for k, v in headers.items()])
        lines.append("\r\n")
        head = "".join(lines)
        breaks = len(lines) + 1  # the first item holds two lines
        if head.count("\n") != breaks or head.count("\r") != breaks:
            raise UpstreamError("an upstream header holds a line break")
        payload = head.encode() + body
        deadline = asyncio.get_running_loop().time() + timeouts.total_s
        conn, reused = await host.acquire(timeouts.connect_s, deadline)
        try:
            while True:
                conn.start(payload)
                try:
                    await conn.wait_head(timeouts.idle_s, deadline)
                    break
                except UpstreamError:
                    if not (reused and conn.closed and not conn.got_bytes):
                        raise
                # A stale keep-alive connection: once more on a fresh one, in the same slot.
                conn.close_transport()
                reused = False
                conn = await host.connect(min(timeouts.connect_s,
                                              deadline - conn.loop.time()))
        except BaseException:
            conn.keep_alive = False
            host.release(conn, False)
            raise
        return _LeanResponse(conn, host, timeouts.idle_s, deadline)

    async def post(self, url: str, headers: Mapping[str, str], body: bytes,
                   timeouts: Timeouts, ca_file: str | None = None) -> UpstreamResponse:
        return await self._request("POST", url, headers, body, timeouts, ca_file)

    async def request(self, method: str, url: str, headers: Mapping[str, str],
                      body: bytes | None, timeouts: Timeouts,
                      ca_file: str | None = None) -> UpstreamResponse:
        return await self._request(method, url, headers, body, timeouts, ca_file,
                                   keep_url=False)

    async def get_status(self, url: str, headers: Mapping[str, str], timeout_s: float,
                         ca_file: str | None = None) -> int:
        try:
            resp = await self._request("GET", url, headers, b"",
                                       Timeouts(timeout_s, timeout_s, timeout_s), ca_file)
            try:
                size = 0  # read to its end (the connection goes back to the pool), capped
                async for chunk in resp.iter_chunks():
                    size += len(chunk)
                    if size > PROBE_BODY_MAX:
                        raise UpstreamError("upstream response is too large")
            finally:
                resp.close()
            return resp.status
        except UpstreamError:
            return 0

    async def close(self) -> None:
        for host in self._hosts.values():
            while host.idle:
                conn = host.idle.pop()
                conn.in_pool = False
                conn.close_transport()
        self._hosts.clear()
        self._urls.clear()
        await asyncio.sleep(0)  # let the transports finish closing before the loop goes away
