"""Paged KV: one pool tensor per server, sessions own lists of fixed-size blocks in it.

Layout: ``pool.tensor`` is ``[L, 2, slots, H_kv, D]``, layer-major, where ``slots = blocks *
block_tokens`` and a session's token ``t`` lives at slot ``blocks[t // block_tokens] *
block_tokens + t % block_tokens``. Layer-major because a batched decode step attends over
``tensor[layer, k]`` as one ``[slots, H_kv, D]`` view (no gather of anyone's KV). A session's move
to or from a host tier gathers (or scatters) its slots for a group of layers at a time, so it is a
few large copies however its blocks are scattered. Blocks are handed out lowest-first, so the
slots in use stay a compact prefix of the pool.

Block 0 is never handed out: it is the scratch slot that padding rows of a batch write to.

Thread-safety: allocation and free take a lock; ``grow`` replaces the tensor and must run where
no forward pass is using it (the kernel's model thread). A pool marked ``fixed`` never grows.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterator

import attrs
import torch

from djinn.kernel.errors import AdmissionError

SCRATCH_BLOCK = 0


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """The same elements as bytes where the dtype is a one-byte float (fp8), whose indexing kernels
    PyTorch does not implement on every device; otherwise ``tensor`` itself."""
    return tensor.view(torch.uint8) if tensor.dtype.is_floating_point and tensor.dtype.itemsize == 1 else tensor


#: the integer dtypes a move may read a KV row as, widest first
_ROW_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


def move_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """KV tensors ``[L, 2, slots, H_kv, D]`` as the same bytes ``[L, 2, slots, W]`` in the widest
    integer words that divide a slot's row and every tensor's address (one word for all, so a
    gather from one fills the other). A move's gather and scatter copy one element per thread,
    so wider words keep the device busy for less of the move; beside the engine's passes, the
    gather is the part of a move that slows them (``eval/results/move_interference_h200.json``;
    ``eval.bench_move_interference`` times both word widths)."""
    first = tensors[0]
    row = first.shape[-2] * first.shape[-1] * first.element_size()
    word = next(w for w in _ROW_WORDS
                if row % w.itemsize == 0 and all(t.data_ptr() % w.itemsize == 0 for t in tensors))
    return tuple(t.view(*t.shape[:-2], -1).view(torch.uint8).view(word) for t in tensors)  # views, never copies


def store_slots(dst: torch.Tensor, slots: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[slots] = src`` along the first dimension, ``src`` rounded to ``dst``'s dtype."""
    if dst.is_cuda and dst.dtype.itemsize == 1:
        # fp8 on CUDA: index_put has fp8 kernels there, and a store through a byte view inside a
        # compiled layer reads back wrong (torch 2.11's inductor converts the bytes to fp8 values)
        dst[slots] = src.to(dst.dtype)
        return
    _raw(dst).index_copy_(0, slots, _raw(src.to(dst.dtype)))


