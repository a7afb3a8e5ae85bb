"""A minimal, fast OpenAI-style upstream for the benchmark: a raw asyncio Protocol under uvloop.

The aiohttp fake (tests/fakes) spends more CPU per request than the router does, so a direct
figure measured against it would measure the fake. This one answers from prebuilt bytes:

* ``"stream":true`` absent: one fixed chat.completion JSON body, keep-alive.
* ``"stream":true`` with model ``bench-hold``: the first SSE chunk at once, then one chunk every
  ``--hold-gap`` seconds for ``--hold-s`` seconds (the open-streams RSS measurement).
* a streamed model ``bench-chunks-N``: N token chunks and the end, written at once (the peers
  bench's stream rate and per-chunk relay figures).
* any other streamed model: a short SSE answer written at once, chunked.
* ``GET`` anything: a model list (the router's probe, if enabled).
* ``POST /v1/messages``: the same answers in Anthropic's Messages API (the translated-provider
  figure); a streamed model ``bench-paced-N`` (on either path) writes N tokens one by one, 1 ms
  apart, as a model streams them.

With ``--prefill-ms`` (the sessions bench) streamed answers simulate a prefix (KV) cache: the
process remembers each conversation it has seen, keyed by the text of its first message (unique
per session in the bench client); a conversation's first request here waits ``--prefill-ms``
before its first byte (cold), later ones ``--warm-ms`` (warm). ``GET /prefix-stats`` answers
``{"warm": n, "cold": n}`` so far.

With ``--kv-capacity`` (the prefix-affinity bench) streamed answers wait as a backend with a
bounded prefix cache would (router/bench/kv_cache.py): an LRU of message blocks, the time to the
first byte growing with the uncached part of the prompt, concurrent prefills sharing the
backend. ``GET /kv-stats`` answers its counters; ``GET /kv-reset`` empties it.

Run: ``python -m router.bench.upstream --port 0``; it prints ``PORT <n>`` when listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
from typing import cast

import orjson

from router.bench.kv_cache import KvCache

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_MODEL = re.compile(rb'"model":\s*"([^"]*)"')
HOLD_MODEL = b"bench-hold"
MAX_REQUEST = 1 << 20


def _response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _completion_body() -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
        "model": "bench-fast",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant",
                                 "content": "Hello! This is a fixed benchmark answer."}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
    })


def _sse_event(delta: dict[str, object], finish: str | None = None) -> bytes:
    return b"data: " + orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "bench-stream",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }) + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


COMPLETION = _response(_completion_body())
MODELS = _response(orjson.dumps({"object": "list", "data": [
    {"id": "bench-fast", "object": "model", "created": 0, "owned_by": "bench"}]}))
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
SSE_FIRST = _chunk(_sse_event({"role": "assistant", "content": ""}))
SSE_TOKEN = _chunk(_sse_event({"content": "tok "}))
SSE_END = (_chunk(_sse_event({}, "stop")) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
SSE_FAST = SSE_HEAD + SSE_FIRST + SSE_TOKEN * 8 + SSE_END
# `bench-paced-N`: N tokens, one write each PACE_GAP_S apart, as a model streams them: every
# chunk reaches the router in a read of its own (the translated-provider figure).
PACED_MODEL = re.compile(rb"bench-paced-(\d+)")
PACE_GAP_S = 0.001
CHUNKS_MODEL = re.compile(rb"bench-chunks-(\d{1,4})")
_CHUNKED_ANSWERS: dict[int, bytes] = {}


def _chunks_answer(tokens: int) -> bytes:
    """`bench-chunks-N`'s answer, built once per N."""
    answer = _CHUNKED_ANSWERS.get(tokens)
    if answer is None:
        answer = SSE_HEAD + SSE_FIRST + SSE_TOKEN * tokens + SSE_END
        _CHUNKED_ANSWERS[tokens] = answer
    return answer


def _anthropic_event(name: str, payload: dict[str, object]) -> bytes:
    return _chunk(f"event: {name}\ndata: ".encode() + orjson.dumps(payload) + b"\n\n")


