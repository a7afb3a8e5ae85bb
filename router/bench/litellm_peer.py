"""The `litellm` peer of `router bench --peers`: the LiteLLM proxy from its own venv, one worker,
with a model list pointing at the same fast upstream as an OpenAI-compatible backend."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import yaml

from router.bench.harness import KEY, ROUTER_CPU, Machine, Processes, wait_ready
from router.bench.peer_process import Started
from router.bench.redis_server import free_port

SOURCE_ROOT = Path(__file__).resolve().parents[2]
# `make bench-deps` creates it; ROUTER_BENCH_LITELLM names another `litellm` executable.
VENV = SOURCE_ROOT / ".venv-litellm"
START_TIMEOUT_S = 120.0  # its imports alone take several seconds on a busy core


def litellm_binary() -> Path | None:
    for candidate in (os.environ.get("ROUTER_BENCH_LITELLM"), str(VENV / "bin" / "litellm"),
                      shutil.which("litellm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def litellm_config(upstream_port: int, models: Sequence[str], master_key: str = KEY
                   ) -> dict[str, object]:
    """One model_list entry per bench model, each `openai/<name>` at the fast upstream; the
    master key is the key the bench clients send (no database: no virtual keys)."""
    return {
        "model_list": [
            {"model_name": name,
             "litellm_params": {"model": f"openai/{name}",
                                "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                                "api_key": "sk-bench-upstream"}}
            for name in models],
        "general_settings": {"master_key": master_key},
        "litellm_settings": {"drop_params": True, "num_retries": 0, "request_timeout": 300},
    }


def _environment(home: Path) -> dict[str, str]:
    """No network at start-up (the bundled model cost map), no telemetry, quiet logs."""
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False", "DISABLE_ADMIN_UI": "True", "HOME": str(home),
            "NO_DOCKER": "True"}


def start_litellm(procs: Processes, machine: Machine, tmp: Path, upstream_port: int,
                  models: Sequence[str]) -> Started:
    """FileNotFoundError when it is not installed; RuntimeError when it does not answer."""
    binary = litellm_binary()
    if binary is None:
        raise FileNotFoundError("litellm is not installed (`make bench-deps` creates "
                                f"{VENV.name}/ with `pip install 'litellm[proxy]'`)")
    workdir = tmp / "litellm"
    workdir.mkdir(exist_ok=True)
    port = free_port()
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(litellm_config(upstream_port, models), sort_keys=False))
    log = workdir / "litellm.log"
    with log.open("wb") as out:
        proc = procs.start(machine.on(ROUTER_CPU, [str(binary), "--config", str(config),
                                                   "--host", "127.0.0.1", "--port", str(port),
                                                   "--num_workers", "1"]),
                           stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                           env=_environment(workdir))
    wait_ready(proc, port, [log], START_TIMEOUT_S)
    version = subprocess.run([str(binary.with_name("python")), "-c",
                              "from importlib.metadata import version; print(version('litellm'))"],
                             capture_output=True, text=True, check=False, timeout=60)
    return Started(proc, port, f"LiteLLM {version.stdout.strip() or '?'}", log)
