"""The one small interface to upstream HTTP: a keep-alive pool that POSTs, GETs a status, and
sends any other request (the Responses API's GET, DELETE and POST on a stored response).

Everything aiohttp-client-specific lives here, so a leaner pool can replace it without touching
providers or the relay. aiohttp's exceptions are translated into RouterErrors at this boundary.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from router.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    total_s: float
    idle_s: float  # longest silence between two reads of the body


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    def iter_chunks(self) -> AsyncIterator[bytes]: ...
    def close(self) -> None: ...


class UpstreamClient(Protocol):
    """`ca_file`: for https, trust only the CAs in this PEM file instead of the system's."""

    async def post(self, url: str, headers: Mapping[str, str], body: bytes,
                   timeouts: Timeouts, ca_file: str | None = None) -> UpstreamResponse: ...
    async def get_status(self, url: str, headers: Mapping[str, str], timeout_s: float,
                         ca_file: str | None = None) -> int: ...
    async def request(self, method: str, url: str, headers: Mapping[str, str],
                      body: bytes | None, timeouts: Timeouts,
                      ca_file: str | None = None) -> UpstreamResponse:
        """`method` on `url` with `body` (None: no body at all); the answer as `post`'s. The
        URL is not kept for reuse (it names one stored object)."""
        ...
    async def close(self) -> None: ...


_TLS: dict[str | None, ssl.SSLContext] = {}


async def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """The verifying client context for https upstreams: the system's CAs (as OpenSSL finds
    them: SSL_CERT_FILE and SSL_CERT_DIR are honoured), or only those in `ca_file`. Made once
    per process and file, in a thread (loading CAs reads files); a file that cannot be loaded
    is an UpstreamUnavailable (tried again on the next call)."""
    ctx = _TLS.get(ca_file)
    if ctx is None:
        try:
            ctx = await asyncio.to_thread(ssl.create_default_context, cafile=ca_file)
        except (OSError, ValueError) as exc:  # missing file, not PEM, no certificate in it
            raise UpstreamUnavailable("could not load the upstream CA file") from exc
        _TLS[ca_file] = ctx
    return ctx


_TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_HTTP1 = (aiohttp.HttpVersion11, aiohttp.HttpVersion10)


def _relayable(resp: aiohttp.ClientResponse) -> bool:
    """What aiohttp's lenient response parser lets through but the router refuses: another
    HTTP version, a protocol switch, a field name that is not a token ("Content-Length :"),
    a transfer coding other than plain chunked (its body would be read until the close)."""
    if resp.version not in _HTTP1 or resp.status == 101:
        return False
    codings = resp.headers.getall("Transfer-Encoding", ())
    if codings and (len(codings) != 1 or codings[0].strip().lower() != "chunked"):
        return False
    return not any(not name or name.translate(None, _TOKEN) for name, _ in resp.raw_headers)


class _AiohttpResponse:
    __slots__ = ("_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("upstream went silent mid-response") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError("upstream connection broke mid-response") from exc

    def close(self) -> None:
        # Closing (not releasing) drops the connection: an unfinished body must not be reused,
        # and the upstream sees its client leave at once.
        if not self._resp.closed:
            self._resp.close()


class AiohttpUpstream:
    """One ClientSession per worker, made on first use inside the worker's loop (so a worker
    that fails to start leaves nothing open) and closed at shutdown."""

    def __init__(self, *, max_connections: int, max_per_host: int,
                 keepalive_s: float = 30.0) -> None:
        self._limits = (max_connections, max_per_host, keepalive_s)
        self._session_or_none: aiohttp.ClientSession | None = None
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}

    @property
    def _session(self) -> aiohttp.ClientSession:
        session = self._session_or_none
        if session is None:
            limit, per_host, keepalive_s = self._limits
            connector = aiohttp.TCPConnector(
                limit=limit,
                limit_per_host=per_host,
                keepalive_timeout=keepalive_s,
                ttl_dns_cache=60,
            )
            session = self._session_or_none = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),  # never aiohttp's 300 s default
                auto_decompress=False,
                # No skip_auto_headers: it costs a header-dict copy per request in aiohttp.
                # Providers send their own Accept, Accept-Encoding and User-Agent instead.
                raise_for_status=False,
            )
        return session

    async def post(self, url: str, headers: Mapping[str, str], body: bytes,
                   timeouts: Timeouts, ca_file: str | None = None) -> UpstreamResponse:
        return await self.request("POST", url, headers, body, timeouts, ca_file)

    async def request(self, method: str, url: str, headers: Mapping[str, str],
                      body: bytes | None, timeouts: Timeouts,
                      ca_file: str | None = None) -> UpstreamResponse:
        # aiohttp's own verifying context (made at import, SSL_CERT_FILE honoured), or ours
        tls: ssl.SSLContext | bool = True if ca_file is None else await tls_context(ca_file)
        timeout = self._timeouts.get(timeouts)
        if timeout is None:
            timeout = self._timeouts[timeouts] = aiohttp.ClientTimeout(
                total=timeouts.total_s,
                connect=timeouts.connect_s,
                sock_read=timeouts.idle_s,
            )
        try:
            resp = await self._session.request(method, url, data=body, headers=headers,
                                               timeout=timeout, ssl=tls)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise UpstreamUnavailable("the upstream's TLS certificate is not trusted") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnavailable("could not connect to upstream") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("upstream did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError("upstream request failed") from exc
        except ValueError as exc:  # aiohttp refuses a header holding a line break: nothing sent
            raise UpstreamError("an upstream request header holds a control character") from exc
        if not _relayable(resp):
            resp.close()
            raise UpstreamError("upstream sent a response the router cannot relay")
        return _AiohttpResponse(resp)

    async def get_status(self, url: str, headers: Mapping[str, str], timeout_s: float,
                         ca_file: str | None = None) -> int:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            tls: ssl.SSLContext | bool = True if ca_file is None else await tls_context(ca_file)
            async with self._session.get(url, headers=headers, timeout=timeout,
                                         ssl=tls) as resp:
                await resp.read()
                return resp.status
        except (TimeoutError, aiohttp.ClientError, UpstreamUnavailable):
            return 0

    async def close(self) -> None:
        if self._session_or_none is not None:
            await self._session_or_none.close()
        # Let the transports finish closing before the loop goes away.
        await asyncio.sleep(0)
