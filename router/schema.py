"""The chat-completions request (OpenAI's fields plus `session_id`), its 422 `detail` list,
and OpenAPI from it.

The pydantic model validates; the request dict itself is what goes upstream, so fields the model
does not name (stream_options, response_format, seed, user, ...) pass through untouched.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from router.errors import ValidationFailed
from router.jsonbody import load_json_object
from router.locs import input_path

M = TypeVar("M", bound=BaseModel)
SAFE_ID_PATTERN = r"^[A-Za-z0-9._:\-]{1,128}$"
# Values that become headers or parts of store keys (session ids, request ids).
SAFE_ID = re.compile(SAFE_ID_PATTERN.strip("^$"))  # for fullmatch
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
Number = Annotated[float, Field(allow_inf_nan=False)]


def whole(value: Any) -> Any:
    """54.0 -> 54: JSON Schema counts a whole-number float as an integer, and so do we (the
    client's own value is what goes upstream; this only decides whether it is valid)."""
    if type(value) is float and value.is_integer() and abs(value) <= 2**53:  # exact in a float
        return int(value)
    return value


# On an integer field: a JSON integer, or a float with no fractional part (never a bool or a
# string). Its bounds go in the same Annotated, so the generated schema keeps them.
WHOLE = BeforeValidator(whole)


class _Open(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class FunctionDef(_Open):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


class Message(_Open):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Open):
    """Create a chat completion (OpenAI dialect) with an optional router `session_id`."""

    model: str | None = Field(None, min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, ge=0, le=1)
    n: Annotated[int, Field(ge=1, le=128), WHOLE] | None = None
    stream: bool | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # up to 4 sequences
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1), WHOLE] | None = None
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    tools: list[Tool] | None = Field(None, max_length=512)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    # It becomes a header and part of a store key: the x-request-id rule, checked before either.
    session_id: str | None = Field(None, pattern=SAFE_ID_PATTERN)


def parse_chat_request(raw: bytes) -> dict[str, Any]:
    """Body bytes -> the validated request dict, or ValidationFailed with one entry per problem."""
    body = load_json_object(raw)
    try:
        ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise ValidationFailed(_detail(exc, body)) from None
    return body


def parse_body(raw: bytes, model: type[M]) -> M:
    """Body bytes -> `model` (strict JSON mode: ISO strings for datetimes), or ValidationFailed
    in the 422 `detail` shape."""
    body = load_json_object(raw)
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise ValidationFailed(_detail(exc, body)) from None


def _detail(exc: ValidationError, body: dict[str, Any]) -> list[dict[str, Any]]:
    """pydantic errors -> the 422 `detail` list, one entry per location.

    A union reports once per member (`stop.str`, `stop.list[str]`); those collapse into one entry
    whose message lists what would have been accepted.
    """
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for err in exc.errors(include_url=False):
        loc = input_path(body, err["loc"], missing=err["type"] == "missing")
        entry = merged.get(loc)
        if entry is None:
            merged[loc] = {"loc": ["body", *loc], "msg": err["msg"], "type": err["type"]}
        elif err["msg"] not in entry["msg"]:
            entry["msg"] = f"{entry['msg']}; or {err['msg'][0].lower()}{err['msg'][1:]}"
            entry["type"] = "union_type"
    return list(merged.values())


