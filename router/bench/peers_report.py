"""The peers bench's output: one JSON document (every round and its summary), a Markdown table
and, when matplotlib is installed, a PNG (latency CDF per target, throughput bars). Every ratio
in them is taken between medians of the same run."""

from __future__ import annotations

import importlib
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.bench.peers import PeersRun, Target, settings_dict

FORMAT_VERSION = 1
ROUTERS = ("router", "router-bare", "floor")
PEERS = ("direct", "floor", "nginx", "litellm")
# The ratio columns of the Markdown table, when both sides were measured. For req/s and
# streams/s, floor / litellm is the most router / litellm can be on this stack.
COLUMNS = (("router", "nginx"), ("router", "litellm"), ("router", "floor"),
           ("floor", "litellm"))


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    scenario: str
    path: tuple[str, ...]
    unit: str
    scale: float = 1.0
    openloop: bool = False  # measured at the open-loop rate: void when the target saturated


METRICS = (
    Metric("rps", "req/s, non-streamed, closed loop c={connections}", "throughput", ("rps",),
           "req/s"),
    Metric("cpu_us_per_req", "proxy CPU per request (c={connections})", "throughput",
           ("cpu_us_per_req",), "µs"),
    Metric("open_p50_ms", "latency p50, open loop {rate:g} req/s", "openloop",
           ("latency_ms", "p50"), "ms", openloop=True),
    Metric("open_p90_ms", "latency p90, open loop", "openloop", ("latency_ms", "p90"), "ms",
           openloop=True),
    Metric("open_p99_ms", "latency p99, open loop", "openloop", ("latency_ms", "p99"), "ms",
           openloop=True),
    Metric("open_p999_ms", "latency p99.9, open loop", "openloop", ("latency_ms", "p99.9"), "ms",
           openloop=True),
    Metric("send_lag_p99_ms", "generator send lag p99, open loop", "openloop",
           ("send_lag_ms", "p99"), "ms", openloop=True),
    Metric("c1_p50_ms", "latency p50, closed loop c=1", "c1", ("latency_ms", "p50"), "ms"),
    Metric("c1_stream_ttfb_p50_ms", "stream first byte p50, closed loop c=1", "c1",
           ("stream_ttfb_ms", "p50"), "ms"),
    Metric("streams_per_s", "20-chunk streams/s, {stream_connections} concurrent", "streams",
           ("streams_per_s",), "streams/s"),
    Metric("stream_ttfb_p50_ms", "stream first byte p50, {stream_connections} concurrent",
           "streams", ("ttfb_ms", "p50"), "ms"),
    Metric("chunk_us_p50", "stream chunk spacing ((last - first bytes) / 20), p50", "streams",
           ("per_chunk_ms", "p50"), "µs", scale=1000.0),
    Metric("cpu_us_per_stream", "proxy CPU per 20-chunk stream", "streams",
           ("cpu_us_per_stream",), "µs"),
)
RATIO_KEYS = ("rps", "streams_per_s", "cpu_us_per_req", "cpu_us_per_stream", "rss_open_mb")
ADDED_KEYS = ("open_p50_ms", "open_p99_ms", "c1_p50_ms", "c1_stream_ttfb_p50_ms",
              "stream_ttfb_p50_ms")


def stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "n": len(values)}


def _value(result: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = result
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) else None


def _target_summary(t: Target) -> dict[str, dict[str, float] | None]:
    out: dict[str, dict[str, float] | None] = {}
    for m in METRICS:
        values = [v * m.scale for r in t.rounds[m.scenario]
                  if (v := _value(r, m.path)) is not None]
        out[m.key] = stats(values)
    for key in ("idle_mb", "open_mb"):
        out[f"rss_{key}"] = stats([t.rss[key]]) if t.rss else None
    return out


def _median(doc: dict[str, Any], target: str, key: str) -> float | None:
    entry = doc["targets"].get(target)
    if not entry or entry["status"] == "skipped":
        return None
    summary = entry["summary"].get(key)
    return None if summary is None else float(summary["median"])


