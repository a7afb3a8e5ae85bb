"""deploy/Dockerfile and deploy/constraints.txt without a container engine (none here): the
image is multi-stage on a slim Python, runs as a numeric non-root user, checks /healthz with
Python (the slim image has no curl), listens on 0.0.0.0 and installs exactly the pinned
constraints, which pin the router's runtime dependencies and nothing else."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from types import ModuleType

from packaging.utils import canonicalize_name

from tests.deploy.manifests import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for word, rest in instructions():
        if word == "FROM":
            out.append([])
        if out:
            out[-1].append((word, rest))
    return out


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("constraints", ROOT / "deploy/constraints.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_multi_stage_on_a_slim_python() -> None:
    args = dict(rest.split("=", 1) for word, rest in instructions() if word == "ARG")
    image = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", image), image
    build, final = stages()
    assert build[0][1] == "${PYTHON_IMAGE} AS build"
    assert final[0][1] == "${PYTHON_IMAGE}"
    # The final stage takes the built environment, not the build's tools or sources.
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies == ["--from=build /opt/router /opt/router"]


def test_runs_as_a_numeric_non_root_user() -> None:
    final = stages()[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0  # numeric: Kubernetes' runAsNonRoot can check it
    assert not gid or (gid.isdigit() and int(gid) > 0)
    words = [w for w, _ in final]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w in ("RUN", "COPY"))


def test_healthcheck_asks_healthz_with_python() -> None:
    final = stages()[-1]
    (check,) = [rest for word, rest in final if word == "HEALTHCHECK"]
    command = json.loads(check[check.index("CMD") + 3:].strip())
    assert command[:2] == ["python", "-c"]
    code = command[2]
    ast.parse(code)  # valid Python
    (expose,) = [rest for word, rest in final if word == "EXPOSE"]
    assert f"http://127.0.0.1:{expose}/healthz" in code
    assert "curl" not in check


def test_listens_on_all_interfaces_and_reads_the_documented_config() -> None:
    final = stages()[-1]
    entry = [json.loads(rest) for word, rest in final if word == "ENTRYPOINT"]
    cmd = [json.loads(rest) for word, rest in final if word == "CMD"]
    assert entry == [["router"]]
    (args,) = cmd
    assert args[0] == "serve"
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert flags == {"--config": "/etc/router/router.yaml", "--host": "0.0.0.0"}


def test_dependencies_come_from_the_pinned_constraints() -> None:
    build = stages()[0]
    copies = [rest.split() for word, rest in build if word == "COPY"]
    assert ["deploy/constraints.txt", "deploy/constraints.txt"] in copies
    runs = [rest for word, rest in build if word == "RUN"]
    assert any("install" in r and "-r deploy/constraints.txt" in r for r in runs)
    # The router itself adds nothing unpinned.
    assert any("install" in r and "--no-deps ." in r for r in runs)
    # The constraints are installed before the sources are copied (a cached layer).
    order = [(w, r) for w, r in build if w in ("COPY", "RUN")]
    assert order.index(("COPY", "deploy/constraints.txt deploy/constraints.txt")) < \
        order.index(("COPY", "router ./router"))


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
            assert match, f"not an exact pin: {line!r}"
            out[canonicalize_name(match.group(1))] = match.group(2)
    return out


def test_constraints_pin_exactly_the_runtime_dependency_closure() -> None:
    """Every pin is a runtime dependency of the router (directly or through another), and every
    one of those is pinned. After changing dependencies: `make constraints`."""
    module = generator()
    direct = module.direct_requirements()
    closure = module.closure(direct)
    pinned = pins()
    assert set(pinned) == set(closure), "run `make constraints`"
    for req in direct:  # the pins satisfy pyproject.toml
        assert req.specifier.contains(pinned[canonicalize_name(req.name)]), (req, pinned)
    # Test and dev tools stay out of the image.
    for name in ("pytest", "ruff", "mypy", "openai", "kubernetes-validate"):
        assert canonicalize_name(name) not in pinned
    assert "cryptography" in pinned  # pyjwt[crypto]: the extra's dependencies are followed
