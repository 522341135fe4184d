"""``lru``: the reactive baseline. Ignores phase signals; evicts the least recently used
sessions only when an allocation needs room (what vLLM's swap preemption does)."""

from __future__ import annotations

from collections.abc import Sequence

from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import Scheduler, SchedulerView, SessionInfo, take_until


class LruScheduler(Scheduler):
    """Evict least-recently-used sessions under memory pressure, and only then."""

    def select_victims(
        self, candidates: Sequence[SessionInfo], need_bytes: int, view: SchedulerView
    ) -> Sequence[SessionInfo]:
        """Oldest ``last_used`` first."""
        return take_until(sorted(candidates, key=lambda s: s.last_used), need_bytes)


@hookimpl
def djinn_register_strategies(registry) -> None:
    """Offer the ``lru`` scheduler."""
    registry.add("scheduler", "lru", LruScheduler)
