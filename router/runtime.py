"""Everything a config turns into at run time, built whole and swapped as one reference."""

from __future__ import annotations

from dataclasses import dataclass

from router.auth import Authenticator, StaticKeys
from router.config import Config
from router.providers import Provider, build_provider
from router.routing.health import BackendState
from router.routing.table import RoutingTable
from router.upstream import UpstreamClient


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    table: RoutingTable
    providers: dict[str, Provider]
    auth: Authenticator


def build_runtime(config: Config, client: UpstreamClient,
                  states: dict[str, BackendState]) -> Runtime:
    providers = {name: build_provider(name, pc, client, config.health.timeout_s)
                 for name, pc in config.providers.items()}
    keys = StaticKeys(config.auth.api_keys, config.auth.default_limits, config.auth.dev_api_key)
    return Runtime(
        config=config,
        table=RoutingTable(config, providers, states),
        providers=providers,
        auth=Authenticator(keys),
    )


class RuntimeRef:
    """The one reference a reload swaps; each request reads it once, at its start."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
