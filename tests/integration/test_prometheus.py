"""The Grafana dashboard and the alert rules, proven against a real Prometheus scraping the router.

Traffic of every kind the router serves today goes through it (ok JSON, stream, 422, 401, 403,
unknown model 404, upstream 429, upstream 500 -> 502 after retries, a fallback, an ejection,
a fan-out race, config reloads); a real `prometheus` on loopback scrapes /metrics every second,
and every query of every panel of grafana/dashboards/router.json, template variables
substituted, must return data.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import KEY, OTHER_KEY, USER_MSG, openai_provider, router_config
from tests.prometheus_server import JOB, PROMETHEUS, PROMTOOL, promtool, running_prometheus

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "router.json"
RULES = GRAFANA / "alerts" / "router-rules.yaml"

needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is not installed (Debian `prometheus`)")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian `prometheus`)")

# Grafana's built-in interval variables, as a Grafana with a 15 s scrape interval would fill them.
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
NO_EJECTION = {"consecutive_failures": 1000}
METRIC_NAME = re.compile(r"\b(router_[a-z0-9_]+)")


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def targets(dash: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) for every query of every panel."""
    return [(p["title"], t["refId"], t["expr"])
            for p in panels(dash) if p["type"] != "row" for t in p["targets"]]


def substitute(expr: str, route: str = ".*", backend: str = ".*") -> str:
    for name, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(name, value)
    expr = expr.replace("${route}", route).replace("$route", route)
    expr = expr.replace("${backend}", backend).replace("$backend", backend)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def metric_families(names: set[str]) -> set[str]:
    """Histogram sample names (_bucket, _count, _sum) mapped to their family."""
    return {re.sub(r"_(bucket|count|sum)$", "", n) if "_seconds_" in n else n for n in names}


def exported_families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


# --- static checks -----------------------------------------------------------------------------

def test_dashboard_is_a_provisionable_grafana_dashboard() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] == 39 and dash["uid"] and dash["id"] is None
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name, metric in (("route", "router_requests_total"), ("backend", "router_backend_up")):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"]
        assert v["allValue"] == ".*"
        assert v["query"]["query"] == f"label_values({metric}, {name})"
        assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"]
            # Multi-value variables become regex alternations: only ever used with =~.
            for var in ("route", "backend"):
                uses = t["expr"].count(f"${var}")
                assert uses == t["expr"].count(f'{var}=~"${var}"'), t["expr"]


def test_provisioning_points_grafana_at_the_dashboard_and_prometheus(monkeypatch) -> None:
    monkeypatch.setenv("PROMETHEUS_URL", "http://127.0.0.1:9090")
    monkeypatch.setenv("ROUTER_DASHBOARDS", str(GRAFANA / "dashboards"))
    # Grafana expands $NAME / ${NAME} from the environment like os.path.expandvars.
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert os.path.expandvars(source["url"]) == "http://127.0.0.1:9090"
    boards = yaml.safe_load((GRAFANA / "provisioning/dashboards/router.yaml").read_text())
    [provider] = boards["providers"]
    assert provider["type"] == "file"
    path = Path(os.path.expandvars(provider["options"]["path"]))
    assert (path / DASHBOARD.name).samefile(DASHBOARD)


@needs_promtool
async def test_alert_rules_pass_promtool_check() -> None:
    code, out = await promtool("check", "rules", str(RULES))
    assert code == 0, out
    assert "SUCCESS" in out


