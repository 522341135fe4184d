"""``SchedulerContract``: what every ``Scheduler`` promises, as tests a plugin's package reuses.

    from djinn.testing import SchedulerContract

    class TestFifo(SchedulerContract):
        plugin = "fifo"
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs
import pytest

from djinn.kernel.strategies import (
    Action,
    ActionKind,
    MemoryView,
    Phase,
    Residency,
    Scheduler,
    SchedulerView,
    SessionInfo,
)
from djinn.testing._plugins import build_strategy

NOW = 10_000.0  # a monotonic clock reading far from zero, so "idle for long" is possible


def sessions(count: int, seed: int, **fixed: Any) -> list[SessionInfo]:
    """``count`` sessions with varied ages, phases, hints and KV sizes (``fixed`` overrides)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        phase = rng.choice(list(Phase))
        fields = {
            "id": 100 + i,
            "created_at": rng.uniform(0, NOW),
            "phase": phase,
            "residency": rng.choice(list(Residency)),
            "kv_bytes": rng.choice([0, 4096, 65536, 1 << 20]),
            "last_used": rng.uniform(0, NOW),
            "expected_resume_at": rng.choice([None, NOW + rng.uniform(-5, 60)]) if phase is Phase.IO_WAIT else None,
            "busy": rng.random() < 0.3,
        }
        fields.update(fixed)
        out.append(SessionInfo(**fields))
    return out


def view_of(members: Sequence[SessionInfo], now: float = NOW) -> SchedulerView:
    """A frozen view holding ``members`` under moderate memory pressure."""
    memory = MemoryView(
        device_budget_bytes=64 << 20,
        device_free_bytes=1 << 20,
        tier_free_bytes={"pinned_host": 32 << 20},
        queued_requests=1,
    )
    return SchedulerView(now=now, sessions=tuple(members), memory=memory)


class SchedulerContract:
    """Tests every scheduler passes. Subclass with ``plugin = "NAME"`` (its entry-point name);
    ``settings`` is its ``[settings.NAME]`` table."""

    plugin: ClassVar[str]
    settings: ClassVar[Mapping[str, Any]] = {}

    @pytest.fixture
    def scheduler(self) -> Scheduler:
        """The scheduler, built through a fresh plugin manager by its entry-point name."""
        return build_strategy(self.plugin, "scheduler", self.settings)

    def assert_actions(self, actions: Sequence[Action], view: SchedulerView) -> None:
        """Each action moves one session of ``view``, now or at a given time."""
        known = {s.id for s in view.sessions}
        for action in actions:
            assert isinstance(action, Action), action
            assert isinstance(action.kind, ActionKind), action
            assert action.session_id in known, f"{action} names no session of the view"
            assert action.at is None or isinstance(action.at, float | int), action

    def test_it_is_a_scheduler(self, scheduler: Scheduler) -> None:
        """The built strategy is a ``Scheduler`` with a boolean ``drops_kv``."""
        assert isinstance(scheduler, Scheduler)
        assert isinstance(scheduler.drops_kv, bool)

    @pytest.mark.parametrize("seed", range(4))
    def test_victims_are_distinct_members_of_the_candidates(self, scheduler: Scheduler, seed: int) -> None:
        """For every need from nothing to more than all candidates hold, the victims are a subset
        of the candidates without repeats, and the candidates are left as they were."""
        candidates = sessions(12, seed, residency=Residency.RESIDENT, busy=False)
        busy = [attrs.evolve(s, id=900 + k) for k, s in enumerate(sessions(3, seed + 50, busy=True))]
        view = view_of([*candidates, *busy])
        total = sum(s.kv_bytes for s in candidates)
        for need in (0, 1, 4096, total // 3, total // 2, total - 1, total, total + 1, 10 * total + 1):
            given = list(candidates)
            victims = list(scheduler.select_victims(given, need, view))
            assert given == candidates, "select_victims changed the list it was given"
            assert all(v in candidates for v in victims), f"need {need}: a victim is not a candidate"
            assert len({v.id for v in victims}) == len(victims), f"need {need}: a victim repeats"

    def test_no_candidates_means_no_victims(self, scheduler: Scheduler) -> None:
        """With nothing to choose from nothing is chosen."""
        assert list(scheduler.select_victims([], 1 << 20, view_of([]))) == []

    @pytest.mark.parametrize("seed", range(4))
    def test_phase_changes_answer_actions_on_known_sessions(self, scheduler: Scheduler, seed: int) -> None:
        """``on_phase`` for a session in each phase and residency returns actions on sessions of
        the view, and leaves the view's sessions unchanged."""
        members = sessions(8, seed)
        view = view_of(members)
        for session in members:
            actions = scheduler.on_phase(session, view)
            self.assert_actions(actions, view)
        assert list(view.sessions) == members

    @pytest.mark.parametrize("now", [NOW, NOW + 1e6])
    def test_ticks_answer_actions_on_known_sessions(self, scheduler: Scheduler, now: float) -> None:
        """``on_tick``, soon after the sessions' last use and long after it, returns actions on
        sessions of the view only."""
        members = sessions(10, 7)
        view = view_of(members, now=now)
        self.assert_actions(scheduler.on_tick(view), view)
        self.assert_actions(scheduler.on_tick(view_of([], now=now)), view_of([], now=now))

    @pytest.mark.parametrize("count", [0, 1, 2, 9])
    def test_prefill_order_is_drawn_from_the_waiting_sessions(self, scheduler: Scheduler, count: int) -> None:
        """``order_prefill`` returns waiting sessions only, each at most once, and leaves the list
        it was given as it was."""
        waiting = sessions(count, 11, busy=True)
        given = list(waiting)
        ordered = list(scheduler.order_prefill(given, NOW))
        assert given == waiting, "order_prefill changed the list it was given"
        assert all(s in waiting for s in ordered)
        assert len({s.id for s in ordered}) == len(ordered)
