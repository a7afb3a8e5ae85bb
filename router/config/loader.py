"""YAML text -> plain data, with `${ENV}` interpolation and the line of every value.

Only PyYAML's safe constructors run; anchors are capped so an alias bomb is refused before it
expands. Every problem is reported with its YAML path and line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

MAX_FILE_BYTES = 1 << 20
MAX_NODES = 100_000

Path = tuple[str | int, ...]

_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str
    line: int | None = None

    def render(self, source: str = "") -> str:
        where = format_path(self.path) or "(top)"
        line = f" (line {self.line})" if self.line else ""
        prefix = f"{source}: " if source else ""
        return f"{prefix}{where}: {self.message}{line}"


@dataclass
class Loaded:
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def line_of(self, path: Path) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_text(text: str, env: Mapping[str, str] | None = None) -> Loaded:
    env = os.environ if env is None else env
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        return Loaded(None, problems=[Problem((), f"file is larger than {MAX_FILE_BYTES} bytes")])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return Loaded(None, problems=[Problem((), f"invalid YAML: {reason}", line)])
    loaded = Loaded(None)
    if node is None:
        loaded.data = {}
        return loaded
    budget = [MAX_NODES]
    try:
        loaded.data = _build(node, (), loaded, env, budget)
    except _TooBig:
        return Loaded(None, problems=[Problem((), f"document expands to more than {MAX_NODES} "
                                                 "nodes (alias bomb?)")])
    except _BadScalar as exc:
        return Loaded(None, problems=[exc.problem])
    return loaded


class _TooBig(Exception):
    pass


class _BadScalar(Exception):
    """A tagged scalar the safe constructors refuse (`!!python/...`, `!!int "abc"`, `!foo`)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


def _build(node: yaml.Node, path: Path, out: Loaded, env: Mapping[str, str],
           budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooBig
    out.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                out.problems.append(Problem(path, "merge keys (<<) are not supported",
                                            key_node.start_mark.line + 1))
                continue
            key = _scalar(key_node, path)
            if not isinstance(key, (str, int)):
                out.problems.append(Problem(path, "mapping keys must be strings",
                                            key_node.start_mark.line + 1))
                continue
            key = str(key)
            sub = (*path, key)
            if key in result:
                out.problems.append(Problem(sub, "duplicate key", key_node.start_mark.line + 1))
            out.lines[sub] = key_node.start_mark.line + 1
            result[key] = _build(value_node, sub, out, env, budget)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), out, env, budget) for i, item in enumerate(node.value)]
    value = _scalar(node, path)
    if isinstance(value, str) and "$" in value:
        value = _interpolate(value, path, out, env)
    return value


def _scalar(node: yaml.Node, path: Path) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return None
    # A fresh constructor per scalar keeps no cache alive; only safe tags resolve.
    try:
        return SafeConstructor().construct_object(node)
    except (yaml.YAMLError, ValueError, TypeError, AttributeError) as exc:
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise _BadScalar(Problem(path, f"invalid YAML value {node.tag!r}: {reason}",
                                 node.start_mark.line + 1)) from None


def _interpolate(value: str, path: Path, out: Loaded, env: Mapping[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        out.problems.append(Problem(path, f"environment variable {name} is not set",
                                    out.lines.get(path)))
        return ""

    return _ENV.sub(sub, value)
