"""The ``pinned_host`` tier: evicted tensors live in one page-locked host arena.

The arena is allocated once at start-up (pinning is slow, and pinning many small buffers
fragments host memory); evictions and restores sub-allocate ranges of it with
``djinn.arena.RangeAllocator``. Without CUDA the arena is ordinary memory behind the same interface.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs

from djinn.arena import RangeAllocator, allocate_host_arena
from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import Tier, TierBlock, TierStats

if TYPE_CHECKING:
    import torch

    from djinn.kernel.plugins import StrategyRegistry

GIB = 1 << 30
_NOT_STARTED = "the pinned_host tier is not started (or already stopped)"


def _positive_number(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{attribute.name} must be a number, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be a finite number > 0, not {value!r}")


def _power_of_two(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an integer, not {value!r}")
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{attribute.name} must be a power of two, not {value!r}")


@attrs.frozen
class PinnedHostSettings:
    """``[settings.pinned_host]``: arena size in GiB and block alignment in bytes."""

    capacity_gb: float = attrs.field(default=4.0, validator=_positive_number)
    alignment: int = attrs.field(default=4096, validator=_power_of_two)

    def __attrs_post_init__(self) -> None:
        if self.capacity_bytes == 0:
            raise ValueError(
                f"capacity_gb={self.capacity_gb} is smaller than one block of "
                f"{self.alignment} bytes"
            )

    @property
    def capacity_bytes(self) -> int:
        """The capacity rounded down to a whole number of alignment units."""
        return int(self.capacity_gb * GIB) // self.alignment * self.alignment


class PinnedHostTier(Tier):
    """A tier over one host arena of ``capacity_gb``, pinned when CUDA is used."""

    def __init__(self, settings: PinnedHostSettings | None = None) -> None:
        self.settings = settings or PinnedHostSettings()
        self._allocator = RangeAllocator(self.settings.capacity_bytes, self.settings.alignment)
        self._arena: torch.Tensor | None = None  # [capacity] uint8
        self._started = False

    def start(self, use_cuda: bool) -> None:
        """Allocate the arena (pinned when ``use_cuda``). A second call is an error."""
        if self._started:
            raise RuntimeError("the pinned_host tier is already started; start() runs once")
        self._arena = allocate_host_arena(self._allocator.capacity, pinned=use_cuda)
        self._started = True

    @property
    def arena(self) -> torch.Tensor:
        """The whole arena: a 1-D uint8 tensor of ``capacity`` bytes."""
        if self._arena is None:
            raise RuntimeError(_NOT_STARTED)
        return self._arena

    def allocate(self, nbytes: int) -> TierBlock:
        """Reserve ``nbytes``; raise ``TierFullError`` when no free range is large enough."""
        if self._arena is None:
            raise RuntimeError(_NOT_STARTED)
        return self._allocator.allocate(nbytes)

    def free(self, block: TierBlock) -> None:
        """Return a block; adjacent free ranges coalesce. Freeing twice is a ValueError."""
        self._allocator.free(block)

    def view(self, block: TierBlock) -> torch.Tensor:
        """The block's bytes as a 1-D uint8 slice of the arena (no copy, no new pinning)."""
        if not self._allocator.is_live(block):
            raise ValueError(f"{block} is not a live block of this tier")
        return self.arena[block.offset : block.offset + block.nbytes]  # [nbytes]

    def stats(self) -> TierStats:
        """Current occupancy; ``pinned`` is true only when the arena is page-locked."""
        arena = self._allocator.stats()
        return TierStats(
            capacity_bytes=arena.capacity_bytes,
            used_bytes=arena.used_bytes,
            largest_free_bytes=arena.largest_free_bytes,
            allocations=arena.allocations,
            pinned=self._arena is not None and self._arena.is_pinned(),
        )

    def stop(self) -> None:
        """Drop the arena; blocks handed out before are no longer valid."""
        self._arena = None


@hookimpl
def djinn_register_strategies(registry: StrategyRegistry) -> None:
    """Offer the ``pinned_host`` tier."""
    registry.add("tier", "pinned_host", PinnedHostTier, settings=PinnedHostSettings)
