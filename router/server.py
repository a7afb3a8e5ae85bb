"""Serving: one worker process (listener, reload, probes, drain), or a supervisor of N of them.

Workers share the port through SO_REUSEPORT. SIGTERM drains; SIGHUP or a file change reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
    TransferEncodingError,
)
from prometheus_client import multiprocess

from router.app import build_app
from router.auth import KeyCache
from router.config import Config, ConfigError, load_config
from router.drains import Drains
from router.errors import BadRequest, InternalError, RouterError
from router.ids import request_id
from router.log import setup_logging
from router.metrics import DisabledMetrics, Metrics
from router.open_files import raise_open_files_limit
from router.prober import probe_forever
from router.routing.health import BackendState
from router.runtime import RuntimeRef, build_runtime
from router.state import LIMITER, STATUS, STREAMS, USAGE
from router.status import ConfigStatus, file_sha256
from router.store import is_shared, open_store
from router.tasks import spawn
from router.upstream import AiohttpUpstream, UpstreamClient
from router.upstream_lean import LeanUpstream

log = logging.getLogger("router.server")

REPEAT_WINDOW_S = 1.0  # a SIGTERM this soon after the first is the same stop, delivered twice


@dataclass(frozen=True)
class Overrides:
    host: str | None = None
    port: int | None = None
    workers: int | None = None

    def apply(self, config: Config) -> Config:
        changes = {k: v for k, v in (("host", self.host), ("port", self.port),
                                     ("workers", self.workers)) if v is not None}
        if not changes:
            return config
        return config.model_copy(update={"server": config.server.model_copy(update=changes)})

    def argv(self) -> list[str]:
        out: list[str] = []
        if self.host is not None:
            out += ["--host", self.host]
        if self.port is not None:
            out += ["--port", str(self.port)]
        if self.workers is not None:
            out += ["--workers", str(self.workers)]
        return out


def serve(path: str, overrides: Overrides, *, worker: bool = False) -> int:
    config = overrides.apply(load_config(path))
    setup_logging(config.logging)
    if not worker:  # workers inherit the supervisor's limit
        raise_open_files_limit(config)
    if config.server.workers > 1 and not worker:
        return _supervise(path, config, overrides)
    _announce(config, worker)
    _install_uvloop()
    asyncio.run(_run_worker(path, config, overrides, reuse_port=config.server.workers > 1))
    faulthandler.cancel_dump_traceback_later()  # armed once the drain is over
    return 0


def _announce(config: Config, worker: bool) -> None:
    if worker:
        return
    if config.auth.dev_api_key:
        print(f"router: dev API key (loopback only): {config.auth.dev_api_key}",
              file=sys.stderr, flush=True)


# The collector's youngest generation is collected after this many new container objects.
# Python's default, 700, is a collection every few requests under load; measured with `router
# bench` (c=64, one worker): 5,000 cut the collector's time from about 7 to 1.4 µs per request.
GC_GEN0_THRESHOLD = 5000


def settle_heap() -> None:
    """Once the worker is built: what start-up built (modules, config, routing table, the
    app) lives as long as the process, so the collector stops walking it (`gc.freeze`): a full
    collection then looks only at what requests created since (measured: 4 ms instead of 20).
    Requests allocate many short-lived objects, so the youngest generation is collected less
    often (GC_GEN0_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; tolerate odd platforms
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _run_worker(path: str, config: Config, overrides: Overrides, *,
                      reuse_port: bool) -> None:
    worker = Worker(path, config, overrides, reuse_port=reuse_port)
    # Before the listener opens: a collection takes a while on a large heap, and until the
    # signal handlers below are installed a SIGTERM would end the worker without a drain.
    settle_heap()
    try:
        await worker.start()
    except OSError:
        await worker.runner.cleanup()
        await worker.upstream.close()
        await worker.store.close()
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    delayed = False  # SIGTERM (an orchestrator) gets the drain delay; SIGINT (a terminal) not
    first = 0.0

    def on_stop(sig: signal.Signals) -> None:
        nonlocal delayed, first
        if stop.is_set():
            # A second signal: no more waiting for the load balancer. Unless it is the same
            # SIGTERM arriving twice, as when a service manager signals every process of the
            # group and the supervisor forwards its own copy too.
            if sig != signal.SIGTERM or time.monotonic() - first >= REPEAT_WINDOW_S:
                worker.hurry.set()
            return
        delayed = sig == signal.SIGTERM
        first = time.monotonic()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(worker.watcher.reload("SIGHUP"),
                                                          "reload"))
    await stop.wait()
    await worker.stop(drain_delay_s=worker.ref.current.config.server.drain_delay_s
                      if delayed else 0.0)
    # Whatever would still hold the exit up (a task, the loop's own teardown): past this, every
    # thread's stack goes to stderr and the process exits 1.
    faulthandler.dump_traceback_later(EXIT_WATCHDOG_S, exit=True)
    await _end_leftover_tasks(LEFTOVER_TIMEOUT_S)


