"""A first-in-first-out scheduler for Djinn, shipped as its own distribution.

Waiting prompts are prefilled oldest session first; under memory pressure the oldest sessions
are evicted first, at most ``max_victims`` for one request. Phase signals are ignored.
"""

from __future__ import annotations

import attrs

from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import Scheduler, take_until


@attrs.frozen
class FifoSettings:
    """Settings under ``[settings.fifo]``."""

    #: evict at most this many sessions to make room for one request
    max_victims: int = 8


class FifoScheduler(Scheduler):
    """Oldest session first, for prefilling and for eviction."""

    def __init__(self, settings: FifoSettings) -> None:
        self.settings = settings

    def select_victims(self, candidates, need_bytes, view):
        """The oldest sessions until ``need_bytes`` are free, within ``max_victims``."""
        oldest = sorted(candidates, key=lambda s: s.created_at)[: self.settings.max_victims]
        return take_until(oldest, need_bytes)

    def order_prefill(self, waiting, now):
        """The oldest session's prompt first."""
        return sorted(waiting, key=lambda s: s.created_at)


@hookimpl
def djinn_register_strategies(registry) -> None:
    """Offer the ``fifo`` scheduler."""
    registry.add("scheduler", "fifo", FifoScheduler, settings=FifoSettings)
