"""The access log's writes: whole lines, at most PIPE_BUF bytes each (workers share stderr),
and nothing left behind once the worker stopped."""

from __future__ import annotations

import asyncio
import select

import orjson

from router.access_log import AccessLog
from router.config.model import LoggingConfig


def fields(n: int, pad: int = 0) -> dict[str, object]:
    return {"request_id": f"r{n}", "path": "/v1/chat/completions", "note": "x" * pad}


async def test_a_batch_goes_out_in_whole_lines_no_longer_than_pipe_buf() -> None:
    writes: list[bytes] = []
    log = AccessLog(LoggingConfig(), plain_paths=["/v1/chat/completions"], out=writes.append)
    for n in range(100):
        log.write(fields(n, pad=300))
    log.write(fields(100, pad=2 * select.PIPE_BUF))  # one line longer than PIPE_BUF: alone
    log.flush()
    assert len(writes) > 1
    for data in writes:
        assert data.endswith(b"\n")
        assert len(data) <= select.PIPE_BUF or data.count(b"\n") == 1
    lines = b"".join(writes).splitlines()
    assert [orjson.loads(line)["request_id"] for line in lines] == [f"r{n}" for n in range(101)]


async def test_lines_wait_briefly_then_go_and_after_close_go_at_once() -> None:
    writes: list[bytes] = []
    log = AccessLog(LoggingConfig(), out=writes.append)
    log.write(fields(1))
    assert writes == []  # buffered for company
    await asyncio.sleep(0.2)
    assert len(writes) == 1
    log.write(fields(2))
    log.close()  # the worker stops: what waits goes now
    assert len(writes) == 2
    log.write(fields(3))  # a request that outlived the shutdown's wait
    assert len(writes) == 3


def test_paths_not_the_routers_own_are_redacted() -> None:
    log = AccessLog(LoggingConfig(), plain_paths=["/v1/models"])
    assert log.path("/v1/models") == "/v1/models"
    secret = "sk-" + "c" * 40
    assert secret not in log.path(f"/v1/{secret}/x")
