"""The example third-party plugin: installed from its own directory, found with no change to djinn."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "djinn-fifo-scheduler"
DJINN = [sys.executable, "-m", "djinn.cli"]


@pytest.fixture(scope="module")
def installed():
    """Install the example into this environment (as a user would: pip install PATH)."""
    try:
        importlib.metadata.distribution("djinn-fifo-scheduler")
    except importlib.metadata.PackageNotFoundError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", str(EXAMPLE)],
            check=True,
        )
    importlib.invalidate_caches()


def test_djinn_plugins_lists_it_with_its_origin(installed):
    env = {k: v for k, v in os.environ.items() if k != "DJINN_PLUGINS"}  # the default selection
    out = subprocess.run([*DJINN, "plugins", "--json"], check=True, capture_output=True, text=True, env=env).stdout
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["fifo"]["origin"] == "djinn-fifo-scheduler"
    assert rows["fifo"]["slot"] == "scheduler"
    assert rows["fifo"]["selected"] is False


def test_plugins_option_selects_it(installed):
    out = subprocess.run([*DJINN, "config", "--plugins", "fifo"], check=True, capture_output=True, text=True).stdout
    assert 'scheduler = "fifo"' in out
    assert "max_victims = 8" in out


def test_it_serves_requests(installed):
    from djinn.client import connect
    from tests.serving import serving_config, start_server

    server = start_server(serving_config(), ["fifo", "tcp"])
    try:
        assert type(server.kernel.scheduler).__name__ == "FifoScheduler"
        with connect(server.url("tcp")) as client, client.model().session() as session:
            assert len(session.generate([1, 2, 3], max_new_tokens=3).tokens) == 3
    finally:
        server.stop()
