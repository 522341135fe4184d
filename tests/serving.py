"""Helpers for tests that start a real server: config with free ports and the environment's selection."""

from __future__ import annotations

import os

import attrs

from djinn.kernel.config import DjinnConfig
from djinn.kernel.plugins import get_plugin_manager, split_plugin_names
from djinn.kernel.server import BackgroundServer

TRANSPORT = os.environ.get("DJINN_TRANSPORT", "tcp")


def serving_config(model: str = "random:tiny-llama", *, budget_gb: float = 0.0, tier_gb: float = 0.0625,
                settings: dict | None = None, **server) -> DjinnConfig:
    """Defaults with free ports, a small host tier and the given model and GPU budget."""
    base = DjinnConfig()
    merged = {"pinned_host": {"capacity_gb": tier_gb}}
    merged.update(settings or {})
    return attrs.evolve(
        base,
        server=attrs.evolve(base.server, port=0, metrics_port=0, tick_s=0.01, **server),
        model=attrs.evolve(base.model, name=model),
        memory=attrs.evolve(base.memory, gpu_memory_budget_gb=budget_gb),
        settings=merged,
    )


def start_server(config: DjinnConfig, overrides=(), **kwargs) -> BackgroundServer:
    """A started server with the environment's plugin selection (DJINN_PLUGINS) plus ``overrides``."""
    names = split_plugin_names(os.environ.get("DJINN_PLUGINS")) + list(overrides)
    return BackgroundServer(config, get_plugin_manager(config, names), **kwargs).start()
