"""Batch-invariant execution: each token's values depend on its own inputs only.

A GPU kernel picks its tiling and reduction order by shape (cuBLAS picks a GEMM kernel, possibly
split-K, by ``M``; PyTorch's reductions split a row over more threads when there are few rows),
so in bf16 a row computed beside 31 others differs in its last bits from the same row alone, and
greedy tokens drift apart. Deterministic mode makes every row-wise computation see one shape:

- ``BatchInvariantMode`` (a ``TorchFunctionMode`` active around every pass) runs the ops that
  reduce along a row, ``F.linear``, ``addmm``, ``mean`` over the last dimension, ``layer_norm``
  and ``rms_norm``, on tiles of exactly ``ROW_TILE`` rows (the last one zero-padded). Same shape,
  same kernel; a GEMM's or a reduction's output row depends only on its input row.
- On CUDA a decode step's attention is flex_attention over the paged pool (the engine's own paged
  kernel) with its configuration fixed (``flex_kernel_options``): the main kernel, never the
  split-KV decoding one whose split count follows the batch size, and one tile shape, so a row's
  reduction runs over its own session's blocks in their logical order, one block per iteration,
  whatever shares the step. A block a row cannot see adds exact zeros.
- Elsewhere, and for every prefill, attention is computed here with fixed shapes, over each session's KV in its logical order
  (gathered from the pool through the block table, so where blocks sit in the pool does not
  matter), one key tile at a time with an online softmax. A key tile a row cannot see is an exact
  no-op (its weights are 0 and its rescaling factor 1), so a row's result does not depend on how
  many tiles its step loops over. ``decode_attention`` takes one query per row, ``DECODE_ROWS``
  rows (of any sessions) per tile; ``prefill_attention`` takes one session's consecutive
  queries, ``PREFILL_ROWS`` per tile, sharing one gather of its keys.

A decoded token and a prefilled one go through different attention tilings: each is invariant
to batch, chunking, breakpoints and evictions, but a token recomputed by prefill after having
been decoded (the ``recompute`` scheduler) gets a prefill's values, not the decode's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from djinn.engine.kvpool import load_slots
from djinn.kernel.errors import ModelError

#: rows of every tiled GEMM and row reduction; at batch 1 a decode step's GEMMs still read their
#: weights once (an M of 128 stays below a bf16 GEMM's arithmetic-intensity ridge)
ROW_TILE = 128
#: decode queries (one per row, any sessions) per attention tile
DECODE_ROWS = 16
#: keys per attention tile of a decode step (rounded to whole KV blocks)
DECODE_KEY_TOKENS = 256
#: consecutive queries of one session per attention tile of a prefill
PREFILL_ROWS = 64
#: keys per attention tile of a prefill (rounded to whole KV blocks)
PREFILL_KEY_TOKENS = 512


#: keys per iteration of the fixed flex_attention kernel at most (one pool block when blocks are smaller)
FLEX_KEY_TILE = 64


def flex_kernel_options(block_tokens: int) -> dict[str, Any]:
    """flex_attention's ``kernel_options`` for batch-invariant paged decode over ``block_tokens``
    blocks: the main (not the split-KV) kernel with one fixed tile and schedule, so nothing about a
    row's reduction is chosen from the batch or the pool's shape."""
    key_tile = FLEX_KEY_TILE
    while block_tokens % key_tile:
        key_tile //= 2
    if key_tile < 16:
        raise ModelError(f"deterministic decode on CUDA needs KV blocks of a multiple of 16 tokens, not {block_tokens}")
    return {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": 16, "BLOCK_N": key_tile, "num_warps": 4, "num_stages": 2}


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def key_tile(tokens: int, block_tokens: int) -> int:
    """A key tile of about ``tokens`` keys, in whole KV blocks of ``block_tokens``."""
    return max(1, round(tokens / block_tokens)) * block_tokens


def _tiled_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` over ``x``'s rows (all dimensions but the last) in tiles of ``ROW_TILE`` rows."""
    rows = x.reshape(-1, x.shape[-1])  # [N, W]
    count = rows.shape[0]
    padded = _round_up(max(count, 1), ROW_TILE)
    if padded != count:
        rows = torch.cat([rows, rows.new_zeros(padded - count, rows.shape[1])])
    out = torch.cat([fn(rows[i : i + ROW_TILE]) for i in range(0, padded, ROW_TILE)])[:count]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _last_dim(dim: Any, ndim: int) -> bool:
    if isinstance(dim, (tuple, list)):
        return len(dim) == 1 and _last_dim(dim[0], ndim)
    return isinstance(dim, int) and dim in (-1, ndim - 1)