def load_slots(src: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``src[slots]`` along the first dimension (any index shape), in ``dtype`` (default: ``src``'s)."""
    picked = _raw(src)[slots].view(src.dtype)
    return picked if dtype is None else picked.to(dtype)


#: device bytes a session's move gathers (or scatters) at once: a group of its layers
MOVE_STAGING_BYTES = 64 << 20

#: elements of one layer's K or V view at most. Inductor indexes a larger view with 64-bit offsets,
#: and the flex_attention decoding kernel then fails to compile (torch 2.11). A small model on a large
#: GPU reaches it (tiny-llama at 64 GiB of KV); Llama-2-7B only past 256 GiB
MAX_LAYER_VIEW_ELEMENTS = 2**31 - 1


class KVPool:
    """Fixed-size blocks of KV for every layer, in one tensor on one device."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        block_tokens: int,
    ) -> None:
        if block_tokens <= 0:
            raise ValueError(f"block_tokens must be > 0, not {block_tokens}")
        self.block_tokens = block_tokens
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.bytes_per_token = 2 * num_layers * kv_heads * head_dim * dtype.itemsize
        self.block_bytes = self.bytes_per_token * block_tokens
        #: the most blocks the pool may hold (see ``MAX_LAYER_VIEW_ELEMENTS``)
        self.max_blocks = MAX_LAYER_VIEW_ELEMENTS // (block_tokens * kv_heads * head_dim)
        #: bumped whenever ``tensor`` is replaced, so captured graphs know they are stale
        self.generation = 0
        self.fixed = False
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._in_use: set[int] = set()
        self.tensor = self._empty(1)

    def _empty(self, blocks: int) -> torch.Tensor:
        shape = (self.num_layers, 2, blocks * self.block_tokens, self.kv_heads, self.head_dim)
        # a normal tensor, not an inference tensor, so copies into it work outside inference mode
        with torch.inference_mode(False):
            return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool, the scratch block included."""
        return self.tensor.shape[2] // self.block_tokens

    @property
    def free_blocks(self) -> int:
        """Blocks that ``allocate`` can hand out without growing."""
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        """Blocks held by sessions."""
        return len(self._in_use)

    def high_water_slots(self) -> int:
        """One past the last slot of the highest block in use (the scratch block at least)."""
        with self._lock:
            return (max(self._in_use, default=SCRATCH_BLOCK) + 1) * self.block_tokens

    def grow(self, blocks: int) -> None:
        """Make the pool hold at least ``blocks`` blocks, keeping every block's contents."""
        old = self.tensor
        if blocks <= self.num_blocks:
            return
        if self.fixed:
            raise AdmissionError(
                f"the KV pool is fixed at {self.num_blocks} blocks and cannot grow to {blocks}"
            )
        if blocks > self.max_blocks:
            raise AdmissionError(f"the KV pool holds at most {self.max_blocks} blocks, {blocks} were asked for")
        new = self._empty(blocks)
        new[:, :, : old.shape[2]].copy_(old)
        with self._lock:
            for block in range(self.num_blocks, blocks):
                heapq.heappush(self._free, block)
            self.tensor = new
            self.generation += 1

    def allocate(self, count: int) -> list[int]:
        """``count`` blocks, lowest ids first; grows a pool that is not ``fixed`` when short."""
        if count <= 0:
            return []
        if len(self._free) < count:
            needed = self.num_blocks + count - len(self._free)
            self.grow(max(needed, min(2 * self.num_blocks, self.max_blocks)))
        with self._lock:
            if len(self._free) < count:
                raise AdmissionError(
                    f"the KV pool has {len(self._free)} free blocks, {count} were asked for"
                )
            blocks = [heapq.heappop(self._free) for _ in range(count)]
            self._in_use.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the pool; a block not in use is a ValueError."""
        with self._lock:
            unknown = [b for b in blocks if b not in self._in_use]
            if unknown:
                raise ValueError(f"blocks {unknown[:8]} are not in use")
            for block in blocks:
                self._in_use.discard(block)
                heapq.heappush(self._free, block)


def block_runs(blocks: list[int]) -> Iterator[tuple[int, int, int]]:
    """``(first_block, index_in_list, count)`` for each run of consecutive block ids."""
    start = 0
    for i in range(1, len(blocks) + 1):
        if i == len(blocks) or blocks[i] != blocks[i - 1] + 1:
            yield blocks[start], start, i - start
            start = i


@attrs.define(eq=False)
class SessionKV:
    """One session's KV: its blocks in a ``KVPool`` and how many tokens are stored.

    While the session is evicted ``resident`` is False and it holds no blocks; ``capacity``
    still says how many tokens its host copy holds.
    """

    pool: KVPool
    blocks: list[int] = attrs.Factory(list)
    length: int = 0
    resident: bool = True
    evicted_capacity: int = 0
    _slots: torch.Tensor | None = None  # device slot index of every token in capacity

    @property
    def block_tokens(self) -> int:
        """Tokens per block."""
        return self.pool.block_tokens

    @property
    def capacity(self) -> int:
        """Tokens the session can hold without allocating."""
        return len(self.blocks) * self.pool.block_tokens if self.resident else self.evicted_capacity

    @property
    def nbytes(self) -> int:
        """Bytes of KV the session holds: its whole capacity, not only the stored tokens."""
        return self.capacity * self.pool.bytes_per_token

    def blocks_for(self, tokens: int) -> int:
        """Blocks needed to hold ``tokens`` tokens."""
        return -(-tokens // self.pool.block_tokens)

    def ensure_capacity(self, tokens: int) -> None:
        """Allocate blocks so the session holds at least ``tokens`` tokens."""
        if not self.resident:
            raise RuntimeError("the session's KV is evicted; restore it first")
        more = self.blocks_for(tokens) - len(self.blocks)
        if more > 0:
            self.blocks.extend(self.pool.allocate(more))
            self._slots = None

    def adopt(self, blocks: list[int]) -> None:
        """Take ``blocks`` as the session's (a restore); it becomes resident."""
        self.blocks, self.resident, self.evicted_capacity, self._slots = blocks, True, 0, None

    def release(self, *, keep_capacity: bool = False) -> list[int]:
        """Give the blocks back to the pool; the session is no longer resident. Returns them."""
        blocks, capacity = self.blocks, self.capacity
        self.pool.free(blocks)
        self.blocks, self.resident, self._slots = [], False, None
        self.evicted_capacity = capacity if keep_capacity else 0
        return blocks

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Pool slot indices ``[end - start]`` (int64, on the pool's device) of tokens ``[start, end)``."""
        if end > self.capacity:
            raise RuntimeError(f"tokens up to {end} asked for, the session holds {self.capacity}")
        if self._slots is None:
            bt = self.pool.block_tokens
            blocks = torch.tensor(self.blocks, dtype=torch.long)
            cpu = (blocks[:, None] * bt + torch.arange(bt)).reshape(-1)
            self._slots = cpu.to(self.pool.device)
        return self._slots[start:end]

    def slot_runs(self) -> Iterator[tuple[int, int, int]]:
        """``(first_slot, first_token, tokens)`` for each contiguous range of the session's slots."""
        bt = self.pool.block_tokens
        for first, index, count in block_runs(self.blocks):
            yield first * bt, index * bt, count * bt

    def copy_out(self, host: torch.Tensor, *, non_blocking: bool = False, slots: torch.Tensor | None = None) -> None:
        """Copy the KV into ``host`` ``[L, 2, capacity, H_kv, D]`` (see ``_copy``)."""
        self._copy(host, to_host=True, non_blocking=non_blocking, slots=slots)

    def copy_in(self, host: torch.Tensor, *, non_blocking: bool = False, slots: torch.Tensor | None = None) -> None:
        """Copy ``host`` ``[L, 2, capacity, H_kv, D]`` into the session's blocks (see ``_copy``)."""
        self._copy(host, to_host=False, non_blocking=non_blocking, slots=slots)

    def move_slots(self) -> torch.Tensor:
        """Pool slot indices ``[capacity]`` (int64, on the host) of every token the session holds,
        in order: what a move gathers or scatters. Built anew, not the cached ``slots``: a move runs
        on a copy stream, and those serve the model's."""
        bt = self.pool.block_tokens
        return (torch.tensor(self.blocks, dtype=torch.long)[:, None] * bt + torch.arange(bt)).reshape(-1)

    def _copy(self, host: torch.Tensor, *, to_host: bool, non_blocking: bool, slots: torch.Tensor | None) -> None:
        """Per group of layers (``MOVE_STAGING_BYTES`` at most), one gather (or scatter) of all the
        session's slots on the device and one copy of that contiguous part of ``host``: a few
        calls per move however scattered the blocks are. A copy per run of blocks and layer was
        thousands of calls for a fragmented session, each holding the interpreter lock that the
        model thread needs between steps. ``slots``: ``move_slots()`` already on the pool's
        device (uploaded here otherwise)."""
        if not self.blocks:
            return
        pool, host = move_rows(self.pool.tensor, host)  # [L, 2, slots, W], [L, 2, capacity, W]
        if slots is None:
            slots = self.move_slots().to(pool.device)
        layer_bytes = pool[0, :, 0].numel() * pool.element_size() * slots.numel()
        group = max(1, MOVE_STAGING_BYTES // layer_bytes)
        for first in range(0, pool.shape[0], group):
            layers = slice(first, first + group)
            if to_host:
                host[layers].copy_(pool[layers].index_select(2, slots), non_blocking=non_blocking)
            else:
                pool[layers].index_copy_(2, slots, host[layers].to(pool.device, non_blocking=non_blocking))

    def host_shape(self) -> tuple[int, ...]:
        """The shape of the session's KV in a tier: ``[L, 2, capacity, H_kv, D]``."""
        p = self.pool
        return (p.num_layers, 2, self.capacity, p.kv_heads, p.head_dim)
