"""A step that prefills and decodes: one mixed pass against the prefill pass and decode step apart.

Under load nearly every engine step carries both (a budget of prompt tokens and a few dozen
decode rows). Apart, the step reads the weights twice; ``ModelRunner.mixed_step`` reads them once.
This times both ways on the engine itself (no server), each shape from its captured graphs after
a warm-up, with the wall time of the whole call (host work, replays, the logits' copy), as a
serving step pays it. Sessions keep their KV between repeats: each repeat rewinds their lengths,
so every repeat writes the same slots and reads the same contexts.

    python -m eval.bench_mixed_step --out eval/results/bench_mixed_step_h200.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import click
import torch

from djinn.engine.kvpool import SessionKV
from djinn.engine.models import load_model
from djinn.engine.runner import KV_FP8_DTYPES, ModelRunner
from eval.report import result_header

GiB = 1 << 30
#: the prefill part of a step: (context before each chunk, chunk tokens)
PREFILL_SHAPES = {
    "first_turn_half": [(512, 512)],  # the second half of a 1,024-token first prompt
    "four_turns": [(1200, 128)] * 4,  # four resumes' 128-token turns after their contexts
}


def _session(runner: ModelRunner, tokens: int) -> SessionKV:
    kv = runner.new_kv()
    if tokens:
        runner.prefill([kv], [[(7 * i) % runner.vocab_size for i in range(tokens)]])
    return kv


def _timed(call: Any, rewind: list[tuple[SessionKV, int]], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        for kv, length in rewind:
            kv.length = length
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return samples


@click.command()
@click.option("--model", "model_name", default="random:llama-7b")
@click.option("--rows", default="16,48,64", help="decode rows per step")
@click.option("--decode-context", default=1300, help="tokens before each decode row")
@click.option("--kv-dtype", type=click.Choice(["fp8_e4m3", "auto"]), default="fp8_e4m3")
@click.option("--repeats", default=30)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(model_name: str, rows: str, decode_context: int, kv_dtype: str, repeats: int, out: Path) -> None:
    """Time each (prefill shape, decode rows) step both ways; write one JSON result file."""
    if not torch.cuda.is_available():
        raise click.ClickException("this benchmark times CUDA graphs: it needs a CUDA device")
    row_counts = [int(r) for r in rows.split(",")]
    loaded = load_model(model_name, dtype="bfloat16", device="cuda", seed=0)
    runner = ModelRunner(loaded, kv_dtype=None if kv_dtype == "auto" else KV_FP8_DTYPES[0])
    need_tokens = max(row_counts) * (decode_context + 64) + sum(c + t + 64 for c, t in sum(PREFILL_SHAPES.values(), []))
    runner.pool.grow(2 * -(-need_tokens // runner.pool.block_tokens))  # room for each session's partial blocks
    runner.pool.fixed = True
    started = time.perf_counter()
    runner.warm_up(max(row_counts), 512, mixed_tokens=512)
    warm_up_s = time.perf_counter() - started
    report: dict[str, Any] = {
        **result_header("mixed_step", "eval.bench_mixed_step",
                        "random weights; bf16; the engine alone; wall time of each call (synchronized)",
                        dict(model=model_name, rows=row_counts, decode_context=decode_context, kv_dtype=kv_dtype,
                             repeats=repeats, prefill_shapes={k: v for k, v in PREFILL_SHAPES.items()})),
        "mixed_steps": runner.mixed_steps, "warm_up_s": warm_up_s, "points": [],
    }
    decoding = [_session(runner, decode_context) for _ in range(max(row_counts))]
    for shape, parts in PREFILL_SHAPES.items():
        prefilling = [_session(runner, context) for context, _ in parts]
        chunks = [[(3 * i) % runner.vocab_size for i in range(t)] for _, t in parts]
        for count in row_counts:
            rows_kv = decoding[:count]
            tokens = [1] * count
            rewind = [(kv, kv.length) for kv in [*prefilling, *rows_kv]]

            def apart() -> None:
                runner.prefill(prefilling, chunks)
                runner.decode(rows_kv, tokens)

            def mixed() -> None:
                if runner.mixed_step(prefilling, chunks, rows_kv, tokens) is None:
                    raise click.ClickException(f"no mixed pass for {shape} with {count} rows")

            captures = runner.captures
            point: dict[str, Any] = {"prefill": shape, "rows": count,
                                     "apart_s": _timed(apart, rewind, repeats), "mixed_s": _timed(mixed, rewind, repeats)}
            point["captures_while_timing"] = runner.captures - captures  # the first uses' (before the samples settle)
            settled = repeats // 3  # the first uses run eagerly, then capture
            point["apart_median_s"] = statistics.median(point["apart_s"][settled:])
            point["mixed_median_s"] = statistics.median(point["mixed_s"][settled:])
            point["speedup"] = point["apart_median_s"] / point["mixed_median_s"]
            report["points"].append(point)
            click.echo(f"{shape:16s} rows {count:3d}: apart {1e3 * point['apart_median_s']:6.2f} ms, "
                       f"mixed {1e3 * point['mixed_median_s']:6.2f} ms ({point['speedup']:.2f}x)")
        for kv in prefilling:
            kv.release()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
