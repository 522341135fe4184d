"""The placement contract: the built-in ``tiered`` decides where tier copies go (pinned tiers for
the device's copies with CUDA, coldest-first demotion, promotion before a restore), and the
kernel carries out what a placement decides and nothing else."""

from __future__ import annotations

import attrs

from djinn.client import connect
from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import Placement, Residency, SessionInfo, TierStats
from djinn.plugins.placements.tiered import TieredPlacement
from eval.reliability.run import books
from tests.test_kernel import wait_for
from tests.test_tier_disk import _one_session_each_on_gpu_and_host


def _stats(pinned: bool) -> TierStats:
    return TierStats(capacity_bytes=100, used_bytes=100, largest_free_bytes=0, allocations=1, pinned=pinned)


def test_tiered_copies_to_pinned_tiers_only_when_the_engine_copies_with_cuda():
    tiers = {"pinned_host": _stats(True), "disk": _stats(False)}
    placement = TieredPlacement()
    assert placement.copy_tiers(tiers, pinned_host=True) == ["pinned_host"]
    assert placement.copy_tiers(tiers, pinned_host=False) == ["pinned_host", "disk"]
    unpinned = {"pinned_host": _stats(False), "disk": _stats(False)}
    assert placement.copy_tiers(unpinned, pinned_host=True) == ["pinned_host", "disk"]  # none pinned: every tier


def test_tiered_demotes_only_colder_copies_coldest_first():
    """Colder: expected back later, or with no hint (after every hinted one), least recently used."""
    now = 1000.0
    soon = SessionInfo(id=1, created_at=0, expected_resume_at=now + 5)
    later = SessionInfo(id=2, created_at=0, expected_resume_at=now + 600)
    latest = SessionInfo(id=3, created_at=0, expected_resume_at=now + 900)
    stale = SessionInfo(id=4, created_at=0, last_used=10.0)
    fresh = SessionInfo(id=5, created_at=0, last_used=900.0)
    candidates = [soon, fresh, later, stale, latest]
    placement = TieredPlacement()
    requester = SessionInfo(id=9, created_at=0, expected_resume_at=now + 60)
    assert placement.select_demotions("pinned_host", candidates, requester) == [latest, later]
    no_hint = SessionInfo(id=9, created_at=0, last_used=500.0)
    assert placement.select_demotions("pinned_host", candidates, no_hint) == [latest, later, soon, stale]
    assert placement.select_demotions("pinned_host", candidates, attrs.evolve(latest, id=9)) == []


def test_tiered_promotes_a_copy_outside_the_copy_tiers():
    placement, copy_tiers = TieredPlacement(), ["pinned_host"]
    session = SessionInfo(id=1, created_at=0, residency=Residency.RESTORING)
    assert placement.promote_to(session, "disk", copy_tiers) == ["pinned_host"]
    assert placement.promote_to(session, "pinned_host", copy_tiers) == ()


class RecordingPlacement(TieredPlacement):
    """``tiered``'s copy tiers, but it demotes nothing; records the demotions the kernel asks for."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, tuple[int, ...], int]] = []

    def select_demotions(self, tier, candidates, requester):
        self.asked.append((tier, tuple(s.id for s in candidates), requester.id))
        return ()


class RecordingPlugin:
    def __init__(self, placement: Placement) -> None:
        self.placement = placement

    @hookimpl
    def djinn_register_strategies(self, registry):
        registry.add("tier_placement", "recording", lambda: self.placement)


def test_the_kernel_follows_a_placement_that_never_demotes(tmp_path):
    """With the host tier full, the kernel asks the placement which copies to demote; told none,
    it demotes nothing and copies the next eviction to the next copy tier the placement names."""
    placement = RecordingPlacement()
    server = _one_session_each_on_gpu_and_host(tmp_path, recording=RecordingPlugin(placement))
    kernel = server.kernel
    assert kernel.placement is placement
    try:
        with connect(server.url("tcp")) as client:
            model = client.model()
            cold, warm = model.session(), model.session()
            cold.generate([11, 12, 13], max_new_tokens=8)
            cold.signal_phase("IO_WAIT", expected_s=60)
            assert wait_for(lambda: server.call(lambda: kernel.get(cold.id).info.residency) is Residency.EVICTED)
            warm.generate([1, 2, 3], max_new_tokens=8)
            warm.signal_phase("IO_WAIT", expected_s=1)
            assert wait_for(lambda: server.call(lambda: kernel.get(warm.id).info.residency) is Residency.EVICTED)
            assert server.call(lambda: (kernel.get(cold.id).tier, kernel.get(warm.id).tier)) == ("pinned_host", "disk")
            assert placement.asked and all(ask == ("pinned_host", (cold.id,), warm.id) for ask in placement.asked)
            assert server.call(lambda: kernel.counters["demotions"]) == 0
            cold.close()
            warm.close()
        assert wait_for(lambda: books(server)["sessions"] == 0)
        assert books(server) == {k: 0 for k in books(server)}
    finally:
        server.stop()
