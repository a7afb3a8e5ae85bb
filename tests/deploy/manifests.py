"""deploy/k8s/ rendered as the cluster would get it (`kubectl kustomize`), and the parts of it the
tests look up: the router's Deployment, container, ConfigMap, Service."""

from __future__ import annotations

import functools
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = (K8S / "base", *sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir()))
KUBECTL = shutil.which("kubectl")

Obj = dict[str, Any]


@functools.cache
def render(directory: Path) -> tuple[Obj, ...]:
    done = subprocess.run([str(KUBECTL), "kustomize", str(directory)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@dataclass(frozen=True)
class Rendered:
    """One kustomization's objects."""

    name: str
    objects: tuple[Obj, ...]

    def all(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str = "router") -> Obj:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: {len(found)} {kind} named {name}"
        return found[0]

    @property
    def deployment(self) -> Obj:
        return self.one("Deployment")

    @property
    def pod(self) -> Obj:
        spec: Obj = self.deployment["spec"]["template"]
        return spec

    @property
    def container(self) -> Obj:
        containers = self.pod["spec"]["containers"]
        return next(c for c in containers if c["name"] == "router")

    @property
    def config_map(self) -> Obj:
        return self.one("ConfigMap", "router-config")

    @property
    def service(self) -> Obj:
        return self.one("Service")


def rendered(directory: Path) -> Rendered:
    return Rendered(directory.relative_to(K8S).as_posix(), render(directory))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
