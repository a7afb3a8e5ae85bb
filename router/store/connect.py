"""The redis-py client for a `store.url`: one pool per worker, the store's timeout on every
socket and pool wait, no driver retries (a failure costs one attempt, never a retry loop: the
store retries what may safely run twice, once), no CLIENT SETINFO (`driver_info=None`: one round
trip less per connection, and no package metadata read from disk, which would block the event
loop), and RESP2 (`protocol=2`). redis-py 8 speaks RESP3 by default and then turns on its
"maintenance notifications", which also turns off the pool's check on checkout: a connection
that Redis closed (a restart) was handed out once more, and its command failed. With RESP2 a
connection the server closed is reopened before use, at no round trip (the socket's end of
file is already known), and a new connection costs no HELLO.

    redis://[[user]:password@]host:port[/db]          one Redis (rediss:// for TLS)
    redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db][?sentinel_password=P]
                                                      Sentinel: the master of `service`, found
                                                      through the sentinels (port 26379 when
                                                      left out); after a failover new
                                                      connections go to the new master.
                                                      The password is the data nodes'; the
                                                      sentinels' is `sentinel_password`.
    redis+cluster://[[user]:password@]host:port[,host:port...]
                                                      Redis Cluster from these startup nodes
                                                      (db 0 only); MOVED/ASK are followed by
                                                      redis-py, every key the store uses
                                                      belongs to one slot per call.
    rediss+sentinel://, rediss+cluster://             the same over TLS (to the sentinels too)

Every rediss url takes redis-py's TLS options in its query (TLS_PARAMS), for the data nodes and
the sentinels alike, e.g. `rediss://host:6380/0?ssl_ca_certs=/etc/router/redis-ca.pem`: the
CA bundle that signed the server's certificate (trusted besides the system's CAs), a client
certificate and key for servers that ask for one, `ssl_cert_reqs=none|optional|required` and
`ssl_check_hostname=true|false`. Any other query parameter is refused when the config loads
(redis-py would pass it on as a connection argument, failing every call).

The client is typed as `Redis` for every topology: the store uses only the command methods
that `RedisCluster` shares with it, and keeps every pipeline and script within one slot.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import parse_qs, unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

Kind = Literal["redis", "sentinel", "cluster"]
SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("redis", False),
    "rediss": ("redis", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
SENTINEL_PORT = 26379
TLS_PARAMS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                        "ssl_check_hostname"})
_CERT_REQS = ("none", "optional", "required")
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
MASTER_CHECK_S = 1.0  # how stale a Sentinel client's idea of the master may be


@dataclass(frozen=True)
class StoreUrl:
    """A parsed Sentinel or Cluster url (a plain redis:// url is left to redis-py)."""

    kind: Kind
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels, or cluster startup nodes
    service: str = ""  # sentinel only
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    # rediss: redis-py's ssl_* keyword arguments from the query (sentinel and cluster use them;
    # redis-py reads them from a plain rediss:// url itself)
    tls_options: tuple[tuple[str, str | bool], ...] = ()


def parse_store_url(url: str) -> StoreUrl:
    """Parse a redis-family store url; ValueError (never quoting the password) when malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"unsupported redis url scheme {scheme!r}")
    kind, tls = SCHEMES[scheme]
    rest, _, query = rest.partition("?")
    params = parse_qs(query, keep_blank_values=True)
    allowed = (TLS_PARAMS if tls else frozenset()) | (
        {"sentinel_password"} if kind == "sentinel" else set())
    unknown = set(params) - allowed
    if unknown:
        hint = " (ssl_* parameters need a rediss scheme)" if not tls and unknown & TLS_PARAMS \
            else ""
        raise ValueError(f"{scheme}:// url: unknown parameter(s) {sorted(unknown)}{hint}")
    tls_options = tuple((name, _tls_option(name, values[-1], scheme))
                        for name, values in sorted(params.items()) if name in TLS_PARAMS)
    if kind == "redis":  # the rest is redis-py's to parse
        return StoreUrl(kind, tls, tls_options=tls_options)
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise ValueError(f"{scheme}:// url: unexpected fragment")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    default_port = SENTINEL_PORT if kind == "sentinel" else 6379
    nodes = tuple(_host_port(h, default_port, scheme) for h in hosts.split(","))
    parts = [unquote(p) for p in path.split("/")] if path else []
    if kind == "sentinel":
        if not parts or not parts[0] or len(parts) > 2:
            raise ValueError("expected redis+sentinel://[:password@]host:port[,host:port...]"
                             "/service_name[/db]")
        sentinel_password = params.get("sentinel_password", [None])[-1]
        return StoreUrl(kind, tls, nodes, parts[0], _db(parts[1:], scheme), username,
                        password, sentinel_password, tls_options)
    if len(parts) > 1 or _db(parts, scheme) != 0:
        raise ValueError("redis+cluster:// has one database, 0: expected "
                         "redis+cluster://[:password@]host:port[,host:port...]")
    return StoreUrl(kind, tls, nodes, username=username, password=password,
                    tls_options=tls_options)


def _tls_option(name: str, value: str, scheme: str) -> str | bool:
    if name == "ssl_cert_reqs":
        if value not in _CERT_REQS:
            raise ValueError(f"{scheme}:// url: ssl_cert_reqs must be one of {_CERT_REQS}")
        return value
    if name == "ssl_check_hostname":
        if value.lower() not in _BOOLS:
            raise ValueError(f"{scheme}:// url: ssl_check_hostname must be true or false")
        return _BOOLS[value.lower()]
    if not value:
        raise ValueError(f"{scheme}:// url: {name} needs a file path")
    return value


def _host_port(text: str, default_port: int, scheme: str) -> tuple[str, int]:
    host, port = text, ""
    if text.startswith("["):  # [IPv6]:port
        host, close, after = text[1:].partition("]")
        if not close or (after and not after.startswith(":")):
            raise ValueError(f"{scheme}:// url: bad host {text!r}")
        port = after[1:]
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not host:
        raise ValueError(f"{scheme}:// url: a host is missing")
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise ValueError(f"{scheme}:// url: bad port in {text!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"{scheme}:// url: bad port in {text!r}")
    return host, number


def _db(parts: list[str], scheme: str) -> int:
    if not parts or parts[0] == "":
        return 0
    if not parts[0].isdigit():
        raise ValueError(f"{scheme}:// url: the database must be a number")
    return int(parts[0])


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
