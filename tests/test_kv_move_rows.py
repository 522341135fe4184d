"""A session's KV moves as whole words: the widest integer that divides a slot's row and every
tensor's address, and the bytes that come back are the bytes that left."""

from __future__ import annotations

import pytest
import torch

from djinn.engine.kvpool import KVPool, SessionKV, move_rows


def _pool(dtype: torch.dtype, kv_heads: int, head_dim: int) -> KVPool:
    return KVPool(3, kv_heads, head_dim, dtype=dtype, device=torch.device("cpu"), block_tokens=4)


@pytest.mark.parametrize(("dtype", "kv_heads", "head_dim", "word"), [
    (torch.float8_e4m3fn, 4, 8, torch.int64),  # 32-byte rows
    (torch.bfloat16, 2, 2, torch.int64),  # 8 bytes
    (torch.bfloat16, 1, 3, torch.int16),  # 6 bytes
    (torch.float32, 1, 3, torch.int32),  # 12 bytes
    (torch.float8_e4m3fn, 1, 3, torch.uint8),  # 3 bytes
])
def test_a_move_reads_rows_in_the_widest_word_that_divides_them(dtype, kv_heads, head_dim, word):
    pool = _pool(dtype, kv_heads, head_dim)
    (rows,) = move_rows(pool.tensor)
    assert rows.dtype is word
    assert rows.shape[:3] == pool.tensor.shape[:3]
    assert rows.shape[3] * word.itemsize == kv_heads * head_dim * dtype.itemsize
    assert rows.data_ptr() == pool.tensor.data_ptr()  # a view: the same bytes


def test_one_word_serves_tensors_at_differently_aligned_addresses():
    pool = _pool(torch.bfloat16, 2, 2)
    raw = torch.zeros(pool.tensor.numel() * 2 + 2, dtype=torch.uint8)
    shifted = raw[2:].view(torch.bfloat16).view(pool.tensor.shape)  # 2 bytes past an 8-byte boundary
    pool_rows, shifted_rows = move_rows(pool.tensor, shifted)
    assert pool_rows.dtype is shifted_rows.dtype is torch.int16


@pytest.mark.parametrize(("dtype", "kv_heads", "head_dim"), [
    (torch.float8_e4m3fn, 4, 8), (torch.bfloat16, 1, 3), (torch.float32, 2, 4)])
def test_a_scattered_session_comes_back_bitwise(dtype, kv_heads, head_dim):
    pool = _pool(dtype, kv_heads, head_dim)
    other, kv = SessionKV(pool), SessionKV(pool)
    for tokens in (4, 8, 12):  # interleaved growth scatters both sessions' blocks
        other.ensure_capacity(tokens)
        kv.ensure_capacity(tokens)
    assert kv.blocks != sorted(range(min(kv.blocks), min(kv.blocks) + len(kv.blocks)))
    pool.tensor.copy_(torch.randn(pool.tensor.shape).to(dtype))
    before = pool.tensor.clone()
    host = torch.empty(kv.host_shape(), dtype=dtype)
    kv.copy_out(host)
    slots = kv.move_slots()
    assert torch.equal(host.view(torch.uint8), before[:, :, slots].view(torch.uint8))
    kv.release(keep_capacity=True)
    pool.tensor.zero_()
    kv.adopt(pool.allocate(kv.blocks_for(kv.capacity)))
    kv.copy_in(host)
    assert torch.equal(pool.tensor[:, :, kv.move_slots()].view(torch.uint8), host.view(torch.uint8))
