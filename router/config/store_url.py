"""The shape of a `store.url`: which topology, its nodes and credentials, its TLS options.
Parsed without a Redis driver, so the config can check it when it loads (a malformed url is a
config error naming `store.url`); router/store/connect.py builds the client from the result.

    memory://                                         this process only (nothing to parse)
    redis://[[user]:password@]host:port[/db]          one Redis (rediss:// for TLS)
    redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db][?sentinel_password=P]
                                                      Sentinel: the master of `service`, found
                                                      through the sentinels (port 26379 when
                                                      left out). The password is the data
                                                      nodes'; the sentinels' is
                                                      `sentinel_password`.
    redis+cluster://[[user]:password@]host:port[,host:port...]
                                                      Redis Cluster from these startup nodes
                                                      (db 0 only).
    rediss+sentinel://, rediss+cluster://             the same over TLS (to the sentinels too)

Every rediss url takes redis-py's TLS options in its query (TLS_PARAMS), for the data nodes and
the sentinels alike, e.g. `rediss://host:6380/0?ssl_ca_certs=/etc/router/redis-ca.pem`: the
CA bundle that signed the server's certificate (trusted besides the system's CAs), a client
certificate and key for servers that ask for one, `ssl_cert_reqs=none|optional|required` and
`ssl_check_hostname=true|false`. Any other query parameter is refused when the config loads
(redis-py would pass it on as a connection argument, failing every call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, unquote

Kind = Literal["redis", "sentinel", "cluster"]
SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("redis", False),
    "rediss": ("redis", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
# The prefixes of every redis-family url (memory:// is the other kind of store).
REDIS_PREFIXES = tuple(f"{scheme}://" for scheme in SCHEMES)
SENTINEL_PORT = 26379
TLS_PARAMS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                        "ssl_check_hostname"})
_CERT_REQS = ("none", "optional", "required")
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


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
        if "@" in query:  # an unencoded `?` in a password: what follows it is no parameter
            raise ValueError(f"{scheme}:// url: a `?`, `#` or `/` in the password must be "
                             "percent-encoded (%3F, %23, %2F)")
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
