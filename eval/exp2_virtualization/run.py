"""Experiment 2: weight streaming through the ring buffer, against the copy limit and accelerate.

    python -m eval.exp2_virtualization.run --model random:codellama-34b --dtype bfloat16 \\
        --budget-gb 11 --chunks 16,64,128,512 --out eval/results/exp2_<tag>.json
    python -m eval.exp2_virtualization.run --smoke --out /tmp/exp2_smoke.json   # CPU, seconds

1. The pinned host-to-device copy limit, measured in this process (1 GiB, several repeats; the
   pageable figure beside it). Without CUDA a plain host memcpy is measured and labelled so.
2. The model is built on the host with random weights of the named shape: every weight matrix
   is a slice of one seeded normal block (norms are ones), so a 34B shape costs the block, not
   minutes of per-tensor random fills and a second full copy next to the streamer's arena.
3. For each chunk size, a ``ModelRunner`` with a ``RingbufferStreamer`` (``reuse=False``: every
   layer is copied on every pass; the ring is the device budget; embeddings and head resident):
   decode step time (one token over a short context), streaming bandwidth (layer bytes per step
   / step time), time to first token of a long prompt, and the device memory high-water mark.
4. Baseline: accelerate's ``cpu_offload`` on the same model object (weights in pageable host
   memory, as it is normally used): decode step time and bytes moved per second.

Writes JSON (hardware, versions, config, raw samples, summary) and a PNG beside it, then prints
a short table.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from djinn.engine.models import (
    LoadedModel,
    _rebuild_buffers,
    model_config,
    resolve_dtype,
    weight_bytes,
)
from djinn.engine.runner import ModelRunner
from djinn.plugins.streamers.ringbuffer import RingbufferSettings, RingbufferStreamer
from eval.bench_transport import hardware
from eval.report import library_versions

MIB = 1 << 20
GIB = 1 << 30
#: extra elements of the random block, so that weight slices start at different offsets
_BLOCK_SPREAD = 1 << 20
WEIGHTS_NOTE = (
    "random weights of the named shape: each weight matrix is a slice of one seeded "
    "normal(0, initializer_range) block, norms are ones"
)

#: a pair of a model parameter and the host tensor it is reset to before each configuration
ParamHome = tuple[torch.nn.Parameter, torch.Tensor]


@attrs.frozen
class Exp2Settings:
    """What one run measures; ``SMOKE`` is the seconds-long CPU variant."""

    model: str = "random:codellama-34b"
    dtype: str = "bfloat16"
    device: str | None = None  # None: cuda when available, else cpu
    budget_gib: float = 11.0  # device bytes for the ring, in GiB
    chunks_mb: tuple[float, ...] = (16.0, 64.0, 128.0, 512.0)
    prefetch_layers: int = 2
    decode_context: int = 16  # prompt tokens before the timed decode steps
    warmup_steps: int = 1
    decode_steps: int = 3
    prompt_tokens: int = 512  # prompt of the time-to-first-token measurement
    ttft_repeats: int = 2
    h2d_bytes: int = GIB
    h2d_repeats: int = 5
    accelerate: bool = True
    accelerate_steps: int = 2
    seed: int = 0


SMOKE = Exp2Settings(
    model="random:tiny-llama",
    dtype="float32",
    device="cpu",
    budget_gib=0.0004,  # ~420 KiB: fewer than the 4 layers of ~145 KiB fit, so the ring wraps
    chunks_mb=(0.01, 0.05),
    decode_context=8,
    decode_steps=3,
    prompt_tokens=32,
    ttft_repeats=1,
    h2d_bytes=16 * MIB,
    h2d_repeats=2,
    accelerate_steps=2,
)


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds ``work()`` takes with the device drained before and after, and its result."""
    _sync(device)
    start = time.perf_counter()
    result = work()
    _sync(device)
    return time.perf_counter() - start, result


def _gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


