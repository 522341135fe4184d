"""The batched, graph-captured decode engine, beside one-at-a-time decoding and transformers.

    python -m eval.bench_decode --model random:llama-7b --out eval/results/decode_<tag>.json
    python -m eval.bench_decode --model random:llama-7b --kv-dtype auto,fp8_e4m3 --out eval/results/decode_h200_kv.json
    python -m eval.bench_decode --device cpu --model random:gpt2 --context 128 --new-tokens 16 \
        --sessions 16 --batches 1,4,16 --chunks 512 --agreement 4 --no-anchors --out ...

For each KV-pool dtype of ``--kv-dtype`` (``auto``: the model's dtype, bf16 on CUDA and float32
on the CPU; ``fp8_e4m3``: one byte per key and value; a comma-separated list runs each in turn):

(a) one session's decode step at a 1024-token context (graph-captured and eager), against the
    weight-read floor measured in the same run (weight bytes / the device's read bandwidth);
(b) ``--sessions`` sessions x (``--context``-token prompt + ``--new-tokens`` tokens) end to end
    through the ``BatchEngine`` (chunked prefill joined with batched decode), per prefill chunk,
    and the same sessions served one at a time (what an engine without batching does);
(c) decode tokens/s at each ``--batches`` size with ``--context``-token contexts (a size whose KV
    does not fit is measured at the longest context that does, and says so);
(e) on CUDA, 8 fresh ``--context``-token prompts in one packed prefill pass: tokens/s and its
    share of the bf16 matmul peak measured in the same run (the peak once, for every dtype), by
    the runner's ``prefill_attention`` and, where that is not ``masked``, by the dense mask too
    (``packed_prefill_masked``);
(g) a 128-token turn after a ``--context``-token context, one session's alone in a pass and 8
    sessions' packed in one: each pass's time (an agent's tool output; such a pass is short, so
    its launches and the weight read are what it costs);
(d) agreement: greedy tokens of ``--agreement`` sessions decoded together vs each decoded alone;
and once: the anchors, transformers ``generate`` (eager, dynamic cache) per token and
``generate_batch`` (its continuous batching) on (b). Random weights of the named shape stand in
for a real checkpoint.

The model is loaded once. Each dtype gets its own ``ModelRunner`` over it, its pool grown to the
free memory (CUDA: less 3 GiB), warmed up as a server is, measured, then dropped and its memory
freed before the next is built, so every pool is as large as the first. (A runner changes the
model it drives in two ways, both harmless to the next one: its layers' attention modules get a
copy of the config naming the runner's attention function, which later runners find already set
and keep; and the fused decode packs q/k/v and gate/up into one tensor each, the parameters
becoming views of it, which a second runner repacks from those views into equal values.)

fp8 KV's effect, when the list holds ``auto`` and then ``fp8_e4m3`` (``fp8_effect``): on the (d)
prompts, each runner greedily generates ``--new-tokens`` tokens per prompt alone (the one-session
passes of ``greedy_generate``, as (d)'s "alone"), and computes teacher-forced logits: the last
position's after the prompt's prefill, then every one-session decode pass's while fed the
``auto`` run's tokens, so both see the same inputs. The ``auto`` run's tokens and logits wait on
the CPU (float32) while the fp8 runner is measured. Per prompt: tokens equal to ``auto``'s before
the first divergence, in total, the relative logit error ||l_fp8 - l_auto|| / ||l_auto|| (after
the prefill, max and mean over the steps) and the teacher-forced steps whose argmax agrees.
Both paths read the pool's stored keys (fp8 widened exactly to the compute dtype), so the error
is the rounding of the stored keys and values, not a kernel's.

The report: the header, ``weight_bytes``, ``read_bandwidth_bytes_per_s``, ``load_s``,
``transformers`` (the anchors) and ``matmul_peak_flop_per_s``, then the FIRST dtype's sections
where a one-dtype run has always had them: ``warm_up_s``, ``graphs_captured_at_warm_up``,
``kv_pool_bytes``, ``single`` (a), ``end_to_end`` and ``one_at_a_time`` (b), ``throughput`` (c),
``packed_prefill`` (e), ``short_prefill`` (g), ``agreement`` (d) and ``summary`` (with ``kv_dtype``, ``kv_pool_bytes``,
``kv_dtype_seconds`` added), plus ``kv_dtype`` (the pool's), ``kv_dtype_seconds`` (this dtype's
part, runner built to released) and ``device_free_bytes_at_runner`` (CUDA: free device memory as
the runner was built, before its pool: a later dtype's shows the earlier runner's memory came
back). Every later dtype has the same sections and summary under ``kv_dtypes[<name>]`` (e.g.
``kv_dtypes["fp8_e4m3"]``), with its ``decode_attention`` and ``fused_decode``; ``kv_dtypes`` is
empty in a one-dtype run.
``config.kv_dtype`` lists the pool dtypes run, in order; ``config.decode_attention`` and
``fused_decode`` are the first runner's. ``fp8_effect`` holds ``per_prompt`` (one entry per
prompt) and the totals; the fp8 dtype's summary repeats them as ``f_*``, and
``reference_self_check`` counts the ``auto`` run's teacher-forced argmaxes equal to its own
greedy tokens (all of them: those are the same passes).
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import click
import torch
import transformers

from djinn.engine.batch import BatchEngine, EngineRequest, run_to_completion
from djinn.engine.models import LoadedModel, load_model, weight_bytes
from djinn.engine.runner import DECODE_ATTENTION, KV_FP8_DTYPES, ModelRunner, greedy_generate
from eval.report import result_header

GiB = 1 << 30


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> float:
    _sync()
    started = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - started


def read_bandwidth(nbytes: int = 4 * GiB, repeats: int = 10) -> list[float]:
    """Device read bandwidth (bytes/s) of a sum over ``nbytes`` of bf16."""
    data = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    data.sum()
    return [nbytes / _timed(data.sum) for _ in range(repeats)]


#: tokens of an agent's turn after its context in (g), as the density workload's tool output
SHORT_TURN_TOKENS = 128


def _prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=generator).tolist() for _ in range(count)]


def prefilled(runner: ModelRunner, prompts: list[list[int]]) -> tuple[list, list[int]]:
    """Sessions holding ``prompts`` and the first token each would decode next."""
    kvs, tokens = [], []
    for prompt in prompts:
        kv = runner.new_kv()
        tokens.append(int(runner.begin(kv, runner.ids_tensor(prompt)).finish().argmax()))
        kvs.append(kv)
    return kvs, tokens


def step_times(runner: ModelRunner, kvs: list, tokens: list[int], steps: int) -> list[float]:
    """Seconds of each of ``steps`` batched decode steps (each ends with the tokens on the host)."""
    out = []
    for _ in range(steps):
        started = time.perf_counter()
        tokens = runner.decode(kvs, tokens).argmax(-1).tolist()
        out.append(time.perf_counter() - started)
    return out


def release(kvs: list) -> None:
    for kv in kvs:
        kv.release()


def finish(engine: BatchEngine, requests: list[EngineRequest]) -> None:
    """Run ``requests`` to the end; a request that failed fails the benchmark."""
    run_to_completion(engine, requests)
    failed = [r.error for r in requests if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed; the first: {failed[0]!r}") from failed[0]


def _modes(cuda: bool) -> tuple[str, ...]:
    """The step modes measured: CUDA graph replay and eager on CUDA, eager elsewhere."""
    return ("graph", "eager") if cuda else ("eager",)


def bench_single(runner: ModelRunner, context: int, steps: int) -> dict[str, Any]:
    """(a): batch-1 decode steps, captured and eager."""
    out: dict[str, Any] = {}
    captured = runner.cuda_graphs
    for mode in _modes(runner.device.type == "cuda"):
        runner.cuda_graphs = mode == "graph"
        kvs, tokens = prefilled(runner, _prompts(1, context, runner.vocab_size, seed=1))
        step_times(runner, kvs, tokens, 5)  # warm-up and capture
        out[f"{mode}_step_s"] = step_times(runner, kvs, tokens, steps)
        release(kvs)
    runner.cuda_graphs = captured
    return out


def bench_end_to_end(runner: ModelRunner, sessions: int, context: int, new_tokens: int, chunk: int) -> dict[str, Any]:
    """(b): every session's prompt then its tokens, all through one engine; wall seconds."""
    prompts = _prompts(sessions, context, runner.vocab_size, seed=2)
    warm = [EngineRequest(runner.new_kv(), p[:64], 4) for p in prompts[:4]]
    finish(BatchEngine(runner, prefill_chunk_tokens=chunk), warm)
    release([r.kv for r in warm])
    engine = BatchEngine(runner, prefill_chunk_tokens=chunk)
    requests = [EngineRequest(runner.new_kv(context + new_tokens), p, new_tokens) for p in prompts]
    captures = runner.captures
    seconds = _timed(lambda: finish(engine, requests))
    release([r.kv for r in requests])
    return {
        "prefill_chunk_tokens": chunk, "seconds": seconds, "steps": engine.steps,
        "sessions": sessions, "context": context, "new_tokens": new_tokens,
        "mean_decode_batch": engine.batch_rows / max(1, engine.steps),
        "graphs_captured_during_run": runner.captures - captures,
        "tokens_per_s": sessions * new_tokens / seconds,
        "first_token_s": [r.first_token_at - r.submitted_at for r in requests],
    }


