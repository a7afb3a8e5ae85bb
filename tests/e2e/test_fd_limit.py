"""`router serve` lifts its soft open-files limit to the hard one, and warns when even the
hard limit is short of what `server.max_streams` needs: two sockets per stream to a network
backend, one (the client's) to an in-process mock."""

from __future__ import annotations

import re
import resource
from pathlib import Path

import yaml

from tests.conftest import router_config
from tests.e2e.conftest import ROOT

NETWORK = {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "probe": False}
MOCK = {"type": "mock"}


def open_files_limits(pid: int) -> tuple[int, int]:
    text = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\d+)\s+(\d+)", text, re.MULTILINE)
    assert match is not None, text
    return int(match.group(1)), int(match.group(2))


def config(max_streams: int, provider: dict[str, object] = MOCK) -> dict[str, object]:
    cfg = router_config({"m": provider}, {"r": {"backends": [{"provider": "m", "model": "x"}]}})
    cfg["server"] = {**cfg["server"], "max_streams": max_streams}  # type: ignore[dict-item]
    return cfg


async def test_serve_lifts_the_soft_limit_to_the_hard_one(router_process):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    rp = await router_process(config(max_streams=100), nofile=(256, hard))
    assert open_files_limits(rp.pid) == (hard, hard)
    assert "open-files limit" not in rp.log()


async def test_serve_warns_when_the_hard_limit_is_short_of_max_streams(router_process):
    rp = await router_process(config(max_streams=10_000, provider=NETWORK), nofile=(256, 4096))
    assert open_files_limits(rp.pid) == (4096, 4096)
    await rp.wait_log("open-files limit 4096 is below the 20256 that server.max_streams 10000")


async def test_streams_to_an_in_process_mock_count_one_socket(router_process):
    rp = await router_process(config(max_streams=10_000), nofile=(256, 16384))
    assert open_files_limits(rp.pid) == (16384, 16384)
    assert "open-files limit" not in rp.log()  # 10,256 needed, not 20,256


async def test_the_demo_config_starts_without_a_warning_on_a_common_hard_limit(router_process):
    demo = yaml.safe_load((ROOT / "config" / "router.yaml").read_text())
    demo["server"]["drain_delay_s"] = 0  # the test stops it at once; nothing else changes
    rp = await router_process(demo, nofile=(256, 4096))
    assert open_files_limits(rp.pid) == (4096, 4096)
    assert "open-files limit" not in rp.log()
