"""The kernel: sessions, phases, the residency state machine, admission and memory accounting.

No policy (the scheduler decides; the kernel carries out) and no model code (the engine, behind
``KVBackend``, owns the tensors); everything runs on the server's event-loop thread. Every move of a
session's KV between its states (``Residency``) is one method that does the move, its memory
accounting, its counters and its hook together, so no path can do one without the others::

    RESIDENT --_evict--> EVICTING --> EVICTED          copy to a tier, then free the GPU blocks
    RESIDENT --_write_back--> EVICTING --> RESIDENT+backed   copy to a tier, keep the GPU blocks
    RESIDENT+backed --_reclaim--> EVICTING --> EVICTED free the GPU blocks, no copy
    RESIDENT+backed --_free_copy--> RESIDENT           a request changes the KV: the copy is stale
    RESIDENT --_drop--> EVICTED (dropped)              free the GPU blocks, no copy, no tier
    EVICTED --_restore--> RESTORING --> RESIDENT       copy back from the tier (dropped: prefill again)
    EVICTED --_move_copy--> EVICTED                    its tier copy moves to a later tier (a demotion), or
                                                      to a copy tier before a restore (a promotion)

The placement strategy picks the tiers and the copies to demote; the kernel moves them.
``session.tier``/``session.block`` hold the tier copy of an EVICTED or a backed session; a backed one
is accounted twice, device and tier bytes, until one goes. A session has at most one move in flight
(``session.moving``); a request waits for it, never cancels it. Counters: ``evictions`` counts KV
leaving the GPU (a copy or a reclaim), ``write_backs`` copies that kept the GPU blocks, ``reclaims``
the frees that needed none.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import attrs

from djinn.kernel.backend import KVBackend
from djinn.kernel.config import KernelConfig
from djinn.kernel.errors import AdmissionError, SessionError, TierFullError
from djinn.kernel.memory import MemoryAccounting
from djinn.kernel.plugins import DjinnPlugins
from djinn.kernel.strategies import (
    Action, ActionKind, MemoryView, Phase, Residency, SchedulerView, SessionInfo, TierBlock,
)

log = logging.getLogger(__name__)

COUNTERS = (
    "evictions", "restores", "restores_on_critical_path", "evict_seconds", "restore_seconds", "evict_failures",
    "admission_waits", "admission_refusals", "requests", "tokens", "drops", "recomputes", "recompute_seconds",
    "write_backs", "write_back_seconds", "write_back_skips", "reclaims", "demotions", "demote_seconds",
    "promotions", "promote_seconds",
)


@attrs.define(eq=False)
class Session:
    """A session's server-side record. ``info`` is the frozen view schedulers and hooks get."""

    info: SessionInfo
    kv: Any  # the engine's handle (KVBackend.new_kv)
    owner: object = None
    lock: asyncio.Lock = attrs.Factory(asyncio.Lock)
    #: the in-flight eviction or restore, awaited by a request that needs the KV
    moving: asyncio.Task | None = None
    tier: str | None = None
    block: TierBlock | None = None
    closed: bool = False
    #: the tokens whose KV the session holds, in order (what a recompute prefills again)
    history: list[int] = attrs.Factory(list)
    #: False once a breakpoint pass ran: its KV may hold edited activations, so it is never dropped
    recomputable: bool = True
    #: the KV was dropped (not moved to a tier): restoring it means prefilling ``history`` again
    dropped: bool = False
    #: an IO_WAIT came since the last request: the next one is a resume after a tool call
    after_io_wait: bool = False

    def update(self, **changes: Any) -> None:
        """Replace ``info`` with a copy carrying ``changes``."""
        self.info = attrs.evolve(self.info, **changes)

    def move_in_flight(self) -> bool:
        """Whether a move of this session's KV is running now."""
        return self.moving is not None and not self.moving.done()


