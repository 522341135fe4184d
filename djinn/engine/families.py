"""Model families: where each keeps its embeddings, positions, layers, final norm and head.

The runner reads a model only through its family's ``Family``: it embeds tokens with positions
(``embed``), runs the decoder layers, then ``norm`` and ``head``. Llama, Mistral and Qwen2 share
one layout (rotary positions, RMSNorm, gated MLP; Mistral and Qwen2 differ in sliding windows,
Qwen2 in projection biases); GPT-2 has learned absolute positions and LayerNorm.

Rotary families also have ``rotary_decode_layer``: one decoder layer of a batched decode step
written out end to end, with its KV written to the pool and attention over each row's own
blocks. It is the function ``torch.compile`` fuses for the decode step (RMSNorm, rotary, SiLU
gating and the residual adds become a few kernels around the GEMMs); it computes what the
family's own layer computes, from the same weights. ``rotary_prefill_parts`` is the same for a
prefill pass, in parts: two compiled stretches around the cache and the attention, where a
pass can pause.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import attrs
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from djinn.engine.kvpool import store_slots
from djinn.engine.models import LoadedModel
from djinn.kernel.errors import ModelError

#: families whose layout is known here; anything else is refused when a runner is built
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
#: where inside a decoder layer a pass can pause: once its attention block's output, then its
#: MLP's output, are computed and not yet added to the residual stream
LAYER_SITES = ("attention", "mlp")
#: a decoder layer run in parts: yields ``(site, output)`` for each of ``LAYER_SITES``, returns
#: the layer's output; an in-place edit of a yielded output is what the layer adds to its stream
LayerParts = Generator[tuple[str, torch.Tensor], None, torch.Tensor]


@attrs.define(eq=False)
class Family:
    """One loaded model's parts, as the runner uses them."""

    name: str
    embed_tokens: torch.nn.Module
    layers: list[torch.nn.Module]
    norm: torch.nn.Module
    head: torch.nn.Module
    #: each layer's sliding-attention window (None: full causal attention)
    windows: list[int | None]
    #: absolute positions the model has (None: rotary, no fixed limit)
    max_positions: int | None
    #: the modules outside the decoder layers (they stay on the compute device)
    outside_layers: list[torch.nn.Module]
    #: ``(hidden, positions) -> (hidden, rope)``: positions added, or the rotary (cos, sin)
    add_positions: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]
    #: query heads per KV head inside a layer's attention (1 where K/V are not grouped)
    query_group: int
    #: the fused decode layer of this family, or None (its layers then run as they are)
    decode_layer: Callable[..., torch.Tensor] | None = None
    #: ``(layer, hidden, kwargs)``: the family's own decoder layer, pausing inside (``layer_parts``)
    layer_parts: Callable[..., LayerParts] | None = None
    #: the fused prefill layer of this family in parts (``rotary_prefill_parts``), or None
    prefill_parts: Callable[..., LayerParts] | None = None

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Token ids ``[B, T]`` at ``positions`` ``[B, T]``: hidden ``[B, T, E]`` and the rotary
        embedding ``(cos, sin)`` ``[B, T, D]`` each, or None."""
        return self.add_positions(self.embed_tokens(ids), positions)


def family_of(loaded: LoadedModel) -> Family:
    """The ``Family`` of a loaded model; ``ModelError`` for a family the runner cannot drive."""
    model, config, name = loaded.model, loaded.config, loaded.family
    if name not in SUPPORTED_FAMILIES:
        raise ModelError(
            f"the layer-by-layer runner does not support the {name!r} family of "
            f"{loaded.name!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    layers = config.num_hidden_layers
    if name == "gpt2":
        if getattr(config, "add_cross_attention", False):
            raise ModelError(f"{loaded.name!r}: GPT-2 with cross-attention is not a decoder-only model")
        body = model.transformer

        def add_absolute(hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, None]:
            return body.drop(hidden + body.wpe(positions)), None

        return Family(
            name, body.wte, list(body.h), body.ln_f, model.lm_head, [None] * layers, config.n_positions,
            [body.wte, body.wpe, body.ln_f, model.lm_head], add_absolute, query_group=1,
            layer_parts=gpt2_layer_parts,
        )
    body = model.model

    def add_rotary(hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return hidden, body.rotary_emb(hidden, positions)  # (cos, sin), each [B, T, D]

    window = getattr(config, "sliding_window", None)
    if name == "mistral":
        windows = [window] * layers
    elif name == "qwen2":
        types = getattr(config, "layer_types", None) or ["full_attention"] * layers
        windows = [window if t == "sliding_attention" else None for t in types[:layers]]
    else:
        windows = [None] * layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return Family(
        name, body.embed_tokens, list(body.layers)[:layers], body.norm, model.lm_head, windows, None,
        [body.embed_tokens, body.rotary_emb, body.norm, model.lm_head], add_rotary,
        query_group=config.num_attention_heads // kv_heads, decode_layer=rotary_decode_layer,
        layer_parts=rotary_layer_parts, prefill_parts=rotary_prefill_parts,
    )


# The two functions below are transformers' decoder-layer forwards op for op (so an unedited run
# in parts computes the same bits as the layer's own call), split where the outputs are added.
def rotary_layer_parts(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> LayerParts:
    """A Llama-layout decoder layer over ``hidden`` ``[B, T, E]`` in parts (``LayerParts``)."""
    out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **kwargs)
    yield "attention", out
    hidden = hidden + out
    out = layer.mlp(layer.post_attention_layernorm(hidden))
    yield "mlp", out
    return hidden + out


def gpt2_layer_parts(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> LayerParts:
    """A GPT-2 block over ``hidden`` ``[B, T, E]`` in parts (``LayerParts``)."""
    out, _ = layer.attn(layer.ln_1(hidden), **kwargs)
    yield "attention", out
    hidden = out + hidden
    out = layer.mlp(layer.ln_2(hidden))
    yield "mlp", out
    return hidden + out


def pack_projections(layer: torch.nn.Module) -> None:
    """Store a rotary layer's q/k/v weights (and biases) in one tensor, and its gate/up weights
    in another, each projection's parameter becoming a view of it: the memory stays the same,
    the layer's own forward is unchanged, and ``rotary_decode_layer`` runs one GEMM per group
    (at decode's few rows a GEMM costs what reading its weights costs, plus a launch)."""
    attn, mlp = layer.self_attn, layer.mlp
    for owner, name, group in ((attn, "djinn_qkv", ("q_proj", "k_proj", "v_proj")), (mlp, "djinn_gate_up", ("gate_proj", "up_proj"))):
        projections = [getattr(owner, p) for p in group]
        for kind in ("weight", "bias"):
            parts = [getattr(p, kind) for p in projections]
            if any(part is None for part in parts):
                owner.register_buffer(f"{name}_{kind}", None, persistent=False)
                continue
            packed = torch.cat([part.detach() for part in parts])  # [sum out, in] or [sum out]
            start = 0
            for projection, part in zip(projections, parts):
                setattr(projection, kind, torch.nn.Parameter(packed[start : start + part.shape[0]], requires_grad=False))
                start += part.shape[0]
            # a buffer, so a compiled function takes it as an input like the parameters
            owner.register_buffer(f"{name}_{kind}", packed, persistent=False)


def _packed(owner: torch.nn.Module, name: str, x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """One GEMM over a packed group of projections, split into each projection's output."""
    out = torch.nn.functional.linear(x, getattr(owner, f"{name}_weight"), getattr(owner, f"{name}_bias"))
    return list(out.split(sizes, dim=-1))


def _qkv(attn: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """A rotary layer's q, k and v projections of ``x``: one GEMM once ``pack_projections`` ran."""
    if hasattr(attn, "djinn_qkv_weight"):
        sizes = [attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.v_proj.weight.shape[0]]
        return _packed(attn, "djinn_qkv", x, sizes)
    return [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]


def _gated_mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A rotary layer's gated MLP of ``x``: gate and up in one GEMM once ``pack_projections`` ran."""
    if hasattr(mlp, "djinn_gate_up_weight"):
        gate, up = _packed(mlp, "djinn_gate_up", x, [mlp.gate_proj.weight.shape[0], mlp.up_proj.weight.shape[0]])
    else:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def _rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The families' RMSNorm: in float32, scaled by the weight in the input's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[B, H, T, D]`` with ``cos``/``sin`` ``[B, 1, T, D]``."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def pool_attention(
    attend: Callable[..., torch.Tensor], query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    """``attend(query, keys, values, **kwargs)`` (flex_attention over a KV pool's view), in the
    query's dtype. A bfloat16 query over an fp8 pool attends as float16: the kernel widens every
    key and value it reads to the query's dtype, and it reads an fp8 pool faster widening to
    float16 (``eval/results/tune_flex_decode_fp8_f16q_h200.json``). float16 holds every e4m3
    value, and a bfloat16 query's significand exactly (its range, 65504, is far past a rotary
    query's)."""
    if keys.element_size() == 1 and query.dtype == torch.bfloat16:
        return attend(query.to(torch.float16), keys, values, **kwargs).to(query.dtype)
    return attend(query, keys, values, **kwargs)


def rotary_decode_layer(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    write: torch.Tensor,
    block_mask: BlockMask,
    attend: Callable[..., torch.Tensor] = flex_attention,
    kernel_options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """One Llama-layout decoder layer for ``B`` one-token rows, over the paged KV pool.

    ``hidden`` ``[B, 1, E]``; ``cos``/``sin`` ``[B, 1, D]``; ``keys``/``values`` the layer's pool
    views ``[S, H_kv, D]``; row ``b``'s new key and value go to slot ``write[b]``, then each row
    attends over its own blocks (``block_mask``, see the runner's paged decode; ``kernel_options``
    go to flex_attention's kernel). Returns the
    layer's output ``[B, 1, E]``.
    """
    attn, mlp = layer.self_attn, layer.mlp
    batch, dim = hidden.shape[0], keys.shape[-1]
    q, k, v = _qkv(attn, _rms_norm(layer.input_layernorm, hidden))  # [B, 1, H * D], [B, 1, H_kv * D] x 2
    q = q.view(batch, 1, -1, dim).transpose(1, 2)  # [B, H, 1, D]
    k = k.view(batch, 1, -1, dim).transpose(1, 2)  # [B, H_kv, 1, D]
    v = v.view(batch, 1, -1, dim)  # [B, 1, H_kv, D]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, D]
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    store_slots(keys, write, k[:, :, 0])
    store_slots(values, write, v[:, 0])
    out = pool_attention(
        attend, q, keys.transpose(0, 1)[None], values.transpose(0, 1)[None], block_mask=block_mask,
        scale=attn.scaling, enable_gqa=q.shape[1] != keys.shape[1], kernel_options=kernel_options,
    )  # [B, H, 1, D]
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
    return hidden + _gated_mlp(mlp, _rms_norm(layer.post_attention_layernorm, hidden))  # [B, 1, E]


def rotary_prefill_qkv(
    layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The start of a Llama-layout decoder layer over a prefill pass's ``hidden`` ``[B, T, E]``:
    RMSNorm, the q/k/v projections and the rotary embedding (``cos``/``sin`` ``[B, T, D]``).
    Returns ``q`` ``[B, H, T, D]``, ``k`` and ``v`` ``[B, H_kv, T, D]``."""
    attn = layer.self_attn
    batch, tokens, dim = hidden.shape[0], hidden.shape[1], attn.head_dim
    q, k, v = _qkv(attn, _rms_norm(layer.input_layernorm, hidden))  # [B, T, H * D], [B, T, H_kv * D] x 2
    q, k, v = (t.view(batch, tokens, -1, dim).transpose(1, 2) for t in (q, k, v))
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def rotary_prefill_mlp(
    layer: torch.nn.Module, hidden: torch.Tensor, attention: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest of a Llama-layout decoder layer after its attention block's output ``attention``
    ``[B, T, E]``: the residual add, RMSNorm and the gated MLP. Returns the residual stream
    ``[B, T, E]`` and the MLP's output, which the caller adds to it."""
    hidden = hidden + attention
    return hidden, _gated_mlp(layer.mlp, _rms_norm(layer.post_attention_layernorm, hidden))


def rotary_prefill_parts(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    cache: Any,
    mask: Any,
    attend: Callable[..., tuple[torch.Tensor, Any]],
    qkv: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = rotary_prefill_qkv,
    mlp: Callable[..., tuple[torch.Tensor, torch.Tensor]] = rotary_prefill_mlp,
) -> LayerParts:
    """The fused prefill layer: a Llama-layout decoder layer over ``hidden`` ``[B, T, E]`` in parts
    (``LayerParts``), given what the family's own layer is given: the rotary ``(cos, sin)``, the
    cache (``update(k, v, layer_idx)`` stores the chunk's keys and values and returns the keys to
    attend over) and the attention mask, which ``attend`` (the runner's attention function) reads.
    ``qkv`` and ``mlp`` are the fusable stretches (compiled on CUDA: RMSNorm, rotary, SiLU gating
    and the residual add become a few kernels around the GEMMs). A whole layer and a pass paused
    inside one run these same parts, so both compute the same bits."""
    attn = layer.self_attn
    q, k, v = qkv(layer, hidden, *rope)  # [B, H, T, D], [B, H_kv, T, D] x 2
    k, v = cache.update(k, v, attn.layer_idx)
    out, _ = attend(attn, q, k, v, mask, scaling=attn.scaling)  # [B, T, H, D]
    out = attn.o_proj(out.reshape(*hidden.shape[:2], -1))  # [B, T, E]
    yield "attention", out
    hidden, out = mlp(layer, hidden, out)
    yield "mlp", out
    return hidden + out
