"""SSE helpers the router writes itself, and how `Accept` picks a stream when `stream` is absent."""

from __future__ import annotations

import json

import pytest

from router.body import wants_stream
from router.providers.sse import (
    DONE,
    EventCutter,
    EventTooLarge,
    UsageTap,
    carries_content,
    data_event,
    error_event,
    event_data,
    may_carry_usage,
)
from router.relay import responses_stream_ended


def test_error_event_is_one_openai_style_error():
    raw = error_event('upstream "broke"', "upstream_error", "stream_interrupted")
    assert raw.startswith(b"event: error\ndata: ")
    assert raw.endswith(b"\n\n") and raw.count(b"\n\n") == 1
    data = raw.removeprefix(b"event: error\ndata: ").removesuffix(b"\n\n")
    assert b"\n" not in data  # one data line: a newline in the message must not split it
    assert json.loads(data) == {"error": {"message": 'upstream "broke"',
                                          "type": "upstream_error",
                                          "code": "stream_interrupted"}}


def test_error_event_defaults_and_multiline_message():
    raw = error_event("line one\nline two\r\nthree")
    assert raw.count(b"\n\n") == 1 and raw.count(b"\n") == 3  # event, data, blank line
    error = json.loads(raw.split(b"data: ", 1)[1])["error"]
    assert error == {"message": "line one\nline two\r\nthree", "type": "upstream_error",
                     "code": None}


def test_data_event_and_done():
    assert data_event({"a": 1}) == b'data: {"a":1}\n\n'
    assert DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7, 64])
def test_event_cutter_passes_whole_events_only_and_loses_nothing(split):
    stream = (b'data: {"a": "Gr\xc3\xbc\xc3\x9fe"}\n\n'
              b"event: x\r\ndata: 2\r\n\r\n"
              b": comment\n\n" + DONE)
    cutter = EventCutter()
    out = []
    for i in range(0, len(stream), split):
        events = cutter.feed(stream[i:i + split])
        if events:
            assert events.endswith((b"\n\n", b"\r\n\r\n"))
        out.append(events)
    assert b"".join(out) == stream
    assert cutter.pending == b""


def test_event_cutter_holds_a_partial_event_back():
    cutter = EventCutter()
    assert cutter.feed(b"data: 1\n\ndata: {\"par") == b"data: 1\n\n"
    assert cutter.pending == b'data: {"par'


