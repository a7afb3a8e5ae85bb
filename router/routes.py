"""The route table: every endpoint once, with its method, paths, handler, whether it is served
without a credential, and its OpenAPI operation. build_app registers it; openapi_document()
turns it into the document's `paths`, so the two cannot drift apart.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from router import admin, console, handlers
from router.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponseRequest,
    openapi_components,
)
from router.sessions import AutomationSettings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PATTERN = re.compile(r"\{(\w+):[^}]*\}")
METRICS_PATH = "/metrics"  # where the table serves metrics; `metrics.path` moves it


@dataclass(frozen=True)
class Operation:
    """What the OpenAPI document says about one endpoint. An endpoint that needs a credential
    also gets the security requirement and the answers authentication itself may give."""

    summary: str
    responses: Mapping[str, Any]
    description: str | None = None
    body: type[BaseModel] | None = None  # a required JSON body; its schema is generated
    parameters: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Endpoint:
    method: Literal["GET", "POST", "PUT", "DELETE"]
    paths: tuple[str, ...]  # the first is documented as is, the others as its aliases
    handler: Handler
    doc: Operation | None  # None: served, not documented (the document itself)
    open: bool = False  # served without a credential; everything else needs one


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": _ref("Error")}}}


INVALID = {"description": "Validation Error", "content": {"application/json": {
    "schema": _ref("ValidationError")}}}
# What reading a request body may answer before it is validated.
BODY_ERRORS = {"408": _error("The body did not arrive in time"),
               "413": _error("Body too large"),
               "415": _error("Unsupported Content-Encoding")}
# What authentication may answer, on every operation that needs a credential.
AUTH_ERRORS = {"401": _error("Missing or invalid credential (`WWW-Authenticate: Bearer`)"),
               "403": _error("The credential may not do this (e.g. `insufficient_scope`)"),
               "503": _error("The identity provider or the store is unreachable; "
                             "see Retry-After")}
NOT_ADMIN = _error("Not an admin (`admin_required`)")
PROBE = {"200": {"description": "OK"}, "503": {"description": "Not ready"}}
SETTINGS_BODY = {"application/json": {"schema": _ref("AutomationSettings")}}
ID_IN_PATH = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
INSTANT = {"anyOf": [{"type": "string", "format": "date-time"},
                     {"type": "string", "pattern": r"^[0-9]{1,11}(\.[0-9]{0,9})?$"},
                     {"const": ""}],
           "description": "ISO 8601 (no zone: UTC) or unix seconds; empty or absent: the "
                          "default. `to` after `from`, at most 366 days apart"}

CHAT = Operation(
    summary="Create Chat Completion",
    description="OpenAI chat completions plus `session_id`. Streams (SSE) when `stream` is "
                "true, or when it is absent and `Accept` prefers text/event-stream.",
    body=ChatCompletionRequest,
    responses={
        "200": {"description": "Successful Response", "content": {
            "application/json": {"schema": _ref("ChatCompletion")},
            "text/event-stream": {"schema": _ref("ServerSentEvent")},
        }},
        "422": INVALID,
        **BODY_ERRORS,
        "403": _error("Model not allowed for this credential, or a missing scope"),
        "404": _error("Unknown model"),
        "409": _error("The session belongs to another model"),
        "429": _error("Rate limit of the credential (`rate_limit_exceeded`), or every "
                      "upstream answered 429 (`upstream_rate_limited`); see Retry-After"),
        "502": _error("Upstream failure"),
        "503": _error("No backend available, too many open streams, or the identity "
                      "provider is unreachable; see Retry-After"),
        "504": _error("Upstream timeout"),
    })

# What an endpoint that goes upstream may answer besides its own 200.
UPSTREAM_ERRORS = {
    "422": INVALID,
    **BODY_ERRORS,
    "400": _error("The model's backends do not serve this endpoint (`unsupported_endpoint`)"),
    "403": _error("Model not allowed for this credential, or a missing scope"),
    "404": _error("Unknown model"),
    "429": _error("Rate limit of the credential, or every upstream answered 429; see "
                  "Retry-After"),
    "502": _error("Upstream failure"),
    "503": _error("No backend available; see Retry-After"),
    "504": _error("Upstream timeout"),
}
EMBEDDINGS = Operation(
    summary="Create embeddings",
    description="OpenAI embeddings through the router's routes (`model` names a route); "
                "the upstream's answer is relayed as it came.",
    body=EmbeddingRequest,
    responses={"200": {"description": "Successful Response", "content": {
        "application/json": {"schema": _ref("Embeddings")}}}, **UPSTREAM_ERRORS})
COMPLETIONS = Operation(
    summary="Create completion (legacy text completions)",
    description="OpenAI's legacy text completions, passed through to OpenAI-compatible "
                "backends. Streams (SSE) when `stream` is true, or when it is absent and "
                "`Accept` prefers text/event-stream.",
    body=CompletionRequest,
    responses={"200": {"description": "Successful Response", "content": {
        "application/json": {"schema": _ref("TextCompletion")},
        "text/event-stream": {"schema": _ref("ServerSentEvent")}}}, **UPSTREAM_ERRORS})

RESPONSES = Operation(
    summary="Create a model response (OpenAI Responses API)",
    description="Passed through to the route's OpenAI-compatible or Azure backends. The new "
                "response's id is pinned to the backend that made it, for the caller; "
                "`previous_response_id` goes to that backend (404 `response_not_found` if it "
                "is not one of the caller's). Streams (SSE) when `stream` is true, or when it "
                "is absent and `Accept` prefers text/event-stream.",
    body=ResponseRequest,
    responses={"200": {"description": "Successful Response", "content": {
        "application/json": {"schema": _ref("Response")},
        "text/event-stream": {"schema": _ref("ServerSentEvent")}}},
        **UPSTREAM_ERRORS,
        "404": _error("Unknown model, or a `previous_response_id` that is not one of the "
                      "caller's (`response_not_found`)"),
        "409": _error("The previous response was made by a backend this model does not use "
                      "(`response_route_mismatch`)")})
# What an operation on a stored response may answer: the upstream's answer as it came, or
# the router's own errors.
STORED_ERRORS = {
    "404": _error("No such response of the caller (`response_not_found`), or the upstream's "
                  "404"),
    "502": _error("Upstream failure"),
    "503": _error("The upstream or the store is unreachable"),
    "504": _error("Upstream timeout"),
}
STORED_ANSWER = {"description": "The upstream's answer, relayed as it came", "content": {
    "application/json": {"schema": {"type": "object"}}}}
INCLUDE = {"name": "include", "in": "query", "required": False,
           "schema": {"type": "array", "items": {"type": "string"}}}
INPUT_ITEMS_QUERY = (
    {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
    {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer"}},
    {"name": "order", "in": "query", "required": False,
     "schema": {"type": "string", "enum": ["asc", "desc"]}},
    INCLUDE,
)

# The operator console's answers (router/status.py, router/console.py).
_TEXT_OR_NULL = {"type": ["string", "null"]}
_BACKEND_STATUS = {"type": "object", "required": [
    "name", "provider", "model", "state", "inflight", "latency_ewma_ms", "ejections",
    "rest_until"], "properties": {
    "name": {"type": "string"},
    "provider": {"type": "string", "description": "the provider's name in the config"},
    "model": {"type": "string"},
    "state": {"enum": ["up", "ejected", "resting", "probe_down", "drained"]},
    "inflight": {"type": "integer", "description": "this worker's requests to it now"},
    "latency_ewma_ms": {"type": ["number", "null"],
                        "description": "moving average of its time to first byte"},
    "ejections": {"type": "integer", "description": "ejections in a row"},
    "rest_until": {**_TEXT_OR_NULL, "description": "when a resting (429) or ejected backend "
                   "is back in rotation (ISO 8601 UTC)"}}}
STATUS_ANSWER = {"description": "This worker's view", "content": {"application/json": {
    "schema": {"type": "object", "required": [
        "version", "uptime_s", "worker", "config", "store", "routes"], "properties": {
        "version": {"type": "string"},
        "uptime_s": {"type": "number"},
        "worker": {"type": "object", "required": ["pid", "workers"], "properties": {
            "pid": {"type": "integer"}, "workers": {"type": "integer"}}},
        "config": {"type": "object", "required": ["path", "sha256", "loaded_at",
                                                  "last_reload"], "properties": {
            "path": {"type": "string"}, "sha256": _TEXT_OR_NULL,
            "loaded_at": {"type": "string"},
            "last_reload": {"anyOf": [{"type": "null"}, {
                "type": "object", "required": ["at", "result", "error"], "properties": {
                    "at": {"type": "string"}, "result": {"enum": ["success", "failure"]},
                    "error": _TEXT_OR_NULL}}]}}},
        "store": {"type": "object", "required": ["kind", "healthy"], "properties": {
            "kind": {"enum": ["memory", "redis", "sentinel", "cluster"]},
            "healthy": {"type": "boolean"}}},
        "routes": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["strategy", "fanout", "backends"], "properties": {
                "strategy": {"type": "string"}, "fanout": {"type": "string"},
                "backends": {"type": "array", "items": _BACKEND_STATUS}}}}}}}}}
DRAIN_ANSWER = {"description": "The backend's drain as it now stands", "content": {
    "application/json": {"schema": {"type": "object", "required": [
        "backend", "drained", "changed", "scope"], "properties": {
        "backend": {"type": "string"},
        "drained": {"type": "boolean"},
        "changed": {"type": "boolean", "description": "false: it already was"},
        "scope": {"enum": ["store", "process"], "description": "`store`: every replica that "
                  "shares the store, within a second; `process`: this process only "
                  "(`memory://`)"}}}}}}
DRAIN_ERRORS = {**BODY_ERRORS, "403": NOT_ADMIN, "404": _error("No such backend "
                "(`backend_not_found`)"), "422": INVALID}

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("POST", ("/api/v1/chat/completions", "/v1/chat/completions"),
             handlers.chat_completions, CHAT),
    Endpoint("POST", ("/api/v1/embeddings", "/v1/embeddings"), handlers.embeddings,
             EMBEDDINGS),
    Endpoint("POST", ("/api/v1/completions", "/v1/completions"), handlers.completions,
             COMPLETIONS),
    Endpoint("POST", ("/api/v1/responses", "/v1/responses"), handlers.responses, RESPONSES),
    Endpoint("GET", ("/api/v1/responses/{id}", "/v1/responses/{id}"), handlers.get_response,
             Operation(summary="Retrieve a model response of the caller's",
                       parameters=(ID_IN_PATH, INCLUDE),
                       responses={"200": STORED_ANSWER, **STORED_ERRORS})),
    Endpoint("DELETE", ("/api/v1/responses/{id}", "/v1/responses/{id}"),
             handlers.delete_response,
             Operation(summary="Delete a model response of the caller's (and its pin)",
                       parameters=(ID_IN_PATH,),
                       responses={"200": STORED_ANSWER, **STORED_ERRORS})),
    Endpoint("POST", ("/api/v1/responses/{id}/cancel", "/v1/responses/{id}/cancel"),
             handlers.cancel_response,
             Operation(summary="Cancel a (background) model response of the caller's",
                       parameters=(ID_IN_PATH,),
                       responses={"200": STORED_ANSWER, **STORED_ERRORS})),
    Endpoint("GET", ("/api/v1/responses/{id}/input_items", "/v1/responses/{id}/input_items"),
             handlers.list_input_items,
             Operation(summary="List the input items of a model response of the caller's",
                       parameters=(ID_IN_PATH, *INPUT_ITEMS_QUERY),
                       responses={"200": STORED_ANSWER, **STORED_ERRORS})),
    Endpoint("GET", ("/api/v1/models", "/v1/models"), handlers.list_models, Operation(
        summary="List models",
        responses={"200": {"description": "Model aliases the caller may use", "content": {
            "application/json": {"schema": _ref("ModelList")}}}})),
    # A route's name may hold a slash ("org/model"): the id is the rest of the path.
    Endpoint("GET", ("/api/v1/models/{id:.+}", "/v1/models/{id:.+}"), handlers.get_model,
             Operation(
                 summary="Retrieve a model",
                 parameters=(ID_IN_PATH,),
                 responses={"200": {"description": "A model alias the caller may use",
                                    "content": {"application/json": {"schema": _ref("Model")}}},
                            "404": _error("No such model for this credential "
                                          "(`model_not_found`)")})),
    Endpoint("POST", ("/api/v1/auth/token",), handlers.issue_token, Operation(
        summary="Exchange an API key or IdP access token for a router JWT",
        responses={
            "200": {"description": "OAuth2-style token answer", "content": {
                "application/json": {"schema": {"type": "object", "properties": {
                    "access_token": {"type": "string"}, "token_type": {"const": "Bearer"},
                    "expires_in": {"type": "integer"}}}}}},
            "403": _error("A router JWT cannot be exchanged"),
            "404": _error("Token issuance is not configured")})),
    Endpoint("GET", ("/api/v1/automation/settings",), handlers.get_settings, Operation(
        summary="The caller's automation settings (stored, else the defaults)",
        responses={"200": {"description": "Settings in effect", "content": SETTINGS_BODY}})),
    Endpoint("PUT", ("/api/v1/automation/settings",), handlers.put_settings, Operation(
        summary="Replace the caller's automation settings",
        body=AutomationSettings,
        responses={"200": {"description": "Settings in effect", "content": SETTINGS_BODY},
                   **BODY_ERRORS, "422": INVALID})),
    Endpoint("GET", ("/api/v1/sessions/{id}",), handlers.get_session, Operation(
        summary="A session of the caller: pinned backend, route, created, last used, "
                "requests, expires (epoch seconds)",
        parameters=(ID_IN_PATH,),
        responses={"200": {"description": "The session"},
                   "404": _error("No such session of the caller")})),
    Endpoint("DELETE", ("/api/v1/sessions/{id}",), handlers.delete_session, Operation(
        summary="End a session of the caller (its pin is forgotten)",
        parameters=(ID_IN_PATH,),
        responses={"204": {"description": "Deleted"},
                   "404": _error("No such session of the caller")})),
    Endpoint("POST", ("/api/v1/admin/keys",), admin.create_key, Operation(
        summary="Create an API key (the plaintext is shown once)",
        body=admin.NewKey,
        responses={"201": {"description": "The new key, with `key` shown once"},
                   **BODY_ERRORS, "403": NOT_ADMIN, "422": INVALID})),
    Endpoint("GET", ("/api/v1/admin/keys",), admin.list_keys, Operation(
        summary="List API keys (never a key or its hash)",
        responses={"200": {"description": "Key records"}, "403": NOT_ADMIN})),
    Endpoint("DELETE", ("/api/v1/admin/keys/{id}",), admin.revoke_key, Operation(
        summary="Revoke an API key",
        parameters=(ID_IN_PATH,),
        responses={"204": {"description": "Revoked"}, "403": NOT_ADMIN,
                   "404": _error("No such key")})),
    Endpoint("GET", ("/api/v1/admin/usage",), admin.usage_report, Operation(
        summary="Per-principal requests, tokens and errors, summed over the hours that "
                "overlap [from, to) (default: the last 24 hours)",
        parameters=({"name": "from", "in": "query", "required": False, "schema": INSTANT},
                    {"name": "to", "in": "query", "required": False, "schema": INSTANT}),
        responses={"200": {"description": "The usage report"}, "403": NOT_ADMIN,
                   "422": INVALID})),
    Endpoint("GET", ("/api/v1/admin/status",), console.admin_status, Operation(
        summary="This worker's view: version, config and its last reload, store health, and "
                "every route's backends with their state",
        description="`state`: `up`, `ejected`, `resting` (after an upstream 429), "
                    "`probe_down` or `drained`. With several workers, the one that answered "
                    "(`worker.pid`). Never a key, a secret or an upstream URL.",
        responses={"200": STATUS_ANSWER, "403": NOT_ADMIN})),
    Endpoint("POST", ("/api/v1/admin/backends/drain",), console.drain_backend, Operation(
        summary="Take a backend out of rotation, on every replica sharing the store",
        description="No new requests go to it; those under way and its streams finish; "
                    "sessions pinned to it move on their next request. Kept in the store: "
                    "it survives reloads and restarts.",
        body=console.DrainRequest,
        responses={"200": DRAIN_ANSWER, **DRAIN_ERRORS})),
    Endpoint("POST", ("/api/v1/admin/backends/undrain",), console.undrain_backend, Operation(
        summary="Put a drained backend back into rotation",
        body=console.DrainRequest,
        responses={"200": DRAIN_ANSWER, **DRAIN_ERRORS})),
    Endpoint("GET", ("/admin",), console.console_page, Operation(
        summary="The operator console (an HTML page over the admin status and drain APIs; "
                "it asks for an admin key)",
        responses={"200": {"description": "The page", "content": {
            "text/html": {"schema": {"type": "string"}}}}}), open=True),
    Endpoint("GET", (METRICS_PATH,), handlers.metrics_endpoint, Operation(
        summary="Prometheus metrics",
        responses={"200": {"description": "Prometheus text format"}}), open=True),
    Endpoint("GET", ("/healthz",), handlers.healthz,
             Operation(summary="Liveness", responses=PROBE), open=True),
    Endpoint("GET", ("/readyz",), handlers.readyz,
             Operation(summary="Readiness", responses=PROBE), open=True),
    Endpoint("GET", ("/openapi.json",), handlers.openapi, None, open=True),
)


def endpoints(metrics_path: str = METRICS_PATH, metrics_enabled: bool = True
              ) -> tuple[Endpoint, ...]:
    """The table as one server serves it: metrics at `metrics.path`, and with metrics off a
    404 there (still without a credential, so a scraper learns they are off) and no mention
    of it in the document."""
    served = []
    for endpoint in ENDPOINTS:
        if endpoint.handler is handlers.metrics_endpoint:
            endpoint = replace(endpoint, paths=(metrics_path,))
            if not metrics_enabled:
                endpoint = replace(endpoint, handler=handlers.metrics_disabled, doc=None)
        served.append(endpoint)
    return tuple(served)


def open_paths(table: Iterable[Endpoint]) -> frozenset[str]:
    """The paths served without a credential."""
    return frozenset(path for endpoint in table if endpoint.open for path in endpoint.paths)


def openapi_document(table: Sequence[Endpoint] = ENDPOINTS) -> dict[str, Any]:
    """OpenAPI 3.1 of the endpoints in `table`; the request schemas come from the validators'
    own models."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in table:
        if endpoint.doc is None:
            continue
        for n, path in enumerate(endpoint.paths):
            summary = endpoint.doc.summary if n == 0 else f"{endpoint.doc.summary} (alias)"
            path = _PATTERN.sub(r"{\1}", path)  # `{id:.+}` is aiohttp's; OpenAPI has `{id}`
            paths.setdefault(path, {})[endpoint.method.lower()] = _operation(
                endpoint.doc, summary, secured=not endpoint.open)
    models = [e.doc.body for e in table if e.doc is not None and e.doc.body is not None]
    return {
        "openapi": "3.1.0",
        "info": {"title": "router", "version": "1"},
        "paths": copy.deepcopy(paths),  # its parts are shared with the table's constants
        "components": {
            "schemas": openapi_components(models),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "API key `sk-...`"}},
        },
    }


def _operation(doc: Operation, summary: str, secured: bool) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary}
    if doc.description is not None:
        op["description"] = doc.description
    if doc.parameters:
        op["parameters"] = [dict(p) for p in doc.parameters]
    if doc.body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": _ref(doc.body.__name__)}}}
    if secured:
        op["security"] = [{"bearer": []}]
        op["responses"] = {**AUTH_ERRORS, **doc.responses}
    else:
        op["responses"] = dict(doc.responses)
    return op
