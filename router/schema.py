"""The chat-completions request (OpenAI's fields plus `session_id`), its 422 `detail` list,
and the OpenAPI schemas generated from the request models (routes.py adds the paths).

The pydantic model validates; the request dict itself is what goes upstream, so fields the model
does not name (stream_options, response_format, seed, user, ...) pass through untouched.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Sequence
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


# A prompt or an embedding input: text, texts, token ids, or lists of token ids.
TokenIds = Annotated[list[Annotated[int, Field(ge=0), WHOLE]], Field(min_length=1)]
Texts = str | Annotated[list[str], Field(min_length=1)] | TokenIds \
    | Annotated[list[TokenIds], Field(min_length=1)]


def input_items(value: Any) -> list[Any]:
    """An embedding's `input` (or a completion's `prompt`) as a list of items, each a text or a
    list of token ids: a lone text, and a lone list of token ids, are one item."""
    if isinstance(value, str) or (isinstance(value, list) and value
                                  and isinstance(value[0], int)):
        return [value]
    return list(value or ())


class EmbeddingRequest(_Open):
    """Create embeddings (OpenAI dialect): `input` passes through as sent."""

    model: str = Field(min_length=1, max_length=256)
    input: Texts
    dimensions: Annotated[int, Field(ge=1), WHOLE] | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None


class CompletionRequest(_Open):
    """Create a (legacy) text completion (OpenAI dialect)."""

    model: str = Field(min_length=1, max_length=256)
    prompt: Texts
    max_tokens: Annotated[int, Field(ge=0, le=2**31 - 1), WHOLE] | None = None
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, ge=0, le=1)
    n: Annotated[int, Field(ge=1, le=128), WHOLE] | None = None
    stream: bool | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None


class ResponseRequest(_Open):
    """Create a model response (OpenAI's Responses API): `input` and every other field pass
    through as sent."""

    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    stream: bool | None = None
    # A stored response of the caller's: it names the backend the request must go to.
    previous_response_id: str | None = Field(None, pattern=SAFE_ID_PATTERN)
    max_output_tokens: Annotated[int, Field(ge=1, le=2**31 - 1), WHOLE] | None = None


def _parser(model: type[BaseModel]) -> Callable[[bytes], dict[str, Any]]:
    def parse(raw: bytes) -> dict[str, Any]:
        body = load_json_object(raw)
        try:
            model.model_validate(body)
        except ValidationError as exc:
            raise ValidationFailed(_detail(exc, body)) from None
        return body

    parse.__doc__ = (f"Body bytes -> the validated request dict ({model.__name__}), or "
                     "ValidationFailed with one entry per problem.")
    return parse


parse_chat_request = _parser(ChatCompletionRequest)
parse_embedding_request = _parser(EmbeddingRequest)
parse_completion_request = _parser(CompletionRequest)
parse_response_request = _parser(ResponseRequest)


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


def openapi_components(models: Iterable[type[BaseModel]]) -> dict[str, Any]:
    """The document's `components.schemas`: the request bodies' schemas generated from the
    validators' own models (each under its class name, with the models they use), and the
    shapes of the answers (errors, the 422 detail list, model list, completion, SSE event)."""
    ref = "#/components/schemas/{model}"
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=ref)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["ValidationError"] = {
        "type": "object",
        "required": ["detail", "error"],
        "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": "string"},
        }}, "detail": {"type": "array", "items": {
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
    schemas["Model"] = {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                       "created": {"type": "integer"}, "owned_by": {"type": "string"}},
    }
    schemas["ModelList"] = {
        "type": "object",
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
            "$ref": ref.format(model="Model")}}},
    }
    schemas["ChatCompletion"] = {"type": "object", "description": "The upstream's answer, "
                                 "relayed as it came (OpenAI's chat.completion object)"}
    schemas["Embeddings"] = {"type": "object", "description": "The upstream's answer, relayed "
                             "as it came (OpenAI's list of embedding objects)"}
    schemas["TextCompletion"] = {"type": "object", "description": "The upstream's answer, "
                                 "relayed as it came (OpenAI's text_completion object)"}
    schemas["Response"] = {"type": "object", "description": "The upstream's answer, relayed as "
                           "it came (OpenAI's response object)"}
    schemas["ServerSentEvent"] = {
        "type": "object", "description": "One event of the stream, relayed as the upstream "
        "wrote it; the last is `data: [DONE]`, or one `event: error` whose data is an Error",
        "properties": {"event": {"type": "string"}, "data": {"type": "string"},
                       "id": {"type": "string"}, "retry": {"type": "integer", "minimum": 0}}}
    return schemas


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
