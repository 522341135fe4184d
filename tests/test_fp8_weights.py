"""fp8 weights: loaded layer by layer, stored e4m3 with a scale per output channel, streamed.

The tolerance of the round trip is e4m3's: 3 mantissa bits put every normal value within 1/16 of
itself, and values in the subnormal range (below 2^-6 of the row's scale) within 2^-10 of the
row's scale. Tokens are compared on the CPU in float32, where the streamer expands the weights
exactly as ``dequantize_weights`` does, so streamed and reference logits agree bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys

import attrs
import pytest
import torch

from djinn.config import parse_config
from djinn.engine import models
from djinn.engine.models import FP8, decoder_layers, dequantize_weights, load_model, quantize_fp8
from djinn.engine.runner import ModelRunner, greedy_generate, outside_layers_bytes
from djinn.kernel.config import build_settings
from djinn.kernel.errors import ConfigError, ModelError
from djinn.plugins.streamers.resident import ResidentStreamer, module_nbytes as layer_bytes
from djinn.plugins.streamers.ringbuffer import RingbufferSettings, RingbufferStreamer, _scaled_linear
from eval.exp2_virtualization import run as exp2
from tests.serving import serving_config, start_server
from tests.test_ringbuffer_serving import BLOCK_TOKENS, budget_gb, greedy_tokens, small_blocks

MODEL = "random:tiny-llama"
GIB = 1 << 30
PROMPT = torch.tensor([[1, 5, 9, 22, 7, 3]])


def fp8_model(dtype: str = "float32", spec: str = MODEL):
    return load_model(spec, dtype=dtype, weight_dtype="fp8_e4m3")


def linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    layers = decoder_layers(model)
    inside = {id(m) for layer in layers for m in layer.modules()}
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) in inside}


def sizes(loaded) -> tuple[int, int, int]:
    """(one fp8 layer's bytes as the streamer lays it out, its working buffer, the embeddings and head)."""
    streamer = RingbufferStreamer(RingbufferSettings(kv_reserve_fraction=0.0))
    ModelRunner(loaded, streamer=streamer)
    return streamer.layer_nbytes[0], streamer.work_bytes, outside_layers_bytes(loaded)


def tokens_and_logits(loaded, streamer, budget=None, new_tokens=8):
    runner = ModelRunner(loaded, streamer=streamer, budget_bytes=budget)
    logits = runner.begin(runner.new_kv(), PROMPT).finish()
    return greedy_generate(runner, runner.new_kv(), PROMPT, new_tokens), logits


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_loading_round_trips_within_e4m3_precision(dtype):
    plain = load_model(MODEL, dtype=dtype)
    fp8 = fp8_model(dtype)
    originals, quantized = linears(plain.model), linears(fp8.model)
    assert originals.keys() == quantized.keys() and len(quantized) == 4 * 7
    for name, module in quantized.items():
        weight, scale = module.weight, module.weight_scale
        assert weight.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == weight.shape[:1], name
        original = originals[name].weight.float()  # [out, in]
        values = weight.float() * scale[:, None]
        bound = 2**-4 * original.abs() + 2**-10 * scale[:, None]
        assert ((original - values).abs() <= bound).all(), name
        # each row's largest magnitude is scaled onto e4m3's largest value
        assert torch.allclose(values.abs().amax(dim=1), original.abs().amax(dim=1), rtol=2**-7), name
    # the embeddings, norms and head are the model dtype's, untouched
    kept = {n: p for n, p in fp8.model.named_parameters() if p.dtype != FP8}
    expected = dict(plain.model.named_parameters())
    assert kept and all(torch.equal(p, expected[n]) for n, p in kept.items())
    assert fp8.weight_dtype == "fp8_e4m3" and fp8.dtype == plain.dtype


def test_fp8_weights_are_the_quantization_of_the_model_dtype_weights():
    plain = linears(load_model(MODEL, dtype="bfloat16", seed=3).model)
    fp8 = linears(load_model(MODEL, dtype="bfloat16", seed=3, weight_dtype="fp8_e4m3").model)
    for name, module in fp8.items():
        weight, scale = quantize_fp8(plain[name].weight)
        assert torch.equal(module.weight.view(torch.uint8), weight.view(torch.uint8)), name
        assert torch.equal(module.weight_scale, scale), name


def test_decoder_layers_take_a_quarter_of_their_float32_bytes_and_half_of_their_bf16_bytes():
    for dtype, ratio in (("float32", 4), ("bfloat16", 2)):
        plain = sum(layer_bytes(layer) for layer in decoder_layers(load_model(MODEL, dtype=dtype).model))
        fp8 = sum(layer_bytes(layer) for layer in decoder_layers(fp8_model(dtype).model))
        # the scales and norms stay wider
        assert plain / ratio < fp8 < plain / ratio * 1.1


def test_a_random_model_is_built_and_quantized_one_layer_at_a_time(monkeypatch):
    seen: dict[str, torch.nn.ModuleList] = {}
    quantize, find = models.quantize_layer, models.decoder_layers

    def remember(model):
        seen["layers"] = find(model)
        return seen["layers"]

    counts = []

    def counting(layer):
        # while one layer is quantized, every other layer is either already fp8 or not built yet
        states = [
            "this" if other is layer else
            "meta" if all(p.is_meta for p in other.parameters()) else
            "fp8" if all(m.weight.dtype == FP8 for m in other.modules() if isinstance(m, torch.nn.Linear)) else
            "model dtype"
            for other in seen["layers"]
        ]
        counts.append(states)
        quantize(layer)

    monkeypatch.setattr(models, "decoder_layers", remember)
    monkeypatch.setattr(models, "quantize_layer", counting)
    fp8_model()
    assert counts == [["fp8"] * i + ["this"] + ["meta"] * (3 - i) for i in range(4)]


def test_building_in_fp8_shows_progress_when_asked(capsys):
    load_model(MODEL, weight_dtype="fp8_e4m3", progress=True)
    assert "building layers in fp8" in capsys.readouterr().err
    load_model(MODEL, weight_dtype="fp8_e4m3", progress=False)
    assert "building layers" not in capsys.readouterr().err


# --------------------------------------------------------------------------- streamed fp8


@pytest.mark.parametrize("layers_in_budget, prefetch", [(None, 2), (1.5, 0), (3.5, 1), (10.0, 2)])
def test_streamed_fp8_gives_the_tokens_and_logits_of_the_dequantized_model(layers_in_budget, prefetch):
    reference = fp8_model()
    dequantize_weights(reference.model, reference.dtype)
    assert not any(p.dtype == FP8 for p in reference.model.parameters())
    expected = tokens_and_logits(reference, ResidentStreamer())

    loaded = fp8_model()
    layer, work, _ = sizes(fp8_model())
    budget = None if layers_in_budget is None else int(layers_in_budget * layer) + work
    streamer = RingbufferStreamer(RingbufferSettings(kv_reserve_fraction=0.0, prefetch_layers=prefetch, reuse=False))
    tokens, logits = tokens_and_logits(loaded, streamer, budget)
    assert tokens == expected[0] and torch.equal(logits, expected[1])
    resident = {None: 0, 1.5: 0, 3.5: 1, 10.0: 4}[layers_in_budget]
    assert streamer.resident_layers == resident and streamer.work_bytes == work
    stats = streamer.stats()
    assert stats.bytes_streamed == stats.passes * (4 - resident) * layer
    # the layers hold fp8 again once their turn is over
    assert all(m.weight.dtype == FP8 for m in linears(loaded.model).values())


def test_fp8_streams_a_quarter_of_the_float32_bytes():
    streamed = {}
    for weight_dtype in ("auto", "fp8_e4m3"):
        streamer = RingbufferStreamer(RingbufferSettings(reuse=False))
        tokens_and_logits(load_model(MODEL, weight_dtype=weight_dtype), streamer, None, new_tokens=2)
        stats = streamer.stats()
        streamed[weight_dtype] = stats.bytes_streamed / stats.passes
    assert streamed["auto"] / 4 < streamed["fp8_e4m3"] < streamed["auto"] / 4 * 1.1


def test_scaled_mm_projection_equals_its_fp8_emulation():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    weight, scale = quantize_fp8(linear.weight.detach())
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    linear.register_buffer("weight_scale", scale)
    x = 3 * torch.randn(2, 5, 64)  # [B, T, in]
    rows = x.reshape(-1, 64)
    row_scale = rows.abs().amax(dim=1, keepdim=True) / torch.finfo(FP8).max  # [B*T, 1]
    emulated = (rows / row_scale).to(FP8).float() * row_scale @ (weight.float() * scale[:, None]).t() + linear.bias
    out = _scaled_linear(linear, x)
    assert out.shape == (2, 5, 48)
    assert torch.allclose(out.reshape(-1, 48), emulated, atol=1e-5, rtol=1e-5)


def test_scaled_mm_streamed_equals_scaled_mm_resident_and_needs_no_working_buffer():
    layer, _, _ = sizes(fp8_model())
    results = []
    for budget in (int(1.5 * layer), 10 * layer):
        streamer = RingbufferStreamer(RingbufferSettings(kv_reserve_fraction=0.0, fp8_matmul="scaled_mm"))
        results.append(tokens_and_logits(fp8_model(), streamer, budget))
        assert streamer.work_bytes == 0
        assert streamer.resident_layers == (0 if budget < 2 * layer else 4)
    (streamed, streamed_logits), (resident, resident_logits) = results
    assert streamed == resident and torch.equal(streamed_logits, resident_logits)
    # against the dequantized weights the activations' own rounding shows, and stays small
    reference = fp8_model()
    dequantize_weights(reference.model, reference.dtype)
    _, expected = tokens_and_logits(reference, ResidentStreamer(), new_tokens=1)
    assert (streamed_logits - expected).norm() < 0.5 * expected.norm()


# --------------------------------------------------------------------------- served


def fp8_config(budget: float, settings: dict):
    config = small_blocks(serving_config(MODEL, budget_gb=budget_gb(budget), settings={"ringbuffer": settings}))
    return attrs.evolve(config, model=attrs.evolve(config.model, weight_dtype="fp8_e4m3"))


def test_an_fp8_model_larger_than_the_budget_serves_the_tokens_of_its_resident_layers():
    layer, work, outside = sizes(fp8_model())
    kv_block = BLOCK_TOKENS * 2 * 4 * 2 * 16 * 4  # tokens x K,V x layers x kv heads x head dim x float32
    reserve = 4 * kv_block
    total = outside + 4 * layer + work + reserve
    budget = outside + 3.3 * layer + work + reserve  # two layers resident beside a ring of one
    assert budget < total
    settings = {"kv_reserve_gb": reserve / GIB, "prefetch_layers": 0}
    streamed = start_server(fp8_config(budget, settings), ["ringbuffer"])
    try:
        tokens = greedy_tokens(streamed)
        streamer = streamed.kernel.streamer
        stats = streamer.stats()
        assert streamer.resident_layers == 2 and stats.ring_bytes == layer and streamer.work_bytes == work
        assert stats.passes > 0 and stats.bytes_streamed == stats.passes * 2 * layer
    finally:
        streamed.stop()
    resident = start_server(fp8_config(total + layer, settings), ["ringbuffer"])
    try:
        assert resident.kernel.streamer.resident_layers == 4
        assert greedy_tokens(resident) == tokens
    finally:
        resident.stop()


# --------------------------------------------------------------------------- refusals


def test_unknown_weight_dtypes_are_refused_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"weight_dtype = 'int4'; allowed values: auto, fp8_e4m3"):
        parse_config({"model": {"weight_dtype": "int4"}}, source="plugins.toml")
    with pytest.raises(ModelError, match="expected one of auto, fp8_e4m3"):
        load_model(MODEL, weight_dtype="fp8")
    with pytest.raises(ConfigError, match="fp8_matmul = 'int8'; allowed values: dequantize, scaled_mm"):
        build_settings(RingbufferSettings, {"fp8_matmul": "int8"}, source="plugins.toml", where="settings.ringbuffer")


