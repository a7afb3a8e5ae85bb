"""`router serve` lifts its soft open-files limit to the hard one (two sockets per stream), and
warns when even the hard limit is short of what `server.max_streams` needs."""

from __future__ import annotations

import re
import resource
from pathlib import Path

from tests.conftest import router_config


def open_files_limits(pid: int) -> tuple[int, int]:
    text = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\d+)\s+(\d+)", text, re.MULTILINE)
    assert match is not None, text
    return int(match.group(1)), int(match.group(2))


def config(max_streams: int) -> dict[str, object]:
    cfg = router_config({"m": {"type": "mock"}},
                        {"r": {"backends": [{"provider": "m", "model": "x"}]}})
    cfg["server"] = {**cfg["server"], "max_streams": max_streams}  # type: ignore[dict-item]
    return cfg


async def test_serve_lifts_the_soft_limit_to_the_hard_one(router_process):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    rp = await router_process(config(max_streams=100), nofile=(256, hard))
    assert open_files_limits(rp.pid) == (hard, hard)
    assert "open-files limit" not in rp.log()


async def test_serve_warns_when_the_hard_limit_is_short_of_max_streams(router_process):
    rp = await router_process(config(max_streams=10_000), nofile=(256, 4096))
    assert open_files_limits(rp.pid) == (4096, 4096)
    await rp.wait_log("open-files limit 4096 is below the 20256 that server.max_streams 10000")
