"""The config's typed, frozen shape. Unknown keys are errors; providers are a tagged union."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from router.config.store_url import REDIS_PREFIXES, parse_store_url

Strategy = Literal["round_robin", "weighted", "least_busy", "latency", "random",
                   "prefix_affinity"]
Fanout = Literal["none", "race", "hedge", "all"]
# What a route serves: POST /v1/chat/completions, /v1/responses, /v1/embeddings, /v1/completions.
EndpointKind = Literal["chat", "responses", "embeddings", "completions"]
ALL_ENDPOINTS: frozenset[str] = frozenset(("chat", "responses", "embeddings", "completions"))
PositiveInt = Annotated[int, Field(ge=1)]


def _hedge_after(value: object) -> object:
    """A number of milliseconds > 0, or `p95` (the route's observed 95th percentile)."""
    if value == "p95":
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and 0 < value <= 3_600_000:
        return float(value)
    raise ValueError("expected milliseconds (a number > 0, at most 3600000) or 'p95'")


HedgeAfter = Annotated[float | Literal["p95"], BeforeValidator(_hedge_after)]
MAX_PREFIX_MESSAGES = 1000


def _affinity_prefix(value: object) -> object:
    """`first_user`, `system`, or how many leading messages (1..MAX_PREFIX_MESSAGES)."""
    if value in ("first_user", "system"):
        return value
    if isinstance(value, int) and not isinstance(value, bool) \
            and 1 <= value <= MAX_PREFIX_MESSAGES:
        return value
    raise ValueError("expected 'first_user', 'system' or a number of messages "
                     f"(1 to {MAX_PREFIX_MESSAGES})")


AffinityPrefix = Annotated[Literal["first_user", "system"] | int,
                           BeforeValidator(_affinity_prefix)]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    # SIGTERM: /readyz answers 503 for drain_delay_s while requests are still served (a load
    # balancer sees it and stops sending), then the listener closes and in-flight work gets
    # shutdown_grace_s.
    drain_delay_s: float = Field(5.0, ge=0, le=3600)
    shutdown_grace_s: float = Field(30.0, ge=0, le=3600)
    # Closes idle keep-alive connections, and connections that have not sent a whole request
    # head by then (slowloris).
    keepalive_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    sse_keepalive_s: float = Field(15.0, gt=0)
    write_stall_timeout_s: float = Field(30.0, gt=0)
    max_streams: int = Field(10_000, ge=1)
    max_response_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    reload_poll_s: float = Field(1.0, ge=0)
    # How to speak HTTP upstream: the lean keep-alive client (default), or aiohttp's client.
    upstream_client: Literal["lean", "aiohttp"] = "lean"


class StoreConfig(Frozen):
    url: str = Field("memory://", repr=False)  # may carry a password
    on_failure: Literal["open", "closed"] = "open"
    # Each try of a store call, whole (a key lookup may try twice). A cold worker on a busy
    # 2-core host needed 100-250 ms for a burst of 200 concurrent requests (measured): 50 failed.
    timeout_ms: float = Field(250.0, gt=0, le=60_000)

    @field_validator("url")
    @classmethod
    def _url_shape(cls, v: str) -> str:
        """A known scheme and a well-formed url (parsed as text: no driver, no connection)."""
        if v.startswith("memory://"):
            return v
        if not v.startswith(REDIS_PREFIXES):
            raise ValueError("expected memory://, redis://host:port[/db], rediss://..., "
                             "redis+sentinel://host:port[,host:port...]/service[/db] or "
                             "redis+cluster://host:port[,host:port...]")
        parse_store_url(v)  # its errors never quote the password
        return v


class Limits(Frozen):
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    concurrency: PositiveInt | None = None
    tokens_per_day: PositiveInt | None = None


class LimitsConfig(Frozen):
    """How the limiter charges: a request without `max_tokens` is charged this many completion
    tokens up front; a concurrency slot's lease lives this long unless its worker refreshes it
    (a crashed replica's slots come back after it)."""

    default_max_tokens: PositiveInt = 1024
    lease_ttl_s: float = Field(60.0, ge=1, le=3600)


class SessionsConfig(Frozen):
    """Defaults for every user's automation settings: whether a request without
    `session_id` gets a new session, and how long an unused pin lives (a user may choose
    60..604800 s; the operator's default may be shorter, e.g. in tests)."""

    auto_create: bool = False
    ttl_s: int = Field(3600, ge=1, le=604800)
    # Without a shared store, sessions are placed by consistent hashing with bounded load: a
    # backend past this many times its share of the in-flight requests takes no new ones.
    hash_load_factor: float = Field(1.25, ge=1.0, le=100.0)


# Identities of router JWTs issued directly and of identity-provider subjects start with these
# (router/auth/principal.py); an API key's user or id may not, so that no configured name can
# pose as another kind's identity.
RESERVED_PREFIXES = ("jwt:", "oidc:")
# The ids managed keys get; a YAML key may not take one.
MANAGED_KEY_ID = re.compile(r"^key_[0-9a-f]{16}$")


def _plain_name(value: str) -> str:
    if value.startswith(RESERVED_PREFIXES):
        raise ValueError(f"may not start with {' or '.join(map(repr, RESERVED_PREFIXES))} "
                         "(reserved for router JWT and identity provider subjects)")
    return value


def _config_key_id(value: str) -> str:
    if MANAGED_KEY_ID.match(value):
        raise ValueError("'key_' and 16 hex digits is the shape of a managed key's id")
    return _plain_name(value)


UserName = Annotated[str, Field(min_length=1), AfterValidator(_plain_name)]


class ApiKeyConfig(Frozen):
    id: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_config_key_id)]
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    user: UserName
    limits: Limits | None = None
    models: tuple[str, ...] = ("*",)
    admin: bool = False