def bench_one_at_a_time(runner: ModelRunner, sessions: int, context: int, new_tokens: int) -> dict[str, Any]:
    """(b) without batching: each session's prompt and tokens alone, one after another."""
    prompts = _prompts(sessions, context, runner.vocab_size, seed=2)

    def serve_all() -> None:
        for prompt in prompts:
            kv = runner.new_kv(context + new_tokens)
            finish(BatchEngine(runner), [EngineRequest(kv, prompt, new_tokens)])
            kv.release()

    seconds = _timed(serve_all)
    return {"seconds": seconds, "tokens_per_s": sessions * new_tokens / seconds}


def bench_throughput(runner: ModelRunner, batch: int, context: int, steps: int, free_bytes: int) -> dict[str, Any]:
    """(c): tokens/s of batched decode steps with ``context``-token contexts (shortened to fit)."""
    per_token = runner.kv_bytes_per_token
    fits = free_bytes // (batch * per_token) - steps - 2 * runner.pool.block_tokens - 16
    used_context = int(min(context, fits))
    kvs, tokens = prefilled(runner, _prompts(batch, used_context, runner.vocab_size, seed=3))
    out: dict[str, Any] = {"batch": batch, "context": used_context, "shortened_to_fit": used_context < context}
    captured = runner.cuda_graphs
    for mode in _modes(runner.device.type == "cuda"):
        runner.cuda_graphs = mode == "graph"
        step_times(runner, kvs, tokens, 3)
        samples = step_times(runner, kvs, tokens, steps)
        out[f"{mode}_step_s"] = samples
        out[f"{mode}_tokens_per_s"] = batch / statistics.median(samples)
    runner.cuda_graphs = captured
    release(kvs)
    return out


