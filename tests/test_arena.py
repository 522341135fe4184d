"""The kernel's range sub-allocator and arena helpers."""

from __future__ import annotations

import random

import pytest
import torch

from djinn.arena import RangeAllocator, allocate_host_arena, typed_view
from djinn.kernel.errors import TierFullError
from djinn.kernel.strategies import TierBlock

UNIT = 4096


def check_invariants(allocator: RangeAllocator, live: dict[int, TierBlock]) -> None:
    """Free ranges and live blocks tile the capacity exactly; free ranges are coalesced."""
    free = allocator.free_ranges()
    for (offset, size), (next_offset, _) in zip(free, free[1:]):
        assert offset + size < next_offset, "adjacent free ranges were not coalesced"
    spans = [(offset, size, "free") for offset, size in free]
    spans += [(b.offset, -(-b.nbytes // UNIT) * UNIT, "live") for b in live.values()]
    spans.sort()
    cursor = 0
    for offset, size, _ in spans:
        assert offset == cursor, "a gap or an overlap between ranges"
        assert offset % UNIT == 0 and size > 0
        cursor += size
    assert cursor == allocator.capacity
    stats = allocator.stats()
    assert stats.allocations == len(live)
    assert stats.used_bytes == allocator.capacity - sum(size for _, size in free)
    assert stats.largest_free_bytes == max((size for _, size in free), default=0)


def test_construction_is_validated():
    for capacity, alignment in [(0, 4096), (-4096, 4096), (4097, 4096), (4096, 3), (4096, 0)]:
        with pytest.raises(ValueError):
            RangeAllocator(capacity, alignment)
    with pytest.raises(ValueError):
        RangeAllocator(True, 1)  # a bool is not a size
    with pytest.raises(ValueError):
        RangeAllocator(8192, 4096).allocate(0)


def test_blocks_are_aligned_and_keep_their_requested_size():
    allocator = RangeAllocator(16 * UNIT)
    first = allocator.allocate(1)
    second = allocator.allocate(UNIT + 1)
    assert (first.offset, first.nbytes) == (0, 1)
    assert (second.offset, second.nbytes) == (UNIT, UNIT + 1)
    assert allocator.used_bytes == 3 * UNIT
    assert allocator.free_ranges() == [(3 * UNIT, 13 * UNIT)]


def test_best_fit_takes_the_smallest_range_that_fits():
    allocator = RangeAllocator(16 * UNIT)
    a, _, c, _, e = (allocator.allocate(n * UNIT) for n in (3, 1, 2, 1, 9))
    allocator.free(a)  # hole of 3 units at 0
    allocator.free(c)  # hole of 2 units at 4
    allocator.free(e)  # hole of 9 units at 7
    assert allocator.allocate(2 * UNIT).offset == 4 * UNIT
    assert allocator.allocate(UNIT).offset == 0
    assert allocator.allocate(4 * UNIT).offset == 7 * UNIT


def test_free_coalesces_with_both_neighbours():
    allocator = RangeAllocator(8 * UNIT)
    a, b, c = (allocator.allocate(2 * UNIT) for _ in range(3))
    allocator.free(a)
    allocator.free(c)
    assert allocator.free_ranges() == [(0, 2 * UNIT), (4 * UNIT, 4 * UNIT)]
    allocator.free(b)
    assert allocator.free_ranges() == [(0, 8 * UNIT)]


def test_double_free_and_foreign_blocks_are_refused():
    allocator = RangeAllocator(8 * UNIT)
    block = allocator.allocate(100)
    with pytest.raises(ValueError, match="not a live block"):
        allocator.free(TierBlock(offset=block.offset, nbytes=99))
    with pytest.raises(ValueError, match="not a live block"):
        allocator.free(TierBlock(offset=UNIT, nbytes=100))
    allocator.free(block)
    with pytest.raises(ValueError, match="not a live block"):
        allocator.free(block)
    assert allocator.free_ranges() == [(0, 8 * UNIT)]


def test_full_raises_tier_full_naming_the_request_and_the_largest_range():
    allocator = RangeAllocator(8 * UNIT)
    a = allocator.allocate(3 * UNIT)
    allocator.allocate(2 * UNIT)
    allocator.free(a)
    before = allocator.free_ranges()
    with pytest.raises(TierFullError) as raised:
        allocator.allocate(4 * UNIT)
    message = str(raised.value)
    assert str(4 * UNIT) in message and f"largest free range is {3 * UNIT} bytes" in message
    assert allocator.free_ranges() == before
    assert allocator.stats().allocations == 1


def test_random_churn_keeps_every_invariant_and_returns_to_one_range():
    rng = random.Random(1234)
    allocator = RangeAllocator(256 * UNIT)
    live: dict[int, TierBlock] = {}
    fulls = 0
    for _ in range(5000):
        if live and rng.random() < 0.45:
            block = live.pop(rng.choice(list(live)))
            allocator.free(block)
        else:
            nbytes = rng.choice([1, 100, UNIT, UNIT + 1, 3 * UNIT, rng.randint(1, 24 * UNIT)])
            reserved = -(-nbytes // UNIT) * UNIT
            fitting = [(size, offset) for offset, size in allocator.free_ranges() if size >= reserved]
            try:
                block = allocator.allocate(nbytes)
            except TierFullError:
                assert not fitting
                fulls += 1
            else:
                assert block.offset == min(fitting)[1], "not the best fit"
                assert block.offset not in live
                live[block.offset] = block
        check_invariants(allocator, live)
    assert fulls > 0, "the churn never filled the allocator"
    for block in live.values():
        allocator.free(block)
    assert allocator.free_ranges() == [(0, allocator.capacity)]
    assert allocator.stats().used_bytes == 0


def test_typed_view_aliases_the_flat_buffer():
    flat = torch.zeros(64, dtype=torch.uint8)
    view = typed_view(flat, 16, torch.float32, (2, 3))  # [2, 3]
    view.fill_(1.0)
    assert view.data_ptr() == flat.data_ptr() + 16
    assert flat[16:40].view(torch.float32).tolist() == [1.0] * 6
    assert flat[:16].eq(0).all() and flat[40:].eq(0).all()


def test_host_arena_is_one_flat_byte_tensor():
    arena = allocate_host_arena(3 * UNIT, pinned=False)
    assert arena.shape == (3 * UNIT,) and arena.dtype == torch.uint8 and not arena.is_pinned()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_pinned_host_arena_without_cuda_is_refused():
    with pytest.raises(RuntimeError, match="CUDA"):
        allocate_host_arena(UNIT, pinned=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_host_arena_is_exactly_sized_page_locked_and_copies_asynchronously():
    nbytes = 3 * UNIT + 4096  # not a power of two: torch's pinned allocator would round it up
    arena = allocate_host_arena(nbytes, pinned=True)
    assert arena.shape == (nbytes,) and arena.is_pinned()
    arena.copy_(torch.arange(nbytes, dtype=torch.int64).remainder(251).to(torch.uint8))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        on_device = arena.to("cuda", non_blocking=True)
        back = torch.empty_like(arena).copy_(on_device, non_blocking=True)
    stream.synchronize()
    assert torch.equal(back, arena)
    view = arena[UNIT:]
    del arena
    assert view.is_pinned()  # a view keeps the registration alive
