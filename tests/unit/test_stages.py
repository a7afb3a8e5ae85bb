"""The pipeline's contract: stages in order, each stage's end once the answer has ended (the
last stage's first, only for stages that ran, even when one of them fails), and the headers
gathered so far on an error answer. A leaked end is a concurrency slot or a gauge never given
back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, cast

import pytest
from aiohttp import web

from router.call import Call
from router.errors import BadRequest
from router.stages import Pipeline, Stage
from router.state import ANSWER_HEADERS


class Step(Stage):
    def __init__(self, name: str, log: list[str], *, wait: bool = False,
                 fail: bool = False, end_fails: bool = False) -> None:
        self.name, self.log, self.wait, self.fail, self.end_fails = \
            name, log, wait, fail, end_fails

    def __call__(self, call: Call) -> Awaitable[None] | None:
        if self.fail:
            raise BadRequest(f"{self.name} refused")
        call.headers[self.name] = "1"
        if not self.wait:
            self.log.append(f"run {self.name}")
            return None
        return self._later()

    async def _later(self) -> None:
        await asyncio.sleep(0)
        self.log.append(f"run {self.name} (waited)")

    def end(self, call: Call) -> None:
        self.log.append(f"end {self.name}")
        if self.end_fails:
            raise RuntimeError("a bug in an end")


class Quiet(Stage):
    """A stage without an end."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __call__(self, call: Call) -> None:
        self.log.append("run quiet")


def a_call() -> Call:
    request = cast(Any, {})
    return Call(request, cast(Any, None), cast(Any, None), "rid", cast(Any, None), "chat")


async def answer(call: Call) -> web.StreamResponse:
    return web.Response(text="ok")


async def test_stages_run_in_order_and_end_last_first():
    log: list[str] = []
    pipeline = Pipeline([Step("a", log), Quiet(log), Step("b", log, wait=True)], answer)
    resp = await pipeline(a_call())
    assert resp.status == 200
    assert log == ["run a", "run quiet", "run b (waited)", "end b", "end a"]


async def test_only_stages_that_ran_end_and_the_error_carries_the_headers_so_far():
    log: list[str] = []
    call = a_call()
    pipeline = Pipeline([Step("a", log), Step("b", log, fail=True), Step("c", log)], answer)
    with pytest.raises(BadRequest):
        await pipeline(call)
    assert log == ["run a", "end a"]
    assert call.request[ANSWER_HEADERS] == {"a": "1"}


async def test_a_failing_end_does_not_keep_the_others_from_running(caplog):
    log: list[str] = []
    pipeline = Pipeline([Step("a", log), Step("b", log, end_fails=True), Step("c", log)],
                        answer)
    await pipeline(a_call())
    assert log == ["run a", "run b", "run c", "end c", "end b", "end a"]
    assert "the end of stage Step failed" in caplog.text


async def test_a_cancelled_request_still_ends_every_stage_that_ran():
    log: list[str] = []
    entered = asyncio.Event()

    async def hang(call: Call) -> web.StreamResponse:
        entered.set()
        await asyncio.sleep(3600)
        raise AssertionError("not reached")

    task = asyncio.ensure_future(Pipeline([Step("a", log), Step("b", log)], hang)(a_call()))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["run a", "run b", "end b", "end a"]
