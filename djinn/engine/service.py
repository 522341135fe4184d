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
import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import torch

from djinn.engine.batch import BatchEngine, EngineRequest
from djinn.engine.kvpool import SessionKV
from djinn.engine.models import load_model, weight_bytes
from djinn.engine.families import LAYER_SITES
from djinn.engine.runner import KV_FP8_DTYPES, ForwardCursor, ModelRunner, outside_layers_bytes
from djinn.kernel.backend import KVBackend
from djinn.kernel.errors import AdmissionError, DjinnError, SessionError
from djinn.kernel.kernel import Kernel, Session, settled

log = logging.getLogger(__name__)

GiB = 1 << 30

#: ``on_break(session, cursor, layer, step, phase, at)``: awaited at every armed point
BreakHandler = Callable[[Session, ForwardCursor, int, int, str, str], Awaitable[None]]
#: where a breakpoint pauses: after its layer ("output"), or inside it (``LAYER_SITES``)
BREAK_SITES = (*LAYER_SITES, "output")


#: ``on_token(token, logprob)`` on the event loop for every picked token, in order; ``logprob``
#: is ``(logprob, [(token, logprob), ...])`` when asked for, else None
TokenHandler = Callable[[int, "tuple[float, list[tuple[int, float]]] | None"], None]

MAX_TOP_LOGPROBS = 20


def _stop_sequences(value: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(seq) for seq in value)


