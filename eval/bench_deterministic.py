"""Deterministic mode against the default engine, in one run on one model.

    python -m eval.bench_deterministic --model random:llama-7b --out eval/results/deterministic_<tag>.json
    python -m eval.bench_deterministic --device cpu --model random:tiny-llama --context 96 --new-tokens 8 \
        --sessions 4 --batches 1,4 --out /tmp/det.json

Each mode runs in a process of its own (``--mode both``, the default), so each has the whole GPU;
the parent merges the two into one report. For each mode (``default``: the fused, paged engine;
``deterministic``: ``[server] deterministic``):
decode tokens/s at each ``--batches`` size with ``--context``-token contexts (CUDA graphs on
CUDA), and ``--sessions`` x (``--context`` + ``--new-tokens``) end to end through the
``BatchEngine``. Then invariance, greedy, through the engine: ``--agreement`` sessions each alone
against the same sessions (i) decoded together, (ii) beside ``--crowd`` - ``--agreement`` others,
(iii) prefilled in 64-token chunks beside others, (iv) moved out of the pool and back into other
blocks after 3 tokens: sequences whose tokens are identical, and whose logits are bitwise identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch

from djinn.engine.batch import BatchEngine, EngineRequest
from djinn.engine.models import load_model
from djinn.engine.runner import ModelRunner
from eval.bench_decode import GiB, _prompts, bench_end_to_end, bench_throughput, finish, release
from eval.report import result_header

CHUNK = 64


def move(runner: ModelRunner, kv):
    """The session's KV copied out, its blocks freed, and copied back into other blocks."""
    pool = runner.pool
    saved = pool.tensor[:, :, kv.slots(0, kv.length)].clone()
    length = kv.length
    kv.release()
    spacer = runner.new_kv(3 * pool.block_tokens)
    moved = runner.new_kv(length + 1)
    pool.tensor[:, :, moved.slots(0, length)] = saved
    moved.length = length
    spacer.release()
    return moved


def prefill(runner: ModelRunner, kvs, prompts: list[list[int]], chunk: int | None = None) -> torch.Tensor:
    """Logits after each prompt, prefilled in one packed pass or in packed ``chunk``-token chunks."""
    if chunk is None:
        return runner.prefill(kvs, prompts)
    last: dict[int, torch.Tensor] = {}
    for at in range(0, max(map(len, prompts)), chunk):
        live = [i for i, p in enumerate(prompts) if len(p) > at]
        out = runner.prefill([kvs[i] for i in live], [prompts[i][at : at + chunk] for i in live])
        last.update({i: out[k] for k, i in enumerate(live) if len(prompts[i]) <= at + chunk})
    return torch.stack([last[i] for i in range(len(prompts))])


