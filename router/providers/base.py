"""The provider protocol: turn a routed request into an upstream exchange of bytes."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, runtime_checkable

from router.errors import RouterError, UpstreamError
from router.upstream import Timeouts


class CannotServe(RouterError):
    """This backend cannot take the request as asked (a parameter its API has no equivalent
    for); another backend of the route may. Not a failure of the backend: the next one is
    tried, and if none can, the client gets this error."""

    status = 400
    type = "invalid_request_error"
    code = "unsupported_parameter"
    log_level = logging.INFO


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    body: dict[str, Any]  # what the upstream gets: model set, session_id removed
    stream: bool
    request_id: str
    timeouts: Timeouts
    max_response_bytes: int = 64 << 20  # a provider that reads a whole answer reads no more
    trace: tuple[tuple[str, str], ...] = ()  # the client's W3C trace context, sent as is
    endpoint: str = "chat"  # "chat", "responses", "embeddings", "completions": the API to call


@dataclass(slots=True)
class Exchange:
    """An upstream answer whose head has arrived; the body is an async iterator of bytes."""

    status: int
    content_type: str
    chunks: AsyncIterator[bytes]
    close: Callable[[], None]
    retry_after_s: float | None = None


class Provider(Protocol):
    name: str
    secrets: tuple[str, ...]  # values no client may ever see (upstream keys)

    async def open(self, call: UpstreamCall) -> Exchange: ...

    async def probe(self) -> bool | None:
        """True/False for up/down; None when this provider has nothing to probe."""
        ...


@dataclass(frozen=True, slots=True)
class StoredCall:
    """A request about a response the upstream stored (the Responses API): `method` on it, or
    on one of its parts (`action`: "", "cancel" or "input_items"), with the client's query."""

    method: str
    response_id: str  # checked safe (router/schema.py SAFE_ID): it becomes part of a URL
    action: str
    query: str  # already encoded; "" for none
    request_id: str
    timeouts: Timeouts
    trace: tuple[tuple[str, str], ...] = ()


@runtime_checkable
class StoredResponses(Protocol):
    """A provider whose upstream keeps the responses it created (OpenAI's and Azure's)."""

    async def stored_response(self, call: StoredCall) -> Exchange: ...


async def read_all(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """A whole body, or UpstreamError past `limit` bytes."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise UpstreamError("upstream response is too large")
        parts.append(chunk)
    return b"".join(parts)


def leaks_secret(text: str, secrets: tuple[str, ...], fragment: int = 8) -> bool:
    """Whether `text` quotes any secret, or any `fragment`-character piece of one."""
    for secret in secrets:
        if len(secret) < fragment:
            if secret and secret in text:
                return True
            continue
        if any(secret[i:i + fragment] in text for i in range(len(secret) - fragment + 1)):
            return True
    return False


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if seconds != seconds or seconds < 0:  # NaN or the past
        return None
    return min(seconds, 3600.0)
