"""``lru``: the reactive baseline. Ignores phase signals; evicts the least recently used
sessions only when an allocation needs room (what vLLM's swap preemption does)."""

from __future__ import annotations

from collections.abc import Sequence

from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import Action, Scheduler, SessionInfo
from djinn.plugins.schedulers._victims import take_until


class LruScheduler(Scheduler):
    """Evict least-recently-used sessions under memory pressure, and only then."""

    def __init__(self, settings: None = None) -> None:
        self.settings = settings

    def on_phase(self, session: SessionInfo, now: float) -> Sequence[Action]:
        """Signals are ignored: restores happen when a request needs the session."""
        return []

    def on_tick(self, sessions: Sequence[SessionInfo], now: float) -> Sequence[Action]:
        """Nothing proactive."""
        return []

    def select_victims(
        self, candidates: Sequence[SessionInfo], need_bytes: int, now: float
    ) -> Sequence[SessionInfo]:
        """Oldest ``last_used`` first."""
        return take_until(sorted(candidates, key=lambda s: s.last_used), need_bytes)


@hookimpl
def djinn_register_strategies(registry) -> None:
    """Offer the ``lru`` scheduler."""
    registry.add("scheduler", "lru", LruScheduler)
