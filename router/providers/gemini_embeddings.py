"""OpenAI's embeddings request and answer, in Gemini's `batchEmbedContents` dialect.

Gemini takes text only (token ids are refused), names the size `outputDimensionality`, and
reports no tokens for embeddings: the answer's `usage` is the router's estimate (four characters
a token), the figure its limits charge anyway."""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from typing import Any

from router.errors import UpstreamError
from router.providers.gemini_request import API
from router.providers.translated import Unsupported
from router.schema import input_items

# Fields with nothing to send: `user` names the client's end user, which Gemini has no place
# for; `encoding_format` is the router's to apply to the answer.
_LOCAL = frozenset({"model", "input", "dimensions", "encoding_format", "user"})


def embed_body(body: Mapping[str, Any], resource: str, drop_unsupported: bool
               ) -> dict[str, Any]:
    """`resource`: the model as Gemini names it (`models/text-embedding-004`)."""
    for name in body:
        if name not in _LOCAL and not drop_unsupported:
            raise Unsupported(name, API)
    items = input_items(body.get("input"))
    if not all(isinstance(item, str) for item in items):
        raise Unsupported("input", API, " as token ids: it embeds text")
    request: dict[str, Any] = {"model": resource}
    if body.get("dimensions") is not None:
        request["outputDimensionality"] = int(body["dimensions"])
    return {"requests": [{**request, "content": {"parts": [{"text": text}]}}
                         for text in items]}


def embed_answer(native: dict[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
    embeddings = native.get("embeddings")
    if not isinstance(embeddings, list):
        raise UpstreamError("upstream answered without embeddings")
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(embeddings):
        values = item.get("values") if isinstance(item, dict) else None
        if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise UpstreamError("upstream answered with an embedding that is not numbers")
        vector: Any = values
        if as_base64:  # OpenAI's: little-endian float32, base64
            vector = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    items = input_items(body.get("input"))
    tokens = sum(len(text) // 4 + 1 for text in items if isinstance(text, str))
    return {"object": "list", "data": data, "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
