"""Model loading: named random-weight shapes for tests and benchmarks, or a local checkpoint.

``load_model("random:llama-7b", dtype="bfloat16", device="cuda")`` builds a model of that shape
with seeded random weights straight on the device (built on ``meta``, then filled one decoder
layer at a time), so a 7B shape takes seconds, not the minutes of transformers' CPU
initialisation. ``load_model("/path")`` reads a Hugging Face directory with ``from_pretrained``
and never touches the network.

fp8 weights (``weight_dtype="fp8_e4m3"``): every ``nn.Linear`` of the decoder layers keeps its
``weight`` ``[out, in]`` as ``torch.float8_e4m3fn`` and gains a float32 buffer ``weight_scale``
``[out]``, one scale per output channel; the weight it stands for is
``weight.to(dtype) * weight_scale[:, None]`` (``dequantize_weights``). The embeddings, norms and
head stay in ``dtype``. Such a model runs only under a streamer that knows the format (the
``ringbuffer`` streamer dequantizes each layer on the device after its copy, or runs its GEMMs on
fp8). A random model is built and quantized one decoder layer at a time on ``build_device`` (the
server uses its GPU: seconds for a 70B shape) and each layer moves to ``device`` before the next
is drawn, so the whole model never exists in ``dtype``: a 70B shape takes about 70 GB of host
memory, not 140. A checkpoint is read whole in ``dtype`` first, then quantized layer by layer.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
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

#: how the decoder layers' weight matrices are stored: "auto" in the model dtype, "fp8_e4m3" as
#: ``torch.float8_e4m3fn`` with a float32 scale per output channel
WEIGHT_DTYPES = ("auto", "fp8_e4m3")
FP8 = torch.float8_e4m3fn
#: the largest finite e4m3 value: each row's largest magnitude is scaled onto it
FP8_MAX = torch.finfo(FP8).max

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
            "tinyllama-1.1b", "llama", "TinyLlama-1.1B: 22 layers, 2048, GQA 32/4, 5632 inter",
            hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
            max_position_embeddings=2048, rms_norm_eps=1e-5,
        ),
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
    #: how the decoder layers' weight matrices are stored (one of ``WEIGHT_DTYPES``)
    weight_dtype: str = "auto"


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
    weight_dtype: str = "auto",
    build_device: str | torch.device | None = None,
    progress: bool | None = None,
) -> LoadedModel:
    """Load ``random:NAME`` (seeded random weights) or a local Hugging Face checkpoint directory.

    ``dtype`` is the compute dtype; ``weight_dtype`` (one of ``WEIGHT_DTYPES``) how the decoder
    layers' weight matrices are stored. ``build_device``: where random weights are drawn (with
    that device's generator) and quantized, one decoder layer at a time, before each moves to
    ``device`` (None: ``device``; the GPU makes a 70B shape seconds of work). ``progress``: a bar
    on stderr over the layers (None: only when stderr is a terminal). Raises ``ModelError`` for
    an unknown spec (listing the known names), an unreadable directory, an unknown
    ``weight_dtype`` or a family fp8 cannot store.
    """
    torch_dtype = resolve_dtype(dtype)
    if weight_dtype not in WEIGHT_DTYPES:
        raise ModelError(f"unsupported weight_dtype {weight_dtype!r}; expected one of {', '.join(WEIGHT_DTYPES)}")
    target = torch.device(device)
    quantize = weight_dtype == "fp8_e4m3"
    build = target if build_device is None else torch.device(build_device)
    tokenizer = None
    if spec.startswith(RANDOM_PREFIX) or not os.path.isdir(spec):
        config = model_config(spec)
        model = _random_model(config, torch_dtype, target, build, seed, attn_implementation, quantize, progress)
    else:
        model, tokenizer = _pretrained_model(spec, torch_dtype, target, attn_implementation)
        if quantize:
            with _layer_progress(progress, len(decoder_layers(model)), "quantizing layers to fp8") as advance:
                for layer in decoder_layers(model):
                    layer.to(build)
                    quantize_layer(layer)
                    layer.to(target)
                    advance()
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
        weight_dtype=weight_dtype,
    )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers: its ``nn.ModuleList`` of ``config.num_hidden_layers`` modules."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ModelError(f"{type(model).__name__} has no list of {count} decoder layers")


@contextlib.contextmanager
def _layer_progress(show: bool | None, total: int, description: str) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr over ``total`` layers (None: only when stderr is a terminal);
    yields the function that advances it by one."""
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), disable=not (sys.stderr.isatty() if show is None else show)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _random_model(
    config: PretrainedConfig,
    dtype: torch.dtype,
    device: torch.device,
    build: torch.device,
    seed: int,
    attn_implementation: str,
    quantize: bool,
    progress: bool | None,
) -> torch.nn.Module:
    """Built on ``meta``; the modules outside the decoder layers are filled on ``build``, each
    decoder layer is materialised, filled (and quantized) on ``build`` and moved to ``device``
    before the next. The generator visits modules in ``model.modules()`` order either way, so the
    weights do not depend on ``quantize``: fp8 weights are the quantization of the ``dtype`` ones."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    layers = decoder_layers(model)
    starts = {id(layer) for layer in layers}
    inside = {id(m) for layer in layers for m in layer.modules()}
    outside = [m for m in model.modules() if id(m) not in inside]
    for module in outside:
        module.to_empty(device=build, recurse=False)
    # to_empty gives every parameter a new tensor, which unties lm_head from the embedding
    model.tie_weights()
    _rebuild_buffers(outside, build)
    generator = torch.Generator(device=build).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    description = "building layers" + (" in fp8" if quantize else "")
    with torch.no_grad(), _layer_progress(progress, len(layers), description) as advance:
        for module in model.modules():
            if id(module) in starts:
                module.to_empty(device=build)
                for part in module.modules():
                    _fill_random(part, std, generator)
                _rebuild_buffers(module.modules(), build)
                if quantize:
                    quantize_layer(module)
                module.to(device)
                advance()
            elif id(module) not in inside:
                _fill_random(module, std, generator)
    model.to(device)
    return model


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[out, in]`` as e4m3 with one float32 scale per output channel.

    Each row is scaled so that its largest magnitude lands on ``FP8_MAX`` and rounded to the
    nearest e4m3 value; an all-zero row gets scale 1. Returns ``(fp8 [out, in], scale [out])``.
    """
    rows = weight.float()  # [out, in]
    amax = rows.abs().amax(dim=1)  # [out]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # [out]
    return (rows / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_layer(layer: torch.nn.Module) -> None:
    """Store every ``nn.Linear`` weight of ``layer`` in fp8 with its ``weight_scale`` (in place)."""
    linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ModelError(
            f"{type(layer).__name__} has no nn.Linear projections to store in fp8; weight_dtype "
            f"'fp8_e4m3' supports the llama, mistral and qwen2 families"
        )
    for linear in linears:
        weight, scale = quantize_fp8(linear.weight.detach())
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        linear.register_buffer("weight_scale", scale)


def dequantize_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Turn every fp8 weight of ``model`` back into ``dtype`` (in place): ``weight.to(dtype) *
    weight_scale[:, None]``, rounded once, as the ringbuffer streamer computes it on the device."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype == FP8:
            scale = module.weight_scale
            values = torch.empty(weight.shape, dtype=dtype, device=weight.device)  # [out, in]
            values.copy_(weight).mul_(scale[:, None])
            module.weight = torch.nn.Parameter(values, requires_grad=False)
            del module.weight_scale


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


def _rebuild_buffers(modules: Iterable[torch.nn.Module], device: torch.device) -> None:
    """Recompute the buffers of ``modules`` that ``to_empty`` left uninitialised (the rotary
    ``inv_freq``); each module's own buffers only.

    Such buffers are computed in the owning module's constructor from the config, so a fresh
    instance built on the CPU holds the right values (in the dtype the constructor chose).
    """
    for module in modules:
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