@attrs.frozen
class SamplingParams:
    """How a generate request picks tokens and when it stops: greedy when ``temperature`` is 0.

    It stops after ``max_new_tokens``, at the tokenizer's end-of-sequence token (unless
    ``ignore_eos``), or once the new tokens end with one of ``stop`` (token-id sequences) or
    their text contains one of ``stop_text`` (needs a tokenizer). ``logprobs``: None records
    none; k >= 0 records each picked token's log-probability and the k most likely tokens'.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[tuple[int, ...], ...] = attrs.field(default=(), converter=_stop_sequences)
    stop_text: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    logprobs: int | None = None

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.max_new_tokens <= 1 << 16:
            raise SessionError(f"max_new_tokens must be in [0, 65536], not {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0:
            raise SessionError("temperature and top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise SessionError(f"top_p must be in (0, 1], not {self.top_p}")
        if any(not seq or not all(isinstance(t, int) and not isinstance(t, bool) for t in seq) for seq in self.stop):
            raise SessionError("stop sequences must be non-empty lists of token ids")
        if any(not isinstance(text, str) or not text for text in self.stop_text):
            raise SessionError("stop strings must be non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise SessionError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], not {self.logprobs}")


@attrs.define
class GenerateResult:
    """What a generate request returns, with where its time went.

    ``finish_reason`` is ``"length"`` (``max_new_tokens`` reached) or ``"stop"`` (the
    end-of-sequence token or a stop sequence); ``cached_tokens`` counts the context tokens whose
    KV was reused rather than computed by this request.
    """

    tokens: list[int]
    queue_s: float = 0.0
    #: of ``queue_s``, the wait until the request's KV was resident and grown: its admission
    #: (memory it waited for), not the engine's queue
    admission_s: float = 0.0
    restore_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_token_s: float = 0.0
    finish_reason: str = "length"
    logprobs: list[tuple[float, list[tuple[int, float]]]] = attrs.Factory(list)
    cached_tokens: int = 0


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class ModelService(KVBackend):
    """Loads the configured model for ``kernel`` and computes every session's tokens."""

    def __init__(self, kernel: Kernel, report: Callable[[str], None] | None = None) -> None:
        """Load the model and warm the engine up; ``report(text)`` hears each stage of start-up."""
        report = report or (lambda _text: None)
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
        report(f"loading {config.model.name}")
        self.loaded = load_model(
            config.model.name, dtype=config.model.dtype, device="cuda" if on_gpu else "cpu", seed=config.model.seed,
            weight_dtype=config.model.weight_dtype, build_device=self.device,  # random layers drawn on the GPU
        )
        self.runner = ModelRunner(
            self.loaded, streamer=self.streamer, device=self.device, budget_bytes=self._weights_budget(),
            block_tokens=config.memory.kv_block_tokens, cuda_graphs=config.server.cuda_graphs,
            graph_max_batch=config.server.graph_max_batch,
            decode_attention=None if config.server.decode_attention == "auto" else config.server.decode_attention,
            prefill_attention=None if config.server.prefill_attention == "auto" else config.server.prefill_attention,
            fused_decode=None if config.server.fused_decode or config.server.deterministic else False,
            fused_prefill=None if config.server.fused_prefill or config.server.deterministic else False,
            mixed_steps=None if config.server.mixed_steps else False,
            deterministic=config.server.deterministic,
            kv_dtype=None if config.memory.kv_dtype == "auto" else KV_FP8_DTYPES[0],
        )
        weights = self.runner.device_weight_bytes()
        if not self.memory.try_reserve("weights", weights):
            hint = "" if self.streamer.streams_weights else "; select --plugins ringbuffer to stream them"
            raise AdmissionError(
                f"the model's resident weights ({weights / GiB:.2f} GiB) exceed the GPU budget "
                f"({self.memory.budget_bytes / GiB:.2f} GiB){hint}"
            )
        if self.use_cuda:
            report("sizing the KV pool")
            self._size_kv_pool()
            self.runner.warm_up(
                config.server.max_batch, config.server.prefill_chunk_tokens, report,
                mixed_tokens=config.server.prefill_tokens_while_decoding or config.server.prefill_chunk_tokens,
            )
        # what start-up compiled and captured; anything after it is a request waiting for one
        self._captures_at_start = self.runner.captures
        self._compiles_at_start = compiled_graphs()
        self.engine = BatchEngine(
            self.runner, prefill_chunk_tokens=config.server.prefill_chunk_tokens,
            max_batch=config.server.max_batch, order=self._order_prefill,
            prefill_tokens_while_decoding=config.server.prefill_tokens_while_decoding or None,
        )
        self.total_weight_bytes = weight_bytes(self.loaded.model)
        if self.streamer.streams_weights:
            kernel.plugins.notify(
                "djinn_stream_plan", model=config.model.name, layers=self.runner.num_layers,
                layer_bytes=[weight_bytes(layer) for layer in self.runner.layers],
                ring_bytes=self.streamer.stats().ring_bytes,
            )
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="djinn-model")
        # KV moves (see _copy): a thread pool and a stream per direction, a stream for their slot indices
        self.to_host_waiters = ThreadPoolExecutor(max_workers=4, thread_name_prefix="djinn-copy-out")
        self.to_device_waiters = ThreadPoolExecutor(max_workers=4, thread_name_prefix="djinn-copy-in")
        if self.use_cuda:
            self.to_host_stream, self.to_device_stream = torch.cuda.Stream(), torch.cuda.Stream()
            self.index_stream = torch.cuda.Stream()
        self._engine_task: asyncio.Task | None = None
        self._engine_done: dict[int, asyncio.Future] = {}
        self._inflight: dict[int, EngineRequest] = {}  # by id(kv)
        self._model_calls_waiting: set[object] = set()  # run_model calls queued for the model thread
        # a session's last generated token: picked but not yet fed, so its KV does not exist
        # yet; the session's next request feeds it first
        self._pending: weakref.WeakKeyDictionary[Session, int] = weakref.WeakKeyDictionary()

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
        """Device bytes the streamer may give the decoder layers: the GPU budget less what the
        runner keeps on the device besides them (embeddings, final norm, head) and, on CUDA, the
        workspace reserved next; the streamer keeps its own share of it for KV (the ringbuffer's
        ``kv_reserve_*``). None on CPU without a budget: no limit."""
        if not self.kernel.config.memory.gpu_memory_budget_gb and not self.use_cuda:
            return None
        outside = outside_layers_bytes(self.loaded)
        workspace = int(self.kernel.config.memory.workspace_gb * GiB) if self.use_cuda else 0
        left = self.memory.budget_bytes - outside - workspace
        if left <= 0:
            also = f" and the {workspace / GiB:.2f} GiB workspace" if workspace else ""
            raise AdmissionError(
                f"the embeddings, final norm and head ({outside / GiB:.2f} GiB){also} leave nothing "
                f"of the GPU budget ({self.memory.budget_bytes / GiB:.2f} GiB) for the decoder layers; "
                f"raise [memory] gpu_memory_budget_gb"
            )
        return left

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
        return raw[: kv.nbytes].view(self.runner.pool.dtype).view(kv.host_shape())

    async def copy_out(self, kv: SessionKV, host: torch.Tensor) -> None:
        """Copy the KV to the tier, after the compute queued (no step may still be writing it)."""
        await self._copy(kv, host, to_host=True)

    async def copy_in(self, kv: SessionKV, host: torch.Tensor) -> None:
        """Blocks for the KV's capacity, then the copy back; a restore does not wait behind
        other sessions' queued steps, so a prefetch never waits for someone's decode."""
        blocks = await self._on_pool(self.runner.pool.allocate, kv.blocks_for(kv.capacity))
        kv.adopt(blocks)
        await self._copy(kv, host, to_host=False)

    async def _copy(self, kv: SessionKV, raw: torch.Tensor, *, to_host: bool) -> None:
        """Move ``kv`` to or from a tier's bytes ``raw`` on a copy stream, queued and waited for on
        a thread of the direction's own, so the loop makes no CUDA call for it.

        Every CUDA call lets go of the interpreter lock, and under load the model thread then holds
        it for a whole switch interval: the few calls a move makes held the loop up for about ten
        milliseconds a move when the loop made them. A copy to host waits on its stream for the
        compute queued before it; a copy to the device runs on a stream of its own, so it never
        queues behind that wait; the slot indices go up on an idle stream of their own as a small
        copy from pageable memory (pinning memory for them would be a page-locked allocation, which
        waits for the whole device). A restore never waits for a thread behind copies to host.
        """
        move = kv.copy_out if to_host else kv.copy_in
        if not self.use_cuda:
            await self.run_model(move, self._host_kv(kv, raw))
            return
        stream = self.to_host_stream if to_host else self.to_device_stream

        def copy() -> None:
            host = self._host_kv(kv, raw)
            with torch.cuda.stream(self.index_stream):
                slots = kv.move_slots().to(self.device)
            with torch.cuda.stream(stream):
                stream.wait_stream(self.index_stream)
                slots.record_stream(stream)
                if to_host:
                    stream.wait_stream(torch.cuda.default_stream(self.device))
                move(host, non_blocking=True, slots=slots)
                done = torch.cuda.Event()
                done.record(stream)
            done.synchronize()

        waiters = self.to_host_waiters if to_host else self.to_device_waiters
        await asyncio.get_running_loop().run_in_executor(waiters, copy)

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
        for waiters in (self.to_host_waiters, self.to_device_waiters):
            waiters.shutdown(wait=True, cancel_futures=True)

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

    def context(self, session: Session) -> list[int]:
        """Every token of the session's context: those whose KV it holds, then the pending one."""
        pending = self._pending.get(session)
        return [*session.history, *([] if pending is None else [pending])]

    def check_ids(self, input_ids: Sequence[int], *, pending: bool = False) -> None:
        """Refuse anything but a list of token ids the model knows, non-empty unless the session
        has a ``pending`` token to continue from."""
        if not input_ids:
            if pending:
                return
            raise SessionError("generate needs at least one input token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
            raise SessionError("token ids must be integers")
        vocab = self.runner.vocab_size
        if min(input_ids) < 0 or max(input_ids) >= vocab:
            raise SessionError(f"token ids must be in [0, {vocab})")

    async def generate(
        self,
        session: Session,
        input_ids: Sequence[int],
        params: SamplingParams,
        breakpoints: Sequence[int | tuple[int, str]] = (),
        on_break: BreakHandler | None = None,
        *,
        on_token: TokenHandler | None = None,
        whole_context: bool = False,
    ) -> GenerateResult:
        """Append ``input_ids`` to the session's context and generate up to ``max_new_tokens``.

        ``breakpoints``: layer indices (pause after the layer) or ``(layer, at)`` pairs, ``at``
        one of ``BREAK_SITES``; ``on_break`` is awaited at each, in every pass.

        The session continues after its last generated token: that token is fed before
        ``input_ids``. With ``whole_context``, ``input_ids`` is the session's entire context
        instead: the KV of the longest common prefix with what the session holds is reused and
        only the rest is computed (a changed history truncates the KV to the common prefix).
        ``on_token`` is called on the event loop for each token as it is picked.
        """
        self.check_ids(input_ids, pending=not whole_context and session in self._pending)
        points = break_points(breakpoints, self.runner.num_layers)
        refusal = self.runner.inside_layer_refusal() if any(at != "output" for _, at in points) else None
        if refusal is not None:
            raise SessionError(refusal)
        if params.stop_text and self.loaded.tokenizer is None:
            raise SessionError("stop strings need a model with a tokenizer; give stop token ids")
        pending = self._pending.get(session)
        context = len(input_ids) if whole_context else len(session.history) + (pending is not None) + len(input_ids)
        positions = self.runner.max_positions
        if positions is not None and context + params.max_new_tokens > positions:
            raise SessionError(
                f"a context of {context} tokens plus max_new_tokens={params.max_new_tokens} exceeds "
                f"the model's {positions} positions"
            )
        arrived = time.perf_counter()
        kv = session.kv
        async with self.kernel.serving(session, context + params.max_new_tokens) as restore_s:
            result = GenerateResult(tokens=[], restore_s=restore_s)
            result.queue_s = result.admission_s = time.perf_counter() - arrived - restore_s
            if whole_context:
                feed = self._reuse_prefix(session, list(input_ids))
            else:
                feed = list(input_ids)
            pending = self._pending.pop(session, None)
            if pending is not None:
                feed.insert(0, pending)
            result.cached_tokens = kv.length
            streamed_before = self.streamer.stats() if self.streamer.streams_weights else None
            length_before = kv.length
            try:
                if points:
                    session.recomputable = False
                    await self._generate_with_breaks(session, feed, params, points, on_break, result, on_token)
                elif params.max_new_tokens:
                    await self._generate_batched(session, feed, params, result, on_token)
                else:  # nothing to pick: the whole input goes into the KV
                    await self._run_request(EngineRequest(kv, feed, 0, owner=session))
            finally:
                # whatever reached the KV, also after a failure: the input, then every token but
                # the last, which stays pending for the next request
                fed = [*feed, *result.tokens]
                reached = max(0, kv.length - length_before)
                session.history.extend(fed[:reached])
                if result.tokens and len(fed) - reached == 1:
                    self._pending[session] = fed[-1]
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

    def _reuse_prefix(self, session: Session, context: list[int]) -> list[int]:
        """Cut the session (KV, history, pending token) back to its longest common prefix with
        ``context`` and return what is left to feed (at least one token: the logits come from it).
        Runs inside ``serving``, with the KV resident."""
        known = self.context(session)
        common = 0
        for a, b in zip(known, context):
            if a != b:
                break
            common += 1
        common = min(common, len(context) - 1)
        history = session.history
        if common <= len(history):
            self._pending.pop(session, None)
            if common < len(history):
                del history[common:]
                session.kv.length = common
            return context[common:]
        return context[len(history) + 1 :]  # the pending token matches: it is fed first

    def _stopper(
        self, params: SamplingParams, result: GenerateResult
    ) -> Callable[[list[int]], bool] | None:
        """A check run on every picked token: True (and ``finish_reason`` "stop") at the
        end-of-sequence token or a stop sequence; None when nothing can stop the request early."""
        tokenizer = self.loaded.tokenizer
        eos = None if params.ignore_eos or tokenizer is None else tokenizer.eos_token_id
        stops, texts = params.stop, params.stop_text
        if eos is None and not stops and not texts:
            return None
        # a string of n characters spans at most n tokens (plus a partial one at each end)
        tail = max((len(t) for t in texts), default=0) + 2

        def stop(tokens: list[int]) -> bool:
            hit = tokens[-1] == eos or any(tuple(tokens[-len(seq):]) == seq for seq in stops)
            if not hit and texts:
                text = tokenizer.decode(tokens[-tail:])
                hit = any(t in text for t in texts)
            if hit:
                result.finish_reason = "stop"
            return hit

        return stop

    async def _generate_batched(
        self, session: Session, input_ids: list[int], params: SamplingParams, result: GenerateResult,
        on_token: TokenHandler | None = None,
    ) -> None:
        """Generate through the batch engine: this session shares every step with the others."""
        picker = None
        if params.temperature > 0:
            picker = self.runner.token_picker(params.temperature, params.top_k, params.seed, params.top_p)
        request = EngineRequest(session.kv, input_ids, params.max_new_tokens, picker=picker, owner=session,
                                logprobs=params.logprobs)
        stop = self._stopper(params, result)
        if stop is not None or on_token is not None:
            loop = asyncio.get_running_loop()
            logprobs = request.token_logprobs

            def picked(req: EngineRequest) -> bool:  # on the model thread, once per token
                if on_token is not None:
                    loop.call_soon_threadsafe(on_token, req.tokens[-1], logprobs[-1] if logprobs else None)
                return stop is not None and stop(req.tokens)

            request.on_token = picked
        result.tokens = request.tokens  # filled as the engine picks them
        result.logprobs = request.token_logprobs
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
        points: list[tuple[int, str]], on_break: BreakHandler | None, result: GenerateResult,
        on_token: TokenHandler | None = None,
    ) -> None:
        """Generate step by step, pausing at each armed point; the model thread is free while paused.

        The computation is a lone plain generate's: the prompt in the batch engine's chunks of
        ``prefill_chunk_tokens``, each a one-session pass (``runner.begin``, what
        ``runner.prefill([kv], [chunk])`` runs for one session), then every further token one
        decode step (``runner.begin_decode``, what ``runner.decode([kv], [token])`` runs). Each
        prompt chunk pauses at the armed points (step 0, phase "prefill"), then each decode step;
        a point inside a layer runs that layer in its family's parts (``ForwardCursor.run_to``).
        """
        picker = self.runner.token_picker(params.temperature, params.top_k, params.seed, params.top_p)
        stop = self._stopper(params, result)
        runner, kv = self.runner, session.kv
        ids = list(input_ids)
        chunk = self.engine.prefill_chunk_tokens
        started = time.perf_counter()
        for step in range(params.max_new_tokens):
            if step == 0:
                phase = "prefill"
                passes = [lambda part=ids[i : i + chunk]: runner.begin(kv, runner.ids_tensor(part))
                          for i in range(0, len(ids), chunk)]
            else:
                phase = "decode"
                passes = [lambda token=result.tokens[-1]: runner.begin_decode(kv, token)]
            for begin in passes:
                cursor = await self.run_model(begin)
                for layer, at in points:
                    if at == "output":
                        await self.run_model(cursor.run, layer + 1)
                    else:
                        await self.run_model(cursor.run_to, layer, at)
                    if on_break is not None:
                        self.kernel.plugins.notify(
                            "djinn_breakpoint_hit", session=session.info, layer=layer, step=step, phase=phase, at=at,
                        )
                        await on_break(session, cursor, layer, step, phase, at)
                await self.run_model(cursor.run)
                logits = await self.run_model(cursor.finish)
            token = picker(logits)
            result.tokens.append(token)
            logprob = None
            if params.logprobs is not None:
                logprob = await self.run_model(_logprobs, logits, token, params.logprobs)
                result.logprobs.append(logprob)
            if on_token is not None:
                on_token(token, logprob)
            if step == 0:
                result.first_token_s = result.prefill_s = time.perf_counter() - started
            if stop is not None and stop(result.tokens):
                break
        result.decode_s = time.perf_counter() - started - result.prefill_s


def break_points(breakpoints: Sequence[int | tuple[int, str]], num_layers: int) -> list[tuple[int, str]]:
    """``breakpoints`` as sorted, distinct ``(layer, at)`` points (a bare layer: ``at="output"``),
    in the order a pass meets them; ``SessionError`` for a layer out of range or an unknown site."""
    points = set()
    for point in breakpoints:
        layer, at = (point, "output") if isinstance(point, int) else point
        if not 0 <= layer < num_layers:
            raise SessionError(f"breakpoint layers must be in [0, {num_layers})")
        if at not in BREAK_SITES:
            raise SessionError(f"a breakpoint is at one of {', '.join(BREAK_SITES)}, not {at!r}")
        points.add((layer, at))
    return sorted(points, key=lambda p: (p[0], BREAK_SITES.index(p[1])))


def _logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under ``logits`` ``[vocab]`` and the ``top`` best."""
    logprobs = logits.float().log_softmax(-1)
    values, ids = logprobs.topk(min(top, logprobs.shape[0])) if top else (logprobs[:0], logprobs[:0].long())
    return float(logprobs[token]), list(zip(ids.tolist(), values.tolist()))
