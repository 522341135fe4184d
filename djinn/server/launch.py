"""Launching: the composition root that builds a kernel with its engine and plugins, and the
ways to serve it (``djinn run``, and ``BackgroundServer`` for tests, the demo and benchmarks)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import attrs

from djinn import __version__
from djinn.config import DjinnConfig
from djinn.engine.service import ModelService
from djinn.kernel.kernel import Kernel
from djinn.kernel.plugins import DjinnPlugins
from djinn.server.http import MetricsEndpoint, vmu
from djinn.server.loop import Server


@attrs.frozen
class Runtime:
    """A started server's parts: the kernel (sessions, residency) and the model service (tokens)."""

    kernel: Kernel
    model: ModelService


def build_runtime(config: DjinnConfig, plugins: DjinnPlugins, report: Callable[[str], None] | None = None) -> Runtime:
    """The composition root: configure the kernel's plugins, load the engine, start the kernel.
    ``report(text)`` hears each stage (loading, warm-up, allocating the tiers)."""
    kernel = Kernel(config, plugins, tick_s=config.server.tick_s)
    kernel.configure()
    model = ModelService(kernel, report)
    if report is not None:
        report("allocating the host tiers")
    try:
        kernel.start(model)
    except BaseException:
        model.stop()
        raise
    return Runtime(kernel, model)


class _FrozenHeap:
    """The garbage collector skips what is alive once a server is up (``gc.freeze``, as vLLM does
    after its warm-up) until the last server of the process stops. A full collection walks every
    tracked object, the model's and the plugins' included, holding the interpreter lock: on an
    H200 at 416 agents one took 0.54 s, and every session's step waited for it."""

    _lock = threading.Lock()
    _serving = 0

    @classmethod
    def enter(cls) -> None:
        """A server is up: collect what start-up left behind, then freeze the survivors."""
        with cls._lock:
            gc.collect()
            gc.freeze()
            cls._serving += 1

    @classmethod
    def leave(cls) -> None:
        """A server stopped; with the last one, the frozen objects are collectable again."""
        with cls._lock:
            cls._serving -= 1
            if not cls._serving:
                gc.unfreeze()


async def serve(
    config: DjinnConfig, plugins: DjinnPlugins, *, token: str | None, announce: Callable[[str], None],
    stop: asyncio.Event | None = None, runtime: Runtime | None = None,
    ready: Callable[[list[str], int | None], None] | None = None,
    http_port: int | None = None, http_ready: Callable[[int], None] | None = None, serve_http: bool = True,
) -> None:
    """Start a runtime (unless given one started), serve until ``stop`` is set, then shut down.

    Unless ``serve_http`` is False, the OpenAI-compatible HTTP API listens on ``http_port`` (0: a
    free port), or, when None, on ``[server] http_port`` (0 there disables it), with the native
    port's host and token.
    ``ready(urls, metrics_port)`` is called once everything listens, after ``http_ready(port)``;
    from then until it stops, the garbage collector skips what start-up left alive (``_FrozenHeap``,
    unless ``[server] freeze_gc_heap`` is false).
    """
    runtime = runtime or build_runtime(config, plugins)
    server = Server(runtime, token=token)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    metrics = None
    api = None
    frozen = False
    try:
        host, port = config.server.host, config.server.port
        bound = await server.start([t.default_url(host, port) for t in runtime.kernel.transports.values()])
        if config.server.metrics_port:
            metrics = MetricsEndpoint(runtime.kernel, loop, host, config.server.metrics_port)
            metrics.start()
            announce(f"metrics: http://{config.server.host}:{metrics.port}/metrics (and /metrics/vmu)")
        port_http = config.server.http_port if http_port is None else http_port
        if serve_http and (http_port is not None or port_http):
            from djinn.server.openai_api import OpenAIServer

            api = OpenAIServer(runtime, host=host, port=port_http, token=token,
                               session_ttl_s=config.server.http_session_ttl_s, serve_metrics=metrics is None)
            port_http = await api.start()
            announce(f"OpenAI API: http://{host}:{port_http}/v1 (and /health, /metrics)")
            if http_ready is not None:
                http_ready(port_http)
        announce(f"djinn {__version__} serving {config.model.name} on {', '.join(bound)}")
        announce("plugins: " + ", ".join(plugins.selection.names()))
        if config.server.freeze_gc_heap:
            _FrozenHeap.enter()
            frozen = True
        if ready is not None:
            ready(bound, metrics.port if metrics is not None else None)
        await stop.wait()
    finally:
        if frozen:
            _FrozenHeap.leave()
        if api is not None:
            await api.close()
        await server.close()
        if metrics is not None:
            metrics.stop()
        runtime.kernel.stop()


