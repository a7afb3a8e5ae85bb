"""deploy/k8s/ without a cluster (none here): `kubectl kustomize` renders the base and every
overlay, every object validates against the Kubernetes API's schemas (strict: no unknown field),
the Prometheus Operator objects have what the operator reads, and the manifests agree with the
router they run: its config (validated by the router's own loader with only the pod's
environment), ports, probe and metrics paths, the config mount, the env var names, the drain
arithmetic, the image's user."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import math
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from router.config import Config, parse_config
from router.routes import endpoints, open_paths
from router.server import Overrides
from tests.deploy.manifests import (
    K8S,
    KUBECTL,
    KUSTOMIZATIONS,
    ROOT,
    Rendered,
    rendered,
    selects,
)

pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed (Debian `kubectl`; make test installs it)")

# The oldest Kubernetes the manifests are meant for, and the newest the validator knows.
K8S_VERSIONS = ("1.31", "latest")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
RULES = ROOT / "grafana" / "alerts" / "router-rules.yaml"
OPERATOR = K8S / "overlays" / "prometheus-operator"


@pytest.fixture(params=KUSTOMIZATIONS, ids=lambda p: p.relative_to(K8S).as_posix())
def k(request: pytest.FixtureRequest) -> Rendered:
    return rendered(request.param)


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- rendering and schemas ---------------------------------------------------------------------

def test_the_base_and_every_overlay_render() -> None:
    names = {p.relative_to(K8S).as_posix() for p in KUSTOMIZATIONS}
    assert names == {"base", "overlays/dev", "overlays/prometheus-operator",
                     "overlays/hpa-inflight"}
    base = rendered(K8S / "base")
    assert {o["kind"] for o in base.objects} == {
        "Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service",
        "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
    for path in KUSTOMIZATIONS:
        k = rendered(path)
        for o in k.objects:  # everything lands in the router's namespace
            assert o["kind"] == "Namespace" or o["metadata"].get("namespace") == "router", o
        # Secrets are referenced, never shipped.
        assert not k.all("Secret"), k.name


def test_every_object_validates_strictly(k: Rendered) -> None:
    import kubernetes_validate

    versions = [kubernetes_validate.latest_version() if v == "latest" else v
                for v in K8S_VERSIONS]
    checked = 0
    for o in k.objects:
        if o["kind"] in CRD_KINDS:
            continue  # no schema offline: test_prometheus_operator_objects checks them
        for version in versions:
            kubernetes_validate.validate(o, version, strict=True)
        checked += 1
    assert checked >= 8


def test_strict_validation_refuses_an_unknown_field() -> None:
    import kubernetes_validate

    deployment = copy.deepcopy(rendered(K8S / "base").deployment)
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(),
                                     strict=True)


# --- the router's config, as the pod sees it ---------------------------------------------------

def pod_env(k: Rendered) -> dict[str, str]:
    """The container's environment: literal values, a dummy for each Secret reference, the
    CPU limit for a resourceFieldRef. Nothing else: the image adds no variable a config uses."""
    limits = k.container["resources"]["limits"]
    env: dict[str, str] = {}
    for var in k.container.get("env", []):
        name = var["name"]
        source = var.get("valueFrom", {})
        if "value" in var:
            env[name] = var["value"]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            assert ref["name"] == "router-secrets" and not ref.get("optional"), var
            # As a real secret would be: a url for a url, else 64 hex digits (also a valid
            # SHA-256 and a 32-byte-plus JWT secret).
            env[name] = ("redis://redis.example:6379/0" if name.endswith("_URL")
                         else hashlib.sha256(name.encode()).hexdigest())
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            assert ref["resource"] == "limits.cpu" and ref.get("containerName") == "router"
            assert str(ref.get("divisor", "1")) == "1"
            env[name] = str(math.ceil(cpu(limits["cpu"])))
        else:
            raise AssertionError(f"unexpected env source {var}")
    return env


def cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def serve_args(k: Rendered, env: dict[str, str]) -> dict[str, str]:
    """The container's `router serve` flags, with $(VAR) expanded as the kubelet does."""
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in k.container["args"]]
    assert args[0] == "serve", args
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert set(flags) <= {"--config", "--host", "--port", "--workers"}, flags
    return flags


