"""The `floor` peer of `router bench --peers`: the router's own transport with none of its logic.

An aiohttp application whose one handler relays every POST to the fast upstream through the
router's upstream client (router/upstream_lean.py) and hands the answer back: a JSON answer read
whole, a stream written on as it arrives. No authentication, validation, routing, limits,
metrics or log. Its cost per request is what the router's framework and client take by
themselves, so the router cannot do better than it, and its ratio to LiteLLM is the ceiling of
any ratio the router can reach on this stack.

Run as its own process: `python -m router.bench.floor_peer PORT UPSTREAM_PORT`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web

from router.bench.harness import ROUTER_CPU, Machine, Processes, wait_ready
from router.bench.peer_process import Started
from router.bench.redis_server import free_port
from router.upstream import Timeouts
from router.upstream_lean import LeanUpstream

TIMEOUTS = Timeouts(connect_s=5.0, total_s=300.0, idle_s=120.0)
CLIENT = web.AppKey("client", LeanUpstream)
UPSTREAM = web.AppKey("upstream", str)


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {"Content-Type": "application/json",
               "Authorization": request.headers.get("Authorization", "")}
    answer = await request.app[CLIENT].post(request.app[UPSTREAM] + request.path, headers, body,
                                            TIMEOUTS)
    content_type = answer.headers.get("Content-Type", "application/json")
    try:
        if not content_type.startswith("text/event-stream"):
            chunks = [chunk async for chunk in answer.iter_chunks()]
            return web.Response(body=b"".join(chunks), status=answer.status,
                                headers={"Content-Type": content_type})
        resp = web.StreamResponse(status=answer.status,
                                  headers={"Content-Type": content_type,
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        async for chunk in answer.iter_chunks():
            await resp.write(chunk)
        await resp.write_eof()
        return resp
    finally:
        answer.close()


def app(upstream_port: int) -> web.Application:
    application = web.Application()
    application[UPSTREAM] = f"http://127.0.0.1:{upstream_port}"

    async def client(application: web.Application):  # type: ignore[no-untyped-def]
        application[CLIENT] = LeanUpstream(max_connections=20_000, max_per_host=20_000)
        yield
        await application[CLIENT].close()

    application.cleanup_ctx.append(client)
    application.router.add_post("/{tail:.*}", relay)
    return application


def start_floor(procs: Processes, machine: Machine, tmp: Path, upstream_port: int) -> Started:
    """The floor on the router's CPU; RuntimeError when it does not answer."""
    port = free_port()
    log = tmp / "floor.log"
    with log.open("wb") as err:
        proc = procs.start(machine.on(ROUTER_CPU, [sys.executable, "-m",
                                                   "router.bench.floor_peer", str(port),
                                                   str(upstream_port)]),
                           stdout=err, stderr=err)
    wait_ready(proc, port, [log], 30)
    return Started(proc, port, "aiohttp + router/upstream_lean.py", log)


def main(argv: list[str]) -> int:
    import asyncio

    import uvloop

    from router.server import settle_heap

    port, upstream_port = int(argv[0]), int(argv[1])
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    settle_heap()  # the router's collector settings, so that they are no difference either
    web.run_app(app(upstream_port), host="127.0.0.1", port=port, access_log=None, print=None,
                backlog=4096)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
