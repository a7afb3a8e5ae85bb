"""JSON request bodies: parsed exactly (a repeated key is seen, integers stay whole), checked
against one depth limit, and written back for the upstream exactly as parsed.

Every endpoint that reads JSON goes through `load_json_object`; the body forwarded upstream is
written by `dump_json`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from router.errors import ValidationFailed

# How deep a body may nest (its own object is level 1): what orjson, which writes every body the
# router forwards, can write. Deeper is a 422 on every endpoint, never a 500.
MAX_DEPTH = 254


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(f"a JSON object in the body repeats a key ({key[:64]!r}): which "
                         "value would count is ambiguous")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return obj


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:32]} is out of range")
    return value


def _integer(text: str) -> int:
    if len(text) > 300 and math.isinf(float(text)):  # as 1e309 is for a float
        raise ValueError(f"the number {text[:32]}... is out of range")
    return int(text)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# The standard library's C parser, because it hands every object's pairs to a hook (a repeated
# key is seen, however it is escaped) and keeps integers whole (orjson turns those past 64 bits
# into floats). ~3.7 us for a 480-byte body, 30 us for 25 KB of text: within 3 us of what
# orjson's parse plus a separate repeated-key check cost. Number-heavy bodies cost more (each
# number is a Python call: 3.8 ms for 5,000 integers and 5,000 floats, orjson alone 0.6 ms).
_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_float=_finite,
                            parse_int=_integer, parse_constant=_constant)


def load_json_object(raw: bytes) -> dict[str, Any]:
    """Body bytes -> a JSON object that `dump_json` writes back exactly, or the 422 at
    `loc: ["body"]` that says why not."""
    try:
        body = _DECODER.decode(raw.decode("utf-8"))
    except RecursionError:
        raise _problem(f"the body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # also UnicodeDecodeError and the hooks' refusals
        msg = str(exc) if isinstance(exc, _RepeatedKey) else f"body is not valid JSON: {exc}"
        raise _problem(msg[:300]) from None
    if not isinstance(body, dict):
        raise ValidationFailed([{"loc": ["body"], "msg": "body must be a JSON object",
                                 "type": "model_type"}])
    try:
        orjson.dumps(body)  # ~0.3 us: what nearly every body takes
    except orjson.JSONEncodeError:
        _check_unusual(body)
    return body


def _check_unusual(body: dict[str, Any]) -> None:
    """orjson cannot write `body`: integers past 64 bits (which `dump_json` writes with the
    standard library), or a lone surrogate or nesting past MAX_DEPTH (refused). C code
    throughout, however large the body."""
    try:
        text = _dumps_exact(body)
    except RecursionError:
        raise _problem(f"the body nests deeper than {MAX_DEPTH} levels") from None
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise _problem("a string in the body holds a lone UTF-16 surrogate (\\ud800-\\udfff "
                       "without its pair)") from None
    try:  # the same nesting, with the large integers read back as floats
        orjson.dumps(orjson.loads(data))
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        raise _problem(f"the body nests deeper than {MAX_DEPTH} levels") from None


def dump_json(value: Any) -> bytes:
    """A checked body as bytes: orjson's, or for a body holding integers past 64 bits (rare)
    the standard library's, which writes them digit for digit."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _dumps_exact(value).encode("utf-8")


def _dumps_exact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _problem(msg: str) -> ValidationFailed:
    return ValidationFailed([{"loc": ["body"], "msg": msg, "type": "json_invalid"}])