def _awaiting(coro: Any) -> str:
    """Where a suspended coroutine waits: each coroutine of its await chain, innermost last,
    then what the innermost awaits."""
    where: list[str] = []
    while coro is not None and len(where) < 32:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            where.append(type(coro).__qualname__)
            break
        where.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} "
                     f"{frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " > ".join(where) or "?"


# After the drain, how long the tasks still running get to end once cancelled (they take
# milliseconds), and how long the whole exit may take before the watchdog ends it.
LEFTOVER_TIMEOUT_S = 1.0
EXIT_WATCHDOG_S = 10.0


async def _end_leftover_tasks(timeout_s: float) -> None:
    """Cancel what still runs after the drain and wait for it, at most `timeout_s`. A task that
    will not end is named in the log with where it waits, and the worker exits without it
    (asyncio.run would otherwise wait for it forever)."""
    me = asyncio.current_task()
    leftover = [t for t in asyncio.all_tasks() if t is not me]
    for task in leftover:
        task.cancel()
    if not leftover:
        return
    done, pending = await asyncio.wait(leftover, timeout=timeout_s)
    for task in done:  # as asyncio.run would have reported them
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed while the worker stopped", task.get_name(),
                      exc_info=task.exception())
    if not pending:
        return
    for task in pending:
        log.error("task %s did not end when cancelled; it waits in %s", task.get_name(),
                  _awaiting(task.get_coro()))
    logging.shutdown()
    os._exit(0)


