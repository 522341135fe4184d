"""Where a short prefill pass's time goes: device kernels, host launches, and a busy second thread.

    python -m eval.profile_prefill --model random:llama-7b --out eval/results/profile_prefill_<tag>.json

In a server the model thread shares the interpreter lock with the event loop, and PyTorch lets
the lock go around every operator it dispatches: an eager pass of a few thousand operators can
wait on the loop a few thousand times, a captured decode step a few. For each pass shape
(``--passes``: ``sessions x chunk after context`` tokens) this measures, on a warmed runner:

- ``wall_ms``: the pass alone, synchronised (``--repeats`` times);
- ``kernel_ms``, ``kernel_launches`` and ``host_operators`` (top-level operators dispatched) of one
  pass under ``torch.profiler``;
- ``contended_ms[<duty>@<interval>]``: the pass while another thread runs pure Python for a
  ``--burst``-long slice ``duty`` of the time (as an event loop busy with many clients does),
  under the interpreter's switch interval ``interval`` (5 ms is Python's default);

and, as the control, one batched decode step (a graph replay) of ``--decode-batch`` rows the same
ways. Each of ``--variants`` gets its own runner and entry in ``runs``: ``graphed`` (the default
runner: short passes padded and replayed from captured graphs, through the fused prefill layer),
``fused`` (the fused prefill layer, eager, unpadded) and ``plain`` (the model's own layers, eager). Random weights of the named shape
stand in for a real checkpoint.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch
from torch.profiler import ProfilerActivity, profile

from djinn.engine.models import load_model
from djinn.engine.runner import ModelRunner
from eval.bench_decode import _prompts, _timed, prefilled, release
from eval.report import result_header


class BusyThread:
    """A thread that holds the interpreter for ``burst`` seconds of pure Python work, a ``duty``
    share of the time, sleeping (lock released) in between."""

    def __init__(self, duty: float, burst: float) -> None:
        self.duty, self.burst = duty, burst
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pause = self.burst * (1 - self.duty) / self.duty
        while not self._stop.is_set():
            until = time.perf_counter() + self.burst
            x = 0
            while time.perf_counter() < until:
                x += 1
            time.sleep(pause)

    def __enter__(self) -> BusyThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def profiled(fn: Callable[[], Any]) -> dict[str, float]:
    """One call of ``fn`` under the profiler: summed kernel time, kernel launches, and the
    operators dispatched from Python (profiler events with no parent)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    top = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None]
    return {"kernel_ms": sum(e.device_time for e in kernels) / 1e3, "kernel_launches": len(kernels),
            "host_operators": len(top)}


def measure(fn: Callable[[], Any], reset: Callable[[], None], repeats: int, duties: list[float],
            intervals: list[float], burst: float) -> dict[str, Any]:
    """``fn``'s wall time alone and beside a ``BusyThread`` of each duty and switch interval."""

    def timed() -> float:
        seconds = _timed(fn)
        reset()
        return seconds

    timed()  # the shape's first call loads its kernels
    alone = [timed() for _ in range(repeats)]
    point: dict[str, Any] = {"wall_ms": statistics.median(alone) * 1e3, "wall_s": alone,
                             **profiled(fn), "contended_ms": {}, "contended_s": {}}
    reset()
    default_interval = sys.getswitchinterval()
    try:
        for interval in intervals:
            sys.setswitchinterval(interval)
            for duty in duties:
                with BusyThread(duty, burst):
                    time.sleep(0.05)
                    seconds = [timed() for _ in range(repeats)]
                key = f"{duty:g}@{interval * 1e3:g}ms"
                point["contended_ms"][key] = statistics.median(seconds) * 1e3
                point["contended_s"][key] = seconds
    finally:
        sys.setswitchinterval(default_interval)
    return point


