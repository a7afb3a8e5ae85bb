"""The peers bench's generated configs (nginx.conf, LiteLLM's YAML), its flags, and its report's
arithmetic: ratios and added latency come from the medians of the one run they describe."""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from router.bench.harness import KEY
from router.bench.litellm_peer import litellm_config
from router.bench.nginx_peer import nginx_binary, nginx_conf
from router.bench.peers import PeersRun, PeersSettings, Target
from router.bench.peers_report import document, markdown
from router.bench.plan import PEER_TARGETS, parse
from router.bench.proctree import descendants, tree_cpu_seconds, tree_rss_mb
from router.bench.progress import Progress


def test_nginx_conf_is_a_plain_keepalive_proxy_confined_to_its_dir(tmp_path: Path) -> None:
    conf = nginx_conf(18080, 19090, tmp_path, 3024)
    for line in ("daemon off;", "master_process off;", "worker_processes 1;", "access_log off;",
                 "server 127.0.0.1:19090;", "keepalive 64;", "proxy_pass http://fast;",
                 "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                 "proxy_buffering off;", "worker_connections 3024;",
                 f"pid {tmp_path}/nginx.pid;", f"error_log {tmp_path}/error.log warn;"):
        assert line in conf, line
    assert re.search(r"listen 127\.0\.0\.1:18080\b", conf)
    assert re.search(r"upstream fast \{[^}]*keepalive 64;", conf)
    # Every file nginx would write is in the temp dir: nothing in /var/log or /var/lib.
    paths = re.findall(r"(?:_path|pid|error_log) (/\S+?)[; ]", conf)
    assert len(paths) >= 7
    assert all(path.startswith(str(tmp_path)) for path in paths), paths
    assert conf.count("{") == conf.count("}")


