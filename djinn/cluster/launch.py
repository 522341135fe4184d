"""Starting a cluster on Ray: one Djinn server per GPU as a Ray actor, and the router in front.

Ray places and supervises the servers; nothing here manages machines. ``start_cluster``
connects to a Ray cluster (``address``) or starts a local one, reserves one bundle per server in
a placement group (``{"GPU": gpus_per_server, "CPU": cpus_per_server}``; ``PACK`` keeps them on
as few hosts as possible, ``SPREAD`` puts them on as many), starts a ``DjinnNode`` actor in each
bundle, and serves the router on a thread of its own. Ray sets ``CUDA_VISIBLE_DEVICES`` for
each actor, so each server's ``cuda`` is its own GPU; a fraction (``gpus_per_server=0.5``) puts
two servers on one GPU, each with the ``gpu_memory_budget_gb`` it is given.

Between servers only control calls travel through Ray (load, export, import); a session's KV
goes from the exporting actor into Ray's object store and is read by the importing actor, never
through the router. Clients' frames travel over Djinn's own transports.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs

from djinn.cluster.http import HttpRouter
from djinn.cluster.node import DjinnNode
from djinn.cluster.router import Backend, Router, RouterSettings
from djinn.config import DjinnConfig
from djinn.kernel.errors import ConfigError, DjinnError
from djinn.kernel.plugins import get_plugin_manager


def import_ray() -> Any:
    """``ray``, or a ``ConfigError`` that names the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"a cluster needs Ray, which is not installed ({exc}): pip install 'djinn[cluster]'") from None
    return ray


class RayNode:
    """The router's handle on one ``DjinnNode`` actor: its calls, awaited on the router's loop."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def load(self) -> dict[str, Any]:
        return await self.actor.load.remote()

    async def export_session(self, session_id: int) -> tuple[dict[str, Any], Any]:
        # two results: the router reads the small state; the bytes stay in the object store and
        # are handed to the importing actor by reference
        state, kv = self.actor.export_session.options(num_returns=2).remote(session_id)
        return await state, kv

    async def import_session(self, session_id: int, state: dict[str, Any], kv: Any) -> float:
        return await self.actor.import_session.remote(session_id, state, kv)

    async def tokenize(self, text: str) -> list[int]:
        return await self.actor.tokenize.remote(text)


class LocalNode:
    """A ``DjinnNode`` in this process behind the same calls (each on a worker thread): for a
    cluster on one machine without Ray (the benchmark on a machine that has none)."""

    def __init__(self, node: DjinnNode) -> None:
        self.node = node

    async def load(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.node.load)

    async def export_session(self, session_id: int) -> tuple[dict[str, Any], Any]:
        return await asyncio.to_thread(self.node.export_session, session_id)

    async def import_session(self, session_id: int, state: dict[str, Any], kv: Any) -> float:
        return await asyncio.to_thread(self.node.import_session, session_id, state, kv)

    async def tokenize(self, text: str) -> list[int]:
        return await asyncio.to_thread(self.node.tokenize, text)


class BackgroundRouter:
    """A router on its own event-loop thread (as ``BackgroundServer`` runs a server), with the
    OpenAI API in front of its servers' when ``http_port`` is given (0: a free port)."""

    def __init__(self, router: Router, urls: Sequence[str], *, http_host: str = "127.0.0.1",
                 http_port: int | None = None) -> None:
        self.router, self._urls = router, list(urls)
        self.urls: list[str] = []
        self.http = None if http_port is None else HttpRouter(router, host=http_host, port=http_port,
                                                              token=router.token)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="djinn-router", daemon=True)

    def start(self) -> BackgroundRouter:
        """Start and wait until it listens (re-raising a start-up error)."""
        self._thread.start()
        self.urls = self.call(self.router.start(self._urls))
        if self.http is not None:
            self.call(self.http.start())
        return self

    @property
    def http_url(self) -> str:
        """The OpenAI API's base URL (``http://host:port/v1``)."""
        if self.http is None:
            raise KeyError("the router serves no HTTP API: give it an http_port")
        return f"http://{self.http.host}:{self.http.port}/v1"

    def call(self, coro: Any, timeout: float | None = 600.0) -> Any:
        """Run ``coro`` on the router's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def url(self, scheme: str = "tcp") -> str:
        """The bound URL of one transport."""
        for url in self.urls:
            if url.startswith(scheme + "://"):
                return url
        raise KeyError(f"the router does not listen on {scheme}://; it listens on {self.urls}")

    def stop(self) -> None:
        """Close the router and its loop."""
        if self._loop.is_running():
            try:
                if self.http is not None:
                    self.call(self.http.close(), timeout=30)
                self.call(self.router.close(), timeout=30)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=30)
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()


def build_router(config: DjinnConfig, plugin_names: Sequence[str], backends: Sequence[Backend], *,
                 token: str | None, server_token: str | None, settings: RouterSettings) -> Router:
    """A router with the configuration's transports and serializer (as a server selects them)."""
    plugins = get_plugin_manager(config, list(plugin_names))
    transports = {t.scheme: t for t in plugins.build_slot("transport")}
    serializer = plugins.build_slot("serializer")[0]
    return Router(backends, transports=transports, serializer=serializer, token=token,
                  server_token=server_token, settings=settings)


