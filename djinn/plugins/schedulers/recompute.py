"""``recompute``: the recomputation baseline. Like ``lru`` it ignores phase signals and picks the
least recently used sessions only under memory pressure, but it drops their KV instead of moving
it to a tier; a dropped session's tokens are prefilled again when it is next needed (what vLLM v1
does on preemption). Sessions that ran a breakpoint pass are never dropped: an edited activation
cannot be recomputed from tokens."""

from __future__ import annotations

from collections.abc import Sequence

from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import Scheduler, SchedulerView, SessionInfo, take_until


class RecomputeScheduler(Scheduler):
    """Drop least-recently-used sessions' KV under memory pressure; recompute it on their next request."""

    drops_kv = True

    def select_victims(
        self, candidates: Sequence[SessionInfo], need_bytes: int, view: SchedulerView
    ) -> Sequence[SessionInfo]:
        """Oldest ``last_used`` first."""
        return take_until(sorted(candidates, key=lambda s: s.last_used), need_bytes)


@hookimpl
def djinn_register_strategies(registry) -> None:
    """Offer the ``recompute`` scheduler."""
    registry.add("scheduler", "recompute", RecomputeScheduler)
