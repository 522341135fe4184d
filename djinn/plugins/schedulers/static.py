"""``static``: the no-virtualization baseline. Never evicts; a session is admitted only while
its KV fits, and a request that does not fit waits for memory or is refused."""

from __future__ import annotations

from collections.abc import Sequence

from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import Action, Scheduler, SessionInfo


class StaticScheduler(Scheduler):
    """Keep every session resident; admit only what fits."""

    def __init__(self, settings: None = None) -> None:
        self.settings = settings

    def on_phase(self, session: SessionInfo, now: float) -> Sequence[Action]:
        """Signals change nothing."""
        return []

    def on_tick(self, sessions: Sequence[SessionInfo], now: float) -> Sequence[Action]:
        """Nothing proactive."""
        return []

    def select_victims(
        self, candidates: Sequence[SessionInfo], need_bytes: int, now: float
    ) -> Sequence[SessionInfo]:
        """Never evict."""
        return []


@hookimpl
def djinn_register_strategies(registry) -> None:
    """Offer the ``static`` scheduler."""
    registry.add("scheduler", "static", StaticScheduler)
