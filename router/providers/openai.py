"""OpenAI's API, spoken natively: any OpenAI-compatible server (`openai`) and Azure OpenAI
(`azure`, the same API under a deployment path). The request body goes as JSON, the answer's
bytes pass through."""

from __future__ import annotations

import time
from urllib.parse import quote

from router import __version__
from router.config import AzureProviderConfig, HttpProviderConfig, OpenAIProviderConfig
from router.jsonbody import dump_json
from router.providers.base import Exchange, StoredCall, UpstreamCall, parse_retry_after
from router.providers.translated import without_signatures
from router.upstream import UpstreamClient, UpstreamResponse

# Answers that say "not with this key": with several keys, the next one is tried at once.
KEY_REFUSED = frozenset({401, 403, 429})
# Each endpoint's path under the API's root.
PATHS = {"chat": "chat/completions", "embeddings": "embeddings", "completions": "completions",
         "responses": "responses"}


class OpenAIProvider:
    def __init__(self, name: str, config: HttpProviderConfig, client: UpstreamClient,
                 probe_timeout_s: float = 2.0) -> None:
        self.name = name
        self._client = client
        self._base = config.base_url.rstrip("/")
        self._urls = {endpoint: f"{self._base}/{path}" for endpoint, path in PATHS.items()}
        self._models_url = f"{self._base}/models"
        self._probe = config.probe
        self._ca_file = config.ca_file
        self._probe_timeout_s = probe_timeout_s
        self._headers = {"User-Agent": f"router/{__version__}", **config.headers,
                         "Content-Type": "application/json", "Accept-Encoding": "identity"}
        self._keys = Keys(())
        self.secrets: tuple[str, ...] = tuple(v for v in config.headers.values() if v)
        if isinstance(config, OpenAIProviderConfig):
            if config.organization:
                self._headers["OpenAI-Organization"] = config.organization
            if config.project:
                self._headers["OpenAI-Project"] = config.project
            keys = config.api_keys or ((config.api_key,) if config.api_key else ())
            if len(keys) == 1:
                header, value = self.credential(keys[0])
                self._headers[header] = value
            else:
                self._keys = Keys(keys, config.key_cooldown_s)
            self.secrets += keys

    def url(self, call: UpstreamCall) -> str:
        return self._urls[call.endpoint]

    def credential(self, key: str) -> tuple[str, str]:
        return "Authorization", f"Bearer {key}"

    async def open(self, call: UpstreamCall) -> Exchange:
        headers = dict(self._headers)
        headers["Accept"] = "text/event-stream" if call.stream else "application/json"
        headers["x-request-id"] = call.request_id
        for name, value in call.trace:
            headers[name] = value
        url, body = self.url(call), dump_json(call.body)
        if b"__thought__" in body:  # a Gemini backend's tool call ids: the plain ids here
            body = dump_json(without_signatures(call.body))
        keys = self._keys
        if not keys.keys:  # every request's path: written out, not a call of _exchange
            resp = await self._client.post(url, headers, body, call.timeouts, self._ca_file)
            return Exchange(resp.status, resp.headers.get("Content-Type", "application/json"),
                            resp.iter_chunks(), resp.close,
                            parse_retry_after(resp.headers.get("Retry-After")))
        tried = 0
        while True:
            key = keys.next()
            name, value = self.credential(key)
            headers[name] = value
            resp = await self._client.post(url, headers, body, call.timeouts, self._ca_file)
            tried += 1
            if resp.status not in KEY_REFUSED:
                return _exchange(resp)
            keys.rest(key, parse_retry_after(resp.headers.get("Retry-After")))
            if tried >= len(keys.keys) or keys.all_resting():
                return _exchange(resp)  # every key refused: the answer is the last one's
            resp.close()

    def stored_url(self, call: StoredCall) -> str:
        """`{base}/responses/{id}[/action][?query]`."""
        action = f"/{call.action}" if call.action else ""
        query = f"?{call.query}" if call.query else ""
        return f"{self._base}/responses/{call.response_id}{action}{query}"

    async def stored_response(self, call: StoredCall) -> Exchange:
        """GET, DELETE or POST on a response this upstream stored; no body is sent."""
        headers = {k: v for k, v in self._headers.items() if k != "Content-Type"}
        headers["Accept"] = "application/json"
        headers["x-request-id"] = call.request_id
        for name, value in call.trace:
            headers[name] = value
        if self._keys.keys:  # the keys of one account or project all reach its responses
            name, value = self.credential(self._keys.next())
            headers[name] = value
        body = b"" if call.method == "POST" else None
        resp = await self._client.request(call.method, self.stored_url(call), headers, body,
                                          call.timeouts, self._ca_file)
        return _exchange(resp)

    async def probe(self) -> bool | None:
        if not self._probe:
            return None
        headers = {k: v for k, v in self._headers.items() if k != "Content-Type"}
        if self._keys.keys:  # a key that is not resting: a refused one says nothing of the rest
            name, value = self.credential(self._keys.next())
            headers[name] = value
        status = await self._client.get_status(self._models_url, headers,
                                               self._probe_timeout_s, self._ca_file)
        return 200 <= status < 300


