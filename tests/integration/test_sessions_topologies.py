"""Session pins on the other Redis topologies, through two routers: a three-master Redis Cluster
(the pin is tagged by user, the limits by principal: two slots, read in parallel) and a
Sentinel setup. For a principal with limits (the pin read with the admission, counted after)
and one without (the pin touched by one call): created, hit, and the same on both replicas."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from router.store.redis import limit_keys, pin_key
from tests.conftest import OTHER_KEY
from tests.integration.test_sessions import api, backend_of, config, pins, requests_on
from tests.integration.test_store_topologies import needs_redis
from tests.redis_cluster import cli, start_cluster, start_sentinel


@needs_redis
@pytest.mark.parametrize("topology", ["cluster", "sentinel"])
async def test_pins_are_created_hit_and_shown_on_every_replica(
        topology: str, tmp_path: Path, fakes: Any, start_router: Any) -> None:
    setup = await asyncio.to_thread(start_cluster if topology == "cluster" else start_sentinel,
                                    tmp_path / topology)
    try:
        ups = [await fakes(n) for n in ("a", "b", "c")]
        cfg = config(ups, {"url": setup.url, "timeout_ms": 1000})
        cfg["auth"]["api_keys"][1]["limits"] = {"rpm": 10_000, "concurrency": 20}  # bob
        replicas = [await start_router(cfg), await start_router(cfg)]
        if topology == "cluster":  # the pin and the limits really live in different slots
            slot = {k: int(cli(setup.servers[0].port, "CLUSTER", "KEYSLOT", k))
                    for k in (pin_key("bob", "s0"), limit_keys("narrow")[0])}
            assert len(set(slot.values())) == 2
        for key in (None, OTHER_KEY):  # alice: no limits; bob: limits
            kw = {} if key is None else {"key": key}
            placed = {f"s{i}": await backend_of(replicas[i % 2], f"s{i}", **kw)
                      for i in range(6)}
            assert len(set(placed.values())) > 1  # round robin spread them
            for round_ in range(3):
                for i, session in enumerate(placed):
                    got = await backend_of(replicas[(i + round_) % 2], session, **kw)
                    assert got == placed[session]
            for r in replicas:
                for session, backend in placed.items():
                    info = await requests_on(r, session, 4, **kw)
                    assert (info["backend"], info["route"]) == (backend, "m")
                    assert info["created_at"] <= info["last_used_at"] < info["expires_at"]
        assert sum(pins(r, "new") for r in replicas) == 12
        assert sum(pins(r, "hit") for r in replicas) == 36
        assert sum(pins(r, "repin") for r in replicas) == 0
        # Another user's session is not there; deleting on one replica is seen by the other.
        assert (await api(replicas[0], "GET", "/api/v1/sessions/s0", key=OTHER_KEY))[1][
            "requests"] == 4
        assert (await api(replicas[0], "DELETE", "/api/v1/sessions/s0"))[0] == 204
        assert (await api(replicas[1], "GET", "/api/v1/sessions/s0"))[0] == 404
        assert (await api(replicas[1], "GET", "/api/v1/sessions/s0", key=OTHER_KEY))[0] == 200
    finally:
        await asyncio.to_thread(setup.stop)