class Worker:
    """One serving process's parts: upstream pool, runtime, app, listener, prober, watcher."""

    def __init__(self, path: str, config: Config, overrides: Overrides = Overrides(), *,
                 reuse_port: bool = False) -> None:
        pools = [getattr(p, "max_connections", 0) for p in config.providers.values()]
        client = LeanUpstream if config.server.upstream_client == "lean" else AiohttpUpstream
        self.upstream: UpstreamClient = client(max_connections=max(sum(pools), 100),
                                               max_per_host=max([*pools, 1]))
        self.states: dict[str, BackendState] = {}
        # One store (and Redis pool) per worker, for its whole life: `store` changes need a
        # restart. Managed API keys are cached here, shared by every runtime a reload builds.
        self.store = open_store(config.store)
        self.key_cache = KeyCache(self.store, trust_stale=config.store.on_failure == "open")
        self.ref = RuntimeRef(build_runtime(config, self.upstream, self.states,
                                            key_cache=self.key_cache))
        self.metrics = Metrics() if config.metrics.enabled else DisabledMetrics()
        # Backends drained by hand (kept in the store) and the config file's bookkeeping,
        # both shown by the operator console.
        self.drains = Drains(self.store, self.states, self.metrics,
                             shared=is_shared(config.store))
        self.config_status = ConfigStatus(path)
        self.app = build_app(self.ref, self.store, self.metrics, drains=self.drains,
                             config_status=self.config_status)
        self.watcher = _Watcher(path, overrides, self.ref, self.upstream, self.states,
                                self.metrics)
        self.watcher.key_cache = self.key_cache
        self.watcher.drains = self.drains
        self.watcher.config_status = self.config_status
        self._path = path
        self._reuse_port = reuse_port
        self._tasks: list[asyncio.Task[None]] = []
        server = config.server
        self.runner = _Runner(
            self.app,
            handle_signals=False,
            handler_cancellation=True,  # a client that leaves cancels its upstream at once
            access_log=None,
            auto_decompress=False,  # bodies are inflated by read_body, under the size cap
            keepalive_timeout=server.keepalive_timeout_s,
            max_field_size=8190,
            max_headers=128,
            shutdown_timeout=2.0,
        )
        self.site: web.TCPSite | None = None
        self.port = 0
        self.hurry = asyncio.Event()  # set: cut the drain delay short

    async def start(self) -> int:
        server = self.ref.current.config.server
        await self.runner.setup()
        # Warm the store before the first request: its connection, and a Cluster client's slot
        # map (redis-py fails concurrent first commands on a cold Cluster client). A store that
        # is down costs one store timeout here and is noticed again by the requests.
        await self.store.ping()
        # Before the first request too: the drains the store holds (a restart keeps them),
        # and which file, as it was read, serves.
        await self.drains.refresh()
        self.config_status.loaded(await asyncio.to_thread(file_sha256, self._path))
        self.site = web.TCPSite(self.runner, server.host, server.port,
                                reuse_port=self._reuse_port or None, backlog=2048)
        await self.site.start()
        self.port = self.runner.addresses[0][1]
        log.info("listening on http://%s:%d (pid %d)", server.host, self.port, os.getpid())
        if self.ref.current.oidc is not None:
            self.ref.current.oidc.start()
        self._tasks.append(spawn(probe_forever(self.ref, self.metrics), "prober"))
        self._tasks.append(spawn(self.key_cache.run(), "key-cache"))
        self._tasks.append(spawn(self.drains.run(), "drains"))
        self._tasks.append(spawn(self.app[LIMITER].refresh_forever(), "limits-leases"))
        self._tasks.append(spawn(self.app[USAGE].run(), "usage-flush"))
        self._tasks.append(spawn(self.app[STREAMS].heartbeat(
            server.sse_keepalive_s, server.write_stall_timeout_s), "stream-heartbeat"))
        if server.reload_poll_s > 0:
            self._tasks.append(spawn(self.watcher.watch(server.reload_poll_s),
                                     "config-watcher"))
        return self.port

    async def stop(self, drain_delay_s: float = 0.0) -> None:
        """Drain and release everything. For `drain_delay_s` first, /readyz answers 503 while
        requests (on new connections too) are still served, unless `hurry` is set."""
        if self.site is not None:
            await _drain(self.app, self.site, self.ref.current.config.server.shutdown_grace_s,
                         drain_delay_s, self.hurry)
        for task in self._tasks:
            task.cancel()
        await self.runner.cleanup()
        await self.upstream.close()
        await self.key_cache.flush()  # last-use times not written yet
        await self.app[USAGE].flush()  # usage counted since the last flush
        await self.store.close()
        if self.ref.current.oidc is not None:
            await self.ref.current.oidc.close()
        log.info("stopped")


async def _drain(app: web.Application, site: web.TCPSite, grace_s: float, delay_s: float,
                 hurry: asyncio.Event) -> None:
    """Say so on /readyz for `delay_s` while still serving, stop accepting, let in-flight
    requests finish within the grace, then end the rest. From the start, every answer closes
    its connection (router/app.py), so kept-alive clients leave for another replica."""
    status = app[STATUS]
    status.draining = True
    if delay_s > 0 and not hurry.is_set():
        log.info("draining: /readyz answers 503; the listener closes in %.1f s", delay_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), delay_s)
    await site.stop()
    log.info("draining %d in-flight requests (grace %.0f s)", status.inflight, grace_s)
    deadline = time.monotonic() + grace_s
    while status.inflight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - once, at exit
        await asyncio.sleep(0.05)
    streams = app[STREAMS]
    if len(streams):
        log.warning("grace over: ending %d streams", len(streams))
        streams.abort_all("the router is shutting down")
        end = time.monotonic() + 2.0
        while len(streams) and time.monotonic() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


