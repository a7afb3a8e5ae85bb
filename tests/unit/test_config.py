"""Config: good files parse into frozen objects; every bad fixture is refused with path and line.

Each file in tests/fixtures/configs/bad/ states what it must produce in `# expect:` lines:
`# expect: <yaml path>: <message fragment> (line N)`, one per problem, `(top)` for the document.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from router import routes
from router.cli import main
from router.config import Config, ConfigError, Problem, load_config, parse_config
from router.config.loader import format_path
from router.config.model import MetricsConfig

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "configs"
BAD = sorted((FIXTURES / "bad").glob("*.yaml"))
GOOD = sorted((FIXTURES / "good").glob("*.yaml"))
SHIPPED = ROOT / "config" / "router.yaml"

# The neighbour of an unset variable: its value must never show up in an error.
CANARY = "canary-secret-7f3a9c"
ENV = {"ROUTER_TEST_SECRET": CANARY}

_EXPECT = re.compile(r"^# expect: (?P<path>\S+): (?P<msg>.*?)(?: \(line (?P<line>\d+)\))?$")


def expectations(path: Path) -> list[tuple[str, str, int | None]]:
    out = []
    for text in path.read_text(encoding="utf-8").splitlines():
        m = _EXPECT.match(text)
        if m:
            out.append((m["path"], m["msg"], int(m["line"]) if m["line"] else None))
    assert out, f"{path.name} has no `# expect:` line"
    return out


def where(problem: Problem) -> str:
    return format_path(problem.path) or "(top)"


def test_fixture_sets_are_not_empty():
    assert len(BAD) >= 20 and len(GOOD) >= 2


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_fixture_is_refused_with_path_and_line(path):
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV)
    problems = info.value.problems
    expected = expectations(path)
    assert len(problems) == len(expected), [p.render() for p in problems]
    for want_path, want_msg, want_line in expected:
        hits = [p for p in problems if where(p) == want_path and want_msg in p.message]
        assert hits, f"no problem at {want_path} mentioning {want_msg!r}: " + \
            "; ".join(p.render() for p in problems)
        assert hits[0].line == want_line, hits[0].render()
    rendered = str(info.value)
    assert str(path) in rendered
    assert CANARY not in rendered


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_check_config_prints_each_problem_and_exits_1(path, capsys, monkeypatch):
    monkeypatch.setenv("ROUTER_TEST_SECRET", CANARY)
    for name in ("ROUTER_TEST_UNSET_KEY", "ROUTER_TEST_UNSET_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert main(["check-config", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    expected = expectations(path)
    assert len(lines) == len(expected), err
    for (want_path, want_msg, want_line), line in zip(sorted(expected), sorted(lines),
                                                        strict=True):
        assert line.startswith(f"{path}: {want_path}: "), line
        assert want_msg in line
        if want_line is not None:
            assert line.endswith(f"(line {want_line})"), line
    assert "Traceback" not in err
    assert CANARY not in err


@pytest.mark.parametrize("path", [*GOOD, SHIPPED], ids=[*(p.stem for p in GOOD), "shipped"])
def test_good_config_parses(path, capsys, monkeypatch):
    config = load_config(path, env={"ROUTER_TEST_OPENAI_KEY": "sk-up"})
    assert config.routes and config.providers
    monkeypatch.setenv("ROUTER_TEST_OPENAI_KEY", "sk-up")
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok\n"


def test_shipped_config_is_the_embedded_default():
    config = load_config(SHIPPED, env={})
    assert config.server.host == "127.0.0.1"
    assert config.store.url == "memory://"
    assert {p.type for p in config.providers.values()} == {"mock"}
    assert config.default_route in config.routes
    assert config.auth.dev_api_key == "sk-router-dev-0123456789abcdef"
    assert load_config(SHIPPED, env={"ROUTER_DEV_KEY": "sk-mine-0123456789abc"}) \
        .auth.dev_api_key == "sk-mine-0123456789abc"


def test_full_config_values_and_interpolation():
    config = load_config(FIXTURES / "good" / "full.yaml", env={"ROUTER_TEST_OPENAI_KEY": "sk-up"})
    assert config.server.port == 9000  # ${ROUTER_TEST_PORT:-9000}
    assert config.server.reload_poll_s == 0.5
    assert config.store.on_failure == "closed"
    openai = config.providers["openai"]
    assert openai.type == "openai" and openai.api_key == "sk-up"
    assert config.providers["demo"].text == "costs $5"  # `$$` is a literal dollar
    smart = config.routes["smart"]
    assert smart.strategy == "least_busy" and smart.fallbacks == ("fast",)
    assert [b.display_name for b in smart.backends] == ["local-a/llama-3-70b", "openai/gpt-4o"]
    assert smart.backends[0].weight == 3 and smart.backends[0].max_concurrency == 64
    assert config.auth.api_keys[0].limits is not None
    assert config.auth.api_keys[0].limits.rpm == 60
    assert config.auth.api_keys[1].models == ("fast",)
    assert config.auth.dev_api_key == "sk-dev-0123456789abcdef"
    assert config.auth.oauth2 is not None and config.auth.oauth2.users == {"00u1a2b3c": "bob"}
    assert "sk-up" not in repr(config)  # upstream keys stay out of reprs and logs


def test_env_set_overrides_default_and_empty_means_unset():
    base = "providers: {p: {type: mock}}\nroutes: {r: {backends: [{provider: p, model: m}]}}\n"
    text = base + "server: {port: '${ROUTER_TEST_PORT:-9000}'}\n"
    assert parse_config(text, env={"ROUTER_TEST_PORT": "9100"}).server.port == 9100
    assert parse_config(text, env={"ROUTER_TEST_PORT": ""}).server.port == 9000
    with pytest.raises(ConfigError) as info:
        parse_config(base + "server: {host: '${ROUTER_TEST_HOST}'}\n", source="x.yaml",
                     env={"ROUTER_TEST_HOST": ""})
    assert str(info.value) == \
        "x.yaml: server.host: environment variable ROUTER_TEST_HOST is not set (line 3)"


def test_env_values_are_not_parsed_as_yaml_or_expanded_again():
    text = ("providers: {p: {type: mock, text: '${ROUTER_TEST_TEXT}'}}\n"
            "routes: {r: {backends: [{provider: p, model: m}]}}\n")
    tricky = "a\nroutes: {}\n${ROUTER_TEST_SECRET} $$ &x *x"
    config = parse_config(text, env={"ROUTER_TEST_TEXT": tricky, **ENV})
    assert config.providers["p"].text == tricky
    assert list(config.routes) == ["r"]


def test_every_unset_variable_is_named():
    text = ("providers:\n  a: {type: openai, base_url: '${ROUTER_TEST_URL_A}'}\n"
            "  b: {type: openai, base_url: 'http://x/v1', api_key: '${ROUTER_TEST_KEY_B}'}\n"
            "routes: {r: {backends: [{provider: a, model: m}]}}\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text, env=ENV)
    assert [(where(p), p.line) for p in info.value.problems] == [
        ("providers.a.base_url", 2), ("providers.b.api_key", 3)]


def test_config_objects_are_frozen():
    config = load_config(FIXTURES / "good" / "minimal.yaml", env={})
    assert isinstance(config, Config)
    with pytest.raises(pydantic.ValidationError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        config.routes["chat"].retries = 9  # type: ignore[misc]


def test_dev_key_is_allowed_on_loopback_hosts():
    base = ("auth: {dev_api_key: sk-dev-0123456789abcdef}\n"
            "providers: {p: {type: mock}}\nroutes: {r: {backends: [{provider: p, model: m}]}}\n")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert parse_config(base + f"server: {{host: '{host}'}}\n", env={}).auth.dev_api_key
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com"):
        with pytest.raises(ConfigError, match="dev_api_key"):
            parse_config(base + f"server: {{host: '{host}'}}\n", env={})


def test_unreadable_files_are_problems_not_tracebacks(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["check-config", str(missing)]) == 1
    assert "cannot read file" in capsys.readouterr().err
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"providers: {p: {type: mock}}\n\xff\xfe\x00")
    assert main(["check-config", str(binary)]) == 1
    err = capsys.readouterr().err
    assert f"{binary}: (top): cannot read file" in err
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_config(huge, env={})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "ROUTER_TEST_SECRET": CANARY}
    return subprocess.run([sys.executable, "-m", "router", *args], capture_output=True,
                          text=True, timeout=30, cwd=ROOT, env=env, check=False)


def test_check_config_as_a_process():
    ok = run_cli("check-config", str(FIXTURES / "good" / "minimal.yaml"))
    assert (ok.returncode, ok.stderr) == (0, "")
    assert ok.stdout.strip().endswith(": ok")
    bad_file = FIXTURES / "bad" / "env_unset.yaml"
    bad = run_cli("check-config", str(bad_file))
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        f"{bad_file}: providers.openai.api_key: environment variable ROUTER_TEST_UNSET_KEY "
        "is not set (line 6)")
    for path in ("python_tag.yaml", "alias_bomb.yaml", "truncated.yaml"):
        res = run_cli("check-config", str(FIXTURES / "bad" / path))
        assert res.returncode == 1, path
        assert res.stderr and "Traceback" not in res.stderr, res.stderr
    missing = run_cli("check-config", "/nonexistent/router.yaml")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    usage = run_cli("check-config")
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_metrics_path_cannot_take_any_path_of_the_route_table() -> None:
    """A metrics path on one of the router's own paths would fail the server's start (aiohttp
    refuses a second route): every such path is refused by validation instead."""
    own = {path for endpoint in routes.ENDPOINTS for path in endpoint.paths
           if path != "/metrics"}
    assert "/admin" in own
    for path in own:
        with pytest.raises(pydantic.ValidationError):
            MetricsConfig(path=path.replace("{", "x").replace("}", "x").replace(":.+", ""))