def test_fp8_on_the_resident_streamer_is_refused_naming_the_ringbuffer():
    loaded = fp8_model()
    with pytest.raises(ModelError, match="resident streamer cannot run.*--plugins ringbuffer"):
        ModelRunner(loaded, streamer=ResidentStreamer())


def test_djinn_run_refuses_fp8_on_the_resident_streamer_in_one_line(tmp_path):
    path = tmp_path / "plugins.toml"
    path.write_text('[model]\nweight_dtype = "fp8_e4m3"\n')
    result = subprocess.run(
        [sys.executable, "-m", "djinn.cli", "run", "--config", str(path), "--plugins", "resident",
         "--model", MODEL, "--port", "0", "--metrics-port", "0", "--http-port", "0"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "resident streamer cannot run" in lines[0] and "--plugins ringbuffer" in lines[0]


def test_fp8_of_a_family_without_linear_projections_is_refused():
    with pytest.raises(ModelError, match="GPT2Block has no nn.Linear.*llama, mistral and qwen2"):
        load_model("random:tiny-gpt2", weight_dtype="fp8_e4m3")


def test_an_fp8_weight_without_its_scale_is_refused_at_prepare():
    loaded = fp8_model()
    del decoder_layers(loaded.model)[2].mlp.up_proj.weight_scale
    with pytest.raises(ModelError, match="layer 2 .*fp8 weight of shape \\(128, 64\\) without a float32 weight_scale"):
        ModelRunner(loaded, streamer=RingbufferStreamer())


# --------------------------------------------------------------------------- experiment 2


def test_exp2_runs_fp8_with_both_gemm_paths(tmp_path):
    out = tmp_path / "exp2_fp8.json"
    # embeddings and head, the reserve, the working buffer and ~3 fp8 layers: one resident, a ring of two
    exp2.main(["--smoke", "--weight-dtype", "fp8_e4m3", "--fp8-matmul", "dequantize,scaled_mm",
               "--budget-gb", "0.0006", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["config"]["weight_dtype"] == "fp8_e4m3" and report["commit"]
    runs = report["ringbuffer"]
    assert [(r["fp8_matmul"], r["chunk_mb"]) for r in runs][:2] == [("dequantize", c) for c in exp2.SMOKE.chunks_mb]
    best = report["summary"]["best"]
    assert [b["fp8_matmul"] for b in best] == ["dequantize", "scaled_mm"]
    assert best[1]["chunk_mb"] == best[0]["chunk_mb"]
    dequantize = runs[0]
    assert dequantize["resident_layers"] == 1 and dequantize["work_bytes"] > 0
    assert dequantize["bytes_per_pass"] == dequantize["layer_bytes"] > dequantize["ring_bytes"]
    assert all(b["batch_tokens_per_s"] > 0 for b in best)
    assert len(report["builds"]) == 2 and "skipped_because" in report["accelerate"]


def test_exp2_keeps_the_first_gemm_path_when_a_later_one_fails(tmp_path, monkeypatch):
    from djinn.plugins.streamers import ringbuffer

    def unsupported(device):
        raise ModelError(f"fp8_matmul = 'scaled_mm': no fp8 GEMM on {device}")

    monkeypatch.setattr(ringbuffer, "_check_scaled_mm", unsupported)
    out = tmp_path / "exp2_fp8.json"
    exp2.main(["--smoke", "--weight-dtype", "fp8_e4m3", "--fp8-matmul", "dequantize,scaled_mm",
               "--budget-gb", "0.0006", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [b["fp8_matmul"] for b in report["summary"]["best"]] == ["dequantize"]
    assert "error" not in report["builds"][0]
    assert report["builds"][1]["error"].startswith("ModelError: fp8_matmul = 'scaled_mm'")


_PACKING = """
import os, torch
from transformers import LlamaConfig, LlamaForCausalLM
from djinn.engine.models import LoadedModel, decoder_layers, quantize_layer
from djinn.engine.runner import ModelRunner
from djinn.plugins.streamers.ringbuffer import RingbufferSettings, RingbufferStreamer

def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=8, vocab_size=1024)
model = LlamaForCausalLM(config).to(torch.bfloat16).eval().requires_grad_(False)
for layer in decoder_layers(model):
    quantize_layer(layer)
loaded = LoadedModel("packing", model, model.config, "llama", torch.bfloat16, torch.device("cpu"),
                     weight_dtype="fp8_e4m3")
before = resident_bytes()
streamer = RingbufferStreamer(RingbufferSettings())
ModelRunner(loaded, streamer=streamer)
print(resident_bytes() - before, streamer.arena.numel())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_packing_fp8_layers_into_the_arena_holds_them_once():
    # fp8 tensors of a few MiB live in malloc's heap, which keeps what they free unless trimmed
    result = subprocess.run([sys.executable, "-c", _PACKING], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    grown, arena = map(int, result.stdout.split())
    assert arena > 60 << 20
    assert grown < arena / 4