# What a client is told about a request the HTTP parser refused: a fixed sentence per kind,
# never the parser's own message (it quotes the offending bytes, which may be a credential).
_PARSER_REFUSALS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (LineTooLong, "a request line or header is longer than 8190 bytes"),
    (InvalidHeader, "malformed request header"),
    (BadHttpMethod, "malformed request method"),
    (BadStatusLine, "malformed request line"),
    (InvalidURLError, "malformed request target"),
    (TransferEncodingError, "malformed chunked request body"),
    (ContentLengthError, "request body does not match its Content-Length"),
    (PayloadEncodingError, "malformed request body encoding"),
)


class _Protocol(web.RequestHandler):
    """aiohttp's connection handler, answering what it refuses itself (a malformed or oversized
    request head, a broken chunked body) in the router's error shape: JSON, an x-request-id,
    no echo of the request, and the connection closed."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response has begun: only closing is left
            raise ConnectionError("the response has begun; no error response can follow")
        error: RouterError
        if isinstance(exc, HttpProcessingError):
            text = next((t for kind, t in _PARSER_REFUSALS if isinstance(exc, kind)),
                        "malformed HTTP request")
            log.info("bad HTTP request from %s: %s", request.remote, type(exc).__name__)
            error = BadRequest(text)
        else:  # an exception outside the request pipeline: a bug, worth its traceback
            log.error("unhandled error outside the request pipeline", exc_info=exc)
            error = InternalError("internal error")
        resp = error.to_response()
        resp.headers["x-request-id"] = request_id()
        resp.force_close()
        return resp

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        sent = await super().finish_response(request, resp, start_time)
        if resp.status == 408 and not request.content.is_eof():
            # The client stalled mid-body: close now rather than linger (up to 10 s)
            # waiting for the rest of a body nobody will read.
            self.force_close()
        return sent


class _Server(web.Server):
    """aiohttp's low-level server, making `_Protocol` connections."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                 **kwargs: Any) -> None:
        protocol_kwargs = {k: v for k, v in kwargs.items()
                           if k not in ("request_factory", "handler_cancellation", "loop")}
        super().__init__(handler, **kwargs)
        self._protocol_kwargs = protocol_kwargs
        self._protocol_loop = asyncio.get_running_loop()

    def __call__(self) -> web.RequestHandler:
        return _Protocol(self, loop=self._protocol_loop, **self._protocol_kwargs)


