"""``PlacementContract``: what every ``Placement`` promises, as tests a plugin's package reuses.

    from djinn.testing import PlacementContract

    class TestNearest(PlacementContract):
        plugin = "nearest"
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pytest

from djinn.kernel.strategies import Phase, Placement, Residency, TierStats
from djinn.testing._plugins import build_strategy
from djinn.testing.scheduler import sessions


def _stats(pinned: bool) -> TierStats:
    return TierStats(capacity_bytes=1 << 20, used_bytes=1 << 19, largest_free_bytes=1 << 18, allocations=3,
                     pinned=pinned)


#: tier line-ups a placement may be given, fastest first: name -> pinned
LINE_UPS = [
    {"pinned_host": True},
    {"pinned_host": True, "disk": False},
    {"disk": False},
    {"pinned_host": False, "disk": False},
    {"near": True, "far": True, "disk": False},
]


class PlacementContract:
    """Tests every placement passes. Subclass with ``plugin = "NAME"`` (its entry-point name);
    ``settings`` is its ``[settings.NAME]`` table."""

    plugin: ClassVar[str]
    settings: ClassVar[Mapping[str, Any]] = {}

    @pytest.fixture
    def placement(self) -> Placement:
        """The placement, built through a fresh plugin manager by its entry-point name."""
        return build_strategy(self.plugin, "tier_placement", self.settings)

    def test_it_is_a_placement(self, placement: Placement) -> None:
        """The built strategy is a ``Placement``."""
        assert isinstance(placement, Placement)

    @pytest.mark.parametrize("pinned_host", [False, True])
    @pytest.mark.parametrize("line_up", range(len(LINE_UPS)))
    def test_copy_tiers_are_distinct_tiers_it_was_given(
        self, placement: Placement, line_up: int, pinned_host: bool
    ) -> None:
        """``copy_tiers`` names only tiers of its argument, each at most once, and leaves the
        mapping as it was."""
        tiers = {name: _stats(pinned) for name, pinned in LINE_UPS[line_up].items()}
        given = dict(tiers)
        chosen = list(placement.copy_tiers(given, pinned_host))
        assert given == tiers, "copy_tiers changed the mapping it was given"
        assert all(name in tiers for name in chosen), f"{chosen} names a tier it was not given"
        assert len(set(chosen)) == len(chosen), f"{chosen} repeats a tier"

    @pytest.mark.parametrize("seed", range(4))
    def test_demotions_are_distinct_members_of_the_candidates(self, placement: Placement, seed: int) -> None:
        """``select_demotions`` picks among the candidates only, each at most once, whatever the
        requester's hint, and leaves the list it was given as it was."""
        candidates = sessions(10, seed, residency=Residency.EVICTED, busy=False)
        for requester in sessions(4, seed + 10, residency=Residency.EVICTING, phase=Phase.IO_WAIT):
            given = list(candidates)
            demoted = list(placement.select_demotions("pinned_host", given, requester))
            assert given == candidates, "select_demotions changed the list it was given"
            assert all(s in candidates for s in demoted), "a demoted session is not a candidate"
            assert len({s.id for s in demoted}) == len(demoted), "a demoted session repeats"
        assert list(placement.select_demotions("pinned_host", [], candidates[0])) == []

    @pytest.mark.parametrize("line_up", range(len(LINE_UPS)))
    def test_promotions_go_to_another_copy_tier(self, placement: Placement, line_up: int) -> None:
        """``promote_to`` names copy tiers only, never the tier the copy is already in."""
        tiers = {name: _stats(pinned) for name, pinned in LINE_UPS[line_up].items()}
        copy_tiers = list(placement.copy_tiers(tiers, True))
        for session in sessions(3, line_up, residency=Residency.RESTORING):
            for tier in tiers:
                targets = list(placement.promote_to(session, tier, copy_tiers))
                assert all(t in copy_tiers for t in targets), f"{targets} names a tier the device does not use"
                assert tier not in targets, f"a copy in {tier} is promoted to {tier}"
