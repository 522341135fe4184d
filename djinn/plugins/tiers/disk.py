"""The ``disk`` tier: evicted tensors live in one file on local disk, memory-mapped.

The file is created at start-up at its full size (sparse where the file system allows) and
removed at shutdown; blocks are ranges of it, kept with ``djinn.arena.RangeAllocator`` like the
pinned tier's. ``view`` is a uint8 tensor over the mapped bytes, so the engine copies KV to and
from it as from any host tier; the page cache decides when bytes reach the disk. It is never
page-locked: copies from the GPU through it are synchronous, which is why it is meant as a
later tier that the kernel demotes cold sessions to, not the first one.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import TYPE_CHECKING

import attrs

from djinn.arena import RangeAllocator
from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import Tier, TierBlock, TierStats

if TYPE_CHECKING:
    import numpy
    import torch

    from djinn.kernel.plugins import StrategyRegistry

GIB = 1 << 30
_NOT_STARTED = "the disk tier is not started (or already stopped)"


def _positive_number(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{attribute.name} must be a number, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be a finite number > 0, not {value!r}")


@attrs.frozen
class DiskSettings:
    """``[settings.disk]``: the file (empty: a new file in the system's temporary directory),
    its size in GiB and the block alignment in bytes."""

    path: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    capacity_gb: float = attrs.field(default=16.0, validator=_positive_number)
    alignment: int = attrs.field(default=4096, validator=attrs.validators.instance_of(int))

    def __attrs_post_init__(self) -> None:
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise ValueError(f"alignment must be a power of two, not {self.alignment!r}")
        if self.capacity_bytes == 0:
            raise ValueError(f"capacity_gb={self.capacity_gb} is smaller than one block of {self.alignment} bytes")

    @property
    def capacity_bytes(self) -> int:
        """The capacity rounded down to a whole number of alignment units."""
        return int(self.capacity_gb * GIB) // self.alignment * self.alignment


class DiskTier(Tier):
    """A tier over one memory-mapped file of ``capacity_gb``."""

    def __init__(self, settings: DiskSettings | None = None) -> None:
        self.settings = settings or DiskSettings()
        self._allocator = RangeAllocator(self.settings.capacity_bytes, self.settings.alignment)
        self._map: numpy.memmap | None = None  # [capacity] uint8
        self.path: str | None = None

    def start(self, use_cuda: bool) -> None:
        """Create the file at its full size and map it. Refuses a path that exists (it is removed at stop)."""
        import numpy

        if self._map is not None:
            raise RuntimeError("the disk tier is already started; start() runs once")
        capacity = self._allocator.capacity
        if self.settings.path:
            path = self.settings.path
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        else:
            fd, path = tempfile.mkstemp(prefix="djinn-disk-", suffix=".kv")
        try:
            os.ftruncate(fd, capacity)
        finally:
            os.close(fd)
        self.path = path
        try:
            self._map = numpy.memmap(path, dtype=numpy.uint8, mode="r+", shape=(capacity,))
        except BaseException:
            os.unlink(path)
            raise

    def allocate(self, nbytes: int) -> TierBlock:
        """Reserve ``nbytes``; raise ``TierFullError`` when no free range is large enough."""
        if self._map is None:
            raise RuntimeError(_NOT_STARTED)
        return self._allocator.allocate(nbytes)

    def free(self, block: TierBlock) -> None:
        """Return a block; adjacent free ranges coalesce. Freeing twice is a ValueError."""
        self._allocator.free(block)

    def view(self, block: TierBlock) -> torch.Tensor:
        """The block's bytes as a 1-D uint8 tensor over the mapping (no copy)."""
        import torch

        if self._map is None:
            raise RuntimeError(_NOT_STARTED)
        if not self._allocator.is_live(block):
            raise ValueError(f"{block} is not a live block of this tier")
        return torch.from_numpy(self._map[block.offset : block.offset + block.nbytes])  # [nbytes]

    def stats(self) -> TierStats:
        """Current occupancy; never pinned."""
        arena = self._allocator.stats()
        return TierStats(
            capacity_bytes=arena.capacity_bytes, used_bytes=arena.used_bytes,
            largest_free_bytes=arena.largest_free_bytes, allocations=arena.allocations, pinned=False,
        )

    def stop(self) -> None:
        """Unmap and remove the file; blocks handed out before are no longer valid."""
        # the mapping is unmapped when its last view goes (closing it under live views raises);
        # the file's name goes now, its blocks with the mapping
        self._map = None
        if self.path is not None:
            os.unlink(self.path)
            self.path = None


@hookimpl
def djinn_register_strategies(registry: StrategyRegistry) -> None:
    """Offer the ``disk`` tier."""
    registry.add("tier", "disk", DiskTier, settings=DiskSettings)