def test_event_cutter_refuses_an_endless_event():
    cutter = EventCutter()
    with pytest.raises(EventTooLarge):
        for _ in range(20):
            cutter.feed(b"x" * 65536)


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
CONTENT = data_event({"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]})
USAGE_ONLY = data_event({"id": "c", "choices": [], "usage": USAGE})


@pytest.mark.parametrize(("events", "expected"), [
    (CONTENT + DONE, False),
    (USAGE_ONLY, True),
    (b'data: {"choices":[],"usage":null}\n\n', False),
    (b'data: {"choices": [], "usage": null}\n\n', False),
    (b'data: {"usage":null}\n\n' + USAGE_ONLY, True),
    # A false positive (a word in the text) only costs a parse; escaped quotes never match.
    (data_event({"choices": [{"delta": {"content": '"usage": 5'}}]}), False),
    (data_event({"choices": [{"delta": {"content": "usage"}}]}), True),
])
def test_may_carry_usage(events, expected):
    assert may_carry_usage(events) is expected


def test_event_data_joins_data_lines():
    assert event_data(b"event: x\r\ndata:{\"a\":\r\ndata: 1}\r\n\r\n") == b'{"a":\n1}'
    assert event_data(b": comment\n\n") == b""


@pytest.mark.parametrize("hide", [True, False])
def test_usage_tap_reads_the_usage_chunk_and_hides_it_only_when_asked(hide):
    events = CONTENT + USAGE_ONLY + DONE
    tap = UsageTap(hide)
    out = tap.take(events)
    assert tap.usage == USAGE
    assert out == (CONTENT + DONE if hide else events)
    if not hide:
        assert out is events  # nothing dropped: the very same bytes, no copy


def test_usage_tap_keeps_a_content_chunk_that_carries_usage():
    last = data_event({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                       "usage": USAGE})
    tap = UsageTap(hide=True)
    assert tap.take(CONTENT + last + DONE) == CONTENT + last + DONE
    assert tap.usage == USAGE


def test_usage_tap_keeps_the_last_usage_and_crlf_events():
    first = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\r\n\r\n'
    tap = UsageTap(hide=True)
    assert tap.take(first) == b""
    assert tap.take(b": ping\r\r" + USAGE_ONLY + b"\n") == b": ping\r\r\n"
    assert tap.usage == USAGE


@pytest.mark.parametrize("event", [
    b'data: {"usage": {broken\n\n',
    b'data: {"choices": [], "usage": 12}\n\n',
    b'data: ["usage"]\n\n',
    b'event: x\ndata: "usage"\n\n',
])
def test_usage_tap_passes_what_it_cannot_read(event):
    tap = UsageTap(hide=True)
    assert tap.take(CONTENT + event) == CONTENT + event
    assert tap.usage is None


@pytest.mark.parametrize(("stream", "accept", "expected"), [
    # `stream` decides whenever it is given.
    (True, None, True),
    (True, "application/json", True),
    (False, "text/event-stream", False),
    (False, None, False),
    # Absent: Accept decides.
    (None, None, False),
    (None, "", False),
    (None, "*/*", False),
    (None, "application/json", False),
    (None, "text/event-stream", True),
    (None, "text/event-stream; charset=utf-8", True),
    (None, "Text/Event-Stream", True),
    # Order breaks ties between equal q-values.
    (None, "text/event-stream, application/json", True),
    (None, "application/json, text/event-stream", False),
    (None, "text/event-stream, */*", True),
    (None, "*/*, text/event-stream", False),
    (None, "application/*, text/event-stream", False),
    # q-values win over order.
    (None, "application/json;q=0.5, text/event-stream", True),
    (None, "text/event-stream;q=0.5, application/json", False),
    (None, "text/event-stream; q=0.9, */*; q=0.1", True),
    (None, "*/*;q=0.1, text/event-stream;q=0.2", True),
    (None, "text/event-stream;Q=0.1, application/json;q=0.5", False),
    # q=0 means "not acceptable"; a broken q counts as 0.
    (None, "text/event-stream;q=0", False),
    (None, "text/event-stream;q=0.0, application/json;q=0.1", False),
    (None, "text/event-stream;q=abc", False),
    (None, "text/event-stream;q=abc, application/json;q=0.1", False),
    # Unrelated types do not compete with the stream.
    (None, "text/html, text/event-stream", True),
])
def test_wants_stream(stream, accept, expected):
    assert wants_stream(stream, accept) is expected


@pytest.mark.parametrize(("event", "expected"), [
    (b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n', False),
    (b'data: {"choices":[{"delta":{"role":"assistant","content":null}}]}\n\n', False),
    (b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n', True),
    (b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n', True),
    (b'data: {"choices":[{"delta":{"reasoning_content":"hm"}}]}\n\n', True),
    (b'data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}\n\n', True),
    (b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n', True),
    (b'data: {"choices":[{"delta":{},"finish_reason":null}]}\n\n', False),
    (b"data: [DONE]\n\n", True),
    (b": keep-alive\n\n", False),
])
def test_carries_content_tells_an_answer_from_a_role_only_chunk(event, expected):
    assert carries_content(event) is expected


def test_usage_tap_reads_a_responses_stream_from_its_completed_event():
    created = (b'event: response.created\ndata: {"type":"response.created","response":'
               b'{"id":"resp_1","usage":null}}\n\n')
    completed = (b'event: response.completed\ndata: {"type":"response.completed","response":'
                 b'{"id":"resp_1","usage":{"input_tokens":7,"output_tokens":3}}}\n\n')
    tap = UsageTap(hide=True)  # a Responses event is never hidden, whatever `hide` says
    assert not may_carry_usage(created)
    events = created + completed
    assert may_carry_usage(events) and tap.take(events) == events
    assert tap.usage == {"input_tokens": 7, "output_tokens": 3}


@pytest.mark.parametrize(("last", "ended"), [
    (b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n', True),
    (b'data: {"type": "response.failed", "response": {}}\n\n', True),
    (b'event: response.incomplete\ndata: {"type":"response.incomplete"}\n\n', True),
    (b'event: error\ndata: {"type":"error","message":"x"}\n\n', True),
    (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
     b'"delta":"response.completed"}\n\n', False),
    (b"", False),
])
def test_a_responses_stream_ends_at_its_terminal_event(last, ended):
    assert responses_stream_ended(last) is ended