def config_vars(text: str, *, with_default: bool = True) -> set[str]:
    """The ${VAR}s in the config's values (comments are not interpolated)."""
    pattern = r"\$\{(\w+)(:-[^}]*)?\}" if with_default else r"\$\{(\w+)\}"

    def strings(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    return {m.group(1) for s in strings(yaml.safe_load(text))
            for m in re.finditer(pattern, s)}


def router_config(k: Rendered) -> tuple[Config, Overrides]:
    """The config the router would serve, checked by its own loader with the pod's env only."""
    env = pod_env(k)
    flags = serve_args(k, env)
    config_path = Path(flags["--config"])
    text = k.config_map["data"][config_path.name]
    used = config_vars(text, with_default=False)  # no default: must be set
    assert used <= set(env), f"{k.name}: the config needs {used - set(env)}"
    config = parse_config(text, source=f"{k.name}:{config_path}", env=env)
    overrides = Overrides(host=flags.get("--host"),
                          port=int(flags["--port"]) if "--port" in flags else None,
                          workers=int(flags["--workers"]) if "--workers" in flags else None)
    return overrides.apply(config), overrides


def test_config_map_is_a_valid_router_config_with_the_pods_environment(k: Rendered) -> None:
    config, overrides = router_config(k)
    assert config.server.host == "0.0.0.0"
    assert config.store.url.startswith(("redis://", "rediss://", "redis+"))  # shared
    assert config.metrics.enabled
    # No secret in the ConfigMap: every credential-bearing key is a ${VAR}.
    raw = yaml.safe_load(k.config_map["data"]["router.yaml"])
    for key in raw["auth"].get("api_keys", []):
        assert key["key_sha256"].startswith("${"), key
    if "jwt" in raw["auth"]:
        assert raw["auth"]["jwt"]["secret"].startswith("${")
    for provider in raw["providers"].values():
        if "api_key" in provider:
            assert provider["api_key"].startswith("${"), provider
    if "@" in raw["store"]["url"]:
        assert raw["store"]["url"].startswith("${")
    # Every variable the pod sets from the Secret is one the config uses.
    secret_vars = {v["name"] for v in k.container["env"]
                   if "secretKeyRef" in v.get("valueFrom", {})}
    assert secret_vars <= config_vars(k.config_map["data"]["router.yaml"])
    assert overrides.workers == math.ceil(cpu(k.container["resources"]["limits"]["cpu"]))


def test_config_is_mounted_where_the_router_reads_it(k: Rendered) -> None:
    flags = serve_args(k, pod_env(k))
    config_path = Path(flags["--config"])
    mount = next(m for m in k.container["volumeMounts"]
                 if m["mountPath"] == str(config_path.parent))
    assert "subPath" not in mount  # a subPath mount never sees a ConfigMap update
    assert mount.get("readOnly") is True
    volume = next(v for v in k.pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == k.config_map["metadata"]["name"]
    assert config_path.name in k.config_map["data"]
    # The image's default command reads the same file.
    assert f'"--config", "{config_path}"' in (ROOT / "deploy" / "Dockerfile").read_text()


def test_ports_probes_and_scrape_annotations_match_the_router(k: Rendered) -> None:
    config, _ = router_config(k)
    ports = {p["name"]: p["containerPort"] for p in k.container["ports"]}
    assert ports == {"http": config.server.port}
    served = {path for e in endpoints(config.metrics.path, config.metrics.enabled)
              for path in e.paths}
    open_ = open_paths(endpoints(config.metrics.path, config.metrics.enabled))
    probes = {name: k.container[name]["httpGet"]
              for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["path"] in served and probe["path"] in open_  # no credential needed
        assert probe["port"] in ports
    annotations = k.pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.server.port
    assert annotations["prometheus.io/path"] == config.metrics.path
    # The Service forwards to the router's port by name.
    for port in k.service["spec"]["ports"]:
        assert port["targetPort"] in ports


def test_termination_outlasts_the_drain(k: Rendered) -> None:
    config, _ = router_config(k)
    pre_stop = k.container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pause = float(pre_stop[1])
    grace = k.pod["spec"]["terminationGracePeriodSeconds"]
    # After the grace: streams aborted (2 s), the server's cleanup (2 s), the usage and key
    # flushes to the store; SIGKILL must not come before those.
    tail_s = 5
    assert grace >= pause + config.server.drain_delay_s + config.server.shutdown_grace_s + tail_s
    # The readiness probe notices the drain (/readyz 503) well within drain_delay_s.
    ready = k.container["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] <= config.server.drain_delay_s
    rolling = k.deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


def test_the_pod_runs_locked_down(k: Rendered) -> None:
    pod = k.pod["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert k.pod["spec"]["automountServiceAccountToken"] is False
    container = k.container["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["runAsNonRoot"] is True
    assert container["capabilities"]["drop"] == ["ALL"]
    # The user is the image's.
    users = re.findall(r"^USER (\d+)", (ROOT / "deploy/Dockerfile").read_text(), re.M)
    assert users and int(users[-1]) == pod["runAsUser"]
    # The one writable place: $TMPDIR, where several workers keep their metrics files
    # (PROMETHEUS_MULTIPROC_DIR, router/server.py).
    tmp = next(m for m in k.container["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in k.pod["spec"]["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in volume
    assert "TMPDIR" not in {v["name"] for v in k.container.get("env", [])}


def test_service_hpa_pdb_and_network_policy_target_the_router_pods(k: Rendered) -> None:
    labels = k.pod["metadata"]["labels"]
    deployment = k.deployment
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert selects(k.service["spec"]["selector"], labels)
    for other in k.all("Deployment"):  # no other workload's pods behind the router's Service
        if other is not deployment:
            assert not selects(k.service["spec"]["selector"],
                               other["spec"]["template"]["metadata"]["labels"])
    hpa = k.one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1", "Deployment", deployment["metadata"]["name"])
    # The autoscaler alone sets the count: a `replicas` here would be reset by every apply.
    assert "replicas" not in deployment["spec"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = k.one("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    policy = k.one("NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    ports = {p["name"] for p in k.container["ports"]}
    for rule in policy["spec"]["ingress"]:
        assert {p["port"] for p in rule["ports"]} <= ports
    # Spread over nodes and zones.
    keys = {c["topologyKey"] for c in k.pod["spec"]["topologySpreadConstraints"]
            if selects(c["labelSelector"]["matchLabels"], labels)}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}


def test_base_sizes_workers_from_the_cpu_limit() -> None:
    k = rendered(K8S / "base")
    assert k.one("HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3
    resources = k.container["resources"]
    assert set(resources) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(resources["requests"]) <= set(resources["limits"])
    _, overrides = router_config(k)
    assert overrides.workers == 2 == cpu(resources["limits"]["cpu"])


def test_hpa_inflight_scales_on_the_routers_gauge() -> None:
    hpa = rendered(K8S / "overlays" / "hpa-inflight").one("HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "router_inflight_requests"
    assert "router_inflight_requests" in (ROOT / "docs" / "metrics.md").read_text()


def test_dev_overlay_points_the_store_at_its_redis() -> None:
    k = rendered(K8S / "overlays" / "dev")
    config, _ = router_config(k)
    match = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", config.store.url)
    assert match, config.store.url
    host, port = match.group(1), int(match.group(2))
    service = k.one("Service", host)
    assert port in {p["port"] for p in service["spec"]["ports"]}
    redis = k.one("Deployment", host)
    assert selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    assert redis["spec"]["replicas"] == 1
    # Only the router's pods may reach it.
    policy = k.one("NetworkPolicy", host)
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert selects(source["podSelector"]["matchLabels"], k.pod["metadata"]["labels"])


# --- Prometheus Operator -----------------------------------------------------------------------

def test_prometheus_operator_objects() -> None:
    k = rendered(OPERATOR)
    config, _ = router_config(k)
    monitor = k.one("ServiceMonitor")
    service = k.service
    spec = monitor["spec"]
    assert selects(spec["selector"]["matchLabels"], service["metadata"]["labels"])
    assert service["metadata"]["namespace"] in spec["namespaceSelector"]["matchNames"]
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == config.metrics.path
    # The job is named after this Service label; RouterDown matches job=~".*router.*".
    job = service["metadata"]["labels"][spec["jobLabel"]]
    assert "router" in job
    assert 'job=~".*router.*"' in RULES.read_text()

    rule = k.one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert r["alert"] and r["expr"]


def test_prometheus_rule_file_is_generated_from_the_alert_rules() -> None:
    """`make k8s-rules` after editing grafana/alerts/router-rules.yaml: else this fails."""
    generator = load_module(OPERATOR / "prometheusrule.py")
    written = (OPERATOR / "prometheusrule.yaml").read_text()
    assert written == generator.render(RULES.read_text()), "run `make k8s-rules`"


def test_namespace_selector_and_image_agree() -> None:
    base = rendered(K8S / "base")
    kustomization: dict[str, Any] = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    image = base.container["image"]
    (pin,) = kustomization["images"]
    assert image == f"{pin['newName']}:{pin['newTag']}"
    assert pin["newTag"] not in ("latest", "")
    assert all(isinstance(o, dict) for o in base.objects)

