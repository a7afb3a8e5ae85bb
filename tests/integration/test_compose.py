"""deploy/compose.yaml without a container engine (none here): the YAML, every file it builds
from or mounts, the router config it serves (`router check-config`), the Prometheus config it
mounts (`promtool check config`, rules included), and Grafana's provisioning variables."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """Bind mounts as (host path resolved against deploy/, container path); named volumes out."""
    out = []
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        if source.startswith((".", "/")):
            out.append(((DEPLOY / source).resolve(), target))
    return out


def test_services_and_the_files_they_use_exist() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"router", "redis", "prometheus", "grafana"}
    build = services["router"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    dockerfile = context / build["dockerfile"]
    assert dockerfile.is_file()
    copied = 0
    for line in dockerfile.read_text().splitlines():  # what the image copies is in the context
        if line.startswith("COPY ") and "--from=" not in line:  # --from: an earlier stage's
            for source in [w for w in line.split()[1:-1] if not w.startswith("--")]:
                assert (context / source).exists(), source
                copied += 1
    assert copied >= 4  # the constraints, pyproject.toml, README.md, router/
    named = set(doc.get("volumes") or {})
    for name, service in services.items():
        for host, _ in mounts(service):
            assert host.exists(), f"{name} mounts {host}, which does not exist"
        for spec in service.get("volumes", []):
            source = spec.split(":")[0]
            assert source.startswith((".", "/")) or source in named, (name, spec)
        for dep in service.get("depends_on", []):
            assert dep in services
        assert "healthcheck" in service, f"{name} has no healthcheck"
    # Published ports stay on the host's loopback.
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def _router_config_path() -> Path:
    router = compose()["services"]["router"]
    config_arg = router["command"][router["command"].index("--config") + 1]
    for host, target in mounts(router):
        if target == config_arg:
            return host
    raise AssertionError(f"{config_arg} is not mounted into the router")


def test_router_config_passes_check_config() -> None:
    path = _router_config_path()
    env = {**os.environ, "ROUTER_ADMIN_KEY_SHA256": hashlib.sha256(b"sk-any").hexdigest()}
    done = subprocess.run([sys.executable, "-m", "router", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # Every ${VAR} the file needs is set by the compose service.
    needed = set(re.findall(r"\$\{(\w+)", path.read_text()))
    assert needed <= set(compose()["services"]["router"].get("environment", {}))
    config = yaml.safe_load(path.read_text())
    assert config["store"]["url"].startswith("redis://redis:")
    assert config["server"]["port"] == 8080


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) absent")
def test_prometheus_config_and_its_rules(tmp_path: Path) -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    by_target = {target: host for host, target in mounts(prometheus)}
    config_file = next(a.split("=", 1)[1] for a in prometheus["command"]
                       if a.startswith("--config.file="))
    config = yaml.safe_load(by_target[config_file].read_text())
    # The rule files as the container sees them, pointed at the files mounted there.
    rules = [str(by_target[path]) for path in config["rule_files"]]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump({**config, "rule_files": rules}))
    done = subprocess.run(["promtool", "check", "config", str(local)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    router_config = yaml.safe_load(_router_config_path().read_text())
    assert targets == [f"router:{router_config['server']['port']}"]
    assert config["scrape_configs"][0]["metrics_path"] == router_config["metrics"]["path"]


def test_grafana_gets_every_variable_its_provisioning_needs() -> None:
    grafana = compose()["services"]["grafana"]
    env = grafana["environment"]
    by_target = {target: host for host, target in mounts(grafana)}
    provisioning = by_target[env["GF_PATHS_PROVISIONING"]]
    needed = {m for f in provisioning.rglob("*.yaml") for line in f.read_text().splitlines()
              for m in re.findall(r"\$\{?([A-Z_]+)", line.split("#")[0])}
    assert needed and needed <= set(env)
    assert by_target[env["ROUTER_DASHBOARDS"]] == (ROOT / "grafana" / "dashboards")
    assert any(by_target[env["ROUTER_DASHBOARDS"]].glob("*.json"))
    assert env["PROMETHEUS_URL"] == "http://prometheus:9090"


def test_grafana_opens_on_the_router_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    by_target = {target: host for host, target in mounts(grafana)}
    mounted = next(host / home.relative_to(target) for target, host in by_target.items()
                   if home.is_relative_to(target))
    assert mounted == ROOT / "grafana" / "dashboards" / "router.json"
    assert mounted.is_file()