def openapi_document(new_key: type[BaseModel] | None = None,
                     settings: type[BaseModel] | None = None) -> dict[str, Any]:
    """OpenAPI 3.1 of the public API, with the request schemas generated from the validators'
    own models (`new_key` is the admin API's, `settings` the automation settings', passed in to
    keep the modules acyclic)."""
    ref = "#/components/schemas/{model}"
    request_schema = ChatCompletionRequest.model_json_schema(ref_template=ref)
    schemas: dict[str, Any] = request_schema.pop("$defs", {})
    schemas["ChatCompletionRequest"] = request_schema
    if new_key is not None:
        key_schema = new_key.model_json_schema(ref_template=ref)
        schemas.update(key_schema.pop("$defs", {}))
        schemas["NewKey"] = key_schema
    if settings is not None:
        settings_schema = settings.model_json_schema(ref_template=ref)
        schemas.update(settings_schema.pop("$defs", {}))
        schemas["AutomationSettings"] = settings_schema
    schemas["ValidationError"] = {
        "type": "object",
        "required": ["detail"],
        "properties": {"detail": {"type": "array", "items": {
            "type": "object",
            "required": ["loc", "msg", "type"],
            "properties": {
                "loc": {"type": "array", "items": {"anyOf": [{"type": "string"},
                                                             {"type": "integer"}]}},
                "msg": {"type": "string"},
                "type": {"type": "string"},
            },
        }}},
    }
    schemas["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "code": {"type": ["string", "null"]},
        }}},
    }
    schemas["ModelList"] = {
        "type": "object",
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
            "type": "object",
            "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                           "created": {"type": "integer"}, "owned_by": {"type": "string"}},
        }}},
    }

    def error(description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}}

    def protected(op: dict[str, Any]) -> dict[str, Any]:
        """What authentication itself may answer, on every operation that needs a credential."""
        return {**op, "security": [{"bearer": []}], "responses": {
            "401": error("Missing or invalid credential (`WWW-Authenticate: Bearer`)"),
            "403": error("The credential may not do this (e.g. `insufficient_scope`)"),
            "503": error("The identity provider or the store is unreachable; see Retry-After"),
            **op["responses"]}}

    invalid = {"description": "Validation Error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ValidationError"}}}}
    # What reading a request body may answer before it is validated.
    body_errors = {"408": error("The body did not arrive in time"),
                   "413": error("Body too large"),
                   "415": error("Unsupported Content-Encoding")}
    schemas["ChatCompletion"] = {"type": "object", "description": "The upstream's answer, "
                                 "relayed as it came (OpenAI's chat.completion object)"}
    schemas["ServerSentEvent"] = {
        "type": "object", "description": "One event of the stream, relayed as the upstream "
        "wrote it; the last is `data: [DONE]`, or one `event: error` whose data is an Error",
        "properties": {"event": {"type": "string"}, "data": {"type": "string"},
                       "id": {"type": "string"}, "retry": {"type": "integer", "minimum": 0}}}
    chat_responses = {
        "200": {"description": "Successful Response", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
            "text/event-stream": {"schema": {"$ref": "#/components/schemas/ServerSentEvent"}},
        }},
        "422": invalid,
        **body_errors,
        "403": error("Model not allowed for this credential, or a missing scope"),
        "404": error("Unknown model"),
        "409": error("The session belongs to another model"),
        "429": error("Rate limit of the credential (`rate_limit_exceeded`), or every "
                     "upstream answered 429 (`upstream_rate_limited`); see Retry-After"),
        "502": error("Upstream failure"),
        "503": error("No backend available, too many open streams, or the identity "
                     "provider is unreachable; see Retry-After"),
        "504": error("Upstream timeout"),
    }
    chat = protected({
        "summary": "Create Chat Completion",
        "description": "OpenAI chat completions plus `session_id`. Streams (SSE) when `stream` "
                       "is true, or when it is absent and `Accept` prefers text/event-stream.",
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
        "responses": chat_responses,
    })
    models = protected({
        "summary": "List models",
        "responses": {"200": {"description": "Model aliases the caller may use", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}}}},
    })
    probe = {"responses": {"200": {"description": "OK"}, "503": {"description": "Not ready"}}}
    token = protected({
        "summary": "Exchange an API key or IdP access token for a router JWT",
        "responses": {"200": {"description": "OAuth2-style token answer", "content": {
            "application/json": {"schema": {"type": "object", "properties": {
                "access_token": {"type": "string"}, "token_type": {"const": "Bearer"},
                "expires_in": {"type": "integer"}}}}}},
            "403": error("A router JWT cannot be exchanged"),
            "404": error("Token issuance is not configured")},
    })
    settings_body = {"application/json": {
        "schema": {"$ref": "#/components/schemas/AutomationSettings"}}}
    automation = {
        "get": protected({
            "summary": "The caller's automation settings (stored, else the defaults)",
            "responses": {"200": {"description": "Settings in effect",
                                  "content": settings_body}}}),
        "put": protected({
            "summary": "Replace the caller's automation settings",
            "requestBody": {"required": True, "content": settings_body},
            "responses": {"200": {"description": "Settings in effect", "content": settings_body},
                          **body_errors, "422": invalid}}),
    }
    session_id = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    session = {
        "get": protected({
            "summary": "A session of the caller: pinned backend, route, created, last used, "
                       "requests, expires (epoch seconds)",
            "parameters": session_id,
            "responses": {"200": {"description": "The session"},
                          "404": error("No such session of the caller")}}),
        "delete": protected({
            "summary": "End a session of the caller (its pin is forgotten)",
            "parameters": session_id,
            "responses": {"204": {"description": "Deleted"},
                          "404": error("No such session of the caller")}}),
    }
    not_admin = error("Not an admin (`admin_required`)")
    admin_keys = {
        "post": protected({
            "summary": "Create an API key (the plaintext is shown once)",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/NewKey"}}}},
            "responses": {"201": {"description": "The new key, with `key` shown once"},
                          **body_errors, "403": not_admin, "422": invalid}}),
        "get": protected({
            "summary": "List API keys (never a key or its hash)",
            "responses": {"200": {"description": "Key records"}, "403": not_admin}}),
    }
    revoke = {"delete": protected({
        "summary": "Revoke an API key",
        "parameters": [{"name": "id", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"204": {"description": "Revoked"}, "403": not_admin,
                      "404": error("No such key")}})}
    instant = {"anyOf": [{"type": "string", "format": "date-time"},
                         {"type": "string", "pattern": r"^[0-9]{1,11}(\.[0-9]{0,9})?$"},
                         {"const": ""}],
               "description": "ISO 8601 (no zone: UTC) or unix seconds; empty or absent: the "
                              "default. `to` after `from`, at most 366 days apart"}
    usage = {"get": protected({
        "summary": "Per-principal requests, tokens and errors, summed over the hours that "
                   "overlap [from, to) (default: the last 24 hours)",
        "parameters": [{"name": "from", "in": "query", "required": False, "schema": instant},
                       {"name": "to", "in": "query", "required": False, "schema": instant}],
        "responses": {"200": {"description": "The usage report"}, "403": not_admin,
                      "422": invalid}})}
    return {
        "openapi": "3.1.0",
        "info": {"title": "router", "version": "1"},
        "paths": {
            "/api/v1/chat/completions": {"post": chat},
            "/v1/chat/completions": {"post": {**chat, "summary": "Create Chat Completion (alias)"}},
            "/api/v1/models": {"get": models},
            "/v1/models": {"get": {**models, "summary": "List models (alias)"}},
            "/api/v1/auth/token": {"post": token},
            **({"/api/v1/automation/settings": automation} if settings is not None else {}),
            "/api/v1/sessions/{id}": session,
            **({"/api/v1/admin/keys": admin_keys, "/api/v1/admin/keys/{id}": revoke,
                "/api/v1/admin/usage": usage}
               if new_key is not None else {}),
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "Prometheus text format"}}}},
            "/healthz": {"get": {"summary": "Liveness", **probe}},
            "/readyz": {"get": {"summary": "Readiness", **probe}},
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "API key `sk-...`"}},
        },
    }


