"""Typed keys for what the app and each request carry through the pipeline."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from router.access_log import AccessLog
from router.auth import Principal
from router.config.model import StoreConfig
from router.drains import Drains
from router.limits import Limiter
from router.metrics import UNKNOWN, Metrics
from router.relay import ActiveStreams
from router.runtime import Runtime, RuntimeRef
from router.schema import OpenApiDocument
from router.sessions import Sessions
from router.status import ConfigStatus
from router.store import Store
from router.usage import UsageMeter

if TYPE_CHECKING:
    from router.responses import ResponsePins
    from router.stages import Pipeline


@dataclass(slots=True)
class ServerStatus:
    draining: bool = False
    inflight: int = 0
    started_at: float = field(default_factory=time.monotonic)  # the worker's uptime counts from it
    # Fixed until restart (a reload does not change them): what the status reports.
    workers: int = 1
    store: StoreConfig | None = None


RUNTIME = web.AppKey("runtime", RuntimeRef)
STREAMS = web.AppKey("streams", ActiveStreams)
STATUS = web.AppKey("status", ServerStatus)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)
LIMITER = web.AppKey("limiter", Limiter)
SESSIONS = web.AppKey("sessions", Sessions)
OPENAPI = web.AppKey("openapi", OpenApiDocument)  # rendered once per set of routes
USAGE = web.AppKey("usage", UsageMeter)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
DRAINS = web.AppKey("drains", Drains)  # the backends taken out of rotation by hand
CONFIG_STATUS = web.AppKey("config_status", ConfigStatus)  # the file served, the last reload
OPEN_PATHS = web.AppKey("open_paths", frozenset)  # served without a credential
# The chat endpoint's stages (app.py).
CHAT: web.AppKey[Pipeline] = web.AppKey("chat")
EMBEDDINGS: web.AppKey[Pipeline] = web.AppKey("embeddings")
COMPLETIONS: web.AppKey[Pipeline] = web.AppKey("completions")
RESPONSES: web.AppKey[Pipeline] = web.AppKey("responses")
RESPONSE_PINS: web.AppKey[ResponsePins] = web.AppKey("response_pins")

REQUEST_ID = web.RequestKey("request_id", str)
RUNTIME_NOW = web.RequestKey("runtime_now", Runtime)
PRINCIPAL = web.RequestKey("principal", Principal)
# Headers a chat answer had gathered when it failed: its error answer carries them too.
ANSWER_HEADERS = web.RequestKey("answer_headers", dict)
@dataclass(slots=True)
class Facts:
    """What a request turned out to be, filled in as its stages learn it; the pipeline labels
    the request's metrics and writes its access-log line from it."""

    endpoint: str | None = None  # an upstream endpoint's requests are counted in the metrics
    route: str = UNKNOWN
    backend: str = "none"
    stream: bool = False
    attempts: int = 0
    ttfb_ms: float | None = None
    tokens: tuple[int, int] | None = None
    error: str | None = None


FACTS = web.RequestKey("facts", Facts)