def measure_h2d(nbytes: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """The host-to-device copy limit: pinned and pageable copies of ``nbytes`` (first dropped).

    ``gbps`` is the best pinned repeat: the bar the streamer is held to. Without CUDA this is a
    host memcpy and ``kind`` says so.
    """
    cuda = device.type == "cuda"
    source = torch.ones(nbytes, dtype=torch.uint8, pin_memory=cuda)  # [nbytes]
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)  # [nbytes]

    def samples(src: torch.Tensor) -> list[float]:
        def copy() -> torch.Tensor:
            return target.copy_(src, non_blocking=cuda)

        return [_timed(device, copy)[0] for _ in range(repeats + 1)][1:]

    result: dict[str, Any] = {
        "kind": "pinned_host_to_device" if cuda else "cpu_memcpy",
        "bytes": nbytes,
        "seconds": samples(source),
    }
    if cuda:
        pageable = torch.ones(nbytes, dtype=torch.uint8)  # [nbytes]
        result["pageable_seconds"] = samples(pageable)
        result["pageable_gbps"] = _gbps(nbytes, min(result["pageable_seconds"]))
    result["gbps"] = _gbps(nbytes, min(result["seconds"]))
    result["median_gbps"] = _gbps(nbytes, statistics.median(result["seconds"]))
    return result


# --------------------------------------------------------------------------- model


def build_random_model(spec: str, dtype: str, seed: int) -> tuple[LoadedModel, list[ParamHome]]:
    """``random:NAME`` on the host, each weight a slice of one seeded normal block.

    Returns the model and each parameter's host tensor, to reset the model to between runs
    (the streamer re-points parameters into its arena). Host memory: the block plus the norms.
    """
    torch_dtype = resolve_dtype(dtype)
    config = model_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation="sdpa")
    # pages of a large, never written host allocation cost no memory; each parameter's own
    # storage is dropped below when it becomes a slice of the block
    model.to_empty(device="cpu")
    model.tie_weights()
    _rebuild_buffers(model, torch.device("cpu"))
    model.eval()
    model.requires_grad_(False)

    norms = {
        id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)
    }
    params = list(model.named_parameters())
    largest = max(p.numel() for _, p in params)
    generator = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    block = torch.empty(largest + _BLOCK_SPREAD, dtype=torch_dtype)  # [largest + spread]
    block.normal_(0.0, std, generator=generator)
    homes: list[ParamHome] = []
    progress = tqdm(params, desc="building weights", unit="tensor", file=sys.stderr)
    for index, (name, param) in enumerate(progress):
        if id(param) in norms:
            param.data = torch.ones(param.shape, dtype=torch_dtype)
        elif name.endswith("bias"):
            param.data = torch.zeros(param.shape, dtype=torch_dtype)
        else:
            offset = index * 7919 % _BLOCK_SPREAD
            param.data = block[offset : offset + param.numel()].view(param.shape)
        homes.append((param, param.data))
    loaded = LoadedModel(
        name=spec,
        model=model,
        config=model.config,
        family=model.config.model_type,
        dtype=torch_dtype,
        device=torch.device("cpu"),
    )
    return loaded, homes


def _send_home(homes: Sequence[ParamHome]) -> None:
    """Point every parameter back at its host tensor (dropping arena and device copies)."""
    for param, home in homes:
        param.data = home
    gc.collect()


def _fresh_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_device_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# --------------------------------------------------------------------------- measurements


def _decode_loop(
    device: torch.device,
    step: Callable[[torch.Tensor], int],
    prompt: torch.Tensor,
    warmup: int,
    steps: int,
) -> list[float]:
    """Prefill ``prompt`` ``[1, T]``, time ``warmup + steps`` one-token steps, keep the last ``steps``."""
    token = step(prompt)
    seconds = []
    for _ in range(warmup + steps):
        ids = torch.tensor([[token]], dtype=torch.long, device=device)  # [1, 1]
        elapsed, token = _timed(device, lambda: step(ids))
        seconds.append(elapsed)
    return seconds[warmup:]


