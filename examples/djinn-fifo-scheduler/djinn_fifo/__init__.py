"""A first-in-first-out scheduler for Djinn, shipped as its own distribution.

Requests run in the order their sessions were created; under memory pressure the oldest
session is evicted first. Phase signals are ignored, except that it counts them (an event hook).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import Action, Scheduler, SessionInfo


@attrs.frozen
class FifoSettings:
    """Settings under ``[settings.fifo]``."""

    #: evict at most this many sessions to make room for one request
    max_victims: int = 8


class FifoScheduler(Scheduler):
    """Oldest session first, for running and for eviction."""

    def __init__(self, settings: FifoSettings) -> None:
        self.settings = settings
        self.signals_seen = 0

    def on_phase(self, session: SessionInfo, now: float) -> Sequence[Action]:
        """FIFO ignores phases."""
        self.signals_seen += 1
        return []

    def on_tick(self, sessions: Sequence[SessionInfo], now: float) -> Sequence[Action]:
        """Nothing proactive."""
        return []

    def select_victims(
        self, candidates: Sequence[SessionInfo], need_bytes: int, now: float
    ) -> Sequence[SessionInfo]:
        """Evict the oldest sessions until ``need_bytes`` are free, within ``max_victims``."""
        chosen, freed = [], 0
        for session in sorted(candidates, key=lambda s: s.created_at)[: self.settings.max_victims]:
            if freed >= need_bytes:
                break
            chosen.append(session)
            freed += session.kv_bytes
        return chosen if freed >= need_bytes else []

    def order(self, waiting: Sequence[SessionInfo]) -> Sequence[SessionInfo]:
        """Run the oldest session's request first."""
        return sorted(waiting, key=lambda s: s.created_at)


@hookimpl
def djinn_register_strategies(registry) -> None:
    """Offer the ``fifo`` scheduler."""
    registry.add("scheduler", "fifo", FifoScheduler, settings=FifoSettings)
