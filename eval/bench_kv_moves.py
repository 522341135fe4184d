"""Evict and restore of one session's KV through the kernel, beside a raw pinned copy of the same bytes.

    python -m eval.bench_kv_moves --model random:llama-7b --dtype bfloat16 --tokens 1024 \\
        --out eval/results/kv_moves_<tag>.json

The session is built by a real prefill of ``--tokens`` random tokens, then moved to the
``pinned_host`` tier and back ``--repeats`` times with the kernel's own evict/restore (copy stream,
events). After every round trip the next-token logits must be bitwise equal to the logits before
the first eviction. Random weights of the named shape stand in for a real checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import attrs
import torch

from djinn.config import DjinnConfig
from djinn.kernel.plugins import get_plugin_manager
from djinn.engine.service import SamplingParams
from djinn.server.launch import Runtime, build_runtime
from eval.report import result_header


def raw_copy_ms(nbytes: int, repeats: int) -> dict[str, list[float]]:
    """Plain pinned host<->device copies of ``nbytes`` (the limit the kernel's moves are judged against)."""
    if not torch.cuda.is_available():
        return {"h2d_ms": [], "d2h_ms": []}
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out: dict[str, list[float]] = {"h2d_ms": [], "d2h_ms": []}
    for _ in range(repeats + 2):
        for key, dst, src in (("h2d_ms", dev, host), ("d2h_ms", host, dev)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            out[key].append(start.elapsed_time(end))
    return {k: v[2:] for k, v in out.items()}


async def measure(runtime: Runtime, tokens: int, repeats: int) -> dict:
    kernel, model = runtime.kernel, runtime.model
    await kernel.run_background()
    session = kernel.open_session()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.runner.vocab_size, (tokens,), generator=gen).tolist()
    await model.generate(session, prompt, SamplingParams(max_new_tokens=1))

    def next_logits():
        cursor = model.runner.begin(session.kv, model.runner.ids_tensor([7]))
        cursor.run()
        logits = cursor.finish()
        return logits.cpu()

    # logits of the next step, without committing it: a fresh cursor over the same KV each time
    length = session.kv.length
    reference = await model.run_model(next_logits)
    session.kv.length = length
    # control: the same probe repeated with no move, to tell compute nondeterminism from a bad move
    control = []
    for _ in range(repeats):
        control.append(bool(torch.equal(await model.run_model(next_logits), reference)))
        session.kv.length = length
    evict_ms, restore_ms, exact = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        assert await kernel._evict(session)
        evict_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        assert await kernel._restore(session, critical=True)
        restore_ms.append((time.perf_counter() - t0) * 1e3)
        logits = await model.run_model(next_logits)
        session.kv.length = length
        exact.append(bool(torch.equal(logits, reference)))
    await kernel.stop_background()
    return {"kv_bytes": session.kv.nbytes, "kv_tokens": length, "evict_ms": evict_ms,
            "restore_ms": restore_ms, "bitwise_equal": exact, "control_bitwise_equal": control,
            "pinned": next(iter(kernel.tiers.values())).stats().pinned}


def main(argv: list[str] | None = None) -> None:
    """Measure and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:tiny-llama")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=1023, help="prompt tokens; with the generated one, the KV holds tokens + 1")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tier-gb", type=float, default=4.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    base = DjinnConfig()
    config = attrs.evolve(
        base, model=attrs.evolve(base.model, name=args.model, dtype=args.dtype),
        memory=attrs.evolve(base.memory, kv_block_tokens=128),
        settings={"pinned_host": {"capacity_gb": args.tier_gb}},
    )
    runtime = build_runtime(config, get_plugin_manager(config, ["static"]))
    try:
        result = asyncio.run(measure(runtime, args.tokens, args.repeats))
    finally:
        runtime.kernel.stop()
    raw = raw_copy_ms(result["kv_bytes"], args.repeats)
    summary = {
        "kv_gb": result["kv_bytes"] / 1e9,
        "evict_ms_p50": statistics.median(result["evict_ms"]),
        "restore_ms_p50": statistics.median(result["restore_ms"]),
        "restore_ms_max": max(result["restore_ms"]),
        "raw_h2d_ms_p50": statistics.median(raw["h2d_ms"]) if raw["h2d_ms"] else None,
        "raw_d2h_ms_p50": statistics.median(raw["d2h_ms"]) if raw["d2h_ms"] else None,
        "bitwise_equal_after_moves": f"{sum(result['bitwise_equal'])}/{len(result['bitwise_equal'])}",
        "bitwise_equal_without_moves": f"{sum(result['control_bitwise_equal'])}/{len(result['control_bitwise_equal'])}",
        "pinned": result["pinned"],
    }
    report = {
        **result_header(
            "kv_moves", "eval.bench_kv_moves",
            "random weights of the named shape; moves through the kernel's evict/restore",
            vars(args) | {"out": str(args.out)}, argv or None,
        ),
        "raw": result | raw,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    for key, value in summary.items():
        print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
