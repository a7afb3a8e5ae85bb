"""The chat-completions request model: what it accepts, the 422 detail it builds, its OpenAPI."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from router.errors import ValidationFailed
from router.locs import input_path
from router.routes import openapi_document
from router.schema import ChatCompletionRequest, parse_chat_request

SEED_FIELDS = {"model", "messages", "temperature", "top_p", "n", "stream", "stop", "max_tokens",
               "presence_penalty", "frequency_penalty", "tools", "tool_choice", "session_id"}
MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id"}
MSG = [{"role": "user", "content": "hi"}]


def parse(body: Any) -> dict[str, Any]:
    return parse_chat_request(orjson.dumps(body))


def detail(body: Any) -> list[dict[str, Any]]:
    with pytest.raises(ValidationFailed) as info:
        parse(body)
    assert info.value.status == 422
    answer = info.value.body()
    assert answer["detail"] == info.value.detail  # exactly, beside the OpenAI-style error
    assert set(answer) == {"detail", "error"}
    return info.value.detail


def test_the_seed_example_is_accepted():
    seed = {
        "model": "string",
        "messages": [{"role": "user", "content": "string", "name": "string",
                      "tool_calls": [{}], "tool_call_id": "string"}],
        "temperature": 1, "top_p": 1, "n": 1, "stream": False, "stop": "string",
        "max_tokens": 1, "presence_penalty": 0, "frequency_penalty": 0,
        "tools": [{"type": "function", "function": {"name": "string", "description": "string",
                                                    "parameters": {}}}],
        "tool_choice": "auto", "session_id": "string",
    }
    assert parse(seed) == seed


def test_every_optional_field_may_be_null():
    body = {field: None for field in SEED_FIELDS - {"messages"}}
    body["messages"] = [{"role": "assistant", **{f: None for f in MESSAGE_FIELDS - {"role"}}}]
    assert parse(body) == body


def test_the_request_dict_is_returned_untouched_with_extras():
    body = {"messages": [{"role": "user", "content": "x", "cache_control": {"t": 1}}],
            "stream_options": {"include_usage": True}, "seed": 1, "user": "u",
            "response_format": {"type": "json_schema", "json_schema": {"name": "s"}},
            "tools": [{"type": "function", "function": {"name": "f"}, "strict": True}],
            "session_id": "s1"}
    assert parse(body) == body


@pytest.mark.parametrize(("field", "ok", "bad"), [
    ("temperature", [0, 0.0, 1.5, 2], [-0.001, 2.001, True, "1"]),
    ("top_p", [0, 0.5, 1], [-0.1, 1.01, False]),
    ("n", [1, 128, 1.0, 54.0], [0, 129, 128.5, 1.5, True, "1", 0.0]),
    ("max_tokens", [1, 2**31 - 1, 3.0], [0, -1, 2**31, 3.5, True, 1e300, float(2**31)]),
    ("presence_penalty", [-2, 0, 2], [-2.01, 2.01, "0"]),
    ("frequency_penalty", [-2, 2.0], [-3, 3, [0]]),
    ("stream", [True, False], [0, 1, "false", [True]]),
    ("stop", ["x", "\n\nHuman:", [], ["a", "b", "c", "d"], ["long stop " * 10]],
     [5, ["a"] * 5, [1], {"a": "b"}]),
    ("tool_choice", ["none", "auto", "required", {"type": "function", "function": {"name": "f"}}],
     ["any", "", 1, ["auto"]]),
    ("session_id", ["s", "s" * 128], ["", "s" * 129, 5]),
    ("model", ["m", "m" * 256], ["", "m" * 257, 5, {"name": "m"}]),
])
def test_boundaries(field, ok, bad):
    for value in ok:
        assert parse({"messages": MSG, field: value})[field] == value
    for value in bad:
        entries = detail({"messages": MSG, field: value})
        assert entries[0]["loc"] == ["body", field], value
        assert all(e["loc"][:2] == ["body", field] for e in entries)


def test_tool_function_name_rules():
    def tool(name: str) -> dict[str, Any]:
        return {"messages": MSG, "tools": [{"type": "function", "function": {"name": name}}]}

    assert parse(tool("a" * 64))
    assert parse(tool("get_weather.v2-x"))
    for name in ("", "a" * 65, "has space", "semi;colon", "ünïcode"):
        assert [e["loc"] for e in detail(tool(name))] == \
            [["body", "tools", 0, "function", "name"]], name


def test_a_union_reports_once_listing_what_would_do():
    [entry] = detail({"messages": MSG, "stop": 5})
    assert entry == {"loc": ["body", "stop"], "type": "union_type",
                     "msg": "Input should be a valid string; or input should be a valid list"}


def test_missing_fields_name_the_key_to_write():
    assert detail({"model": "m"}) == [
        {"loc": ["body", "messages"], "msg": "Field required", "type": "missing"}]
    assert [e["loc"] for e in detail({"messages": [{"content": "x"}]})] == \
        [["body", "messages", 0, "role"]]
    assert [e["loc"] for e in detail({"messages": MSG, "tools": [{"function": {"name": "f"}}]})] \
        == [["body", "tools", 0, "type"]]


def test_one_entry_per_problem_in_body_order():
    entries = detail({"messages": [{"role": "x"}, {"role": "user", "content": 1}],
                      "n": 0, "top_p": 2})
    assert [e["loc"] for e in entries] == [
        ["body", "messages", 0, "role"], ["body", "messages", 1, "content"],
        ["body", "top_p"], ["body", "n"]]
    assert {e["type"] for e in entries} >= {"literal_error", "greater_than_equal"}


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b'"x"', b"\xff",
                                 b'{"messages": [], "x": NaN}', b'{"t": 1e400}',
                                 b'{"s": "\\udfff"}', b"[" * 5000 + b"]" * 5000])
def test_not_a_json_object_is_one_entry_at_body(raw):
    with pytest.raises(ValidationFailed) as info:
        parse_chat_request(raw)
    [entry] = info.value.detail
    assert entry["loc"] == ["body"]
    assert entry["type"] in ("json_invalid", "model_type")


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "messages": [{"role": "user", "content": "a: b \\u003a c"}]}',
    b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "k\\u003a": {"a:": ":"}}',
    b'{"model" : "m" , "messages" : [ {"role" : "user" , "content" : "::"} ] }',
])
def test_colons_in_strings_and_escapes_are_not_taken_for_repeated_keys(raw):
    assert parse_chat_request(raw)["model"] == "m"


def test_a_repeated_key_is_one_entry_at_body():
    with pytest.raises(ValidationFailed) as info:
        parse_chat_request(b'{"model": "m", "messages": [], "tools": [{"type": "function", '
                           b'"function": {"name": "f", "name": "g"}}]}')
    [entry] = info.value.detail
    assert entry["loc"] == ["body"] and "repeats a key" in entry["msg"]


def test_input_path_drops_union_member_steps():
    body = {"stop": [1], "messages": [{"content": [5]}]}
    assert input_path(body, ("stop", "list[str]", 0), missing=False) == ("stop", 0)
    assert input_path(body, ("stop", "str"), missing=False) == ("stop",)
    assert input_path(body, ("messages", 0, "content", "list[dict[str,any]]", 0),
                      missing=False) == ("messages", 0, "content", 0)
    assert input_path(body, ("messages", 0, "role"), missing=True) == ("messages", 0, "role")
    assert input_path(body, ("messages", 3, "role"), missing=False) == ("messages",)


def test_openapi_describes_the_seed_request_and_the_422_shape():
    doc = openapi_document()
    assert doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]
    assert set(request["properties"]) == SEED_FIELDS
    assert request["required"] == ["messages"]
    assert set(schemas["Message"]["properties"]) == MESSAGE_FIELDS
    for path in ("/api/v1/chat/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"] \
            .endswith("/ValidationError")
    assert schemas["ValidationError"]["properties"]["detail"]["items"]["required"] == \
        ["loc", "msg", "type"]
    assert set(ChatCompletionRequest.model_fields) == SEED_FIELDS


def test_openapi_document_is_valid_openapi_and_lists_every_endpoint():
    from openapi_spec_validator import validate


    doc = openapi_document()
    validate(doc)
    assert {"/api/v1/chat/completions", "/v1/chat/completions", "/api/v1/models",
            "/api/v1/auth/token", "/api/v1/admin/keys", "/api/v1/admin/keys/{id}",
            "/healthz", "/readyz", "/metrics"} <= set(doc["paths"])
    assert doc["components"]["schemas"]["NewKey"]["required"] == ["user"]


def test_the_served_document_names_the_routes_and_every_auth_answer():
    from openapi_spec_validator import validate

    from router.schema import OpenApiDocument

    served = OpenApiDocument(openapi_document())
    doc = orjson.loads(served.render(["b", "a"]))
    validate(doc)
    schemas = doc["components"]["schemas"]
    assert schemas["AutomationSettings"]["properties"]["default_model"]["anyOf"][0]["enum"] == \
        ["a", "b"]
    models = schemas["NewKey"]["properties"]["models"]["anyOf"]
    assert models[0] == {"const": ["*"]} and models[1]["items"]["enum"] == ["a", "b"]
    assert orjson.loads(served.render(["c"]))["components"]["schemas"]["AutomationSettings"][
        "properties"]["default_model"]["anyOf"][0]["enum"] == ["c"]  # follows a reload
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if op.get("security"):
                assert {"401", "403", "503"} <= set(op["responses"]), (method, path)
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "429" in chat
    assert chat["200"]["content"]["text/event-stream"]["schema"] == {
        "$ref": "#/components/schemas/ServerSentEvent"}


def test_a_422_carries_an_openai_style_error_naming_the_first_problem():
    with pytest.raises(ValidationFailed) as info:
        parse({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]})
    error = info.value.body()["error"]
    assert error["param"] == "messages.0.role"
    assert error["message"].startswith("messages.0.role: ")
    assert (error["type"], error["code"]) == ("invalid_request_error", "validation_error")
    with pytest.raises(ValidationFailed) as info:
        parse([1, 2])  # the body itself: no parameter to name
    error = info.value.body()["error"]
    assert error["param"] is None and error["message"] == info.value.detail[0]["msg"]
