"""Shared fixtures: a fresh plugin manager per test, never a global one."""

from __future__ import annotations

import os

import pytest
import torch

from djinn.cli import split_plugin_names
from djinn.config import DjinnConfig
from djinn.kernel.config import PluginSelection
from djinn.kernel.plugins import get_plugin_manager


def selection_from_env() -> list[str]:
    """The plugin selection a tox environment passes through ``DJINN_PLUGINS``."""
    return split_plugin_names(os.environ.get("DJINN_PLUGINS"))


@pytest.fixture(scope="module", autouse=True)
def fresh_compile_cache():
    """On CUDA, forget compiled kernels after each module. Every KV pool length compiles the paged
    decode kernel once per batch bucket, and dynamo runs a function eagerly past its recompile
    limit (which a CUDA graph cannot capture): a server makes one pool, a test process dozens."""
    yield
    if torch.cuda.is_available():
        torch._dynamo.reset()


@pytest.fixture
def make_plugins():
    """Build a fresh plugin manager from a config and overrides (plus local plugin objects)."""

    def make(config: DjinnConfig | None = None, overrides=(), **kwargs):
        return get_plugin_manager(config or DjinnConfig(), list(overrides), **kwargs)

    return make


@pytest.fixture
def plain_config() -> DjinnConfig:
    """Defaults with the environment's selection applied on top by the caller."""
    return DjinnConfig(plugins=PluginSelection())
