"""The access log of a `router serve` process: lines reach stderr in batches, and none is lost
when it stops."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import orjson

from tests.conftest import KEY, USER_MSG, eventually, openai_provider, router_config


async def test_lines_reach_stderr_soon_and_all_of_them_by_exit(fakes, router_process):
    """`router serve` writes its lines in batches: within a fraction of a second while it
    runs, and every one before it exits."""
    up = await fakes("up")
    cfg = router_config({"up": openai_provider(up)},
                        {"m": {"backends": [{"provider": "up", "model": "gpt-x"}]}},
                        logging={"level": "info", "format": "json", "access_log": True})
    rp = await router_process(cfg)

    def logged() -> list[dict[str, object]]:  # the chat requests' lines (not the probes')
        return [entry for line in rp.log().splitlines() if line.startswith("{")
                and (entry := orjson.loads(line))["logger"] == "router.access"
                and entry["path"] == "/v1/chat/completions"]
    async with aiohttp.ClientSession() as http:
        for n in range(3):
            async with http.post(f"{rp.url}/v1/chat/completions",
                                 json={"model": "m", "messages": USER_MSG},
                                 headers={"Authorization": f"Bearer {KEY}",
                                          "x-request-id": f"req-{n}"}) as resp:
                assert resp.status == 200
        await eventually(lambda: len(logged()) == 3, 2, "three lines on stderr")
        tasks = [http.post(f"{rp.url}/v1/chat/completions",
                           json={"model": "m", "messages": USER_MSG},
                           headers={"Authorization": f"Bearer {KEY}"}) for _ in range(20)]
        for resp in await asyncio.gather(*tasks):
            assert resp.status == 200
            resp.release()
    rp.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(rp.proc.wait(), 15) == 0
    assert [e["request_id"] for e in logged()[:3]] == ["req-0", "req-1", "req-2"]
    assert len(logged()) == 23
