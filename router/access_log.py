"""The access log: one line per request, in the format of the router's other log lines (JSON
or text, router/log.py), written without the `logging` module's per-record machinery.

A request's line is its fields serialised once (orjson, or `k=v` text) and appended to a
buffer; the buffer goes to stderr when it holds BATCH lines or FLUSH_S after its first line,
and when the worker stops, in writes of whole lines no longer than PIPE_BUF (the workers of
`server.workers > 1` share stderr: a pipe keeps such a write in one piece).

Through `logging`, a line cost about 13 µs of the request's CPU (a LogRecord, the caller's
frame lookup, the handler's lock, the formatter, one write and flush per line); this way it is
about 1 µs, and one write carries many lines.

Lines are written when `logging.access_log` is on and `logging.level` lets `info` lines
through (the access log is at `info`, as it was through `logging`).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import sys
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

import orjson

from router.config.model import LoggingConfig
from router.log import redact_path

BATCH = 256  # lines per write at most
FLUSH_S = 0.05  # how long a line may wait for company


def _stderr(data: bytes) -> None:
    out = sys.stderr.buffer
    out.write(data)
    out.flush()


def _pieces(lines: list[bytes]) -> Iterator[bytes]:
    """The lines joined into writes of at most PIPE_BUF bytes, each ending at a line's end:
    workers share stderr, and a pipe keeps a write that short whole (a longer line is written
    alone)."""
    piece: list[bytes] = []
    size = 0
    for line in lines:
        if piece and size + len(line) > select.PIPE_BUF:
            yield b"".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        yield b"".join(piece)


class AccessLog:
    """This worker's access-log writer; `write` takes a request's fields (a dict of JSON
    values, keys in the order they are printed)."""

    def __init__(self, config: LoggingConfig, plain_paths: Collection[str] = (),
                 out: Callable[[bytes], object] = _stderr) -> None:
        self.enabled = config.level in ("debug", "info")
        self._plain_paths = frozenset(plain_paths)
        self.json = config.format == "json"
        self.out = out
        self._lines: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._second = -1
        self._stamp = ""

    def write(self, fields: dict[str, Any]) -> None:
        now = time.time()
        line = self._json_line(now, fields) if self.json else self._text_line(now, fields)
        lines = self._lines
        lines.append(line)
        if len(lines) >= BATCH or self._closed:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def path(self, path: str) -> str:
        """A request's path as its line shows it: the router's own fixed paths as they are,
        any other through `redact_path`."""
        return path if path in self._plain_paths else redact_path(path)

    def flush(self) -> None:
        """Write what is buffered now (a failed write loses those lines, as `logging` would
        after printing its complaint)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        with contextlib.suppress(OSError, ValueError):  # stderr closed or gone
            for piece in _pieces(lines):
                self.out(piece)

    def close(self) -> None:
        """The worker is stopping: what is buffered goes now, and any later line at once
        (a request that outlived the shutdown's wait; no timer would fire for it)."""
        self._closed = True
        self.flush()

    def _json_line(self, now: float, fields: dict[str, Any]) -> bytes:
        # The fixed head, then the fields' own object without its opening brace.
        head = f'{{"time":"{self._time(now, "%Y-%m-%dT%H:%M:%S", time.gmtime)}Z",{_JSON_HEAD}'
        return head.encode() + orjson.dumps(fields, default=str,
                                            option=orjson.OPT_APPEND_NEWLINE)[1:]

    def _text_line(self, now: float, fields: dict[str, Any]) -> bytes:
        # As logging's default text format writes it: local time, comma before milliseconds.
        stamp = self._time(now, "%Y-%m-%d %H:%M:%S", time.localtime).replace(".", ",")
        pairs = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{stamp} INFO router.access: request {pairs}\n".encode("utf-8", "replace")

    def _time(self, now: float, pattern: str, convert: Callable[[float], time.struct_time]
              ) -> str:
        """`now` as `pattern` plus `.mmm`; the whole-second part is formatted once a second."""
        second = int(now)
        if second != self._second:
            self._second, self._stamp = second, time.strftime(pattern, convert(now))
        return self._stamp + _MILLIS[int((now - second) * 1000)]


_JSON_HEAD = '"level":"info","logger":"router.access","msg":"request",'
_MILLIS = tuple(f".{ms:03d}" for ms in range(1000))
