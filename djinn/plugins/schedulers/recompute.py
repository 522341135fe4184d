"""``recompute``: the recomputation baseline. Like ``lru`` it ignores phase signals and picks the
least recently used sessions only under memory pressure, but it drops their KV instead of moving
it to a tier; a dropped session's tokens are prefilled again when it is next needed (what vLLM v1
does on preemption). Sessions that ran a breakpoint pass are never dropped: an edited activation
cannot be recomputed from tokens."""

from __future__ import annotations

from djinn.kernel.hookspecs import hookimpl
from djinn.plugins.schedulers.lru import LruScheduler


class RecomputeScheduler(LruScheduler):
    """Drop least-recently-used sessions' KV under memory pressure; recompute it on their next request."""

    drops_kv = True


@hookimpl
def djinn_register_strategies(registry) -> None:
    """Offer the ``recompute`` scheduler."""
    registry.add("scheduler", "recompute", RecomputeScheduler)
