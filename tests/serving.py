"""Helpers for tests that start a real server: config with free ports and the environment's selection."""

from __future__ import annotations

import os

import attrs
import torch

from djinn.cli import split_plugin_names
from djinn.config import DjinnConfig
from djinn.engine.models import LoadedModel
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import BackgroundServer

TRANSPORT = os.environ.get("DJINN_TRANSPORT", "tcp")
#: a test server's GPU budget on CUDA, where budget 0 would take 90 % of the GPU: a test process
#: starts many servers, some while another still runs, and CLI tests start more in subprocesses
CUDA_TEST_BUDGET_GB = 4.0


def default_budget_gb() -> float:
    """The GPU budget of a test server that asks for none: ``CUDA_TEST_BUDGET_GB`` on CUDA, else 0."""
    return CUDA_TEST_BUDGET_GB if torch.cuda.is_available() else 0.0


def serving_config(model: str = "random:tiny-llama", *, budget_gb: float | None = None, tier_gb: float = 0.0625,
                settings: dict | None = None, **server) -> DjinnConfig:
    """Defaults with free ports, a small host tier and the given model and GPU budget
    (``default_budget_gb()`` when none is given). The heap is not frozen (``freeze_gc_heap``):
    a test process starts hundreds of servers, and each freeze first collects the whole heap."""
    base = DjinnConfig()
    merged = {"pinned_host": {"capacity_gb": tier_gb}}
    merged.update(settings or {})
    return attrs.evolve(
        base,
        server=attrs.evolve(base.server, **{"port": 0, "metrics_port": 0, "tick_s": 0.01, "freeze_gc_heap": False,
                                            **server}),
        model=attrs.evolve(base.model, name=model),
        memory=attrs.evolve(base.memory, gpu_memory_budget_gb=default_budget_gb() if budget_gb is None else budget_gb),
        settings=merged,
    )


def start_server(config: DjinnConfig, overrides=(), **kwargs) -> BackgroundServer:
    """A started server with the environment's plugin selection (DJINN_PLUGINS) plus ``overrides``."""
    names = split_plugin_names(os.environ.get("DJINN_PLUGINS")) + list(overrides)
    return BackgroundServer(config, get_plugin_manager(config, names), **kwargs).start()


def tiny_qwen2(name: str = "tiny-qwen2") -> LoadedModel:
    """A tiny Qwen2 with sliding-window layers (the one supported family without a random:NAME shape)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=512, use_sliding_window=True, sliding_window=8,
        max_window_layers=2, initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return LoadedModel(name=name, model=model, config=model.config, family="qwen2", dtype=torch.float32,
                       device=torch.device("cpu"))