def ratios(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{metric: {"router/nginx": median ÷ median, ...}} for each router variant against each
    other target measured in this run."""
    out: dict[str, dict[str, float]] = {}
    for key in RATIO_KEYS:
        pairs: dict[str, float] = {}
        for mine in ROUTERS:
            for other in PEERS:
                if other == mine:
                    continue
                a, b = _median(doc, mine, key), _median(doc, other, key)
                if a is not None and b:
                    pairs[f"{mine}/{other}"] = a / b
        out[key] = pairs
    return out


def added_vs_direct(doc: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{target: {metric: its median - direct's median (ms)}}; None for an open-loop figure of a
    target that could not keep the rate (its figures are at another rate)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, entry in doc["targets"].items():
        if name == "direct" or entry["status"] == "skipped":
            continue
        added: dict[str, float | None] = {}
        for key in ADDED_KEYS:
            mine, base = _median(doc, name, key), _median(doc, "direct", key)
            void = key.startswith("open_") and entry["saturated"]
            added[key] = None if mine is None or base is None or void else mine - base
        out[name] = added
    return out


def document(run: PeersRun) -> dict[str, Any]:
    """The JSON document of one run."""
    targets: dict[str, Any] = {}
    for t in run.targets:
        targets[t.name] = {
            "status": "failed" if t.failed else "measured", "failure": t.failed,
            "version": t.version, "describe": t.describe, "open_loop_rate": t.rate,
            "saturated": t.saturated, "summary": _target_summary(t), "rss": t.rss,
            "rounds": t.rounds}
    for name, reason in run.skipped.items():
        targets[name] = {"status": "skipped", "reason": reason}
    order = [n for n in run.settings.targets if n in targets]
    doc: dict[str, Any] = {
        "kind": "router-bench-peers", "format": FORMAT_VERSION, "run_id": run.run_id,
        "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at),
        "machine": run.machine, "settings": settings_dict(run.settings),
        "targets": {n: targets[n] for n in order}, "notes": run.notes}
    doc["ratios"] = ratios(doc)
    doc["added_vs_direct_ms"] = added_vs_direct(doc)
    return doc


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# -- Markdown -----------------------------------------------------------------------------------

def _number(x: float, unit: str) -> str:
    if unit in ("req/s", "streams/s"):
        return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"
    if unit == "ms":
        return f"{x:.2f}" if x < 100 else f"{x:,.0f}"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _cell(summary: dict[str, float] | None, unit: str) -> str:
    if summary is None:
        return "-"
    mid = _number(summary["median"], unit)
    if summary["n"] < 2:
        return mid
    return f"{mid} ({_number(summary['min'], unit)}-{_number(summary['max'], unit)})"


def _ratio(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 0.01:
        return f"{x:.4f}x"
    return f"{x:.2f}x" if x < 10 else f"{x:,.0f}x"


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}"


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    shown = [n for n, e in doc["targets"].items() if e["status"] != "skipped"]
    vs = [f"{a}/{b}" for a, b in COLUMNS if a in shown and b in shown]
    header = ["metric", *shown, *(v.replace("/", " / ") for v in vs)]
    rows: list[list[str]] = []
    fmt = {"connections": s["connections"], "rate": s["rate"],
           "stream_connections": s["stream_connections"]}
    for m in METRICS:
        row = [f"{m.label.format(**fmt)} ({m.unit})"]
        for name in shown:
            entry = doc["targets"][name]
            cell = _cell(entry["summary"][m.key], m.unit)
            if m.openloop and entry["saturated"] and cell != "-":
                cell = f"saturated; at {entry['open_loop_rate']:g} req/s: {cell}"
            row.append(cell)
        row += [_ratio(doc["ratios"].get(m.key, {}).get(v)) for v in vs]
        rows.append(row)
    for key, label in (("open_p50_ms", "added p50 vs direct, open loop (ms)"),
                       ("open_p99_ms", "added p99 vs direct, open loop (ms)"),
                       ("c1_p50_ms", "added p50 vs direct, c=1 (ms)"),
                       ("c1_stream_ttfb_p50_ms", "added stream first byte p50 vs direct, c=1 (ms)"),
                       ("stream_ttfb_p50_ms", "added stream first byte p50 vs direct, "
                        f"{s['stream_connections']} concurrent (ms)")):
        row = [label]
        for name in shown:
            added = doc["added_vs_direct_ms"].get(name)
            if added is None:
                row.append("-")
            elif added.get(key) is None and doc["targets"][name]["saturated"] \
                    and key.startswith("open_"):
                row.append("saturated")
            else:
                row.append(_signed(added.get(key)))
        rows.append(row + ["-"] * len(vs))
    streams = s["open_streams"]
    for key, label in (("rss_idle_mb", "proxy RSS, idle after the rounds (MiB)"),
                       ("rss_open_mb", f"proxy RSS, {streams:,} open streams (MiB, once)")):
        row = [label, *(_cell(doc["targets"][n]["summary"][key], "MiB") for n in shown)]
        row += [_ratio(doc["ratios"].get(key, {}).get(v)) for v in vs]
        rows.append(row)
    lines = [f"Peers, run {doc['run_id']} ({doc['started_at']}): median (min-max) over "
             f"{s['rounds']} rounds; ratios between medians of this run", "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    machine = doc["machine"]
    placement = (f"proxies on CPU {machine['proxy_cpu']}, upstream and load generators on CPU "
                 f"{machine['load_cpu']}" if machine["pinned"] else "not pinned")
    lines.append(f"- {placement}; {machine['cpus']} CPUs, load average "
                 f"{', '.join(f'{x:.1f}' for x in machine['loadavg'])} at the end; closed loop "
                 f"by {machine['load_generator']}; phases {s['phase_s']:g} s "
                 f"(LiteLLM {s['slow_phase_s']:g} s)")
    for name, entry in doc["targets"].items():
        if entry["status"] == "skipped":
            lines.append(f"- {name}: skipped: {entry['reason'].splitlines()[0]}")
            continue
        lines.append(f"- {name} ({entry['version']}): {entry['describe']}")
        if entry["failure"]:
            lines.append(f"  - failed, later rounds not measured: {entry['failure']}")
        failed = _failed_requests(entry["rounds"])
        if failed:
            lines.append(f"  - failed requests (non-2xx, socket errors, timeouts): {failed}")
    lines += [f"- {note}" for note in doc["notes"]]
    return "\n".join(lines) + "\n"


def _failed_requests(rounds: dict[str, list[dict[str, Any]]]) -> str:
    """'closed loop 3, open loop 1' over all rounds; '' when none failed."""
    counts = {
        "closed loop": sum(int(r.get("failures", 0)) for r in rounds["throughput"]),
        "open loop": sum(sum(r.get("errors", {}).values()) for r in rounds["openloop"]),
        "c=1": sum(int(r.get("errors", 0)) for r in rounds["c1"]),
        "streams": sum(int(r.get("errors", 0)) for r in rounds["streams"]),
    }
    return ", ".join(f"{where} {n}" for where, n in counts.items() if n)


# -- files --------------------------------------------------------------------------------------

def write(doc: dict[str, Any], directory: Path) -> tuple[list[Path], str | None]:
    """JSON, Markdown and (if it can) PNG under `directory`, named by the run's start; the
    files written and why there is no PNG, if there is none."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = "peers-" + doc["started_at"].replace(":", "").replace("-", "").rstrip("Z")
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    md_path = directory / f"{stem}.md"
    md_path.write_text(markdown(doc))
    written = [json_path, md_path]
    png_path = directory / f"{stem}.png"
    why_not = plot(doc, png_path)
    if why_not is None:
        written.append(png_path)
    return written, why_not


def plot(doc: dict[str, Any], path: Path) -> str | None:
    """The latency CDF (open loop, each target's median round) and the throughput bars; the
    reason when there is no plot."""
    try:  # an optional extra: looked up at run time, typed Any whether installed or not
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "matplotlib is not installed (`pip install -e '.[bench]'`): no PNG"
    measured = [(n, e) for n, e in doc["targets"].items() if e["status"] != "skipped"]
    fig, (cdf_ax, bar_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for name, entry in measured:
        rounds = [r for r in entry["rounds"]["openloop"] if r.get("cdf_ms")]
        if not rounds:
            continue
        middle = sorted(rounds, key=lambda r: float(r["latency_ms"]["p50"]))[len(rounds) // 2]
        points = middle["cdf_ms"]
        label = f"{name} ({middle['rate']:g} req/s{', saturated' if entry['saturated'] else ''})"
        cdf_ax.plot([ms for _, ms in points], [p for p, _ in points], label=label)
    cdf_ax.set_xscale("log")
    cdf_ax.set_xlabel("latency (ms, log scale)")
    cdf_ax.set_ylabel("percentile")
    cdf_ax.set_title("open-loop latency CDF (median round)")
    cdf_ax.grid(True, which="both", alpha=0.3)
    cdf_ax.legend(fontsize=8)
    names, medians, low, high = [], [], [], []
    for name, entry in measured:
        rps = entry["summary"]["rps"]
        if rps is None:
            continue
        names.append(name)
        medians.append(rps["median"])
        low.append(rps["median"] - rps["min"])
        high.append(rps["max"] - rps["median"])
    bar_ax.bar(names, medians, yerr=[low, high], capsize=4)
    bar_ax.set_yscale("log")
    bar_ax.set_ylabel("req/s (log scale), min-max over rounds")
    bar_ax.set_title(f"non-streamed throughput, c={doc['settings']['connections']}")
    for x, y in enumerate(medians):
        bar_ax.annotate(f"{y:,.0f}", (x, y), ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"router bench --peers, run {doc['run_id']} ({doc['started_at']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
