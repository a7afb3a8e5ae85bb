"""Any OpenAI-compatible server: the request body goes as JSON, the answer's bytes pass through."""

from __future__ import annotations

from router import __version__
from router.config import OpenAIProviderConfig
from router.jsonbody import dump_json
from router.providers.base import Exchange, UpstreamCall, parse_retry_after
from router.upstream import UpstreamClient


class OpenAIProvider:
    def __init__(self, name: str, config: OpenAIProviderConfig, client: UpstreamClient,
                 probe_timeout_s: float = 2.0) -> None:
        self.name = name
        self._client = client
        base = config.base_url.rstrip("/")
        self._url = f"{base}/chat/completions"
        self._models_url = f"{base}/models"
        self._probe = config.probe
        self._ca_file = config.ca_file
        self._probe_timeout_s = probe_timeout_s
        headers = {"User-Agent": f"router/{__version__}", **config.headers,
                   "Content-Type": "application/json", "Accept-Encoding": "identity"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._headers = headers
        self.secrets = tuple(v for v in (config.api_key, *config.headers.values()) if v)
        self._probe_headers = {k: v for k, v in headers.items() if k != "Content-Type"}

    async def open(self, call: UpstreamCall) -> Exchange:
        headers = dict(self._headers)
        headers["Accept"] = "text/event-stream" if call.stream else "application/json"
        headers["x-request-id"] = call.request_id
        resp = await self._client.post(self._url, headers, dump_json(call.body),
                                       call.timeouts, self._ca_file)
        return Exchange(
            status=resp.status,
            content_type=resp.headers.get("Content-Type", "application/json"),
            chunks=resp.iter_chunks(),
            close=resp.close,
            retry_after_s=parse_retry_after(resp.headers.get("Retry-After")),
        )

    async def probe(self) -> bool | None:
        if not self._probe:
            return None
        status = await self._client.get_status(self._models_url, self._probe_headers,
                                               self._probe_timeout_s, self._ca_file)
        return 200 <= status < 300