def matmul_peak(size: int = 8192, repeats: int = 10) -> list[float]:
    """bf16 matmul FLOP/s of ``size``^3 products on the device, for the prefill's share of it."""
    a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    a @ b
    return [2 * size**3 / _timed(lambda: a @ b) for _ in range(repeats)]


def bench_packed_prefill(runner: ModelRunner, sessions: int, tokens: int, repeats: int, weights: int) -> dict[str, Any]:
    """(e): ``sessions`` fresh prompts of ``tokens`` tokens in one packed prefill pass; tokens/s
    and the FLOP/s the pass reaches (2 x parameters per token for the GEMMs, plus attention's
    4 x layers x hidden x keys per query over each prompt's causal half)."""
    prompts = _prompts(sessions, tokens, runner.vocab_size, seed=4)
    seconds = []
    for _ in range(repeats + 1):
        kvs = [runner.new_kv(tokens) for _ in prompts]
        seconds.append(_timed(lambda: runner.prefill(kvs, prompts)))
        release(kvs)
    seconds = seconds[1:]  # the first pass of a shape pays its kernel loads
    params = weights / runner.dtype.itemsize
    attention = 4 * runner.num_layers * runner.hidden_size * sessions * tokens * (tokens + 1) / 2
    flops = 2 * params * sessions * tokens + attention
    best = statistics.median(seconds)
    return {"sessions": sessions, "tokens": tokens, "seconds": seconds, "tokens_per_s": sessions * tokens / best,
            "flop_per_s": flops / best, "flops": flops}


def bench_short_prefill(runner: ModelRunner, context: int, chunk: int, sessions: int, repeats: int) -> dict[str, Any]:
    """(g): a ``chunk``-token turn after a ``context``-token context (what an agent's tool output
    is), one session's in a pass of its own and ``sessions``' packed in one pass: each pass's
    seconds. The same turns run again over the same contexts each time (the length is set back)."""
    out: dict[str, Any] = {"context": context, "chunk": chunk}
    for count in (1, sessions):
        kvs, _ = prefilled(runner, _prompts(count, context, runner.vocab_size, seed=5))
        turns = _prompts(count, chunk, runner.vocab_size, seed=6)
        seconds = []
        for _ in range(repeats + 1):
            seconds.append(_timed(lambda: runner.prefill(kvs, turns)))
            for kv in kvs:
                kv.length = context
        release(kvs)
        out[f"sessions_{count}_seconds"] = seconds[1:]  # the first pass of a shape pays its kernel loads
    return out


