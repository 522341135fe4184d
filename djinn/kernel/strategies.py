"""The hot-path contracts the kernel calls, scheduler, tier and placement, and the records they see.
Required methods are abstract; optional ones default to doing nothing. The contracts of the slots
other layers call live with those layers: ``Transport`` and ``Serializer`` in
``djinn.wire.contracts``, ``Streamer`` in ``djinn.engine.streaming``.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:  # torch stays out of the CLI's start-up path
    import torch


# --------------------------------------------------------------------------- sessions and schedulers
class Phase(enum.Enum):
    """What a client says its session is doing."""
    COMPUTE = "COMPUTE"
    IO_WAIT = "IO_WAIT"


class Residency(enum.Enum):
    """Where a session's KV is, and whether it is moving. A RESIDENT session may also hold a
    clean copy in a tier (``SessionInfo.backed``, after a write-back)."""
    RESIDENT = "RESIDENT"
    EVICTING = "EVICTING"
    EVICTED = "EVICTED"
    RESTORING = "RESTORING"


@attrs.frozen
class SessionInfo:
    """A session as schedulers and hooks see it: a frozen snapshot, replaced whenever it changes."""
    id: int
    created_at: float
    phase: Phase = Phase.COMPUTE
    residency: Residency = Residency.RESIDENT
    kv_bytes: int = 0
    last_used: float = 0.0
    #: the client's hint with its last IO_WAIT: when it expects to need the session again
    expected_resume_at: float | None = None
    #: True while a request of this session is queued or running
    busy: bool = False
    #: RESIDENT with a clean copy of its KV in a tier (a write-back): freeing its GPU blocks needs no copy
    backed: bool = False
    #: when the session's current (or last) request arrived (monotonic)
    request_at: float | None = None
    #: the current (or last) request is the first after an IO_WAIT: an agent resuming after a tool call
    resuming: bool = False


@attrs.frozen
class MemoryView:
    """Memory pressure: device bytes, each tier's free bytes, the requests in the admission queue."""
    device_budget_bytes: int
    device_free_bytes: int
    tier_free_bytes: Mapping[str, int]
    queued_requests: int


@attrs.frozen
class SchedulerView:
    """Everything a scheduler may look at, frozen at the moment it is asked."""
    now: float  # time.monotonic()
    sessions: tuple[SessionInfo, ...]
    memory: MemoryView


class ActionKind(enum.Enum):
    """What a scheduler may ask the kernel to do with one session's KV."""
    EVICT = "evict"
    RESTORE = "restore"
    #: copy the KV to a tier but keep its GPU blocks (the session stays RESIDENT, ``backed``)
    WRITE_BACK = "write_back"


@attrs.frozen
class Action:
    """A scheduler's decision: move one session's KV, now (``at`` None) or at monotonic time ``at``."""
    kind: ActionKind = attrs.field(validator=attrs.validators.instance_of(ActionKind))
    session_id: int
    at: float | None = None


def take_until(ordered: Iterable[SessionInfo], need_bytes: int) -> list[SessionInfo]:
    """Sessions from ``ordered`` until their KV adds up to ``need_bytes``; [] if it never does.
    The usual body of ``Scheduler.select_victims``: sort the candidates by preference, take these."""
    chosen: list[SessionInfo] = []
    freed = 0
    for session in ordered:
        if freed >= need_bytes:
            break
        chosen.append(session)
        freed += session.kv_bytes
    return chosen if freed >= need_bytes else []


