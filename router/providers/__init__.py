"""Providers by the config's `type` field: how to speak to each kind of upstream."""

from __future__ import annotations

from router.config import (
    AnthropicProviderConfig,
    AzureProviderConfig,
    GeminiProviderConfig,
    MockProviderConfig,
    OpenAIProviderConfig,
    ProviderConfig,
)
from router.providers import anthropic, gemini
from router.providers.base import Exchange, Provider, UpstreamCall
from router.providers.mock import MockProvider
from router.providers.openai import AzureProvider, OpenAIProvider
from router.upstream import UpstreamClient

__all__ = ["Exchange", "Provider", "UpstreamCall", "build_provider"]


def build_provider(name: str, config: ProviderConfig, client: UpstreamClient,
                   probe_timeout_s: float) -> Provider:
    if isinstance(config, OpenAIProviderConfig):
        return OpenAIProvider(name, config, client, probe_timeout_s)
    if isinstance(config, AzureProviderConfig):
        return AzureProvider(name, config, client, probe_timeout_s)
    if isinstance(config, AnthropicProviderConfig):
        return anthropic.build(name, config, client, probe_timeout_s)
    if isinstance(config, GeminiProviderConfig):
        return gemini.build(name, config, client, probe_timeout_s)
    if isinstance(config, MockProviderConfig):
        return MockProvider(name, config)
    raise TypeError(f"no provider for {type(config).__name__}")