def _anthropic_parts(tokens: int) -> tuple[bytes, bytes, bytes]:
    """An Anthropic Messages stream: (head and start events, one text delta, the end)."""
    start = _anthropic_event("message_start", {"type": "message_start", "message": {
        "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench-claude",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 1}}})
    block = _anthropic_event("content_block_start", {
        "type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    token = _anthropic_event("content_block_delta", {
        "type": "content_block_delta", "index": 0,
        "delta": {"type": "text_delta", "text": "tok "}})
    end = (_anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0})
           + _anthropic_event("message_delta", {
               "type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                  "stop_sequence": None},
               "usage": {"output_tokens": tokens}})
           + _anthropic_event("message_stop", {"type": "message_stop"}) + b"0\r\n\r\n")
    return SSE_HEAD + start + block, token, end


ANTHROPIC_JSON = _response(orjson.dumps({
    "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench-claude",
    "content": [{"type": "text", "text": "Hello! This is a fixed benchmark answer."}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 9, "output_tokens": 9}}))
_A_FIRST, ANTHROPIC_TOKEN, _A_END = _anthropic_parts(8)
ANTHROPIC_FAST = _A_FIRST + ANTHROPIC_TOKEN * 8 + _A_END


class PrefixCache:
    """Conversations this process has seen (never evicted: the bench's are few and short)."""

    def __init__(self, prefill_s: float, warm_s: float) -> None:
        self.prefill_s = prefill_s
        self.warm_s = warm_s
        self.seen: set[str] = set()
        self.stats = {"warm": 0, "cold": 0}

    def delay(self, body: bytes) -> float:
        try:
            first = orjson.loads(body)["messages"][0]["content"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            first = ""
        key = first if isinstance(first, str) else orjson.dumps(first).decode()
        if key in self.seen:
            self.stats["warm"] += 1
            return self.warm_s
        self.seen.add(key)
        self.stats["cold"] += 1
        return self.prefill_s


class _Connection(asyncio.Protocol):
    """One keep-alive client connection; requests are answered in order."""

    def __init__(self, hold_s: float, hold_gap: float, cache: PrefixCache | None = None,
                 kv: KvCache | None = None) -> None:
        self._cache = cache
        self._kv = kv
        self._prefill: asyncio.Task[None] | None = None
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._hold_s = hold_s
        self._hold_gap = hold_gap
        self._timer: asyncio.TimerHandle | None = None
        self._hold_left = 0
        self._drip_parts = (b"", b"", 1.0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._prefill is not None:
            self._prefill.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        # A held stream (or a prefill) answers nothing else until it ends.
        while self._timer is None and self._prefill is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_REQUEST:
                    self._close()
                return
            head = bytes(buf[:end])
            match = _CONTENT_LENGTH.search(head)
            size = int(match.group(1)) if match else 0
            total = end + 4 + size
            if total > MAX_REQUEST:
                self._close()
                return
            if len(buf) < total:
                return
            body = bytes(buf[end + 4:total])
            del buf[:total]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        if head.startswith(b"GET /prefix-stats") and self._cache is not None:
            transport.write(_response(orjson.dumps(self._cache.stats)))
        elif head.startswith(b"GET /kv-") and self._kv is not None:
            if head.startswith(b"GET /kv-reset"):
                self._kv.reset()
            transport.write(_response(orjson.dumps(self._kv.stats.view())))
        elif head.startswith(b"GET"):
            transport.write(MODELS)
        elif b'"stream":true' not in body and b'"stream": true' not in body:
            anthropic = head.startswith(b"POST /v1/messages")
            transport.write(ANTHROPIC_JSON if anthropic else COMPLETION)
        else:
            model = _MODEL.search(body)
            name = b"" if model is None else model.group(1)
            anthropic = head.startswith(b"POST /v1/messages")
            paced = PACED_MODEL.fullmatch(name)
            chunks = None if paced is not None else CHUNKS_MODEL.fullmatch(name)
            if chunks is not None and not anthropic:
                transport.write(_chunks_answer(int(chunks.group(1))))
            elif paced is not None:
                tokens = int(paced.group(1))
                if anthropic:
                    first, token, end = _anthropic_parts(tokens)
                else:
                    first, token, end = SSE_HEAD + SSE_FIRST, SSE_TOKEN, SSE_END
                transport.write(first)
                self._drip(token, end, tokens + 1, PACE_GAP_S)
            elif anthropic:
                transport.write(ANTHROPIC_FAST)
            elif name == HOLD_MODEL:
                transport.write(SSE_HEAD + SSE_FIRST)
                self._drip(SSE_TOKEN, SSE_END, max(1, int(self._hold_s / self._hold_gap)),
                           self._hold_gap)
            elif self._kv is not None:
                self._prefill = asyncio.get_running_loop().create_task(self._kv_answer(body))
            elif self._cache is not None:  # later requests wait: answers stay in order
                delay = self._cache.delay(body)
                self._timer = asyncio.get_running_loop().call_later(delay, self._delayed)
            else:
                transport.write(SSE_FAST)

    async def _kv_answer(self, body: bytes) -> None:
        assert self._kv is not None
        try:
            request = orjson.loads(body)
            await self._kv.prefill(request.get("messages") or [], request.get("tools"))
        finally:
            self._prefill = None
        if self._transport is not None:
            self._transport.write(SSE_FAST)
            if self._buf:
                self.data_received(b"")

    def _delayed(self) -> None:
        self._timer = None
        if self._transport is None:
            return
        self._transport.write(SSE_FAST)
        if self._buf:
            self.data_received(b"")

    def _drip(self, token: bytes, end: bytes, ticks: int, gap: float) -> None:
        """`ticks - 1` tokens then `end`, one write every `gap` seconds."""
        self._drip_parts = (token, end, gap)
        self._hold_left = ticks
        self._timer = asyncio.get_running_loop().call_later(gap, self._tick)

    def _tick(self) -> None:
        transport = self._transport
        if transport is None:
            self._timer = None
            return
        token, end, gap = self._drip_parts
        self._hold_left -= 1
        if self._hold_left > 0:
            transport.write(token)
            self._timer = asyncio.get_running_loop().call_later(gap, self._tick)
            return
        transport.write(end)
        self._timer = None
        if self._buf:
            self.data_received(b"")

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def serve(host: str, port: int, hold_s: float, hold_gap: float,
                cache: PrefixCache | None = None, kv: KvCache | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(hold_s, hold_gap, cache, kv), host,
                                      port, backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.bench.upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--hold-s", type=float, default=120.0,
                        help="how long a bench-hold stream stays open")
    parser.add_argument("--hold-gap", type=float, default=2.0,
                        help="seconds between chunks of a bench-hold stream")
    parser.add_argument("--prefill-ms", type=float, default=0.0,
                        help="simulate a prefix cache: a conversation's first streamed request "
                             "here waits this long before its first byte (0: off)")
    parser.add_argument("--warm-ms", type=float, default=5.0,
                        help="with --prefill-ms: the wait of a conversation seen here before")
    parser.add_argument("--kv-capacity", type=int, default=0,
                        help="simulate a bounded prefix (KV) cache of this many tokens (0: off)")
    parser.add_argument("--kv-token-us", type=float, default=50.0,
                        help="with --kv-capacity: prefill time per uncached token, alone")
    parser.add_argument("--kv-base-ms", type=float, default=2.0,
                        help="with --kv-capacity: the wait before any prefill")
    args = parser.parse_args(argv)
    cache = (PrefixCache(args.prefill_ms / 1000, args.warm_ms / 1000)
             if args.prefill_ms > 0 else None)
    kv = (KvCache(args.kv_capacity, args.kv_token_us / 1e6, args.kv_base_ms / 1000)
          if args.kv_capacity > 0 else None)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a router dependency
        runner = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.host, args.port, args.hold_s, args.hold_gap, cache, kv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
