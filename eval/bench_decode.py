"""The batched, graph-captured decode engine, beside one-at-a-time decoding and transformers.

    python -m eval.bench_decode --model random:llama-7b --out eval/results/decode_<tag>.json
    python -m eval.bench_decode --device cpu --model random:gpt2 --context 128 --new-tokens 16 \
        --sessions 16 --batches 1,4,16 --chunks 512 --agreement 4 --no-anchors --out ...

(a) one session's decode step at a 1024-token context (graph-captured and eager), against the
    weight-read floor measured in the same run (weight bytes / the device's read bandwidth);
(b) ``--sessions`` sessions x (``--context``-token prompt + ``--new-tokens`` tokens) end to end
    through the ``BatchEngine`` (chunked prefill joined with batched decode), per prefill chunk,
    and the same sessions served one at a time (what an engine without batching does);
(c) decode tokens/s at each ``--batches`` size with ``--context``-token contexts (a size whose KV
    does not fit is measured at the longest context that does, and says so);
(d) bf16 agreement: greedy tokens of sessions decoded together vs each decoded alone;
(e) on CUDA, 8 fresh ``--context``-token prompts in one packed prefill pass: tokens/s and its
    share of the bf16 matmul peak measured in the same run;
and the anchors re-measured here: transformers ``generate`` (eager, dynamic cache) per token, and
``generate_batch`` (its continuous batching) on (b). Random weights of the named shape stand in
for a real checkpoint.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch
import transformers

from djinn.engine.batch import BatchEngine, EngineRequest, run_to_completion
from djinn.engine.models import load_model, weight_bytes
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


def _modes(runner: ModelRunner) -> tuple[str, ...]:
    return ("graph", "eager") if runner.device.type == "cuda" else ("eager",)


def bench_single(runner: ModelRunner, context: int, steps: int) -> dict[str, Any]:
    """(a): batch-1 decode steps, captured and eager."""
    out: dict[str, Any] = {}
    captured = runner.cuda_graphs
    for mode in _modes(runner):
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
    for mode in _modes(runner):
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


def bench_agreement(runner: ModelRunner, sessions: int, context: int, new_tokens: int) -> dict[str, Any]:
    """(d): do sessions decoded together pick the tokens they pick alone (bf16)?"""
    prompts = _prompts(sessions, context, runner.vocab_size, seed=4)
    alone = []
    for prompt in prompts:
        kv = runner.new_kv()
        alone.append(greedy_generate(runner, kv, runner.ids_tensor(prompt), new_tokens))
        kv.release()
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


@click.command()
@click.option("--model", "model_name", default="random:llama-7b")
@click.option("--context", default=1024, help="prompt / context tokens")
@click.option("--new-tokens", default=50)
@click.option("--sessions", default=32, help="sessions in the end-to-end run (b)")
@click.option("--batches", default="8,32,64,96,128", help="batch sizes for (c)")
@click.option("--steps", default=30, help="timed decode steps per point")
@click.option("--chunks", default="512,2048,4096", help="prefill chunk sizes tried in (b)")
@click.option("--agreement", default=8, help="sessions in the bf16 agreement check (d)")
@click.option("--anchors/--no-anchors", default=True, help="re-measure the transformers anchors")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda")
@click.option("--decode-attention", type=click.Choice(DECODE_ATTENTION), default=None,
              help="how decode steps attend (default: paged on CUDA, masked on the CPU)")
@click.option("--cpu-pool-gb", default=4.0, help="KV pool size on CPU (on CUDA: free memory less 3 GiB)")
@click.option("--kv-dtype", type=click.Choice(["auto", "fp8_e4m3"]), default="auto",
              help="how the KV pool stores keys and values ([memory] kv_dtype)")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(model_name: str, context: int, new_tokens: int, sessions: int, batches: str, steps: int,
         chunks: str, agreement: int, anchors: bool, device: str, decode_attention: str | None, cpu_pool_gb: float,
         kv_dtype: str, out: Path) -> None:
    """Run (a)-(d) and the anchors; write one JSON result file and print a table."""
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
    runner = ModelRunner(loaded, device=device, decode_attention=decode_attention,
                         kv_dtype=None if kv_dtype == "auto" else KV_FP8_DTYPES[0])
    report["config"]["kv_dtype"] = str(runner.pool.dtype)
    report["config"]["decode_attention"] = runner.decode_attention
    report["config"]["fused_decode"] = runner.fused_decode
    free = torch.cuda.mem_get_info()[0] - 3 * GiB if cuda else int(cpu_pool_gb * GiB)
    pool_blocks = free // runner.pool.block_bytes
    runner.pool.grow(pool_blocks)
    runner.pool.fixed = True
    # what a server does before it listens: compile and capture every shape it can meet
    warm_up_s = _timed(lambda: runner.warm_up(max(int(b) for b in batches.split(",")), max(int(c) for c in chunks.split(","))))
    report["warm_up_s"] = warm_up_s
    report["graphs_captured_at_warm_up"] = runner.captures
    kv_bytes = pool_blocks * runner.pool.block_bytes
    report["kv_pool_bytes"] = kv_bytes
    report["single"] = bench_single(runner, context, steps)
    save("(a) single")
    report["end_to_end"] = []
    for chunk in chunks.split(","):
        report["end_to_end"].append(bench_end_to_end(runner, sessions, context, new_tokens, int(chunk)))
        save(f"(b) chunk {chunk}")
    report["one_at_a_time"] = bench_one_at_a_time(runner, sessions, context, new_tokens)
    save("(b) one at a time")
    report["throughput"] = []
    for batch in batches.split(","):
        report["throughput"].append(bench_throughput(runner, int(batch), context, steps, kv_bytes))
        save(f"(c) batch {batch}")
    if cuda:
        peak = matmul_peak()
        report["matmul_peak_flop_per_s"] = peak
        report["packed_prefill"] = bench_packed_prefill(runner, 8, context, 5, weights)
        report["packed_prefill"]["share_of_matmul_peak"] = report["packed_prefill"]["flop_per_s"] / statistics.median(peak)
        save("(e) packed prefill")
    report["agreement"] = bench_agreement(runner, agreement, context, new_tokens)
    best_b = min(report["end_to_end"], key=lambda r: r["seconds"])
    report["summary"] = {
        "weight_read_floor_ms": floor_s * 1e3 if floor_s else None,
        "a_batch1_step_graph_ms": _median_ms(report["single"]["graph_step_s"]) if cuda else None,
        "a_batch1_step_eager_ms": _median_ms(report["single"]["eager_step_s"]),
        "a_goal_ms": 1.5 * floor_s * 1e3 if floor_s else None,
        "b_end_to_end_s": {r["prefill_chunk_tokens"]: r["seconds"] for r in report["end_to_end"]},
        "b_best_s": best_b["seconds"],
        "b_one_at_a_time_s": report["one_at_a_time"]["seconds"],
        "b_graphs_captured_during_run": {r["prefill_chunk_tokens"]: r["graphs_captured_during_run"] for r in report["end_to_end"]},
        "warm_up_s": warm_up_s,
        "load_s": load_s,
        "c_tokens_per_s": {
            f"{r['batch']}@{r['context']}": {m: r[f"{m}_tokens_per_s"] for m in _modes(runner)}
            for r in report["throughput"]
        },
        "e_packed_prefill_tokens_per_s": report["packed_prefill"]["tokens_per_s"] if cuda else None,
        "e_packed_prefill_share_of_peak": report["packed_prefill"]["share_of_matmul_peak"] if cuda else None,
        "d_sequences_identical": f"{report['agreement']['sequences_identical']}/{agreement}",
        "d_tokens_identical": f"{report['agreement']['tokens_identical']}/{report['agreement']['tokens']}",
        "anchors": report.get("transformers"),
        "run_seconds": time.perf_counter() - started,
    }
    save("(d) agreement")
    click.echo(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
