"""OpenAI's API natively: Azure OpenAI's deployment path and credentials, several keys for one
OpenAI-compatible upstream, and the organization/project headers."""

from __future__ import annotations

import pytest

from tests.conftest import USER_MSG, openai_provider, router_config


def azure(fake, **extra):
    return {"type": "azure", "base_url": fake.base_url.removesuffix("/v1"),
            "api_version": "2024-10-21", **extra}


def lower(headers):
    return {k.lower(): v for k, v in headers.items()}


async def test_azure_deployment_path_version_and_key(fakes, start_router):
    up = await fakes("az")
    r = await start_router(router_config(
        {"az": azure(up, api_key="az-secret-key-1")},
        {"m": {"backends": [{"provider": "az", "model": "gpt4o-prod"}]}}))
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 200
        assert resp.headers["x-router-backend"] == "az/gpt4o-prod"
        body = await resp.json()
    assert body["object"] == "chat.completion"
    async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
        assert resp.status == 200
        raw = await resp.read()
    assert raw.rstrip().endswith(b"data: [DONE]")
    for seen in up.seen:
        assert seen.path == "/openai/deployments/gpt4o-prod/chat/completions" \
            "?api-version=2024-10-21"
        headers = lower(seen.headers)
        assert headers["api-key"] == "az-secret-key-1"
        assert "authorization" not in headers


async def test_azure_entra_token_and_probe(fakes, start_router):
    up = await fakes("az")
    r = await start_router(router_config(
        {"az": azure(up, azure_ad_token="eyJ-entra-token")},
        {"m": {"backends": [{"provider": "az", "model": "dep"}]}}))
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 200
    headers = lower(up.seen[0].headers)
    assert headers["authorization"] == "Bearer eyJ-entra-token"
    assert "api-key" not in headers
    # The probe lists the resource's models (no billed call); it needs the api-version.
    assert await r.worker.ref.current.providers["az"].probe() is True


async def test_api_keys_take_turns(fakes, start_router):
    up = await fakes()
    r = await start_router(router_config(
        {"up": openai_provider(up, api_keys=["key-one", "key-two", "key-three"])},
        {"m": {"backends": [{"provider": "up", "model": "x"}]}}))
    for _ in range(6):
        async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
            assert resp.status == 200
    used = [lower(s.headers)["authorization"] for s in up.seen]
    assert used == ["Bearer key-one", "Bearer key-two", "Bearer key-three"] * 2


@pytest.mark.parametrize("directive", ["deny-key", "limit-key"])
async def test_a_refused_key_rests_and_the_request_goes_on_the_next(fakes, start_router,
                                                                   directive):
    up = await fakes()
    r = await start_router(router_config(
        {"up": openai_provider(up, api_keys=["key-bad", "key-good"])},
        {"m": {"backends": [{"provider": "up", "model": f"{directive}:key-bad"}]}}))
    for _ in range(4):
        async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
            assert resp.status == 200  # the client never sees the refused key
            assert resp.headers["x-router-backend"] == "up/" + f"{directive}:key-bad"
    used = [lower(s.headers)["authorization"] for s in up.seen]
    # The bad key is tried once; it rests (for Retry-After or the cool-down) after that.
    assert used == ["Bearer key-bad", "Bearer key-good", "Bearer key-good", "Bearer key-good",
                    "Bearer key-good"]


async def test_every_key_refused_is_the_upstream_answer(fakes, start_router):
    up = await fakes()
    r = await start_router(router_config(
        {"up": openai_provider(up, api_keys=["key-a", "key-b"])},
        {"m": {"retries": 0, "backends": [{"provider": "up", "model": "status:429"}]}}))
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == "upstream_rate_limited"
    assert [lower(s.headers)["authorization"] for s in up.seen] == ["Bearer key-a",
                                                                     "Bearer key-b"]


async def test_organization_and_project_headers(fakes, start_router):
    up = await fakes()
    r = await start_router(router_config(
        {"up": openai_provider(up, api_key="sk-one", organization="org-42",
                               project="proj_7")},
        {"m": {"backends": [{"provider": "up", "model": "x"}]}}))
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 200
    headers = lower(up.seen[0].headers)
    assert headers["openai-organization"] == "org-42"
    assert headers["openai-project"] == "proj_7"
    assert headers["authorization"] == "Bearer sk-one"
