"""The redis-py client for a `store.url` (its formats: router/config/store_url.py, which parses
it): one pool per worker, the store's timeout on every socket and pool wait, no driver retries
(a failure costs one attempt, never a retry loop: the store retries what may safely run twice,
once), no CLIENT SETINFO (`driver_info=None`: one round trip less per connection, and no package
metadata read from disk, which would block the event loop), and RESP2 (`protocol=2`). redis-py
8 speaks RESP3 by default and then turns on its "maintenance notifications", which also turns
off the pool's check on checkout: a connection that Redis closed (a restart) was handed out once
more, and its command failed. With RESP2 a connection the server closed is reopened before use,
at no round trip (the socket's end of file is already known), and a new connection costs no
HELLO.

Sentinel: after a failover new connections go to the new master (_BlockingSentinelPool).
Cluster: MOVED/ASK are followed by redis-py; every key the store uses belongs to one slot per
call. TLS options from a rediss url's query apply to the data nodes and the sentinels alike.

The client is typed as `Redis` for every topology: the store uses only the command methods
that `RedisCluster` shares with it, and keeps every pipeline and script within one slot.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.config.store_url import StoreUrl, parse_store_url

__all__ = ["MASTER_CHECK_S", "Client", "StoreUrl", "connect", "parse_store_url"]

MASTER_CHECK_S = 1.0  # how stale a Sentinel client's idea of the master may be


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The Sentinel pool, waiting (up to the store timeout) for a free connection as the
    redis:// pool does, instead of failing at once when all are in use.

    redis-py asks the sentinels for the master only when it opens a connection, and after a
    `SENTINEL FAILOVER` the old master keeps accepting writes (lost when it is demoted, up to
    ~10 s later). So at most every MASTER_CHECK_S a checkout asks again (one sentinel round
    trip), and a connection to a former master is reopened to the current one: writes reach
    the new master at most MASTER_CHECK_S after the sentinels switched."""

    _master_checked = float("-inf")

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now - self._master_checked >= MASTER_CHECK_S:
            self._master_checked = now
            # Sentinels unreachable: keep using the master we know.
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                await self.get_master_address()  # type: ignore[no-untyped-call]
        conn = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        if self.master_address is not None and (conn.host, conn.port) != self.master_address:
            try:
                await conn.disconnect()
                await conn.connect()  # to the master the sentinels name now
            except BaseException:
                await self.release(conn)
                raise
        return conn


@dataclass
class Client:
    """The command client, and how to close it with everything it opened (sentinel links)."""

    redis: Redis
    closers: list[Callable[[], Awaitable[None]]]

    async def aclose(self) -> None:
        for close in self.closers:
            await close()


def connect(url: str, *, timeout_s: float, max_connections: int = 64) -> Client:
    """The client for `url`; no connection is made until the first command."""
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "driver_info": None,
        "protocol": 2,  # see above: dead pooled connections are checked for on checkout
    }
    parsed = parse_store_url(url)
    if parsed.kind == "redis":
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,  # waiting for a free connection counts against the same budget
            decode_responses=True,
            client_name="router",
            **common,
        )
        redis = Redis.from_pool(pool)
        return Client(redis, [redis.aclose])
    auth: dict[str, Any] = {"username": parsed.username, "password": parsed.password}
    tls: dict[str, Any] = {"ssl": parsed.tls, **dict(parsed.tls_options)}
    if parsed.kind == "cluster":
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
            max_connections=max_connections,  # per node; beyond it a call fails at once
            decode_responses=True,
            client_name="router",
            **tls,
            **auth,
            **common,
        )
        return Client(cast(Redis, cluster), [cluster.aclose])
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(parsed.nodes),
        sentinel_kwargs={"password": parsed.sentinel_password, **tls, **common},
    )
    master = sentinel.master_for(
        parsed.service,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=max_connections,
        timeout=timeout_s,
        db=parsed.db,
        decode_responses=True,
        client_name="router",
        **tls,
        **auth,
        **common,
    )
    return Client(master, [master.aclose, sentinel.aclose])
