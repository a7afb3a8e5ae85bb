"""Property-based tests (hypothesis): the request validator never fails other than with a 422,
and the SSE event cutter gives the same events whatever the chunking."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.errors import ValidationFailed
from router.providers.sse import EventCutter
from router.schema import ChatCompletionRequest, parse_chat_request

# Bounded and repeatable: the same examples on every run, no example database.
BOUNDED = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])

FIELDS = [*sorted(ChatCompletionRequest.model_fields), "stream_options", "seed", "user"]
MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id"]

# Any JSON value (integers within 64 bits: larger ones are a separate rule of the parser).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"])},
                          optional={f: json_values for f in MESSAGE_FIELDS[1:]}),
    min_size=1, max_size=3)


def accepted_or_422(body: Any) -> None:
    raw = orjson.dumps(body)
    try:
        assert parse_chat_request(raw) == orjson.loads(raw)  # accepted: returned untouched
    except ValidationFailed as exc:
        assert exc.status == 422
        assert exc.detail and all(d["loc"][0] == "body" for d in exc.detail)


@BOUNDED
@given(st.sampled_from(FIELDS), json_values, messages)
def test_any_json_value_in_any_field_is_accepted_or_422(field: str, value: Any,
                                                        msgs: list[Any]) -> None:
    accepted_or_422({"model": "m", "messages": msgs, field: value})


@BOUNDED
@given(st.sampled_from(MESSAGE_FIELDS), json_values)
def test_any_json_value_in_any_message_field_is_accepted_or_422(field: str, value: Any) -> None:
    accepted_or_422({"messages": [{"role": "user", "content": "hi", field: value}]})


@BOUNDED
@given(json_values)
def test_any_json_document_is_accepted_or_422(body: Any) -> None:
    accepted_or_422(body)


# A valid stream: whole events, each ended by a blank line in one of SSE's three line endings.
_line_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"),
                     max_size=30)
_field = st.sampled_from(["data", "event", "id", "retry", ""])


@st.composite
def events(draw: st.DrawFn) -> bytes:
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    lines = draw(st.lists(st.tuples(_field, _line_text), min_size=1, max_size=4))
    body = "".join((f"{name}: {text}" if name else f":{text}") + eol for name, text in lines)
    return (body + eol).encode()


def cut(stream: bytes, splits: list[int]) -> list[bytes]:
    cutter = EventCutter()
    out = []
    points = sorted({min(s, len(stream)) for s in splits})
    for start, end in zip([0, *points], [*points, len(stream)], strict=True):
        got = cutter.feed(stream[start:end])
        if got:
            out.append(got)
    assert cutter.pending == b""
    return out


@BOUNDED
@given(st.lists(events(), min_size=1, max_size=6), st.lists(st.integers(0, 2000), max_size=12))
def test_any_split_of_a_valid_stream_gives_the_same_events(evs: list[bytes],
                                                           splits: list[int]) -> None:
    stream = b"".join(evs)
    whole = cut(stream, [])
    pieces = cut(stream, splits)
    assert b"".join(pieces) == stream == b"".join(whole)
    # Every piece handed on ends where an event ends: the same events, only grouped differently.
    ends = set()
    at = 0
    for ev in evs:
        at += len(ev)
        ends.add(at)
    at = 0
    for piece in pieces:
        at += len(piece)
        assert at in ends, (stream, splits)