@needs_promtool
async def test_alert_rules_fire_on_bad_series_and_stay_quiet_on_good_ones(tmp_path) -> None:
    # promtool compares annotations exactly: test the expressions, `for` and labels on a copy
    # without them (`check rules` above validates the annotation templates).
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    req = 'router_requests_total{route="m",backend="a/x",stream="false",status="%s"}'
    ttfb = 'router_time_to_first_byte_seconds_bucket{route="m",backend="a/x",le="%s"}'
    bad = [
        {"series": req % "200", "values": "0+60x30"},
        {"series": req % "502", "values": "0+30x30"},
        {"series": ttfb % "10.0", "values": "0x30"},
        {"series": ttfb % "20.0", "values": "0+60x30"},
        {"series": ttfb % "+Inf", "values": "0+60x30"},
        {"series": 'router_backend_up{backend="a/x"}', "values": "1 1 0x30"},
        {"series": 'router_store_errors_total{op="incr"}', "values": "0+3x30"},
        {"series": 'router_rate_limited_total{limit="rpm"}', "values": "0+300x30"},
        {"series": 'router_config_reloads_total{result="failure"}', "values": "0x19 1x10"},
        {"series": f'up{{job="{JOB}",instance="r:1"}}', "values": "0x30"},
    ]
    good = [
        {"series": req % "200", "values": "0+60x30"},
        {"series": req % "502", "values": "0x30"},
        {"series": ttfb % "0.25", "values": "0+60x30"},
        {"series": ttfb % "10.0", "values": "0+60x30"},
        {"series": ttfb % "+Inf", "values": "0+60x30"},
        {"series": 'router_backend_up{backend="a/x"}', "values": "1x30"},
        {"series": 'router_store_errors_total{op="incr"}', "values": "0x30"},
        {"series": 'router_rate_limited_total{limit="rpm"}', "values": "0+6x30"},
        {"series": 'router_config_reloads_total{result="failure"}', "values": "0x30"},
        {"series": 'router_config_reloads_total{result="success"}', "values": "0+1x30"},
        {"series": f'up{{job="{JOB}",instance="r:1"}}', "values": "1x30"},
    ]
    expected = {
        "RouterHighErrorRatio": [{"severity": "page", "route": "m"}],
        "RouterTimeToFirstByteHigh": [{"severity": "warning", "route": "m", "backend": "a/x"}],
        "RouterBackendDown": [{"severity": "warning", "backend": "a/x"}],
        "RouterStoreErrors": [{"severity": "page", "op": "incr"}],
        "RouterRateLimitStorm": [{"severity": "warning", "limit": "rpm"}],
        "RouterConfigReloadFailed": [{"severity": "warning"}],
        "RouterDown": [{"severity": "page", "job": JOB, "instance": "r:1"}],
    }
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names == set(expected)
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": bad, "alert_rule_test": [
                {"eval_time": "25m", "alertname": name,
                 "exp_alerts": [{"exp_labels": labels} for labels in alerts]}
                for name, alerts in expected.items()]},
            {"interval": "1m", "input_series": good, "alert_rule_test": [
                {"eval_time": "25m", "alertname": name, "exp_alerts": []}
                for name in expected]},
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    code, out = await promtool("test", "rules", str(tmp_path / "tests.yaml"))
    assert code == 0, out


# --- the proof with real parts -----------------------------------------------------------------

async def drive(r: Any) -> None:
    """One round of every kind of traffic the router serves today, with the statuses it gives."""
    def body(model: str, **extra: Any) -> dict[str, Any]:
        return {"model": model, "messages": USER_MSG, **extra}

    cases: list[tuple[dict[str, Any], str | None, int]] = [
        (body("m"), KEY, 200),
        (body("m"), KEY, 200),
        (body("m", stream=True), KEY, 200),
        (body("fb", stream=True), KEY, 200),
        ({"model": "m", "messages": "nope"}, KEY, 422),
        (body("m"), "sk-wrong-key", 401),
        (body("m"), None, 401),
        (body("broken"), OTHER_KEY, 403),
        (body("no-such-model"), KEY, 404),
        (body("busy"), KEY, 429),
        (body("broken"), KEY, 502),
        (body("main"), KEY, 200),  # its backend fails: served by the fallback route
        (body("raced", stream=True), KEY, 200),  # fan-out: a race of two backends
        (body("flaky"), KEY, 200),
        (body("flaky"), KEY, 200),
        (body("flaky"), KEY, 200),
    ]
    for payload, key, status in cases:
        async with r.chat(payload, key=key) as resp:
            await resp.read()
            assert resp.status == status, (payload, key, resp.status)


