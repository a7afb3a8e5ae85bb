"""/metrics with several workers: every worker answers with the sum over all of them."""

from __future__ import annotations

import os
import signal

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import USER_MSG, eventually
from tests.e2e.test_lifecycle import AUTH, client, e2e_config


def _requests_total(text: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "router_requests_total" and s.labels.get("status") == "200":
                total += s.value
    return total


async def test_metrics_are_summed_over_workers(fakes, router_process):
    up = await fakes("up")
    rp = await router_process(e2e_config(up, {"m": "gpt-x"}), "--workers", "2")
    await rp.wait_log(f"listening on http://127.0.0.1:{rp.port}", count=2)
    async with client() as http:
        # Fresh connections spread over both workers (SO_REUSEPORT hashes each connection).
        for _ in range(20):
            async with http.post(f"{rp.url}/v1/chat/completions", headers={
                    **AUTH, "Connection": "close"}, json={"model": "m", "messages": USER_MSG}) \
                    as resp:
                assert resp.status == 200
        scraped = set()
        for _ in range(8):
            async with http.get(f"{rp.url}/metrics", headers={"Connection": "close"}) as resp:
                assert resp.status == 200
                scraped.add(_requests_total(await resp.text()))
    # Whichever worker answered the scrape, it reported all 20 requests.
    assert scraped == {20.0}
    rp.send(signal.SIGTERM)
    assert await rp.wait_exit(10) == 0


def _process_samples(text: str, name: str) -> dict[int, float]:
    return {int(s.labels["pid"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


async def test_process_figures_come_per_live_worker(fakes, router_process):
    """Memory, file descriptors and CPU do not add up over workers: with several, each live
    worker has its own series, labelled with its pid, whichever worker answers the scrape; a
    worker that died is gone from them and its replacement is there."""
    up = await fakes("up")
    rp = await router_process(e2e_config(up, {"m": "gpt-x"}), "--workers", "2")
    await rp.wait_log(f"listening on http://127.0.0.1:{rp.port}", count=2)
    workers = await eventually(lambda: len(rp.children()) == 2 and set(rp.children()), 10,
                             "two worker processes")

    async def scrape() -> str:
        async with client() as http, http.get(f"{rp.url}/metrics",
                                              headers={"Connection": "close"}) as resp:
            assert resp.status == 200
            return await resp.text()

    for _ in range(6):  # fresh connections: both workers answer some of them
        text = await scrape()
        rss = _process_samples(text, "process_resident_memory_bytes")
        assert set(rss) == workers
        assert all(v > 1_000_000 for v in rss.values())
        assert set(_process_samples(text, "process_open_fds")) == workers
        assert set(_process_samples(text, "process_cpu_seconds_total")) == workers

    dead = min(workers)
    os.kill(dead, signal.SIGKILL)  # one of our own workers; the supervisor starts another
    await rp.wait_log("restarting it")
    now = await eventually(lambda: len(set(rp.children()) - workers) == 1 and set(rp.children()),
                         10, "a replacement worker")
    await rp.wait_log(f"listening on http://127.0.0.1:{rp.port}", count=3)
    for _ in range(6):
        assert set(_process_samples(await scrape(), "process_resident_memory_bytes")) == now
    assert dead not in now
    rp.send(signal.SIGTERM)
    assert await rp.wait_exit(10) == 0
