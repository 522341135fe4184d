"""A model larger than the GPU budget served through the ``ringbuffer`` streamer, end to end.

The budget is split as the engine and the streamer agree: the runner keeps the embeddings, norm
and head, the ringbuffer keeps its KV reserve free and as many leading layers resident as fit
beside its ring, and streams the others. Figures here are in bytes of ``random:tiny-llama``.
"""

from __future__ import annotations

import subprocess
import sys

import attrs
import pytest
import torch

from djinn.client import connect
from djinn.config import DjinnConfig
from djinn.engine.batch import BatchEngine, EngineRequest, run_to_completion
from djinn.engine.families import family_of
from djinn.engine.models import load_model, weight_bytes
from djinn.engine.runner import ModelRunner, outside_layers_bytes
from djinn.plugins.streamers.resident import module_nbytes
from djinn.plugins.streamers.ringbuffer import RingbufferSettings, RingbufferStreamer
from tests.serving import serving_config, start_server

MODEL = "random:tiny-llama"
GIB = 1 << 30
BLOCK_TOKENS = 16
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 5, 3, 2, 9, 4, 1]]


@attrs.frozen
class Sizes:
    outside: int  # embeddings, final norm, head
    layer: int  # one decoder layer (all four are alike)
    total: int  # every weight of the model
    kv_block: int  # one KV pool block of BLOCK_TOKENS tokens


def model_sizes() -> Sizes:
    config = DjinnConfig()
    loaded = load_model(MODEL, dtype=config.model.dtype, seed=config.model.seed)
    runner_config = loaded.config
    kv_per_token = (
        2 * runner_config.num_hidden_layers * runner_config.num_key_value_heads
        * (runner_config.hidden_size // runner_config.num_attention_heads) * torch.finfo(torch.float32).bits // 8
    )
    return Sizes(
        outside=outside_layers_bytes(loaded),
        layer=module_nbytes(family_of(loaded).layers[0]),
        total=weight_bytes(loaded.model),
        kv_block=BLOCK_TOKENS * kv_per_token,
    )


def budget_gb(nbytes: float) -> float:
    """A GPU budget of ``nbytes`` for weights and KV; on CUDA the workspace comes on top."""
    workspace = DjinnConfig().memory.workspace_gb * GIB if torch.cuda.is_available() else 0
    return (nbytes + workspace) / GIB


def small_blocks(config: DjinnConfig) -> DjinnConfig:
    return attrs.evolve(config, memory=attrs.evolve(config.memory, kv_block_tokens=BLOCK_TOKENS))


def greedy_tokens(server, prompts=PROMPTS, new_tokens: int = 6) -> list[list[int]]:
    with connect(server.url("tcp")) as client:
        model = client.model()
        return [model.session().generate(prompt, max_new_tokens=new_tokens).tokens for prompt in prompts]


def test_a_model_larger_than_the_budget_serves_the_resident_tokens():
    sizes = model_sizes()
    reserve = 4 * sizes.kv_block
    # two layers resident beside a ring of one (no prefetch needs no second buffer) and the reserve
    budget = sizes.outside + 3.3 * sizes.layer + reserve
    assert sizes.total > budget, "the model must not fit the budget"
    settings = {"ringbuffer": {"kv_reserve_gb": reserve / GIB, "prefetch_layers": 0}}
    streamed = start_server(small_blocks(serving_config(MODEL, budget_gb=budget_gb(budget), settings=settings)),
                            ["ringbuffer"])
    try:
        tokens = greedy_tokens(streamed)
        streamer = streamed.kernel.streamer
        assert isinstance(streamer, RingbufferStreamer)
        stats = streamer.stats()
        assert streamer.resident_layers == 2
        assert stats.ring_bytes == sizes.layer and stats.device_bytes == 3 * sizes.layer
        assert streamed.model.runner.device_weight_bytes() == sizes.outside + 3 * sizes.layer
        # every pass streamed the two streamed layers, never the resident ones
        assert stats.passes > 0 and stats.bytes_streamed == stats.passes * 2 * sizes.layer
    finally:
        streamed.stop()
    # the same kernels as the streamed path on CUDA: no fused decode, no captured graphs
    reference = serving_config(MODEL, fused_decode=False, cuda_graphs=False)
    resident = start_server(small_blocks(reference), ["resident"])
    try:
        assert tokens == greedy_tokens(resident)
    finally:
        resident.stop()


def _run_cli(tmp_path, budget: float, reserve_gb: float):
    path = tmp_path / "plugins.toml"
    path.write_text(
        f"[memory]\ngpu_memory_budget_gb = {budget_gb(budget)!r}\n"
        f"[settings.ringbuffer]\nkv_reserve_gb = {reserve_gb!r}\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "djinn.cli", "run", "--config", str(path), "--plugins", "ringbuffer",
         "--model", MODEL, "--port", "0", "--metrics-port", "0", "--http-port", "0"],
        capture_output=True, text=True, timeout=240,
    )


def test_djinn_run_names_the_sizes_when_not_one_layer_fits_the_ring(tmp_path):
    sizes = model_sizes()
    reserve = 2 * sizes.kv_block
    result = _run_cli(tmp_path, sizes.outside + 0.8 * sizes.layer + reserve, reserve / GIB)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert "LlamaDecoderLayer" in line and f"needs {sizes.layer} bytes" in line
    assert f"keeps {reserve} bytes" in line and "gpu_memory_budget_gb" in line


def test_djinn_run_names_the_sizes_when_the_embeddings_and_head_take_the_budget(tmp_path):
    sizes = model_sizes()
    result = _run_cli(tmp_path, 0.9 * sizes.outside, 0.0)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "embeddings, final norm and head" in lines[0] and "gpu_memory_budget_gb" in lines[0]


# --------------------------------------------------------------------------- one pass per step


@pytest.mark.parametrize("sessions", [1, 4])
def test_sessions_decoding_together_stream_the_layers_once_per_step(sessions):
    sizes = model_sizes()
    loaded = load_model(MODEL, dtype="float32", seed=0)
    # one resident layer, a ring of two; reuse off so every pass copies what it streams
    streamer = RingbufferStreamer(RingbufferSettings(kv_reserve_fraction=0.0, reuse=False))
    runner = ModelRunner(loaded, streamer=streamer, budget_bytes=int(3.5 * sizes.layer))
    assert streamer.resident_layers == 1 and streamer.pass_bytes == 3 * sizes.layer
    engine = BatchEngine(runner, prefill_chunk_tokens=1024)
    engine.step_log = []
    requests = [EngineRequest(runner.new_kv(), list(PROMPTS[i % len(PROMPTS)]), 5) for i in range(sessions)]
    run_to_completion(engine, requests)
    assert all(r.error is None and len(r.tokens) == 5 for r in requests)
    # every prompt went into one packed prefill pass; each decode step is one pass for all rows
    prefill_passes = sum(1 for record in engine.step_log if record.prefill_chunks)
    decode_passes = sum(1 for record in engine.step_log if record.decode_rows)
    assert prefill_passes == 1 and decode_passes == 4
    assert max(record.decode_rows for record in engine.step_log) == sessions
    stats = streamer.stats()
    assert stats.passes == prefill_passes + decode_passes
    assert stats.bytes_streamed == stats.passes * streamer.pass_bytes
