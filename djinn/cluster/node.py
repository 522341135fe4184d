"""One Djinn server of a cluster: what runs inside each Ray actor.

``DjinnNode`` starts an ordinary server (``BackgroundServer``: the kernel, the engine, the
native protocol on its own event-loop thread) and answers the router's few control calls:
its load, a session's export and import, tokenizing a text. Clients' frames never pass through
these calls; they reach the server over its transport, forwarded by the router. The class is
plain Python (``ray.remote`` wraps it in ``djinn.cluster.ray``), so tests also drive it in
process. Each call runs on a Ray worker thread and hands its work to the server's loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import attrs

from djinn.cluster.handoff import SessionState, export_session, host_bytes, import_session, kv_layout
from djinn.config import DjinnConfig
from djinn.kernel.errors import SessionError
from djinn.kernel.plugins import get_plugin_manager
from djinn.kernel.strategies import Residency
from djinn.server.launch import BackgroundServer

#: seconds a control call waits for the server's loop (an export or import of many GiB included)
CALL_TIMEOUT_S = 600.0


def server_config(config: DjinnConfig, host: str) -> DjinnConfig:
    """A cluster server's configuration: free ports, no HTTP API or metrics endpoint of its own
    (the router reads its load through the control calls), listening on ``host``."""
    return attrs.evolve(config, server=attrs.evolve(config.server, host=host, port=0, metrics_port=0, http_port=0))


class DjinnNode:
    """A started server and its control calls. ``config`` is the servers' configuration (its
    ports are replaced by free ones, see ``server_config``); ``plugin_names`` are ``--plugins``
    overrides on top of it. ``host`` is where it listens; ``"node"``: this Ray node's address.
    With ``http`` it also serves the OpenAI API (on a free port)."""

    def __init__(self, config: DjinnConfig, plugin_names: Sequence[str] = (), *, token: str | None = None,
                 name: str = "server", host: str = "127.0.0.1", http: bool = False) -> None:
        if host == "node":
            import ray

            host = ray.util.get_node_ip_address()
        self.name = name
        config = server_config(config, host)
        self.server = BackgroundServer(config, get_plugin_manager(config, list(plugin_names)), token=token,
                                       http_port=0 if http else None).start()
        self.counters = {"exports": 0, "imports": 0, "export_seconds": 0.0, "import_seconds": 0.0,
                         "exported_bytes": 0, "imported_bytes": 0}

    def _on_loop(self, coro: Any) -> Any:
        return self.server.spawn(coro).result(timeout=CALL_TIMEOUT_S)

    def describe(self) -> dict[str, Any]:
        """Where it listens and what it serves: name, URLs (``http_url``: its OpenAI API, or ""),
        model and its vocabulary size, KV layout, device, process id."""
        http_url = "" if self.server.http_port is None else f"http://{self.server.config.server.host}:{self.server.http_port}"
        return {
            "name": self.name, "urls": list(self.server.urls), "http_url": http_url,
            "model": self.server.config.model.name, "vocab_size": self.server.model.runner.vocab_size,
            "layout": self.server.call(lambda: kv_layout(self.server.kernel, self.server.model)),
            "device": str(self.server.model.device), "pid": os.getpid(),
        }

    def ping(self) -> str:
        """The server's name (a liveness check)."""
        return self.name

    def load(self) -> dict[str, Any]:
        """What placement and migration decide on: device and tier bytes, the admission queue,
        every session's size, phase and residency (read on the server's loop, one snapshot)."""
        def read() -> dict[str, Any]:
            kernel, model = self.server.kernel, self.server.model
            view = kernel.view()
            tiers = {name: tier.stats() for name, tier in kernel.tiers.items()}
            sessions = [
                {"id": s.info.id, "kv_bytes": s.info.kv_bytes, "phase": s.info.phase.value,
                 "residency": s.info.residency.value, "busy": s.info.busy, "backed": s.info.backed,
                 "tokens": len(model.context(s))}
                for s in kernel.sessions.values() if not s.closed
            ]
            # a backed idle session's GPU blocks are freed without a copy when memory is needed
            reclaimable = sum(s.kv_bytes for s in view.sessions
                              if s.backed and not s.busy and s.residency is Residency.RESIDENT)
            return {
                "name": self.name,
                "device_budget_bytes": view.memory.device_budget_bytes,
                "device_free_bytes": view.memory.device_free_bytes,
                "reclaimable_bytes": reclaimable,
                "weights_bytes": kernel.memory.device_bytes("weights"),
                "tier_capacity_bytes": sum(t.capacity_bytes for t in tiers.values()),
                "tier_free_bytes": sum(view.memory.tier_free_bytes.values()),
                "admission_queue": view.memory.queued_requests,
                "counters": {k: kernel.counters[k] for k in ("admission_waits", "admission_refusals",
                                                             "evict_failures", "evictions", "restores")},
                "sessions": sessions,
                "handoffs": dict(self.counters),
            }

        return self.server.call(read)

    def export_session(self, session_id: int) -> tuple[dict[str, Any], Any]:
        """The session's state (a plain dict) and its KV bytes (a uint8 numpy array, or None
        when it was dropped); the session stays open and unchanged here."""
        started = time.perf_counter()
        state, host = self._on_loop(export_session(self.server.kernel, self.server.model, session_id))
        self.counters["exports"] += 1
        self.counters["export_seconds"] += time.perf_counter() - started
        self.counters["exported_bytes"] += state.nbytes
        return attrs.asdict(state), None if host is None else host.numpy()

    def import_session(self, session_id: int, state: dict[str, Any], kv: Any) -> float:
        """Fill the new, empty session ``session_id`` with an exported one; the copy's seconds."""
        restored = SessionState(**state)
        host = None if kv is None else host_bytes(kv)
        seconds = self._on_loop(import_session(self.server.kernel, self.server.model, session_id, restored, host))
        self.counters["imports"] += 1
        self.counters["import_seconds"] += seconds
        self.counters["imported_bytes"] += restored.nbytes
        return seconds

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as this server's GENERATE would take them."""
        tokenizer = self.server.model.loaded.tokenizer
        if tokenizer is None:
            raise SessionError("this model has no tokenizer; send token ids")
        return list(tokenizer(text)["input_ids"])

    def stop(self) -> None:
        """Stop serving (every session still open is freed)."""
        self.server.stop()