class OpenApiDocument:
    """The served document. Fields that name a route list the routes the config holds now (as
    `enum`), so the document follows a reload; rendered once per set of routes."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self._doc = doc
        self._rendered: tuple[tuple[str, ...], bytes] | None = None

    def render(self, routes: Iterable[str]) -> bytes:
        names = tuple(sorted(routes))
        if self._rendered is None or self._rendered[0] != names:
            self._rendered = (names, orjson.dumps(with_routes(self._doc, names)))
        return self._rendered[1]


def with_routes(doc: dict[str, Any], routes: Sequence[str]) -> dict[str, Any]:
    """`doc` with the route names as the values of `NewKey.models` (or `["*"]` alone: every
    route) and `AutomationSettings.default_model`; `doc` itself is left unchanged."""
    doc = copy.deepcopy(doc)
    schemas = doc["components"]["schemas"]
    route = {"type": "string", "enum": list(routes)}
    if "NewKey" in schemas:
        models = schemas["NewKey"]["properties"]["models"]
        listed = {**models, "items": route}
        schemas["NewKey"]["properties"]["models"] = {
            "anyOf": [{"const": ["*"]}, listed], "default": models.get("default", ["*"]),
            "description": "The routes this key may use; `[\"*\"]`: every route"}
    if "AutomationSettings" in schemas:
        schemas["AutomationSettings"]["properties"]["default_model"] = {
            "anyOf": [route, {"type": "null"}], "default": None,
            "description": "A route this credential may use; null: the config's default"}
    return doc
