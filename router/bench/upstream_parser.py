"""Micro-benchmark: the lean client's HTTP/1.1 response parsing, now and at another revision.

`python -m router.bench.upstream_parser [REV]` (REV defaults to HEAD~1; the package installed
from a git checkout) loads router/upstream_lean.py as it was at REV (`git show`) and drives both
versions' connection protocol the same way: `start`, then `data_received` per read, then the
body chunks it queued. Two answers: a JSON completion as vLLM/uvicorn sends it, in one read; and
a 100-event chunked SSE stream, one chunk per read. Rounds alternate the two; the best round of
each is reported, with the ratio (below 1: now is faster).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from router.upstream_lean import _Conn

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding `router/`

HEAD = (b"HTTP/1.1 200 OK\r\ndate: Thu, 03 Dec 2026 12:00:00 GMT\r\nserver: uvicorn\r\n"
        b"x-request-id: 6f1c2d3e4f5a6b7c\r\n")
COMPLETION = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * 80},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 80, "total_tokens": 92}}).encode()
JSON_READS = [HEAD + b"content-type: application/json\r\ncontent-length: "
              + str(len(COMPLETION)).encode() + b"\r\n\r\n" + COMPLETION]
EVENT = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
         b'"choices":[{"index":0,"delta":{"content":"word "},"finish_reason":null}]}\n\n')
SSE_READS = [HEAD + b"content-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
             *[hex(len(EVENT))[2:].encode() + b"\r\n" + EVENT + b"\r\n" for _ in range(100)],
             b"0\r\n\r\n"]


class _NullTransport:
    """Where the lean parser's request would go: nowhere (only parsing is measured)."""

    def write(self, data: bytes) -> None: ...
    def is_closing(self) -> bool: return False
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...


def lean_parser(conn_class: Any) -> Callable[[list[bytes]], int]:
    conn = conn_class(None)  # the pool is not used by parsing
    conn.connection_made(_NullTransport())

    def parse(reads: list[bytes]) -> int:
        conn.start(b"")
        for data in reads:
            conn.data_received(data)
        assert conn.done and conn.status == 200 and conn.headers is not None
        body = len(b"".join(conn._queue))
        conn._queue.clear()
        conn.reset()
        return body
    return parse


def conn_at(rev: str) -> Any:
    source = subprocess.run(["git", "show", f"{rev}:router/upstream_lean.py"], check=True,
                            capture_output=True, text=True, cwd=SOURCE_ROOT).stdout
    module = types.ModuleType("upstream_lean_at_rev")
    exec(compile(source, f"{rev}:router/upstream_lean.py", "exec"), module.__dict__)
    return module._Conn


def best_us(parse: Callable[[list[bytes]], int], reads: list[bytes], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        parse(reads)
    return (time.perf_counter() - start) / n * 1e6


async def main(rev: str) -> dict[str, Any]:
    parsers = {"now": lean_parser(_Conn), rev: lean_parser(conn_at(rev))}
    out: dict[str, Any] = {}
    for name, reads, n in (("json", JSON_READS, 20_000), ("sse-100", SSE_READS, 1_000)):
        best = {p: float("inf") for p in parsers}
        for _ in range(7):
            for p, parse in parsers.items():
                best[p] = min(best[p], best_us(parse, reads, n))
        out[name] = {**{f"{p}_us": round(v, 2) for p, v in best.items()},
                     "now_vs_rev": round(best["now"] / best[rev], 2)}
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "HEAD~1")), indent=1))
