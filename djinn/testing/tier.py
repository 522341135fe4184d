"""``TierContract``: what every ``Tier`` promises, as tests a plugin's package reuses.

    from djinn.testing import TierContract

    class TestMyTier(TierContract):
        plugin = "my_tier"
        settings = {"capacity_gb": 0.001}  # keep the arena small in tests
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import pytest

from djinn.kernel.errors import TierFullError
from djinn.kernel.strategies import Tier, TierBlock, TierStats
from djinn.testing._plugins import build_strategy


class TierContract:
    """Tests every tier passes, on an arena started without CUDA. Subclass with
    ``plugin = "NAME"``; ``settings`` (its ``[settings.NAME]`` table) should keep it small."""

    plugin: ClassVar[str]
    settings: ClassVar[Mapping[str, Any]] = {}
    #: allocations the fill tests make at most; the block size is the capacity divided by this
    blocks: ClassVar[int] = 8

    @pytest.fixture
    def tier(self) -> Iterator[Tier]:
        """The tier, built by its entry-point name, started without CUDA and stopped after."""
        built = build_strategy(self.plugin, "tier", self.settings)
        built.start(False)
        yield built
        built.stop()

    def fill(self, tier: Tier) -> list[TierBlock]:
        """Blocks of ``capacity / blocks`` bytes until the tier refuses one."""
        size = max(1, tier.stats().capacity_bytes // self.blocks)
        held = []
        for _ in range(self.blocks + 1):
            try:
                held.append(tier.allocate(size))
            except TierFullError:
                return held
        raise AssertionError(f"{self.blocks + 1} blocks of {size} bytes fit in a tier of {tier.stats().capacity_bytes}")

    def test_it_is_a_tier_with_an_empty_unpinned_arena(self, tier: Tier) -> None:
        """After ``start(False)`` the arena is empty, has room, and is not page-locked."""
        assert isinstance(tier, Tier)
        stats = tier.stats()
        assert isinstance(stats, TierStats)
        assert stats.capacity_bytes > 0 and stats.used_bytes == 0 and stats.allocations == 0
        assert stats.largest_free_bytes == stats.capacity_bytes
        assert stats.pinned is False

    def test_allocate_view_free_round_trip(self, tier: Tier) -> None:
        """A block's view is a 1-D uint8 tensor of its size; bytes written through it read back
        through a new view; stats count the block until it is freed."""
        import torch

        nbytes = min(1000, tier.stats().capacity_bytes)
        block = tier.allocate(nbytes)
        assert isinstance(block, TierBlock) and block.nbytes >= nbytes
        view = tier.view(block)
        assert view.dtype == torch.uint8 and view.dim() == 1 and view.numel() == block.nbytes
        pattern = torch.arange(view.numel(), dtype=torch.int64).remainder(251).to(torch.uint8)
        view.copy_(pattern)
        assert torch.equal(tier.view(block), pattern)
        stats = tier.stats()
        assert stats.allocations == 1 and stats.used_bytes >= nbytes
        tier.free(block)
        stats = tier.stats()
        assert stats.allocations == 0 and stats.used_bytes == 0

    def test_blocks_never_overlap(self, tier: Tier) -> None:
        """Every block of a full tier keeps its own bytes."""
        held = self.fill(tier)
        assert len(held) >= 2, f"the tier holds fewer than two blocks of 1/{self.blocks} of its capacity"
        for number, block in enumerate(held):
            tier.view(block).fill_(number + 1)
        for number, block in enumerate(held):
            view = tier.view(block)
            assert bool((view == number + 1).all()), f"block {number} was overwritten by another"

    def test_a_full_tier_raises_tier_full_error(self, tier: Tier) -> None:
        """More than the capacity is refused at once; a full tier refuses another block and
        accepts it again once one is freed."""
        capacity = tier.stats().capacity_bytes
        with pytest.raises(TierFullError):
            tier.allocate(capacity + 1)
        held = self.fill(tier)
        size = held[0].nbytes
        with pytest.raises(TierFullError):
            tier.allocate(size)
        tier.free(held.pop())
        held.append(tier.allocate(size))
        assert tier.stats().allocations == len(held)

    @pytest.mark.parametrize("order", ["in-order", "reversed", "odd-then-even"])
    def test_freed_neighbours_coalesce(self, tier: Tier, order: str) -> None:
        """Once every block of a full tier is freed, in any order, the whole capacity is one free
        range again and can be allocated as one block."""
        held = self.fill(tier)
        if order == "reversed":
            held.reverse()
        elif order == "odd-then-even":
            held = held[1::2] + held[0::2]
        for block in held:
            tier.free(block)
        stats = tier.stats()
        assert stats.used_bytes == 0 and stats.largest_free_bytes == stats.capacity_bytes
        whole = tier.allocate(stats.capacity_bytes)
        assert tier.view(whole).numel() == whole.nbytes
        tier.free(whole)
