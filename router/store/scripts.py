"""How the Redis store's script calls travel: by EVALSHA, with one EVAL more for a script the
server lacks (NOSCRIPT), and the calls of one event-loop turn sent together as one pipeline (on
the lean link of resp.py for a plain redis:// store). A driver's error ends here, as StoreError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from redis.exceptions import NoScriptError, RedisError
from redis.typing import EncodableT

from router.store.base import StoreError
from router.store.resp import Command, RespLink
from router.tasks import spawn

Script = tuple[str, str]  # (sha1, source): run by EVALSHA, by EVAL on NOSCRIPT
ScriptCall = tuple[Script, list[str], list[EncodableT]]  # (script, keys, args)
# Sends commands in one round trip: their replies in order, a server error as its exception.
Send = Callable[[list[Command]], Awaitable[list[Any]]]


def _evalsha(call: ScriptCall) -> Command:
    (sha, _), keys, args = call
    return ("EVALSHA", sha, len(keys), *keys, *args)


def _eval(call: ScriptCall) -> Command:
    (_, lua), keys, args = call
    return ("EVAL", lua, len(keys), *keys, *args)


async def run_scripts(send: Send, calls: Sequence[ScriptCall]) -> list[Any]:
    """The replies to script calls, sent by EVALSHA in one round trip. A script the server
    lacks (NOSCRIPT: first use, a restarted or flushed Redis) costs one more: its calls go
    again as EVAL, which also caches it for the next EVALSHA. Should that round trip fail,
    its calls get the failure, the others keep their replies."""
    replies = await send([_evalsha(call) for call in calls])
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        try:
            again = await send([_eval(calls[i]) for i in missing])
        except (RedisError, OSError) as exc:
            again = [exc] * len(missing)
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
    return replies


class ScriptBatch:
    """Script calls made in the same event-loop turn leave together, as one pipeline: one
    write and one read for all of them. redis-py costs ~100 µs of CPU per command; at 64
    concurrent requests a batch spreads that over many admissions and settlements."""

    def __init__(self, redis: Any, link: RespLink | None = None) -> None:
        self._redis = redis
        self._link = link  # a plain redis:// store: the lean connection (resp.py)
        self._pending: list[tuple[ScriptCall, asyncio.Future[Any]]] = []

    @property
    def bounded(self) -> bool:
        """Every call is bounded without a timer of its own: the lean link is up, and it drops
        the connection (failing what waits) when a reply is overdue by the store timeout."""
        return self._link is not None and self._link.connected

    def call(self, script: Script, keys: list[str],
             args: list[EncodableT]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append(((script, keys, args), future))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if self._link is not None and self._link.connected:
            # The lean link: written now, each reply settles its call from the protocol.
            self._link.send([_evalsha(call) for call, _ in batch],
                            [partial(self._replied, entry) for entry in batch])
            return
        spawn(self._run(batch), "store-batch")

    def _replied(self, entry: tuple[ScriptCall, asyncio.Future[Any]], result: Any) -> None:
        if isinstance(result, NoScriptError):  # the script is missing: run_scripts loads it
            spawn(self._run([entry]), "store-script-load")
        else:
            resolve(entry[1], result)

    async def _run(self, batch: list[tuple[ScriptCall, asyncio.Future[Any]]]) -> None:
        send = self._link.execute if self._link is not None else self._pipelined
        try:
            replies = await run_scripts(send, [call for call, _ in batch])
        except (RedisError, OSError) as exc:
            replies = [exc] * len(batch)
        for (_, future), reply in zip(batch, replies, strict=True):
            resolve(future, reply)

    async def _pipelined(self, commands: list[Command]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


def resolve(future: asyncio.Future[Any], result: Any) -> None:
    """Hand a call its reply: a value, or a failure (a driver's error as StoreError)."""
    if future.done():  # its caller gave up (timeout, client gone)
        return
    if isinstance(result, (RedisError, OSError)):  # the driver's errors stop here
        future.set_exception(StoreError(f"the store failed ({type(result).__name__})"))
    elif isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def quiet(future: asyncio.Future[Any]) -> None:
    """Nobody awaits this reply any more: retrieve its error so asyncio does not report it."""
    if not future.cancelled():
        future.exception()