def greedy_alone(runner: ModelRunner, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy tokens, one session at a time (``greedy_generate``: one-session passes)."""
    alone = []
    for prompt in prompts:
        kv = runner.new_kv()
        alone.append(greedy_generate(runner, kv, runner.ids_tensor(prompt), new_tokens))
        kv.release()
    return alone


def bench_agreement(runner: ModelRunner, sessions: int, context: int, new_tokens: int,
                    alone: list[list[int]] | None = None) -> dict[str, Any]:
    """(d): do sessions decoded together pick the tokens they pick alone? ``alone``: those
    sessions' ``greedy_alone`` tokens, when already computed."""
    prompts = _prompts(sessions, context, runner.vocab_size, seed=4)
    if alone is None:
        alone = greedy_alone(runner, prompts, new_tokens)
    requests = [EngineRequest(runner.new_kv(), p, new_tokens) for p in prompts]
    finish(BatchEngine(runner), requests)
    release([r.kv for r in requests])
    together = [r.tokens for r in requests]
    first_divergence = [
        next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(alone, together)
    ]
    return {
        "sequences_identical": sum(x == y for x, y in zip(alone, together)),
        "sequences": sessions, "first_divergence_step": first_divergence,
        "tokens_identical": sum(a == b for x, y in zip(alone, together) for a, b in zip(x, y)),
        "tokens": sessions * new_tokens,
    }


def teacher_forced_logits(runner: ModelRunner, prompt: list[int], feed: list[int]) -> torch.Tensor:
    """float32 logits ``[len(feed), vocab]`` on the CPU: the last position's after the prompt's
    prefill, then each one-session decode pass's while feeding ``feed[:-1]`` one token at a time
    (the passes ``greedy_generate`` runs, given these tokens instead of its own)."""
    kv = runner.new_kv()
    rows = [runner.begin(kv, runner.ids_tensor(prompt)).finish()]
    for token in feed[:-1]:
        rows.append(runner.begin(kv, runner.ids_tensor([token])).finish())
    kv.release()
    return torch.stack(rows).cpu()


def kv_effect(reference: dict[str, list], other: dict[str, list]) -> dict[str, Any]:
    """fp8 KV's effect: ``other`` (its free-running greedy ``tokens`` and its ``logits`` teacher-forced
    on the reference's tokens) against the ``reference`` KV dtype's (its tokens, and its logits fed
    its own tokens), per prompt and in total."""
    per_prompt = []
    self_check = 0
    for ref_tokens, ref_logits, tokens, logits in zip(reference["tokens"], reference["logits"],
                                                      other["tokens"], other["logits"]):
        equal = [a == b for a, b in zip(ref_tokens, tokens)]
        divergence = next((i for i, e in enumerate(equal) if not e), None)
        error = ((logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)).tolist()  # [steps]
        self_check += sum(a == b for a, b in zip(ref_logits.argmax(-1).tolist(), ref_tokens))
        per_prompt.append({
            "steps": len(ref_tokens),
            "tokens_equal_before_divergence": len(equal) if divergence is None else divergence,
            "first_divergence_step": divergence,
            "tokens_equal": sum(equal),
            "rel_logit_error_prefill": error[0],
            "rel_logit_error_max": max(error),
            "rel_logit_error_mean": statistics.fmean(error),
            "teacher_forced_argmax_agree": sum(a == b for a, b in zip(logits.argmax(-1).tolist(), ref_tokens)),
        })
    steps = sum(p["steps"] for p in per_prompt)
    return {
        "per_prompt": per_prompt,
        "sequences_identical": sum(p["first_divergence_step"] is None for p in per_prompt),
        "sequences": len(per_prompt),
        "tokens_equal": sum(p["tokens_equal"] for p in per_prompt),
        "tokens_equal_before_divergence": sum(p["tokens_equal_before_divergence"] for p in per_prompt),
        "tokens": steps,
        "teacher_forced_argmax_agree": sum(p["teacher_forced_argmax_agree"] for p in per_prompt),
        "rel_logit_error_max": max(p["rel_logit_error_max"] for p in per_prompt),
        "rel_logit_error_mean": sum(p["rel_logit_error_mean"] * p["steps"] for p in per_prompt) / steps,
        "rel_logit_error_prefill_mean": statistics.fmean(p["rel_logit_error_prefill"] for p in per_prompt),
        # the reference's teacher-forced passes are its greedy passes: their argmax is its tokens
        "reference_self_check": f"{self_check}/{steps}",
    }


def bench_transformers(model: torch.nn.Module, context: int, new_tokens: int, sessions: int) -> dict[str, Any]:
    """The anchors: ``generate`` (eager, dynamic cache) per token; ``generate_batch`` on (b)."""
    vocab = model.config.vocab_size
    ids = torch.tensor(_prompts(1, context, vocab, seed=5), device="cuda")
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    model.generate(ids, max_new_tokens=2, **kwargs)
    one = _timed(lambda: model.generate(ids, max_new_tokens=1, **kwargs))
    full = _timed(lambda: model.generate(ids, max_new_tokens=new_tokens, **kwargs))
    out: dict[str, Any] = {"generate_eager_s_per_token": (full - one) / (new_tokens - 1),
                           "generate_eager_total_s": full}
    try:
        config = transformers.GenerationConfig(
            max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
        prompts = _prompts(sessions, context, vocab, seed=2)
        out["generate_batch_s"] = _timed(lambda: model.generate_batch(prompts, generation_config=config))
    except Exception as exc:  # noqa: BLE001 - an anchor that cannot run is reported, not fatal
        out["generate_batch_error"] = f"{type(exc).__name__}: {exc}"[:500]
    return out


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


#: ``--kv-dtype`` names and the pool dtype each gives the runner (None: the model's dtype)
KV_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp8_e4m3": KV_FP8_DTYPES[0]}


def _kv_dtype_list(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in KV_DTYPES]
    if not names or unknown or len(set(names)) != len(names):
        raise click.BadParameter(f"a comma-separated list of distinct names among {', '.join(KV_DTYPES)}, "
                                 f"not {value!r}")
    return names


@attrs.frozen
class _Settings:
    """What every KV dtype's part of the run measures (the command's options)."""

    cuda: bool
    device: str
    decode_attention: str | None
    context: int
    new_tokens: int
    sessions: int
    batches: list[int]
    steps: int
    chunks: list[int]
    agreement: int
    cpu_pool_gb: float
    weights: int


def measure_kv_dtype(loaded: LoadedModel, name: str, part: dict[str, Any], settings: _Settings,
                     save: Callable[[str], None], peak: Callable[[], list[float]],
                     reference: dict[str, list] | None) -> dict[str, Any]:
    """(a), (b), (c), (e), (d) with a KV pool of dtype ``name``, written into ``part`` as they are
    measured. A runner is built over ``loaded`` here and nothing of it outlives the call (the
    caller frees its memory). ``peak()``: the device's matmul peak samples, for (e)'s share.
    Returns this dtype's free-running greedy ``tokens`` and ``logits`` on the agreement prompts,
    teacher-forced on ``reference["tokens"]`` (None: on its own tokens, to be a reference)."""
    s = settings
    started = time.perf_counter()
    runner = ModelRunner(loaded, device=s.device, decode_attention=s.decode_attention, kv_dtype=KV_DTYPES[name])
    part["kv_dtype"] = str(runner.pool.dtype)
    part["decode_attention"] = runner.decode_attention
    part["fused_decode"] = runner.fused_decode
    free = torch.cuda.mem_get_info()[0] - 3 * GiB if s.cuda else int(s.cpu_pool_gb * GiB)
    part["device_free_bytes_at_runner"] = free + 3 * GiB if s.cuda else None
    pool_blocks = free // runner.pool.block_bytes
    runner.pool.grow(pool_blocks)
    runner.pool.fixed = True
    # what a server does before it listens: compile and capture every shape it can meet
    warm_up_s = _timed(lambda: runner.warm_up(max(s.batches), max(s.chunks)))
    part["warm_up_s"] = warm_up_s
    part["graphs_captured_at_warm_up"] = runner.captures
    kv_bytes = pool_blocks * runner.pool.block_bytes
    part["kv_pool_bytes"] = kv_bytes
    part["single"] = bench_single(runner, s.context, s.steps)
    save(f"{name}: (a) single")
    part["end_to_end"] = []
    for chunk in s.chunks:
        part["end_to_end"].append(bench_end_to_end(runner, s.sessions, s.context, s.new_tokens, chunk))
        save(f"{name}: (b) chunk {chunk}")
    part["one_at_a_time"] = bench_one_at_a_time(runner, s.sessions, s.context, s.new_tokens)
    save(f"{name}: (b) one at a time")
    part["throughput"] = []
    for batch in s.batches:
        part["throughput"].append(bench_throughput(runner, batch, s.context, s.steps, kv_bytes))
        save(f"{name}: (c) batch {batch}")
    if s.cuda:
        samples = peak()
        part["packed_prefill"] = bench_packed_prefill(runner, 8, s.context, 5, s.weights)
        part["packed_prefill"]["share_of_matmul_peak"] = part["packed_prefill"]["flop_per_s"] / statistics.median(samples)
        part["packed_prefill"]["prefill_attention"] = runner.prefill_attention
        if runner.prefill_attention != "masked":  # the dense-mask pass beside it, for comparison
            chosen, runner.prefill_attention = runner.prefill_attention, "masked"
            try:
                part["packed_prefill_masked"] = bench_packed_prefill(runner, 8, s.context, 5, s.weights)
            finally:
                runner.prefill_attention = chosen
            part["packed_prefill_masked"]["share_of_matmul_peak"] = (
                part["packed_prefill_masked"]["flop_per_s"] / statistics.median(samples))
        save(f"{name}: (e) packed prefill")
    part["short_prefill"] = bench_short_prefill(runner, s.context, SHORT_TURN_TOKENS, 8, 10)
    save(f"{name}: (g) short prefill")
    prompts = _prompts(s.agreement, s.context, runner.vocab_size, seed=4)
    alone = greedy_alone(runner, prompts, s.new_tokens)
    part["agreement"] = bench_agreement(runner, s.agreement, s.context, s.new_tokens, alone=alone)
    feeds = alone if reference is None else reference["tokens"]
    logits = [teacher_forced_logits(runner, prompt, feed) for prompt, feed in zip(prompts, feeds)]
    part["kv_dtype_seconds"] = time.perf_counter() - started
    return {"tokens": alone, "logits": logits}


def _summary(part: dict[str, Any], cuda: bool, floor_s: float | None, load_s: float, agreement: int,
             anchors: dict[str, Any] | None) -> dict[str, Any]:
    """One KV dtype's summary (the fields the result file has always had, and its ``kv_dtype``)."""
    modes = _modes(cuda)
    best_b = min(part["end_to_end"], key=lambda r: r["seconds"])
    return {
        "weight_read_floor_ms": floor_s * 1e3 if floor_s else None,
        "a_batch1_step_graph_ms": _median_ms(part["single"]["graph_step_s"]) if cuda else None,
        "a_batch1_step_eager_ms": _median_ms(part["single"]["eager_step_s"]),
        "a_floor_ratio": _median_ms(part["single"]["graph_step_s"]) / (floor_s * 1e3) if cuda and floor_s else None,
        "b_end_to_end_s": {r["prefill_chunk_tokens"]: r["seconds"] for r in part["end_to_end"]},
        "b_best_s": best_b["seconds"],
        "b_one_at_a_time_s": part["one_at_a_time"]["seconds"],
        "b_graphs_captured_during_run": {r["prefill_chunk_tokens"]: r["graphs_captured_during_run"] for r in part["end_to_end"]},
        "warm_up_s": part["warm_up_s"],
        "load_s": load_s,
        "c_tokens_per_s": {
            f"{r['batch']}@{r['context']}": {m: r[f"{m}_tokens_per_s"] for m in modes} for r in part["throughput"]
        },
        "e_packed_prefill_tokens_per_s": part["packed_prefill"]["tokens_per_s"] if cuda else None,
        "e_packed_prefill_share_of_peak": part["packed_prefill"]["share_of_matmul_peak"] if cuda else None,
        "g_short_prefill_ms": {
            f"{n}x{part['short_prefill']['chunk']}@{part['short_prefill']['context']}":
                _median_ms(part["short_prefill"][f"sessions_{n}_seconds"]) for n in (1, 8)
        },
        "d_sequences_identical": f"{part['agreement']['sequences_identical']}/{agreement}",
        "d_tokens_identical": f"{part['agreement']['tokens_identical']}/{part['agreement']['tokens']}",
        "anchors": anchors,
        "kv_dtype": part["kv_dtype"],
        "kv_pool_bytes": part["kv_pool_bytes"],
        "kv_dtype_seconds": part["kv_dtype_seconds"],
    }


def _free_device_memory() -> None:
    """Return a released runner's pool, graphs and workspaces to the device. On CUDA the compiled
    kernels go too: they hold the old pool alive, and each pool size compiles its own decode
    kernels, so the next runner could pass dynamo's recompile limit and run them eagerly, which
    a CUDA graph cannot capture."""
    if torch.cuda.is_available():
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _table(summaries: dict[str, dict[str, Any]], effect: dict[str, Any] | None) -> str:
    """The dtypes' key figures side by side, and fp8 KV's effect."""
    names = list(summaries)
    rows: list[tuple[str, list[Any]]] = [
        ("KV pool GiB", [s["kv_pool_bytes"] / GiB for s in summaries.values()]),
        ("(a) batch-1 step, graph ms", [s["a_batch1_step_graph_ms"] for s in summaries.values()]),
        ("(a) batch-1 step, eager ms", [s["a_batch1_step_eager_ms"] for s in summaries.values()]),
        ("(b) end to end, best s", [s["b_best_s"] for s in summaries.values()]),
        ("(b) one at a time s", [s["b_one_at_a_time_s"] for s in summaries.values()]),
    ]
    first = next(iter(summaries.values()))
    for point, modes in first["c_tokens_per_s"].items():
        for mode in modes:
            rows.append((f"(c) {point} {mode} tok/s", [s["c_tokens_per_s"].get(point, {}).get(mode) for s in summaries.values()]))
    rows += [
        ("(e) packed prefill tok/s", [s["e_packed_prefill_tokens_per_s"] for s in summaries.values()]),
        *((f"(g) prefill {point} ms", [s["g_short_prefill_ms"].get(point) for s in summaries.values()])
          for point in first["g_short_prefill_ms"]),
        ("(d) together = alone", [s["d_sequences_identical"] for s in summaries.values()]),
        ("warm-up s", [s["warm_up_s"] for s in summaries.values()]),
    ]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [f"{'':<32}" + "".join(f"{n:>16}" for n in names)]
    lines += [f"{label:<32}" + "".join(f"{cell(v):>16}" for v in values) for label, values in rows]
    if effect is not None and "per_prompt" in effect:
        lines.append(
            f"fp8 KV against {effect['reference']}: greedy tokens equal {effect['tokens_equal']}/{effect['tokens']} "
            f"({effect['tokens_equal_before_divergence']} before the first divergence), sequences identical "
            f"{effect['sequences_identical']}/{effect['sequences']}; teacher-forced argmax agree "
            f"{effect['teacher_forced_argmax_agree']}/{effect['tokens']}, relative logit error mean "
            f"{effect['rel_logit_error_mean']:.4g} max {effect['rel_logit_error_max']:.4g}"
        )
    return "\n".join(lines)


@click.command()
@click.option("--model", "model_name", default="random:llama-7b")
@click.option("--context", default=1024, help="prompt / context tokens")
@click.option("--new-tokens", default=50)
@click.option("--sessions", default=32, help="sessions in the end-to-end run (b)")
@click.option("--batches", default="8,32,64,96,128", help="batch sizes for (c)")
@click.option("--steps", default=30, help="timed decode steps per point")
@click.option("--chunks", default="512,2048,4096", help="prefill chunk sizes tried in (b)")
@click.option("--agreement", default=8, help="sessions in the agreement check (d) and the fp8 effect")
@click.option("--anchors/--no-anchors", default=True, help="re-measure the transformers anchors")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda")
@click.option("--decode-attention", type=click.Choice(DECODE_ATTENTION), default=None,
              help="how decode steps attend (default: paged on CUDA, masked on the CPU)")
@click.option("--cpu-pool-gb", default=4.0, help="KV pool size on CPU (on CUDA: free memory less 3 GiB)")
@click.option("--kv-dtype", "kv_dtypes", default="auto", callback=_kv_dtype_list,
              help="how the KV pool stores keys and values ([memory] kv_dtype): one of auto, fp8_e4m3, "
                   "or several, comma-separated, measured one after another (e.g. auto,fp8_e4m3)")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(model_name: str, context: int, new_tokens: int, sessions: int, batches: str, steps: int,
         chunks: str, agreement: int, anchors: bool, device: str, decode_attention: str | None, cpu_pool_gb: float,
         kv_dtypes: list[str], out: Path) -> None:
    """Run (a)-(e) for each KV dtype, the anchors and the fp8 effect; write one JSON result file and
    print a table."""
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device; pass --device cpu for a CPU run")
    started = time.perf_counter()
    loaded = load_model(model_name, dtype="bfloat16" if cuda else "float32", device=device, seed=0)
    load_s = time.perf_counter() - started
    weights = weight_bytes(loaded.model)
    bandwidth = read_bandwidth() if cuda else None
    report: dict[str, Any] = {
        **result_header(
            "decode", "eval.bench_decode",
            f"random weights of the named shape; {loaded.dtype}; on {device}; one process, "
            "no server (the engine itself)",
            dict(model=model_name, context=context, new_tokens=new_tokens, sessions=sessions,
                 batches=batches, steps=steps, chunks=chunks),
        ),
        "weight_bytes": weights,
        "read_bandwidth_bytes_per_s": bandwidth,
        "load_s": load_s,
    }
    floor_s = weights / statistics.median(bandwidth) if bandwidth else None
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(section: str) -> None:
        """Write what is measured so far, so a run cut short still leaves its sections."""
        out.write_text(json.dumps(report, indent=2))
        click.echo(f"{time.perf_counter() - started:7.1f} s  {section} done", err=True)

    if anchors and cuda:
        report["transformers"] = bench_transformers(loaded.model, context, new_tokens, sessions)
        torch.cuda.empty_cache()
        save("anchors")

    def peak() -> list[float]:
        """The matmul peak, measured once (before the first dtype's packed prefill)."""
        if "matmul_peak_flop_per_s" not in report:
            report["matmul_peak_flop_per_s"] = matmul_peak()
        return report["matmul_peak_flop_per_s"]

    settings = _Settings(
        cuda=cuda, device=device, decode_attention=decode_attention, context=context, new_tokens=new_tokens,
        sessions=sessions, batches=[int(b) for b in batches.split(",")], steps=steps,
        chunks=[int(c) for c in chunks.split(",")], agreement=agreement, cpu_pool_gb=cpu_pool_gb, weights=weights,
    )
    report["config"]["kv_dtype"] = []
    report["kv_dtypes"] = {}
    fp8 = [n for n in kv_dtypes if KV_DTYPES[n] in KV_FP8_DTYPES]
    wants_effect = "auto" in kv_dtypes and bool(fp8)
    if wants_effect and kv_dtypes.index("auto") > kv_dtypes.index(fp8[0]):
        report["fp8_effect"] = {"skipped_because": "fp8 ran before auto: list auto first to compare them"}
        wants_effect = False
    reference: dict[str, list] | None = None
    summaries: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(kv_dtypes):
        part = report if index == 0 else report["kv_dtypes"].setdefault(name, {})
        compared = wants_effect and name in fp8
        outputs = measure_kv_dtype(loaded, name, part, settings, save, peak, reference if compared else None)
        _free_device_memory()  # the runner is gone: its pool, graphs and workspaces with it
        report["config"]["kv_dtype"].append(part["kv_dtype"])
        if index == 0:  # where they have always been: the config's (the same for every dtype)
            report["config"]["decode_attention"] = part.pop("decode_attention")
            report["config"]["fused_decode"] = part.pop("fused_decode")
            report["kv_dtypes"] = report.pop("kv_dtypes")  # after the first dtype's sections in the file
        part["summary"] = summaries[name] = _summary(part, cuda, floor_s, load_s, agreement, report.get("transformers"))
        if wants_effect and name == "auto":
            reference = outputs  # on the CPU, in float32: no device memory held for it
        elif compared:
            effect = kv_effect(reference, outputs)
            report["fp8_effect"] = {"reference": "auto", "reference_kv_dtype": report["config"]["kv_dtype"][0],
                                    "kv_dtype": name, "prompts": agreement, "context": context,
                                    "new_tokens": new_tokens, **effect}
            summaries[name].update({
                "f_greedy_tokens_equal": f"{effect['tokens_equal']}/{effect['tokens']}",
                "f_teacher_forced_argmax_agree": f"{effect['teacher_forced_argmax_agree']}/{effect['tokens']}",
                "f_rel_logit_error_mean": effect["rel_logit_error_mean"],
                "f_rel_logit_error_max": effect["rel_logit_error_max"],
            })
        save(f"{name}: (d) agreement")
    for summary in summaries.values():
        summary["run_seconds"] = time.perf_counter() - started
    save("all")
    click.echo(json.dumps(summaries if len(summaries) > 1 else report["summary"], indent=2))
    click.echo(_table(summaries, report.get("fp8_effect")))


if __name__ == "__main__":
    main()
