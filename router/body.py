"""Reading a request: its body under the size cap and the time limit (inflated when compressed),
and whether the client asked for a stream."""

from __future__ import annotations

import asyncio
import zlib

from aiohttp import web

from router.errors import PayloadTooLarge, RequestTimeout, UnsupportedMediaType, ValidationFailed


async def read_body(request: web.Request, cap: int, timeout_s: float) -> bytes:
    """The request body, at most `cap` bytes after decompression, else 413 before any upstream;
    all of it within `timeout_s`, else 408.

    Counted here rather than by aiohttp's client_max_size, which streaming reads bypass.
    """
    length = request.content_length
    if length is not None and length > cap:
        raise PayloadTooLarge(f"request body is larger than {cap} bytes")
    content = request.content
    first = content.read_nowait()  # usually the whole body came with the head
    if len(first) > cap:
        raise PayloadTooLarge(f"request body is larger than {cap} bytes")
    data: bytes | bytearray = first
    if not content.is_eof():
        data = bytearray(first)
        try:
            async with asyncio.timeout(timeout_s):
                async for chunk in content.iter_any():
                    data += chunk
                    if len(data) > cap:
                        raise PayloadTooLarge(f"request body is larger than {cap} bytes")
        except TimeoutError:
            raise RequestTimeout("the request body did not arrive in time") from None
    encoding = request.headers.get("Content-Encoding")
    if encoding is None:
        return bytes(data)  # no copy when it came whole: `data` is bytes then
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return bytes(data)
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"unsupported Content-Encoding {encoding[:32]!r}")
    inflater = zlib.decompressobj(wbits=47)  # gzip or zlib, detected from the header
    try:
        out = inflater.decompress(bytes(data), cap + 1)
    except zlib.error:
        raise ValidationFailed([{"loc": ["body"], "msg": "body is not valid " + encoding,
                                 "type": "decompression_error"}]) from None
    if len(out) > cap or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request body is larger than {cap} bytes")
    return out


def wants_stream(stream: bool | None, accept: str | None) -> bool:
    """`stream` decides; when it is absent or null, whether Accept prefers text/event-stream."""
    if stream is not None:
        return stream
    accept = (accept or "").lower()  # media types and parameter names are case-insensitive
    if "event-stream" not in accept:
        return False
    best_sse = best_json = -1.0
    for i, part in enumerate(accept.split(",")):
        media, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        rank = q - i * 1e-6  # equal q: the earlier entry wins
        media = media.strip().lower()
        if media == "text/event-stream":
            best_sse = max(best_sse, rank)
        elif media in ("application/json", "application/*", "*/*"):
            best_json = max(best_json, rank)
    return best_sse > 0 and best_sse > best_json
