"""Arenas: one flat byte buffer allocated once, and a sub-allocator of ranges inside it.

Mechanism only. ``RangeAllocator`` hands out aligned ranges of ``[0, capacity)`` best-fit and
coalesces neighbours on free; it never touches memory, so any tier (pinned host, disk, device)
can keep its bookkeeping with it. ``allocate_host_arena`` and ``typed_view`` are the two tensor
helpers that every arena user needs.
"""

from __future__ import annotations

import bisect
import math
import mmap
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from djinn.kernel.errors import TierFullError
from djinn.kernel.strategies import TierBlock

if TYPE_CHECKING:  # torch stays out of the CLI's start-up path
    import torch


@attrs.frozen
class ArenaStats:
    """Occupancy of a ``RangeAllocator``; ``used_bytes`` counts alignment padding."""

    capacity_bytes: int
    used_bytes: int
    largest_free_bytes: int
    allocations: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RangeAllocator:
    """Best-fit allocator of aligned byte ranges inside ``[0, capacity)``.

    Free ranges are kept twice: sorted by offset (to find the neighbours to coalesce with) and
    sorted by ``(size, offset)`` (to find the smallest range that fits), both searched with
    ``bisect``. Every block starts at a multiple of ``alignment`` and reserves a multiple of it.
    """

    def __init__(self, capacity: int, alignment: int = 4096) -> None:
        if not _is_int(alignment) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, not {alignment!r}")
        if not _is_int(capacity) or capacity <= 0 or capacity % alignment:
            raise ValueError(
                f"capacity must be a positive multiple of the alignment ({alignment}), "
                f"not {capacity!r}"
            )
        self.capacity = capacity
        self.alignment = alignment
        self._free_offsets: list[int] = []  # sorted offsets of free ranges
        self._free_size: dict[int, int] = {}  # offset -> size of each free range
        self._free_by_size: list[tuple[int, int]] = []  # sorted (size, offset)
        self._live: dict[int, tuple[int, int]] = {}  # offset -> (requested, reserved)
        self._used = 0
        self._add_free(0, capacity)

    # ------------------------------------------------------------------ public API

    def allocate(self, nbytes: int) -> TierBlock:
        """Reserve ``nbytes`` (rounded up to the alignment) from the smallest range that fits.

        Raises ``TierFullError`` naming the request and the largest free range when none fits.
        """
        if not _is_int(nbytes) or nbytes <= 0:
            raise ValueError(f"nbytes must be a positive integer, not {nbytes!r}")
        reserved = -(-nbytes // self.alignment) * self.alignment
        index = bisect.bisect_left(self._free_by_size, (reserved, -1))
        if index == len(self._free_by_size):
            raise TierFullError(
                f"no free range for {nbytes} bytes ({reserved} with alignment): the largest "
                f"free range is {self.largest_free_bytes} bytes, {self._used} of "
                f"{self.capacity} bytes are in use in {len(self._live)} blocks"
            )
        size, offset = self._free_by_size[index]
        self._remove_free(offset)
        if size > reserved:
            self._add_free(offset + reserved, size - reserved)
        self._live[offset] = (nbytes, reserved)
        self._used += reserved
        return TierBlock(offset=offset, nbytes=nbytes)

    def free(self, block: TierBlock) -> None:
        """Return ``block``; it merges with free neighbours. A block not live here is a ValueError."""
        entry = self._live.get(block.offset)
        if entry is None or entry[0] != block.nbytes:
            raise ValueError(
                f"{block} is not a live block of this allocator (freed twice, or foreign)"
            )
        del self._live[block.offset]
        reserved = entry[1]
        self._used -= reserved
        start, end = block.offset, block.offset + reserved
        if end in self._free_size:
            end += self._remove_free(end)
        before = bisect.bisect_left(self._free_offsets, start) - 1
        if before >= 0:
            left = self._free_offsets[before]
            if left + self._free_size[left] == start:
                self._remove_free(left)
                start = left
        self._add_free(start, end - start)

    def is_live(self, block: TierBlock) -> bool:
        """True when ``block`` is currently allocated here (same offset and size)."""
        entry = self._live.get(block.offset)
        return entry is not None and entry[0] == block.nbytes

    def free_ranges(self) -> list[tuple[int, int]]:
        """The free ``(offset, size)`` ranges in offset order."""
        return [(offset, self._free_size[offset]) for offset in self._free_offsets]

    @property
    def used_bytes(self) -> int:
        """Bytes reserved by live blocks, alignment padding included."""
        return self._used

    @property
    def largest_free_bytes(self) -> int:
        """Size of the largest free range (0 when full)."""
        return self._free_by_size[-1][0] if self._free_by_size else 0

    def stats(self) -> ArenaStats:
        """Current occupancy."""
        return ArenaStats(
            capacity_bytes=self.capacity,
            used_bytes=self._used,
            largest_free_bytes=self.largest_free_bytes,
            allocations=len(self._live),
        )

    # ------------------------------------------------------------------ free-range index

    def _add_free(self, offset: int, size: int) -> None:
        bisect.insort(self._free_offsets, offset)
        self._free_size[offset] = size
        bisect.insort(self._free_by_size, (size, offset))

    def _remove_free(self, offset: int) -> int:
        size = self._free_size.pop(offset)
        del self._free_offsets[bisect.bisect_left(self._free_offsets, offset)]
        del self._free_by_size[bisect.bisect_left(self._free_by_size, (size, offset))]
        return size


class _RegisteredMapping(mmap.mmap):
    """An anonymous mapping page-locked with ``cudaHostRegister``; unregistered before it is unmapped.

    The tensor over it (``torch.frombuffer``) holds the only reference, so the pages stay pinned
    exactly as long as some tensor or view still uses them.
    """

    address = 0

    def __del__(self) -> None:
        if self.address:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.address)


