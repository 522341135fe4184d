"""Every built-in plugin passes the contract suite of its slot (``djinn.testing``)."""

from __future__ import annotations

import pytest

from djinn.kernel.errors import PluginError
from djinn.plugins.transports import ucx
from djinn.testing import PlacementContract, SchedulerContract, StreamerContract, TierContract, TransportContract


def _ucx_missing() -> str | None:
    try:
        ucx.import_ucxx()
    except PluginError as exc:
        return str(exc)
    return None


UCX_MISSING = _ucx_missing()


class TestSemantic(SchedulerContract):
    plugin = "semantic"
    settings = {"idle_threshold_s": 1.0}  # its idle fallback evicts at both clock readings of the tick test


class TestLru(SchedulerContract):
    plugin = "lru"


class TestRecompute(SchedulerContract):
    plugin = "recompute"


class TestStatic(SchedulerContract):
    plugin = "static"


class TestPinnedHost(TierContract):
    plugin = "pinned_host"
    settings = {"capacity_gb": 1 / 1024}  # 1 MiB


class TestSemanticWriteBack(SchedulerContract):
    plugin = "semantic"
    settings = {"idle_threshold_s": 1.0, "write_back": True}


class TestDisk(TierContract):
    plugin = "disk"
    settings = {"capacity_gb": 1 / 1024}  # 1 MiB, in a temporary file


class TestTiered(PlacementContract):
    plugin = "tiered"


class TestResident(StreamerContract):
    plugin = "resident"


class TestRingbuffer(StreamerContract):
    plugin = "ringbuffer"


class TestRingbufferInChunks(StreamerContract):
    plugin = "ringbuffer"
    settings = {"chunk_mb": 1 / 1024, "prefetch_layers": 1}  # 1 KiB copies, one layer ahead


class TestTcp(TransportContract):
    plugin = "tcp"


class TestInproc(TransportContract):
    plugin = "inproc"


@pytest.mark.skipif(UCX_MISSING is not None, reason=UCX_MISSING or "")
class TestUcx(TransportContract):
    plugin = "ucx"


# --------------------------------------------------------------------------- the suites catch breakage


def test_the_scheduler_suite_fails_a_scheduler_that_breaks_the_contract():
    """Victims repeated, the given list reordered, an action on an unknown session, a prefill
    order that invents a session: each is caught."""
    from djinn.kernel.strategies import Action, ActionKind, Scheduler
    from djinn.testing.scheduler import sessions

    class Broken(Scheduler):
        def select_victims(self, candidates, need_bytes, view):
            return [*candidates[:1], *candidates[:1]]

    class Sorts(Scheduler):
        def select_victims(self, candidates, need_bytes, view):
            candidates.sort(key=lambda s: s.id, reverse=True)
            return []

        def on_tick(self, view):
            return [Action(ActionKind.EVICT, 123456)]

        def order_prefill(self, waiting, now):
            return [*waiting, *sessions(1, 99)]

    suite = SchedulerContract()
    with pytest.raises(AssertionError, match="repeats"):
        suite.test_victims_are_distinct_members_of_the_candidates(Broken(), 0)
    with pytest.raises(AssertionError, match="changed the list"):
        suite.test_victims_are_distinct_members_of_the_candidates(Sorts(), 0)
    with pytest.raises(AssertionError, match="names no session"):
        suite.test_ticks_answer_actions_on_known_sessions(Sorts(), 0.0)
    with pytest.raises(AssertionError):
        suite.test_prefill_order_is_drawn_from_the_waiting_sessions(Sorts(), 2)


def test_the_tier_suite_fails_a_tier_whose_blocks_overlap():
    """A tier that hands out every block at offset 0 is caught by the overlap test."""
    from djinn.kernel.strategies import TierBlock
    from djinn.plugins.tiers.pinned_host import PinnedHostSettings, PinnedHostTier

    class Overlapping(PinnedHostTier):
        def allocate(self, nbytes):
            block = super().allocate(nbytes)
            return TierBlock(0, block.nbytes)

        def view(self, block):
            return self.arena[block.offset : block.offset + block.nbytes]

    tier = Overlapping(PinnedHostSettings(capacity_gb=1 / 1024))
    tier.start(False)
    with pytest.raises(AssertionError, match="overwritten"):
        TierContract().test_blocks_never_overlap(tier)


def test_the_streamer_suite_fails_a_streamer_that_changes_the_outputs():
    """A streamer that scales a layer's weights before it runs is caught by the output comparison."""
    from djinn.plugins.streamers.resident import ResidentStreamer

    class Scaling(ResidentStreamer):
        def prepare(self, layers, device, budget_bytes):
            super().prepare(layers, device, budget_bytes)
            self.layers = layers

        def before_layer(self, index):
            if index == 1:
                self.layers[index].down.weight.data.mul_(1.001)

    with pytest.raises(AssertionError):
        StreamerContract().test_streamed_passes_match_plain_layers_bitwise(Scaling(), "none")
