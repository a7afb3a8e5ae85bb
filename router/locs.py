"""pydantic error locations -> places that exist in the validated input (YAML or JSON body)."""

from __future__ import annotations

from typing import Any


def input_path(data: Any, loc: tuple[Any, ...], *, missing: bool) -> tuple[Any, ...]:
    """Drop the steps that name a union member (`str`, `list[str]`, a tag) rather than a key.

    A missing field's last step is kept: it names the key the user should have written.
    """
    path: list[Any] = []
    node = data
    for i, step in enumerate(loc):
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        elif not (missing and i == len(loc) - 1):
            continue
        path.append(step)
    return tuple(path)
