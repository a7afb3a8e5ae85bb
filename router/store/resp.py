"""A lean RESP link for the store's script calls (limits, sessions) on a plain redis:// store.

Every request runs one or two scripts, and redis-py spends ~100 µs of CPU on each pipeline
(command packing in Python, retry wrappers, pool checkout and release, reply parsing): with a
local Redis that was most of the limiter's cost. This link is one asyncio Protocol on one
connection: commands packed by `hiredis.pack_command`, replies parsed by `hiredis.Reader`
and matched to their futures in order (Redis answers in order), a batch is one write.

It connects lazily (AUTH and SELECT as the url says, TLS when rediss://), within the store
timeout. A lost or failed connection fails every call waiting on it with a ConnectionError,
which the store turns into StoreError, and the next batch reconnects; a reply overdue by the
store timeout (a stopped Redis) drops the connection the same way. Everything else (keys,
settings, refreshes, Sentinel, Cluster) stays on redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.typing import EncodableT

Command = tuple[EncodableT, ...]
Reply = Callable[[Any], None]  # gets the reply, a server error, or the connection's failure


def _resolve(future: asyncio.Future[Any], reply: Any) -> None:
    if not future.done():
        future.set_result(reply)


def _reply_error(message: str) -> ResponseError:
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


class _Protocol(asyncio.Protocol):
    def __init__(self, link: RespLink) -> None:
        self._link = link

    def data_received(self, data: bytes) -> None:
        self._link.received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.lost(self, exc)


class RespLink:
    """One connection to the Redis behind `redis` (a redis:// client), for `execute`."""

    def __init__(self, redis: Redis, timeout_s: float) -> None:
        pool = redis.connection_pool
        self._kwargs: dict[str, Any] = dict(pool.connection_kwargs)
        self._tls = issubclass(pool.connection_class, SSLConnection)
        self._timeout_s = timeout_s
        self._ssl: ssl.SSLContext | None = None
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._reader = self._new_reader()
        self._waiting: collections.deque[Reply] = collections.deque()
        self._sent = self._answered = 0  # replies asked for and got, on this connection
        self._lock = asyncio.Lock()

    def _new_reader(self) -> Any:
        encoding = self._kwargs.get("encoding", "utf-8")
        return hiredis.Reader(replyError=_reply_error,
                              encoding=encoding if self._kwargs.get("decode_responses") else None,
                              errors=self._kwargs.get("encoding_errors", "strict"))

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """The replies to `commands`, sent in one write, connecting first if need be; a server
        error or a connection failure comes back as its exception."""
        if not self.connected:
            async with self._lock:
                if not self.connected:
                    await self._connect()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self.send(commands, [partial(_resolve, f) for f in futures])
        return [await future for future in futures]

    def send(self, commands: Sequence[Command], callbacks: Sequence[Reply]) -> None:
        """Write `commands` at once (connected only); each reply, or the failure of the
        connection, is handed to its callback, from the protocol's callbacks."""
        transport, protocol = self._transport, self._protocol
        if transport is None or transport.is_closing():
            raise RedisConnectionError("the store connection was lost")
        # (hiredis's stub types the tuple as one item)
        transport.write(b"".join(hiredis.pack_command(c) for c in commands))  # type: ignore[arg-type]
        self._waiting.extend(callbacks)
        self._sent += len(callbacks)
        asyncio.get_running_loop().call_later(self._timeout_s, self._overdue, protocol, self._sent)

    def _overdue(self, protocol: _Protocol | None, sent: int) -> None:
        if protocol is self._protocol and self._answered < sent and self._transport:
            self._drop(RedisConnectionError("the store did not answer in time"))

    async def _connect(self) -> None:
        kw = self._kwargs
        if self._tls and self._ssl is None:
            # redis-py's context for these kwargs (ssl_ca_certs and all); loading the CA
            # bundle reads files: not on the event loop
            self._ssl = await asyncio.to_thread(lambda: SSLConnection(**kw).ssl_context.get())
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                transport, protocol = await loop.create_connection(
                    lambda: _Protocol(self), kw.get("host", "localhost"),
                    kw.get("port", 6379), ssl=self._ssl)
                self._transport, self._protocol = transport, protocol
                self._reader = self._new_reader()
                self._sent = self._answered = 0
                setup: list[Command] = []
                if kw.get("password"):
                    user = kw.get("username")
                    setup.append(("AUTH", user, kw["password"]) if user
                                 else ("AUTH", kw["password"]))
                if kw.get("db"):
                    setup.append(("SELECT", kw["db"]))
                for reply in await self.execute(setup):
                    if isinstance(reply, Exception):
                        raise RedisConnectionError(f"store connection setup failed: {reply}")
        except TimeoutError:
            self._drop(RedisConnectionError("connecting to the store timed out"))
            raise RedisConnectionError("connecting to the store timed out") from None
        except BaseException as exc:
            self._drop(exc if isinstance(exc, Exception) else None)
            raise

    def received(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        reader = self._reader
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                self._answered += 1
                self._waiting.popleft()(reply)
        except Exception as exc:  # a protocol error, or a reply nobody asked for
            self._drop(RedisConnectionError(f"bad reply from the store: {exc!r}"))

    def lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            self._drop(exc or RedisConnectionError("the store closed the connection"))

    def _drop(self, exc: BaseException | None) -> None:
        """Close the connection and fail whatever waits on it; the next call reconnects."""
        transport, self._transport, self._protocol = self._transport, None, None
        if transport is not None:
            transport.abort()
        waiting, self._waiting = self._waiting, collections.deque()
        error = exc if isinstance(exc, (OSError, RedisConnectionError)) else \
            RedisConnectionError(f"the store connection failed: {exc!r}")
        for callback in waiting:
            callback(error)

    def close(self) -> None:
        self._drop(RedisConnectionError("the store was closed"))
