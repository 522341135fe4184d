"""Continuous batching: one engine step serves every session that is generating.

A step prefills up to ``prefill_chunk_tokens`` prompt tokens (a long prompt is cut into chunks
over several steps, so it never stalls the decoders for long), then runs one batched decode step
(``ModelRunner.decode``) for every request past its prompt. Requests join the moment they are
submitted and leave the moment they have their tokens, so the batch changes from step to step.

Threads: ``submit`` and ``cancel`` may be called from any thread; ``step`` runs on the model
thread, one at a time. What a step finished is returned to the caller.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from djinn.kernel.errors import ModelError
from djinn.engine.kvpool import SessionKV
from djinn.engine.runner import ModelRunner

#: picks a token from float32 logits ``[vocab]``; None: greedy (batched argmax)
Picker = Callable[[torch.Tensor], int] | None


@attrs.define(eq=False)
class EngineRequest:
    """One generate request: feed ``prompt`` after the session's context, then pick ``max_new_tokens``
    (none: the request only prefills)."""

    kv: SessionKV
    prompt: list[int]
    max_new_tokens: int
    picker: Picker = None
    #: whose request this is (a kernel ``Session``), for the scheduler's prefill order
    owner: Any = None
    tokens: list[int] = attrs.Factory(list)
    prefilled: int = 0
    submitted_at: float = attrs.Factory(time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    error: BaseException | None = None
    #: set from any thread; the next step drops the request without touching its KV again
    cancelled: bool = False
    #: called on the model thread once per picked token, after it is appended to ``tokens``;
    #: True ends the request there (a stop sequence, an end-of-sequence token)
    on_token: Callable[[EngineRequest], bool] | None = None
    #: None: no log-probabilities; k >= 0: record the picked token's and the ``k`` best
    logprobs: int | None = None
    #: per picked token (when ``logprobs`` is set): ``(logprob, [(token, logprob), ...])``
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = attrs.Factory(list)
    #: the request ended early because ``on_token`` said so
    stopped: bool = False

    @property
    def done(self) -> bool:
        """All tokens are picked (or the request failed or was dropped)."""
        return self.finished_at is not None


@attrs.frozen
class StepRecord:
    """One engine step: when it started (``time.perf_counter``), what it did, how long each part took."""

    started: float
    prefill_s: float
    decode_s: float
    prefill_chunks: int
    prefill_tokens: int
    #: the keys the packed prefill attended over (every chunk's session context plus the chunk)
    prefill_keys: int
    decode_rows: int
    #: of ``prefill_s``, the time until the pass was queued (its launches, on CUDA; the rest waits
    #: for the device and picks the tokens)
    prefill_launch_s: float = 0.0
    #: the prefill chunks and the decode rows ran as one pass (``ModelRunner.mixed_step``):
    #: ``prefill_s`` is that pass, ``decode_s`` what picking the rows' tokens took after it
    mixed: bool = False


class BatchEngine:
    """Schedules prefill chunks and batched decode steps over the submitted requests."""

    def __init__(
        self, runner: ModelRunner, *, prefill_chunk_tokens: int = 2048, max_batch: int = 256,
        order: Callable[[list[EngineRequest]], list[EngineRequest]] | None = None,
        prefill_tokens_while_decoding: int | None = None,
    ) -> None:
        if prefill_chunk_tokens <= 0 or max_batch <= 0:
            raise ValueError("prefill_chunk_tokens and max_batch must be > 0")
        if prefill_tokens_while_decoding is not None and prefill_tokens_while_decoding <= 0:
            raise ValueError("prefill_tokens_while_decoding must be > 0 (None: prefill_chunk_tokens)")
        self.runner = runner
        #: orders the waiting prompts when they exceed a step's prefill budget (default: arrival)
        self.order = order
        self.prefill_chunk_tokens = prefill_chunk_tokens
        #: the prefill budget of a step in which decode rows wait (at most ``prefill_chunk_tokens``)
        self.prefill_tokens_while_decoding = min(prefill_chunk_tokens, prefill_tokens_while_decoding or prefill_chunk_tokens)
        self.max_batch = max_batch
        self._incoming: queue.SimpleQueue[EngineRequest] = queue.SimpleQueue()
        self._prefilling: deque[EngineRequest] = deque()
        self._decoding: list[EngineRequest] = []
        self.steps = 0
        self.batch_rows = 0  # decode rows over all steps (rows / steps: the mean batch)
        self.prefill_tokens = 0
        # wall time inside prefill chunks and decode steps: what is left of a run is time the
        # engine spent idle or waiting for its thread
        self.prefill_seconds = 0.0
        self._prefill_launch_s = 0.0  # the current step's, for its StepRecord
        self.decode_seconds = 0.0
        #: set to a list to record a ``StepRecord`` per step (for profiling a run)
        self.step_log: list[StepRecord] | None = None

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; it joins at the next step."""
        self._incoming.put(request)

    def has_work(self) -> bool:
        """Whether a step would do anything."""
        return bool(self._prefilling or self._decoding or not self._incoming.empty())

    def step(self) -> list[EngineRequest]:
        """Run one step; return the requests that finished, failed or were dropped in it."""
        while not self._incoming.empty():
            self._prefilling.append(self._incoming.get())
        ended: list[EngineRequest] = []
        self._drop_cancelled(ended)
        started = time.perf_counter()
        self._prefill_launch_s = 0.0
        batch = self._prefill_batch()
        chunks, tokens = len(batch), sum(len(c) for _, c in batch)
        keys = sum(r.kv.length for r, _ in batch) + tokens
        mixed = self._mixed(batch, ended) if batch and self._decoding and self.runner.mixed_steps else None
        if mixed is None:
            self._prefill(batch, ended)
            prefilled = time.perf_counter()
            rows = self._decode(ended)
        else:
            prefilled, rows = mixed
        finished = time.perf_counter()
        self.prefill_seconds += prefilled - started
        self.decode_seconds += finished - prefilled
        self.steps += 1
        log = self.step_log  # read once: another thread may stop the recording meanwhile
        if log is not None:
            log.append(StepRecord(started, prefilled - started, finished - prefilled, chunks, tokens, keys, rows,
                                  self._prefill_launch_s, mixed is not None))
        return ended

    def fail_all(self, error: BaseException) -> list[EngineRequest]:
        """End every request with ``error`` (after a step failed in a way no request explains)."""
        ended: list[EngineRequest] = []
        while not self._incoming.empty():
            self._prefilling.append(self._incoming.get())
        for request in [*self._prefilling, *self._decoding]:
            request.error = error
            self._end(request, ended)
        self._prefilling.clear()
        self._decoding.clear()
        return ended

    def _drop_cancelled(self, ended: list[EngineRequest]) -> None:
        for group in (self._prefilling, self._decoding):
            for request in [r for r in group if r.cancelled]:
                group.remove(request)
                self._end(request, ended)

    def _end(self, request: EngineRequest, ended: list[EngineRequest]) -> None:
        request.finished_at = time.perf_counter()
        ended.append(request)

    def _prefill_batch(self) -> list[tuple[EngineRequest, list[int]]]:
        """The chunks this step prefills: the waiting prompts, oldest first (or in ``order``'s
        order), up to ``prefill_chunk_tokens`` tokens in all (``prefill_tokens_while_decoding``
        when decode rows wait); a prompt longer than what is left goes on next step."""
        budget = self.prefill_tokens_while_decoding if self._decoding else self.prefill_chunk_tokens
        batch: list[tuple[EngineRequest, list[int]]] = []
        waiting: Sequence[EngineRequest] = self._prefilling
        if self.order is not None and len(waiting) > 1 and sum(len(r.prompt) - r.prefilled for r in waiting) > budget:
            waiting = self.order(list(waiting))
        for request in waiting:
            if budget <= 0:
                break
            chunk = request.prompt[request.prefilled : request.prefilled + budget]
            batch.append((request, chunk))
            budget -= len(chunk)
        now = time.perf_counter()
        for request, _ in batch:
            if request.started_at is None:
                request.started_at = now
        return batch

    def _prefill(self, batch: list[tuple[EngineRequest, list[int]]], ended: list[EngineRequest]) -> None:
        """Prefill ``batch``'s chunks in one packed forward pass."""
        if not batch:
            return
        started = time.perf_counter()
        try:
            logits = self.runner.prefill([r.kv for r, _ in batch], [c for _, c in batch])
            self._prefill_launch_s = time.perf_counter() - started
            rows = list(logits)
        except Exception as exc:  # noqa: BLE001 - find the request that fails, alone
            if len(batch) == 1:
                rows = [exc]
            else:
                rows = [self._prefill_alone(request, chunk) for request, chunk in batch]
        self._prefilled(batch, rows, ended)

    def _mixed(self, batch: list[tuple[EngineRequest, list[int]]], ended: list[EngineRequest]) -> tuple[float, int] | None:
        """Prefill ``batch`` and decode the rows past their prompts in one pass
        (``ModelRunner.mixed_step``): when the pass ended, and its decode rows. None: the runner
        has no mixed pass of this shape, or it failed (then nothing of it is committed): run the
        two apart, which finds the request that fails."""
        self._end_past_positions(ended)
        decoding = self._decoding[: self.max_batch]
        if not decoding:
            return None
        started = time.perf_counter()
        try:
            logits = self.runner.mixed_step([r.kv for r, _ in batch], [c for _, c in batch],
                                            [r.kv for r in decoding], [r.tokens[-1] for r in decoding])
        except Exception:  # noqa: BLE001 - the passes apart say whose it is
            return None
        if logits is None:
            return None
        self._prefill_launch_s = time.perf_counter() - started
        prefill_logits, decode_logits = logits
        self._prefilled(batch, list(prefill_logits), ended)
        prefilled = time.perf_counter()
        self._decoded(decoding, decode_logits, ended)
        return prefilled, len(decoding)

    def _prefilled(
        self, batch: list[tuple[EngineRequest, list[int]]], rows: Sequence[torch.Tensor | Exception],
        ended: list[EngineRequest],
    ) -> None:
        """Commit a pass's chunks: ``rows[i]`` is chunk ``i``'s last logits or what it raised. A
        prompt now whole picks its first token and joins the decode rows."""
        for (request, chunk), row in zip(batch, rows):
            if isinstance(row, Exception):
                request.error = row
                self._prefilling.remove(request)
                self._end(request, ended)
                continue
            request.prefilled += len(chunk)
            self.prefill_tokens += len(chunk)
            if request.prefilled < len(request.prompt):
                continue
            self._prefilling.remove(request)
            if request.max_new_tokens == 0:  # prefill only (a session's KV being recomputed)
                self._end(request, ended)
                continue
            if not self._pick(request, row, ended):
                continue
            request.first_token_at = time.perf_counter()
            if request.stopped or len(request.tokens) >= request.max_new_tokens:
                self._end(request, ended)
            else:
                self._decoding.append(request)

    def _prefill_alone(self, request: EngineRequest, chunk: list[int]) -> torch.Tensor | Exception:
        """One request's chunk in a pass of its own: its logits ``[vocab]``, or what it raised."""
        try:
            return self.runner.prefill([request.kv], [chunk])[0]
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            return exc

    def _pick(self, request: EngineRequest, logits: torch.Tensor, ended: list[EngineRequest]) -> bool:
        """Append the request's next token; if its picker raises, end it with that error (False)."""
        picker = request.picker
        try:
            token = int(logits.argmax()) if picker is None else picker(logits)
        except Exception as exc:  # noqa: BLE001 - e.g. NaN logits: this request fails, not the batch
            request.error = exc
            self._end(request, ended)
            return False
        return self._take(request, token, logits, ended)

    def _take(self, request: EngineRequest, token: int, logits: torch.Tensor, ended: list[EngineRequest]) -> bool:
        """Append a picked ``token`` (from ``logits`` ``[vocab]``), record its log-probabilities
        when asked and tell ``on_token``; a raising ``on_token`` ends the request (False)."""
        request.tokens.append(token)
        try:
            if request.logprobs is not None:
                logprobs = logits.float().log_softmax(-1)  # [vocab]
                top: list[tuple[int, float]] = []
                if request.logprobs:
                    values, ids = logprobs.topk(min(request.logprobs, logprobs.shape[0]))
                    top = list(zip(ids.tolist(), values.tolist()))
                request.token_logprobs.append((float(logprobs[token]), top))
            if request.on_token is not None and request.on_token(request):
                request.stopped = True
        except Exception as exc:  # noqa: BLE001 - this request fails, the batch goes on
            request.error = exc
            self._end(request, ended)
            return False
        return True

    def _decode(self, ended: list[EngineRequest]) -> int:
        """One batched decode step for the requests past their prompts; returns its rows."""
        self._end_past_positions(ended)
        batch = self._decoding[: self.max_batch]
        if not batch:
            return 0
        try:
            logits = self.runner.decode([r.kv for r in batch], [r.tokens[-1] for r in batch])
        except Exception as exc:  # noqa: BLE001 - every row of the failed step fails
            for request in batch:
                request.error = exc
                self._decoding.remove(request)
                self._end(request, ended)
            return 0
        self._decoded(batch, logits, ended)
        return len(batch)

    def _decoded(self, batch: list[EngineRequest], logits: torch.Tensor, ended: list[EngineRequest]) -> None:
        """Commit a decode step's rows: pick each row's token from ``logits`` ``[B, vocab]``."""
        self.batch_rows += len(batch)
        greedy = [i for i, r in enumerate(batch) if r.picker is None]
        if len(greedy) == len(batch):  # the usual step: no index tensor to build and copy
            picked = dict(enumerate(logits.argmax(-1).tolist()))
        else:
            picked = dict(zip(greedy, logits[greedy].argmax(-1).tolist())) if greedy else {}
        for i, request in enumerate(batch):
            if i in picked:
                taken = self._take(request, picked[i], logits[i], ended)
            else:
                taken = self._pick(request, logits[i], ended)
            if not taken:
                self._decoding.remove(request)
            elif request.stopped or len(request.tokens) >= request.max_new_tokens:
                self._decoding.remove(request)
                self._end(request, ended)
        if len(self._decoding) > self.max_batch:
            # rows past max_batch waited this step: they go first next step
            served = {id(r) for r in batch}
            self._decoding = [r for r in self._decoding if id(r) not in served] + [
                r for r in self._decoding if id(r) in served
            ]

    def _end_past_positions(self, ended: list[EngineRequest]) -> None:
        """End the requests whose next token would pass the model's positions: alone, before the
        step, rather than failing every row of it."""
        for request in list(self._decoding):
            try:
                self.runner.check_positions(request.kv.length + 1)
            except ModelError as exc:
                request.error = exc
                self._decoding.remove(request)
                self._end(request, ended)


def run_to_completion(engine: BatchEngine, requests: Sequence[EngineRequest]) -> None:
    """Submit ``requests`` and step until they are all done (for scripts and tests)."""
    for request in requests:
        engine.submit(request)
    while not all(r.done for r in requests):
        engine.step()
