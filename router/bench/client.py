"""The benchmark's load generator: a lean HTTP/1.1 keep-alive client on raw asyncio + uvloop.

Run as a subprocess (pinned beside the upstream) in one of these modes; each prints one JSON
object on stdout:

* ``openloop``: requests fired on a fixed schedule (``--rate``), each on an idle connection or
  a new one, so a slow server cannot slow the offered load (no coordinated omission).
* ``closed``: ``--connections`` loops for ``--duration`` seconds (the fallback when wrk is absent).
* ``ttfb``: ``--count`` streamed requests one after another; time to the first SSE ``data:``.
* ``streams``: ``--connections`` loops of streamed requests for ``--duration`` seconds: streams/s,
  time to the first byte, time per chunk from the first bytes to the last (``--chunks`` per
  answer).
* ``hold``: ``--count`` streams opened at once; prints ``READY <n>`` once all have their first
  chunk, then keeps them open until a line arrives on stdin (or ``--max-hold`` passes).
* ``sessions``: ``--sessions`` conversations at once, each ``--turns`` streamed requests one after
  another on its own connection, the history growing each turn; the first message is unique per
  conversation (``--tag`` and its number); ``--pin`` adds a ``session_id``. Time to first byte.
* ``affinity``: ``--sessions`` conversations starting with Poisson gaps (``--arrivals`` a
  second), each ``--turns`` streamed requests with Poisson think times between them, every
  request sent to one of the ``--ports`` (router replicas) at random; the conversations share
  ``--systems`` long system prompts and each opens with its own document. ``--pin`` adds a
  ``session_id``. Time to first byte, and which backend (``x-router-backend``) served each turn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import cast

import orjson

# uvloop's loop.time() ticks in whole milliseconds: too coarse for sub-millisecond figures.
now = time.perf_counter
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)")


def build_request(host: str, port: int, path: str, body: bytes, key: str | None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}",
             "Content-Type: application/json", f"Content-Length: {len(body)}"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class ResponseFailed(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; parses Content-Length and chunked."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._done: asyncio.Future[int] | None = None
        self._on_data: Callable[[], None] | None = None
        self._status = 0
        self._in_body = False
        self._chunked = False
        self._remaining = 0  # body bytes left (Content-Length) or left in the current chunk
        self._keep_alive = True
        self.last_data = 0.0  # when the latest bytes arrived (the streams mode's chunk spread)
        self.head = b""  # the last response's head, lowercased

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done is not None and not self._done.done():
            self._done.set_exception(ResponseFailed(f"connection lost: {exc}"))

    def send(self, request: bytes, on_data: Callable[[], None] | None = None
             ) -> asyncio.Future[int]:
        """Send a request; the future gives the status when the whole response has arrived."""
        assert self.transport is not None and self._done is None
        self._done = asyncio.get_running_loop().create_future()
        self._on_data = on_data
        self._in_body = False
        self.transport.write(request)
        return self._done

    def data_received(self, data: bytes) -> None:
        self.last_data = now()
        buf = self._buf
        buf += data
        if not self._in_body:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.head = bytes(buf[:end]).lower()
            del buf[:end + 4]
            self._status = int(head[9:12])
            self._chunked = b"transfer-encoding: chunked" in head
            self._keep_alive = b"connection: close" not in head
            self._remaining = 0
            if not self._chunked:
                match = _CONTENT_LENGTH.search(head)
                self._remaining = int(match.group(1)) if match else 0
            self._in_body = True
        if self._chunked:
            self._read_chunks()
        else:
            if buf and self._on_data is not None:
                self._fire_data()
            take = min(self._remaining, len(buf))
            del buf[:take]
            self._remaining -= take
            if self._remaining == 0:
                self._finish()

    def _read_chunks(self) -> None:
        buf = self._buf
        while True:
            if self._remaining > 0:
                take = min(self._remaining, len(buf))
                if take == 0:
                    return
                if self._on_data is not None:
                    self._fire_data()
                del buf[:take]
                self._remaining -= take
                if self._remaining > 0:
                    return
                self._remaining = -2  # the CRLF after the chunk's data
            if self._remaining == -2:
                if len(buf) < 2:
                    return
                del buf[:2]
                self._remaining = 0
            end = buf.find(b"\r\n")
            if end < 0:
                return
            size = int(bytes(buf[:end]).split(b";")[0], 16)
            if size == 0:
                if len(buf) < end + 4:
                    return
                del buf[:end + 4]  # no trailers from our servers
                self._finish()
                return
            del buf[:end + 2]
            self._remaining = size

    def _fire_data(self) -> None:
        callback, self._on_data = self._on_data, None
        if callback is not None:
            callback()

    def _finish(self) -> None:
        done, self._done = self._done, None
        self._in_body = False
        if not self._keep_alive and self.transport is not None:
            self.transport.close()
            self.closed = True
        if done is not None and not done.done():
            done.set_result(self._status)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Connection, host, port)
    return conn


def _percentile(data: list[float], p: float) -> float:
    """Milliseconds at percentile `p` of sorted seconds (nearest rank)."""
    return data[min(len(data) - 1, round(p / 100 * (len(data) - 1)))] * 1000


def summary(samples: list[float]) -> dict[str, float]:
    """Milliseconds: p50, p90, p95, p99, p99.9, max, mean."""
    if not samples:
        return {}
    data = sorted(samples)
    return {"p50": _percentile(data, 50), "p90": _percentile(data, 90),
            "p95": _percentile(data, 95), "p99": _percentile(data, 99),
            "p99.9": _percentile(data, 99.9), "max": data[-1] * 1000,
            "mean": statistics.fmean(data) * 1000, "n": len(data)}


# The latency CDF the peers bench plots: every percent, then the tail.
CDF_POINTS = (*range(0, 100), 99.5, 99.9, 100)


def cdf(samples: list[float]) -> list[list[float]]:
    """[[percentile, milliseconds], ...] at CDF_POINTS."""
    data = sorted(samples)
    return [[p, _percentile(data, p)] for p in CDF_POINTS] if data else []


async def open_loop(host: str, port: int, request: bytes, rate: float, duration: float,
                    warmup: float) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    idle: list[_Connection] = [await connect(host, port) for _ in range(16)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    pending: set[asyncio.Task[None]] = set()

    async def one(sent: float, record: bool) -> None:
        conn = idle.pop() if idle else await connect(host, port)
        try:
            status = await asyncio.wait_for(conn.send(request), 30)
        except (ResponseFailed, OSError, TimeoutError) as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            conn.close()
            return
        if record:
            latencies.append(now() - sent)
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
        if not conn.closed:
            idle.append(conn)

    total = int(rate * (warmup + duration))
    n_warm = int(rate * warmup)
    start = now() + 0.05
    late = 0
    lags: list[float] = []  # how far behind its schedule each measured send went out
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - now()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            late += 1
        if i >= n_warm:
            lags.append(max(0.0, now() - scheduled))
        # Timed from this moment, not `scheduled`: uvloop's timers fire up to 1 ms late, and
        # that jitter is the generator's, not the server's. The load stays open: no send
        # waits for an earlier answer.
        task = loop.create_task(one(now(), i >= n_warm))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=35)
    for conn in idle:
        conn.close()
    return {"latency_ms": summary(latencies), "errors": errors, "sent": total - n_warm,
            "late_sends": late, "rate": rate, "send_lag_ms": summary(lags),
            "cdf_ms": cdf(latencies)}


async def closed_loop(host: str, port: int, request: bytes, connections: int,
                      duration: float) -> dict[str, object]:
    deadline = now() + duration
    counts = {"ok": 0, "non200": 0, "errors": 0}

    async def worker() -> None:
        conn = await connect(host, port)
        while now() < deadline:
            try:
                status = await asyncio.wait_for(conn.send(request), 30)
            except (ResponseFailed, OSError, TimeoutError):
                counts["errors"] += 1
                conn.close()
                conn = await connect(host, port)
                continue
            counts["ok" if status == 200 else "non200"] += 1
            if conn.closed:
                conn = await connect(host, port)
        conn.close()

    t0 = now()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(connections))),
                           duration + 40)
    elapsed = now() - t0
    return {"rps": (counts["ok"] + counts["non200"]) / elapsed, **counts}


def _stamp(times: list[float]) -> None:
    times.append(now())


async def _timed(host: str, port: int, conn: _Connection, request: bytes
                 ) -> tuple[_Connection, tuple[float, float, float] | None]:
    """One request on `conn`: (the connection to use next, (time to the first body byte,
    total, time to the last bytes' arrival) or None when it failed). A broken or closed
    connection is replaced."""
    first: list[float] = []
    t0 = now()
    try:
        status = await asyncio.wait_for(
            conn.send(request, on_data=functools.partial(_stamp, first)), 30)
    except (ResponseFailed, OSError, TimeoutError):
        conn.close()
        return await connect(host, port), None
    timing = ((first[0] - t0, now() - t0, conn.last_data - t0) if status == 200 and first
              else None)
    if conn.closed:
        conn = await connect(host, port)
    return conn, timing


async def ttfb(host: str, port: int, request: bytes, count: int) -> dict[str, object]:
    conn = await connect(host, port)
    firsts: list[float] = []
    totals: list[float] = []
    errors = 0
    for i in range(count + 10):  # the first 10 warm up
        conn, timing = await _timed(host, port, conn, request)
        if timing is None:
            errors += 1
        elif i >= 10:
            firsts.append(timing[0])
            totals.append(timing[1])
    conn.close()
    return {"ttfb_ms": summary(firsts), "total_ms": summary(totals), "errors": errors}


async def streams(host: str, port: int, request: bytes, connections: int, duration: float,
                  chunks: int) -> dict[str, object]:
    """`connections` loops of streamed requests for `duration` seconds: streams/s, time to the
    first body byte, and the time per chunk after it ((last bytes - first) / `chunks`)."""
    deadline = now() + duration
    firsts: list[float] = []
    per_chunk: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        conn = await connect(host, port)
        while now() < deadline:
            conn, timing = await _timed(host, port, conn, request)
            if timing is None:
                errors += 1
                continue
            firsts.append(timing[0])
            # From the first bytes to the last ones: how the proxy spreads the chunks that
            # the upstream wrote at once (the client's own scheduling is left out).
            per_chunk.append(max(0.0, timing[2] - timing[0]) / max(1, chunks))
        conn.close()

    t0 = now()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(connections))),
                           duration + 40)
    elapsed = now() - t0
    return {"streams_per_s": len(firsts) / elapsed, "ttfb_ms": summary(firsts),
            "per_chunk_ms": summary(per_chunk), "errors": errors, "done": len(firsts)}


async def hold(host: str, port: int, request: bytes, count: int, max_hold: float
               ) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    conns: list[_Connection] = []
    firsts: list[asyncio.Future[int]] = []
    dones: list[asyncio.Future[int]] = []
    sem = asyncio.Semaphore(100)
    t0 = now()

    async def open_one() -> None:
        async with sem:
            conn = await connect(host, port)
            first: asyncio.Future[int] = loop.create_future()

            def seen() -> None:
                if not first.done():
                    first.set_result(0)

            conns.append(conn)
            firsts.append(first)
            dones.append(conn.send(request, on_data=seen))
            await asyncio.wait([first, dones[-1]], return_when=asyncio.FIRST_COMPLETED)

    opened = await asyncio.gather(*(open_one() for _ in range(count)), return_exceptions=True)
    failed_open = sum(isinstance(r, BaseException) for r in opened)
    ready = sum(f.done() for f in firsts)
    still_open = sum(not d.done() for d in dones)
    ramp = now() - t0
    print(f"READY {ready} {still_open}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.readline(), max_hold)
    for conn in conns:
        conn.close()
    for d in dones:
        if not d.done():
            d.cancel()
        elif not d.cancelled():
            d.exception()  # a stream that failed (counted by `ready`): seen, not an orphan
    return {"ready": ready, "open_at_ready": still_open, "failed_open": failed_open,
            "ramp_s": ramp}


def session_body(model: str, tag: str, number: int, turn: int, pin: bool) -> bytes:
    messages: list[dict[str, str]] = [{
        "role": "user",
        "content": f"[{tag}-{number}] A long shared document, then a question about it."}]
    for k in range(1, turn + 1):
        messages.append({"role": "assistant", "content": f"Answer {k}."})
        messages.append({"role": "user", "content": f"Follow-up question {k}."})
    body: dict[str, object] = {"model": model, "stream": True, "messages": messages}
    if pin:
        body["session_id"] = f"bench-{tag}-{number}"
    return orjson.dumps(body)


async def sessions(host: str, port: int, key: str | None, model: str, count: int, turns: int,
                   tag: str, pin: bool) -> dict[str, object]:
    firsts: list[float] = []
    by_turn: list[list[float]] = [[] for _ in range(turns)]
    errors = 0

    async def one(number: int) -> None:
        nonlocal errors
        await asyncio.sleep(number * 0.002)  # spread the starts: the route's rotation interleaves
        conn = await connect(host, port)
        for turn in range(turns):
            request = build_request(host, port, "/v1/chat/completions",
                                    session_body(model, tag, number, turn, pin), key)
            conn, timing = await _timed(host, port, conn, request)
            if timing is None:
                errors += 1
            else:
                firsts.append(timing[0])
                by_turn[turn].append(timing[0])
        conn.close()

    await asyncio.gather(*(one(n) for n in range(count)))
    later = [x for t in by_turn[1:] for x in t]
    return {"ttfb_ms": summary(firsts), "later_ms": summary(later),
            "by_turn_ms": [summary(t) for t in by_turn], "errors": errors}


_BACKEND = re.compile(rb"\r\nx-router-backend:[ \t]*([^\r]*)")
SYSTEM_WORDS = 1600  # ~2,000 tokens of system prompt shared by many conversations
DOCUMENT_WORDS = 500  # each conversation's own opening document


def affinity_body(model: str, tag: str, number: int, turn: int, systems: int,
                  pin: bool) -> bytes:
    """Turn `turn` of conversation `number`: a shared system prompt, its own document and
    question, then the turns so far."""
    system = f"[{tag} system {number % systems}] " + "Follow the house style. " * (
        SYSTEM_WORDS // 4)
    document = f"[{tag}-{number}] " + f"Section {number}: facts and figures. " * (
        DOCUMENT_WORDS // 5)
    messages: list[dict[str, str]] = [{"role": "system", "content": system},
                                      {"role": "user", "content": document + " Summarise it."}]
    for k in range(1, turn + 1):
        messages.append({"role": "assistant", "content": f"Answer {k}: " + "words " * 60})
        messages.append({"role": "user", "content": f"Follow-up question {k} on the document."})
    body: dict[str, object] = {"model": model, "stream": True, "messages": messages}
    if pin:
        body["session_id"] = f"bench-{tag}-{number}"
    return orjson.dumps(body)


async def affinity(host: str, ports: list[int], key: str | None, model: str, count: int,
                   turns: int, systems: int, arrivals: float, think_s: float, tag: str,
                   pin: bool, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    starts = []
    t = 0.0
    for _ in range(count):
        t += rng.expovariate(arrivals)
        starts.append(t)
    firsts: list[float] = []
    later: list[float] = []
    placed: list[list[tuple[int, str]]] = [[] for _ in range(count)]  # (replica, backend)
    errors = 0

    async def one(number: int) -> None:
        nonlocal errors
        crng = random.Random(seed * 1000 + number)
        await asyncio.sleep(starts[number])
        conns: dict[int, _Connection] = {}
        for turn in range(turns):
            if turn:
                await asyncio.sleep(crng.expovariate(1 / think_s))
            replica = crng.randrange(len(ports))
            port = ports[replica]
            conn = conns.get(replica) or await connect(host, port)
            request = build_request(host, port, "/v1/chat/completions",
                                    affinity_body(model, tag, number, turn, systems, pin), key)
            used = conn
            conn, timing = await _timed(host, port, conn, request)
            conns[replica] = conn
            if timing is None:
                errors += 1
                continue
            (firsts if turn == 0 else later).append(timing[0])
            match = _BACKEND.search(b"\r\n" + used.head)
            placed[number].append((replica, match.group(1).decode() if match else "?"))
        for c in conns.values():
            c.close()

    await asyncio.gather(*(one(n) for n in range(count)))
    return {"ttfb_ms": summary(firsts + later), "first_ms": summary(firsts),
            "later_ms": summary(later), "placed": placed, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.bench.client")
    parser.add_argument("mode", choices=["openloop", "closed", "ttfb", "streams", "hold",
                                         "sessions", "affinity"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--key")
    parser.add_argument("--model", default="bench-fast")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--max-hold", type=float, default=60)
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--tag", default="s")
    parser.add_argument("--pin", action="store_true")
    parser.add_argument("--chunks", type=int, default=20,
                        help="streams: token chunks per answer (the per-chunk figure)")
    parser.add_argument("--ports", help="affinity: the router replicas' ports, comma-separated")
    parser.add_argument("--systems", type=int, default=4)
    parser.add_argument("--arrivals", type=float, default=10.0)
    parser.add_argument("--think-ms", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    body = orjson.dumps({"model": args.model, "stream": args.stream,
                         "messages": [{"role": "user", "content": "Say hello."}]})
    request = build_request(args.host, args.port, args.path, body, args.key)
    import uvloop

    match args.mode:
        case "openloop":
            coro = open_loop(args.host, args.port, request, args.rate, args.duration,
                             args.warmup)
        case "closed":
            coro = closed_loop(args.host, args.port, request, args.connections, args.duration)
        case "ttfb":
            coro = ttfb(args.host, args.port, request, args.count)
        case "streams":
            coro = streams(args.host, args.port, request, args.connections, args.duration,
                           args.chunks)
        case "affinity":
            ports = [int(p) for p in (args.ports or str(args.port)).split(",")]
            coro = affinity(args.host, ports, args.key, args.model, args.sessions, args.turns,
                            args.systems, args.arrivals, args.think_ms / 1000, args.tag,
                            args.pin, args.seed)
        case "sessions":
            coro = sessions(args.host, args.port, args.key, args.model, args.sessions,
                            args.turns, args.tag, args.pin)
        case _:
            coro = hold(args.host, args.port, request, args.count, args.max_hold)
    # Bounded runs: a collector pause in the generator would show up as server latency.
    gc.disable()
    result = uvloop.run(coro)
    print(orjson.dumps(result).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
