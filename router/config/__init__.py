"""Config: YAML file -> one frozen `Config`, or every problem with its YAML path and line.

Loading is: YAML with lines and ${ENV} (loader.py), the shape (model.py's validation, then the
cross-checks below), then the files the config names (files.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from pathlib import Path as FsPath

from pydantic import ValidationError

from router.config.files import FileProblems, read_files
from router.config.loader import Loaded, Path, Problem, load_text
from router.config.model import (
    AffinityConfig,
    AnthropicProviderConfig,
    ApiKeyConfig,
    AzureProviderConfig,
    BackendConfig,
    Config,
    GeminiProviderConfig,
    HttpProviderConfig,
    Limits,
    MockProviderConfig,
    OpenAIProviderConfig,
    ProviderConfig,
    RouteConfig,
    TranslatedProviderConfig,
)
from router.locs import input_path

__all__ = [
    "AffinityConfig",
    "AnthropicProviderConfig",
    "ApiKeyConfig",
    "AzureProviderConfig",
    "BackendConfig",
    "Config",
    "ConfigError",
    "GeminiProviderConfig",
    "HttpProviderConfig",
    "Limits",
    "MockProviderConfig",
    "OpenAIProviderConfig",
    "Problem",
    "ProviderConfig",
    "RouteConfig",
    "TranslatedProviderConfig",
    "load_config",
    "parse_config",
]


class ConfigError(Exception):
    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.render(source) for p in problems))


def load_config(path: str | FsPath, env: Mapping[str, str] | None = None) -> Config:
    source = str(path)
    try:
        text = FsPath(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [Problem((), f"cannot read file: {exc}")]) from exc
    return parse_config(text, source=source, env=env)


def parse_config(text: str, *, source: str = "<config>",
                 env: Mapping[str, str] | None = None) -> Config:
    loaded = load_text(text, env)
    if loaded.problems:
        raise ConfigError(source, loaded.problems)
    if not isinstance(loaded.data, dict):
        raise ConfigError(source, [Problem((), "the top level must be a mapping")])
    try:
        config = Config.model_validate(loaded.data)
    except ValidationError as exc:
        raise ConfigError(source, _pydantic_problems(exc, loaded)) from None
    problems = [Problem(p, msg, loaded.line_of(p)) for p, msg in _cross_checks(config)]
    if problems:
        raise ConfigError(source, problems)
    try:
        return read_files(config)
    except FileProblems as exc:
        raise ConfigError(source, [Problem(p, msg, loaded.line_of(p))
                                   for p, msg in exc.problems]) from None


def _pydantic_problems(exc: ValidationError, loaded: Loaded) -> list[Problem]:
    problems = []
    errors = exc.errors(include_url=False)
    for err in errors:
        path = input_path(loaded.data, err["loc"], missing=err["type"] == "missing")
        if err["type"] == "too_short" and any(
                len(o["loc"]) > len(err["loc"]) and o["loc"][:len(err["loc"])] == err["loc"]
                for o in errors):
            continue  # "at least 1 item" only because an item inside was already reported
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "union_tag_invalid":
            ctx = err.get("ctx", {})
            msg = f"unknown provider type {ctx.get('tag')!r} (expected {ctx.get('expected_tags')})"
        problems.append(Problem(path, msg, loaded.line_of(path)))
    return problems


def _cross_checks(config: Config) -> Iterator[tuple[Path, str]]:
    routes = config.routes
    for route_name, route in routes.items():
        names: set[str] = set()
        for i, backend in enumerate(route.backends):
            where: Path = ("routes", route_name, "backends", i)
            if backend.provider not in config.providers:
                yield (*where, "provider"), f"unknown provider {backend.provider!r}"
            if backend.display_name in names:
                yield where, f"duplicate backend name {backend.display_name!r} (set `name`)"
            names.add(backend.display_name)
        for i, fallback in enumerate(route.fallbacks):
            if fallback not in routes:
                yield ("routes", route_name, "fallbacks", i), f"unknown route {fallback!r}"
            elif fallback == route_name:
                yield ("routes", route_name, "fallbacks", i), "a route cannot fall back to itself"
        yield from _fanout_checks(route_name, route)
        yield from _affinity_checks(route_name, route)
        for i, endpoint in enumerate(route.endpoints or ()):
            for backend in route.backends:
                provider = config.providers.get(backend.provider)
                if provider is not None and endpoint not in provider.ENDPOINTS:
                    yield (("routes", route_name, "endpoints", i),
                           f"provider {backend.provider!r} ({provider.type}) does not serve "
                           f"{endpoint}")
                    break
    if config.default_route is not None and config.default_route not in routes:
        yield ("default_route",), f"unknown route {config.default_route!r}"
    ids: set[str] = set()
    for i, key in enumerate(config.auth.api_keys):
        if key.id in ids:
            yield ("auth", "api_keys", i, "id"), f"duplicate key id {key.id!r}"
        ids.add(key.id)
        for j, model in enumerate(key.models):
            if model != "*" and model not in routes:
                yield ("auth", "api_keys", i, "models", j), f"unknown route {model!r}"
    if config.auth.dev_api_key is not None and not _is_loopback(config.server.host):
        yield ("auth", "dev_api_key"), "a dev key is only allowed when server.host is loopback"


def _fanout_checks(name: str, route: RouteConfig) -> Iterator[tuple[Path, str]]:
    """Fan-out keys that fit the route's mode and its number of backends."""
    mode, count, given = route.fanout, len(route.backends), route.model_fields_set
    if mode != "none" and count < 2:
        yield ("routes", name, "fanout"), \
            f"fanout {mode} needs at least 2 backends (this route has {count})"
    if "fanout_width" in given and route.fanout_width is not None:
        if mode not in ("race", "all"):
            yield ("routes", name, "fanout_width"), "applies only to fanout race or all"
        elif route.fanout_width > count:
            yield ("routes", name, "fanout_width"), \
                f"{route.fanout_width} is more than this route's {count} backends"
    for key in ("hedge_after_ms", "max_hedges"):
        if key in given and mode != "hedge":
            yield ("routes", name, key), "applies only to fanout hedge"
    if mode == "hedge" and 2 <= count <= route.max_hedges:
        yield ("routes", name, "max_hedges"), \
            f"{route.max_hedges} extra copies need {route.max_hedges + 1} backends " \
            f"(this route has {count})"


def _affinity_checks(name: str, route: RouteConfig) -> Iterator[tuple[Path, str]]:
    """`affinity` belongs to `strategy: prefix_affinity`, which places each request on one
    backend: nothing to fan out."""
    if route.strategy != "prefix_affinity":
        if "affinity" in route.model_fields_set:
            yield ("routes", name, "affinity"), "applies only to strategy prefix_affinity"
    elif route.fanout != "none":
        yield ("routes", name, "fanout"), \
            "strategy prefix_affinity places each request on one backend: use fanout none"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
