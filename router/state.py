"""Typed keys for what the app and each request carry through the pipeline."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from router.auth import Principal
from router.metrics import Metrics
from router.relay import ActiveStreams
from router.runtime import Runtime, RuntimeRef
from router.store import Store
from router.upstream import UpstreamClient


@dataclass(slots=True)
class ServerStatus:
    draining: bool = False
    inflight: int = 0


RUNTIME = web.AppKey("runtime", RuntimeRef)
STREAMS = web.AppKey("streams", ActiveStreams)
STATUS = web.AppKey("status", ServerStatus)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", Metrics)

REQUEST_ID = web.RequestKey("request_id", str)
RUNTIME_NOW = web.RequestKey("runtime_now", Runtime)
PRINCIPAL = web.RequestKey("principal", Principal)
# What the request's metrics are labelled with, filled in as the handler learns it.
LABELS = web.RequestKey("labels", list)