class _Runner(web.AppRunner):
    """An AppRunner whose server makes `_Protocol` connections. The app is started as usual;
    its server's handler and request factory are reused, with this runner's settings."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        self._server_kwargs = {k: v for k, v in kwargs.items()
                               if k not in ("handle_signals", "shutdown_timeout")}
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        stock = await super()._make_server()  # runs the app's start-up hooks
        return _Server(stock.request_handler, request_factory=stock.request_factory,
                       **self._server_kwargs)


class _Watcher:
    """Reloads the config on SIGHUP or when the file's content changes."""

    def __init__(self, path: str, overrides: Overrides, ref: RuntimeRef,
                 upstream: UpstreamClient, states: dict[str, BackendState],
                 metrics: Metrics) -> None:
        self._metrics = metrics
        self._path = Path(path)
        self._overrides = overrides
        self._ref = ref
        self._upstream = upstream
        self._states = states
        self._digest: bytes | None = None
        self.key_cache: KeyCache | None = None
        self.drains: Drains | None = None
        self.config_status: ConfigStatus | None = None

    def _read_digest(self) -> bytes | None:
        try:
            return hashlib.sha256(self._path.read_bytes()).digest()
        except OSError:
            return None

    def _load(self) -> tuple[Config, str | None]:
        """The file's config and the digest of its bytes (blocking: run in a thread)."""
        return load_config(self._path), file_sha256(self._path)

    async def watch(self, every_s: float) -> None:
        self._digest = await asyncio.to_thread(self._read_digest)
        while True:
            await asyncio.sleep(every_s)
            digest = await asyncio.to_thread(self._read_digest)
            if digest is not None and digest != self._digest:
                self._digest = digest
                await self.reload("file changed")

    async def reload(self, reason: str) -> bool:
        """Build a whole new runtime from the file and swap it in; a bad file changes nothing."""
        old = self._ref.current.config
        old_oidc = self._ref.current.oidc
        try:
            loaded, sha256 = await asyncio.to_thread(self._load)
            new = self._overrides.apply(loaded)
            runtime = build_runtime(new, self._upstream, self._states, old_oidc,
                                    key_cache=self.key_cache)
        except ConfigError as exc:
            log.error("config reload (%s) refused; the old config keeps serving:\n%s",
                      reason, exc)
            self._metrics.config_reloaded(ok=False)
            if self.config_status is not None:
                self.config_status.refused(str(exc))
            return False
        if self.drains is not None:
            self.drains.apply()  # backends the new config adds may be drained already
        if (new.server.host, new.server.port, new.server.workers) != (
                old.server.host, old.server.port, old.server.workers):
            log.warning("server.host/port/workers changed: they take effect on restart")
        self._ref.current = runtime
        if runtime.oidc is not old_oidc:  # auth.oauth2 changed: new keys and caches
            if runtime.oidc is not None:
                runtime.oidc.start()
            if old_oidc is not None:
                spawn(old_oidc.close(), "oidc-close")
        self._metrics.config_reloaded(ok=True)
        if self.config_status is not None:
            self.config_status.reloaded(sha256)
        log.info("config reloaded (%s)", reason)
        return True


def _supervise(path: str, config: Config, overrides: Overrides) -> int:
    """Start N workers on one port; forward signals; restart a worker that dies unasked."""
    _announce(config, worker=False)
    argv = [sys.executable, "-m", "router", "serve", "--config", path, "--worker",
            *overrides.argv()]
    # Workers write their metrics into one fresh directory per start; /metrics on any worker
    # sums them, and a restarted worker's predecessor keeps its counts in its own files.
    metrics_dir = tempfile.mkdtemp(prefix="router-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    if not config.metrics.enabled:  # no collector writes: no files either
        env.pop("PROMETHEUS_MULTIPROC_DIR")

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env=env)

    try:
        return _watch_workers(config, start_worker, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _watch_workers(config: Config, start_worker: Callable[[], subprocess.Popen[bytes]],
                   metrics_dir: str) -> int:
    procs = [start_worker() for _ in range(config.server.workers)]
    started = [time.monotonic()] * len(procs)
    quick_deaths = 0
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    log.info("supervising %d workers", len(procs))
    while True:
        alive = False
        for i, p in enumerate(procs):
            code = p.poll()
            if code is None:
                alive = True
            elif not stopping:
                # A worker that dies right after starting (port taken, bad config) would only
                # die again: give up after a few in a row instead of spinning.
                quick_deaths = quick_deaths + 1 if time.monotonic() - started[i] < 2 else 0
                if quick_deaths >= 3:
                    log.error("workers keep exiting at start-up (last code %s); stopping", code)
                    forward(signal.SIGTERM, None)
                    continue
                log.error("worker %d exited with %s; restarting it", p.pid, code)
                multiprocess.mark_process_dead(p.pid, metrics_dir)  # type: ignore[no-untyped-call]
                procs[i] = start_worker()
                started[i] = time.monotonic()
                alive = True
        if not alive:
            return max((p.returncode or 0) for p in procs) if quick_deaths < 3 else 1
        with contextlib.suppress(InterruptedError):
            time.sleep(0.2)
