"""The ``pinned_host`` tier: one arena allocated once, sub-allocated without touching stored data."""

from __future__ import annotations

import random

import pytest
import torch

from djinn.config import parse_config
from djinn.kernel.errors import ConfigError, TierFullError
from djinn.kernel.plugins import StrategyRegistry
from djinn.kernel.strategies import TierBlock
from djinn.plugins.tiers import pinned_host
from djinn.plugins.tiers.pinned_host import PinnedHostSettings, PinnedHostTier

MIB_IN_GB = 1 / 1024
MAX_BLOCK = 48 * 1024
#: windows of this at different starts (mod 251) differ at every position
_BASE = (torch.arange(MAX_BLOCK + 251) % 251).to(torch.uint8)


def pattern(nbytes: int, key: int) -> torch.Tensor:
    """Bytes that differ per block and per position, so a shifted or overwritten range shows."""
    start = key % 251
    return _BASE[start : start + nbytes]  # [nbytes]


def started_tier(capacity_gb: float = MIB_IN_GB) -> PinnedHostTier:
    tier = PinnedHostTier(PinnedHostSettings(capacity_gb=capacity_gb))
    tier.start(use_cuda=False)
    return tier


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"capacity_gb": 0}, ValueError),
        ({"capacity_gb": -1.0}, ValueError),
        ({"capacity_gb": float("nan")}, ValueError),
        ({"capacity_gb": float("inf")}, ValueError),
        ({"capacity_gb": "4"}, TypeError),
        ({"capacity_gb": True}, TypeError),
        ({"capacity_gb": 1e-9}, ValueError),  # less than one aligned block
        ({"alignment": 3000}, ValueError),
        ({"alignment": 0}, ValueError),
        ({"alignment": 4096.0}, TypeError),
    ],
)
def test_settings_reject_bad_values(kwargs, error):
    with pytest.raises(error):
        PinnedHostSettings(**kwargs)


def test_settings_round_the_capacity_down_to_whole_blocks():
    assert PinnedHostSettings().capacity_bytes == 4 << 30
    assert PinnedHostSettings(capacity_gb=2, alignment=4096).capacity_bytes == 2 << 30
    odd = PinnedHostSettings(capacity_gb=10_000 / (1 << 30), alignment=4096)
    assert odd.capacity_bytes == 8192


def test_registers_itself_as_a_tier():
    registry = StrategyRegistry()
    pinned_host.djinn_register_strategies(registry)
    spec = registry.specs["pinned_host"]
    assert spec.slot == "tier" and spec.settings_cls is PinnedHostSettings
    assert isinstance(spec.factory(PinnedHostSettings(capacity_gb=MIB_IN_GB)), PinnedHostTier)


def test_lifecycle_is_enforced():
    tier = PinnedHostTier(PinnedHostSettings(capacity_gb=MIB_IN_GB))
    with pytest.raises(RuntimeError, match="not started"):
        tier.allocate(10)
    tier.start(use_cuda=False)
    with pytest.raises(RuntimeError, match="already started"):
        tier.start(use_cuda=False)
    tier.stop()
    with pytest.raises(RuntimeError, match="not started"):
        tier.allocate(10)


def test_view_is_a_slice_of_the_arena():
    tier = started_tier()
    arena = tier.arena
    block = tier.allocate(5000)
    view = tier.view(block)
    assert view.dtype == torch.uint8 and view.shape == (5000,)
    assert view.data_ptr() == arena.data_ptr() + block.offset
    view.copy_(pattern(5000, 1))
    assert torch.equal(arena[block.offset : block.offset + 5000], pattern(5000, 1))
    tier.free(block)
    with pytest.raises(ValueError):
        tier.view(block)


def test_stats_follow_allocations_and_report_unpinned_memory_without_cuda():
    tier = started_tier()
    capacity = 1 << 20
    assert tier.stats().capacity_bytes == capacity and tier.stats().used_bytes == 0
    blocks = [tier.allocate(4096) for _ in range(3)]
    tier.free(blocks[1])
    stats = tier.stats()
    assert (stats.used_bytes, stats.allocations) == (2 * 4096, 2)
    assert stats.largest_free_bytes == capacity - 3 * 4096
    assert stats.pinned is False


def test_churn_never_touches_stored_data_and_never_reallocates():
    rng = random.Random(7)
    tier = started_tier()
    arena_ptr = tier.arena.data_ptr()
    live: dict[int, tuple[TierBlock, int]] = {}  # offset -> (block, pattern key)

    def verify_all() -> None:
        for block, key in live.values():
            assert torch.equal(tier.view(block), pattern(block.nbytes, key)), block

    fulls = 0
    for step in range(5000):
        if live and rng.random() < 0.45:
            block, key = live.pop(rng.choice(list(live)))
            assert torch.equal(tier.view(block), pattern(block.nbytes, key))
            tier.free(block)
        else:
            nbytes = rng.randint(1, MAX_BLOCK)
            try:
                block = tier.allocate(nbytes)
            except TierFullError as full:
                assert str(nbytes) in str(full)
                fulls += 1
                verify_all()
            else:
                tier.view(block).copy_(pattern(nbytes, step))
                live[block.offset] = (block, step)
        if step % 500 == 0:
            verify_all()
        assert tier.arena.data_ptr() == arena_ptr
    assert fulls > 0, "the churn never filled the tier"
    verify_all()
    ranges = sorted((b.offset, -(-b.nbytes // 4096) * 4096) for b, _ in live.values())
    for (offset, size), (next_offset, _) in zip(ranges, ranges[1:]):
        assert offset + size <= next_offset, "live blocks overlap"
    for block, _ in live.values():
        tier.free(block)
    stats = tier.stats()
    assert (stats.used_bytes, stats.allocations) == (0, 0)
    assert stats.largest_free_bytes == stats.capacity_bytes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_arena_is_pinned_under_cuda():
    tier = PinnedHostTier(PinnedHostSettings(capacity_gb=MIB_IN_GB))
    tier.start(use_cuda=True)
    block = tier.allocate(4096)
    assert tier.stats().pinned and tier.view(block).is_pinned()


def test_tier_is_built_from_its_settings_table(make_plugins):
    config = parse_config({"settings": {"pinned_host": {"capacity_gb": 0.25}}}, source="plugins.toml")
    tier = make_plugins(config).build("pinned_host")
    assert isinstance(tier, PinnedHostTier) and tier.stats().capacity_bytes == 1 << 28
    bad = parse_config({"settings": {"pinned_host": {"alignment": 1000}}}, source="plugins.toml")
    with pytest.raises(ConfigError, match="alignment"):
        make_plugins(bad)