def _prompt(vocab: int, tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (1, tokens), generator=generator).to(device)  # [1, T]


def _first_token_seconds(runner: ModelRunner, prompt: torch.Tensor, device: torch.device) -> float:
    """Seconds from a ``[1, T]`` prompt over a fresh KV to its first token (KV allocation excluded)."""
    kv = runner.new_kv(prompt.shape[1])
    return _timed(device, lambda: int(runner.begin(kv, prompt).finish().argmax()))[0]


def measure_ringbuffer(
    loaded: LoadedModel,
    homes: Sequence[ParamHome],
    chunk_mb: float,
    settings: Exp2Settings,
    device: torch.device,
) -> dict[str, Any]:
    """Decode steps, time to first token and device high-water mark with one chunk size."""
    _send_home(homes)
    _fresh_device(device)
    streamer = RingbufferStreamer(
        # every layer streams through a ring of the whole budget: what this experiment measures
        RingbufferSettings(chunk_mb=chunk_mb, prefetch_layers=settings.prefetch_layers, reuse=False,
                           resident_layers=0, kv_reserve_fraction=0.0)
    )
    try:
        prepare_s, runner = _timed(
            device,
            lambda: ModelRunner(
                loaded, streamer=streamer, device=device, budget_bytes=int(settings.budget_gib * GIB)
            ),
        )
        vocab = runner.vocab_size
        kv = runner.new_kv(settings.decode_context + settings.warmup_steps + settings.decode_steps + 1)

        def step(ids: torch.Tensor) -> int:
            return int(runner.begin(kv, ids).finish().argmax())

        decode_s = _decode_loop(
            device,
            step,
            _prompt(vocab, settings.decode_context, settings.seed, device),
            settings.warmup_steps,
            settings.decode_steps,
        )
        prompt = _prompt(vocab, settings.prompt_tokens, settings.seed + 1, device)
        ttft_s = [_first_token_seconds(runner, prompt, device) for _ in range(settings.ttft_repeats)]
        stats = streamer.stats()
        return {
            "chunk_mb": chunk_mb,
            "prepare_seconds": prepare_s,
            "layer_bytes": sum(streamer.layer_nbytes),
            "bytes_per_pass": stats.bytes_streamed / max(stats.passes, 1),
            "decode_step_seconds": decode_s,
            "ttft_seconds": ttft_s,
            "device_peak_bytes": _peak_device_bytes(device),
            "device_weight_bytes": runner.device_weight_bytes(),
            "streamer_stats": attrs.asdict(stats),
        }
    finally:
        _send_home(homes)