@needs_prometheus
async def test_every_dashboard_query_returns_data_from_a_real_prometheus(
        fakes, start_router, tmp_path) -> None:
    up, bad, busy = await fakes("up"), await fakes("bad"), await fakes("busy")
    bad.recorder.override = "status:500"
    busy.recorder.override = "status:429+retry-after:1"
    config = router_config(
        {"up": openai_provider(up), "bad": openai_provider(bad),
         "busy": openai_provider(busy)},
        {"m": {"backends": [{"provider": "up", "model": "gpt-x"}], "ejection": NO_EJECTION},
         "broken": {"retries": 1, "ejection": NO_EJECTION,
                    "backends": [{"provider": "bad", "model": "gpt-x"},
                                 {"provider": "bad", "model": "gpt-y"}]},
         "main": {"retries": 0, "fallbacks": ["fb"], "ejection": NO_EJECTION,
                  "backends": [{"provider": "bad", "model": "gpt-main"}]},
         "fb": {"backends": [{"provider": "up", "model": "gpt-fb"}], "ejection": NO_EJECTION},
         "raced": {"fanout": "race", "ejection": NO_EJECTION,
                   "backends": [{"provider": "up", "model": "gpt-race"},
                                {"provider": "up", "model": "first-byte:2"}]},
         "busy": {"retries": 0, "ejection": NO_EJECTION,
                  "backends": [{"provider": "busy", "model": "gpt-x"}]},
         "flaky": {"retries": 1,
                   "ejection": {"consecutive_failures": 1, "base_cooldown_s": 0.2,
                                "max_cooldown_s": 0.2},
                   "backends": [{"provider": "bad", "model": "gpt-flaky"},
                                {"provider": "up", "model": "gpt-flaky"}]}})
    r = await start_router(config)
    good_yaml = r.path.read_text()
    target = r.url.removeprefix("http://")

    async with running_prometheus(tmp_path / "prometheus", [target],
                                  rule_files=[RULES]) as prom:
        # Two rounds of traffic with a scrape after each: every counter has moved between two
        # samples, so rate() and histogram_quantile() have something to say.
        await drive(r)
        assert await r.worker.watcher.reload("test")
        await prom.wait_scrape_after(time.time())
        await drive(r)
        assert await r.worker.watcher.reload("test")
        r.write_config("routes: [this is not a config")
        assert not await r.worker.watcher.reload("test")
        r.write_config(good_yaml)
        await prom.wait_scrape_after(time.time())

        async with r.http.get(f"{r.url}/metrics") as resp:
            exposition = await resp.text()
        exported = exported_families(exposition)

        dash = dashboard()
        empty = []
        for title, ref, expr in targets(dash):
            names = metric_families(set(METRIC_NAME.findall(expr)))
            assert names and names <= exported, f"{title}: {names - exported} not exported"
            result = await prom.query(substitute(expr))
            values = [float(s["value"][1]) for s in result]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{title} [{ref}]: {substitute(expr)} -> {result}")
        assert not empty, "panel queries without data:\n" + "\n".join(empty)
        # The fan-out panel falls back to 0 without fan-out traffic: its series must be real.
        fanout = await prom.query("sum by (mode, outcome) (router_fanout_total)")
        assert {(s["metric"]["mode"], s["metric"]["outcome"]) for s in fanout} >= \
            {("race", "won"), ("race", "cancelled")}

        # A concrete choice of route and backend filters every panel that has those labels.
        for title, _ref, expr in targets(dash):
            for s in await prom.query(substitute(expr, route="m", backend="up/gpt-x")):
                assert s["metric"].get("route", "m") == "m", title
                assert s["metric"].get("backend", "up/gpt-x") == "up/gpt-x", title

        # The template variables' label_values() queries find the config's names.
        routes = await prom.api("label/route/values", **{"match[]": "router_requests_total"})
        assert {"m", "broken", "main", "busy", "flaky", "unknown"} <= set(routes)
        backends = await prom.api("label/backend/values", **{"match[]": "router_backend_up"})
        assert {"up/gpt-x", "bad/gpt-x", "up/gpt-fb", "bad/gpt-flaky"} <= set(backends)

        # The alert rules load into a real Prometheus and evaluate against real series.
        deadline = time.monotonic() + 5
        while True:  # evaluated every second; "unknown" until the first evaluation
            rules = await prom.api("rules")
            loaded = [rule for g in rules["groups"] for rule in g["rules"]]
            if all(rule["health"] != "unknown" for rule in loaded) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        rule_names = {r_["name"] for r_ in loaded}
        assert len(loaded) == 7 and "RouterHighErrorRatio" in rule_names
        for rule in loaded:
            assert rule["health"] == "ok", rule
            names = metric_families(set(METRIC_NAME.findall(rule["query"])))
            assert names <= exported, f"{rule['name']}: {names - exported} not exported"

    # promtool lints the exposition as Prometheus would read it.
    code, out = await promtool("check", "metrics", stdin=exposition.encode())
    assert code == 0, out


