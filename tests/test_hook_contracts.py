"""Hooks do what their docstrings in the ``hookspecs.py`` modules say, end to end on a tiny server."""

from __future__ import annotations

import json
import socket
import urllib.request

import attrs

from djinn.client import connect
from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import BackgroundServer
from tests.serving import serving_config

PROMPT = [5, 17, 300, 42]


def free_port() -> int:
    """A port nobody listens on right now (the metrics endpoint's port 0 means disabled)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(probes: dict[str, object], *names: str, metrics: bool = False, settings: dict | None = None) -> BackgroundServer:
    """A started server over tcp with ``probes`` registered as local plugins and selected."""
    config = serving_config(settings=settings)
    if metrics:
        config = attrs.evolve(config, server=attrs.evolve(config.server, metrics_port=free_port()))
    plugins = get_plugin_manager(config, ["tcp", *names, *probes], extra_plugins=probes)
    return BackgroundServer(config, plugins).start()


def http_get(server: BackgroundServer, path: str) -> bytes:
    """The body of ``GET path`` on the server's metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}{path}", timeout=30) as reply:
        return reply.read()


# --------------------------------------------------------------------------- lifecycle


class ShutdownProbe:
    """Records, into a shared list, its name at every ``djinn_shutdown`` and what it saw then."""

    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls
        self.tier_readable: bool | None = None
        self.sessions_open = -1

    @hookimpl
    def djinn_shutdown(self, kernel):
        self.calls.append(self.name)
        try:
            kernel.tiers["pinned_host"].arena
            self.tier_readable = True
        except RuntimeError:
            self.tier_readable = False
        self.sessions_open = len(kernel.sessions)


def test_shutdown_is_called_once_last_registered_plugin_first_before_tiers_are_released():
    calls: list[str] = []
    first, second = ShutdownProbe("first", calls), ShutdownProbe("second", calls)
    server = start({"first": first, "second": second})  # registered in this order
    assert calls == []
    server.stop()
    assert calls == ["second", "first"]
    assert first.tier_readable is True and second.tier_readable is True


def test_shutdown_runs_after_the_server_has_closed_its_clients_sessions():
    probe = ShutdownProbe("probe", [])
    server = start({"probe": probe})
    client = connect(server.url("tcp"))
    try:
        client.model().session().generate(PROMPT, max_new_tokens=1)
        server.stop()
    finally:
        client.close()
    assert probe.sessions_open == 0


# --------------------------------------------------------------------------- metrics


class WidgetCollector:
    """A Prometheus collector with one gauge."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily("probe_widgets", "Widgets the probe counts", value=7)


class MetricsProbe:
    """Registers a collector at start-up and contributes ``table`` to ``/metrics/vmu``."""

    def __init__(self, table: dict | None) -> None:
        self.table = table
        self.reads = 0

    @hookimpl
    def djinn_startup(self, kernel):
        if self.table is not None:
            kernel.metrics_registry.register(WidgetCollector())

    @hookimpl
    def djinn_metrics(self, kernel):
        self.reads += 1
        return self.table


def test_a_collector_registered_at_startup_is_served_at_metrics():
    server = start({"probe": MetricsProbe({"probe": {}})}, metrics=True)
    try:
        text = http_get(server, "/metrics").decode()
    finally:
        server.stop()
    assert "probe_widgets 7.0" in text.splitlines()
    assert "djinn_device_budget_bytes" in text  # beside the kernel's own series


def test_metrics_contributions_are_merged_into_the_plugins_table_of_metrics_vmu():
    tables = {"a": MetricsProbe({"a": {"hits": 1}}), "b": MetricsProbe({"b": {"misses": 2}}),
              "quiet": MetricsProbe(None)}
    server = start(tables, metrics=True)
    try:
        vmu = json.loads(http_get(server, "/metrics/vmu"))
        reads = [probe.reads for probe in tables.values()]
        again = json.loads(http_get(server, "/metrics/vmu"))
    finally:
        server.stop()
    assert vmu["plugins"] == again["plugins"] == {"a": {"hits": 1}, "b": {"misses": 2}}
    assert reads == [1, 1, 1]  # once per read, for every selected plugin
    assert [probe.reads for probe in tables.values()] == [2, 2, 2]


# --------------------------------------------------------------------------- weight streaming


class PlanProbe:
    """Records every ``djinn_stream_plan`` call."""

    def __init__(self) -> None:
        self.plans: list[dict] = []

    @hookimpl
    def djinn_stream_plan(self, model, layers, layer_bytes, ring_bytes):
        self.plans.append({"model": model, "layers": layers, "layer_bytes": layer_bytes, "ring_bytes": ring_bytes})


def test_stream_plan_is_called_once_at_load_when_the_streamer_streams():
    probe = PlanProbe()
    # every layer through the ring, also where the budget would keep them all resident (CUDA)
    server = start({"probe": probe}, "ringbuffer", settings={"ringbuffer": {"resident_layers": 0}})
    try:
        assert len(probe.plans) == 1
        with connect(server.url("tcp")) as client, client.model().session() as session:
            session.generate(PROMPT, max_new_tokens=2)
        assert len(probe.plans) == 1  # per load, not per request
        plan = probe.plans[0]
        assert plan["model"] == server.config.model.name
        assert plan["layers"] == server.model.runner.num_layers == len(plan["layer_bytes"])
        assert all(n > 0 for n in plan["layer_bytes"])
        assert plan["ring_bytes"] == server.kernel.streamer.stats().ring_bytes > 0
    finally:
        server.stop()


def test_stream_plan_is_not_called_when_the_weights_stay_resident():
    probe = PlanProbe()
    server = start({"probe": probe}, "resident")
    try:
        with connect(server.url("tcp")) as client, client.model().session() as session:
            session.generate(PROMPT, max_new_tokens=2)
    finally:
        server.stop()
    assert probe.plans == []
