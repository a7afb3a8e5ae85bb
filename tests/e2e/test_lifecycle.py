"""`router serve` as a process: it serves, reloads (file change, SIGHUP), refuses bad edits,
drains on SIGTERM, runs N workers on one port, and fails start-up cleanly on a bad config."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml

from tests.conftest import KEY, USER_MSG, eventually, openai_provider, router_config
from tests.e2e.conftest import children_of, pid_alive

AUTH = {"Authorization": f"Bearer {KEY}"}
SLOW = "chunks:20+gap:0.1"  # 20 tokens over about 2 s


def e2e_config(up: Any, routes: dict[str, str], **server: Any) -> dict[str, Any]:
    """Routes name -> fake upstream model string; info logs so the tests can read them."""
    return router_config(
        {"up": openai_provider(up, probe=False)},
        {name: {"backends": [{"provider": "up", "model": model}]}
         for name, model in routes.items()},
        server=server, logging={"level": "info", "format": "text"})


def yaml_text(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def client(**kwargs: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), **kwargs)


async def chat_status(http: aiohttp.ClientSession, url: str, model: str) -> int:
    async with http.post(f"{url}/v1/chat/completions", headers=AUTH,
                         json={"model": model, "messages": USER_MSG}) as resp:
        await resp.read()
        return resp.status


async def serves(http: aiohttp.ClientSession, url: str, model: str) -> bool:
    return await chat_status(http, url, model) == 200


def sse_events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


async def test_serves_the_openai_sdk_and_stops_on_sigterm(fakes, router_process):
    up = await fakes("up")
    rp = await router_process(e2e_config(up, {"m": "gpt-x"}))
    async with openai.AsyncOpenAI(base_url=f"{rp.url}/v1", api_key=KEY, max_retries=0,
                                  timeout=20) as sdk:
        answer = await sdk.chat.completions.create(model="m", messages=USER_MSG)
        assert answer.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
        stream = await sdk.chat.completions.create(model="m", messages=USER_MSG, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "tok0 tok1 tok2 tok3 tok4 "
        models = await sdk.models.list()
        assert [m.id for m in models.data] == ["m"]
    async with client() as http:
        for path in ("/healthz", "/readyz", "/openapi.json"):
            async with http.get(rp.url + path) as resp:
                assert resp.status == 200, path
    assert [s.body["model"] for s in up.seen] == ["gpt-x", "gpt-x"]
    rp.send(signal.SIGTERM)
    assert await rp.wait_exit(10) == 0
    log = rp.log()
    assert "Traceback" not in log
    assert "stopped" in log


async def test_file_change_reloads_and_bad_edits_are_refused(fakes, router_process):
    up = await fakes("up")
    good = e2e_config(up, {"m": "gpt-x"}, reload_poll_s=0.2)
    rp = await router_process(good)
    async with client() as http:
        assert await chat_status(http, rp.url, "m2") == 404

        # A good edit adds a route that then works.
        rp.write_config(e2e_config(up, {"m": "gpt-x", "m2": "gpt-y"}, reload_poll_s=0.2))
        await eventually(lambda: serves(http, rp.url, "m2"), 10, "route m2")
        await rp.wait_log("config reloaded (file changed)")
        assert up.seen[-1].body["model"] == "gpt-y"

        # Bad edits (each would also drop m2) are refused while traffic keeps flowing.
        statuses: list[int] = []
        stop = asyncio.Event()

        async def traffic() -> None:
            while not stop.is_set():
                statuses.append(await chat_status(http, rp.url, "m2"))
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(traffic())
        misspelled = e2e_config(up, {"m": "gpt-x"}, reload_poll_s=0.2)
        misspelled["routes"]["m"]["stratgy"] = "random"
        good_text = yaml_text(e2e_config(up, {"m": "gpt-x"}, reload_poll_s=0.2))
        unset = good_text.replace("gpt-x", "${ROUTER_E2E_UNSET_MODEL}")
        edits: list[tuple[dict[str, Any] | str, str]] = [
            (misspelled, "routes.m.stratgy: unknown key (line "),
            (good_text[: len(good_text) // 2] + "\n  - {oops", "invalid YAML"),
            (unset, "environment variable ROUTER_E2E_UNSET_MODEL is not set"),
            ("", "providers: Field required"),
        ]
        try:
            for n, (edit, problem) in enumerate(edits, start=1):
                rp.write_config(edit)
                log = await rp.wait_log("refused; the old config keeps serving", count=n)
                assert problem in log
                await asyncio.sleep(0.3)  # a few more requests on the old config
        finally:
            stop.set()
            await task
        assert len(statuses) >= 10
        assert set(statuses) == {200}, statuses

        # The watcher survived the refusals: a good edit still applies.
        rp.write_config(e2e_config(up, {"m3": "gpt-z"}, reload_poll_s=0.2))
        await eventually(lambda: serves(http, rp.url, "m3"), 10, "route m3")
        assert await chat_status(http, rp.url, "m2") == 404
    assert "Traceback" not in rp.log()


async def test_sighup_reloads(fakes, router_process):
    up = await fakes("up")
    rp = await router_process(e2e_config(up, {"m": "gpt-x"}, reload_poll_s=0))
    async with client() as http:
        rp.write_config(e2e_config(up, {"m": "gpt-x", "m2": "gpt-y"}, reload_poll_s=0))
        await asyncio.sleep(0.3)
        assert await chat_status(http, rp.url, "m2") == 404  # no file watching: waits for HUP
        rp.send(signal.SIGHUP)
        await eventually(lambda: serves(http, rp.url, "m2"), 10, "route m2")
        await rp.wait_log("config reloaded (SIGHUP)")

        rp.write_config("routes: [unclosed\n")
        rp.send(signal.SIGHUP)
        await rp.wait_log("config reload (SIGHUP) refused")
        assert await chat_status(http, rp.url, "m2") == 200
        assert rp.proc.returncode is None
    rp.send(signal.SIGTERM)
    assert await rp.wait_exit(10) == 0


async def test_sigterm_drains_in_flight_work_then_exits_0(fakes, router_process):
    up = await fakes("up")
    grace = 10
    rp = await router_process(e2e_config(up, {"slow": SLOW, "json": "first-byte:1"},
                                         shutdown_grace_s=grace))
    # One kept-alive connection for the readiness probe, opened before the signal.
    probe = client(connector=aiohttp.TCPConnector(limit=1))
    async with probe, client() as http:
        async with probe.get(rp.url + "/readyz") as resp:
            assert resp.status == 200
            await resp.read()
        body = {"model": "slow", "messages": USER_MSG, "stream": True}
        async with http.post(f"{rp.url}/v1/chat/completions", json=body, headers=AUTH) as resp:
            assert resp.status == 200
            first = await resp.content.readuntil(b"\n\n")

            async def json_request() -> tuple[int, bytes]:
                async with http.post(f"{rp.url}/v1/chat/completions", headers=AUTH,
                                     json={"model": "json", "messages": USER_MSG}) as r:
                    return r.status, await r.read()

            json_task = asyncio.ensure_future(json_request())
            await eventually(lambda: len(up.seen) == 2, 10, "the JSON request at the upstream")

            rp.send(signal.SIGTERM)
            signalled = time.monotonic()

            async def draining() -> bool:
                async with probe.get(rp.url + "/readyz") as r:
                    await r.read()
                    return r.status == 503

            await eventually(draining, 5, "/readyz 503 on the kept-alive connection")

            async def refused() -> bool:
                try:
                    async with client(connector=aiohttp.TCPConnector(force_close=True)) as fresh, \
                            fresh.get(rp.url + "/healthz") as r:
                        await r.read()
                        return False
                except aiohttp.ClientConnectorError:
                    return True

            await eventually(refused, 5, "new connections to be refused")
            rest = await resp.content.read()
    raw = first + rest
    events = sse_events(raw)
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b"event: error" not in raw
    text = "".join(orjson.loads(e[6:])["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1] if e.startswith(b"data: {"))
    assert text == "".join(f"tok{i} " for i in range(20))
    status, payload = await json_task
    assert status == 200 and orjson.loads(payload)["object"] == "chat.completion"
    assert await rp.wait_exit(grace + 5 - (time.monotonic() - signalled)) == 0
    log = rp.log()
    assert "draining" in log and "Traceback" not in log
    assert "grace over" not in log


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_answers_readyz_503_while_serving_before_the_listener_closes(
        fakes, router_process, workers):
    up = await fakes("up")
    delay, grace = 2.0, 3
    rp = await router_process(e2e_config(up, {"m": "gpt-x"}, drain_delay_s=delay,
                                         shutdown_grace_s=grace), "--workers", str(workers))
    if workers > 1:
        await rp.wait_log("listening on", count=workers)
    fresh = aiohttp.TCPConnector(force_close=True)  # a new connection for every request
    seen: list[tuple[float, str]] = []  # (seconds after SIGTERM, readyz status or "refused")
    served_while_draining = 0
    async with client(connector=fresh) as http:
        rp.send(signal.SIGTERM)
        signalled = time.monotonic()
        while time.monotonic() - signalled < delay + grace + 5:
            try:
                async with http.get(rp.url + "/readyz") as resp:
                    await resp.read()
                    seen.append((time.monotonic() - signalled, str(resp.status)))
                if resp.status == 503 and await chat_status(http, rp.url, "m") == 200:
                    served_while_draining += 1
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                # Refused; or reset: a connection the kernel queued as the listener closed.
                seen.append((time.monotonic() - signalled, "refused"))
                break
            await asyncio.sleep(0.05)
    statuses = [s for _, s in seen]
    assert statuses[-1] == "refused", seen
    assert "503" in statuses, seen  # a load balancer could see it ...
    assert statuses.index("503") < statuses.index("refused")  # ... before connections fail
    assert set(statuses[statuses.index("503"):-1]) == {"503"}, seen
    assert served_while_draining >= 3  # new requests were still served meanwhile
    assert seen[-1][0] >= delay - 0.5, seen  # the listener stayed open for the delay
    assert await rp.wait_exit(delay + grace + 5 - (time.monotonic() - signalled)) == 0
    assert "Traceback" not in rp.log()


async def raw_chat(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, model: str,
                   stream: bool = False) -> str:
    """POST a chat completion on a kept-alive connection; the answer's head, lower-cased."""
    body = orjson.dumps({"model": model, "messages": USER_MSG, "stream": stream})
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode().lower()


