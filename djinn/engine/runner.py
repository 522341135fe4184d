"""The layer-by-layer model runner over server-owned, paged KV.

Every session's KV lives in blocks of one ``KVPool`` (see ``kvpool``). ``ModelRunner.begin``
embeds a chunk of one session's tokens and returns a ``ForwardCursor``; ``run(until=k)`` runs
decoder layers up to ``k`` and stops there (a breakpoint: ``.hidden`` may be read or edited),
``finish()`` runs the rest, the final norm and the head, and commits the chunk to the KV. Prompts
and prompt chunks go this way (``prefill`` of one session is ``begin(...).finish()``); ``prefill``
of several packs their chunks into one pass. On CUDA a prefill's attention gives each chunk only
its own session's keys (``varlen_prefill_attention``, PyTorch's variable-length flash attention),
elsewhere a mask does.

``ModelRunner.decode`` runs one decode step for many sessions at once: every row's new key is
written to its slot and all rows attend in one attention call per layer: on CUDA
``paged_decode_attention`` (compiled flex_attention over each row's block table), elsewhere
``batched_decode_attention`` (SDPA over the pool's slots under a mask that keeps each row to its
own session). On CUDA the step is captured as a CUDA graph per padded batch size and slot span,
and replayed. The layers reach these through ``runner_attention``, the one function registered
with transformers' attention registry and set on the model's config once, when the runner is
built: the mask a pass hands the layers says which kernel runs.

``ModelRunner.begin_decode`` is that step for one session as a ``DecodeCursor``: the same API
as ``ForwardCursor`` (``run``, ``hidden`` ``[1, 1, E]``, ``finish``) over the same computation as
``decode([kv], [token])``: inputs of batch bucket 1 and the same slot span, the same masks, the same
per-layer loop (``_decode_layers``: the fused layer or the model's own), norm and head, run
eagerly and paused between layers. A breakpoint request prefills as the batch engine does (its
chunks, one-session passes) and decodes through ``begin_decode``.

What the default mode guarantees: a request with breakpoints and no edit is token-exact with,
and has the bit-identical logits of, the same request run alone by the batch engine, since both
run the same kernels on the same inputs. tests/test_trace_exact.py shows it for every family and
both decode attentions on the CPU (where the one-session pass and the decode step differ in the
last bits, so the tests tell them apart); on CUDA it rests on a graph's replay and an eager run
of its kernels giving the same bits. A session decoded in a batch with others is another
computation (other GEMM shapes, other rows beside it): on CUDA in bf16 it is reproduced exactly
only by the same batch composition, so a trace equals a plain request that ran alone, not one
that shared its steps.

The runner calls the model's own modules (embedding, decoder layers, norm, head). Per layer it
does nothing but call the layer, plus the streamer's ``before_layer``/``after_layer``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from djinn.kernel.errors import BreakpointError, ModelError
from djinn.engine.kvpool import SCRATCH_BLOCK, KVPool, SessionKV, load_slots, store_slots
from djinn.engine.families import (
    LAYER_SITES, LayerParts, family_of, pack_projections, pool_attention, rotary_decode_layer, rotary_prefill_mlp,
    rotary_prefill_qkv,
)
from djinn.engine import invariant
from djinn.engine.models import LoadedModel, kv_geometry
from djinn.engine.streaming import Streamer

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
DEFAULT_BLOCK_TOKENS = 64
#: graphs kept at once; the least recently used is dropped beyond this
MAX_GRAPHS = 48
#: the scaled-dot-product attention kernels forward passes may use. cuDNN's is left out: it builds
#: and caches an execution plan for every new pair of query and key lengths, and a packed prefill
#: has new lengths on almost every pass, so the pass (and every session's step) would wait for a
#: plan; the memory-efficient kernel takes the same masks with no per-shape setup.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
#: a step shape is captured the time it is used again: a one-off shape (a batch growing while
#: sessions join) runs eagerly rather than paying for a capture it never replays
CAPTURE_AFTER_USES = 2
#: token counts a short prefill pass is padded to, each a captured graph: eager, such a pass cost
#: its few thousand operator launches, not its kernels (``eval/results/profile_prefill_h200.json``).
#: Steps of about 1.5x keep the padding's compute within half the pass; a longer pass runs eagerly
PREFILL_GRAPH_TOKENS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
#: keys a captured prefill pass gathers (each chunk's session's context and chunk, summed), padded to
PREFILL_GRAPH_KEYS = (1024, 2048, 4096, 8192, 16384)
#: chunks one captured prefill pass holds at most; unused ones are empty
PREFILL_GRAPH_CHUNKS = 32


def _round_up(tokens: int, block: int) -> int:
    return -(-tokens // block) * block


class _PoolCache:
    """What the decoder layers see as ``past_key_values`` in a one-session pass.

    Layers call ``update(key, value, layer_idx, ...)`` with ``[1, H_kv, T, D]`` states: they are
    written to the session's slots for ``[start, start + T)`` and the layer attends over a gather
    of its slots ``[0, start + T)``. The pool's tensor is looked up on every call, so a paused pass
    sees the KV wherever it is.
    """

    def __init__(self, kv: SessionKV, start: int, end: int, gather: bool = True) -> None:
        self.kv = kv
        self.pool = kv.pool
        self.start = start
        self.end = end
        self.gather = gather

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``[1, H_kv, T, D]`` keys and values; return the session's ``[1, H_kv, start + T, D]``
        (without ``gather``: the given states, for an attention that reads the pool itself)."""
        new, slots = self._slots()
        layer = self.pool.tensor[layer_idx]  # [2, slots, H_kv, D]
        store_slots(layer[0], new, key_states[0].transpose(0, 1))
        store_slots(layer[1], new, value_states[0].transpose(0, 1))
        if not self.gather:
            return key_states, value_states
        # read back from the pool, so every token attends to the stored (for fp8 KV: rounded) keys
        keys = load_slots(layer[0], slots, key_states.dtype).transpose(0, 1).unsqueeze(0)
        values = load_slots(layer[1], slots, value_states.dtype).transpose(0, 1).unsqueeze(0)
        return keys, values

    def _slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool slots to write ``[T]`` and to read ``[start + T]``; looked up per layer, since a
        paused pass's session may have moved."""
        slots = self.kv.slots(0, self.end)
        return slots[self.start :], slots

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens stored before this chunk."""
        return self.start


class _PackedCache(_PoolCache):
    """``past_key_values`` of several sessions' chunks packed into one sequence: token ``t`` is
    written to slot ``write[t]``, and every layer reads the keys of slots ``read`` (each session's
    context and chunk, one after another); the mask keeps each chunk to its own session's keys."""

    def __init__(self, pool: KVPool, write: torch.Tensor, read: torch.Tensor, gather: bool = True) -> None:
        self.pool, self.write, self.read, self.gather = pool, write, read, gather

    def _slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.write, self.read

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Not meaningful for several sessions; the layers given here do not ask."""
        return 0


class _PaddedPoolCache(_PoolCache):
    """``past_key_values`` of a one-session pass padded to a captured prefill shape
    (``_PrefillInputs``), as a ``PrefillCursor`` runs it: the session's slots are written into the
    inputs' ``write`` and ``read`` on every layer (a paused pass's session may have moved), their
    padding left pointing at the scratch slot."""

    def __init__(self, kv: SessionKV, start: int, end: int, inputs: _PrefillInputs) -> None:
        super().__init__(kv, start, end)
        self.inputs = inputs

    def _slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.kv.slots(0, self.end)
        self.inputs.write[: self.end - self.start].copy_(slots[self.start :])
        self.inputs.read[: self.end].copy_(slots)
        return self.inputs.write, self.inputs.read


class _BatchCache:
    """``past_key_values`` of a batched decode step: one new token per row.

    ``update`` writes row ``b``'s key and value to slot ``write[b]`` and returns the pool's first
    ``slots`` slots of the layer as ``[1, H_kv, slots, D]`` views: every row attends over the same
    keys, and the mask keeps each row to its own session's.
    """

    def __init__(self, pool: KVPool, write: torch.Tensor, slots: int) -> None:
        self.pool = pool
        self.write = write
        self.slots = slots

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``[B, H_kv, 1, D]`` keys and values; return views ``[1, H_kv, slots, D]`` of the pool
        (in the pool's dtype)."""
        layer = self.pool.tensor[layer_idx]  # [2, slots, H_kv, D]
        store_slots(layer[0], self.write, key_states[:, :, 0])
        store_slots(layer[1], self.write, value_states[:, :, 0])
        return (
            layer[0, : self.slots].transpose(0, 1).unsqueeze(0),
            layer[1, : self.slots].transpose(0, 1).unsqueeze(0),
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Not meaningful for a batch of sessions; the layers given here do not ask."""
        return 0


def batched_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of ``B`` one-token queries ``[B, H, 1, D]`` over shared pool keys ``[1, H_kv, S, D]``.

    The queries of a key head's group and of every row become one query block ``[1, H_kv, g*B, D]``,
    so each key is read once for the whole batch, and grouped-query models need no key copies.
    ``attention_mask`` is ``[1, 1, g*B, S]`` boolean, rows ordered (group member, batch row).
    Called by ``runner_attention``; returns ``[B, 1, H, D]`` as transformers' attention functions do.
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    key, value = key.to(query.dtype), value.to(query.dtype)  # an fp8 pool's keys, expanded for SDPA
    grouped = query[:, :, 0].reshape(batch, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(1, kv_heads, group * batch, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, scale=scaling
    )  # [1, H_kv, g*B, D]
    out = out.reshape(kv_heads, group, batch, dim).permute(2, 0, 1, 3).reshape(batch, 1, heads, dim)
    return out, None


def _cache_keyword() -> str:
    """The keyword decoder layers take the KV cache under: ``cache`` in recent transformers,
    ``past_key_values`` before (passing the old name to a new layer warns on every call)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


#: read once: every supported family's decoder layer follows the same transformers convention
CACHE_KEYWORD = _cache_keyword()



#: flex_attention compiled to one fused kernel (on CUDA), on first use per batch size. Static
#: shapes: inductor picks its split-KV decoding kernel only for a batch size known at compile
#: time (a dynamic batch falls back to the prefill kernel, which pads each query to 128 rows).
#: Keys and values are the whole pool, so the batch bucket is the one shape that varies.
_compiled_flex = torch.compile(flex_attention, dynamic=False)
#: the fused decode layer, compiled once for every layer of every model (the layer's module is an
#: input, so its weights are not baked in): one compile per batch bucket and window
_compiled_decode_layer = torch.compile(rotary_decode_layer, dynamic=False)
#: the fused prefill layer's two compiled stretches, shared the same way: the token count is
#: dynamic, so one compile serves every pass length (and one more a one-token pass)
_compiled_prefill_qkv = torch.compile(rotary_prefill_qkv, dynamic=True)
_compiled_prefill_mlp = torch.compile(rotary_prefill_mlp, dynamic=True)
#: flex_attention's decoding-kernel options for paged decode (default mode): two pipeline stages
#: and four warps read the paged pool 1.34-1.35x faster than inductor's default (one stage, two
#: warps) at 16 to 128 rows and 1.17-1.44x at 1 to 4 (``eval/results/tune_flex_decode_h200.json``)
PAGED_DECODE_FLEX_OPTIONS: dict[str, Any] = {"num_stages": 2, "num_warps": 4}
#: the same over an fp8 pool (attended with float16 queries, ``families.pool_attention``): three
#: stages and two warps read it 1.19-1.52x faster than the options above at 16 to 128 rows, and
#: 1.06-1.13x slower at 1 and 4 (``eval/results/tune_flex_decode_fp8_f16q_batches_h200.json``)
PAGED_DECODE_FP8_FLEX_OPTIONS: dict[str, Any] = {"num_stages": 3, "num_warps": 2}
#: flex_attention's query block; a decode step has one query per row, so one block
_FLEX_QUERY_BLOCK = 128
#: the query-major block lists serve only the backward pass; skip them where torch allows
_NO_Q_BLOCKS = (
    {"compute_q_blocks": False} if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters else {}
)


def paged_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: BlockMask,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of ``B`` one-token queries ``[B, H, 1, D]`` over the pool's keys ``[1, H_kv, S, D]``,
    each row reading only its own session's blocks.

    ``attention_mask`` is a ``BlockMask`` whose per-row block list is the session's block table,
    so the work is proportional to the rows' own contexts, not rows x slots. flex_attention is
    compiled on CUDA; on the CPU its unfused reference runs. In deterministic mode the layers'
    config carries ``invariant.flex_kernel_options``, which fix the kernel. Returns ``[B, 1, H, D]``.
    """
    flex = _compiled_flex if query.is_cuda else flex_attention
    # deterministic mode's fixed kernel, or None. (Its BatchInvariantMode stays active here: with
    # torch functions disabled dynamo cannot trace flex_attention and falls back to the unfused
    # reference, which materialises every row's scores over the whole pool.)
    options = getattr(module.config, "djinn_flex_options", None)
    out = pool_attention(
        flex, query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
        kernel_options=options,
    )  # [B, H, 1, D]
    return out.transpose(1, 2), None


@attrs.frozen
class _SharedKeysMask:
    """A masked decode step's mask ``[1, 1, g*B, S]``: tells ``runner_attention`` that the rows
    attend over the pool's shared keys (``batched_decode_attention``)."""

    mask: torch.Tensor


#: how a prefill attends: over each chunk's own session by variable-length flash attention (CUDA,
#: bf16/fp16, the sdpa implementation), or under a dense mask over every key of the pass
PREFILL_ATTENTION = ("varlen", "masked")
#: torch 2.13's varlen_attn takes grouped-query keys as they are (``enable_gqa``); 2.11's does not
_VARLEN_GQA = "enable_gqa" in inspect.signature(varlen_attn).parameters


@attrs.frozen(eq=False)
class VarlenRows:
    """A prefill's attention inputs for ``varlen_prefill_attention``; no mask is built. Chunk ``i``'s
    queries are rows ``cu_q[i]:cu_q[i + 1]`` of the packed pass, its session's gathered keys
    (context, then the chunk) rows ``cu_k[i]:cu_k[i + 1]``; each query sees the keys up to its own
    position (causal, aligned at the chunk's end), within ``window`` keys if set."""

    cu_q: torch.Tensor  # [n + 1] int32
    cu_k: torch.Tensor  # [n + 1] int32
    max_q: int
    max_k: int
    window: int | None


def varlen_prefill_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    rows: VarlenRows, scaling: float | None,
) -> torch.Tensor:
    """A packed prefill's attention by ``varlen_attn``: ``query`` ``[1, H, sum T, D]`` over the
    gathered ``key``/``value`` ``[1, H_kv, sum (start + T), D]``. The work is each chunk's own
    queries x keys, not the pass's tokens x all its keys. Returns ``[1, sum T, H, D]``."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, D], views of contiguous states
    # causal with the window's left edge; flash aligns it at the end of each chunk's keys
    options: dict[str, Any] = {"scale": scaling, "window_size": (-1 if rows.window is None else rows.window - 1, 0)}
    if not q.is_cuda:
        return _varlen_reference(q, k, v, rows, scaling).unsqueeze(0)
    if k.shape[1] != q.shape[1]:
        if _VARLEN_GQA:
            options["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = varlen_attn(q, k, v, rows.cu_q, rows.cu_k, rows.max_q, rows.max_k, **options)
    return out.unsqueeze(0)


def _varlen_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: VarlenRows, scaling: float | None
) -> torch.Tensor:
    """What ``varlen_attn`` computes, chunk by chunk through SDPA (off CUDA, where it has no
    kernel): ``q`` ``[sum T, H, D]`` over ``k``/``v`` ``[sum K, H_kv, D]``; a query with no key
    in its causal window (a padding chunk's) gets zeros, as flash attention gives it."""
    cu_q, cu_k = rows.cu_q.tolist(), rows.cu_k.tolist()
    out = torch.zeros_like(q)
    for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        if q1 == q0:
            continue
        query_position = torch.arange(k1 - k0 - (q1 - q0), k1 - k0)[:, None]  # aligned at the keys' end
        key_position = torch.arange(k1 - k0)[None, :]
        allowed = key_position <= query_position
        if rows.window is not None:
            allowed &= query_position - key_position < rows.window
        seen = allowed.any(-1)  # [T]
        chunk = torch.nn.functional.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1),
            attn_mask=allowed | ~seen[:, None], scale=scaling, enable_gqa=k.shape[1] != q.shape[1],
        ).transpose(0, 1)  # [T, H, D]
        out[q0:q1] = torch.where(seen[:, None, None], chunk, 0)
    return out