class JwtConfig(Frozen):
    """Router-signed JWTs. The algorithm is fixed here, never taken from a token's header."""

    issuer: str = Field("router", min_length=1)
    audience: str = Field("router", min_length=1)
    algorithm: Literal["HS256", "RS256", "ES256", "EdDSA"] = "HS256"
    secret: str | None = Field(None, repr=False)
    private_key_file: str | None = None
    public_key_file: str | None = None
    ttl_s: int = Field(3600, ge=60, le=30 * 86400)
    leeway_s: float = Field(30.0, ge=0, le=60)

    # The key files' bytes, read when the config is loaded (router/config/files.py), after
    # validation and off the event loop; None until then, and with HS256.
    _public_pem: bytes | None = PrivateAttr(None)
    _private_pem: bytes | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _keys_fit_algorithm(self) -> JwtConfig:
        if self.algorithm == "HS256":
            if self.secret is None or len(self.secret.encode()) < 32:
                raise ValueError("HS256 needs `secret` of at least 32 bytes")
        elif not self.public_key_file:
            raise ValueError(f"{self.algorithm} needs `public_key_file` "
                             "(and `private_key_file` to issue tokens)")
        return self

    @property
    def public_pem(self) -> bytes | None:
        return self._public_pem

    @property
    def private_pem(self) -> bytes | None:
        return self._private_pem

    def with_pems(self, public_pem: bytes, private_pem: bytes | None) -> JwtConfig:
        """This section with its key files' bytes, as they were read."""
        loaded = self.model_copy()
        loaded._public_pem = public_pem
        loaded._private_pem = private_pem
        return loaded


class IntrospectionConfig(Frozen):
    url: str = Field(pattern=r"^https?://[^\s]+$")
    client_id: str
    client_secret: str = Field(repr=False)


class OAuth2Config(Frozen):
    """An external OpenID Connect provider whose access tokens the router accepts."""

    # No fragment (OpenID Connect forbids one): a subject's identity, `oidc:<issuer>#<sub>`,
    # reads back unambiguously.
    issuer: str = Field(pattern=r"^https?://[^\s#]+$")
    audience: str | None = None
    required_scopes: tuple[str, ...] = ()
    algorithms: tuple[Literal["RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA"],
                      ...] = ("RS256", "ES256")
    discovery_refresh_s: float = Field(3600.0, ge=10)
    jwks_min_refetch_s: float = Field(30.0, ge=1)
    introspection: IntrospectionConfig | None = None
    userinfo: bool = True  # opaque tokens without introspection: ask the userinfo endpoint
    cache_ttl_s: float = Field(300.0, ge=0)
    timeout_s: float = Field(5.0, gt=0)
    leeway_s: float = Field(30.0, ge=0, le=60)
    # Subject (`sub`) -> router user: that subject shares the user's sessions and automation
    # settings, as the user's API keys do. Unmapped subjects are `oidc:<issuer>#<sub>`.
    users: dict[Annotated[str, Field(min_length=1, max_length=256)], UserName] = Field(
        default_factory=dict)