class Scheduler(ABC):
    """Policy over session residency and the order of waiting prompts. Only ``select_victims`` is
    required; the others default to doing nothing (reactive paging, arrival order). Called on the
    event-loop thread (``order_prefill``: the model thread); a scheduler never blocks and never
    mutates what it is given: it answers with ``Action`` lists.
    """

    #: True: a victim's KV is dropped, not moved to a tier, and the kernel prefills the session's
    #: tokens again when next needed (recomputation instead of a copy)
    drops_kv: bool = False

    def on_phase(self, session: SessionInfo, view: SchedulerView) -> Sequence[Action]:
        """A session changed phase (``session.phase`` is the new one). Once per signal."""
        return ()

    def on_tick(self, view: SchedulerView) -> Sequence[Action]:
        """A periodic look at all sessions (every ``[server] tick_s``): timed prefetch, idle fallback."""
        return ()

    @abstractmethod
    def select_victims(
        self, candidates: Sequence[SessionInfo], need_bytes: int, view: SchedulerView
    ) -> Sequence[SessionInfo]:
        """Pick among ``candidates`` (resident, idle) sessions to evict so ``need_bytes`` become free.

        Called when an allocation does not fit. A ``backed`` candidate is freed with no copy (a
        reclaim); any other needs a copy to a tier. Returning fewer bytes than needed (or nothing)
        means "do not evict for this": the request waits in the admission queue or fails."""

    def order_prefill(self, waiting: Sequence[SessionInfo], now: float) -> Sequence[SessionInfo]:
        """Order the sessions whose prompts wait to be prefilled (the engine fills a step's prefill
        budget in this order). On the model thread, once per engine step whose waiting prompts exceed
        that budget. Default: arrival order, as given."""
        return waiting


# --------------------------------------------------------------------------- memory tiers
@attrs.frozen
class TierBlock:
    """A range inside a tier's arena."""
    offset: int
    nbytes: int


@attrs.frozen
class TierStats:
    """A tier's occupancy, for accounting and metrics."""
    capacity_bytes: int
    used_bytes: int
    largest_free_bytes: int
    allocations: int
    pinned: bool


class Tier(ABC):
    """A place outside GPU memory for evicted tensors: one arena allocated once at start."""

    @abstractmethod
    def start(self, use_cuda: bool) -> None:
        """Allocate the arena (pinned when ``use_cuda``). Once, at kernel start-up."""

    @abstractmethod
    def allocate(self, nbytes: int) -> TierBlock:
        """Reserve ``nbytes``; raise ``TierFullError`` when no free range is large enough."""

    @abstractmethod
    def free(self, block: TierBlock) -> None:
        """Return a block; adjacent free ranges coalesce."""

    @abstractmethod
    def view(self, block: TierBlock) -> torch.Tensor:
        """A 1-D uint8 tensor over the block's bytes (no copy)."""

    @abstractmethod
    def stats(self) -> TierStats:
        """Current occupancy."""

    def stop(self) -> None:
        """Release the arena. Once, at shutdown."""


# --------------------------------------------------------------------------- tier placement
class Placement(ABC):
    """Policy over where a session's tier copy lives. Tiers are given in their configured order,
    fastest first; a demotion moves a copy to a later tier, a promotion to a copy tier before a
    restore. The kernel allocates, copies, accounts and counts; a placement only answers, on the
    event-loop thread, once per eviction, demotion or restore (never per chunk). It never blocks
    and never mutates what it is given. Only ``copy_tiers`` is required; by default a full tier
    demotes nothing and a restore reads the copy where it is.
    """

    @abstractmethod
    def copy_tiers(self, tiers: Mapping[str, TierStats], pinned_host: bool) -> Sequence[str]:
        """The tiers the device copies KV into (evictions, write-backs) and reads it back from, in
        the order to try; the others take only demoted copies. ``pinned_host``: the engine copies
        with CUDA."""

    def select_demotions(
        self, tier: str, candidates: Sequence[SessionInfo], requester: SessionInfo
    ) -> Sequence[SessionInfo]:
        """Copy tier ``tier`` has no room for ``requester``'s KV on an eviction (a write-back never
        asks): which ``candidates`` (evicted sessions with an idle copy in ``tier``) to demote, in
        the order to try. The kernel demotes the first that a later tier has room for, then tries
        the allocation again, and asks again while it still does not fit."""
        return ()

    def promote_to(self, session: SessionInfo, tier: str, copy_tiers: Sequence[str]) -> Sequence[str]:
        """A restore of ``session``, whose copy is in ``tier``: the tiers to move the copy into
        first, in the order to try. With none, or none with room, the device reads it in ``tier``."""
        return ()