def router_urls(router: Router, host: str, port: int) -> list[str]:
    """Where a router listens: every selected transport's default URL for ``host:port`` that
    other processes can reach (not the in-process one)."""
    return [t.default_url(host, port) for t in router.transports.values() if t.reachable_remotely]


@attrs.define(eq=False)
class Cluster:
    """A started cluster: the server actors, their placement group and the router."""

    ray: Any
    actors: dict[str, Any]
    placement_group: Any
    router: BackgroundRouter
    owns_ray: bool
    #: how each server actor is started: (config, plugin names, DjinnNode keywords, Ray options)
    recipe: tuple[DjinnConfig, list[str], dict[str, Any], dict[str, Any]]

    def add_server(self, name: str, timeout_s: float = 600.0) -> None:
        """Start one more server actor (outside the placement group, with the same resources
        each of the others has) and put it behind the router."""
        if name in self.actors:
            raise ValueError(f"a server named {name!r} exists already")
        config, plugin_names, keywords, options = self.recipe
        actor = self.ray.remote(DjinnNode).options(**options).remote(config, plugin_names, name=name, **keywords)
        self.actors[name] = actor
        described = self.ray.get(actor.describe.remote(), timeout=timeout_s)
        backend = Backend(name, _tcp_url(described["urls"]), RayNode(actor), described["http_url"])
        self.router.call(self.router.router.add_backend(backend))

    @property
    def url(self) -> str:
        """The router's TCP URL: what clients connect to."""
        return self.router.url("tcp")

    @property
    def server_token(self) -> str | None:
        """The secret the servers ask of whoever connects to them (the router, or a client that
        bypasses it)."""
        return self.recipe[2]["token"]

    def kill(self, name: str, timeout_s: float = 30.0) -> None:
        """Kill one server's actor and return once it is gone (its process ends; its sessions are
        lost). ``ray.kill`` only asks: the actor may answer a call or two before it ends, and Ray
        may call it dead while its process still serves its clients for a moment, so this waits
        until its port refuses connections too."""
        address = urlsplit(self.router.router.backends[name].url)
        self.ray.kill(self.actors[name], no_restart=True)
        self._await_gone(name, address, time.monotonic() + timeout_s)

    def _await_gone(self, name: str, address: Any, deadline: float) -> None:
        """Wait until a killed server's actor is dead and its port at ``address`` refuses
        connections: its process has ended, and with it what it held (GPU memory among it)."""
        actor = self.actors[name]
        while time.monotonic() < deadline:
            try:
                self.ray.get(actor.load.remote(), timeout=max(0.0, deadline - time.monotonic()))
            except self.ray.exceptions.RayActorError:
                break
            time.sleep(0.05)
        while time.monotonic() < deadline:
            try:
                socket.create_connection((address.hostname, address.port), timeout=1.0).close()
            except OSError:  # refused: the process and its listening socket are gone
                return
            time.sleep(0.05)
        raise TimeoutError(f"server {name} was still answering after it was killed")

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the router and the servers, returning once every server's process has ended (so
        a next cluster finds its GPU memory free), then remove their placement group (and stop
        Ray, if this started it)."""
        addresses = {name: urlsplit(backend.url) for name, backend in self.router.router.backends.items()}
        try:
            self.router.stop()
        finally:
            for actor in self.actors.values():
                try:
                    self.ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - an actor already gone
                    pass
            deadline = time.monotonic() + timeout_s
            try:
                for name, address in addresses.items():
                    if name in self.actors:
                        self._await_gone(name, address, deadline)
            finally:
                if self.placement_group is not None:
                    from ray.util.placement_group import remove_placement_group

                    remove_placement_group(self.placement_group)
                if self.owns_ray:
                    self.ray.shutdown()


def start_cluster(
    config: DjinnConfig, plugin_names: Sequence[str] = (), *, servers: int | None = None,
    gpus_per_server: float | None = None, cpus_per_server: float = 1.0, address: str | None = None,
    strategy: str = "PACK", host: str = "127.0.0.1", port: int = 0, http_port: int | None = None,
    token: str | None = None,
    server_host: str = "127.0.0.1", settings: RouterSettings = RouterSettings(),
    ray_init: dict[str, Any] | None = None, start_timeout_s: float = 600.0,
) -> Cluster:
    """Start ``servers`` Djinn servers as Ray actors and a router on ``host:port``.

    Without ``servers``: one per GPU of the Ray cluster (one, on a cluster without GPUs).
    Without ``gpus_per_server``: one GPU each where the cluster has a GPU per server, none on a
    cluster without GPUs. ``server_host`` is where each server listens; ``"node"`` means each
    actor's own node address (needed when the router and the servers are on different hosts).
    With ``http_port`` (0: a free one) the router also serves the OpenAI API in front of the
    servers' own. ``ray_init`` are extra ``ray.init`` arguments when this starts Ray.
    """
    ray = import_ray()
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    owns_ray = not ray.is_initialized()
    if owns_ray:
        options = {"include_dashboard": False, **(ray_init or {})}
        if address is None:
            # a new Ray of this machine alone (never one another process started here): its
            # processes talk over loopback (by default Ray binds the address other hosts would
            # reach it at), and it reports no usage statistics
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            options.setdefault("_node_ip_address", "127.0.0.1")
        ray.init(address=address or "local", **options)
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        count = servers if servers is not None else max(1, int(gpus))
        if count < 1:
            raise ConfigError(f"--servers must be at least 1, not {count}")
        per_gpu = gpus_per_server if gpus_per_server is not None else (1.0 if gpus >= count else 0.0)
        if per_gpu * count > gpus + 1e-9:
            raise ConfigError(f"{count} servers x {per_gpu:g} GPU need {per_gpu * count:g} GPUs; "
                              f"the Ray cluster has {gpus:g}")
        bundle = {"CPU": cpus_per_server, **({"GPU": per_gpu} if per_gpu else {})}
        group = placement_group([dict(bundle) for _ in range(count)], strategy=strategy)
        try:
            ray.get(group.ready(), timeout=start_timeout_s)
        except Exception as exc:
            remove_placement_group(group)
            raise DjinnError(f"Ray could not reserve {count} x {bundle} ({strategy}): {exc}") from None
        server_token = secrets.token_hex(16)
        actor_class = ray.remote(DjinnNode)
        names = [f"djinn-{i}" for i in range(count)]
        keywords = {"token": server_token, "host": server_host, "http": http_port is not None}
        # a server's calls wait on its own loop, so a few at once (a load during an export) is safe
        options = {"num_cpus": cpus_per_server, "num_gpus": per_gpu, "max_concurrency": 16}
        actors = {}
        for index, name in enumerate(names):
            actors[name] = actor_class.options(
                **options,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            ).remote(config, list(plugin_names), name=name, **keywords)
        described = ray.get([actors[n].describe.remote() for n in names], timeout=start_timeout_s)
        backends = [Backend(d["name"], _tcp_url(d["urls"]), RayNode(actors[d["name"]]), d["http_url"])
                    for d in described]
        router = build_router(config, plugin_names, backends, token=token, server_token=server_token,
                              settings=settings)
        background = BackgroundRouter(router, router_urls(router, host, port), http_host=host,
                                      http_port=http_port).start()
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise
    return Cluster(ray, actors, group, background, owns_ray, (config, list(plugin_names), keywords, options))


def _tcp_url(urls: Sequence[str]) -> str:
    for url in urls:
        if url.startswith("tcp://"):
            return url
    raise ConfigError(f"a cluster server must listen on tcp://; it listens on {', '.join(urls)}")