class AdminClaim(Frozen):
    """A JWT/IdP claim that makes its bearer an admin, e.g. {claim: groups, value: admins}."""

    claim: str = Field(min_length=1)
    value: str = Field(min_length=1)


class AuthConfig(Frozen):
    api_keys: tuple[ApiKeyConfig, ...] = ()
    # Plaintext key for local development only: printed at start-up, refused off loopback.
    dev_api_key: str | None = Field(None, min_length=16)
    default_limits: Limits = Limits()
    jwt: JwtConfig | None = None
    oauth2: OAuth2Config | None = None
    admin_claim: AdminClaim | None = None


class HttpProviderConfig(Frozen):
    """What every provider that reaches its upstream over HTTP has."""

    base_url: str = Field(pattern=r"^https?://[^\s]+$")
    api_key: str | None = Field(None, repr=False)
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    max_connections: int = Field(256, ge=1)
    probe: bool = True
    # https: trust only the CAs in this PEM file (a private CA) instead of the system's; read
    # on first use, so a changed file takes effect on restart.
    ca_file: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _ca_file_needs_https(self) -> HttpProviderConfig:
        if self.ca_file is not None and not self.base_url.startswith("https://"):
            raise ValueError("ca_file needs an https:// base_url")
        return self


class OpenAIProviderConfig(HttpProviderConfig):
    type: Literal["openai"]
    ENDPOINTS: ClassVar[frozenset[str]] = ALL_ENDPOINTS
    # Several keys of one account or project, used in turn: one answered 401/403 or 429 rests
    # (for the answer's Retry-After, else `key_cooldown_s`) and the request goes on the next.
    api_keys: tuple[str, ...] = Field((), repr=False)
    key_cooldown_s: float = Field(60.0, gt=0, le=86400)
    organization: str | None = Field(None, min_length=1, max_length=256)
    project: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _one_key_field(self) -> OpenAIProviderConfig:
        if self.api_key and self.api_keys:
            raise ValueError("give api_key or api_keys, not both")
        if any(not key for key in self.api_keys):
            raise ValueError("api_keys holds an empty key")
        return self


class AzureProviderConfig(HttpProviderConfig):
    """Azure OpenAI: `{base_url}/openai/deployments/{model}/chat/completions?api-version=...`,
    the backend's `model` naming the deployment. Authenticated by `api_key` (the `api-key`
    header) or `azure_ad_token` (a Microsoft Entra ID bearer token)."""

    type: Literal["azure"]
    ENDPOINTS: ClassVar[frozenset[str]] = ALL_ENDPOINTS
    api_version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    azure_ad_token: str | None = Field(None, repr=False)

    @model_validator(mode="after")
    def _one_credential(self) -> AzureProviderConfig:
        if self.api_key and self.azure_ad_token:
            raise ValueError("give api_key or azure_ad_token, not both")
        return self


class TranslatedProviderConfig(HttpProviderConfig):
    """A provider whose API is not OpenAI's: requests and answers are translated."""

    ENDPOINTS: ClassVar[frozenset[str]] = frozenset(("chat",))

    # A parameter the API has no equivalent for (`n` > 1, penalties, ...): refused with a 400
    # naming it, or left out when this is true.
    drop_unsupported: bool = False


class AnthropicProviderConfig(TranslatedProviderConfig):
    """Anthropic's Messages API (`{base_url}/v1/messages`)."""

    type: Literal["anthropic"]
    base_url: str = Field("https://api.anthropic.com", pattern=r"^https?://[^\s]+$")
    anthropic_version: str = Field("2023-06-01", min_length=1, max_length=64)
    anthropic_beta: str | None = Field(None, min_length=1, max_length=512)
    # Anthropic requires max_tokens: sent when the client gives none.
    default_max_tokens: int = Field(4096, ge=1)


class GeminiProviderConfig(TranslatedProviderConfig):
    """Google's Gemini API (`{base_url}/v1beta/models/{model}:generateContent`)."""

    type: Literal["gemini"]
    ENDPOINTS: ClassVar[frozenset[str]] = frozenset(("chat", "embeddings"))
    base_url: str = Field("https://generativelanguage.googleapis.com",
                          pattern=r"^https?://[^\s]+$")