@needs_prometheus
async def test_a_fanout_all_request_shows_under_each_of_its_backends(
        fakes, start_router, tmp_path) -> None:
    """`fanout: all` labels router_requests_total with its backends joined by commas, once per
    request; each backend's copy is counted under that backend in the per-backend series, and
    the dashboard's backend filter reads those, so choosing one backend shows its share."""
    up = await fakes("up")
    both = ["up/gpt-a", "up/gpt-b"]
    config = router_config(
        {"up": openai_provider(up)},
        {"both": {"fanout": "all", "ejection": NO_EJECTION,
                  "backends": [{"provider": "up", "model": "gpt-a"},
                               {"provider": "up", "model": "gpt-b"}]},
         "m": {"backends": [{"provider": "up", "model": "gpt-x"}], "ejection": NO_EJECTION}})
    r = await start_router(config)

    async def round_of_traffic() -> None:
        for payload in ({"model": "both", "messages": USER_MSG},
                        {"model": "both", "messages": USER_MSG, "stream": True},
                        {"model": "m", "messages": USER_MSG}):
            async with r.chat(payload) as resp:
                await resp.read()
                assert resp.status == 200

    async with running_prometheus(tmp_path / "prometheus", [r.url.removeprefix("http://")]
                                  ) as prom:
        await round_of_traffic()
        await prom.wait_scrape_after(time.time())
        await round_of_traffic()
        await prom.wait_scrape_after(time.time())

        # Request level: each fan-out request once, under the joined name.
        requests = await prom.query('sum by (backend) (router_requests_total{route="both"})')
        assert [(s["metric"]["backend"], float(s["value"][1])) for s in requests] == \
            [(",".join(both), 4.0)]
        # Per backend: each copy under its own backend.
        copies = await prom.query(
            'sum by (backend) (router_time_to_first_byte_seconds_count{route="both"})')
        assert {s["metric"]["backend"]: float(s["value"][1]) for s in copies} == \
            dict.fromkeys(both, 4.0)

        by_title = {title: expr for title, _ref, expr in targets(dashboard())}
        # Choosing one backend of the fan-out route: every per-backend panel shows its share.
        for backend in both:
            for title in ("p99 time to first byte", "Time to first byte by route and backend",
                          "Upstream answers by backend (each fan-out copy counted)",
                          "Backends' share of upstream answers",
                          "Upstream exchange duration by backend",
                          "Tokens / s by kind", "Tokens / s by backend and kind"):
                result = await prom.query(substitute(by_title[title], "both", backend))
                values = [float(s["value"][1]) for s in result]
                assert values and all(math.isfinite(v) and v > 0 for v in values), \
                    (title, backend, result)
                assert {s["metric"].get("backend", backend) for s in result} == {backend}
        share = await prom.query(substitute(by_title["Backends' share of upstream answers"],
                                            "both"))
        assert {s["metric"]["backend"]: round(float(s["value"][1]), 6) for s in share} == \
            dict.fromkeys(both, 0.5)
        # The request-level panels count client requests whatever backend is chosen.
        for title in ("Requests / s", "Error ratio (5xx / all)",
                      "Requests by route and status", "Error ratio by route (5xx / all)"):
            expr = by_title[title]
            assert "$backend" not in expr, title
            assert await prom.query(substitute(expr, "both")), title
        # At one instant: two answers (one per backend) for each request of the route.
        at = time.time()

        async def value(expr: str) -> float:
            data = await prom.api("query", query=substitute(expr, "both"), time=at)
            return float(data["result"][0]["value"][1])

        requests_per_s = await value(by_title["Requests / s"])
        answers_per_s = await value(
            f'sum({by_title["Upstream answers by backend (each fan-out copy counted)"]})')
        assert requests_per_s > 0
        assert answers_per_s == pytest.approx(2 * requests_per_s)