class AzureProvider(OpenAIProvider):
    """`{base_url}/openai/deployments/{model}/chat/completions?api-version=...`: the backend's
    model names the deployment. The Responses API has no deployment in its path:
    `{base_url}/openai/responses?api-version=...` with the deployment as the body's `model`, and
    `{base_url}/openai/responses/{id}?api-version=...` for a stored response."""

    def __init__(self, name: str, config: AzureProviderConfig, client: UpstreamClient,
                 probe_timeout_s: float = 2.0) -> None:
        super().__init__(name, config, client, probe_timeout_s)
        self._version = quote(config.api_version, safe="")
        self._models_url = f"{self._base}/openai/models?api-version={self._version}"
        if config.api_key:
            self._headers["api-key"] = config.api_key
        elif config.azure_ad_token:
            self._headers["Authorization"] = f"Bearer {config.azure_ad_token}"
        self.secrets += tuple(v for v in (config.api_key, config.azure_ad_token) if v)
        self._deployment_urls: dict[tuple[str, str], str] = {}
        self._responses_url = f"{self._base}/openai/responses?api-version={self._version}"

    def url(self, call: UpstreamCall) -> str:
        if call.endpoint == "responses":
            return self._responses_url
        key = (str(call.body.get("model") or ""), call.endpoint)
        url = self._deployment_urls.get(key)
        if url is None:
            url = self._deployment_urls[key] = (
                f"{self._base}/openai/deployments/{quote(key[0], safe='')}"
                f"/{PATHS[call.endpoint]}?api-version={self._version}")
        return url

    def stored_url(self, call: StoredCall) -> str:
        action = f"/{call.action}" if call.action else ""
        query = f"&{call.query}" if call.query else ""
        return (f"{self._base}/openai/responses/{call.response_id}{action}"
                f"?api-version={self._version}{query}")


class Keys:
    """A provider's API keys, used in turn; a key that was refused rests for a while."""

    def __init__(self, keys: tuple[str, ...], cooldown_s: float = 60.0) -> None:
        self.keys = keys
        self._cooldown_s = cooldown_s
        self._turn = 0
        self._resting: dict[str, float] = {}  # key -> monotonic time it may be used again

    def next(self) -> str:
        """The next key in turn that is not resting (the one back soonest if all are)."""
        now = time.monotonic()
        n = len(self.keys)
        for i in range(n):
            key = self.keys[(self._turn + i) % n]
            if self._resting.get(key, 0.0) <= now:
                self._turn = (self._turn + i + 1) % n
                return key
        return min(self.keys, key=lambda k: self._resting[k])

    def rest(self, key: str, seconds: float | None) -> None:
        if len(self.keys) > 1:
            self._resting[key] = time.monotonic() + (seconds or self._cooldown_s)

    def all_resting(self) -> bool:
        now = time.monotonic()
        return all(self._resting.get(k, 0.0) > now for k in self.keys)


def _exchange(resp: UpstreamResponse) -> Exchange:
    return Exchange(
        status=resp.status,
        content_type=resp.headers.get("Content-Type", "application/json"),
        chunks=resp.iter_chunks(),
        close=resp.close,
        retry_after_s=parse_retry_after(resp.headers.get("Retry-After")),
    )