def profile_runner(runner: ModelRunner, shapes: list[tuple[int, int, int]], decode_batch: int, repeats: int,
                   duties: list[float], intervals: list[float], burst: float) -> dict[str, Any]:
    """Every prefill shape and the control decode step on one warmed runner."""
    longest = max(context + chunk for _, chunk, context in shapes) + 64
    rows = max(max(s for s, _, _ in shapes), decode_batch)
    runner.pool.grow((rows * 2 + 4) * (longest // runner.pool.block_tokens + 2))
    started = time.perf_counter()
    runner.warm_up(decode_batch, prefill_tokens=max(s * chunk for s, chunk, _ in shapes))
    run: dict[str, Any] = {"graphed_prefill": runner.graphed_prefill, "fused_prefill": runner.fused_prefill, "prefill_attention": runner.prefill_attention,
                           "fused_decode": runner.fused_decode, "warm_up_s": time.perf_counter() - started,
                           "prefill": []}
    for sessions, chunk, context in shapes:
        if context:
            kvs, _ = prefilled(runner, _prompts(sessions, context, runner.vocab_size, seed=5))
        else:
            kvs = [runner.new_kv() for _ in range(sessions)]
        turns = _prompts(sessions, chunk, runner.vocab_size, seed=6)

        def reset(kvs: list = kvs, context: int = context) -> None:
            for kv in kvs:
                kv.length = context

        point = measure(lambda kvs=kvs, turns=turns: runner.prefill(kvs, turns), reset, repeats,
                        duties, intervals, burst)
        point.update(sessions=sessions, chunk=chunk, context=context)
        run["prefill"].append(point)
        release(kvs)
        click.echo(f"graphed {runner.graphed_prefill} fused {runner.fused_prefill} prefill {sessions}x{chunk}@{context}: wall {point['wall_ms']:.2f} ms, "
                   f"kernels {point['kernel_ms']:.2f} ms, {point['kernel_launches']} launches, "
                   f"{point['host_operators']} operators; contended {point['contended_ms']}")
    kvs, tokens = prefilled(runner, _prompts(decode_batch, 1024, runner.vocab_size, seed=7))
    lengths = [kv.length for kv in kvs]

    def reset_decode() -> None:
        for kv, length in zip(kvs, lengths):
            kv.length = length

    point = measure(lambda: runner.decode(kvs, tokens), reset_decode, repeats, duties, intervals, burst)
    point.update(batch=decode_batch, context=1024)
    run["decode"] = point
    release(kvs)
    click.echo(f"decode B={decode_batch}: wall {point['wall_ms']:.2f} ms, kernels {point['kernel_ms']:.2f} ms, "
               f"{point['kernel_launches']} launches, {point['host_operators']} operators; "
               f"contended {point['contended_ms']}")
    run["captures"] = runner.captures
    return run


#: what ``--variants`` may name
VARIANTS = ("graphed", "fused", "plain")


def _passes(spec: str) -> list[tuple[int, int, int]]:
    """``"1x128@1024,8x128@1024"`` -> ``[(sessions, chunk, context), ...]``."""
    out = []
    for item in spec.split(","):
        shape, context = item.split("@")
        sessions, chunk = shape.split("x")
        out.append((int(sessions), int(chunk), int(context)))
    return out


@click.command()
@click.option("--model", "model_name", default="random:llama-7b")
@click.option("--passes", default="1x128@1024,8x128@1024,1x1024@0",
              help="prefill pass shapes, sessions x chunk tokens @ context tokens, comma-separated")
@click.option("--decode-batch", default=8, help="rows of the control decode step")
@click.option("--repeats", default=10)
@click.option("--duties", default="0.25,0.5", help="busy shares of the second thread")
@click.option("--intervals-ms", default="5,0.5", help="interpreter switch intervals, ms")
@click.option("--burst-ms", default=2.0, help="length of one busy slice of the second thread")
@click.option("--variants", default="graphed,fused,plain", help="comma-separated: graphed, fused, plain")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(model_name: str, passes: str, decode_batch: int, repeats: int, duties: str, intervals_ms: str,
         burst_ms: float, variants: str, out: Path) -> None:
    """Profile short prefill passes and a decode step, alone and beside a busy thread."""
    if not torch.cuda.is_available():
        raise click.ClickException("profiling prefill passes needs a CUDA device")
    duty_list = [float(d) for d in duties.split(",")]
    interval_list = [float(i) / 1e3 for i in intervals_ms.split(",")]
    loaded = load_model(model_name, dtype="bfloat16", device="cuda", seed=0)
    shapes = _passes(passes)
    report: dict[str, Any] = {
        **result_header(
            "profile_prefill", "eval.profile_prefill",
            "random weights of the named shape; bfloat16; one process, no server; the busy thread "
            "stands in for the server's event loop",
            dict(model=model_name, passes=passes, decode_batch=decode_batch, repeats=repeats, duties=duties,
                 intervals_ms=intervals_ms, burst_ms=burst_ms, variants=variants),
        ),
        "runs": [],
    }
    for variant in variants.split(","):
        if variant not in VARIANTS:
            raise click.BadParameter(f"{variant!r}: give one of {', '.join(VARIANTS)}", param_hint="--variants")
        runner = ModelRunner(loaded, device="cuda", fused_prefill=variant != "plain")
        runner.graphed_prefill = variant == "graphed"
        report["runs"].append(profile_runner(runner, shapes, decode_batch, repeats, duty_list, interval_list,
                                             burst_ms / 1e3))
        del runner
        torch.cuda.empty_cache()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