def test_nginx_accepts_the_generated_conf(tmp_path: Path) -> None:
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (`make bench-deps` installs it)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(18080, 19090, tmp_path, 1024))
    done = subprocess.run([binary, "-t", "-p", str(tmp_path), "-c", str(conf), "-e",
                           str(tmp_path / "error.log")], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def test_litellm_config_points_every_model_at_the_upstream() -> None:
    models = ("bench-fast", "bench-hold", "bench-chunks-20")
    config = yaml.safe_load(yaml.safe_dump(litellm_config(19090, models)))
    entries = config["model_list"]
    assert [e["model_name"] for e in entries] == list(models)
    for entry in entries:
        params = entry["litellm_params"]
        assert params["model"] == f"openai/{entry['model_name']}"
        assert params["api_base"] == "http://127.0.0.1:19090/v1"
    assert config["general_settings"]["master_key"] == KEY  # the key the bench clients send
    assert config["litellm_settings"]["num_retries"] == 0


def test_peers_flags() -> None:
    plan = parse(["--peers", "--quick"])
    assert plan.peers and not plan.peers_only
    assert plan.peer_targets == PEER_TARGETS
    assert plan.peers_rounds == 3 and plan.peers_phase_s == 2.0 and plan.peers_streams == 200
    plan = parse(["--peers-only", "--peer-targets", "nginx,direct", "--peer-rounds", "5",
                  "--results", "/tmp/out"])
    assert plan.peers_only and plan.peer_targets == ("direct", "nginx")  # the tables' order
    assert plan.peers_rounds == 5 and plan.results_dir == "/tmp/out"
    with pytest.raises(SystemExit):
        parse(["--peers", "--peer-targets", "nginx,envoy"])


def _target(name: str, rps: list[float], p50: list[float], *, saturated: bool = False,
            rss: float | None = None) -> Target:
    t = Target(name, 1, KEY, None if name == "direct" else 10, "v", "d", rate=300.0,
               saturated=saturated)
    for r, p in zip(rps, p50, strict=True):
        t.rounds["throughput"].append({"rps": r, "cpu_us_per_req": None if t.pid is None
                                       else 1e6 / r})
        t.rounds["openloop"].append({"rate": 300.0, "latency_ms": {"p50": p, "p99": 2 * p},
                                     "cdf_ms": [[0, p], [100, 2 * p]]})
        t.rounds["c1"].append({"latency_ms": {"p50": p / 2}})
        t.rounds["streams"].append({"streams_per_s": r / 10, "ttfb_ms": {"p50": p},
                                    "per_chunk_ms": {"p50": 0.001}, "cpu_us_per_stream": 50.0})
    if rss is not None:
        t.rss = {"idle_mb": rss, "open_mb": rss + 10}
    if name == "litellm":
        t.rounds["throughput"][0]["failures"] = 3
        t.rounds["openloop"][1]["errors"] = {"TimeoutError": 2}
    return t


def _run() -> PeersRun:
    s = PeersSettings(targets=PEER_TARGETS, rounds=3, phase_s=1, slow_phase_s=1, warmup_s=1,
                      rate=300.0, connections=64, stream_connections=32, c1_count=10,
                      slow_c1_count=5, open_streams=100, results_dir="out")
    targets = [_target("direct", [60000, 50000, 70000], [0.1, 0.2, 0.1]),
               _target("router", [4000, 3000, 5000], [0.5, 0.6, 0.7], rss=70),
               _target("floor", [8000, 9000, 7000], [0.3, 0.4, 0.3], rss=30),
               _target("nginx", [40000, 45000, 41000], [0.3, 0.3, 0.4], rss=8),
               _target("litellm", [60, 64, 70], [15, 16, 14], saturated=True, rss=600)]
    machine = {"cpus": 2, "pinned": True, "proxy_cpu": 0, "load_cpu": 1,
               "load_generator": "wrk", "loadavg": [1.0, 1.0, 1.0]}
    return PeersRun("abc", 0.0, 1.0, s, machine, targets,
                    {"router-bare": "not asked"}, ["a note"])


def test_report_ratios_are_between_medians_of_the_run() -> None:
    doc = document(_run())
    router = doc["targets"]["router"]["summary"]
    assert router["rps"] == {"min": 3000, "median": 4000, "max": 5000, "n": 3}
    assert doc["ratios"]["rps"]["router/nginx"] == pytest.approx(4000 / 41000)
    assert doc["ratios"]["rps"]["router/litellm"] == pytest.approx(4000 / 64)
    assert doc["ratios"]["rps"]["router/direct"] == pytest.approx(4000 / 60000)
    assert doc["ratios"]["rss_open_mb"]["router/nginx"] == pytest.approx(80 / 18)
    assert "router-bare/nginx" not in doc["ratios"]["rps"]  # skipped: no figure, no ratio
    # The floor: the router's share of it, and the most the router could reach over LiteLLM.
    assert doc["ratios"]["rps"]["router/floor"] == pytest.approx(4000 / 8000)
    assert doc["ratios"]["rps"]["floor/litellm"] == pytest.approx(8000 / 64)
    assert "floor/floor" not in doc["ratios"]["rps"]
    added = doc["added_vs_direct_ms"]
    assert added["router"]["open_p50_ms"] == pytest.approx(0.6 - 0.1)
    assert added["nginx"]["c1_p50_ms"] == pytest.approx(0.15 - 0.05)
    # LiteLLM could not keep the rate: its open-loop figures are at another rate, not "added".
    assert added["litellm"]["open_p50_ms"] is None
    assert added["litellm"]["c1_p50_ms"] == pytest.approx(7.5 - 0.05)
    assert doc["targets"]["router-bare"] == {"status": "skipped", "reason": "not asked"}


def test_report_markdown_names_every_target_and_the_saturated_one() -> None:
    text = markdown(document(_run()))
    header = next(line for line in text.splitlines() if line.startswith("| metric"))
    assert header.split(" | ")[1:6] == ["direct", "router", "floor", "nginx", "litellm"]
    assert header.rstrip(" |").split(" | ")[6:] == ["router / nginx", "router / litellm",
                                                   "router / floor", "floor / litellm"]
    assert "| 125x |" in text  # floor / litellm throughput: 8,000 / 64
    assert "saturated; at 300 req/s" in text
    assert "| 4,000 (3,000-5,000) |" in text
    assert "router-bare: skipped: not asked" in text
    assert "failed requests (non-2xx, socket errors, timeouts): closed loop 3, open loop 2" in text
    assert text.count("failed requests") == 1


def test_process_tree_figures_of_this_process() -> None:
    assert descendants(os.getpid())[0] == os.getpid()
    assert tree_cpu_seconds(os.getpid()) > 0
    assert tree_rss_mb(os.getpid()) > 1


def test_progress_without_a_terminal_writes_one_line_per_step() -> None:
    out = io.StringIO()
    progress = Progress("peers", 2, out)
    progress.round(1, 3)
    progress.step("throughput · nginx")
    progress.step("openloop · nginx")
    progress.done()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("peers: round 1/3 · throughput · nginx [0/2, 0:00")
    assert "~0:00 left" in lines[1]
    assert lines[-1].startswith("peers: done in")


def test_litellm_missing_is_a_reason_not_a_crash(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from router.bench import litellm_peer
    from router.bench.harness import Machine, processes

    monkeypatch.setattr(litellm_peer, "VENV", tmp_path / "no-venv")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("ROUTER_BENCH_LITELLM", raising=False)
    assert litellm_peer.litellm_binary() is None
    with processes() as procs, pytest.raises(FileNotFoundError, match="make bench-deps"):
        litellm_peer.start_litellm(procs, Machine(pinned=False, wrk=None), tmp_path, 1,
                                   ("bench-fast",))