@attrs.frozen
class MixedRows:
    """The attention inputs of a mixed pass (``ModelRunner.mixed_step``): its first
    ``prefill_tokens`` queries are prefill chunks (``prefill``, over the keys the cache gathered),
    the rest one decode row each, which attends over its own blocks of the pool (``decode``, a
    paged decode step's ``BlockMask``; ``flex_options`` its kernel's options)."""

    prefill: VarlenRows
    prefill_tokens: int
    decode: BlockMask
    pool: KVPool
    flex_options: dict[str, Any] | None


def mixed_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    rows: MixedRows, scaling: float | None,
) -> torch.Tensor:
    """A mixed pass's attention: ``query`` ``[1, H, T + B, D]``; ``key``/``value`` the prefill
    chunks' gathered keys ``[1, H_kv, sum (start + T), D]``; every new key (the decode rows'
    too) is already in the pool. Returns ``[1, T + B, H, D]``."""
    tokens = rows.prefill_tokens
    prefill = varlen_prefill_attention(module, query[:, :, :tokens], key, value, rows.prefill, scaling)  # [1, T, H, D]
    layer = rows.pool.tensor[module.layer_idx]  # [2, S, H_kv, D]
    decode = query[0, :, tokens:].transpose(0, 1)[:, :, None]  # [B, H, 1, D]
    flex = _compiled_flex if query.is_cuda else flex_attention
    out = pool_attention(
        flex, decode, layer[0].transpose(0, 1)[None], layer[1].transpose(0, 1)[None], block_mask=rows.decode,
        scale=scaling, enable_gqa=decode.shape[1] != layer.shape[2], kernel_options=rows.flex_options,
    )  # [B, H, 1, D]
    return torch.cat([prefill, out.permute(2, 0, 1, 3)], dim=1)


