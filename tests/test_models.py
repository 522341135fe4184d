"""Model loading: named shapes, seeded random weights built on meta, local checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from djinn.kernel.errors import ModelError
from djinn.engine.models import (
    SHAPES,
    kv_bytes_per_token,
    kv_geometry,
    known_specs,
    load_model,
    model_config,
    weight_bytes,
)

TINY = ["random:tiny-llama", "random:tiny-mistral", "random:tiny-gpt2"]

#: parameter counts of the published checkpoints these shapes stand in for
PUBLISHED_PARAMETERS = {
    "random:gpt2": 124_439_808,
    "random:llama-7b": 6_738_415_616,
    "random:mistral-7b": 7_241_732_096,
    "random:llama-13b": 13_015_864_320,
    "random:codellama-34b": 33_743_970_304,
    "random:llama-70b": 68_976_648_192,
}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("spec", known_specs())
def test_every_shape_has_a_config_of_its_family(spec: str) -> None:
    config = model_config(spec)
    assert config.model_type == SHAPES[spec.removeprefix("random:")].family
    layers, kv_heads, head_dim = kv_geometry(config)
    assert layers > 0 and kv_heads > 0 and head_dim > 0
    assert config is not model_config(spec)


@pytest.mark.parametrize("spec", sorted(PUBLISHED_PARAMETERS))
def test_big_shapes_match_the_published_sizes(spec: str) -> None:
    with torch.device("meta"):  # shapes only: no memory
        model = AutoModelForCausalLM.from_config(model_config(spec))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[spec]


def test_codellama_shape_details() -> None:
    config = model_config("random:codellama-34b")
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (48, 8192, 22016)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (64, 8, 32000)
    assert config.rope_parameters["rope_theta"] == 1e6


def test_kv_bytes_per_token() -> None:
    # Llama-2-7B: 32 layers x 32 heads x 128 dims x K and V x 2 bytes
    assert kv_bytes_per_token(model_config("random:llama-7b"), "bfloat16") == 524_288
    assert kv_bytes_per_token(model_config("random:mistral-7b"), torch.bfloat16) == 131_072
    assert kv_bytes_per_token(model_config("random:tiny-gpt2"), "float32") == 2 * 4 * 4 * 16 * 4
    with pytest.raises(ModelError, match="bfloat16"):
        kv_bytes_per_token(model_config("random:tiny-llama"), "int8")


@pytest.mark.parametrize("spec", TINY)
def test_tiny_models_load_ready_to_serve(spec: str) -> None:
    loaded = load_model(spec)
    model = loaded.model
    assert loaded.name == spec
    assert loaded.family == SHAPES[spec.removeprefix("random:")].family == loaded.config.model_type
    assert (loaded.dtype, loaded.device, loaded.tokenizer) == (torch.float32, torch.device("cpu"), None)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    logits = _logits(model, torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()
    assert weight_bytes(model) == sum(p.numel() for p in model.parameters()) * 4


def test_random_weights_follow_the_initialisation_rules() -> None:
    model = load_model("random:tiny-gpt2").model
    std = model.config.initializer_range
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
        elif ".ln_" in name:
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert abs(param.std().item() - std) < 0.2 * std, name
    # GPT-2 ties its head to the token embedding; building on meta must keep the tie
    assert model.lm_head.weight is model.transformer.wte.weight


def test_seeds_are_reproducible() -> None:
    first = load_model("random:tiny-llama", seed=3).model.state_dict()
    again = load_model("random:tiny-llama", seed=3).model.state_dict()
    other = load_model("random:tiny-llama", seed=4).model.state_dict()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(first[name], other[name])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("spec", ["random:tiny-llama", "random:tiny-mistral"])
def test_meta_built_rotary_buffers_equal_a_normal_build(spec: str, dtype: str) -> None:
    loaded = load_model(spec, dtype=dtype)
    reference = AutoModelForCausalLM.from_config(model_config(spec), dtype=loaded.dtype)
    buffers = dict(loaded.model.named_buffers())
    expected = dict(reference.named_buffers())
    assert buffers.keys() == expected.keys() and "model.rotary_emb.inv_freq" in buffers
    for name, buffer in expected.items():
        assert buffers[name].dtype == buffer.dtype, name
        assert torch.equal(buffers[name], buffer), name


@pytest.mark.parametrize("spec", ["random:tiny-llama", "random:tiny-gpt2"])
def test_a_saved_checkpoint_loads_with_identical_logits(spec: str, tmp_path) -> None:
    loaded = load_model(spec, seed=7)
    loaded.model.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert again.family == loaded.family and again.tokenizer is None
    ids = torch.tensor([[5, 9, 100, 7, 3]])
    assert torch.equal(_logits(loaded.model, ids), _logits(again.model, ids))


def test_a_checkpoint_with_a_tokenizer_brings_it(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    load_model("random:tiny-llama").model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.tokenizer is not None
    assert loaded.tokenizer("hello world")["input_ids"] == [1, 2]


def test_bfloat16_load() -> None:
    loaded = load_model("random:tiny-llama", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.isfinite(_logits(loaded.model, torch.tensor([[1, 2]]))).all()


def test_unknown_specs_are_refused_with_the_known_names(tmp_path) -> None:
    for spec in ("random:llama-9000", "llama-7b", str(tmp_path / "missing")):
        with pytest.raises(ModelError) as info:
            load_model(spec)
        assert all(name in str(info.value) for name in known_specs())
    with pytest.raises(ModelError, match="cannot load"):
        load_model(str(tmp_path))  # a directory without a checkpoint
    with pytest.raises(ModelError, match="float16"):
        load_model("random:tiny-llama", dtype="float64")