class Kernel:
    """One server's mechanism: strategies, sessions, residency, admission, memory. ``tick_s``: how
    often the scheduler's ``on_tick`` runs (a request waiting for memory looks again every 4 ticks)."""

    def __init__(self, config: KernelConfig, plugins: DjinnPlugins, *, tick_s: float) -> None:
        self.config = config
        self.plugins = plugins
        self.tick_s = tick_s
        self.sessions: dict[int, Session] = {}
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.memory = MemoryAccounting(0)
        self.backend: KVBackend | None = None
        self.started = False
        self._ids = itertools.count(1)
        self._timed: list[tuple[float, int, Action]] = []
        self._timed_seq = itertools.count()
        self._memory_freed: asyncio.Condition | None = None
        self._waiting = 0
        self._tick_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    def configure(self) -> None:
        """``djinn_configure``, then build the selected strategies. The engine loads next."""
        self.plugins.notify("djinn_configure", config=self.config)
        self.scheduler = self.plugins.build_slot("scheduler")[0]
        self.placement = self.plugins.build_slot("tier_placement")[0]
        self.streamer = self.plugins.build_slot("streamer")[0]
        self.serializer = self.plugins.build_slot("serializer")[0]
        self.tiers = dict(zip(self.plugins.selection.tiers, self.plugins.build_slot("tier")))
        self.transports = {t.scheme: t for t in self.plugins.build_slot("transport")}

    def start(self, backend: KVBackend) -> None:
        """Attach the engine, allocate the tiers' arenas; then ``djinn_startup``."""
        self.backend = backend
        for tier in self.tiers.values():
            tier.start(backend.pinned_host)
        self.started = True
        self.plugins.notify("djinn_startup", kernel=self)

    @functools.cached_property
    def metrics_registry(self) -> Any:
        """The ``prometheus_client.CollectorRegistry`` that ``/metrics`` serves: plugins register
        their own collectors on it (in ``djinn_startup``)."""
        from prometheus_client import CollectorRegistry

        return CollectorRegistry()

    def stop(self) -> None:
        """``djinn_shutdown``, then free sessions and release the engine and the tiers."""
        if not self.started:
            return
        self.started = False
        try:
            self.plugins.notify("djinn_shutdown", kernel=self)
        finally:
            for session in list(self.sessions.values()):  # the pool goes with the engine
                self._free_session_memory(session, self.backend.held_bytes(session.kv))
            self.sessions.clear()
            self.backend.stop()
            for tier in self.tiers.values():
                tier.stop()

    async def run_background(self) -> None:
        """Start the scheduler's tick loop on the running event loop."""
        self._memory_freed = asyncio.Condition()
        self._tick_task = asyncio.create_task(self._tick_loop(), name="djinn-scheduler-tick")

    async def stop_background(self) -> None:
        """Stop the tick loop."""
        if self._tick_task is not None:
            self._tick_task.cancel()
            await asyncio.gather(self._tick_task, return_exceptions=True)

    # ------------------------------------------------------------------ sessions

    def open_session(self, owner: object = None) -> Session:
        """Create a session with an empty KV; ``djinn_session_created``."""
        now = time.monotonic()
        info = SessionInfo(id=next(self._ids), created_at=now, last_used=now)
        session = Session(info=info, kv=self.backend.new_kv(), owner=owner)
        self.sessions[info.id] = session
        try:
            self.plugins.notify("djinn_session_created", session=info)
        except BaseException:
            del self.sessions[info.id]  # the request fails: nobody would ever close this session
            raise
        return session

    def get(self, session_id: int) -> Session:
        """The open session with this id."""
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionError(f"no open session {session_id}")
        return session

    async def close_session(self, session: Session, reason: str = "closed") -> None:
        """Free the session's KV wherever it is; ``djinn_session_closed``."""
        if session.closed:
            return
        session.closed = True
        await self.backend.cancel(session.kv)  # the engine lets go of the blocks before they are freed
        if session.moving is not None:
            await asyncio.wait({session.moving})
        held = self.backend.held_bytes(session.kv)
        if held:
            await self.backend.release(session.kv, keep_capacity=False)
        self._free_session_memory(session, held)
        # gone from the open sessions only once its bytes are back, so no one sees a session
        # missing whose memory is still accounted
        self.sessions.pop(session.info.id, None)
        await self._notify_freed()
        self.plugins.notify("djinn_session_closed", session=session.info, reason=reason)

    def _free_session_memory(self, session: Session, device_bytes: int) -> None:
        """Return the session's accounted bytes: ``device_bytes`` of KV, and its tier copy."""
        if device_bytes:
            self.memory.release("kv", device_bytes)
        if session.block is not None:
            self._free_copy(session)
        session.update(kv_bytes=0, backed=False)

    @contextlib.asynccontextmanager
    async def serving(self, session: Session, tokens: int) -> AsyncIterator[float]:
        """Hold ``session`` for one request whose KV must reach ``tokens`` tokens: its lock, the busy mark,
        its KV resident and grown (evicting or waiting as admission allows). Yields the restore wait's seconds."""
        async with session.lock:
            if session.closed:
                raise SessionError(f"session {session.info.id} is closed")
            session.update(busy=True, request_at=time.monotonic(), resuming=session.after_io_wait)
            session.after_io_wait = False
            self.counters["requests"] += 1
            try:
                restore_s = await self.ensure_resident(session)
                if session.info.backed:  # the request changes the KV: its tier copy goes stale
                    self._free_copy(session)
                await self._grow_kv(session, tokens)
                yield restore_s
            finally:
                session.update(busy=False, last_used=time.monotonic())

    # ------------------------------------------------------------------ phases and the scheduler

    def view(self, now: float | None = None) -> SchedulerView:
        """What the scheduler sees at ``now`` (default: now): every open session and the memory pressure."""
        tiers = {name: tier.stats() for name, tier in self.tiers.items()}
        return SchedulerView(
            now=time.monotonic() if now is None else now,
            sessions=tuple(s.info for s in self.sessions.values() if not s.closed),
            memory=MemoryView(
                device_budget_bytes=self.memory.budget_bytes, device_free_bytes=self.memory.free_bytes(),
                tier_free_bytes={n: t.capacity_bytes - t.used_bytes for n, t in tiers.items()},
                queued_requests=self._waiting,
            ),
        )

    async def signal_phase(self, session: Session, phase: Phase, expected_s: float | None) -> None:
        """Record a client's phase and hand it to the scheduler; act on its decisions at once."""
        old = session.info.phase
        now = time.monotonic()
        session.update(phase=phase, expected_resume_at=now + expected_s if expected_s is not None else None)
        if phase is Phase.IO_WAIT:
            session.after_io_wait = True
        for action in self.scheduler.on_phase(session.info, self.view(now)):
            self._schedule(action, now)
        self.plugins.notify("djinn_phase_changed", session=session.info, old=old, new=phase)

    def _schedule(self, action: Action, now: float) -> None:
        """Start ``action``'s move in the background, or keep it until its time comes."""
        if action.at is not None and action.at > now:
            heapq.heappush(self._timed, (action.at, next(self._timed_seq), action))
            return
        session = self.sessions.get(action.session_id)
        if session is None or session.closed or session.move_in_flight():
            return  # one move at a time; the scheduler will ask again if it still wants it
        moves = {ActionKind.EVICT: self._free_device, ActionKind.WRITE_BACK: self._write_back}
        session.moving = asyncio.create_task(moves.get(action.kind, self._restore)(session))
        session.moving.add_done_callback(_log_failed_move)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            try:
                while self._timed and self._timed[0][0] <= now:
                    _at, _seq, action = heapq.heappop(self._timed)
                    self._schedule(attrs.evolve(action, at=None), now)
                for action in self.scheduler.on_tick(self.view(now)):
                    self._schedule(action, now)
            except Exception:
                log.exception("scheduler tick failed; continuing")

    # ------------------------------------------------------------------ the residency state machine

    def _movable(self, session: Session) -> bool:
        info = session.info
        return (info.residency is Residency.RESIDENT and not info.busy and not session.closed
                and self.backend.held_bytes(session.kv) > 0)

    def _count(self, **amounts: float) -> None:
        for name, amount in amounts.items():
            self.counters[name] += amount

    async def _free_device(self, session: Session) -> bool:
        """RESIDENT -> EVICTED the scheduler's way: a drop, a reclaim (backed), or a copy to a tier."""
        if self.scheduler.drops_kv:
            return await self._drop(session)
        return await (self._reclaim(session) if session.info.backed else self._evict(session))

    async def _left_device(self, session: Session, nbytes: int, tier: str, seconds: float, **changes: Any) -> None:
        """The end of every move that frees a session's GPU blocks: their bytes back, the session
        EVICTED (with ``changes``), waiters for memory woken, ``djinn_session_evicted``."""
        self.memory.release("kv", nbytes)
        session.update(residency=Residency.EVICTED, **changes)
        await self._notify_freed()
        self.plugins.notify("djinn_session_evicted", session=session.info, tier=tier, nbytes=nbytes, seconds=seconds)

    def _allocate(self, nbytes: int, tiers: Iterable[str]) -> tuple[str, TierBlock] | None:
        """A block of ``nbytes`` in the first of ``tiers`` with room."""
        for name in tiers:
            with contextlib.suppress(TierFullError):
                return name, self.tiers[name].allocate(nbytes)
        return None

    def _device_tiers(self) -> list[str]:
        """The tiers the engine copies KV to and from directly, as the placement names them."""
        stats = {name: tier.stats() for name, tier in self.tiers.items()}
        return list(self.placement.copy_tiers(stats, self.backend.pinned_host))

    async def _placed(self, nbytes: int, requester: Session, make_room: bool) -> tuple[str, TierBlock] | None:
        """A tier block of ``nbytes`` for ``requester``'s KV in the first copy tier with room; with
        ``make_room`` a full one first demotes the copies the placement picks to later tiers."""
        for name in self._device_tiers():
            while (placed := self._allocate(nbytes, [name])) is None and make_room:
                if not await self._demote_one(name, requester):
                    break
            if placed is not None:
                return placed
        return None

    async def _demote_one(self, source: str, requester: Session) -> bool:
        """Move the first evicted copy in tier ``source`` that the placement picks and a later tier
        has room for; False when none can move."""
        names = list(self.tiers)
        later = names[names.index(source) + 1 :]
        if not later:
            return False  # the last tier: nowhere to demote to
        idle = {s.info.id: s for s in self.sessions.values()
                if s.tier == source and s.info.residency is Residency.EVICTED and not s.closed
                and not s.move_in_flight()}
        for info in self.placement.select_demotions(source, [s.info for s in idle.values()], requester.info):
            session = idle.get(info.id)
            if session is not None and (placed := self._allocate(session.block.nbytes, later)) is not None:
                session.moving = asyncio.create_task(self._move_copy(session, *placed, "demotions"))
                return await session.moving
        return False

    async def _move_copy(self, session: Session, tier_name: str, block: TierBlock, counter: str) -> bool:
        """EVICTED -> EVICTED: copy the session's tier copy into ``block`` of ``tier_name`` on a
        worker thread (a host-to-host copy: neither the event loop nor the model thread waits for
        it), then free the old block; counted as ``counter`` ("demotions" or "promotions")."""
        source, target = self.tiers[session.tier].view(session.block), self.tiers[tier_name].view(block)
        started = time.perf_counter()
        try:
            await asyncio.to_thread(target.copy_, source)
        except BaseException as exc:
            self.tiers[tier_name].free(block)
            if not isinstance(exc, Exception):
                raise
            log.error("moving session %d's KV to %s failed: %s", session.info.id, tier_name, exc)
            return False
        self._free_copy(session)
        self._keep_copy(session, tier_name, block)
        seconds_counter = {"demotions": "demote_seconds", "promotions": "promote_seconds"}[counter]
        self._count(**{counter: 1, seconds_counter: time.perf_counter() - started})
        return True

    def _keep_copy(self, session: Session, tier_name: str, block: TierBlock) -> None:
        """Hold ``block`` of ``tier_name`` as the session's tier copy, and account for it."""
        session.tier, session.block = tier_name, block
        self.memory.tier_add(tier_name, block.nbytes)

    def _free_copy(self, session: Session) -> None:
        """Free the session's tier copy and its bytes (RESIDENT+backed -> RESIDENT: the KV is about to change)."""
        self.tiers[session.tier].free(session.block)
        self.memory.tier_add(session.tier, -session.block.nbytes)
        session.tier = session.block = None
        session.update(backed=False)

    async def _copy_to_tier(self, session: Session, otherwise: str, counter: str, make_room: bool) -> float | None:
        """Copy a resident session's KV to a tier (EVICTING while it copies), kept as its tier copy: the
        copy's seconds. None when it cannot move or no tier holds it (counted as ``counter``, logged
        with ``otherwise``); ``make_room``: demote other copies to fit (``_placed``)."""
        if not self._movable(session):
            return None
        nbytes = self.backend.held_bytes(session.kv)
        if (placed := await self._placed(nbytes, session, make_room)) is None:
            self.counters[counter] += 1
            log.warning("no tier can hold session %d's %d KV bytes; %s", session.info.id, nbytes, otherwise)
            return None
        tier_name, block = placed
        if not self._movable(session):  # a request took the session while older copies were demoted
            self.tiers[tier_name].free(block)
            return None
        session.update(residency=Residency.EVICTING)
        started = time.perf_counter()
        try:
            await self.backend.copy_out(session.kv, self.tiers[tier_name].view(block))
        except BaseException:
            self.tiers[tier_name].free(block)
            session.update(residency=Residency.RESIDENT)
            raise
        self._keep_copy(session, tier_name, block)
        return time.perf_counter() - started

    async def _evict(self, session: Session) -> bool:
        """RESIDENT -> EVICTING -> EVICTED: copy the KV to a tier. False when it cannot (busy, tiers full)."""
        seconds = await self._copy_to_tier(session, "it stays resident", "evict_failures", make_room=True)
        if seconds is None:
            return False
        await self.backend.release(session.kv, keep_capacity=True)
        self._count(evictions=1, evict_seconds=seconds)
        # kv_bytes stays: the session's size, wherever it is
        await self._left_device(session, session.block.nbytes, session.tier, seconds)
        return True

    async def _write_back(self, session: Session) -> bool:
        """RESIDENT -> EVICTING -> RESIDENT+backed: copy the KV to a tier and keep the GPU blocks.
        False when it cannot (busy, already backed, no free room). A write-back is speculative: it
        takes free room in a tier the device copies to and never demotes other copies for it (on an
        H200 the demotions it caused to a disk tier stalled every session)."""
        if session.info.backed:
            return False
        seconds = await self._copy_to_tier(session, "it is not written back", "write_back_skips", make_room=False)
        if seconds is None:
            return False
        session.update(residency=Residency.RESIDENT, backed=True)
        self._count(write_backs=1, write_back_seconds=seconds)
        self.plugins.notify("djinn_session_written_back", session=session.info, tier=session.tier,
                            nbytes=session.block.nbytes, seconds=seconds)
        return True

    async def _reclaim(self, session: Session) -> bool:
        """RESIDENT+backed -> EVICTING -> EVICTED: free the GPU blocks; the tier copy is the KV now. No copy."""
        if not self._movable(session) or not session.info.backed:
            return False
        nbytes = self.backend.held_bytes(session.kv)
        session.update(residency=Residency.EVICTING)  # no second move starts while the blocks go
        try:
            await self.backend.release(session.kv, keep_capacity=True)
        except BaseException:
            if self.backend.held_bytes(session.kv):
                session.update(residency=Residency.RESIDENT)
                raise
        self._count(evictions=1, reclaims=1)
        await self._left_device(session, nbytes, session.tier, 0.0, backed=False)
        return True

    async def _drop(self, session: Session) -> bool:
        """RESIDENT -> EVICTED without a copy; the session's tokens are prefilled again later."""
        if not self._movable(session) or not session.recomputable:
            return False
        nbytes = self.backend.held_bytes(session.kv)
        if session.info.backed:
            self._free_copy(session)
        await self.backend.release(session.kv, keep_capacity=False)
        session.dropped = True
        self._count(drops=1)
        await self._left_device(session, nbytes, "dropped", 0.0, kv_bytes=0)
        return True

    async def _restore(self, session: Session, critical: bool = False) -> bool:
        """EVICTED -> RESTORING -> RESIDENT: make room, then copy the KV back from its tier, or
        prefill a dropped session's tokens again (a recompute, always on the critical path)."""
        if session.info.residency is not Residency.EVICTED or session.closed:
            return False
        dropped, tokens = session.dropped, len(session.history)
        nbytes = self.backend.kv_bytes(tokens) if dropped else session.block.nbytes
        session.update(residency=Residency.RESTORING)
        started = time.perf_counter()
        try:
            await self._reserve_kv(nbytes, requester=session)
        except BaseException:
            session.update(residency=Residency.EVICTED)
            raise
        try:
            if dropped:
                await self.backend.grow(session.kv, tokens)
                await self.backend.recompute(session.kv, list(session.history))
            else:
                promote = self.placement.promote_to(session.info, session.tier, self._device_tiers())
                if (placed := self._allocate(session.block.nbytes, promote)) is not None:
                    await self._move_copy(session, *placed, "promotions")
                await self.backend.copy_in(session.kv, self.tiers[session.tier].view(session.block))
        except BaseException:
            if dropped or self.backend.held_bytes(session.kv):
                await self.backend.release(session.kv, keep_capacity=not dropped)
            self.memory.release("kv", nbytes)
            session.update(residency=Residency.EVICTED)
            raise
        seconds = time.perf_counter() - started
        tier, critical = ("dropped", True) if dropped else (session.tier, critical)
        if dropped:
            session.dropped = False
            session.update(kv_bytes=self.backend.held_bytes(session.kv))
            self._count(recomputes=1, recompute_seconds=seconds, restores_on_critical_path=1)
        else:
            self._free_copy(session)
            self._count(restores=1, restore_seconds=seconds, restores_on_critical_path=critical)
        session.update(residency=Residency.RESIDENT)
        self.plugins.notify("djinn_session_restored", session=session.info, tier=tier, nbytes=nbytes,
                            seconds=seconds, on_critical_path=critical)
        return True

    async def ensure_resident(self, session: Session) -> float:
        """Wait for the session's own move, restore it if needed; the seconds spent waiting."""
        started = time.perf_counter()
        attempt: asyncio.Task | None = None
        while True:
            if session.move_in_flight():
                # wait, never cancel: a move cut short between its pool and memory steps would leak
                await asyncio.wait({session.moving})
                continue
            residency = session.info.residency
            if attempt is not None and residency is not Residency.RESIDENT:
                # this request's own restore failed (no room, say): fail the request, never retry in a loop
                session.moving = None
                if attempt.cancelled() or attempt.exception() is None:
                    raise SessionError(f"session {session.info.id} could not be restored")
                raise attempt.exception()
            if residency is Residency.EVICTED:
                session.moving = attempt = asyncio.create_task(self._restore(session, critical=True))
                continue
            if session.moving is not None and not session.moving.cancelled():
                exc = session.moving.exception()
                own = session.moving is attempt
                session.moving = None
                # this request's own restore failing fails it even when the KV arrived (a hook
                # raised after the copy); another move's error only when the KV is not back
                if exc is not None and (own or residency is not Residency.RESIDENT):
                    raise exc
            if residency is Residency.RESIDENT:
                return time.perf_counter() - started

    # ------------------------------------------------------------------ admission

    async def _notify_freed(self) -> None:
        if self._memory_freed is not None:
            async with self._memory_freed:
                self._memory_freed.notify_all()

    async def _reserve_kv(self, nbytes: int, requester: Session) -> None:
        """Reserve device bytes for KV: evict what the scheduler picks, else wait in a bounded queue."""
        if nbytes <= 0:
            return
        if nbytes > self.memory.budget_bytes - self.memory.device_bytes("weights"):
            self.counters["admission_refusals"] += 1
            raise AdmissionError(f"a request needs {nbytes} KV bytes, more than the whole KV budget")
        queued = False
        try:
            while not self.memory.try_reserve("kv", nbytes):
                candidates = [
                    s.info for s in self.sessions.values()
                    if s is not requester and self._movable(s) and (s.recomputable or not self.scheduler.drops_kv)
                ]
                victims = self.scheduler.select_victims(candidates, nbytes - self.memory.free_bytes(), self.view())
                if victims and any(await asyncio.gather(*(self._evict_now(v.id) for v in victims))):
                    continue
                if not queued:
                    if self._waiting >= self.config.memory.admission_queue:
                        self.counters["admission_refusals"] += 1
                        raise AdmissionError(
                            f"out of memory for KV ({nbytes} bytes needed, {self.memory.free_bytes()} free) "
                            f"and the admission queue is full ({self._waiting} waiting)"
                        )
                    queued = True
                    self._waiting += 1
                    self.counters["admission_waits"] += 1
                    self.plugins.notify("djinn_admission_blocked", need_bytes=nbytes,
                                        free_bytes=self.memory.free_bytes(), queued=self._waiting)
                async with self._memory_freed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._memory_freed.wait(), timeout=self.tick_s * 4)
        finally:
            if queued:
                self._waiting -= 1

    async def _evict_now(self, session_id: int) -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        # a loop, not an if: another waiter may start a move first, and two moves of one session
        # at once would free its blocks twice
        while session.move_in_flight():
            await asyncio.wait({session.moving})
        session.moving = asyncio.create_task(self._free_device(session))
        return await session.moving

    async def _grow_kv(self, session: Session, tokens: int) -> None:
        """Make the session's KV hold ``tokens`` tokens, reserving the extra bytes first."""
        extra = max(0, self.backend.kv_bytes(tokens) - self.backend.held_bytes(session.kv))
        if extra:
            await self._reserve_kv(extra, requester=session)
            # the blocks are allocated even if this request is cancelled meanwhile: the
            # reservation is returned only when the allocation itself failed
            grown = asyncio.ensure_future(self.backend.grow(session.kv, tokens))
            try:
                await settled(grown)
            finally:
                if grown.done() and (grown.cancelled() or grown.exception() is not None):
                    self.memory.release("kv", extra)
            grown.result()
        session.update(kv_bytes=self.backend.held_bytes(session.kv))


async def settled(future: asyncio.Future | None) -> None:
    """Wait until ``future`` is done, through any number of cancellations of the waiter."""
    if future is None:
        return
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def _log_failed_move(task: asyncio.Task) -> None:
    """A move the scheduler started fails no request: its error is logged here."""
    if not task.cancelled() and task.exception() is not None:
        log.error("a scheduled KV move failed: %s", task.exception())
