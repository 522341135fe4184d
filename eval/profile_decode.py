"""Where a batched decode step's time goes: wall time, device kernel time and the top kernels.

    python -m eval.profile_decode --model random:llama-7b --batches 1,8,32 --out eval/results/profile_decode_<tag>.json

For each decode attention (paged, masked, or ``deterministic``: the runner's deterministic mode) and batch size, sessions are prefilled with
``--context`` tokens, steps are captured and warmed up, then ``--steps`` steps are timed on the
wall clock and ``--profiled`` more run under ``torch.profiler``: the step's summed kernel time
beside its wall time separates device work from host preparation. Random weights of the named
shape stand in for a real checkpoint.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import click
import torch
from torch.profiler import ProfilerActivity, profile

from djinn.engine.models import load_model
from djinn.engine.runner import DECODE_ATTENTION, ModelRunner
from eval.bench_decode import prefilled, release, step_times
from eval.report import result_header


def profile_steps(runner: ModelRunner, kvs: list, tokens: list[int], steps: int, top: int) -> dict[str, Any]:
    """Kernel time per step and the ``top`` kernels by total device time over ``steps`` steps."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tokens = runner.decode(kvs, tokens).argmax(-1).tolist()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    total_us = sum(e.device_time_total for e in kernels)
    return {
        "kernel_ms_per_step": total_us / steps / 1e3,
        "kernel_launches_per_step": sum(e.count for e in kernels) / steps,
        "top_kernels": [
            {"name": e.key[:120], "ms_per_step": e.device_time_total / steps / 1e3, "calls_per_step": e.count / steps}
            for e in kernels[:top]
        ],
    }


@click.command()
@click.option("--model", "model_name", default="random:llama-7b")
@click.option("--context", default=1024)
@click.option("--batches", default="1,8,32")
@click.option("--attention", "attentions", default=",".join(DECODE_ATTENTION),
              help="comma-separated decode attentions; 'deterministic' profiles [server] deterministic")
@click.option("--steps", default=20, help="wall-clock timed steps per point")
@click.option("--profiled", default=5, help="steps under the profiler per point")
@click.option("--top", default=12, help="kernels listed per point")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(model_name: str, context: int, batches: str, attentions: str, steps: int, profiled: int, top: int,
         out: Path) -> None:
    """Profile decode steps per attention and batch size; write one JSON file and print a table."""
    if not torch.cuda.is_available():
        raise click.ClickException("profiling decode steps needs a CUDA device")
    loaded = load_model(model_name, dtype="bfloat16", device="cuda", seed=0)
    report: dict[str, Any] = {
        **result_header(
            "profile_decode", "eval.profile_decode",
            "random weights of the named shape; bfloat16; CUDA graphs on; one process, no server",
            dict(model=model_name, context=context, batches=batches, steps=steps, profiled=profiled),
        ),
        "points": [],
    }
    for attention in attentions.split(","):
        mode = {"deterministic": True} if attention == "deterministic" else {"decode_attention": attention}
        runner = ModelRunner(loaded, device="cuda", **mode)
        sizes = [int(b) for b in batches.split(",")]
        per_session = (context + steps + profiled + 8) // runner.pool.block_tokens + 2
        runner.pool.grow(max(sizes) * per_session + 1)  # sized once, as the server does
        for batch in sizes:
            kvs, tokens = prefilled(runner, [[7] * context for _ in range(batch)])
            compile_started = time.perf_counter()
            step_times(runner, kvs, tokens, 3)  # compile, capture, warm up
            warm_s = time.perf_counter() - compile_started
            wall = step_times(runner, kvs, tokens, steps)
            point = {"attention": attention, "batch": batch, "warm_up_s": warm_s,
                     "wall_ms_median": statistics.median(wall) * 1e3, "wall_s": wall,
                     **profile_steps(runner, kvs, tokens, profiled, top)}
            report["points"].append(point)
            release(kvs)
            click.echo(f"{attention:6s} B={batch:3d} wall {point['wall_ms_median']:7.2f} ms  kernels "
                       f"{point['kernel_ms_per_step']:7.2f} ms  launches {point['kernel_launches_per_step']:6.0f}")
            for kernel in point["top_kernels"][:8]:
                click.echo(f"    {kernel['ms_per_step']:7.3f} ms  x{kernel['calls_per_step']:5.0f}  {kernel['name'][:90]}")
        del runner
        torch.cuda.empty_cache()
    # compiles, recompiles and graph breaks of the compiled attention kernel
    report["dynamo_counters"] = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()}
    click.echo(json.dumps(report["dynamo_counters"])[:2000])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
