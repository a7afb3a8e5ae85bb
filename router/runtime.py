"""Everything a config turns into at run time, built whole and swapped as one reference."""

from __future__ import annotations

from dataclasses import dataclass

from router.auth import Authenticator, KeyCache, ManagedKeys, RouterTokens, StaticKeys
from router.auth.oidc import OidcClient, OidcVerifier
from router.config import Config, ConfigError, Problem
from router.config.model import OAuth2Config
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
    oidc: OidcClient | None = None  # kept across reloads while `auth.oauth2` is unchanged


def build_runtime(config: Config, client: UpstreamClient,
                  states: dict[str, BackendState], oidc: OidcClient | None = None, *,
                  key_cache: KeyCache | None = None) -> Runtime:
    """`oidc` is the running runtime's IdP client: reused (with its keys and caches) when
    `auth.oauth2` is unchanged, else a new one is made, which the caller starts.
    `key_cache` is the worker's cache of managed (store-backed) API keys, shared by runtimes."""
    providers = {name: build_provider(name, pc, client, config.health.timeout_s)
                 for name, pc in config.providers.items()}
    auth = config.auth
    keys = StaticKeys(auth.api_keys, auth.default_limits, auth.dev_api_key)
    tokens = None
    if auth.jwt is not None:
        try:
            tokens = RouterTokens(auth.jwt, auth.default_limits)
        except (OSError, ValueError, TypeError) as exc:
            # Key files that do not parse or fit the algorithm (config loading read them): a
            # config problem, refused like one.
            raise ConfigError("<config>", [Problem(("auth", "jwt"), f"cannot load the key: "
                                                   f"{type(exc).__name__}")]) from None
    idp = None
    if auth.oauth2 is None:
        oidc = None
    else:
        if oidc is None or not same_provider(oidc.config, auth.oauth2):
            oidc = OidcClient(auth.oauth2)
        idp = OidcVerifier(oidc, auth.default_limits, auth.admin_claim, auth.oauth2.users)
    return Runtime(
        config=config,
        table=RoutingTable(config, providers, states),
        providers=providers,
        auth=Authenticator(keys, tokens, idp, None if key_cache is None
                           else ManagedKeys(key_cache, auth.default_limits)),
        oidc=oidc,
    )


def same_provider(old: OAuth2Config, new: OAuth2Config) -> bool:
    """Whether a reload may keep the IdP client (its keys, its caches): the subject mapping is
    applied per runtime, so changing it alone keeps them."""
    return old.model_copy(update={"users": {}}) == new.model_copy(update={"users": {}})


class RuntimeRef:
    """The one reference a reload swaps; each request reads it once, at its start."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