class BatchInvariantMode(TorchFunctionMode):
    """Runs the row-reducing ops of a forward pass on fixed ``ROW_TILE``-row tiles (see the module
    docstring); every other op passes through unchanged."""

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is getattr(torch, "_scaled_mm", None):
            raise ModelError("deterministic mode has no batch-invariant fp8 GEMM (torch._scaled_mm): "
                             "stream fp8 weights with [settings.ringbuffer] fp8_matmul = 'dequantize'")
        if func is F.linear:
            x, weight, bias = _args(args, kwargs, ("input", "weight", "bias"))
            return _tiled_rows(lambda t: F.linear(t, weight, bias), x)
        if func is torch.addmm and not kwargs:  # GPT-2's Conv1D: addmm(bias, x [N, K], weight)
            bias, x, weight = args
            return _tiled_rows(lambda t: torch.addmm(bias, t, weight), x)
        if func in (torch.mean, torch.Tensor.mean) and (len(args) >= 2 or "dim" in kwargs):
            x, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and _last_dim(dim, x.dim()):
                keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
                out = _tiled_rows(lambda t: t.mean(-1, keepdim=True, dtype=kwargs.get("dtype")), x)
                return out if keep else out.squeeze(-1)
        if func is F.layer_norm:
            x, shape, weight, bias, eps = _args(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
                                                {"eps": 1e-5})
            if len(shape) == 1:
                return _tiled_rows(lambda t: F.layer_norm(t, shape, weight, bias, eps), x)
        if func is getattr(F, "rms_norm", None):
            x, shape, weight, eps = _args(args, kwargs, ("input", "normalized_shape", "weight", "eps"))
            if len(shape) == 1:
                return _tiled_rows(lambda t: F.rms_norm(t, shape, weight, eps), x)
        return func(*args, **kwargs)


def _args(args: Sequence[Any], kwargs: dict[str, Any], names: Sequence[str],
          defaults: dict[str, Any] | None = None) -> list[Any]:
    """Positional-or-keyword arguments by name (missing ones: ``defaults`` or None)."""
    defaults = defaults or {}
    return [args[i] if i < len(args) else kwargs.get(name, defaults.get(name)) for i, name in enumerate(names)]


@attrs.frozen(eq=False)
class DecodeRows:
    """A decode step's attention inputs: row ``b`` is the token at ``positions[b]`` of the session
    whose blocks are ``table[b]`` (padding rows: position 0 in the scratch block). ``table`` is
    ``[B, W]`` with ``W`` a whole number of key tiles. The pool is read when attention runs."""

    pool: Any  # KVPool
    positions: torch.Tensor  # [B] long
    table: torch.Tensor  # [B, W] block ids in logical order
    window: int | None
    key_tokens: int


@attrs.frozen(eq=False)
class PrefillRows:
    """A prefill pass's attention inputs: segment ``i`` is ``lengths[i]`` consecutive queries of
    one session from position ``starts[i]``, packed one after another; ``tables[i]`` ``[W]`` holds
    that session's blocks in logical order."""

    pool: Any  # KVPool
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    tables: torch.Tensor  # [n, W] block ids in logical order
    window: int | None
    key_tokens: int


def _online_step(
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], scores: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One key tile of an online softmax: ``scores`` ``[..., Q, K]`` (masked keys -inf),
    ``values`` ``[..., K, D]``; state ``(max [..., Q], sum [..., Q], acc [..., Q, D])``."""
    top, total, acc = state
    new_top = torch.maximum(top, scores.amax(-1))
    safe = torch.where(torch.isinf(new_top), torch.zeros_like(new_top), new_top)  # no key seen yet
    scale = torch.exp(top - safe)
    weights = torch.exp(scores - safe[..., None])
    return new_top, total * scale + weights.sum(-1), acc * scale[..., None] + torch.matmul(weights, values)


def _visible(positions: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[Q, K]``: query at ``positions[q]`` may see the key at logical position ``keys[k]``."""
    seen = keys[None, :] <= positions[:, None]
    if window is not None:
        seen &= positions[:, None] - keys[None, :] < window
    return seen