def serve_forever(config: DjinnConfig, plugins: DjinnPlugins, *, token: str | None, announce: Callable[[str], None]) -> None:
    """``djinn run``: serve until SIGINT or SIGTERM, then shut down gracefully."""

    from rich.console import Console

    started = time.perf_counter()
    console = Console(stderr=True)
    if console.is_terminal:  # a live line of what start-up is doing; logs and pipes get none
        with console.status("starting") as status:
            runtime = build_runtime(config, plugins, report=status.update)
    else:
        runtime = build_runtime(config, plugins)
    announce(f"started in {time.perf_counter() - started:.1f} s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, plugins, token=token, announce=announce, stop=stop, runtime=runtime)
        announce("djinn stopped")

    asyncio.run(main())


class BackgroundServer:
    """A kernel and server on their own event-loop thread: for tests, the demo and benchmarks.

        with BackgroundServer(config, plugins) as server:
            client = connect(server.url("tcp"))

    The OpenAI-compatible HTTP API is served only when ``http_port`` is given (0: a free port);
    ``http_url`` is then its base URL (``http://host:port/v1``).
    """

    def __init__(self, config: DjinnConfig, plugins: DjinnPlugins, *, token: str | None = None,
                 runtime: Runtime | None = None, http_port: int | None = None) -> None:
        self.config, self.plugins, self.token = config, plugins, token
        self.runtime = runtime
        self.urls: list[str] = []
        self.metrics_port: int | None = None
        self.http_port_asked = http_port
        self.http_port: int | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="djinn-server", daemon=True)

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(urls: list[str], metrics_port: int | None) -> None:
                self.urls, self.metrics_port = urls, metrics_port
                self._ready.set()

            def http_ready(port: int) -> None:
                self.http_port = port

            await serve(self.config, self.plugins, token=self.token, announce=lambda _line: None,
                        stop=self._stop, runtime=self.runtime, ready=ready,
                        http_port=self.http_port_asked, http_ready=http_ready,
                        serve_http=self.http_port_asked is not None)

        try:
            asyncio.run(run())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def start(self) -> BackgroundServer:
        """Start and wait until it listens (re-raising a start-up error here)."""
        if self.runtime is None:
            self.runtime = build_runtime(self.config, self.plugins)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    @property
    def kernel(self) -> Kernel:
        """The started kernel (sessions, residency, memory)."""
        return self.runtime.kernel

    @property
    def model(self) -> ModelService:
        """The started model service (runner, batch engine)."""
        return self.runtime.model

    @property
    def http_url(self) -> str:
        """The OpenAI API's base URL (``http://host:port/v1``)."""
        if self.http_port is None:
            raise KeyError("the HTTP API is not served: give BackgroundServer an http_port")
        return f"http://{self.config.server.host}:{self.http_port}/v1"

    def url(self, scheme: str) -> str:
        """The bound URL of one transport."""
        for url in self.urls:
            if url.startswith(scheme + "://"):
                return url
        raise KeyError(f"not listening on {scheme}://; listening on {self.urls}")

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop thread and return its result (for inspecting state)."""
        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout=30)

    def vmu(self) -> dict[str, Any]:
        """The ``/metrics/vmu`` view (memory, sessions, counters), read on the server's loop thread."""
        return self.call(lambda: vmu(self.kernel))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        """Run ``coro`` as a task on the server's loop (a probe, say); cancel the returned future to stop it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def stop(self) -> None:
        """Shut down gracefully and wait for the thread."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