async def test_while_draining_kept_alive_connections_are_told_to_close(fakes, router_process):
    """A load balancer that balances connections (kube-proxy for a Service) leaves a kept-alive
    client on a draining replica: from SIGTERM on, each answer, JSON or stream, says
    `Connection: close` and its connection ends, so the client's next request opens a new
    connection, to a replica that stays, instead of finding this one gone."""
    up = await fakes("up")
    rp = await router_process(e2e_config(up, {"m": "gpt-x", "s": "chunks:3+gap:0.05"},
                                         drain_delay_s=2.0))
    json_conn = await asyncio.open_connection("127.0.0.1", rp.port)
    stream_conn = await asyncio.open_connection("127.0.0.1", rp.port)
    try:
        head = await raw_chat(*json_conn, "m")
        assert head.startswith("http/1.1 200") and "connection: close" not in head
        length = int(head.split("content-length: ")[1].split("\r\n")[0])
        await json_conn[0].readexactly(length)  # the connection stays open for the next

        rp.send(signal.SIGTERM)
        async with client(connector=aiohttp.TCPConnector(force_close=True)) as http:
            async def draining() -> bool:
                async with http.get(rp.url + "/readyz") as r:
                    return r.status == 503
            await eventually(draining, 5, "/readyz 503")

        for (reader, writer), stream in ((json_conn, False), (stream_conn, True)):
            head = await raw_chat(reader, writer, "s" if stream else "m", stream)
            assert head.startswith("http/1.1 200") and "connection: close" in head, head
            rest = await asyncio.wait_for(reader.read(), 5)  # to the end: the router closed
            assert (b"data: [DONE]" in rest) if stream else b'"chat.completion"' in rest
    finally:
        for _, writer in (json_conn, stream_conn):
            writer.close()
    assert await rp.wait_exit(10) == 0


