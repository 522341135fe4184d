"""``static``: the no-virtualization baseline. Never evicts; a session is admitted only while
its KV fits, and a request that does not fit waits for memory or is refused."""

from __future__ import annotations

from collections.abc import Sequence

from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import Scheduler, SchedulerView, SessionInfo


class StaticScheduler(Scheduler):
    """Keep every session resident; admit only what fits."""

    def select_victims(
        self, candidates: Sequence[SessionInfo], need_bytes: int, view: SchedulerView
    ) -> Sequence[SessionInfo]:
        """Never evict."""
        return ()


@hookimpl
def djinn_register_strategies(registry) -> None:
    """Offer the ``static`` scheduler."""
    registry.add("scheduler", "static", StaticScheduler)
