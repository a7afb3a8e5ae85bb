"""SSE helpers the router writes itself, and how `Accept` picks a stream when `stream` is absent."""

from __future__ import annotations

import json

import pytest

from router.handlers import wants_stream
from router.providers.sse import DONE, EventCutter, EventTooLarge, data_event, error_event


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
