"""The kernel: lifecycle, sessions with server-resident KV, eviction and restore, admission, generation.

Threads: everything here runs on the server's event-loop thread except model work, which runs
on one executor thread (``self.executor``) so the loop never blocks on the device. Generation
goes through one ``BatchEngine``: a driver task runs its steps on the model thread while any
request is in it, so every generating session shares each decode step. KV moves are issued from
the loop on a dedicated copy stream and awaited on a small waiter pool, so neither the loop nor
the model thread waits for them. On CUDA the KV pool is sized once at start and never moves; on
CPU it grows, so there everything that touches it runs on the model thread.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import attrs

from djinn.kernel.config import DjinnConfig
from djinn.kernel.errors import AdmissionError, DjinnError, SessionError, TierFullError
from djinn.kernel.memory import MemoryAccounting
from djinn.kernel.plugins import DjinnPlugins
from djinn.kernel.strategies import Action, Phase, Residency, SessionInfo, TierBlock

if TYPE_CHECKING:
    import torch

    from djinn.kernel.engine import EngineRequest
    from djinn.kernel.kvpool import SessionKV
    from djinn.kernel.runner import ForwardCursor

log = logging.getLogger(__name__)

GiB = 1 << 30

#: ``on_break(session, cursor, layer, step, phase)``: awaited at every armed layer
BreakHandler = Callable[["Session", "ForwardCursor", int, int, str], Awaitable[None]]


@attrs.frozen
class SamplingParams:
    """How a generate request picks tokens: greedy when ``temperature`` is 0."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.max_new_tokens <= 1 << 16:
            raise SessionError(f"max_new_tokens must be in [0, 65536], not {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0:
            raise SessionError("temperature and top_k must be >= 0")


@attrs.define
class GenerateResult:
    """What a generate request returns, with where its time went."""

    tokens: list[int]
    queue_s: float = 0.0
    restore_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_token_s: float = 0.0


@attrs.define(eq=False)
class Session:
    """A session's server-side state. ``info`` is what schedulers and hooks see."""

    info: SessionInfo
    kv: SessionKV
    owner: object = None
    lock: asyncio.Lock = attrs.Factory(asyncio.Lock)
    #: the in-flight eviction or restore, awaited by a request that needs the KV
    moving: asyncio.Task | None = None
    tier: str | None = None
    block: TierBlock | None = None
    closed: bool = False
    #: the generate request this session has in the batch engine, if any
    inflight: EngineRequest | None = None
    #: the tokens whose KV the session holds, in order (what a recompute prefills again)
    history: list[int] = attrs.Factory(list)
    #: False once a breakpoint pass ran: its KV may come from edited activations, which the
    #: tokens alone cannot reproduce, so it is never dropped
    recomputable: bool = True
    #: the KV was dropped (not moved to a tier): restoring it means prefilling ``history`` again
    dropped: bool = False


class Kernel:
    """One server's mechanism: strategies, model, sessions, memory. No policy lives here."""

    def __init__(self, config: DjinnConfig, plugins: DjinnPlugins) -> None:
        self.config = config
        self.plugins = plugins
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._timed: list[tuple[float, int, Action]] = []
        self._timed_seq = itertools.count()
        self._memory_freed: asyncio.Condition | None = None
        self._waiting = 0
        self._tick_task: asyncio.Task | None = None
        self._engine_task: asyncio.Task | None = None
        self._engine_done: dict[int, asyncio.Future] = {}
        self._model_calls_waiting: set[object] = set()  # run_model calls queued for the model thread
        self.started = False
        self.counters: dict[str, float] = dict.fromkeys(
            ("evictions", "restores", "restores_on_critical_path", "evict_seconds", "restore_seconds",
             "evict_failures", "admission_waits", "admission_refusals", "requests", "tokens",
             "drops", "recomputes", "recompute_seconds"), 0
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Configure plugins, build strategies, allocate tiers, load the model; then ``djinn_startup``."""
        import torch

        from djinn.kernel.engine import BatchEngine
        from djinn.kernel.models import load_model, weight_bytes
        from djinn.kernel.runner import ModelRunner

        self.plugins.notify("djinn_configure", config=self.config)
        want = self.config.model.device
        self.use_cuda = torch.cuda.is_available() and want in ("auto", "cuda")
        if want == "cuda" and not self.use_cuda:
            raise DjinnError("[model] device = 'cuda' but no CUDA device is available")
        self.device = torch.device("cuda" if self.use_cuda else "cpu")
        self.scheduler = self.plugins.build_slot("scheduler")[0]
        self.streamer = self.plugins.build_slot("streamer")[0]
        self.serializer = self.plugins.build_slot("serializer")[0]
        self.tiers = dict(zip(self.plugins.selection.tiers, self.plugins.build_slot("tier")))
        self.transports = {t.scheme: t for t in self.plugins.build_slot("transport")}
        self.memory = MemoryAccounting(self._budget_bytes(torch))
        for tier in self.tiers.values():
            tier.start(self.use_cuda)
        # weights that stay put are built directly on the GPU; a streamer that moves them takes them from the host
        on_gpu = self.use_cuda and not self.streamer.streams_weights
        self.model = load_model(
            self.config.model.name, dtype=self.config.model.dtype,
            device="cuda" if on_gpu else "cpu", seed=self.config.model.seed,
        )
        self.runner = ModelRunner(
            self.model, streamer=self.streamer, device=self.device, budget_bytes=self._weights_budget(),
            block_tokens=self.config.memory.kv_block_tokens, cuda_graphs=self.config.server.cuda_graphs,
            graph_max_batch=self.config.server.graph_max_batch,
            decode_attention=None if self.config.server.decode_attention == "auto" else self.config.server.decode_attention,
        )
        weights = self.runner.device_weight_bytes()
        if not self.memory.try_reserve("weights", weights):
            raise AdmissionError(
                f"the model's resident weights ({weights / GiB:.2f} GiB) exceed the GPU budget "
                f"({self.memory.budget_bytes / GiB:.2f} GiB); select --plugins ringbuffer to stream them"
            )
        if self.use_cuda:
            self._size_kv_pool()
            self.runner.warm_up(self.config.server.max_batch, self.config.server.prefill_chunk_tokens)
        self.engine = BatchEngine(
            self.runner, prefill_chunk_tokens=self.config.server.prefill_chunk_tokens,
            max_batch=self.config.server.max_batch,
        )
        self.total_weight_bytes = weight_bytes(self.model.model)
        self.streams = "ring_bytes" in self.streamer.stats()
        if self.streams:
            self.plugins.notify(
                "djinn_stream_plan", model=self.config.model.name, layers=self.runner.num_layers,
                layer_bytes=[weight_bytes(layer) for layer in self.runner.layers],
                ring_bytes=int(self.streamer.stats()["ring_bytes"]),
            )
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="djinn-model")
        self.waiters = ThreadPoolExecutor(max_workers=4, thread_name_prefix="djinn-copy-wait")
        if self.use_cuda:
            self.copy_stream = torch.cuda.Stream()
        self.started = True
        self.plugins.notify("djinn_startup", kernel=self)

    def _size_kv_pool(self) -> None:
        """Allocate the whole KV pool once: the budget left after weights and the workspace."""
        workspace = int(self.config.memory.workspace_gb * GiB)
        if not self.memory.try_reserve("workspace", workspace):
            raise AdmissionError(
                f"the weights and the {self.config.memory.workspace_gb} GiB workspace exceed the GPU "
                f"budget ({self.memory.budget_bytes / GiB:.2f} GiB)"
            )
        pool = self.runner.pool
        blocks = 1 + self.memory.free_bytes() // pool.block_bytes
        if blocks > pool.max_blocks:
            # KV is admitted by bytes, so the budget shrinks to what the pool can hold
            unused = (blocks - pool.max_blocks) * pool.block_bytes
            log.info("the KV pool is capped at %d blocks; %.2f GiB of the GPU budget stay unused",
                     pool.max_blocks, unused / GiB)
            self.memory.budget_bytes -= unused
            blocks = pool.max_blocks
        pool.grow(blocks)
        pool.fixed = True

    async def _on_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` where it may touch the KV pool: here on CUDA, on the model thread on CPU."""
        return fn(*args) if self.use_cuda else await self.run_model(fn, *args)

    def _budget_bytes(self, torch) -> int:
        cap = int(self.config.memory.gpu_memory_budget_gb * GiB)
        if self.use_cuda:
            free, _total = torch.cuda.mem_get_info()
            # what this process's caching allocator holds unused (an earlier kernel's pool) is free too
            free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
            return min(cap, free) if cap else int(free * 0.9)
        if cap:
            return cap
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2

    def _weights_budget(self) -> int | None:
        cap = self.config.memory.gpu_memory_budget_gb
        return int(cap * GiB) if cap else (self.memory.budget_bytes if self.use_cuda else None)

    def stop(self) -> None:
        """``djinn_shutdown``, then free sessions and release tiers and threads."""
        if not self.started:
            return
        self.started = False
        try:
            self.plugins.notify("djinn_shutdown", kernel=self)
        finally:
            for session in list(self.sessions.values()):
                self._free_session_memory(session)
            self.sessions.clear()
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.waiters.shutdown(wait=True, cancel_futures=True)
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
        session = Session(info=info, kv=self.runner.new_kv(), owner=owner)
        self.sessions[info.id] = session
        try:
            self.plugins.notify("djinn_session_created", session=info)
        except BaseException:
            del self.sessions[info.id]  # the request fails: nobody would ever close this session
            raise
        return session

    def get(self, session_id: int, owner: object = None) -> Session:
        """The open session with this id (owned by ``owner`` when given)."""
        session = self.sessions.get(session_id)
        if session is None or (owner is not None and session.owner is not owner):
            raise SessionError(f"no open session {session_id}")
        return session

    async def close_session(self, session: Session, reason: str = "closed") -> None:
        """Free the session's KV wherever it is; ``djinn_session_closed``."""
        if session.closed:
            return
        session.closed = True
        if session.inflight is not None:
            # the engine must let go of the blocks before they are freed
            session.inflight.cancelled = True
            await _settled(self._engine_done.get(id(session.inflight)))
        if session.moving is not None:
            await asyncio.wait({session.moving})
        self.sessions.pop(session.info.id, None)
        await self._on_pool(self._free_session_memory, session)
        await self._notify_freed()
        self.plugins.notify("djinn_session_closed", session=session.info, reason=reason)

    def _free_session_memory(self, session: Session) -> None:
        kv = session.kv
        if kv.resident:
            self.memory.release("kv", kv.nbytes)
            kv.release()
        elif session.block is not None:
            self.tiers[session.tier].free(session.block)
            self.memory.tier_add(session.tier, -session.block.nbytes)
            session.block = None
        kv.evicted_capacity = 0
        session.info.kv_bytes = 0

    # ------------------------------------------------------------------ phases

    async def signal_phase(self, session: Session, phase: Phase, expected_s: float | None) -> None:
        """Record a client's phase and hand it to the scheduler; act on its decisions at once."""
        old = session.info.phase
        now = time.monotonic()
        session.info.phase = phase
        session.info.expected_resume_at = now + expected_s if expected_s is not None else None
        for action in self.scheduler.on_phase(session.info, now):
            self._schedule(action, now)
        self.plugins.notify("djinn_phase_changed", session=session.info, old=old, new=phase)

    def _schedule(self, action: Action, now: float) -> None:
        if action.at is not None and action.at > now:
            heapq.heappush(self._timed, (action.at, next(self._timed_seq), action))
            return
        session = self.sessions.get(action.session_id)
        if session is None or session.closed:
            return
        if action.kind == "evict":
            self._start_move(session, self._drop(session) if self.scheduler.drops_kv else self._evict(session))
        else:
            self._start_move(session, self._restore(session, critical=False))

    def _start_move(self, session: Session, coro: Awaitable[bool]) -> None:
        if session.moving is not None and not session.moving.done():
            coro.close()  # one move at a time; the scheduler will ask again if it still wants it
            return
        session.moving = asyncio.create_task(coro)
        session.moving.add_done_callback(_log_failed_move)

    async def _tick_loop(self) -> None:
        period = self.config.server.tick_s
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            try:
                while self._timed and self._timed[0][0] <= now:
                    _at, _seq, action = heapq.heappop(self._timed)
                    self._schedule(attrs.evolve(action, at=None), now)
                infos = [s.info for s in self.sessions.values() if not s.closed]
                for action in self.scheduler.on_tick(infos, now):
                    self._schedule(action, now)
            except Exception:
                log.exception("scheduler tick failed; continuing")

    # ------------------------------------------------------------------ eviction and restore

    def _tier_for(self, nbytes: int) -> tuple[str, TierBlock] | None:
        for name, tier in self.tiers.items():
            try:
                return name, tier.allocate(nbytes)
            except TierFullError:
                continue
        return None

    async def _wait_copy(self, event: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(self.waiters, event.synchronize)

    async def _evict(self, session: Session) -> bool:
        """Move a resident, idle session's KV to a tier. False when it cannot (busy, tier full)."""
        info, kv = session.info, session.kv
        if info.residency is not Residency.RESIDENT or info.busy or not kv.blocks or session.closed:
            return False
        nbytes = kv.nbytes
        placed = self._tier_for(nbytes)
        if placed is None:
            self.counters["evict_failures"] += 1
            log.warning("no tier can hold session %d's %d KV bytes; it stays resident", info.id, nbytes)
            return False
        tier_name, block = placed
        info.residency = Residency.EVICTING
        started = time.perf_counter()
        host = self._host_kv(tier_name, block, kv)
        try:
            await self._copy(kv.copy_out, host, after_compute=True)
        except BaseException:
            self.tiers[tier_name].free(block)
            info.residency = Residency.RESIDENT
            raise
        seconds = time.perf_counter() - started
        session.tier, session.block = tier_name, block
        await self._on_pool(lambda: kv.release(keep_capacity=True))
        self.memory.release("kv", nbytes)
        self.memory.tier_add(tier_name, nbytes)
        info.residency = Residency.EVICTED
        self.counters["evictions"] += 1
        self.counters["evict_seconds"] += seconds
        await self._notify_freed()
        self.plugins.notify("djinn_session_evicted", session=info, tier=tier_name, nbytes=nbytes, seconds=seconds)
        return True

    def _host_kv(self, tier_name: str, block: TierBlock, kv: SessionKV) -> torch.Tensor:
        """The tier block's bytes as the session's KV in host layout ``[L, 2, capacity, H_kv, D]``."""
        raw = self.tiers[tier_name].view(block)[: kv.nbytes]
        return raw.view(self.runner.dtype).view(kv.host_shape())

    async def _copy(self, move: Callable[..., None], host: torch.Tensor, *, after_compute: bool) -> None:
        """Run ``move(host, non_blocking=...)`` (a session's ``copy_out`` or ``copy_in``) on the copy
        stream, off the compute stream, and wait for it without blocking the loop.

        ``after_compute``: the copy first waits for work already queued on the compute stream
        (an eviction must not read KV that a queued step is still writing); a restore does not,
        so a prefetch never waits behind another session's decode step.
        """
        import torch

        if not self.use_cuda:
            await self.run_model(move, host)
            return
        with torch.cuda.stream(self.copy_stream):
            if after_compute:
                self.copy_stream.wait_stream(torch.cuda.default_stream(self.device))
            move(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        await self._wait_copy(done)

    async def _restore(self, session: Session, critical: bool) -> bool:
        """Bring an evicted session's KV back to the device (making room first)."""
        info, kv = session.info, session.kv
        if info.residency is not Residency.EVICTED or session.closed:
            return False
        nbytes = session.block.nbytes
        info.residency = Residency.RESTORING
        started = time.perf_counter()
        try:
            await self._reserve_kv(nbytes, requester=session)
        except BaseException:
            info.residency = Residency.EVICTED
            raise
        host = self._host_kv(session.tier, session.block, kv)
        try:
            blocks = await self._on_pool(self.runner.pool.allocate, kv.blocks_for(kv.capacity))
            kv.adopt(blocks)
            await self._copy(kv.copy_in, host, after_compute=False)
        except BaseException:
            if kv.resident:
                await self._on_pool(lambda: kv.release(keep_capacity=True))
            self.memory.release("kv", nbytes)
            info.residency = Residency.EVICTED
            raise
        seconds = time.perf_counter() - started
        tier_name, block = session.tier, session.block
        self.tiers[tier_name].free(block)
        self.memory.tier_add(tier_name, -nbytes)
        session.block = session.tier = None
        info.residency = Residency.RESIDENT
        self.counters["restores"] += 1
        self.counters["restore_seconds"] += seconds
        if critical:
            self.counters["restores_on_critical_path"] += 1
        self.plugins.notify(
            "djinn_session_restored", session=info, tier=tier_name, nbytes=nbytes, seconds=seconds,
            on_critical_path=critical,
        )
        return True

    async def ensure_resident(self, session: Session) -> float:
        """Wait for the session's own move, restore it if needed; the seconds spent waiting."""
        started = time.perf_counter()
        attempt: asyncio.Task | None = None
        while True:
            if session.moving is not None and not session.moving.done():
                # wait, never cancel: a move cut short between its pool and memory steps would leak
                await asyncio.wait({session.moving})
                continue
            if attempt is not None and session.info.residency is not Residency.RESIDENT:
                # this request's own restore failed (no room, say): fail the request, never retry in a loop
                session.moving = None
                if attempt.cancelled() or attempt.exception() is None:
                    raise SessionError(f"session {session.info.id} could not be restored")
                raise attempt.exception()
            if session.info.residency is Residency.EVICTED:
                restore = self._recompute(session) if session.dropped else self._restore(session, critical=True)
                session.moving = attempt = asyncio.create_task(restore)
                continue
            if session.moving is not None and session.moving.done() and not session.moving.cancelled():
                exc = session.moving.exception()
                own = session.moving is attempt
                session.moving = None
                # this request's own restore failing fails it even when the KV arrived (a hook
                # raised after the copy); another move's error only when the KV is not back
                if exc is not None and (own or session.info.residency is not Residency.RESIDENT):
                    raise exc
            if session.info.residency is Residency.RESIDENT:
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
                need = nbytes - self.memory.free_bytes()
                now = time.monotonic()
                candidates = [
                    s.info for s in self.sessions.values()
                    if s is not requester and not s.closed and not s.info.busy
                    and s.info.residency is Residency.RESIDENT and s.kv.blocks
                    and (s.recomputable or not self.scheduler.drops_kv)
                ]
                victims = self.scheduler.select_victims(candidates, need, now)
                if victims:
                    moved = await asyncio.gather(*(self._evict_now(v.id) for v in victims))
                    if any(moved):
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
                    self.plugins.notify(
                        "djinn_admission_blocked", need_bytes=nbytes,
                        free_bytes=self.memory.free_bytes(), queued=self._waiting,
                    )
                async with self._memory_freed:
                    try:
                        await asyncio.wait_for(self._memory_freed.wait(), timeout=self.config.server.tick_s * 4)
                    except TimeoutError:
                        pass
        finally:
            if queued:
                self._waiting -= 1

    async def _evict_now(self, session_id: int) -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        if session.moving is not None and not session.moving.done():
            await asyncio.wait({session.moving})
        move = self._drop(session) if self.scheduler.drops_kv else self._evict(session)
        session.moving = asyncio.create_task(move)
        return await session.moving

    async def _drop(self, session: Session) -> bool:
        """Free a resident, idle session's KV without saving it; its tokens are prefilled again later."""
        info, kv = session.info, session.kv
        if (info.residency is not Residency.RESIDENT or info.busy or not kv.blocks or session.closed
                or not session.recomputable):
            return False
        nbytes = kv.nbytes
        await self._on_pool(kv.release)
        kv.length = 0
        self.memory.release("kv", nbytes)
        session.dropped = True
        info.residency = Residency.EVICTED
        info.kv_bytes = 0
        self.counters["drops"] += 1
        await self._notify_freed()
        self.plugins.notify("djinn_session_evicted", session=info, tier="dropped", nbytes=nbytes, seconds=0.0)
        return True

    async def _recompute(self, session: Session) -> bool:
        """Bring a dropped session's KV back by prefilling its tokens again (on the critical path)."""
        from djinn.kernel.engine import EngineRequest

        info, kv = session.info, session.kv
        if info.residency is not Residency.EVICTED or session.closed:
            return False
        info.residency = Residency.RESTORING
        started = time.perf_counter()
        nbytes = self.runner.kv_bytes(len(session.history))
        try:
            await self._reserve_kv(nbytes, requester=session)
        except BaseException:
            info.residency = Residency.EVICTED
            raise
        try:
            kv.adopt([])
            await self._on_pool(kv.ensure_capacity, len(session.history))
            if session.history:
                await self._run_request(session, EngineRequest(kv, list(session.history), 0))
        except BaseException:
            await self._on_pool(kv.release)
            kv.length = 0
            self.memory.release("kv", nbytes)
            info.residency = Residency.EVICTED
            raise
        seconds = time.perf_counter() - started
        session.dropped = False
        info.residency = Residency.RESIDENT
        info.kv_bytes = kv.nbytes
        self.counters["recomputes"] += 1
        self.counters["restores_on_critical_path"] += 1
        self.counters["recompute_seconds"] += seconds
        self.plugins.notify(
            "djinn_session_restored", session=info, tier="dropped", nbytes=nbytes, seconds=seconds,
            on_critical_path=True,
        )
        return True

    async def _grow_kv(self, session: Session, tokens: int) -> None:
        """Make the session's KV hold ``tokens`` tokens, reserving the extra bytes first."""
        kv = session.kv
        extra = self.runner.kv_growth_bytes(kv, tokens)
        if extra:
            await self._reserve_kv(extra, requester=session)
            # the blocks are allocated on the model thread even if this request is cancelled
            # meanwhile: the reservation is returned only when the allocation itself failed
            grown = asyncio.ensure_future(self._on_pool(kv.ensure_capacity, tokens))
            try:
                await _settled(grown)
            finally:
                if grown.done() and (grown.cancelled() or grown.exception() is not None):
                    self.memory.release("kv", extra)
            grown.result()
        session.info.kv_bytes = kv.nbytes

    # ------------------------------------------------------------------ generation

    async def run_model(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run model work on the model thread (a running engine burst yields to it)."""
        token = object()
        self._model_calls_waiting.add(token)

        def call() -> Any:
            self._model_calls_waiting.discard(token)
            return fn(*args)

        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, call)
        finally:
            self._model_calls_waiting.discard(token)  # also when cancelled before it started

    async def generate(
        self,
        session: Session,
        input_ids: Sequence[int],
        params: SamplingParams,
        breakpoints: Sequence[int] = (),
        on_break: BreakHandler | None = None,
    ) -> GenerateResult:
        """Append ``input_ids`` to the session's context and generate up to ``max_new_tokens``."""
        if not input_ids:
            raise SessionError("generate needs at least one input token")
        vocab = self.runner.vocab_size
        if min(input_ids) < 0 or max(input_ids) >= vocab:
            raise SessionError(f"token ids must be in [0, {vocab})")
        layers = sorted(set(breakpoints))
        if layers and (layers[0] < 0 or layers[-1] >= self.runner.num_layers):
            raise SessionError(f"breakpoint layers must be in [0, {self.runner.num_layers})")
        arrived = time.perf_counter()
        async with session.lock:
            if session.closed:
                raise SessionError(f"session {session.info.id} is closed")
            session.info.busy = True
            self.counters["requests"] += 1
            try:
                restore_s = await self.ensure_resident(session)
                await self._grow_kv(session, session.kv.length + len(input_ids) + params.max_new_tokens)
                result = GenerateResult(tokens=[], restore_s=restore_s)
                result.queue_s = time.perf_counter() - arrived - restore_s
                streamed_before = self.streamer.stats() if self.streams else None
                length_before = session.kv.length
                try:
                    if layers:
                        session.recomputable = False
                        await self._generate_with_breaks(session, input_ids, params, layers, on_break, result)
                    elif params.max_new_tokens:
                        await self._generate_batched(session, list(input_ids), params, result)
                finally:
                    # whatever reached the KV, also after a failure: the prompt, then every token but the last
                    fed = [*input_ids, *result.tokens]
                    session.history.extend(fed[: max(0, session.kv.length - length_before)])
                self.counters["tokens"] += len(result.tokens)
                if streamed_before is not None:
                    after = self.streamer.stats()
                    self.plugins.notify(
                        "djinn_stream_pass", model=self.config.model.name,
                        bytes_streamed=int(after["bytes_streamed"] - streamed_before["bytes_streamed"]),
                        seconds=result.prefill_s + result.decode_s,
                        stall_seconds=float(after["stall_seconds"] - streamed_before["stall_seconds"]),
                    )
                return result
            finally:
                session.info.busy = False
                session.info.last_used = time.monotonic()

    async def _generate_batched(
        self, session: Session, input_ids: list[int], params: SamplingParams, result: GenerateResult
    ) -> None:
        """Generate through the batch engine: this session shares every step with the others."""
        from djinn.kernel.engine import EngineRequest

        picker = None
        if params.temperature > 0:
            picker = self.runner.token_picker(params.temperature, params.top_k, params.seed)
        request = EngineRequest(session.kv, input_ids, params.max_new_tokens, picker=picker)
        result.tokens = request.tokens  # filled as the engine picks them
        await self._run_request(session, request)
        result.queue_s += request.started_at - request.submitted_at
        result.first_token_s = result.prefill_s = request.first_token_at - request.started_at
        result.decode_s = request.finished_at - request.first_token_at

    async def _run_request(self, session: Session, request: EngineRequest) -> None:
        """Submit ``request`` to the batch engine and wait for it; a cancelled caller waits until the
        engine has let go of the session's KV, so the KV may be freed right after."""
        done = asyncio.get_running_loop().create_future()
        self._engine_done[id(request)] = done
        session.inflight = request
        self.engine.submit(request)
        if self._engine_task is None or self._engine_task.done():
            self._engine_task = asyncio.create_task(self._drive_engine(), name="djinn-engine")
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            request.cancelled = True
            await _settled(done)
            raise
        finally:
            session.inflight = None
            self._engine_done.pop(id(request), None)
        if request.error is not None:
            raise request.error
        if request.cancelled:
            raise SessionError(f"session {session.info.id} was closed while generating")

    async def _drive_engine(self) -> None:
        """Run the batch engine on the model thread while it has work, in bursts."""
        loop = asyncio.get_running_loop()
        while self.engine.has_work():
            await loop.run_in_executor(self.executor, self._engine_burst, loop)

    def _engine_burst(self, loop: asyncio.AbstractEventLoop) -> None:
        """Engine steps back to back on the model thread until the engine is idle or other model
        work waits; each step's finished requests are woken at once.

        Stepping here, rather than one executor round trip per step, keeps the step rate
        independent of how busy the event loop is with clients, signals and copies.
        """
        while self.engine.has_work() and not self._model_calls_waiting:
            try:
                ended = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the server
                log.exception("a batch engine step failed")
                ended = self.engine.fail_all(exc)
            if ended:
                loop.call_soon_threadsafe(self._wake_ended, ended)

    def _wake_ended(self, ended: list[EngineRequest]) -> None:
        for request in ended:
            done = self._engine_done.get(id(request))
            if done is not None and not done.done():
                done.set_result(None)

    async def _generate_with_breaks(
        self, session: Session, input_ids: Sequence[int], params: SamplingParams,
        layers: list[int], on_break: BreakHandler | None, result: GenerateResult,
    ) -> None:
        """Generate step by step, pausing after each armed layer; the model thread is free while paused."""
        picker = self.runner.token_picker(params.temperature, params.top_k, params.seed)
        ids = list(input_ids)
        started = time.perf_counter()
        for step in range(params.max_new_tokens):
            cursor = await self.run_model(self.runner.begin, session.kv, self.runner.ids_tensor(ids))
            phase = "prefill" if step == 0 else "decode"
            for layer in layers:
                await self.run_model(cursor.run, layer + 1)
                if on_break is not None:
                    self.plugins.notify("djinn_breakpoint_hit", session=session.info, layer=layer, step=step, phase=phase)
                    await on_break(session, cursor, layer, step, phase)
            await self.run_model(cursor.run)
            token = picker(await self.run_model(cursor.finish))
            result.tokens.append(token)
            ids = [token]
            if step == 0:
                result.first_token_s = result.prefill_s = time.perf_counter() - started
        result.decode_s = time.perf_counter() - started - result.prefill_s

    # ------------------------------------------------------------------ metrics

    def vmu(self) -> dict[str, Any]:
        """Memory and session view for ``/metrics/vmu`` and ``djinn status``."""
        phases: dict[str, int] = {}
        residency: dict[str, int] = {}
        for s in list(self.sessions.values()):
            phases[s.info.phase.value] = phases.get(s.info.phase.value, 0) + 1
            residency[s.info.residency.value] = residency.get(s.info.residency.value, 0) + 1
        tiers = {name: attrs.asdict(t.stats()) for name, t in self.tiers.items()}
        extra = {}
        for contribution in self.plugins.notify("djinn_metrics", kernel=self):
            if contribution:
                extra.update(contribution)
        return {
            "model": self.config.model.name,
            "device": str(self.device),
            "memory": self.memory.snapshot(),
            "tiers": tiers,
            "sessions": {"total": len(self.sessions), "by_phase": phases, "by_residency": residency},
            "admission_queue": self._waiting,
            "counters": dict(self.counters),
            "streamer": self.streamer.stats(),
            "engine": {
                "steps": self.engine.steps,
                "decode_rows": self.engine.batch_rows,
                "prefill_tokens": self.engine.prefill_tokens,
                "prefill_seconds": self.engine.prefill_seconds,
                "decode_seconds": self.engine.decode_seconds,
                "mean_batch": self.engine.batch_rows / max(1, self.engine.steps),
                "kv_pool_blocks": self.runner.pool.num_blocks,
                "kv_pool_blocks_used": self.runner.pool.used_blocks,
            },
            "plugins": extra,
        }


async def _settled(future: asyncio.Future | None) -> None:
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