class MockProviderConfig(Frozen):
    type: Literal["mock"]
    ENDPOINTS: ClassVar[frozenset[str]] = frozenset(("chat", "embeddings", "completions"))
    latency_ms: float = Field(0.0, ge=0)
    chunks: int = Field(8, ge=1, le=10_000)
    chunk_gap_ms: float = Field(0.0, ge=0)
    text: str | None = None


ProviderConfig = Annotated[
    OpenAIProviderConfig | AzureProviderConfig | AnthropicProviderConfig | GeminiProviderConfig
    | MockProviderConfig,
    Field(discriminator="type"),
]


class BackendConfig(Frozen):
    provider: str
    model: str = Field(min_length=1)
    name: str | None = Field(None, min_length=1, max_length=64)
    weight: float = Field(1.0, gt=0)
    max_concurrency: PositiveInt | None = None

    @property
    def display_name(self) -> str:
        return self.name or f"{self.provider}/{self.model}"


class EjectionConfig(Frozen):
    consecutive_failures: int = Field(5, ge=1)
    base_cooldown_s: float = Field(30.0, gt=0)
    max_cooldown_s: float = Field(300.0, gt=0)


class AffinityConfig(Frozen):
    """`strategy: prefix_affinity`: what part of a chat prompt picks its backend, and how far
    past its fair share of the in-flight requests a backend may go before its prefixes spill."""

    # first_user: the messages up to and including the first `user` one; system: the leading
    # system (or developer) messages; N: the first N messages. `tools` are part of it always.
    prefix: AffinityPrefix = "first_user"
    load_factor: float = Field(1.25, ge=1.0, le=100.0)


class RouteConfig(Frozen):
    strategy: Strategy = "round_robin"
    fanout: Fanout = "none"
    # race and all: how many backends are asked (race: all of them, at most 4; all: every one).
    fanout_width: int | None = Field(None, ge=2, le=16)
    hedge_after_ms: HedgeAfter = "p95"
    max_hedges: int = Field(1, ge=1, le=15)
    retries: int = Field(2, ge=0, le=10)
    timeout_s: float = Field(600.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    first_byte_timeout_s: float | None = Field(None, gt=0)
    idle_timeout_s: float = Field(120.0, gt=0)
    backends: tuple[BackendConfig, ...] = Field(min_length=1)
    fallbacks: tuple[str, ...] = ()
    ejection: EjectionConfig = EjectionConfig()
    # What the route serves; None: every endpoint all of its backends' providers serve.
    endpoints: tuple[EndpointKind, ...] | None = Field(None, min_length=1)
    affinity: AffinityConfig = AffinityConfig()  # strategy prefix_affinity only


class HealthConfig(Frozen):
    enabled: bool = True
    interval_s: float = Field(10.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)


class LoggingConfig(Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    access_log: bool = True


class MetricsConfig(Frozen):
    """Prometheus metrics. Off: every collector is a no-op and `path` answers 404.
    Both keys take effect on restart."""

    enabled: bool = True
    path: str = Field("/metrics", pattern=r"^/[A-Za-z0-9._~\-/]*$", max_length=128)

    @field_validator("path")
    @classmethod
    def _not_an_api_path(cls, v: str) -> str:
        # The route table's own paths (router/routes.py) outside /api/ and /v1/.
        if v in ("/healthz", "/readyz", "/openapi.json", "/admin") \
                or v.startswith(("/api/", "/v1/")):
            raise ValueError(f"{v!r} is taken by the router's own endpoints")
        return v


class UsageConfig(Frozen):
    """The per-principal usage report (GET /api/v1/admin/usage): counts kept in process memory
    as requests end and added to hourly buckets in the store every `flush_interval_s`."""

    enabled: bool = False
    flush_interval_s: float = Field(1.0, ge=0.05, le=60)
    retention_days: int = Field(35, ge=1, le=400)


class Config(Frozen):
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    sessions: SessionsConfig = SessionsConfig()
    providers: dict[str, ProviderConfig] = Field(min_length=1)
    routes: dict[str, RouteConfig] = Field(min_length=1)
    default_route: str | None = None
    health: HealthConfig = HealthConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    usage: UsageConfig = UsageConfig()
