"""Model loading: named random-weight shapes for tests and benchmarks, or a local checkpoint.

``load_model("random:llama-7b", dtype="bfloat16", device="cuda")`` builds a model of that shape
with seeded random weights straight on the device (built on ``meta``, then filled), so a 7B shape
takes seconds, not the minutes of transformers' CPU initialisation. ``load_model("/path")`` reads a
Hugging Face directory with ``from_pretrained`` and never touches the network.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import attrs
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from djinn.kernel.errors import ModelError

RANDOM_PREFIX = "random:"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: files whose presence in a checkpoint directory means it ships a tokenizer
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@attrs.frozen
class ModelShape:
    """A named random-weight model: its family (transformers ``model_type``) and config factory."""

    name: str
    family: str
    summary: str
    make_config: Callable[[], PretrainedConfig]


def _shape(name: str, family: str, summary: str, **fields: Any) -> ModelShape:
    return ModelShape(name, family, summary, functools.partial(AutoConfig.for_model, family, **fields))


def _rope(theta: float) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta}


_TINY = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
    max_position_embeddings=2048,
    # ten times the usual 0.02: with 64 dims the default leaves attention almost uniform, and
    # tests could not tell a wrong position or mask from a right one
    initializer_range=0.2,
)

#: every ``random:NAME`` shape, keyed by NAME
SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        _shape("tiny-llama", "llama", "4 layers, hidden 64, GQA 4/2 (tests)", **_TINY),
        _shape(
            "tiny-mistral", "mistral", "4 layers, hidden 64, GQA 4/2, sliding window 16 (tests)",
            sliding_window=16, **_TINY,
        ),
        _shape(
            "tiny-gpt2", "gpt2", "4 layers, n_embd 64 (tests)",
            n_embd=64, n_layer=4, n_head=4, vocab_size=512, n_positions=1024,
            bos_token_id=511, eos_token_id=511, initializer_range=0.2,
        ),
        _shape("gpt2", "gpt2", "GPT-2 small, 124M"),
        _shape(
            "llama-7b", "llama", "Llama-2-7B: 32 layers, 4096, 32 heads, 11008 inter",
            hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
            max_position_embeddings=4096, rms_norm_eps=1e-5,
        ),
        _shape(
            "mistral-7b", "mistral", "Mistral-7B v0.2: 32 layers, 4096, GQA 32/8, 14336 inter",
            hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
            max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None,
            rope_parameters=_rope(1e6),
        ),
        _shape(
            "llama-13b", "llama", "Llama-2-13B: 40 layers, 5120, 40 heads, 13824 inter",
            hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
            num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
            max_position_embeddings=4096, rms_norm_eps=1e-5,
        ),
        _shape(
            "codellama-34b", "llama", "CodeLlama-34B: 48 layers, 8192, GQA 64/8, 22016 inter",
            hidden_size=8192, num_hidden_layers=48, num_attention_heads=64,
            num_key_value_heads=8, intermediate_size=22016, vocab_size=32000,
            max_position_embeddings=16384, rms_norm_eps=1e-5, rope_parameters=_rope(1e6),
        ),
        _shape(
            "llama-70b", "llama", "Llama-2-70B: 80 layers, 8192, GQA 64/8, 28672 inter",
            hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
            num_key_value_heads=8, intermediate_size=28672, vocab_size=32000,
            max_position_embeddings=4096, rms_norm_eps=1e-5,
        ),
    )
}


@attrs.frozen
class LoadedModel:
    """A causal LM ready to serve: eval mode, no gradients, on ``device`` in ``dtype``."""

    name: str
    model: torch.nn.Module
    config: PretrainedConfig
    family: str
    dtype: torch.dtype
    device: torch.device
    tokenizer: Any = None


def known_specs() -> list[str]:
    """Every ``random:NAME`` spec ``load_model`` accepts."""
    return [RANDOM_PREFIX + name for name in SHAPES]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` (or a torch dtype among ``DTYPES``) -> ``torch.bfloat16``."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def _shape_of(spec: str) -> ModelShape:
    name = spec.removeprefix(RANDOM_PREFIX)
    if spec.startswith(RANDOM_PREFIX) and name in SHAPES:
        return SHAPES[name]
    raise ModelError(
        f"unknown model {spec!r}: expected a local checkpoint directory or one of "
        + ", ".join(known_specs())
    )


def model_config(spec: str) -> PretrainedConfig:
    """The transformers config of a ``random:NAME`` shape (a fresh object on every call)."""
    return _shape_of(spec).make_config()


def load_model(
    spec: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load ``random:NAME`` (seeded random weights) or a local Hugging Face checkpoint directory.

    Raises ``ModelError`` for an unknown spec (listing the known names) or an unreadable directory.
    """
    torch_dtype = resolve_dtype(dtype)
    target = torch.device(device)
    tokenizer = None
    if spec.startswith(RANDOM_PREFIX) or not os.path.isdir(spec):
        config = model_config(spec)
        model = _random_model(config, torch_dtype, target, seed, attn_implementation)
    else:
        model, tokenizer = _pretrained_model(spec, torch_dtype, target, attn_implementation)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        name=spec,
        model=model,
        config=model.config,
        family=model.config.model_type,
        dtype=torch_dtype,
        device=target,
        tokenizer=tokenizer,
    )


def _random_model(
    config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    attn_implementation: str,
) -> torch.nn.Module:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    model.to_empty(device=device)
    # to_empty gives every parameter a new tensor, which unties lm_head from the embedding
    model.tie_weights()
    generator = torch.Generator(device=device).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for module in model.modules():
            _fill_random(module, std, generator)
    _rebuild_buffers(model, device)
    return model


def _fill_random(module: torch.nn.Module, std: float, generator: torch.Generator) -> None:
    """Seeded normal(0, std) weights; norms get weight 1, biases 0 (what from_config would give)."""
    is_norm = "Norm" in type(module).__name__
    for name, param in module.named_parameters(recurse=False):
        if name == "bias":
            param.zero_()
        elif is_norm:
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)
    if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
        module.weight[module.padding_idx].zero_()


def _rebuild_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Recompute buffers that ``to_empty`` left uninitialised (the rotary ``inv_freq``).

    Such buffers are computed in the owning module's constructor from the config, so a fresh
    instance built on the CPU holds the right values (in the dtype the constructor chose).
    """
    for module in model.modules():
        names = [name for name, _ in module.named_buffers(recurse=False)]
        if not names:
            continue
        module_config = getattr(module, "config", None)
        if module_config is None:
            raise ModelError(
                f"cannot initialise the buffers {names} of {type(module).__name__}: "
                "it has no config to rebuild them from"
            )
        with torch.device("cpu"):
            fresh = type(module)(config=module_config)
        for name in names:
            setattr(module, name, getattr(fresh, name).to(device))


def _pretrained_model(
    path: str, dtype: torch.dtype, device: torch.device, attn_implementation: str
) -> tuple[torch.nn.Module, Any]:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True, attn_implementation=attn_implementation
        )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelError(f"cannot load a causal LM from {path!r}: {exc}") from exc
    model.to(device)
    tokenizer = None
    if any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the tokenizer in {path!r}: {exc}") from exc
    return model, tokenizer


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters (tied parameters counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_geometry(config: PretrainedConfig) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder-only config (GPT-2 names map onto these)."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


def kv_bytes_per_token(config: PretrainedConfig, dtype: str | torch.dtype) -> int:
    """Bytes of K and V, over all layers, that one token of context costs."""
    layers, kv_heads, head_dim = kv_geometry(config)
    return 2 * layers * kv_heads * head_dim * resolve_dtype(dtype).itemsize