def greedy(runner: ModelRunner, prompts: list[list[int]], new_tokens: int, chunk: int | None = None,
           move_after: int | None = None) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Greedy tokens and each step's logits of sessions sharing every pass: one packed prefill
    (or packed ``chunk``-token chunks), then batched decode steps."""
    kvs = [runner.new_kv() for _ in prompts]
    logits = prefill(runner, kvs, prompts, chunk)
    tokens: list[list[int]] = [[] for _ in prompts]
    seen: list[list[torch.Tensor]] = [[] for _ in prompts]
    for step in range(new_tokens):
        for i, row in enumerate(logits):
            tokens[i].append(int(row.argmax()))
            seen[i].append(row.clone())
        if step == new_tokens - 1:
            break
        if step == move_after:
            kvs = [move(runner, kv) for kv in kvs]
        logits = runner.decode(kvs, [t[-1] for t in tokens])
    release(kvs)
    return list(zip(tokens, seen))


def invariance(runner: ModelRunner, sessions: int, crowd: int, context: int, new_tokens: int) -> dict[str, Any]:
    """How many of ``sessions`` sequences are identical (tokens; logits bitwise) to each run alone."""
    prompts = [p[: context - 7 * i] for i, p in enumerate(_prompts(crowd, context, runner.vocab_size, seed=6))]
    alone = [greedy(runner, [p], new_tokens)[0] for p in prompts[:sessions]]
    cases = {
        "together": greedy(runner, prompts[:sessions], new_tokens),
        "crowd": greedy(runner, prompts, new_tokens)[:sessions],
        "chunked": greedy(runner, prompts[: 2 * sessions], new_tokens, chunk=CHUNK)[:sessions],
        "moved": greedy(runner, prompts[:sessions], new_tokens, move_after=3),
    }
    out: dict[str, Any] = {"sessions": sessions, "crowd": crowd, "new_tokens": new_tokens}
    for name, runs in cases.items():
        out[name] = {
            "tokens_identical": sum(a[0] == b[0] for a, b in zip(alone, runs)),
            "logits_bitwise": sum(all(torch.equal(x, y) for x, y in zip(a[1], b[1])) for a, b in zip(alone, runs)),
            "max_logit_diff": max(float((x - y).abs().max()) for a, b in zip(alone, runs) for x, y in zip(a[1], b[1])),
        }
    return out


MODES = ("deterministic", "default")


def measure(model_name: str, mode: str, device: str, context: int, new_tokens: int, sessions: int, batches: str,
            steps: int, agreement: int, crowd: int, chunk: int, save: Any) -> dict[str, Any]:
    """One mode's section: throughput, end to end, invariance (``save(section)`` after each part)."""
    cuda = device == "cuda"
    loaded = load_model(model_name, dtype="bfloat16" if cuda else "float32", device=device, seed=0)
    runner = ModelRunner(loaded, device=device, deterministic=mode == "deterministic")
    free = torch.cuda.mem_get_info()[0] - 8 * GiB if cuda else 2 * GiB  # room for a packed crowd's prefill
    runner.pool.grow(free // runner.pool.block_bytes)
    runner.pool.fixed = True
    runner.warm_up(max(int(b) for b in batches.split(",")), chunk)
    section: dict[str, Any] = {"decode_attention": runner.decode_attention, "fused_decode": runner.fused_decode,
                               "cuda_graphs": runner.cuda_graphs}
    kv_bytes = runner.pool.tensor.numel() * runner.pool.tensor.element_size()
    section["throughput"] = [bench_throughput(runner, int(b), context, steps, kv_bytes) for b in batches.split(",")]
    warm = [EngineRequest(runner.new_kv(), p[:64], 4) for p in _prompts(4, 64, runner.vocab_size)]
    finish(BatchEngine(runner, prefill_chunk_tokens=chunk), warm)
    release([r.kv for r in warm])
    section["end_to_end"] = bench_end_to_end(runner, sessions, context, new_tokens, chunk)
    save(section)
    section["invariance"] = invariance(runner, agreement, crowd, min(context, 512), new_tokens)
    save(section)
    return section


def summary(report: dict[str, Any], cuda: bool, agreement: int) -> dict[str, Any]:
    """Both modes side by side: tokens/s and their ratio, end to end, invariance counts."""
    key = "graph_tokens_per_s" if cuda else "eager_tokens_per_s"

    def rates(mode: str) -> dict[str, float]:
        return {f"{r['batch']}@{r['context']}": r[key] for r in report[mode]["throughput"]}

    det, default = rates("deterministic"), rates("default")
    return {
        "tokens_per_s": {"deterministic": det, "default": default},
        "deterministic_over_default": {k: det[k] / default[k] for k in det if k in default},
        "end_to_end_s": {m: report[m]["end_to_end"]["seconds"] for m in MODES},
        "invariance": {m: {case: f"{report[m]['invariance'][case]['logits_bitwise']}/{agreement} bitwise, "
                               f"{report[m]['invariance'][case]['tokens_identical']}/{agreement} tokens"
                           for case in ("together", "crowd", "chunked", "moved")}
                       for m in MODES},
    }


@click.command()
@click.option("--model", "model_name", default="random:llama-7b")
@click.option("--context", default=1024)
@click.option("--new-tokens", default=50)
@click.option("--sessions", default=32, help="sessions in the end-to-end run")
@click.option("--batches", default="1,32,128")
@click.option("--steps", default=20, help="timed decode steps per point")
@click.option("--agreement", default=8, help="sessions compared with themselves alone")
@click.option("--crowd", default=128, help="sessions sharing the passes in the crowd case")
@click.option("--chunk", default=2048, help="prefill chunk tokens of the end-to-end run")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda")
@click.option("--mode", type=click.Choice(["both", *MODES]), default="both",
              help="both: each mode in a process of its own (so each gets the whole GPU), merged into one report")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(model_name: str, context: int, new_tokens: int, sessions: int, batches: str, steps: int, agreement: int,
         crowd: int, chunk: int, device: str, mode: str, out: Path) -> None:
    """Measure the modes, write one JSON result file, print its summary."""
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device; pass --device cpu for a CPU run")
    started = time.perf_counter()
    options = dict(model=model_name, context=context, new_tokens=new_tokens, sessions=sessions, batches=batches,
                   steps=steps, agreement=agreement, crowd=crowd, chunk=chunk)
    report: dict[str, Any] = result_header(
        "deterministic", "eval.bench_deterministic",
        f"random weights of the named shape; {'bfloat16' if cuda else 'float32'}; on {device}; one process per "
        "mode, no server", options,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if mode != "both":
        def save(section: dict[str, Any]) -> None:
            report[mode] = section
            out.write_text(json.dumps(report, indent=2))

        measure(model_name, mode, device, context, new_tokens, sessions, batches, steps, agreement, crowd, chunk, save)
        return
    for each in MODES:
        part = out.with_name(f"{out.stem}.{each}.json")
        args = [a for key, value in options.items() for a in (f"--{key.replace('_', '-')}", str(value))]
        subprocess.run([sys.executable, "-m", "eval.bench_deterministic", *args, "--device", device, "--mode", each,
                        "--out", str(part)], check=True)
        report[each] = json.loads(part.read_text())[each]
        part.unlink()
        out.write_text(json.dumps(report, indent=2))
        click.echo(f"{time.perf_counter() - started:7.1f} s  {each} done", err=True)
    report["summary"] = {**summary(report, cuda, agreement), "run_seconds": time.perf_counter() - started}
    out.write_text(json.dumps(report, indent=2))
    click.echo(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
