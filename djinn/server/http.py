"""The HTTP side: ``/metrics`` (Prometheus text) and ``/metrics/vmu`` (JSON)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs

from djinn.kernel.kernel import Kernel


def vmu(kernel: Kernel) -> dict[str, Any]:
    """The memory and session view that ``/metrics/vmu``, the STATUS op and ``djinn status`` show,
    with what plugins add through ``djinn_metrics``. Read on the event-loop thread."""
    infos = [s.info for s in list(kernel.sessions.values())]
    plugins: dict[str, Any] = {}
    for contribution in kernel.plugins.notify("djinn_metrics", kernel=kernel):
        plugins.update(contribution or {})
    return {
        "model": kernel.config.model.name,
        "memory": kernel.memory.snapshot(),
        "tiers": {name: attrs.asdict(t.stats()) for name, t in kernel.tiers.items()},
        "sessions": {
            "total": len(infos),
            "by_phase": dict(Counter(i.phase.value for i in infos)),
            "by_residency": dict(Counter(i.residency.value for i in infos)),
        },
        "admission_queue": kernel.view().memory.queued_requests,
        "counters": dict(kernel.counters),
        "streamer": attrs.asdict(kernel.streamer.stats()),
        "engine": kernel.backend.stats(),
        "plugins": plugins,
    }


class MetricsEndpoint:
    """``/metrics`` (Prometheus text) and ``/metrics/vmu`` (JSON) on their own thread."""

    def __init__(self, kernel: Kernel, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        from prometheus_client import generate_latest

        self.kernel, self.loop = kernel, loop
        # the kernel's registry: plugins' own collectors are served beside the kernel's series
        self.registry = kernel.metrics_registry
        self._collector = VmuCollector(self.snapshot)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/metrics":
                    body, kind = generate_latest(endpoint.registry), "text/plain; version=0.0.4"
                elif self.path == "/metrics/vmu":
                    body, kind = json.dumps(endpoint.snapshot()).encode(), "application/json"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="djinn-metrics", daemon=True)

    def snapshot(self) -> dict[str, Any]:
        """The kernel's view, read on the event loop so hooks run where they always do."""
        async def read() -> dict[str, Any]:
            return vmu(self.kernel)

        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(timeout=10)

    def start(self) -> None:
        """Serve in the background."""
        self.registry.register(self._collector)
        self.thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.registry.unregister(self._collector)


class VmuCollector:
    """Prometheus series from the kernel's snapshot."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        vmu = self.snapshot()
        device = GaugeMetricFamily("djinn_device_bytes", "Device bytes by category", labels=["category"])
        for category, n in vmu["memory"]["device"].items():
            device.add_metric([category], n)
        yield device
        yield GaugeMetricFamily("djinn_device_budget_bytes", "Device byte budget", value=vmu["memory"]["budget_bytes"])
        tiers = GaugeMetricFamily("djinn_tier_bytes", "Bytes held in host tiers", labels=["tier"])
        for tier, n in vmu["memory"]["tiers"].items():
            tiers.add_metric([tier], n)
        yield tiers
        phases = GaugeMetricFamily("djinn_sessions", "Open sessions by phase", labels=["phase"])
        for phase, n in vmu["sessions"]["by_phase"].items():
            phases.add_metric([phase], n)
        yield phases
        yield GaugeMetricFamily("djinn_admission_queue", "Requests waiting for memory", value=vmu["admission_queue"])
        for name, value in vmu["counters"].items():
            yield CounterMetricFamily(f"djinn_{name}", f"Total {name.replace('_', ' ')}", value=value)
        engine = vmu["engine"]
        yield CounterMetricFamily("djinn_engine_steps", "Batch engine steps", value=engine["steps"])
        yield GaugeMetricFamily("djinn_engine_mean_batch", "Mean decode rows per engine step",
                                value=engine["mean_batch"])
        busy = CounterMetricFamily("djinn_engine_busy_seconds", "Batch engine time by part of a step", labels=["part"])
        busy.add_metric(["prefill"], engine["prefill_seconds"])
        busy.add_metric(["decode"], engine["decode_seconds"])
        yield busy
        yield CounterMetricFamily("djinn_engine_prefill_tokens", "Prompt tokens prefilled by the batch engine",
                                  value=engine["prefill_tokens"])
        yield CounterMetricFamily("djinn_engine_graph_captures_after_start",
                                  "CUDA graphs captured after start-up (a request waited for each)",
                                  value=engine["graph_captures_after_start"])
        yield CounterMetricFamily("djinn_engine_compiles_after_start",
                                  "torch.compile graphs compiled after start-up (a request waited for each)",
                                  value=engine["compiles_after_start"])
        pool = GaugeMetricFamily("djinn_kv_pool_blocks", "KV pool blocks", labels=["state"])
        pool.add_metric(["used"], engine["kv_pool_blocks_used"])
        pool.add_metric(["total"], engine["kv_pool_blocks"])
        yield pool


