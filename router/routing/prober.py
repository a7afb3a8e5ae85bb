"""Active health probes: `GET {base_url}/models` per provider (never a billed completion)."""

from __future__ import annotations

import asyncio
import logging

from router.runtime import RuntimeRef

log = logging.getLogger("router.prober")


async def probe_once(ref: RuntimeRef) -> None:
    runtime = ref.current
    providers = list(runtime.providers.values())
    results = await asyncio.gather(*(p.probe() for p in providers))
    for provider, up in zip(providers, results, strict=True):
        if up is None:
            continue
        for backend in runtime.table.backends():
            if backend.provider is provider and backend.state.probe_down == up:
                backend.state.probe_down = not up
                log.warning("provider %s is %s", provider.name, "up" if up else "down")


async def probe_forever(ref: RuntimeRef) -> None:
    """One prober per process; it follows config reloads through `ref`."""
    while True:
        health = ref.current.config.health
        if health.enabled:
            await probe_once(ref)
        await asyncio.sleep(health.interval_s)