def runner_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The attention function of every layer a runner drives, set once when the runner is built.

    The mask says which pass this is: a ``BlockMask`` is a paged decode step, a
    ``_SharedKeysMask`` a masked one, ``VarlenRows`` a prefill by variable-length attention,
    ``MixedRows`` a pass of prefill chunks and decode rows, ``invariant.DecodeRows`` /
    ``PrefillRows`` a deterministic decode step / prefill (which read the pool themselves);
    anything else (a prefill's boolean or additive mask, or None) goes to the implementation the
    model was loaded with (``djinn_base_attention`` on the layers' config: sdpa or eager), so the
    model's own forward works unchanged.
    """
    if isinstance(attention_mask, BlockMask):
        return paged_decode_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if isinstance(attention_mask, invariant.DecodeRows):
        return invariant.decode_attention(module, query, attention_mask, scaling), None
    if isinstance(attention_mask, invariant.PrefillRows):
        return invariant.prefill_attention(module, query, attention_mask, scaling), None
    if isinstance(attention_mask, VarlenRows):
        return varlen_prefill_attention(module, query, key, value, attention_mask, scaling), None
    if isinstance(attention_mask, MixedRows):
        return mixed_attention(module, query, key, value, attention_mask, scaling), None
    if isinstance(attention_mask, _SharedKeysMask):
        return batched_decode_attention(module, query, key, value, attention_mask.mask, dropout, scaling, **kwargs)
    base = getattr(module.config, "djinn_base_attention", "sdpa")
    if base == "eager":
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, **kwargs)


RUNNER_ATTENTION = "djinn"
AttentionInterface.register(RUNNER_ATTENTION, runner_attention)
#: how a batched decode step attends: over each row's own blocks, or over all slots under a mask
DECODE_ATTENTION = ("paged", "masked")
#: the one-byte KV dtype (``kv_dtype``): keys and values rounded to e4m3 as they are stored, with
#: no scale (e4m3 spans +-448 and keeps 3 mantissa bits down to 2**-6), and read back in the
#: compute dtype; flex_attention reads them as they are, SDPA and the tiled kernels after a cast
KV_FP8_DTYPES = (torch.float8_e4m3fn,)


def _paged_mask_mod(inputs: _StepInputs, window: int | None) -> Callable[..., torch.Tensor]:
    """flex_attention's ``mask_mod`` of a decode step: a row sees its own filled slots (within its
    window); a padding row sees the scratch slot alone."""
    owner, rank, positions, pad = inputs.block_owner, inputs.block_rank, inputs.positions, inputs.pad
    bt = inputs.block_tokens

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        block = kv_idx // bt
        position = rank[block] * bt + kv_idx % bt  # the slot's position in its session
        own = (owner[block] == b) & (position <= positions[b])
        if window is not None:
            own = own & (positions[b] - position < window)
        return own | (pad[b] & (block == SCRATCH_BLOCK))

    return mask_mod


#: batch sizes a decode step is padded to. Few: each is a captured graph and, with paged
#: attention, a compile of the attention kernel; padding rows cost little, since a step's weight
#: reads dominate up to a few hundred rows and a padding row reads one scratch block
BATCH_BUCKETS = (1, 4, 16, 64, 128, 256, 512)
#: compiles of the paged attention kernel dynamo keeps: one per batch bucket and sliding window
#: for each KV pool length. A server has one length; growing pools and kernels started one after
#: another in a process bring more. Past the limit dynamo runs flex_attention eagerly, which a
#: CUDA graph cannot capture, so room is left for this many lengths:
_POOL_LENGTHS = 8
_RECOMPILE_LIMIT = _POOL_LENGTHS * 2 * len(BATCH_BUCKETS)
if getattr(torch._dynamo.config, "recompile_limit", _RECOMPILE_LIMIT) < _RECOMPILE_LIMIT:
    torch._dynamo.config.recompile_limit = _RECOMPILE_LIMIT


def batch_bucket(size: int) -> int:
    """The padded batch size of a step with ``size`` rows."""
    return next((b for b in BATCH_BUCKETS if b >= size), _round_up(size, 256))


def slot_bucket(slots: int) -> int:
    """The padded slot span of a step that attends over ``slots`` pool slots.

    Fine steps where a padded slot costs most relative to the span, coarser ones further up:
    every slot is read by every layer, so the padding is kept within a few percent.
    """
    step = 256 if slots <= 4096 else 1024 if slots <= 32768 else 4096
    return _round_up(max(slots, 1), step)


@attrs.define(eq=False)
class _StepInputs:
    """A decode step's inputs and output at fixed addresses (what a captured graph reads and writes).

    The host writes one tensor, ``packed``; ``expand()``, the first thing a step runs (inside its
    graph), derives every other field from it on the device, so between two replays the host
    issues one copy and no other operator.
    """

    packed: torch.Tensor  # [4B + C] per row: token, position, slot written, blocks read; then the rows' blocks
    ids: torch.Tensor  # [B] next token of each row
    positions: torch.Tensor  # [B] its position in the row's session
    write: torch.Tensor  # [B] the slot it is stored at
    block_owner: torch.Tensor  # [S / block] which row owns each block (-1: none)
    block_rank: torch.Tensor  # [S / block] each owned block's index in its session's block table
    pad: torch.Tensor  # [B] padding rows (they attend to the scratch slot only)
    table: torch.Tensor  # [B * S / block + 1] int32 the rows' block tables, then one slot for padding writes
    block_count: torch.Tensor  # [B] int32 blocks each row reads
    block_tokens: int
    logits: torch.Tensor | None = None  # [B, vocab] float32, written by the step
    graph: Any = None

    @classmethod
    def empty(cls, batch: int, slots: int, block_tokens: int, device: torch.device,
              pool_blocks: int) -> _StepInputs:
        """Inputs for ``batch`` rows over ``slots`` slots, all rows padding. A step's rows own
        distinct blocks of a pool of ``pool_blocks``, at most ``slots / block_tokens`` each."""
        long = dict(dtype=torch.long, device=device)
        width = slots // block_tokens
        capacity = min(batch * width, pool_blocks)
        packed = torch.zeros(4 * batch + capacity, **long)
        packed[2 * batch : 3 * batch] = SCRATCH_BLOCK * block_tokens
        inputs = cls(
            packed=packed, ids=torch.zeros(batch, **long), positions=torch.zeros(batch, **long),
            write=torch.full((batch,), SCRATCH_BLOCK * block_tokens, **long),
            block_owner=torch.full((width,), -1, **long), block_rank=torch.zeros(width, **long),
            pad=torch.ones(batch, dtype=torch.bool, device=device),
            table=torch.full((batch * width + 1,), SCRATCH_BLOCK, dtype=torch.int32, device=device),
            block_count=torch.ones(batch, dtype=torch.int32, device=device),
            block_tokens=block_tokens,
        )
        return inputs

    @property
    def blocks(self) -> torch.Tensor:
        """``[B, S / block]`` int32 each row's block table (padding: the scratch block)."""
        batch = self.ids.shape[0]
        return self.table[:-1].view(batch, -1)

    def pack(self, kvs: Sequence[SessionKV], tokens: Sequence[int]) -> None:
        """Write the step's rows into ``packed`` (rows past ``len(kvs)`` are padding): one
        host-to-device copy. Per row the host touches only the session's block list."""
        batch, bt = self.ids.shape[0], self.block_tokens
        spare = batch - len(kvs)
        lengths, writes, counts, flat = [], [], [], []
        for kv in kvs:
            n = kv.length
            used = n // bt + 1  # blocks holding tokens [0, n]
            lengths.append(n)
            writes.append(kv.blocks[n // bt] * bt + n % bt)
            counts.append(used)
            flat.extend(kv.blocks[:used])
        if len(flat) > self.packed.numel() - 4 * batch:
            raise ValueError(f"a decode step's rows read {len(flat)} blocks, more than its inputs hold")
        host = torch.tensor(
            [*tokens, *[0] * spare, *lengths, *[0] * spare, *writes, *[SCRATCH_BLOCK * bt] * spare,
             *counts, *[0] * spare, *flat], dtype=torch.long,
        )
        self.packed[: host.numel()].copy_(host, non_blocking=True)

    def expand(self, maps: bool = True) -> None:
        """Derive every field from ``packed``, on the device and with fixed shapes (no host sync),
        so a captured step does it as part of its graph; the per-block maps ``block_owner`` and
        ``block_rank`` only with ``maps``. Blocks past the rows' own are stale values left from
        earlier steps and are ignored."""
        batch = self.ids.shape[0]
        width = self.block_owner.shape[0]
        ids, positions, write, count = self.packed[: 4 * batch].view(4, batch)
        flat = self.packed[4 * batch :]
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.write.copy_(write)
        torch.eq(count, 0, out=self.pad)
        self.block_count.copy_(count.clamp(min=1))
        ends = torch.cumsum(count, 0)  # [B] where each row's blocks end in ``flat``
        index = torch.arange(flat.shape[0], device=flat.device)
        row = torch.searchsorted(ends, index, right=True)  # [C] each entry's row; B past the last
        valid = row < batch
        row = row.clamp(max=batch - 1)
        rank = index - (ends - count)[row]  # each block's index in its row's table
        block = torch.where(valid, flat, SCRATCH_BLOCK)  # ignored entries write the scratch block's
        if maps:
            self.block_owner.fill_(-1)
            self.block_owner.index_copy_(0, block, torch.where(valid, row, -1))
            self.block_rank.index_copy_(0, block, torch.where(valid, rank, 0))
        self.table.fill_(SCRATCH_BLOCK)
        dump = self.table.shape[0] - 1  # ignored entries land in the extra slot
        self.table.index_copy_(0, torch.where(valid, row * width + rank, dump), block.to(torch.int32))


@attrs.define(eq=False)
class _PrefillInputs:
    """A prefill pass padded to a captured shape, at fixed addresses for its graph: ``tokens``
    queries and ``keys`` gathered keys, in ``PREFILL_GRAPH_CHUNKS`` chunks plus one of padding
    (its queries write the scratch slot and attend to scratch keys; unused chunks are empty)."""

    ids: torch.Tensor  # [tokens] the chunks' tokens, one after another, then padding
    positions: torch.Tensor  # [tokens] each token's position in its session
    write: torch.Tensor  # [tokens] the slot each token is stored at
    read: torch.Tensor  # [keys] the slots of each chunk's session's keys, one session after another
    cu_q: torch.Tensor  # [chunks + 2] int32 where each chunk's queries begin (the padding's last)
    cu_k: torch.Tensor  # [chunks + 2] int32 where each chunk's keys begin
    last: torch.Tensor  # [chunks] each chunk's last token (unused chunks: 0)
    tokens: int
    keys: int
    logits: torch.Tensor | None = None  # [chunks, vocab] float32, written by the pass
    graph: Any = None

    @classmethod
    def empty(cls, tokens: int, keys: int, block_tokens: int, device: torch.device) -> _PrefillInputs:
        """Inputs of a pass that is all padding."""
        long = dict(dtype=torch.long, device=device)
        scratch = SCRATCH_BLOCK * block_tokens
        bounds = [0] + [tokens] * (PREFILL_GRAPH_CHUNKS + 1)
        return cls(
            ids=torch.zeros(tokens, **long), positions=torch.zeros(tokens, **long),
            write=torch.full((tokens,), scratch, **long), read=torch.full((keys,), scratch, **long),
            cu_q=torch.tensor(bounds, dtype=torch.int32, device=device),
            cu_k=torch.tensor([0] + [keys] * (PREFILL_GRAPH_CHUNKS + 1), dtype=torch.int32, device=device),
            last=torch.zeros(PREFILL_GRAPH_CHUNKS, **long), tokens=tokens, keys=keys,
        )


@attrs.define(eq=False)
class _MixedInputs:
    """A mixed pass (``ModelRunner.mixed_step``) at fixed addresses for its graph: a padded
    prefill pass's inputs and a decode step's."""

    prefill: _PrefillInputs
    decode: _StepInputs
    logits: torch.Tensor | None = None  # [PREFILL_GRAPH_CHUNKS + B, vocab] float32: the chunks', then the rows'
    graph: Any = None


def _attention_mask(
    start: int, tokens: int, window: int | None, device: torch.device, additive: torch.dtype | None
) -> torch.Tensor | None:
    """The mask of ``tokens`` queries at positions ``start..`` over keys ``0..start+tokens``.

    ``None`` where attention needs none: sdpa's own causal mode covers a chunk with no prefix
    (what ``generate`` does), and one query attends to every key. ``additive`` is the dtype of the
    eager implementation's additive mask; sdpa takes a boolean one ``[1, 1, T, start + T]``.
    """
    end = start + tokens
    clipped = window is not None and end > window
    if not clipped and (tokens == 1 or (start == 0 and additive is None)):
        return None
    query_pos = torch.arange(start, end, device=device)[:, None]  # [T, 1]
    key_pos = torch.arange(end, device=device)[None, :]  # [1, start + T]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= query_pos - key_pos < window
    allowed = allowed[None, None]  # [1, 1, T, start + T]
    if additive is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive, device=device).masked_fill_(
        ~allowed, torch.finfo(additive).min
    )


def _unique_nbytes(modules: Sequence[torch.nn.Module]) -> int:
    """Bytes of the modules' parameters and buffers, each storage counted once (tied weights,
    projections packed into one tensor)."""
    storages = {}
    for t in (t for m in modules for t in (*m.parameters(), *m.buffers())):
        storage = t.untyped_storage()
        storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def outside_layers_bytes(loaded: LoadedModel) -> int:
    """Device bytes the runner keeps outside the decoder layers: embeddings, final norm and head
    (tied weights once). Of a GPU budget, what is left after them is the decoder layers'."""
    return _unique_nbytes(family_of(loaded).outside_layers)


class ModelRunner:
    """Runs forward passes layer by layer over sessions' KV in one ``KVPool`` (``self.pool``).

    ``device`` is where the pass computes (default: the loaded model's device); the embeddings,
    final norm and head are moved there. The decoder layers are moved there too, unless a
    ``streamer`` is given: the runner then hands them to ``streamer.prepare(layers, device,
    budget_bytes)`` once, here, and calls its per-pass and per-layer methods on every pass.
    ``budget_bytes`` is the device memory the decoder layers may take, the embeddings, norm and
    head not included (``outside_layers_bytes``); None: no limit.
    ``cuda_graphs``: capture decode steps on CUDA (never with a streamer that moves weights), for
    padded batches of at most ``graph_max_batch`` rows; larger steps are long enough to run eagerly.
    ``decode_attention`` (one of ``DECODE_ATTENTION``; default ``"paged"`` on CUDA, ``"masked"``
    elsewhere): how batched decode steps attend, see ``paged_decode_attention`` and
    ``batched_decode_attention``. ``fused_decode`` (default: wherever it applies): paged decode
    steps of rotary families run ``Family.decode_layer``, compiled on CUDA into a few fused
    kernels per layer, instead of the model's own layers; never with a streamer that moves weights.
    ``deterministic``: every pass runs batch-invariant (``invariant``): the model's own layers under
    ``BatchInvariantMode``; decode attention by the paged kernel with ``invariant.flex_kernel_options``
    on CUDA (``invariant.decode_attention`` elsewhere), prefill attention by
    ``invariant.prefill_attention``; so a session's tokens do not depend on what else shares its passes.
    ``kv_dtype``: how the KV pool stores keys and values, the model's dtype (None) or one of
    ``KV_FP8_DTYPES``. ``prefill_attention`` (one of ``PREFILL_ATTENTION``; default ``"varlen"``
    where it applies: CUDA, a bf16 or fp16 model loaded with sdpa, not deterministic): how prefill
    chunks attend, see ``varlen_prefill_attention``; ``"masked"`` builds a dense mask over every
    key of the pass (``[sum T, sum (start + T)]``). ``fused_prefill`` (default: on CUDA wherever it
    applies): prefill passes of rotary families run ``Family.prefill_parts``, two compiled
    stretches per layer around the cache and the attention, instead of the model's own layers
    (whose few dozen small operators per layer made a short pass cost its launches); never with a
    streamer that moves weights nor in deterministic mode. ``mixed_steps`` (default: wherever it
    applies, both fused layers and, on CUDA, varlen prefill attention): ``mixed_step`` runs a
    step's prefill chunks and decode rows as one pass.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        streamer: Streamer | None = None,
        device: str | torch.device | None = None,
        budget_bytes: int | None = None,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        cuda_graphs: bool = True,
        graph_max_batch: int = 512,
        decode_attention: str | None = None,
        fused_decode: bool | None = None,
        deterministic: bool = False,
        kv_dtype: torch.dtype | None = None,
        prefill_attention: str | None = None,
        fused_prefill: bool | None = None,
        mixed_steps: bool | None = None,
    ) -> None:
        self.family = family = family_of(loaded)
        config = loaded.config
        # the modules dispatch on this attribute; transformers offers no public reader
        attention = getattr(config, "_attn_implementation", None) or "eager"
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ModelError(
                f"attention implementation {attention!r} is not supported by the runner; "
                f"load the model with one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        self.device = torch.device(device) if device is not None else loaded.device
        self.deterministic = deterministic
        if deterministic and (decode_attention is not None or fused_decode):
            raise ModelError("deterministic mode runs its own batch-invariant attention and the model's own "
                             "layers: leave decode_attention and fused_decode unset")
        if decode_attention is None:
            decode_attention = "paged" if self.device.type == "cuda" else "masked"
        if decode_attention not in DECODE_ATTENTION:
            raise ModelError(f"decode_attention must be one of {', '.join(DECODE_ATTENTION)}, not {decode_attention!r}")
        if deterministic:  # on CUDA the paged kernel with a fixed configuration, elsewhere the tiled one
            decode_attention = "paged" if self.device.type == "cuda" else "invariant"
        self.decode_attention = decode_attention
        self.config = config
        self.streamer = streamer
        self.layers: list[torch.nn.Module] = family.layers
        self.max_positions: int | None = family.max_positions
        outside_layers = family.outside_layers
        self.num_layers, self.kv_heads, self.head_dim = kv_geometry(config)
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = config.vocab_size
        self.dtype = family.embed_tokens.weight.dtype
        kv_dtype = self.dtype if kv_dtype is None else kv_dtype
        if kv_dtype not in (self.dtype, *KV_FP8_DTYPES):
            raise ModelError(f"the KV pool stores the model's dtype or {KV_FP8_DTYPES[0]}, not {kv_dtype}")
        self.kv_bytes_per_token = 2 * self.num_layers * self.kv_heads * self.head_dim * kv_dtype.itemsize
        self._additive_mask = self.dtype if attention == "eager" else None
        #: the paged decode kernel's options (default mode)
        self.decode_flex_options = PAGED_DECODE_FP8_FLEX_OPTIONS if kv_dtype in KV_FP8_DTYPES else PAGED_DECODE_FLEX_OPTIONS
        if self.decode_attention != "paged":
            flex_options = None
        else:
            flex_options = invariant.flex_kernel_options(block_tokens) if deterministic else self.decode_flex_options
        self._use_runner_attention(attention, flex_options)
        self._windows = family.windows
        varlen = (self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16) and attention == "sdpa"
                  and not deterministic)
        if prefill_attention not in (None, *PREFILL_ATTENTION):
            raise ModelError(f"prefill_attention must be one of {', '.join(PREFILL_ATTENTION)}, not {prefill_attention!r}")
        if prefill_attention == "varlen" and not varlen:
            raise ModelError("varlen prefill attention needs CUDA, a bf16 or fp16 model loaded with sdpa and "
                             "the default (not deterministic) mode")
        self.prefill_attention = prefill_attention or ("varlen" if varlen else "masked")
        self.pool = KVPool(
            self.num_layers, self.kv_heads, self.head_dim,
            dtype=kv_dtype, device=self.device, block_tokens=block_tokens,
        )
        moves_weights = streamer is not None and streamer.streams_weights
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and not moves_weights
        #: short prefill passes are padded to a ``PREFILL_GRAPH_TOKENS`` x ``PREFILL_GRAPH_KEYS``
        #: shape and replayed from captured graphs (varlen attention: the padding is a chunk of its own)
        self.graphed_prefill = self.cuda_graphs and self.prefill_attention == "varlen"
        fusable = (family.decode_layer is not None and self.decode_attention == "paged" and not moves_weights
                   and not deterministic)
        if fused_decode and not fusable:
            raise ModelError(
                f"fused decode needs a rotary family ({family.name!r} given), paged decode attention "
                f"({decode_attention!r}) and weights that stay on the device"
            )
        self.fused_decode = fusable if fused_decode is None else fused_decode
        self._decode_layer = (
            _compiled_decode_layer if self.device.type == "cuda" else family.decode_layer
        ) if self.fused_decode else None
        fusable = family.prefill_parts is not None and not moves_weights and not deterministic
        if fused_prefill and not fusable:
            raise ModelError(
                f"the fused prefill layer needs a rotary family ({family.name!r} given), weights that stay "
                "on the device and the default (not deterministic) mode"
            )
        self.fused_prefill = fusable and self.device.type == "cuda" if fused_prefill is None else fused_prefill
        cuda = self.device.type == "cuda"
        mixable = self.fused_decode and self.fused_prefill and (self.prefill_attention == "varlen" or not cuda)
        if mixed_steps and not mixable:
            raise ModelError("mixed steps need the fused decode and prefill layers and, on CUDA, varlen prefill attention")
        self.mixed_steps = mixable if mixed_steps is None else mixed_steps
        self._prefill_stretches = dict(qkv=_compiled_prefill_qkv, mlp=_compiled_prefill_mlp) if cuda else {}
        self.graph_max_batch = graph_max_batch
        self._mode = invariant.BatchInvariantMode if deterministic else contextlib.nullcontext
        self._decode_key_tokens = invariant.key_tile(invariant.DECODE_KEY_TOKENS, block_tokens)
        self._prefill_key_tokens = invariant.key_tile(invariant.PREFILL_KEY_TOKENS, block_tokens)
        self._graphs: dict[tuple[int, int], _StepInputs] = {}
        self._uses: dict[tuple[int, int], int] = {}
        #: captured prefill passes by padded (tokens, keys); all are kept (a few dozen at most)
        self._prefill_graphs: dict[tuple[int, int], _PrefillInputs] = {}
        self._prefill_uses: dict[tuple[int, int], int] = {}
        #: mixed passes captured at warm-up, by padded (tokens, keys, rows)
        self._mixed_graphs: dict[tuple[int, int, int], _MixedInputs] = {}
        self.captures = 0
        self._graph_generation = self.pool.generation
        self._graph_pool: Any = None

        for module in outside_layers:
            module.to(self.device)
        self._outside_layers_bytes = _unique_nbytes(outside_layers)
        if streamer is None:
            for layer in self.layers:
                layer.to(self.device)
            self._layers_bytes = _unique_nbytes(self.layers)
        else:
            streamer.prepare(self.layers, self.device, budget_bytes)
        if self.fused_decode or self.fused_prefill:
            for layer in self.layers:
                pack_projections(layer)

    def _use_runner_attention(self, base: str, flex_options: dict[str, Any] | None) -> None:
        """Fix the layers' attention once: their modules get a copy of the config naming
        ``runner_attention``, which picks the kernel from the mask, and the paged kernel's
        ``flex_options`` (None: its defaults). The model's own config is left as it was, so the
        model's own forward (and its mask building) works unchanged."""
        layers_config = copy.copy(self.config)
        layers_config._attn_implementation = RUNNER_ATTENTION
        layers_config.djinn_base_attention = base
        layers_config.djinn_flex_options = flex_options
        for layer in self.layers:
            for module in layer.modules():
                if getattr(module, "config", None) is self.config:
                    module.config = layers_config

    def device_weight_bytes(self) -> int:
        """Device memory the weights take: embeddings, norm and head, plus the layers or the
        streamer's share (resident copies or its ring)."""
        layers = self._layers_bytes if self.streamer is None else self.streamer.device_bytes()
        return self._outside_layers_bytes + layers

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of KV a session holding ``tokens`` tokens takes (whole blocks)."""
        return _round_up(tokens, self.pool.block_tokens) * self.kv_bytes_per_token

    def kv_growth_bytes(self, kv: SessionKV, tokens: int) -> int:
        """Bytes ``kv.ensure_capacity(tokens)`` would add (0 when it holds enough)."""
        return max(0, self.kv_bytes(tokens) - kv.nbytes)

    def new_kv(self, capacity_tokens: int = 0) -> SessionKV:
        """An empty session KV in the runner's pool, with blocks for ``capacity_tokens``."""
        kv = SessionKV(self.pool)
        kv.ensure_capacity(capacity_tokens)
        return kv

    def check_positions(self, tokens: int) -> None:
        """Raise ``ModelError`` when a context of ``tokens`` tokens passes the model's positions."""
        if self.max_positions is not None and tokens > self.max_positions:
            raise ModelError(f"a context of {tokens} tokens exceeds the model's {self.max_positions} positions")

    def ids_tensor(self, ids: Sequence[int]) -> torch.Tensor:
        """Token ids as the ``[1, T]`` tensor ``begin`` takes, on the runner's device."""
        return torch.tensor([list(ids)], dtype=torch.long, device=self.device)

    def token_picker(
        self, temperature: float = 0.0, top_k: int | None = None, seed: int | None = None, top_p: float = 1.0,
    ) -> Callable[[torch.Tensor], int]:
        """A function from logits ``[vocab]`` to a token: argmax when ``temperature`` is 0, else
        sampling from the ``top_k`` best (all when None or 0), then from the smallest set whose
        probability reaches ``top_p`` (nucleus; 1 keeps all), with a generator seeded by ``seed``
        (a random seed when None)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {temperature}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {top_k}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {top_p}")
        if temperature == 0:
            return lambda logits: int(logits.argmax())
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)

        def pick(logits: torch.Tensor) -> int:
            scores = logits.float() / temperature  # [vocab]
            candidates = None
            if top_k and top_k < scores.shape[0]:
                scores, candidates = scores.topk(top_k)  # [top_k] each
            probs = scores.softmax(-1)
            finite = torch.isfinite(probs).all()
            if top_p < 1:
                ranked, order = probs.sort(descending=True)  # [n] each
                # keep a token while the mass before it is short of top_p (the best always stays)
                ranked = ranked * (ranked.cumsum(-1) - ranked < top_p)
                probs = torch.zeros_like(probs).scatter(0, order, ranked)
            # on CUDA, multinomial over NaN trips a device assert that ends the process: sample
            # from a harmless stand-in and report the bad row after the one synchronisation
            choice = torch.multinomial(torch.where(finite, probs, 1.0), 1, generator=generator)  # [1]
            picked = choice if candidates is None else candidates[choice]
            token, ok = torch.stack([picked[0], finite.long()]).tolist()
            if not ok:
                raise ValueError(f"sampling probabilities are nan or infinite at temperature {temperature}")
            return int(token)

        return pick

    @torch.inference_mode()
    def begin(self, kv: SessionKV, input_ids: torch.Tensor) -> ForwardCursor:
        """Start a forward pass of ``input_ids`` ``[1, T]`` appended after ``kv.length`` tokens.

        A fresh prompt, a chunk appended to a context, or a one-token decode step alike. Nothing
        is committed to ``kv.length`` until ``finish()``.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [1, T] with T >= 1, not {list(input_ids.shape)}")
        start = kv.length
        tokens = input_ids.shape[1]
        end = start + tokens
        self.check_positions(end)
        kv.ensure_capacity(end)
        shape = self._prefill_shape(tokens, end, 1)
        if shape is not None:
            inputs = _PrefillInputs.empty(*shape, self.pool.block_tokens, self.device)
            self._fill_prefill(inputs, [kv], [input_ids[0].tolist()], [start], [end])
            hidden, layer_kwargs = self._prefill_layer_inputs(inputs, _PaddedPoolCache(kv, start, end, inputs))
            return PrefillCursor(self, kv, inputs, tokens, hidden, layer_kwargs)
        ids = input_ids.to(self.device)
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)  # [1, T]
        cache = _PoolCache(kv, start, end, gather=not self.deterministic)
        if self.deterministic:
            masks = self._prefill_rows([kv], [start], [tokens], [end])
        elif self.prefill_attention == "varlen":
            masks = self._varlen_rows([tokens], [end])
        else:
            masks = {w: _attention_mask(start, tokens, w, self.device, self._additive_mask) for w in set(self._windows)}
        hidden, layer_kwargs = self._layer_inputs(ids, positions, cache, masks)
        return ForwardCursor(self, kv, hidden, positions, layer_kwargs, fused=self.fused_prefill)

    def _prefill_rows(
        self, kvs: Sequence[SessionKV], starts: Sequence[int], lengths: Sequence[int], ends: Sequence[int]
    ) -> dict[int | None, invariant.PrefillRows]:
        """A deterministic prefill's attention inputs, one per window: each chunk's start and length
        and its session's block table ``[n, W]``, ``W`` whole key tiles (padding: the scratch block)."""
        bt = self.pool.block_tokens
        width = _round_up(-(-max(ends) // bt), self._prefill_key_tokens // bt)
        tables = torch.full((len(kvs), width), SCRATCH_BLOCK, dtype=torch.long)
        for i, (kv, end) in enumerate(zip(kvs, ends)):
            used = -(-end // bt)
            tables[i, :used] = torch.tensor(kv.blocks[:used], dtype=torch.long)
        tables = tables.to(self.device, non_blocking=True)
        return {w: invariant.PrefillRows(self.pool, tuple(starts), tuple(lengths), tables, w, self._prefill_key_tokens)
                for w in set(self._windows)}

    def _varlen_rows(self, lengths: Sequence[int], ends: Sequence[int]) -> dict[int | None, VarlenRows]:
        """A prefill's ``VarlenRows``, one per window: chunk ``i`` has ``lengths[i]`` queries and its
        session ``ends[i]`` keys."""
        bounds = torch.tensor([[0, *lengths], [0, *ends]], dtype=torch.int32).cumsum(1, dtype=torch.int32)
        cu_q, cu_k = bounds.to(self.device, non_blocking=True)
        return {w: VarlenRows(cu_q, cu_k, max(lengths), max(ends), w) for w in set(self._windows)}

    def _layer_inputs(
        self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, masks: dict[int | None, Any]
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Token ids ``[B, T]`` embedded at ``positions`` (``Family.embed``), and every decoder
        layer's keyword arguments: the mask of its window (``masks``), the positions, the cache
        and, for rotary models, the rotary embedding computed once for all layers."""
        hidden, rope = self.family.embed(ids, positions)  # [B, T, E]
        by_window = {}
        for window, mask in masks.items():
            kwargs = {"attention_mask": mask, "position_ids": positions, CACHE_KEYWORD: cache, "use_cache": True}
            if rope is not None:
                kwargs["position_embeddings"] = rope
            by_window[window] = kwargs
        return hidden, [by_window[window] for window in self._windows]

    @torch.inference_mode()
    def prefill(self, kvs: Sequence[SessionKV], chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Append ``chunks[i]`` after ``kvs[i]``'s context for several sessions in one forward pass.

        The chunks are packed into one sequence; each token attends to its own session's context
        and to the chunk's earlier tokens only. Returns float32 logits ``[n, vocab]`` at each
        chunk's last token and commits every chunk. A short chunk costs what its kernel launches
        cost, so one pass for many is what keeps prefill from stalling the decode steps.
        """
        if len(kvs) != len(chunks) or not kvs or not all(chunks):
            raise ValueError("prefill needs one non-empty chunk per session")
        if len({id(kv) for kv in kvs}) != len(kvs):
            raise ValueError("a session may appear only once in a packed prefill")
        starts = [kv.length for kv in kvs]
        ends = [start + len(chunk) for start, chunk in zip(starts, chunks)]
        shape = self._prefill_shape(sum(map(len, chunks)), sum(ends), len(kvs))
        if shape is None and len(kvs) == 1:
            return self.begin(kvs[0], self.ids_tensor(chunks[0])).finish()[None]
        for kv, end in zip(kvs, ends):
            self.check_positions(end)
            kv.ensure_capacity(end)
        if shape is not None:
            return self._graphed_prefill(shape, kvs, chunks, starts, ends)
        device = self.device
        write = torch.cat([kv.slots(start, end) for kv, start, end in zip(kvs, starts, ends)])  # [sum T]
        read = torch.cat([kv.slots(0, end) for kv, end in zip(kvs, ends)])  # [sum (start + T)]
        n, total, keys = len(kvs), write.shape[0], read.shape[0]
        host = torch.tensor([t for chunk in chunks for t in chunk] + starts + [len(c) for c in chunks] + ends,
                            dtype=torch.long)
        ids, start, length, end = host.to(device, non_blocking=True).split([total, n, n, n])
        query_segment = torch.repeat_interleave(torch.arange(n, device=device), length, output_size=total)
        last = torch.cumsum(length, 0) - 1  # [n] each chunk's last token in the packed sequence
        query_rank = torch.arange(total, device=device) - (last + 1 - length)[query_segment]
        positions = (start[query_segment] + query_rank)[None]  # [1, sum T]
        masks: dict[int | None, Any] = {}
        if self.deterministic:  # its attention reads each session's blocks itself: no dense mask
            masks = self._prefill_rows(kvs, starts, [len(c) for c in chunks], ends)
        elif self.prefill_attention == "varlen":
            masks = self._varlen_rows([len(c) for c in chunks], ends)
        else:
            key_segment = torch.repeat_interleave(torch.arange(n, device=device), end, output_size=keys)
            key_position = torch.arange(keys, device=device) - (torch.cumsum(end, 0) - end)[key_segment]  # [keys]
            same = query_segment[:, None] == key_segment[None, :]  # [sum T, keys]
            causal = same & (key_position[None, :] <= positions[0, :, None])
            for window in set(self._windows):
                allowed = causal if window is None else causal & (positions[0, :, None] - key_position[None, :] < window)
                mask = allowed[None, None]  # [1, 1, sum T, keys]
                if self._additive_mask is not None:
                    mask = torch.zeros(mask.shape, dtype=self._additive_mask, device=device).masked_fill_(
                        ~mask, torch.finfo(self._additive_mask).min
                    )
                masks[window] = mask
        cache = _PackedCache(self.pool, write, read, gather=not self.deterministic)
        with self._mode():
            hidden, layer_kwargs = self._layer_inputs(ids[None], positions, cache, masks)  # [1, sum T, hidden]
            hidden = self._run_layers(hidden, layer_kwargs, fused=self.fused_prefill)
            logits = self.family.head(self.family.norm(hidden[:, last]))[0].float()  # [n, vocab]
        for kv, end in zip(kvs, ends):
            kv.length = end
        return logits

    def _prefill_shape(self, tokens: int, keys: int, chunks: int) -> tuple[int, int] | None:
        """The padded (tokens, keys) of a pass of ``chunks`` chunks, ``tokens`` in all, over
        ``keys`` keys, if it is one a graph is captured for; None: it runs eagerly as it is."""
        return self._padded_prefill(tokens, keys, chunks) if self.graphed_prefill else None

    @staticmethod
    def _padded_prefill(tokens: int, keys: int, chunks: int) -> tuple[int, int] | None:
        """The padded (tokens, keys) of such a pass (``PREFILL_GRAPH_TOKENS`` x ``PREFILL_GRAPH_KEYS``);
        None: no padded shape holds it. The padding chunk needs a key of its own wherever it has queries."""
        if chunks > PREFILL_GRAPH_CHUNKS:
            return None
        padded = next((t for t in PREFILL_GRAPH_TOKENS if t >= tokens), None)
        if padded is None:
            return None
        needed = keys + (padded > tokens)
        gathered = next((k for k in PREFILL_GRAPH_KEYS if k >= max(needed, padded)), None)
        return None if gathered is None else (padded, gathered)

    def _fill_prefill(
        self, inputs: _PrefillInputs, kvs: Sequence[SessionKV], chunks: Sequence[Sequence[int]],
        starts: Sequence[int], ends: Sequence[int],
    ) -> None:
        """Write a pass's chunks into padded ``inputs``: one host-to-device copy for the tokens,
        positions and bounds, and the slots gathered from each session's (device) slot table."""
        n, bt = len(kvs), self.pool.block_tokens
        lengths = [len(chunk) for chunk in chunks]
        total, keys, unused = sum(lengths), sum(ends), PREFILL_GRAPH_CHUNKS - n
        padding = [0] * (inputs.tokens - total)
        cu_q = list(itertools.accumulate([0, *lengths, len(padding)] + [0] * unused))
        cu_k = list(itertools.accumulate([0, *ends, inputs.keys - keys] + [0] * unused))
        last = [bound - 1 for bound in cu_q[1 : n + 1]] + [0] * unused
        positions = [p for start, end in zip(starts, ends) for p in range(start, end)]
        host = torch.tensor([t for chunk in chunks for t in chunk] + padding + positions + padding + cu_q + cu_k + last,
                            dtype=torch.long)
        ids, positions_, cu_q_, cu_k_, last_ = host.to(self.device, non_blocking=True).split(
            [inputs.tokens, inputs.tokens, len(cu_q), len(cu_k), len(last)])
        inputs.ids.copy_(ids)
        inputs.positions.copy_(positions_)
        inputs.cu_q.copy_(cu_q_)
        inputs.cu_k.copy_(cu_k_)
        inputs.last.copy_(last_)
        inputs.write[:total].copy_(torch.cat([kv.slots(s, e) for kv, s, e in zip(kvs, starts, ends)]))
        inputs.write[total:].fill_(SCRATCH_BLOCK * bt)
        inputs.read[:keys].copy_(torch.cat([kv.slots(0, e) for kv, e in zip(kvs, ends)]))
        inputs.read[keys:].fill_(SCRATCH_BLOCK * bt)

    def _prefill_layer_inputs(self, inputs: _PrefillInputs, cache: Any) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """A padded pass's embedded tokens ``[1, tokens, E]`` and its layers' keyword arguments."""
        rows = {w: VarlenRows(inputs.cu_q, inputs.cu_k, inputs.tokens, inputs.keys, w) for w in set(self._windows)}
        return self._layer_inputs(inputs.ids[None], inputs.positions[None], cache, rows)

    def _prefill_head(self, hidden: torch.Tensor, inputs: _PrefillInputs) -> torch.Tensor:
        """Final norm and head at each chunk's last token of a padded pass: float32 ``[chunks, vocab]``."""
        return self.family.head(self.family.norm(hidden[:, inputs.last]))[0].float()

    def _prefill_forward(self, inputs: _PrefillInputs) -> torch.Tensor:
        """A padded prefill pass, eager (or being captured): float32 logits ``[chunks, vocab]``."""
        hidden, layer_kwargs = self._prefill_layer_inputs(inputs, _PackedCache(self.pool, inputs.write, inputs.read))
        return self._prefill_head(self._run_layers(hidden, layer_kwargs, fused=self.fused_prefill), inputs)

    def _graphed_prefill(
        self, shape: tuple[int, int], kvs: Sequence[SessionKV], chunks: Sequence[Sequence[int]],
        starts: Sequence[int], ends: Sequence[int],
    ) -> torch.Tensor:
        """``prefill`` of a pass padded to ``shape``: replayed from its graph once captured, else
        run eagerly over the same padded inputs (the same kernels, so the same bits)."""
        inputs = self._prefill_graph(*shape)
        if inputs is None:
            inputs = _PrefillInputs.empty(*shape, self.pool.block_tokens, self.device)
        self._fill_prefill(inputs, kvs, chunks, starts, ends)
        if inputs.graph is not None:
            inputs.graph.replay()
            logits = inputs.logits[: len(kvs)].clone()  # the graph's buffer is overwritten by its next replay
        else:
            logits = self._prefill_forward(inputs)[: len(kvs)]
        for kv, end in zip(kvs, ends):
            kv.length = end
        return logits

    def _prefill_graph(self, tokens: int, keys: int, capture_now: bool = False) -> _PrefillInputs | None:
        """The captured prefill pass of this padded shape; None: run this one eagerly (all are kept)."""
        return self._cached_graph(
            self._prefill_graphs, self._prefill_uses, (tokens, keys), self._prefill_forward,
            lambda: _PrefillInputs.empty(tokens, keys, self.pool.block_tokens, self.device), capture_now, limit=None)

    def _cached_graph(
        self, graphs: dict[Any, Any], uses: dict[Any, int], key: Any, forward: Callable[[Any], torch.Tensor],
        make: Callable[[], Any], capture_now: bool = False, limit: int | None = MAX_GRAPHS,
    ) -> Any:
        """The captured pass of ``key`` in ``graphs`` (most recently used last, at most ``limit``),
        captured from ``forward(make())`` the second time its key is used, or at once with
        ``capture_now``; None: run this one eagerly."""
        self._check_graph_generation()
        inputs = graphs.pop(key, None)
        if inputs is None:
            uses[key] = count = uses.get(key, 0) + 1
            if count < CAPTURE_AFTER_USES and not capture_now:
                return None
            if limit is not None and len(graphs) >= limit:
                graphs.pop(next(iter(graphs)))
            inputs = self._capture_graph(make(), forward)
            self.captures += 1
        graphs[key] = inputs
        return inputs

    def _run_layers(
        self, hidden: torch.Tensor, layer_kwargs: list[dict[str, Any]], first: int = 0, stop: int | None = None,
        fused: bool = False,
    ) -> torch.Tensor:
        """Decoder layers ``[first, stop)`` (all by default) over ``hidden``, the streamer (if any)
        moving weights around them: its pass begins at layer 0 and ends after the last layer.
        ``fused``: a prefill pass through the fused prefill layer (``_fused_parts``)."""
        stop = self.num_layers if stop is None else stop
        streamer = self.streamer
        if streamer is not None and first == 0 < stop:
            streamer.begin_pass()
        with sdpa_kernel(SDPA_BACKENDS):
            for i in range(first, stop):
                if streamer is not None:
                    streamer.before_layer(i)
                if fused:
                    hidden = _rest_of(self._fused_parts(i, hidden, layer_kwargs[i]))
                else:
                    hidden = self.layers[i](hidden, **layer_kwargs[i])
                if streamer is not None:
                    streamer.after_layer(i)
        if streamer is not None and first < stop == self.num_layers:
            streamer.end_pass()
        return hidden

    def inside_layer_refusal(self, decode: bool = True) -> str | None:
        """Why a pass (``decode``: also a decode step) cannot pause inside a layer; None: it can.
        Not for a family without ``layer_parts``, nor with a streamer that moves weights (a
        streamed layer's weights are not held while its pass is paused and other passes run), nor
        in a decode step through the fused decode layer (its kernels are not the layer's parts)."""
        if self.family.layer_parts is None:
            return f"the {self.family.name} family cannot pause inside a layer"
        if self.streamer is not None and self.streamer.streams_weights:
            return "a pass can pause inside a layer only with weights that stay on the device"
        if decode and self.fused_decode:
            return ("a decode step through the fused decode layer cannot pause inside a layer; "
                    "serve with [server] fused_decode = false or deterministic = true")
        return None

    def layer_parts(self, index: int, hidden: torch.Tensor, kwargs: dict[str, Any], fused: bool = False) -> LayerParts:
        """Decoder layer ``index`` over ``hidden`` in its family's parts (``Family.layer_parts``;
        ``fused``: the fused prefill layer's, ``_fused_parts``), with the streamer's calls of
        ``_run_layers`` around it; ``BreakpointError`` where ``inside_layer_refusal`` says no."""
        refusal = self.inside_layer_refusal(decode=False)
        if refusal is not None:
            raise BreakpointError(refusal)
        if fused:
            return self._parts_in_pass(index, self._fused_parts(index, hidden, kwargs))
        return self._parts_in_pass(index, self.family.layer_parts(self.layers[index], hidden, kwargs))

    def _fused_parts(self, index: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> LayerParts:
        """Decoder layer ``index`` of a prefill pass as the fused prefill layer
        (``Family.prefill_parts``), from the keyword arguments its own layer would take."""
        return self.family.prefill_parts(
            self.layers[index], hidden, kwargs["position_embeddings"], kwargs[CACHE_KEYWORD],
            kwargs["attention_mask"], runner_attention, **self._prefill_stretches,
        )

    def _parts_in_pass(self, index: int, parts: LayerParts) -> LayerParts:
        streamer = self.streamer
        if streamer is not None:
            if index == 0:
                streamer.begin_pass()
            streamer.before_layer(index)
        out = yield from parts
        if streamer is not None:
            streamer.after_layer(index)
            if index == self.num_layers - 1:
                streamer.end_pass()
        return out

    @torch.inference_mode()
    def last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head on the last position of ``hidden`` ``[1, T, hidden]``: float32 ``[vocab]``."""
        last = hidden[:, -1:]  # [1, 1, hidden]
        return self.family.head(self.family.norm(last))[0, -1].float()  # [vocab]

    @torch.inference_mode()
    def decode(self, kvs: Sequence[SessionKV], tokens: Sequence[int]) -> torch.Tensor:
        """One decode step for many sessions: feed ``tokens[b]`` after ``kvs[b]``'s context.

        Returns float32 logits ``[B, vocab]`` and commits one token to each session. The sessions
        must be distinct, resident and hold room for the new token.
        """
        if len(kvs) != len(tokens) or not kvs:
            raise ValueError(f"decode needs one token per session, got {len(kvs)} and {len(tokens)}")
        if len({id(kv) for kv in kvs}) != len(kvs):
            raise ValueError("a session may appear only once in a decode step")
        self.check_positions(max(kv.length for kv in kvs) + 1)
        for kv in kvs:
            kv.ensure_capacity(kv.length + 1)
        rows = len(kvs)
        span = self._decode_span(max(kv.length for kv in kvs) + 1)
        inputs = self._graph_inputs(batch_bucket(rows), span) if self.cuda_graphs else None
        if inputs is None:
            inputs = self._step_inputs(rows, span)
        inputs.pack(kvs, tokens)
        if inputs.graph is not None:
            inputs.graph.replay()
            logits = inputs.logits
        else:
            logits = self._decode_forward(inputs)
        for kv in kvs:
            kv.length += 1
        return logits[:rows]

    def _decode_span(self, tokens: int) -> int:
        """The pool slots a decode step beginning now attends over (its keys' length), for rows of
        at most ``tokens`` tokens. A deterministic step's block tables span whole key tiles."""
        pool_slots = self.pool.tensor.shape[2]
        if self.decode_attention == "invariant":
            return _round_up(slot_bucket(tokens), self._decode_key_tokens)
        if self.decode_attention == "paged":
            return pool_slots  # rows read their own blocks only; one shape for the compiled kernel
        bt = self.pool.block_tokens
        return min(_round_up(slot_bucket(self.pool.high_water_slots()), bt), pool_slots)

    @torch.inference_mode()
    def warm_up(
        self, max_batch: int, prefill_tokens: int = 0, report: Callable[[str], None] | None = None,
        mixed_tokens: int = 0,
    ) -> None:
        """Pay every first-use cost now, before any request waits for it: prefill passes of each
        size up to ``prefill_tokens`` (``warm_up_prefill``), then, for paged decode on CUDA, the
        compile of the attention kernel and the capture of the decode graph of every batch bucket
        up to ``max_batch``, with all-padding steps that touch only the scratch block (a compile
        or a capture takes seconds on a 7B model); with ``mixed_steps``, a mixed pass of every
        batch bucket, and the capture of those with ``mixed_tokens`` prompt tokens (the prefill
        budget of a step that decodes: the shape of every step while prompts queue).
        ``report(text)`` hears each stage."""
        if self.device.type != "cuda":
            return
        report = report or (lambda _text: None)
        if prefill_tokens:
            report(f"warm-up: prefill passes up to {prefill_tokens} tokens")
            self.warm_up_prefill(prefill_tokens)
            if self.graphed_prefill:
                report("warm-up: short prefill passes (capture)")
                self.capture_prefill(prefill_tokens)
        if self.decode_attention != "paged":
            return
        span = self.pool.tensor.shape[2]
        for batch in BATCH_BUCKETS:
            if batch > batch_bucket(max_batch):
                break
            report(f"warm-up: decode step of {batch} rows (compile and capture)")
            if self.cuda_graphs and batch <= self.graph_max_batch:
                self._graph_inputs(batch, span, capture_now=True)  # runs the step once (compiling it), then captures it
            else:
                self._decode_forward(self._step_inputs(batch, span))
        if self.mixed_steps:
            self._warm_up_mixed(max_batch, mixed_tokens, report)
        torch.cuda.synchronize(self.device)

    def _warm_up_mixed(self, max_batch: int, tokens: int, report: Callable[[str], None]) -> None:
        """``warm_up``'s mixed passes: the smallest padded pass of every batch bucket up to
        ``max_batch`` (compiling the rows' attention kernel for it), then, with graphs, the
        capture of every key count with ``tokens`` prompt tokens, for every bucket."""
        padded = self._padded_prefill(tokens, tokens, 1) if tokens else None
        slots = self.pool.tensor.shape[2]
        for batch in BATCH_BUCKETS:
            if batch > min(batch_bucket(max_batch), self.graph_max_batch):
                break
            report(f"warm-up: mixed passes with {batch} decode rows")
            self._mixed_forward(self._mixed_inputs(PREFILL_GRAPH_TOKENS[0], PREFILL_GRAPH_KEYS[0], batch))
            if padded is not None and self.cuda_graphs:
                for keys in PREFILL_GRAPH_KEYS:
                    if padded[0] <= keys <= slots:
                        self._capture_mixed(padded[0], keys, batch)

    @torch.inference_mode()
    def warm_up_prefill(self, max_tokens: int) -> int:
        """Run prefill passes of every power-of-two size up to ``max_tokens`` on throwaway KV: a
        session's first chunk, a chunk after a context, and two sessions packed into one pass.
        Returns the passes run.

        The first pass of a new size loads GPU kernels (CUDA loads modules lazily, GEMM and
        attention pick kernels by shape); cold, that took over a second, stalling every session.
        Sizes that do not fit the free pool blocks or the model's positions are skipped. With the
        fused prefill layer a one-token pass runs too: its compiled stretches specialise on it.
        """
        bt = self.pool.block_tokens
        ragged = bt // 2 + 1  # a context that ends mid-block, as most do
        sizes = sorted({min(1 << k, max_tokens) for k in range(4, max(4, max_tokens.bit_length()) + 1)})
        passes = 0
        if self.fused_prefill and self.pool.free_blocks:  # a one-token pass is a compile of its own
            # unpadded, as a one-token chunk past the captured shapes' keys runs
            kv, graphed, self.graphed_prefill = self.new_kv(), self.graphed_prefill, False
            try:
                self.prefill([kv], [[0]])
                passes += 1
            finally:
                self.graphed_prefill = graphed
                kv.release()
        for tokens in sizes:
            half = max(1, tokens // 2)
            longest = ragged + 2 * tokens - half
            if self.max_positions is not None and longest > self.max_positions:
                continue
            if self.pool.free_blocks < _round_up(tokens + half, bt) // bt + _round_up(longest, bt) // bt:
                continue
            ids = [i % self.vocab_size for i in range(max(tokens, ragged))]
            first, second = self.new_kv(), self.new_kv()
            try:
                self.prefill([first], [ids[:tokens]])
                self.prefill([second], [ids[:ragged]])
                self.prefill([second], [ids[:tokens]])
                self.prefill([first, second], [ids[:half], ids[: tokens - half]])
                passes += 4
            finally:
                first.release()
                second.release()
        return passes

    @torch.inference_mode()
    def capture_prefill(self, max_tokens: int) -> int:
        """Capture the padded prefill pass of every shape a pass of at most ``max_tokens`` tokens
        can take (``PREFILL_GRAPH_TOKENS`` x ``PREFILL_GRAPH_KEYS``, keys no more than the pool
        holds); returns the shapes captured. Each runs once on all-padding inputs first."""
        slots = self.pool.tensor.shape[2]
        top = next((t for t in PREFILL_GRAPH_TOKENS if t >= max_tokens), PREFILL_GRAPH_TOKENS[-1])
        shapes = [(t, k) for t in PREFILL_GRAPH_TOKENS if t <= top for k in PREFILL_GRAPH_KEYS if t <= k <= slots]
        for tokens, keys in shapes:
            self._prefill_graph(tokens, keys, capture_now=True)
        return len(shapes)

    def _step_inputs(self, batch: int, span: int) -> _StepInputs:
        """Fresh all-padding inputs of a decode step of ``batch`` rows over ``span`` slots."""
        return _StepInputs.empty(batch, span, self.pool.block_tokens, self.device, self.pool.num_blocks)

    def _graph_inputs(self, batch: int, span: int, capture_now: bool = False) -> _StepInputs | None:
        """The captured step for this padded batch size and slot span; None: run this one eagerly."""
        if batch > self.graph_max_batch:
            return None
        return self._cached_graph(self._graphs, self._uses, (batch, span), self._decode_forward,
                                  lambda: self._step_inputs(batch, span), capture_now)

    def _check_graph_generation(self) -> None:
        """Drop every captured graph if the pool has moved since they were captured."""
        if self._graph_generation != self.pool.generation:
            self._graphs.clear()  # the pool moved: graphs hold its old address
            self._prefill_graphs.clear()
            self._mixed_graphs.clear()
            # with its last graph gone the private memory pool is freed; a stale handle must
            # not be captured into again
            self._graph_pool = None
            self._graph_generation = self.pool.generation

    def _capture_graph(self, inputs: Any, forward: Callable[[Any], torch.Tensor]) -> Any:
        """Capture ``forward(inputs)`` (a decode step or a padded prefill pass) into a graph in the
        runner's graph memory pool: ``inputs.graph`` replays it into ``inputs.logits``."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward(inputs)  # warm-up: lazy initialisation must not be captured
        torch.cuda.current_stream().wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread-local: a KV move another thread runs meanwhile (its own stream) is no error of the capture
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            inputs.logits = forward(inputs)
        inputs.graph = graph
        return inputs

    def _decode_forward(self, inputs: _StepInputs) -> torch.Tensor:
        """The decode step itself, eager (or being captured): float32 logits ``[B, vocab]``."""
        with self._mode():
            step = self._decode_pass(inputs)
            return self._decode_head(self._decode_layers(step, step.hidden))

    def _decode_pass(self, inputs: _StepInputs) -> _DecodePass:
        """A decode step's masks (one per window) and embedded tokens, from its ``inputs``
        (expanded here from what the host packed)."""
        inputs.expand(maps=self.decode_attention != "invariant")  # it reads the block tables only
        batch, span = inputs.ids.shape[0], inputs.blocks.shape[1] * self.pool.block_tokens
        positions = inputs.positions[:, None]  # [B, 1]
        if self.decode_attention == "masked":
            bt = self.pool.block_tokens
            slot = torch.arange(span, device=self.device)
            slot_position = (inputs.block_rank[slot // bt] * bt + slot % bt)[None, :]  # [1, S]
            own = inputs.block_owner[slot // bt][None, :] == torch.arange(batch, device=self.device)[:, None]
            own &= slot_position <= positions  # [B, S]
            own |= inputs.pad[:, None] & (slot // bt == SCRATCH_BLOCK)[None, :]
        group = self.family.query_group
        masks: dict[int | None, Any] = {}
        for window in set(self._windows):
            if self.decode_attention == "invariant":
                mask = invariant.DecodeRows(self.pool, inputs.positions, inputs.blocks, window, self._decode_key_tokens)
            elif self.decode_attention == "paged":
                mask = self._paged_block_mask(inputs, span, window)
            else:
                allowed = own if window is None else own & (positions - slot_position < window)
                mask = _SharedKeysMask(allowed.repeat(group, 1)[None, None])  # [1, 1, g*B, S]
            masks[window] = mask
        if self.fused_decode:
            hidden, rope = self.family.embed(inputs.ids[:, None], positions)  # [B, 1, E]; [B, 1, D] each
            return _DecodePass(inputs, span, hidden, masks, rope=rope)
        cache = _BatchCache(self.pool, inputs.write, span)
        hidden, layer_kwargs = self._layer_inputs(inputs.ids[:, None], positions, cache, masks)  # [B, 1, E]
        return _DecodePass(inputs, span, hidden, masks, layer_kwargs=layer_kwargs)

    def _paged_block_mask(self, inputs: _StepInputs, span: int, window: int | None) -> BlockMask:
        """A paged decode step's ``BlockMask`` over ``span`` slots: each row's block list is its
        session's block table (``_paged_mask_mod`` within the blocks)."""
        return BlockMask.from_kv_blocks(
            inputs.block_count[:, None, None], inputs.blocks[:, None, None, :],
            BLOCK_SIZE=(_FLEX_QUERY_BLOCK, self.pool.block_tokens),
            mask_mod=_paged_mask_mod(inputs, window), seq_lengths=(1, span), **_NO_Q_BLOCKS,
        )

    def _decode_layers(
        self, step: _DecodePass, hidden: torch.Tensor, first: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Decoder layers ``[first, stop)`` (all by default) of a decode step over ``hidden``
        ``[B, 1, E]``: the one per-layer loop of the captured step and of ``DecodeCursor``."""
        stop = self.num_layers if stop is None else stop
        if step.layer_kwargs is not None:
            return self._run_layers(hidden, step.layer_kwargs, first, stop)
        cos, sin = step.rope
        # looked up here, not when the step began: a paused step's pool may have grown (CPU).
        # Sliced to the step's span, which for a step just begun is the whole pool (same view)
        pool = self.pool.tensor  # [L, 2, S, H_kv, D]
        span = step.span
        for i in range(first, stop):
            hidden = self._decode_layer(
                self.layers[i], hidden, cos, sin, pool[i, 0, :span], pool[i, 1, :span], step.inputs.write,
                step.masks[self._windows[i]], kernel_options=self.decode_flex_options,
            )
        return hidden

    def _decode_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head of a decode step: float32 logits ``[B, vocab]``."""
        return self.family.head(self.family.norm(hidden))[:, -1].float()

    @torch.inference_mode()
    def mixed_step(
        self, kvs: Sequence[SessionKV], chunks: Sequence[Sequence[int]], decode_kvs: Sequence[SessionKV],
        tokens: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``prefill(kvs, chunks)`` and ``decode(decode_kvs, tokens)`` as one forward pass: the
        layers' matrices multiply the chunks' tokens and the decode rows together, so a step reads
        the weights once, and each part attends as its own pass would (``MixedRows``).

        Returns float32 logits ``[n, vocab]`` at each chunk's last token and ``[B, vocab]`` of the
        rows, and commits both; None (nothing computed) where ``mixed_steps`` is off or the step has no
        padded shape (``_padded_prefill``; rows past ``graph_max_batch``) or, with CUDA graphs, none
        that ``warm_up`` captured (``mixed_tokens``: the budget of a step while prompts queue): run
        the two apart.
        """
        if not self.mixed_steps or not kvs or not decode_kvs:
            return None
        if len(kvs) != len(chunks) or not all(chunks) or len(decode_kvs) != len(tokens):
            raise ValueError("a mixed step needs one non-empty chunk per prefilled session and one token per decoded one")
        if len({id(kv) for kv in (*kvs, *decode_kvs)}) != len(kvs) + len(decode_kvs):
            raise ValueError("a session may appear only once in a mixed step")
        starts = [kv.length for kv in kvs]
        ends = [start + len(chunk) for start, chunk in zip(starts, chunks)]
        shape = self._padded_prefill(sum(map(len, chunks)), sum(ends), len(kvs))
        rows = batch_bucket(len(decode_kvs))
        if shape is None or rows > self.graph_max_batch:
            return None
        captured = None
        if self.cuda_graphs:  # only the shapes warm-up captured: a capture while serving stalls every session
            self._check_graph_generation()
            captured = self._mixed_graphs.get((*shape, rows))
            if captured is None:
                return None
        self.check_positions(max([*ends, *(kv.length + 1 for kv in decode_kvs)]))
        generation = self.pool.generation
        for kv, end in zip([*kvs, *decode_kvs], [*ends, *(kv.length + 1 for kv in decode_kvs)]):
            kv.ensure_capacity(end)
        if captured is not None and self.pool.generation != generation:
            return None  # the pool grew and moved: the graph reads its old address
        # eager inputs are built after the growth: a step's inputs hold the pool's blocks of now
        inputs = captured if captured is not None else self._mixed_inputs(*shape, rows)
        self._fill_prefill(inputs.prefill, kvs, chunks, starts, ends)
        inputs.decode.pack(decode_kvs, tokens)
        if inputs.graph is not None:
            inputs.graph.replay()
            logits = inputs.logits
        else:
            logits = self._mixed_forward(inputs)
        # clones: a graph's buffer is overwritten by its next replay
        prefill = logits[: len(kvs)].clone()
        decode = logits[PREFILL_GRAPH_CHUNKS : PREFILL_GRAPH_CHUNKS + len(decode_kvs)].clone()
        for kv, end in zip(kvs, ends):
            kv.length = end
        for kv in decode_kvs:
            kv.length += 1
        return prefill, decode

    def _mixed_inputs(self, tokens: int, keys: int, rows: int) -> _MixedInputs:
        """Fresh all-padding inputs of a mixed pass."""
        return _MixedInputs(_PrefillInputs.empty(tokens, keys, self.pool.block_tokens, self.device),
                            self._step_inputs(rows, self.pool.tensor.shape[2]))

    def _capture_mixed(self, tokens: int, keys: int, rows: int) -> None:
        """Capture the mixed pass of this padded shape (``warm_up``; all are kept)."""
        self._check_graph_generation()
        if (tokens, keys, rows) not in self._mixed_graphs:
            self._mixed_graphs[tokens, keys, rows] = self._capture_graph(
                self._mixed_inputs(tokens, keys, rows), self._mixed_forward)
            self.captures += 1

    def _mixed_forward(self, inputs: _MixedInputs) -> torch.Tensor:
        """A mixed pass over padded ``inputs``, eager (or being captured): float32 logits
        ``[PREFILL_GRAPH_CHUNKS + B, vocab]``, the chunks' then the decode rows'."""
        prefill, step = inputs.prefill, inputs.decode
        step.expand()
        rows, span = step.ids.shape[0], self.pool.tensor.shape[2]
        masks: dict[int | None, Any] = {
            w: MixedRows(VarlenRows(prefill.cu_q, prefill.cu_k, prefill.tokens, prefill.keys, w), prefill.tokens,
                         self._paged_block_mask(step, span, w), self.pool, self.decode_flex_options)
            for w in set(self._windows)
        }
        # every new key, the rows' too, is stored at its slot; the chunks' sessions' keys are gathered
        cache = _PackedCache(self.pool, torch.cat([prefill.write, step.write]), prefill.read)
        ids, positions = torch.cat([prefill.ids, step.ids])[None], torch.cat([prefill.positions, step.positions])[None]
        hidden, layer_kwargs = self._layer_inputs(ids, positions, cache, masks)  # [1, T + B, E]
        hidden = self._run_layers(hidden, layer_kwargs, fused=True)
        last = torch.cat([prefill.last, prefill.tokens + torch.arange(rows, device=self.device)])  # [chunks + B]
        return self.family.head(self.family.norm(hidden[:, last]))[0].float()

    @torch.inference_mode()
    def begin_decode(self, kv: SessionKV, token: int) -> DecodeCursor:
        """Start one decode step of ``token`` after ``kv``'s context, as a pass that may pause.

        It computes what ``decode([kv], [token])`` computes, the same function of the same inputs
        (a step of batch bucket 1 over the same slot span, the same masks, the same per-layer
        function and head), but eagerly (never a graph replay) and layer by layer. On CUDA a
        graph's replay and an eager run of its kernels give the same bits, so an unedited cursor's
        logits equal the plain step's. Nothing is committed to ``kv.length`` until ``finish()``.
        """
        self.check_positions(kv.length + 1)
        kv.ensure_capacity(kv.length + 1)
        inputs = self._step_inputs(batch_bucket(1), self._decode_span(kv.length + 1))
        inputs.pack([kv], [token])
        return DecodeCursor(self, kv, self._decode_pass(inputs))


@attrs.define(eq=False)
class _DecodePass:
    """A decode step under way: its inputs, slot span, masks (by window) and embedded tokens
    ``hidden`` ``[B, 1, E]``, with what its layers take: the rotary ``(cos, sin)`` of the fused
    layer, or the model's own layers' keyword arguments (their cache included)."""

    inputs: _StepInputs
    span: int
    hidden: torch.Tensor
    masks: dict[int | None, Any]
    rope: Any = None
    layer_kwargs: list[dict[str, Any]] | None = None


class ForwardCursor:
    """One forward pass in progress: ``layer`` is the next layer to run, ``hidden`` the residual
    stream ``[1, T, hidden]`` after the layers run so far.

    A breakpoint at layer ``L`` is ``run(until=L + 1)``: ``hidden`` is then layer ``L``'s output.
    A breakpoint inside layer ``L`` is ``run_to(L, site)`` (``site`` one of ``LAYER_SITES``): the
    layer runs in its family's parts (``Family.layer_parts``) and ``hidden`` is then that block's
    output, before it is added to the residual stream. Replace ``hidden`` by assignment, or edit
    it in place under ``torch.inference_mode()`` (it is an inference tensor), before ``run()``,
    ``run_to()`` or ``finish()`` continue.
    """

    def __init__(
        self,
        runner: ModelRunner,
        kv: SessionKV,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        layer_kwargs: list[dict[str, Any]],
        fused: bool = False,
    ) -> None:
        self.runner = runner
        self.kv = kv
        self.start = kv.length
        self.positions = positions  # [1, T]
        self.layer = 0
        self.num_layers = runner.num_layers
        self.finished = False
        #: where inside layer ``layer`` the pass stands (one of ``LAYER_SITES``), None between layers
        self.site: str | None = None
        self._hidden = hidden  # [1, T, hidden]
        self._layer_kwargs = layer_kwargs
        self._fused = fused  # a prefill pass through the fused prefill layer
        self._tokens: int | None = None  # of a padded pass, the tokens that are the chunk's
        self._parts: LayerParts | None = None  # layer ``layer`` under way, paused at ``site``
        self._part: torch.Tensor | None = None  # the output at ``site``

    @property
    def hidden(self) -> torch.Tensor:
        """The residual stream ``[1, T, hidden]`` after layer ``layer - 1``, or inside layer
        ``layer`` the output at ``site``."""
        current = self._hidden if self.site is None else self._part
        return current if self._tokens is None else current[:, : self._tokens]

    @hidden.setter
    def hidden(self, value: torch.Tensor) -> None:
        current = self.hidden
        if tuple(value.shape) != tuple(current.shape):
            raise BreakpointError(
                f"an edited activation must keep the shape {list(current.shape)}, not {list(value.shape)}"
            )
        value = value.to(device=current.device, dtype=current.dtype)
        if self.site is None and self._tokens is None:
            self._hidden = value
        else:  # the layer's parts (or the padded pass) hold this tensor: it is written in place
            with torch.inference_mode():
                current.copy_(value)

    @torch.inference_mode()
    def run(self, until: int | None = None) -> None:
        """Run layers ``[layer, until)`` (to the last layer when ``until`` is None), the rest of a
        layer paused inside first."""
        stop = self.num_layers if until is None else until
        if self.finished or not self.layer + (self.site is not None) <= stop <= self.num_layers:
            raise BreakpointError(
                f"cannot run to layer {stop}: the pass is at layer {self.layer}"
                f"{f' ({self.site})' if self.site else ''} of {self.num_layers}{' and finished' if self.finished else ''}"
            )
        with self.runner._mode():
            if self._parts is not None:
                with sdpa_kernel(SDPA_BACKENDS):  # as _run_layers runs whole layers
                    self._hidden = _rest_of(self._parts)
                self._parts, self._part, self.site = None, None, None
                self.layer += 1
            self._hidden = self._layers(self._hidden, self.layer, stop)
        self.layer = stop

    @torch.inference_mode()
    def run_to(self, layer: int, site: str) -> None:
        """Run to ``site`` (one of ``LAYER_SITES``) inside layer ``layer``: the layers before it
        whole, then that layer in parts. ``BreakpointError`` where a pass cannot pause inside a
        layer (see ``ModelRunner.layer_parts``) or is already past the point."""
        if site not in LAYER_SITES:
            raise BreakpointError(f"a pause inside a layer is at one of {', '.join(LAYER_SITES)}, not {site!r}")
        inside = self.site is not None
        if layer < self.layer or inside and (self.layer, LAYER_SITES.index(self.site)) >= (layer, LAYER_SITES.index(site)):
            raise BreakpointError(f"the pass is past {site} of layer {layer}")
        if not inside or self.layer != layer:
            self.run(layer)
            self._parts = self._start_parts(layer, self._hidden)
        with self.runner._mode(), sdpa_kernel(SDPA_BACKENDS):
            while self.site != site:
                self.site, self._part = next(self._parts)

    def _start_parts(self, index: int, hidden: torch.Tensor) -> LayerParts:
        return self.runner.layer_parts(index, hidden, self._layer_kwargs[index], fused=self._fused)

    def _layers(self, hidden: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        return self.runner._run_layers(hidden, self._layer_kwargs, first, stop, fused=self._fused)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.runner.last_logits(hidden)

    @torch.inference_mode()
    def finish(self) -> torch.Tensor:
        """Run the remaining layers, then norm + head on the last position; return float32 logits
        ``[vocab]`` and commit the chunk (``kv.length += T``)."""
        if self.finished:
            raise BreakpointError("this forward pass has already finished")
        if self.layer < self.num_layers:
            self.run()
        if self.kv.length != self.start:
            raise RuntimeError(
                f"the KV went from {self.start} to {self.kv.length} tokens during this forward pass"
            )
        with self.runner._mode():
            logits = self._logits(self._hidden)
        self.kv.length = self.start + self.positions.shape[1]
        self.finished = True
        return logits


class PrefillCursor(ForwardCursor):
    """A one-session prefill pass in progress over a padded pass shape (``ModelRunner.begin`` of
    a chunk that ``prefill`` would replay from a captured graph): the API of ``ForwardCursor``,
    ``hidden`` ``[1, T, hidden]`` being the chunk's rows of the padded pass's, which runs the
    captured pass's computation eagerly (the same kernels on the same shapes, so an unedited
    cursor's logits equal ``prefill([kv], [chunk])``'s)."""

    def __init__(self, runner: ModelRunner, kv: SessionKV, inputs: _PrefillInputs, tokens: int,
                 hidden: torch.Tensor, layer_kwargs: list[dict[str, Any]]) -> None:
        super().__init__(runner, kv, hidden, inputs.positions[None, :tokens], layer_kwargs, fused=runner.fused_prefill)
        self._inputs = inputs
        self._tokens = tokens

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.runner._prefill_head(hidden, self._inputs)[0]  # [vocab]


class DecodeCursor(ForwardCursor):
    """One decode step of one session in progress (``ModelRunner.begin_decode``): the API of
    ``ForwardCursor``, with ``hidden`` ``[1, 1, hidden]``, over the batched decode step's own
    computation: its layers run through ``ModelRunner._decode_layers`` and its logits through
    the step's head, so an unedited cursor is the step ``decode([kv], [token])`` would run.
    """

    def __init__(self, runner: ModelRunner, kv: SessionKV, step: _DecodePass) -> None:
        super().__init__(runner, kv, step.hidden, step.inputs.positions[:1, None], [])
        self._step = step

    def _layers(self, hidden: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        return self.runner._decode_layers(self._step, hidden, first, stop)

    def _start_parts(self, index: int, hidden: torch.Tensor) -> LayerParts:
        if self._step.layer_kwargs is None:
            raise BreakpointError(self.runner.inside_layer_refusal())
        return self.runner.layer_parts(index, hidden, self._step.layer_kwargs[index])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.runner._decode_head(hidden)[0]  # [vocab]


def _rest_of(parts: LayerParts) -> torch.Tensor:
    """Run a layer's parts to the end: the layer's output."""
    try:
        while True:
            next(parts)
    except StopIteration as done:
        return done.value


def _generate(
    runner: ModelRunner,
    kv: SessionKV,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], int],
) -> list[int]:
    tokens: list[int] = []
    if max_new_tokens <= 0:
        return tokens
    logits = runner.begin(kv, input_ids).finish()
    while True:
        tokens.append(pick(logits))
        if len(tokens) == max_new_tokens:
            return tokens
        logits = runner.begin(kv, runner.ids_tensor(tokens[-1:])).finish()


def greedy_generate(
    runner: ModelRunner, kv: SessionKV, input_ids: torch.Tensor, max_new_tokens: int
) -> list[int]:
    """Prefill ``input_ids`` ``[1, T]`` after ``kv``'s context and decode greedily.

    The last returned token is not yet in ``kv`` (feed it with the next call).
    """
    return _generate(runner, kv, input_ids, max_new_tokens, runner.token_picker())


def sample_generate(
    runner: ModelRunner,
    kv: SessionKV,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Like ``greedy_generate`` but sampling with ``temperature`` and ``top_k``, seeded."""
    picker = runner.token_picker(temperature, top_k, seed)
    return _generate(runner, kv, input_ids, max_new_tokens, picker)
