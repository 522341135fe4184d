"""The metrics endpoint: Prometheus text and the JSON memory view, from a real server."""

from __future__ import annotations

import json
import socket
import urllib.request

import attrs

from prometheus_client.parser import text_string_to_metric_families

from djinn.client import connect
from tests.serving import serving_config, start_server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_metrics_report_memory_sessions_and_the_engine():
    port = _free_port()
    config = serving_config()
    server = start_server(attrs.evolve(config, server=attrs.evolve(config.server, metrics_port=port)))
    try:
        with connect(server.url("tcp")) as client, client.model().session() as session:
            session.generate([1, 2, 3], max_new_tokens=4)
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples
            }
            assert samples[("djinn_device_bytes", (("category", "kv"),))] > 0
            assert samples[("djinn_requests_total", ())] >= 1
            assert samples[("djinn_engine_steps_total", ())] >= 3  # 4 tokens: the prompt step also decodes one
            assert samples[("djinn_kv_pool_blocks", (("state", "used"),))] >= 1
            assert samples[("djinn_engine_prefill_tokens_total", ())] == 3
            assert samples[("djinn_engine_busy_seconds_total", (("part", "prefill"),))] > 0
            assert samples[("djinn_engine_busy_seconds_total", (("part", "decode"),))] > 0
            vmu = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics/vmu", timeout=5).read())
            assert vmu["sessions"]["total"] == 1 and vmu["engine"]["steps"] >= 3
            assert vmu["memory"]["device"]["kv"] == samples[("djinn_device_bytes", (("category", "kv"),))]
    finally:
        server.stop()