def measure_accelerate(
    loaded: LoadedModel, homes: Sequence[ParamHome], settings: Exp2Settings, device: torch.device
) -> dict[str, Any]:
    """accelerate's ``cpu_offload`` decode steps on the same model, weights in pageable memory.

    Leaves the model offloaded (its parameters on ``meta``): run it last.
    """
    try:
        from accelerate import cpu_offload
    except ImportError as exc:
        return {"skipped_because": f"accelerate is not installed: {exc}"}
    _send_home(homes)
    _fresh_device(device)
    moved_bytes = weight_bytes(loaded.model)
    model = cpu_offload(loaded.model, execution_device=device)
    state: dict[str, Any] = {"cache": None}

    @torch.inference_mode()
    def step(ids: torch.Tensor) -> int:
        out = model(input_ids=ids, past_key_values=state["cache"], use_cache=True)
        state["cache"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    decode_s = _decode_loop(
        device,
        step,
        _prompt(loaded.config.vocab_size, settings.decode_context, settings.seed, device),
        settings.warmup_steps,
        settings.accelerate_steps,
    )
    return {
        "model": loaded.name,
        "placement": "same model object; weights in pageable host memory; every module moved per step",
        "bytes_per_step": moved_bytes,
        "decode_step_seconds": decode_s,
        "device_peak_bytes": _peak_device_bytes(device),
    }


# --------------------------------------------------------------------------- report


def summarize(
    h2d: dict[str, Any], runs: Sequence[dict[str, Any]], baseline: dict[str, Any]
) -> dict[str, Any]:
    """Per chunk size: GB/s, % of the copy limit, step time, TTFT and its ratio to the floor."""
    limit = h2d["gbps"]
    accelerate_step = (
        statistics.median(baseline["decode_step_seconds"]) if "decode_step_seconds" in baseline else None
    )
    chunks = []
    for run in runs:
        step = statistics.median(run["decode_step_seconds"])
        ttft = statistics.median(run["ttft_seconds"])
        gbps = _gbps(run["bytes_per_pass"], step)
        # the floor: streaming every layer once at the measured copy limit
        floor = run["layer_bytes"] / (limit * 1e9)
        chunks.append({
            "chunk_mb": run["chunk_mb"],
            "effective_gbps": gbps,
            "percent_of_h2d": 100.0 * gbps / limit if limit else None,
            "decode_step_seconds": step,
            "ttft_seconds": ttft,
            "ttft_over_stream_floor": ttft / floor if floor else None,
            "device_peak_bytes": run["device_peak_bytes"],
            "copy_gbps": run["streamer_stats"]["copy_gbps"],
            "speedup_over_accelerate": accelerate_step / step if accelerate_step else None,
        })
    summary: dict[str, Any] = {"h2d_gbps": limit, "h2d_kind": h2d["kind"], "chunks": chunks}
    if accelerate_step is not None:
        summary["accelerate"] = {
            "decode_step_seconds": accelerate_step,
            "effective_gbps": _gbps(baseline["bytes_per_step"], accelerate_step),
            "device_peak_bytes": baseline["device_peak_bytes"],
        }
    if chunks:
        best = min(chunks, key=lambda c: c["decode_step_seconds"])
        summary["best_chunk_mb"] = best["chunk_mb"]
        summary["best_speedup_over_accelerate"] = best["speedup_over_accelerate"]
    return summary


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Bandwidth against chunk size, with the copy limit and accelerate as lines; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summary = report["summary"]
    fig, ax = plt.subplots(figsize=(6, 4))
    chunks = summary["chunks"]
    sizes, gbps = [c["chunk_mb"] for c in chunks], [c["effective_gbps"] for c in chunks]
    ax.plot(sizes, gbps, "o-", label="djinn ringbuffer")
    ax.axhline(summary["h2d_gbps"], color="black", linestyle="--", label=f"{summary['h2d_kind']} limit")
    if "accelerate" in summary:
        accelerate_gbps = summary["accelerate"]["effective_gbps"]
        ax.axhline(accelerate_gbps, color="tab:red", linestyle=":", label="accelerate cpu_offload")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk size (MiB)")
    ax.set_ylabel("effective streaming bandwidth (GB/s)")
    ax.set_title(f"{report['config']['model']} ({report['config']['dtype']})")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def versions() -> dict[str, Any]:
    """Library versions, accelerate (the baseline) included."""
    found = library_versions()
    try:
        import accelerate

        found["accelerate"] = accelerate.__version__
    except ImportError:
        found["accelerate"] = None
    return found


def run(settings: Exp2Settings, out: Path) -> dict[str, Any]:
    """Measure everything ``settings`` asks for; write the JSON report (and the plot) to ``out``."""
    started = time.perf_counter()
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    print(f"copy limit ({settings.h2d_bytes / MIB:.0f} MiB x {settings.h2d_repeats}) ...", file=sys.stderr)
    h2d = measure_h2d(settings.h2d_bytes, settings.h2d_repeats, device)
    loaded, homes = build_random_model(settings.model, settings.dtype, settings.seed)
    model_bytes = weight_bytes(loaded.model)
    runs = []
    for chunk_mb in tqdm(settings.chunks_mb, desc="chunk sizes", unit="config", file=sys.stderr):
        runs.append(measure_ringbuffer(loaded, homes, chunk_mb, settings, device))
    baseline: dict[str, Any] = {"skipped_because": "--no-accelerate"}
    if settings.accelerate:
        print("accelerate cpu_offload ...", file=sys.stderr)
        baseline = measure_accelerate(loaded, homes, settings, device)
    report = {
        "benchmark": "exp2_virtualization",
        "note": WEIGHTS_NOTE,
        "hardware": hardware(),
        "versions": versions(),
        "config": {
            **attrs.asdict(settings),
            "device": str(device),
            "model_weight_bytes": model_bytes,
            "budget_bytes": int(settings.budget_gib * GIB),
            "layers": loaded.config.num_hidden_layers,
        },
        "h2d": h2d,
        "ringbuffer": runs,
        "accelerate": baseline,
        "summary": summarize(h2d, runs, baseline),
        "total_seconds": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    report["plot"] = str(plot(report, out.with_suffix(".png")))
    return report


def print_table(report: dict[str, Any]) -> None:
    """The summary as a short table on stdout."""
    summary = report["summary"]
    print(f"{summary['h2d_kind']} limit: {summary['h2d_gbps']:.2f} GB/s   ({report['config']['model']}, "
          f"{report['config']['dtype']}, ring budget {report['config']['budget_gib']} GiB)")
    print(f"{'chunk MiB':>10} {'GB/s':>7} {'% H2D':>6} {'step s':>8} {'TTFT s':>8} {'TTFT/floor':>10} "
          f"{'HBM GiB':>8} {'x accel':>8}")
    for c in summary["chunks"]:
        hbm = "-" if c["device_peak_bytes"] is None else f"{c['device_peak_bytes'] / GIB:.2f}"
        speedup = "-" if c["speedup_over_accelerate"] is None else f"{c['speedup_over_accelerate']:.2f}"
        print(f"{c['chunk_mb']:>10g} {c['effective_gbps']:>7.2f} {c['percent_of_h2d']:>6.1f} "
              f"{c['decode_step_seconds']:>8.3f} {c['ttft_seconds']:>8.3f} "
              f"{c['ttft_over_stream_floor']:>10.2f} {hbm:>8} {speedup:>8}")
    if "accelerate" in summary:
        acc = summary["accelerate"]
        print(f"{'accelerate':>10} {acc['effective_gbps']:>7.2f} {'':>6} {acc['decode_step_seconds']:>8.3f}")
    else:
        print(f"accelerate: {report['accelerate'].get('skipped_because')}")
    print(f"total {report['total_seconds']:.1f} s")


def _chunk_list(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run, print the table; returns the report."""
    defaults = Exp2Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, finishes in seconds")
    parser.add_argument("--model", default=None, help=f"model spec (default {defaults.model})")
    parser.add_argument("--dtype", default=None, help=f"weight dtype (default {defaults.dtype})")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--budget-gb", type=float, default=None, help="ring size in GiB (default 11)")
    parser.add_argument("--chunks", type=_chunk_list, default=None, help="chunk sizes in MiB: 16,64")
    parser.add_argument("--prefetch-layers", type=int, default=None, help="layers copied ahead (default 2)")
    parser.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per chunk size")
    parser.add_argument("--no-accelerate", action="store_true", help="skip the accelerate baseline")
    parser.add_argument("--out", type=Path, default=Path("eval/results/exp2.json"), help="JSON report path")
    args = parser.parse_args(argv)

    settings = SMOKE if args.smoke else defaults
    overrides = {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "budget_gib": args.budget_gb,
        "chunks_mb": args.chunks,
        "prefetch_layers": args.prefetch_layers,
        "decode_steps": args.decode_steps,
    }
    settings = attrs.evolve(settings, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_accelerate:
        settings = attrs.evolve(settings, accelerate=False)
    report = run(settings, args.out)
    print(f"\nwrote {args.out} and {report['plot']}")
    print_table(report)
    return report


if __name__ == "__main__":
    main()