def allocate_host_arena(
    nbytes: int, pinned: bool, fill: Callable[[torch.Tensor], None] | None = None
) -> torch.Tensor:
    """One flat ``[nbytes]`` uint8 host buffer; page-locked when ``pinned`` (needs CUDA).

    Pinned memory is what lets host-to-device copies run asynchronously on a side stream at
    full bandwidth; it is allocated once because pinning is slow and fragments host memory.
    The pages are registered with CUDA in place rather than taken from torch's pinned-memory
    allocator, which rounds every request up to a power of two: a 100 GiB arena would pin
    128 GiB, more than many hosts have.

    ``fill(arena)``, when given, writes the arena before it is page-locked. Its pages are only
    committed as they are first written, so a caller that frees its own copy of each piece as
    it writes it never holds both: a model of 70 GB is packed into a 70 GB arena on a host of
    128 GB.
    """
    import torch

    if not pinned:
        arena = torch.empty(nbytes, dtype=torch.uint8)  # [nbytes]
        if fill is not None:
            fill(arena)
        return arena
    if not torch.cuda.is_available():
        raise RuntimeError("pinned host memory needs CUDA, and CUDA is not available")
    mapping = _RegisteredMapping(-1, nbytes)
    arena = torch.frombuffer(mapping, dtype=torch.uint8)  # [nbytes], keeps the mapping alive
    if fill is not None:
        fill(arena)
    error = int(torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), nbytes, 0))
    if error:
        raise RuntimeError(
            f"page-locking a {nbytes / (1 << 30):.2f} GiB host arena failed (cudaError {error}); "
            "the host may not have that much memory free: lower the tier's capacity_gb"
        )
    mapping.address = arena.data_ptr()
    return arena


def typed_view(
    flat: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...] | torch.Size
) -> torch.Tensor:
    """A contiguous tensor of ``dtype`` and ``shape`` over ``flat[offset:]`` (no copy).

    ``flat`` is a 1-D uint8 tensor; ``offset`` must be a multiple of the dtype's item size.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    return flat[offset : offset + nbytes].view(dtype).view(shape)
