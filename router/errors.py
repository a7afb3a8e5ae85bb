"""The RouterError family: every failure a client can see, with its status, code and log level.

Foreign exceptions (aiohttp, redis, jwt) are translated into these where they occur; the error
boundary in app.py turns them into OpenAI-style error objects (or the 422 `detail` list).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson
from aiohttp import web

JSON = "application/json"


class RouterError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    log_level: ClassVar[int] = logging.ERROR

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        if code is not None:
            self.code = code  # type: ignore[misc]

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def to_response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.body()),
            content_type=JSON,
            headers=self.headers,
        )


class ValidationFailed(RouterError):
    """422 with a `detail` list, {"detail": [{"loc": [...], "msg": ..., "type": ...}, ...]},
    and beside it an OpenAI-style `error` naming the first problem, which OpenAI's SDKs show as
    the exception's message: {"message": "messages.0.role: ...", "type":
    "invalid_request_error", "param": "messages.0.role", "code": "validation_error"}."""

    status = 422
    type = "invalid_request_error"
    code = "validation_error"
    log_level = logging.INFO

    def __init__(self, detail: Sequence[Mapping[str, Any]]) -> None:
        super().__init__("request body failed validation")
        self.detail = list(detail)

    def body(self) -> dict[str, Any]:
        first = self.detail[0] if self.detail else {}
        loc = [str(part) for part in first.get("loc", ())]
        if loc[:1] in (["body"], ["query"], ["path"]):
            loc = loc[1:]
        param = ".".join(loc) or None
        message = str(first.get("msg", self.message))
        if param is not None:
            message = f"{param}: {message}"
        if len(self.detail) > 1:
            message += f" (and {len(self.detail) - 1} more in `detail`)"
        return {"detail": self.detail,
                "error": {"message": message, "type": self.type, "param": param,
                          "code": self.code}}


class BadRequest(RouterError):
    status = 400
    type = "invalid_request_error"
    code = "bad_request"
    log_level = logging.INFO


class Unauthorized(RouterError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_token"
    log_level = logging.INFO

    def __init__(self, message: str, *, credentials_sent: bool = True,
                 code: str = "invalid_token", reason: str = "invalid") -> None:
        self.reason = reason if credentials_sent else "missing"  # a metric label: a fixed set
        self.credential = "none"  # set by the Authenticator once it knows the token's shape
        # RFC 6750: no error attribute when the request carried no credentials at all.
        challenge = 'Bearer realm="router"'
        if credentials_sent:
            desc = message.replace('"', "'")
            challenge += f', error="invalid_token", error_description="{desc}"'
        super().__init__(message, headers={"WWW-Authenticate": challenge}, code=code)


class Forbidden(RouterError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"
    log_level = logging.INFO


class NotFound(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    log_level = logging.INFO


class ModelNotFound(NotFound):
    code = "model_not_found"


class UnsupportedEndpoint(RouterError):
    """A route whose backends cannot serve this endpoint (embeddings on an Anthropic route)."""

    status = 400
    type = "invalid_request_error"
    code = "unsupported_endpoint"
    log_level = logging.INFO


class MethodNotAllowed(RouterError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    log_level = logging.INFO


class RequestTimeout(RouterError):
    """The body did not arrive in time: the answer closes the connection (what is left of the
    body would be read as the next request)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    log_level = logging.INFO

    def to_response(self) -> web.Response:
        resp = super().to_response()
        resp.force_close()
        return resp


class PayloadTooLarge(RouterError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    log_level = logging.INFO


class UnsupportedMediaType(RouterError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"
    log_level = logging.INFO


class HttpError(RouterError):
    """A protocol-level refusal from aiohttp itself (bad method, bad request line, ...)."""

    type = "invalid_request_error"
    log_level = logging.INFO

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status  # type: ignore[misc]


class UpstreamError(RouterError):
    """An upstream answered badly or not at all; the last one's failure is what the client sees."""

    status = 502
    type = "upstream_error"
    code = "bad_gateway"
    log_level = logging.WARNING


class UpstreamUnavailable(UpstreamError):
    """Could not connect: 502 like any upstream failure (RELIABILITY: connect refused -> 502)."""

    code = "backend_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamRateLimited(UpstreamError):
    """Every candidate upstream answered 429: distinguishable from the router's own 429."""

    status = 429
    type = "upstream_rate_limited"
    code = "upstream_rate_limited"


class Overloaded(RouterError):
    status = 503
    type = "server_error"
    code = "overloaded"
    log_level = logging.WARNING


class IdpUnavailable(RouterError):
    """The identity provider could not be asked (down, slow, no keys yet): 503, not 401, since
    the credential may well be valid."""

    status = 503
    type = "server_error"
    code = "idp_unavailable"
    log_level = logging.WARNING

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class StoreUnavailable(RouterError):
    """The store did not answer in time or failed (its StoreError, translated at the error
    boundary): 503, the request may be retried."""

    status = 503
    type = "server_error"
    code = "store_unavailable"
    log_level = logging.WARNING

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class InternalError(RouterError):
    status = 500
    code = "internal_error"