def _gather(layer: torch.Tensor, blocks: torch.Tensor, block_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[..., K, H_kv, D]`` of ``blocks`` ``[..., K / block]`` in their order."""
    within = torch.arange(block_tokens, device=blocks.device)
    slots = (blocks.long()[..., None] * block_tokens + within).flatten(-2)  # [..., K]
    return load_slots(layer[0], slots), load_slots(layer[1], slots)


def decode_attention(
    module: torch.nn.Module, query: torch.Tensor, rows: DecodeRows, scaling: float | None
) -> torch.Tensor:
    """Attention of one query per row ``[B, H, 1, D]`` over each row's own session: ``[B, 1, H, D]``."""
    batch, heads, _, dim = query.shape
    pool = rows.pool
    layer = pool.tensor[module.layer_idx]  # [2, S, H_kv, D]
    kv_heads, bt = layer.shape[2], pool.block_tokens
    group, scale = heads // kv_heads, scaling if scaling is not None else dim**-0.5
    per_tile = rows.key_tokens // bt
    padded = _round_up(batch, DECODE_ROWS)
    q = F.pad(query[:, :, 0], (0, 0, 0, 0, 0, padded - batch)).float() * scale  # [P, H, D]
    positions = F.pad(rows.positions, (0, padded - batch))
    table = F.pad(rows.table, (0, 0, 0, padded - batch))  # padding rows read the scratch block (0)
    offsets = torch.arange(rows.key_tokens, device=query.device)
    out = []
    for r in range(0, padded, DECODE_ROWS):
        qt = q[r : r + DECODE_ROWS].view(DECODE_ROWS, kv_heads, group, dim)  # [R, H_kv, g, D]
        at = positions[r : r + DECODE_ROWS]
        state = (qt.new_full(qt.shape[:-1], float("-inf")), qt.new_zeros(qt.shape[:-1]), torch.zeros_like(qt))
        for j in range(table.shape[1] // per_tile):
            keys, values = _gather(layer, table[r : r + DECODE_ROWS, j * per_tile : (j + 1) * per_tile], bt)
            scores = torch.matmul(qt, keys.permute(0, 2, 3, 1).float())  # [R, H_kv, g, K]
            seen = _visible(at, j * rows.key_tokens + offsets, rows.window)  # [R, K]
            scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
            state = _online_step(state, scores, values.permute(0, 2, 1, 3).float())
        _, total, acc = state
        out.append((acc / total[..., None]).reshape(DECODE_ROWS, heads, dim))
    return torch.cat(out)[:batch, None].to(query.dtype)  # [B, 1, H, D]


def prefill_attention(
    module: torch.nn.Module, query: torch.Tensor, rows: PrefillRows, scaling: float | None
) -> torch.Tensor:
    """Attention of packed chunks ``[1, H, sum T, D]``, each over its own session: ``[1, sum T, H, D]``."""
    _, heads, total_rows, dim = query.shape
    pool = rows.pool
    layer = pool.tensor[module.layer_idx]  # [2, S, H_kv, D]
    kv_heads, bt = layer.shape[2], pool.block_tokens
    group, scale = heads // kv_heads, scaling if scaling is not None else dim**-0.5
    per_tile, device = rows.key_tokens // bt, query.device
    q_all = query[0].transpose(0, 1).float() * scale  # [sum T, H, D]
    offsets = torch.arange(rows.key_tokens, device=device)
    ranks = torch.arange(PREFILL_ROWS, device=device)
    out, first = [], 0
    for i, (start, length) in enumerate(zip(rows.starts, rows.lengths)):
        padded = _round_up(length, PREFILL_ROWS)
        q = F.pad(q_all[first : first + length], (0, 0, 0, 0, 0, padded - length))  # [P, H, D]
        for r in range(0, padded, PREFILL_ROWS):
            # [H_kv, R * g, D], each key head's group of query heads one row after another
            qt = q[r : r + PREFILL_ROWS].view(PREFILL_ROWS, kv_heads, group, dim).permute(1, 0, 2, 3)
            qt = qt.reshape(kv_heads, PREFILL_ROWS * group, dim)
            at = start + r + ranks  # [R] positions (padding rows past the chunk's end see more; unused)
            state = (qt.new_full(qt.shape[:-1], float("-inf")), qt.new_zeros(qt.shape[:-1]), torch.zeros_like(qt))
            last = min(start + r + PREFILL_ROWS, start + length) - 1  # the tile's last real position
            for j in range(last // rows.key_tokens + 1):
                keys, values = _gather(layer, rows.tables[i, j * per_tile : (j + 1) * per_tile], bt)  # [K, H_kv, D]
                scores = torch.matmul(qt, keys.permute(1, 2, 0).float())  # [H_kv, R * g, K]
                seen = _visible(at, j * rows.key_tokens + offsets, rows.window)  # [R, K]
                seen = seen[:, None, :].expand(PREFILL_ROWS, group, -1).reshape(PREFILL_ROWS * group, -1)
                scores = scores.masked_fill(~seen[None], float("-inf"))
                state = _online_step(state, scores, values.permute(1, 0, 2).float())
            _, total, acc = state
            tile = (acc / total[..., None]).view(kv_heads, PREFILL_ROWS, group, dim).permute(1, 0, 2, 3)
            out.append(tile.reshape(PREFILL_ROWS, heads, dim)[: max(0, min(PREFILL_ROWS, length - r))])
        first += length
    return torch.cat(out)[None].to(query.dtype)  # [1, sum T, H, D]