async def test_a_second_sigterm_cuts_the_drain_delay_short(fakes, router_process):
    up = await fakes("up")
    rp = await router_process(e2e_config(up, {"m": "gpt-x"}, drain_delay_s=60))
    rp.send(signal.SIGTERM)
    async with client() as http:
        async def draining() -> bool:
            async with http.get(rp.url + "/readyz") as r:
                return r.status == 503
        await eventually(draining, 5, "/readyz 503")
    await asyncio.sleep(1.1)  # past the window in which a repeat is the same stop
    rp.send(signal.SIGTERM)
    assert await rp.wait_exit(10) == 0


async def test_the_same_sigterm_delivered_twice_keeps_the_drain_delay(fakes, router_process):
    """A service manager that signals every process of the group, and a supervisor forwarding
    its own copy, deliver one stop twice: the delay must hold."""
    up = await fakes("up")
    delay = 2.0
    rp = await router_process(e2e_config(up, {"m": "gpt-x"}, drain_delay_s=delay))
    rp.send(signal.SIGTERM)
    rp.send(signal.SIGTERM)
    signalled = time.monotonic()
    async with client() as http:
        async def draining() -> bool:
            async with http.get(rp.url + "/readyz") as r:
                return r.status == 503
        await eventually(draining, 5, "/readyz 503")
        async with http.post(f"{rp.url}/v1/chat/completions", headers=AUTH,
                             json={"model": "m", "messages": USER_MSG}) as resp:
            assert resp.status == 200  # still serving during the delay
    assert await rp.wait_exit(delay + 10) == 0
    assert time.monotonic() - signalled >= delay - 0.5


