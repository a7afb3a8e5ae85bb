"""/metrics with several workers: every worker answers with the sum over all of them."""

from __future__ import annotations

import signal

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import USER_MSG
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
