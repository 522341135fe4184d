"""The model service: the engine as the kernel and the server see it.

It loads the model for a configured kernel, owns the runner, the KV pool and the batch engine,
runs every piece of model work on one model thread, copies KV on a copy stream (CUDA), and
serves generate requests. It implements the kernel's ``KVBackend``, so the kernel moves
sessions' KV without importing any of this.

Threads: called on the server's event-loop thread; model work runs on ``executor`` (one
thread), so the loop never blocks on the device. A driver task runs batch-engine steps on that
thread while any request is in it, so every generating session shares each decode step. On
CUDA the KV pool is sized once at start and never moves; on CPU it grows, so there everything
that touches it runs on the model thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import torch

from djinn.engine.batch import BatchEngine, EngineRequest
from djinn.engine.kvpool import SessionKV
from djinn.engine.models import load_model, weight_bytes
from djinn.engine.runner import ForwardCursor, ModelRunner
from djinn.kernel.backend import KVBackend
from djinn.kernel.errors import AdmissionError, DjinnError, SessionError
from djinn.kernel.kernel import Kernel, Session, settled

log = logging.getLogger(__name__)

GiB = 1 << 30

#: ``on_break(session, cursor, layer, step, phase)``: awaited at every armed layer
BreakHandler = Callable[[Session, ForwardCursor, int, int, str], Awaitable[None]]


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


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class ModelService(KVBackend):
    """Loads the configured model for ``kernel`` and computes every session's tokens."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        config = kernel.config
        want = config.model.device
        self.use_cuda = torch.cuda.is_available() and want in ("auto", "cuda")
        if want == "cuda" and not self.use_cuda:
            raise DjinnError("[model] device = 'cuda' but no CUDA device is available")
        self.pinned_host = self.use_cuda
        self.device = torch.device("cuda" if self.use_cuda else "cpu")
        self.memory = kernel.memory
        self.memory.budget_bytes = self._budget_bytes()
        self.streamer = kernel.streamer
        # weights that stay put are built directly on the GPU; a streamer that moves them takes them from the host
        on_gpu = self.use_cuda and not self.streamer.streams_weights
        self.loaded = load_model(
            config.model.name, dtype=config.model.dtype, device="cuda" if on_gpu else "cpu", seed=config.model.seed,
        )
        self.runner = ModelRunner(
            self.loaded, streamer=self.streamer, device=self.device, budget_bytes=self._weights_budget(),
            block_tokens=config.memory.kv_block_tokens, cuda_graphs=config.server.cuda_graphs,
            graph_max_batch=config.server.graph_max_batch,
            decode_attention=None if config.server.decode_attention == "auto" else config.server.decode_attention,
        )
        weights = self.runner.device_weight_bytes()
        if not self.memory.try_reserve("weights", weights):
            raise AdmissionError(
                f"the model's resident weights ({weights / GiB:.2f} GiB) exceed the GPU budget "
                f"({self.memory.budget_bytes / GiB:.2f} GiB); select --plugins ringbuffer to stream them"
            )
        if self.use_cuda:
            self._size_kv_pool()
            self.runner.warm_up(config.server.max_batch, config.server.prefill_chunk_tokens)
        # what start-up compiled and captured; anything after it is a request waiting for one
        self._captures_at_start = self.runner.captures
        self._compiles_at_start = compiled_graphs()
        self.engine = BatchEngine(
            self.runner, prefill_chunk_tokens=config.server.prefill_chunk_tokens,
            max_batch=config.server.max_batch, order=self._order_prefill,
        )
        self.total_weight_bytes = weight_bytes(self.loaded.model)
        if self.streamer.streams_weights:
            kernel.plugins.notify(
                "djinn_stream_plan", model=config.model.name, layers=self.runner.num_layers,
                layer_bytes=[weight_bytes(layer) for layer in self.runner.layers],
                ring_bytes=self.streamer.stats().ring_bytes,
            )
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="djinn-model")
        self.waiters = ThreadPoolExecutor(max_workers=4, thread_name_prefix="djinn-copy-wait")
        if self.use_cuda:
            self.copy_stream = torch.cuda.Stream()
        self._engine_task: asyncio.Task | None = None
        self._engine_done: dict[int, asyncio.Future] = {}
        self._inflight: dict[int, EngineRequest] = {}  # by id(kv)
        self._model_calls_waiting: set[object] = set()  # run_model calls queued for the model thread

    # ------------------------------------------------------------------ memory

    def _budget_bytes(self) -> int:
        cap = int(self.kernel.config.memory.gpu_memory_budget_gb * GiB)
        if self.use_cuda:
            free, _total = torch.cuda.mem_get_info()
            # what this process's caching allocator holds unused (an earlier kernel's pool) is free too
            free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
            return min(cap, free) if cap else int(free * 0.9)
        if cap:
            return cap
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2

    def _weights_budget(self) -> int | None:
        cap = self.kernel.config.memory.gpu_memory_budget_gb
        return int(cap * GiB) if cap else (self.memory.budget_bytes if self.use_cuda else None)

    def _size_kv_pool(self) -> None:
        """Allocate the whole KV pool once: the budget left after weights and the workspace."""
        memory = self.kernel.config.memory
        workspace = int(memory.workspace_gb * GiB)
        if not self.memory.try_reserve("workspace", workspace):
            raise AdmissionError(
                f"the weights and the {memory.workspace_gb} GiB workspace exceed the GPU "
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

    # ------------------------------------------------------------------ KVBackend

    def new_kv(self) -> SessionKV:
        """An empty session KV in the runner's pool."""
        return self.runner.new_kv()

    def kv_bytes(self, tokens: int) -> int:
        """Device bytes of a KV holding ``tokens`` tokens."""
        return self.runner.kv_bytes(tokens)

    def held_bytes(self, kv: SessionKV) -> int:
        """Device bytes ``kv`` holds (0 while evicted or dropped)."""
        return kv.nbytes if kv.resident else 0

    async def _on_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` where it may touch the KV pool: here on CUDA, on the model thread on CPU."""
        return fn(*args) if self.use_cuda else await self.run_model(fn, *args)

    async def grow(self, kv: SessionKV, tokens: int) -> None:
        """Blocks for ``tokens`` tokens (a dropped KV becomes resident and empty first)."""
        def grow() -> None:
            if not kv.resident:
                kv.adopt([])
            kv.ensure_capacity(tokens)

        await self._on_pool(grow)

    async def release(self, kv: SessionKV, *, keep_capacity: bool) -> None:
        """Give the blocks back; without ``keep_capacity`` the tokens are gone too."""
        await self._on_pool(lambda: kv.release(keep_capacity=keep_capacity))
        if not keep_capacity:
            kv.length = 0

    def _host_kv(self, kv: SessionKV, raw: torch.Tensor) -> torch.Tensor:
        """A tier's bytes as the session's KV in host layout ``[L, 2, capacity, H_kv, D]``."""
        return raw[: kv.nbytes].view(self.runner.dtype).view(kv.host_shape())

    async def copy_out(self, kv: SessionKV, host: torch.Tensor) -> None:
        """Copy the KV to the tier, after the compute queued (no step may still be writing it)."""
        await self._copy(kv.copy_out, self._host_kv(kv, host), after_compute=True)

    async def copy_in(self, kv: SessionKV, host: torch.Tensor) -> None:
        """Blocks for the KV's capacity, then the copy back; a restore does not wait behind
        other sessions' queued steps, so a prefetch never waits for someone's decode."""
        host_kv = self._host_kv(kv, host)
        blocks = await self._on_pool(self.runner.pool.allocate, kv.blocks_for(kv.capacity))
        kv.adopt(blocks)
        await self._copy(kv.copy_in, host_kv, after_compute=False)

    async def _copy(self, move: Callable[..., None], host: torch.Tensor, *, after_compute: bool) -> None:
        """Run ``move(host, non_blocking=...)`` on the copy stream and wait without blocking the loop."""
        if not self.use_cuda:
            await self.run_model(move, host)
            return
        with torch.cuda.stream(self.copy_stream):
            if after_compute:
                self.copy_stream.wait_stream(torch.cuda.default_stream(self.device))
            move(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        await asyncio.get_running_loop().run_in_executor(self.waiters, done.synchronize)

    async def recompute(self, kv: SessionKV, tokens: Sequence[int]) -> None:
        """Prefill ``tokens`` again through the batch engine (a request that picks nothing)."""
        if tokens:
            await self._run_request(EngineRequest(kv, list(tokens), 0))

    async def cancel(self, kv: SessionKV) -> None:
        """Drop the KV's in-flight request from the engine and wait until the engine let go of it."""
        request = self._inflight.get(id(kv))
        if request is not None:
            request.cancelled = True
            await settled(self._engine_done.get(id(request)))

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

    def stop(self) -> None:
        """Stop the model and copy threads."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.waiters.shutdown(wait=True, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        """The batch engine's and the pool's figures."""
        engine = self.engine
        return {
            "device": str(self.device),
            "steps": engine.steps,
            "decode_rows": engine.batch_rows,
            "prefill_tokens": engine.prefill_tokens,
            "prefill_seconds": engine.prefill_seconds,
            "decode_seconds": engine.decode_seconds,
            "mean_batch": engine.batch_rows / max(1, engine.steps),
            "kv_pool_blocks": self.runner.pool.num_blocks,
            "kv_pool_blocks_used": self.runner.pool.used_blocks,
            "graph_captures_after_start": self.runner.captures - self._captures_at_start,
            "compiles_after_start": compiled_graphs() - self._compiles_at_start,
        }

    # ------------------------------------------------------------------ generation

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
        kv = session.kv
        async with self.kernel.serving(session, kv.length + len(input_ids) + params.max_new_tokens) as restore_s:
            result = GenerateResult(tokens=[], restore_s=restore_s)
            result.queue_s = time.perf_counter() - arrived - restore_s
            streamed_before = self.streamer.stats() if self.streamer.streams_weights else None
            length_before = kv.length
            try:
                if layers:
                    session.recomputable = False
                    await self._generate_with_breaks(session, input_ids, params, layers, on_break, result)
                elif params.max_new_tokens:
                    await self._generate_batched(session, list(input_ids), params, result)
            finally:
                # whatever reached the KV, also after a failure: the prompt, then every token but the last
                fed = [*input_ids, *result.tokens]
                session.history.extend(fed[: max(0, kv.length - length_before)])
            self.kernel.counters["tokens"] += len(result.tokens)
            if streamed_before is not None:
                after = self.streamer.stats()
                self.kernel.plugins.notify(
                    "djinn_stream_pass", model=self.kernel.config.model.name,
                    bytes_streamed=after.bytes_streamed - streamed_before.bytes_streamed,
                    seconds=result.prefill_s + result.decode_s,
                    stall_seconds=after.stall_seconds - streamed_before.stall_seconds,
                )
            return result

    async def _generate_batched(
        self, session: Session, input_ids: list[int], params: SamplingParams, result: GenerateResult
    ) -> None:
        """Generate through the batch engine: this session shares every step with the others."""
        picker = None
        if params.temperature > 0:
            picker = self.runner.token_picker(params.temperature, params.top_k, params.seed)
        request = EngineRequest(session.kv, input_ids, params.max_new_tokens, picker=picker, owner=session)
        result.tokens = request.tokens  # filled as the engine picks them
        await self._run_request(request)
        result.queue_s += request.started_at - request.submitted_at
        result.first_token_s = result.prefill_s = request.first_token_at - request.started_at
        result.decode_s = request.finished_at - request.first_token_at

    async def _run_request(self, request: EngineRequest) -> None:
        """Submit ``request`` to the batch engine and wait for it; a cancelled caller waits until the
        engine has let go of the session's KV, so the KV may be freed right after."""
        done = asyncio.get_running_loop().create_future()
        self._engine_done[id(request)] = done
        self._inflight[id(request.kv)] = request
        self.engine.submit(request)
        if self._engine_task is None or self._engine_task.done():
            self._engine_task = asyncio.create_task(self._drive_engine(), name="djinn-engine")
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            request.cancelled = True
            await settled(done)
            raise
        finally:
            self._inflight.pop(id(request.kv), None)
            self._engine_done.pop(id(request), None)
        if request.error is not None:
            raise request.error
        if request.cancelled:
            raise SessionError("the session was closed while generating")

    def _order_prefill(self, requests: list[EngineRequest]) -> list[EngineRequest]:
        """The scheduler's order of the waiting prompts (requests of no session keep their place first)."""
        owned = {r.owner.info.id: r for r in requests if r.owner is not None}
        ordered = self.kernel.scheduler.order_prefill([r.owner.info for r in owned.values()], time.monotonic())
        first = [owned.pop(info.id) for info in ordered if info.id in owned]
        return [r for r in requests if r.owner is None] + first + list(owned.values())

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
                    self.kernel.plugins.notify(
                        "djinn_breakpoint_hit", session=session.info, layer=layer, step=step, phase=phase,
                    )
                    await on_break(session, cursor, layer, step, phase)
            await self.run_model(cursor.run)
            token = picker(await self.run_model(cursor.finish))
            result.tokens.append(token)
            ids = [token]
            if step == 0:
                result.first_token_s = result.prefill_s = time.perf_counter() - started
        result.decode_s = time.perf_counter() - started - result.prefill_s
