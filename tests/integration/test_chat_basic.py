"""The chat endpoint end to end through a real fake upstream: answers, errors, headers."""

from __future__ import annotations

from tests.conftest import KEY, OTHER_KEY, USER_MSG, openai_provider, router_config


async def test_json_answer_passes_through_byte_identical(fakes, start_router):
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up)},
        {"m": {"backends": [{"provider": "up", "model": "gpt-x"}]}}))
    async with r.chat({"model": "m", "messages": USER_MSG, "session_id": "s1",
                       "seed": 7, "response_format": {"type": "text"}}) as resp:
        assert resp.status == 200
        assert resp.headers["x-router-backend"] == "up/gpt-x"
        assert resp.headers["x-request-id"]
        body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-x"
    sent = up.seen[0]
    assert sent.body["model"] == "gpt-x"
    assert "session_id" not in sent.body
    assert sent.body["seed"] == 7 and sent.body["response_format"] == {"type": "text"}
    assert sent.body["stream"] is False
    assert "authorization" not in {k.lower() for k in sent.headers}


async def test_request_id_is_echoed_and_sent_upstream(fakes, start_router):
    up = await fakes()
    r = await start_router(router_config(
        {"up": openai_provider(up)}, {"m": {"backends": [{"provider": "up", "model": "x"}]}}))
    async with r.chat({"model": "m", "messages": USER_MSG},
                      headers={"x-request-id": "req-123"}) as resp:
        assert resp.headers["x-request-id"] == "req-123"
    assert {k.lower(): v for k, v in up.seen[0].headers.items()}["x-request-id"] == "req-123"


async def test_upstream_key_is_sent_and_client_key_is_not(fakes, start_router):
    up = await fakes()
    r = await start_router(router_config(
        {"up": openai_provider(up, api_key="sk-upstream-secret")},
        {"m": {"backends": [{"provider": "up", "model": "x"}]}}))
    async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
        assert resp.status == 200
    assert up.seen[0].headers["Authorization"] == "Bearer sk-upstream-secret"
    assert KEY not in repr(up.seen[0].headers)


async def test_model_absent_uses_default_route(fakes, start_router):
    up = await fakes()
    r = await start_router(router_config(
        {"up": openai_provider(up)},
        {"a": {"backends": [{"provider": "up", "model": "A"}]},
         "b": {"backends": [{"provider": "up", "model": "B"}]}},
        default_route="b"))
    async with r.chat({"messages": USER_MSG}) as resp:
        assert resp.status == 200
    assert up.seen[0].body["model"] == "B"


async def test_unknown_model_is_404_model_not_found(fakes, start_router):
    up = await fakes()
    r = await start_router(router_config(
        {"up": openai_provider(up)}, {"m": {"backends": [{"provider": "up", "model": "x"}]}}))
    async with r.chat({"model": "nope", "messages": USER_MSG}) as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"]["code"] == "model_not_found"
    assert up.seen == []


async def test_model_not_allowed_for_key_is_403(fakes, start_router):
    up = await fakes()
    r = await start_router(router_config(
        {"up": openai_provider(up)},
        {"first": {"backends": [{"provider": "up", "model": "x"}]},
         "second": {"backends": [{"provider": "up", "model": "y"}]}}))
    async with r.chat({"model": "second", "messages": USER_MSG}, key=OTHER_KEY) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with r.http.get(f"{r.url}/v1/models",
                          headers={"Authorization": f"Bearer {OTHER_KEY}"}) as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == ["first"]
    assert up.seen == []


async def test_auth_failures_are_401_with_challenge(fakes, start_router):
    up = await fakes()
    r = await start_router(router_config(
        {"up": openai_provider(up)}, {"m": {"backends": [{"provider": "up", "model": "x"}]}}))
    async with r.chat({"model": "m", "messages": USER_MSG}, key=None) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="router"'
    for header in ("Bearer sk-wrong", "Basic abc", "Bearer ", "Bearer sk-" + "x" * 9000):
        async with r.http.post(f"{r.url}/v1/chat/completions", json={"messages": USER_MSG},
                               headers={"Authorization": header}) as resp:
            assert resp.status in (400, 401), header[:20]
            if resp.status == 401:
                assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
                assert "sk-wrong" not in await resp.text()
    assert up.seen == []


async def test_probes_and_openapi_need_no_credentials(fakes, start_router):
    up = await fakes()
    r = await start_router(router_config(
        {"up": openai_provider(up)}, {"m": {"backends": [{"provider": "up", "model": "x"}]}}))
    for path in ("/healthz", "/readyz", "/openapi.json"):
        async with r.http.get(r.url + path) as resp:
            assert resp.status == 200, path
    async with r.http.get(r.url + "/v1/models") as resp:
        assert resp.status == 401
    async with r.http.get(r.url + "/nowhere", headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"


async def test_both_upstream_clients_relay_json_and_streams(fakes, start_router):
    up = await fakes()
    for client in ("lean", "aiohttp"):
        r = await start_router(router_config(
            {"up": openai_provider(up)}, {"m": {"backends": [{"provider": "up", "model": "x"}]}},
            server={"upstream_client": client}))
        async with r.chat({"model": "m", "messages": USER_MSG}) as resp:
            assert resp.status == 200, client
            assert (await resp.json())["object"] == "chat.completion"
        async with r.chat({"model": "m", "messages": USER_MSG, "stream": True}) as resp:
            assert resp.status == 200, client
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