async def test_stream_longer_than_the_grace_ends_with_one_error_event(fakes, router_process):
    up = await fakes("up")
    grace = 1
    rp = await router_process(e2e_config(up, {"long": "chunks:100+gap:0.1"},
                                         shutdown_grace_s=grace))
    async with client() as http:
        body = {"model": "long", "messages": USER_MSG, "stream": True}
        async with http.post(f"{rp.url}/v1/chat/completions", json=body, headers=AUTH) as resp:
            assert resp.status == 200
            first = await resp.content.readuntil(b"\n\n")
            rp.send(signal.SIGTERM)
            signalled = time.monotonic()
            rest = await resp.content.read()  # a clean end: no payload error raised here
            ended = time.monotonic() - signalled
    raw = first + rest
    events = sse_events(raw)
    errors = [e for e in events if e.startswith(b"event: error")]
    assert len(errors) == 1 and events[-1] == errors[0]
    assert b"[DONE]" not in raw
    error = orjson.loads(errors[0].split(b"data: ", 1)[1])["error"]
    assert "shutting down" in error["message"]
    for event in events[:-1]:  # whole events before it, as the upstream sent them
        assert event.startswith(b"data: {") and orjson.loads(event[6:])["choices"]
    assert 1 < len(events) < 100
    assert grace - 0.2 <= ended < grace + 4
    assert await rp.wait_exit(grace + 5) == 0
    assert "grace over" in rp.log()
    await eventually(lambda: up.seen[0].t_disconnected is not None, 5, "the upstream closed")
    assert up.seen[0].t_finished is None


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _server_side_inodes(port: int) -> dict[int, str]:
    """client port -> inode of the router's accepted socket for that connection."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == port:
                out[int(remote.rsplit(":", 1)[1], 16)] = inode
    return out


async def test_two_workers_serve_one_port_and_stop_on_sigterm(fakes, router_process):
    up = await fakes("up")
    rp = await router_process(e2e_config(up, {"m": "gpt-x"}), "--workers", "2")
    log = await rp.wait_log(f"listening on http://127.0.0.1:{rp.port}", count=2)
    workers = await eventually(lambda: len(rp.children()) == 2 and rp.children(), 10,
                               "two worker processes")
    listening = {int(line.rsplit("(pid ", 1)[1].rstrip(")"))
                 for line in log.splitlines() if "listening on" in line}
    assert listening == set(workers)

    # Fresh connections are spread over both workers: find which process holds each one.
    served_by: set[int] = set()
    open_writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(48):
            reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
            open_writers.append(writer)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: router\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            client_port = writer.get_extra_info("sockname")[1]
            inode = _server_side_inodes(rp.port).get(client_port)
            for pid in workers:
                if inode is not None and inode in _socket_inodes(pid):
                    served_by.add(pid)
            if served_by == set(workers):
                break
    finally:
        for writer in open_writers:
            writer.close()
    assert served_by == set(workers)
    async with client() as http:
        assert {await chat_status(http, rp.url, "m") for _ in range(6)} == {200}

    rp.send(signal.SIGTERM)
    assert await rp.wait_exit(10) == 0
    assert not [pid for pid in workers if pid_alive(pid)]
    assert children_of(rp.pid) == []
    log = rp.log()
    assert log.count("router.server: stopped") == 2
    assert "Traceback" not in log


async def test_unset_variable_fails_start_up_naming_it(router_process):
    config = router_config(
        {"a": {"type": "openai", "base_url": "http://127.0.0.1:9/v1",
               "api_key": "${ROUTER_E2E_NEIGHBOUR}"},
         "b": {"type": "openai", "base_url": "http://127.0.0.1:9/v1",
               "api_key": "${ROUTER_E2E_UNSET_KEY}"}},
        {"m": {"backends": [{"provider": "a", "model": "x"}, {"provider": "b", "model": "y"}]}})
    canary = "neighbour-canary-31337"
    rp = await router_process(config, env={"ROUTER_E2E_NEIGHBOUR": canary}, ready=False)
    code = await rp.wait_exit(20)
    log = rp.log()
    assert code != 0
    assert "ROUTER_E2E_UNSET_KEY" in log
    assert "providers.b.api_key" in log
    assert canary not in log
    assert "Traceback" not in log
