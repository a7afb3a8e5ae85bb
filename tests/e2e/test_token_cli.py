"""`router token issue` as a real subprocess: the token it prints is accepted by a router with
the same `auth.jwt`, its lifetime is capped, and a bad config fails with a message, not a
traceback."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from tests.conftest import KEY, USER_MSG, router_config
from tests.unit.test_router_jwt import ALGORITHMS, SECRET, write_pair

ROOT = Path(__file__).resolve().parents[2]
ROUTES = {"first": {"backends": [{"provider": "mock", "model": "m1"}]}}


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "token", "issue", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def jwt_section(alg: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    if alg == "HS256":
        return {"algorithm": "HS256", "secret": SECRET, **extra}
    _, priv, pub = write_pair(tmp_path, alg)
    return {"algorithm": alg, "public_key_file": str(pub), "private_key_file": str(priv),
            **extra}


def write(tmp_path: Path, cfg: dict[str, Any], name: str = "cli.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def config(section: dict[str, Any] | None) -> dict[str, Any]:
    cfg = router_config({"mock": {"type": "mock"}}, ROUTES)
    if section is not None:
        cfg["auth"]["jwt"] = section
    return cfg


def remove(path: str) -> None:
    Path(path).unlink()


def broken_section(problem: str, tmp_path: Path) -> dict[str, Any]:
    if problem == "garbage PEM":
        section = jwt_section("EdDSA", tmp_path)
        Path(section["private_key_file"]).write_text("-----BEGIN PRIVATE KEY-----\nnope\n")
    else:
        section = jwt_section("ES256", tmp_path)
        section["algorithm"] = "RS256"
    return section


def assert_clean_failure(code: int, out: str, err: str, *words: str) -> None:
    assert code == 1, (code, out, err)
    assert out == ""
    assert "Traceback" not in err, err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("alg", ALGORITHMS)
async def test_issued_token_is_accepted_by_a_router_with_the_same_config(
        alg, tmp_path, start_router):
    cfg = config(jwt_section(alg, tmp_path))
    path = write(tmp_path, cfg)
    code, out, err = await run_cli("--config", str(path), "--sub", "svc-batch")
    assert code == 0, err
    token = out.strip()
    assert out == token + "\n" and token.count(".") == 2
    assert jwt.get_unverified_header(token)["alg"] == alg
    raw = jwt.decode(token, options={"verify_signature": False})
    assert raw["sub"] == "svc-batch" and raw["iss"] == "router" and raw["aud"] == "router"
    assert raw["exp"] - raw["iat"] == 3600 and "adm" not in raw
    assert "via" not in raw  # issued directly: minted from no credential
    r = await start_router(cfg)
    async with r.chat({"model": "first", "messages": USER_MSG}, key=token) as resp:
        assert resp.status == 200, await resp.text()


async def settings_ttl(r: Any, token: str, put: int | None = None) -> int:
    url, auth = f"{r.url}/api/v1/automation/settings", {"Authorization": f"Bearer {token}"}
    if put is not None:
        async with r.http.put(url, json={"session_ttl_s": put}, headers=auth) as resp:
            assert resp.status == 200, await resp.text()
    async with r.http.get(url, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
        ttl: int = (await resp.json())["session_ttl_s"]
        return ttl


async def test_a_token_for_sub_alice_is_not_the_api_key_user_alice(tmp_path, start_router):
    cfg = config(jwt_section("HS256", tmp_path))
    code, out, err = await run_cli("--config", str(write(tmp_path, cfg)), "--sub", "alice")
    assert code == 0, err
    r = await start_router(cfg)
    assert await settings_ttl(r, KEY, put=900) == 900  # alice's API key (router_config's)
    assert await settings_ttl(r, out.strip()) != 900
    assert await settings_ttl(r, out.strip(), put=1200) == 1200
    assert await settings_ttl(r, KEY) == 900


async def test_scope_admin_and_ttl(tmp_path, start_router):
    cfg = config(jwt_section("HS256", tmp_path, ttl_s=300, issuer="https://router.test",
                             audience="llm"))
    path = write(tmp_path, cfg)
    code, out, err = await run_cli("--config", str(path), "--sub", "ops", "--ttl", "100000",
                                   "--scope", "chat  admin:keys", "--admin")
    assert code == 0, err
    token = out.strip()
    raw = jwt.decode(token, SECRET, algorithms=["HS256"], audience="llm",
                     issuer="https://router.test")
    assert raw["exp"] - raw["iat"] == 300  # capped at auth.jwt.ttl_s
    assert abs(raw["iat"] - time.time()) < 30
    assert raw["adm"] is True and raw["scope"] == "admin:keys chat"
    code, out, _ = await run_cli("--config", str(path), "--sub", "ops", "--ttl", "90")
    raw = jwt.decode(out.strip(), options={"verify_signature": False})
    assert code == 0 and raw["exp"] - raw["iat"] == 90
    r = await start_router(cfg)
    async with r.chat({"model": "first", "messages": USER_MSG}, key=token) as resp:
        assert resp.status == 200
    # a router with another issuer does not take it
    other = config(jwt_section("HS256", tmp_path))
    r2 = await start_router(other)
    async with r2.chat({"model": "first", "messages": USER_MSG}, key=token) as resp:
        assert resp.status == 401


async def test_without_auth_jwt_exits_1_with_a_message(tmp_path):
    path = write(tmp_path, config(None))
    assert_clean_failure(*await run_cli("--config", str(path), "--sub", "x"), "auth.jwt")


async def test_verify_only_config_exits_1_with_a_message(tmp_path):
    section = jwt_section("RS256", tmp_path)
    del section["private_key_file"]
    path = write(tmp_path, config(section))
    assert_clean_failure(*await run_cli("--config", str(path), "--sub", "x"), "private_key_file")


async def test_bad_config_and_missing_file_exit_1(tmp_path):
    short = write(tmp_path, config({"algorithm": "HS256", "secret": "short"}))
    assert_clean_failure(*await run_cli("--config", str(short), "--sub", "x"), "secret")
    assert_clean_failure(*await run_cli("--config", str(tmp_path / "nope.yaml"), "--sub", "x"))
    section = jwt_section("ES256", tmp_path)
    remove(section["private_key_file"])
    path = write(tmp_path, config(section), "gone.yaml")
    assert_clean_failure(*await run_cli("--config", str(path), "--sub", "x"))


async def test_missing_sub_is_a_usage_error(tmp_path):
    path = write(tmp_path, config(jwt_section("HS256", tmp_path)))
    code, out, err = await run_cli("--config", str(path))
    assert code == 2 and out == "" and "--sub" in err and "Traceback" not in err


@pytest.mark.parametrize("problem", ["garbage PEM", "wrong key type"])
async def test_unusable_key_file_exits_1_without_traceback(problem, tmp_path):
    path = write(tmp_path, config(broken_section(problem, tmp_path)))
    assert_clean_failure(*await run_cli("--config", str(path), "--sub", "x"))


async def test_non_positive_ttl_is_refused(tmp_path):
    path = write(tmp_path, config(jwt_section("HS256", tmp_path)))
    for ttl in ("-60", "0"):
        code, out, err = await run_cli("--config", str(path), "--sub", "x", "--ttl", ttl)
        assert code != 0 and out == "" and "Traceback" not in err, (ttl, code, out)
