"""``tiered``: the tiers as a hierarchy, fastest first. The device copies KV only to and from the
tiers it reads fast; a full one demotes its coldest copies to the tiers after it, so the sessions
expected back soonest stay in the fastest tier; a restore of a copy that was demoted first
promotes it back to a tier the device copies from, when one has room."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import Placement, SessionInfo, TierStats


def coldness(session: SessionInfo) -> tuple[int, float]:
    """Sorts the coldest first: the latest expected resume, then (no hint) the least recently used."""
    resume_at = session.expected_resume_at
    return (1, session.last_used) if resume_at is None else (0, -resume_at)


class TieredPlacement(Placement):
    """Pinned tiers for the device's copies (with CUDA), coldest-first demotion, promotion before
    a restore."""

    def copy_tiers(self, tiers: Mapping[str, TierStats], pinned_host: bool) -> Sequence[str]:
        """With CUDA the pinned tiers, unless none is pinned; else every tier. A copy over
        pageable memory (a disk tier's mapping) runs in the host CPU while the file's pages fault,
        and on an H200 it held up the whole device."""
        pinned = [name for name, stats in tiers.items() if stats.pinned]
        return pinned if pinned_host and pinned else list(tiers)

    def select_demotions(
        self, tier: str, candidates: Sequence[SessionInfo], requester: SessionInfo
    ) -> Sequence[SessionInfo]:
        """The copies colder than the requester's, coldest first."""
        than = coldness(requester)
        return sorted((s for s in candidates if coldness(s) < than), key=coldness)

    def promote_to(self, session: SessionInfo, tier: str, copy_tiers: Sequence[str]) -> Sequence[str]:
        """The copy tiers, when the copy is in none of them (the device then reads pinned memory)."""
        return () if tier in copy_tiers else copy_tiers


@hookimpl
def djinn_register_strategies(registry) -> None:
    """Offer the ``tiered`` placement."""
    registry.add("tier_placement", "tiered", TieredPlacement)
