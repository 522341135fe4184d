"""``semantic``: act on what clients say they are doing.

With ``write_back`` an idle (``IO_WAIT``) session's KV is copied to a tier and its GPU blocks
stay (the session is ``backed``): under memory pressure they are freed with no copy (a reclaim),
and an agent that resumes first finds its KV where it was, nothing moved back. Copies are made
only while memory runs short: while the device's free bytes plus what backed sessions hold are
under ``write_back_headroom`` of its budget, at ``IO_WAIT`` and on every tick (then the idle
sessions expected back last first), so a GPU with room to spare makes none (a copy slows the
steps that overlap it). Without ``write_back`` the KV is evicted at ``IO_WAIT``, off the critical
path (the copy runs on a side stream; the client is not made to wait). A restore is scheduled
``prefetch_margin_s`` before the predicted resume: the client's ``expected_s``, else the mean of
the session's past IO_WAIT -> COMPUTE gaps (none observed: no timed prefetch). ``COMPUTE``
restores at once. Sessions that never signal are evicted after ``idle_threshold_s`` without a
request.

Under memory pressure it frees backed sessions first (instant), then waiting sessions (the one
expected back last), then the least recently used. Waiting prompts are prefilled by deadline:
a resume after a tool call is due ``resume_latency_s`` after it arrived, a fresh request
``arrival_latency_s`` after; the earliest deadline goes first.
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


def _fraction(_inst: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be between 0 and 1, not {value!r}")


@attrs.frozen
class SemanticSettings:
    """Settings under ``[settings.semantic]``."""

    #: restore this long before the client's expected resume
    prefetch_margin_s: float = attrs.field(default=0.5, validator=_non_negative)
    #: evict a resident session after this long without a request (0 disables the fallback)
    idle_threshold_s: float = attrs.field(default=30.0, validator=_non_negative)
    #: at IO_WAIT copy the KV to a tier and keep the GPU blocks until memory is needed (True),
    #: or evict it at once (False, the behaviour before write-back)
    write_back: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    #: write back only while free plus reclaimable (backed) device bytes are under this share of
    #: the device budget (1.0: at every IO_WAIT; 0: never). A tenth leaves the copies seconds
    #: ahead of a busy GPU's growth; a larger share starts them sooner, mostly for sessions that
    #: resume before anyone needs their blocks, and every copy slows the steps it overlaps
    write_back_headroom: float = attrs.field(default=0.1, validator=_fraction)
    #: prefill deadline of a request that resumes after a tool call, from its arrival
    resume_latency_s: float = attrs.field(default=0.25, validator=_non_negative)
    #: prefill deadline of any other request, from its arrival
    arrival_latency_s: float = attrs.field(default=2.0, validator=_non_negative)


class SemanticScheduler(Scheduler):
    """Write back when memory runs short (or evict) on IO_WAIT, prefetch before the predicted
    resume, restore on COMPUTE."""

    def __init__(self, settings: SemanticSettings) -> None:
        self.settings = settings
        #: session id -> when its current IO_WAIT began
        self._waiting_since: dict[int, float] = {}
        #: session id -> (sum, count) of its observed IO_WAIT -> COMPUTE gaps
        self._gaps: dict[int, tuple[float, int]] = {}
        #: sessions asked to write back in their current IO_WAIT: one ask each (a write-back the
        #: kernel skips, its tiers full, is not asked again every tick)
        self._asked: set[int] = set()

    def expected_wait_s(self, session_id: int) -> float | None:
        """The mean of the session's observed IO_WAIT -> COMPUTE gaps; None before the first."""
        total, count = self._gaps.get(session_id, (0.0, 0))
        return total / count if count else None

    def headroom_deficit(self, view: SchedulerView) -> int:
        """Device bytes that write-backs should still make reclaimable: the headroom
        (``write_back_headroom`` of the budget) less the free bytes and what backed or
        already-moving sessions hold; 0 or less: none needed."""
        reclaimable = sum(s.kv_bytes for s in view.sessions if s.backed or s.residency is Residency.EVICTING)
        memory = view.memory
        return int(self.settings.write_back_headroom * memory.device_budget_bytes) - memory.device_free_bytes - reclaimable

    def _resume_at(self, session: SessionInfo) -> float:
        """When a waiting session is expected back: its hint, else its learned gap, else never."""
        if session.expected_resume_at is not None:
            return session.expected_resume_at
        learned, since = self.expected_wait_s(session.id), self._waiting_since.get(session.id)
        return since + learned if learned is not None and since is not None else float("inf")

    def on_phase(self, session: SessionInfo, view: SchedulerView) -> Sequence[Action]:
        """IO_WAIT -> evict now, or write back if memory runs short, and restore ahead of the
        hint; COMPUTE -> restore now."""
        self._asked.discard(session.id)
        if session.phase is Phase.IO_WAIT:
            self._waiting_since[session.id] = view.now
            actions = []
            if not self.settings.write_back:
                actions.append(Action(ActionKind.EVICT, session.id))
            elif self.settings.write_back_headroom >= 1 or self.headroom_deficit(view) > 0:
                actions.append(Action(ActionKind.WRITE_BACK, session.id))
                self._asked.add(session.id)
            resume = session.expected_resume_at
            if resume is None and (learned := self.expected_wait_s(session.id)) is not None:
                resume = view.now + learned
            if resume is not None:
                at = max(view.now, resume - self.settings.prefetch_margin_s)
                actions.append(Action(ActionKind.RESTORE, session.id, at=at))
            return actions
        since = self._waiting_since.pop(session.id, None)
        if since is not None:
            total, count = self._gaps.get(session.id, (0.0, 0))
            self._gaps[session.id] = (total + view.now - since, count + 1)
        if session.residency in (Residency.EVICTED, Residency.EVICTING):
            return [Action(ActionKind.RESTORE, session.id)]
        return []

    def on_tick(self, view: SchedulerView) -> Sequence[Action]:
        """Write back waiting sessions not yet asked, those expected back last first, while memory
        runs short and a tier has room; evict sessions that never signal once idle past the threshold."""
        if len(self._gaps) + len(self._waiting_since) > 2 * len(view.sessions) + 64:
            open_ids = {s.id for s in view.sessions}  # forget closed sessions
            self._gaps = {k: v for k, v in self._gaps.items() if k in open_ids}
            self._waiting_since = {k: v for k, v in self._waiting_since.items() if k in open_ids}
            self._asked &= open_ids
        actions = self._top_up(view) if self.settings.write_back else []
        limit = self.settings.idle_threshold_s
        if limit <= 0:
            return actions
        return actions + [
            Action(ActionKind.EVICT, s.id)
            for s in view.sessions
            if s.phase is Phase.COMPUTE and s.residency is Residency.RESIDENT
            and not s.busy and s.kv_bytes > 0 and view.now - s.last_used > limit
        ]

    def _top_up(self, view: SchedulerView) -> list[Action]:
        """Write-backs that cover the headroom deficit, as far as the tiers' free bytes go."""
        deficit = self.headroom_deficit(view)
        if deficit <= 0:
            return []
        room = sum(view.memory.tier_free_bytes.values())
        idle = [s for s in view.sessions if s.phase is Phase.IO_WAIT and s.residency is Residency.RESIDENT
                and not s.backed and not s.busy and s.kv_bytes > 0 and s.id not in self._asked]
        actions = []
        for session in sorted(idle, key=self._resume_at, reverse=True):
            if deficit <= 0 or session.kv_bytes > room:
                break
            actions.append(Action(ActionKind.WRITE_BACK, session.id))
            self._asked.add(session.id)
            deficit -= session.kv_bytes
            room -= session.kv_bytes
        return actions

    def select_victims(
        self, candidates: Sequence[SessionInfo], need_bytes: int, view: SchedulerView
    ) -> Sequence[SessionInfo]:
        """Backed sessions first (freed with no copy), then waiting sessions (latest expected
        resume first), then least recently used."""
        def key(s: SessionInfo) -> tuple[int, int, float]:
            if s.phase is Phase.IO_WAIT:
                resume = s.expected_resume_at if s.expected_resume_at is not None else float("inf")
                return (not s.backed, 0, -resume)
            return (not s.backed, 1, s.last_used)

        return take_until(sorted(candidates, key=key), need_bytes)

    def order_prefill(self, waiting: Sequence[SessionInfo], now: float) -> Sequence[SessionInfo]:
        """Earliest deadline first: arrival plus ``resume_latency_s`` for a resume after a tool
        call, plus ``arrival_latency_s`` for any other request (ties keep the given order)."""
        def deadline(s: SessionInfo) -> float:
            arrived = s.request_at if s.request_at is not None else now
            return arrived + (self.settings.resume_latency_s if s.resuming else self.settings.arrival_latency_s)

        return sorted(waiting, key=deadline)


@hookimpl
def djinn_register_strategies(registry) -> None:
    """Offer the ``semantic`` scheduler."""
    registry.add("scheduler", "semantic", SemanticScheduler, settings=SemanticSettings)
