"""``semantic``: act on what clients say they are doing.

``IO_WAIT`` evicts the session's KV at once (the copy runs on a side stream; the client is not
made to wait); with ``expected_s`` a restore is scheduled ``prefetch_margin_s`` before the
predicted resume, so the KV is back before the client asks. ``COMPUTE`` restores at once.
Sessions that never signal are evicted after ``idle_threshold_s`` without a request.
Under memory pressure it evicts waiting sessions first (the one expected back last), then the
least recently used.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.strategies import (
    Action,
    ActionKind,
    Phase,
    Residency,
    Scheduler,
    SchedulerView,
    SessionInfo,
    take_until,
)


def _non_negative(_inst: object, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, not {value!r}")


@attrs.frozen
class SemanticSettings:
    """Settings under ``[settings.semantic]``."""

    #: restore this long before the client's expected resume
    prefetch_margin_s: float = attrs.field(default=0.5, validator=_non_negative)
    #: evict a resident session after this long without a request (0 disables the fallback)
    idle_threshold_s: float = attrs.field(default=30.0, validator=_non_negative)


class SemanticScheduler(Scheduler):
    """Evict on IO_WAIT, prefetch before the predicted resume, restore on COMPUTE."""

    def __init__(self, settings: SemanticSettings) -> None:
        self.settings = settings

    def on_phase(self, session: SessionInfo, view: SchedulerView) -> Sequence[Action]:
        """IO_WAIT -> evict now (and restore ahead of the hint); COMPUTE -> restore now."""
        if session.phase is Phase.IO_WAIT:
            actions = [Action(ActionKind.EVICT, session.id)]
            if session.expected_resume_at is not None:
                at = max(view.now, session.expected_resume_at - self.settings.prefetch_margin_s)
                actions.append(Action(ActionKind.RESTORE, session.id, at=at))
            return actions
        if session.residency in (Residency.EVICTED, Residency.EVICTING):
            return [Action(ActionKind.RESTORE, session.id)]
        return []

    def on_tick(self, view: SchedulerView) -> Sequence[Action]:
        """Evict sessions that never signal once they have been idle past the threshold."""
        limit = self.settings.idle_threshold_s
        if limit <= 0:
            return []
        return [
            Action(ActionKind.EVICT, s.id)
            for s in view.sessions
            if s.phase is Phase.COMPUTE and s.residency is Residency.RESIDENT
            and not s.busy and s.kv_bytes > 0 and view.now - s.last_used > limit
        ]

    def select_victims(
        self, candidates: Sequence[SessionInfo], need_bytes: int, view: SchedulerView
    ) -> Sequence[SessionInfo]:
        """Waiting sessions first (latest expected resume first), then least recently used."""
        def key(s: SessionInfo) -> tuple[int, float]:
            if s.phase is Phase.IO_WAIT:
                resume = s.expected_resume_at if s.expected_resume_at is not None else float("inf")
                return (0, -resume)
            return (1, s.last_used)

        return take_until(sorted(candidates, key=key), need_bytes)


@hookimpl
def djinn_register_strategies(registry) -> None:
    """Offer the ``semantic`` scheduler."""
    registry.add("scheduler", "semantic", SemanticScheduler, settings=SemanticSettings)
