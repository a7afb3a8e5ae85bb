"""How a fake upstream is told to misbehave: directives in the model name (or a server-wide
override), `name[:arg]` joined by `+`, e.g. `chunks:3+gap:0.02+status:529+retry-after:7`."""

from __future__ import annotations

import typing
from typing import TypeVar

T = TypeVar("T")


class BadDirective(ValueError):
    pass


def parse_directives(spec: str | None, behaviour: T) -> T:
    """Set `behaviour`'s fields (a dataclass) from `spec`: `first-byte:0.5` sets `first_byte`;
    a bool field is set by its name alone; an int, float or str field takes the argument (an
    int without one is 0); `retry-after` is whole seconds as text, "1" without an argument.
    Names that are not fields (a real model name) are ignored; a bad argument raises
    BadDirective."""
    hints = typing.get_type_hints(type(behaviour))
    for part in (spec or "").split("+"):
        name, _, arg = part.strip().partition(":")
        field = name.replace("-", "_")
        kind = hints.get(field)
        if kind is None:
            continue
        kinds = typing.get_args(kind) or (kind,)
        try:
            if field == "retry_after":
                value: object = str(int(float(arg))) if arg else "1"
            elif bool in kinds:
                value = True
            elif int in kinds:
                value = int(arg or 0)
            elif float in kinds:
                value = float(arg)
            else:
                value = arg
        except ValueError as exc:
            raise BadDirective(f"bad directive {part!r}") from exc
        setattr(behaviour, field, value)
    return behaviour
