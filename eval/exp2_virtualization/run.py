"""Experiment 2: a model larger than the GPU budget, streamed through the ring buffer.

    python -m eval.exp2_virtualization.run --model random:codellama-34b --dtype bfloat16 \\
        --budget-gb 22,11 --chunks 16,64,256 --out eval/results/exp2_<tag>.json
    python -m eval.exp2_virtualization.run --model random:llama-70b --weight-dtype fp8_e4m3 \\
        --budget-gb 22 --fp8-matmul dequantize,scaled_mm --out eval/results/exp2_<tag>.json
    python -m eval.exp2_virtualization.run --smoke --out /tmp/exp2_smoke.json   # CPU, seconds

1. The pinned host-to-device copy limit, measured in this process (1 GiB, several repeats; the
   pageable figure beside it). Without CUDA a plain host memcpy is measured and labelled so.
2. The model, with random weights of the named shape. In the model dtype (``--weight-dtype
   auto``) every weight matrix is a slice of one seeded normal block (norms are ones), so a 34B
   shape costs the block and the streamer's arena, not minutes of random fills and a second copy.
   In fp8 it is what the server loads (``load_model(weight_dtype="fp8_e4m3")``): drawn and
   quantized one layer at a time on the GPU, kept on the host in fp8, so a 70B shape needs about
   70 GB of host memory; it is built again for each budget and each ``--fp8-matmul``.
3. For each GPU budget (``[memory] gpu_memory_budget_gb``, GiB), a ``ModelRunner`` with a
   ``RingbufferStreamer`` that splits it as ``djinn run`` does: the embeddings, final norm and head
   and (on CUDA) the server's workspace come off the top, the streamer keeps a KV reserve, as many
   leading layers as fit stay resident and the rest stream through the ring, every streamed layer
   copied on every pass (``reuse=False``). One prepared streamer serves the chunk sweep (the chunk
   size only splits each copy): per chunk size, batch-1 decode steps (one token over a short
   context) and the time to first token of a long prompt; at the best chunk size, decode steps of
   a batch of sessions (one streamed pass for all of them) and their aggregate tokens/s. The
   floor of a pass is the streamed bytes at the measured copy limit. Further ``--fp8-matmul``
   values run at that budget's best chunk size only.
4. Baseline: accelerate's ``cpu_offload`` on the same model object (weights in pageable host
   memory, as it is normally used), for weights in the model dtype: decode step time and bytes
   moved per second. It does not run fp8 weights; an fp8 run records why it has no baseline.

Writes JSON (the header of ``eval.report.result_header``: command, commit, hardware, versions;
config, raw samples, summary) and a PNG beside it, then prints a short table.
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
    load_model,
    model_config,
    resolve_dtype,
    weight_bytes,
)
from djinn.config import DjinnConfig
from djinn.engine.families import family_of
from djinn.engine.runner import ModelRunner
from djinn.kernel.errors import ModelError
from djinn.plugins.streamers.ringbuffer import RingbufferSettings, RingbufferStreamer, chunk_bytes
from eval.report import library_versions, result_header

MIB = 1 << 20
GIB = 1 << 30
#: extra elements of the random block, so that weight slices start at different offsets
_BLOCK_SPREAD = 1 << 20
WEIGHTS_NOTE = (
    "random weights of the named shape: in the model dtype each weight matrix is a slice of one "
    "seeded normal(0, initializer_range) block, norms are ones; in fp8 the server's loader draws "
    "each layer on the device and quantizes it (e4m3, one scale per output channel)"
)

#: a pair of a model parameter and the host tensor it is reset to before each configuration
ParamHome = tuple[torch.nn.Parameter, torch.Tensor]


@attrs.frozen
class Exp2Settings:
    """What one run measures; ``SMOKE`` is the seconds-long CPU variant."""

    model: str = "random:codellama-34b"
    dtype: str = "bfloat16"  # the compute dtype
    weight_dtype: str = "auto"  # how the decoder layers' weights are stored: auto | fp8_e4m3
    device: str | None = None  # None: cuda when available, else cpu
    budgets_gib: tuple[float, ...] = (22.0,)  # GPU budgets, as [memory] gpu_memory_budget_gb
    workspace_gib: float = DjinnConfig().memory.workspace_gb  # kept out of the budget on CUDA
    kv_reserve_gib: float = 1.5  # the streamer's KV reserve: room for the runs' sessions
    chunks_mb: tuple[float, ...] = (16.0, 64.0, 256.0)
    prefetch_layers: int = 2
    fp8_matmuls: tuple[str, ...] = ("dequantize",)  # the first is swept; the others at its best chunk
    decode_context: int = 16  # prompt tokens before the timed decode steps
    warmup_steps: int = 1
    decode_steps: int = 3
    batch: int = 32  # sessions of the batched decode steps
    batch_steps: int = 3
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
    # ~840 KiB: the embeddings and head (~260 KiB), a KV reserve of ~105 KiB, one resident layer of
    # ~145 KiB and a ring of ~2.4 layers for the other three, so the ring wraps
    budgets_gib=(0.0008,),
    kv_reserve_gib=0.0001,
    chunks_mb=(0.01, 0.05),
    decode_context=8,
    decode_steps=3,
    batch=3,
    batch_steps=2,
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
    _rebuild_buffers(model.modules(), torch.device("cpu"))
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
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_device_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def outside_bytes(loaded: LoadedModel) -> int:
    """Bytes of the embeddings, final norm and head (tied weights once): what the runner keeps on
    the device besides the layers. Counted by tensor, as weight slices share one block's storage."""
    tensors = {id(t): t for m in family_of(loaded).outside_layers for t in (*m.parameters(), *m.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def host_memory_bytes() -> int:
    """Physical memory of this host."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --------------------------------------------------------------------------- measurements


def _prompt(vocab: int, tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (1, tokens), generator=generator).to(device)  # [1, T]


def _decode_steps(
    runner: ModelRunner, batch: int, settings: Exp2Settings, device: torch.device
) -> tuple[list[float], list[list[int]]]:
    """Seconds of ``warmup + steps`` decode steps of ``batch`` sessions (the last ``steps`` kept),
    each session after its own ``decode_context``-token prompt, all prompts in one packed pass;
    and each session's greedy tokens (the prompt's, then every step's)."""
    steps = settings.decode_steps if batch == 1 else settings.batch_steps
    kvs = [runner.new_kv(settings.decode_context + settings.warmup_steps + steps + 1) for _ in range(batch)]
    prompts = [_prompt(runner.vocab_size, settings.decode_context, settings.seed + b, device)[0].tolist()
               for b in range(batch)]
    tokens = runner.prefill(kvs, prompts).argmax(-1).tolist()  # [batch]
    picked = [tokens]
    seconds = []
    for _ in range(settings.warmup_steps + steps):
        elapsed, logits = _timed(device, lambda: runner.decode(kvs, tokens))
        tokens = logits.argmax(-1).tolist()
        picked.append(tokens)
        seconds.append(elapsed)
    for kv in kvs:
        kv.release()
    return seconds[settings.warmup_steps :], [list(row) for row in zip(*picked)]


def _first_token_seconds(runner: ModelRunner, prompt: torch.Tensor, device: torch.device) -> float:
    """Seconds from a ``[1, T]`` prompt over a fresh KV to its first token (KV allocation excluded)."""
    kv = runner.new_kv(prompt.shape[1])
    seconds = _timed(device, lambda: int(runner.begin(kv, prompt).finish().argmax()))[0]
    kv.release()
    return seconds


def _pool_blocks(runner: ModelRunner, settings: Exp2Settings) -> int:
    """KV blocks the measurements hold at most at once (the batch; a prompt), plus the scratch block."""
    per_session = settings.decode_context + settings.warmup_steps + max(settings.decode_steps, settings.batch_steps) + 1
    block = runner.pool.block_tokens
    return 1 + max(settings.batch * -(-per_session // block), -(-settings.prompt_tokens // block))


def measure_budget(
    loaded: LoadedModel,
    budget_gib: float,
    fp8_matmul: str,
    chunks_mb: Sequence[float],
    settings: Exp2Settings,
    device: torch.device,
) -> list[dict[str, Any]]:
    """One prepared runner under a GPU budget of ``budget_gib``: per chunk size, batch-1 decode
    steps and time to first token; at the best chunk size, decode steps of ``settings.batch``
    sessions. Returns one record per chunk size, the best one carrying the batched steps."""
    _fresh_device(device)
    outside = outside_bytes(loaded)
    workspace = int(settings.workspace_gib * GIB) if device.type == "cuda" else 0
    budget = int(budget_gib * GIB)
    layers_budget = budget - outside - workspace
    if layers_budget <= 0:
        raise SystemExit(f"a {budget_gib} GiB budget leaves nothing for the layers beside the embeddings, "
                         f"norm and head ({outside / GIB:.2f} GiB) and the workspace ({workspace / GIB:.2f} GiB)")
    streamer = RingbufferStreamer(RingbufferSettings(
        chunk_mb=chunks_mb[0], prefetch_layers=settings.prefetch_layers, reuse=False,
        kv_reserve_gb=settings.kv_reserve_gib, fp8_matmul=fp8_matmul, progress=True,
    ))
    # masked decode attention: no kernel compile in a time-limited run, and at these contexts
    # attention is microseconds beside a pass that streams gigabytes
    prepare_s, runner = _timed(device, lambda: ModelRunner(
        loaded, streamer=streamer, device=device, budget_bytes=layers_budget, decode_attention="masked",
    ))
    runner.pool.grow(_pool_blocks(runner, settings))
    common = {
        "budget_gib": budget_gib,
        "budget_bytes": budget,
        "layers_budget_bytes": layers_budget,
        "weight_dtype": loaded.weight_dtype,
        "fp8_matmul": fp8_matmul if loaded.weight_dtype != "auto" else None,
        "prepare_seconds": prepare_s,
        "resident_layers": streamer.resident_layers,
        "streamed_layers": len(streamer.layer_nbytes) - streamer.resident_layers,
        # the streamed layers' bytes: what a pass copies
        "layer_bytes": streamer.pass_bytes,
        "all_layer_bytes": sum(streamer.layer_nbytes),
        "ring_bytes": streamer.ring_bytes(),
        "work_bytes": streamer.work_bytes,
        "device_weight_bytes": runner.device_weight_bytes(),
        "kv_pool_bytes": runner.pool.tensor.numel() * runner.pool.tensor.element_size(),
    }
    prompt = _prompt(runner.vocab_size, settings.prompt_tokens, settings.seed + 1000, device)
    # the prompt's kernel shapes are used once before any timing
    _first_token_seconds(runner, prompt, device)
    records = []
    for chunk_mb in tqdm(chunks_mb, desc=f"{budget_gib:g} GiB, chunk sizes", unit="size", file=sys.stderr):
        streamer.chunk_bytes = chunk_bytes(chunk_mb)
        before = streamer.stats()
        decode_s, (tokens,) = _decode_steps(runner, 1, settings, device)
        ttft_s = [_first_token_seconds(runner, prompt, device) for _ in range(settings.ttft_repeats)]
        stats = streamer.stats()
        passes = stats.passes - before.passes
        records.append({
            **common,
            "chunk_mb": chunk_mb,
            "bytes_per_pass": (stats.bytes_streamed - before.bytes_streamed) / max(passes, 1),
            "decode_step_seconds": decode_s,
            "decode_tokens": tokens,
            "ttft_seconds": ttft_s,
            "device_peak_bytes": _peak_device_bytes(device),
            "streamer_stats": attrs.asdict(stats),
        })
    best = min(records, key=lambda r: statistics.median(r["decode_step_seconds"]))
    streamer.chunk_bytes = chunk_bytes(best["chunk_mb"])
    best["batch"] = settings.batch
    best["batch_decode_step_seconds"], batch_tokens = _decode_steps(runner, settings.batch, settings, device)
    # the batch's first session has the batch-1 run's prompt: a batched pass gives it the same tokens
    best["batch_first_session_tokens"] = batch_tokens[0]
    best["device_peak_bytes"] = _peak_device_bytes(device)
    return records


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

    # the prompt's pass warms it up: every pass moves every module, the first one included
    token = step(_prompt(loaded.config.vocab_size, settings.decode_context, settings.seed, device))
    seconds = []
    for _ in range(settings.accelerate_steps):
        ids = torch.tensor([[token]], dtype=torch.long, device=device)  # [1, 1]
        elapsed, token = _timed(device, lambda: step(ids))
        seconds.append(elapsed)
    return {
        "model": loaded.name,
        "placement": "same model object; weights in pageable host memory; every module moved per step",
        "bytes_per_step": moved_bytes,
        "decode_step_seconds": seconds,
        "device_peak_bytes": _peak_device_bytes(device),
    }


# --------------------------------------------------------------------------- report


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _agreement(tokens: Sequence[int], reference: Sequence[int]) -> float:
    """The share of positions where two greedy sequences pick the same token."""
    return sum(a == b for a, b in zip(tokens, reference)) / len(reference)


def summarize(
    h2d: dict[str, Any], runs: Sequence[dict[str, Any]], baseline: dict[str, Any]
) -> dict[str, Any]:
    """Per chunk size: GB/s, % of the copy limit, step time, TTFT and its ratio to the floor; per
    budget and fp8 GEMM path: the best chunk size's figures against the streaming floor."""
    limit = h2d["gbps"]
    accelerate_step = _median(baseline["decode_step_seconds"]) if "decode_step_seconds" in baseline else None
    chunks = []
    for run in runs:
        step = _median(run["decode_step_seconds"])
        ttft = _median(run["ttft_seconds"])
        gbps = _gbps(run["bytes_per_pass"], step)
        # the floor: streaming the non-resident layers once at the measured copy limit
        floor = run["layer_bytes"] / (limit * 1e9)
        chunks.append({
            "budget_gib": run["budget_gib"],
            "fp8_matmul": run["fp8_matmul"],
            "chunk_mb": run["chunk_mb"],
            "effective_gbps": gbps,
            "percent_of_h2d": 100.0 * gbps / limit if limit else None,
            "decode_step_seconds": step,
            "decode_step_over_floor": step / floor if floor else None,
            "ttft_seconds": ttft,
            "ttft_over_stream_floor": ttft / floor if floor else None,
            "device_peak_bytes": run["device_peak_bytes"],
            "copy_gbps": run["streamer_stats"]["copy_gbps"],
            "speedup_over_accelerate": accelerate_step / step if accelerate_step else None,
        })
    best = []
    for run, chunk in zip(runs, chunks):
        if "batch_decode_step_seconds" not in run:
            continue
        batch_step = _median(run["batch_decode_step_seconds"])
        group = [r for r in runs if (r["budget_gib"], r["fp8_matmul"]) == (run["budget_gib"], run["fp8_matmul"])]
        dequantized = next((r for r in runs if r["budget_gib"] == run["budget_gib"] and r["fp8_matmul"] == "dequantize"
                            and "batch" in r), None)
        best.append({
            **{k: chunk[k] for k in ("budget_gib", "fp8_matmul", "chunk_mb", "decode_step_seconds",
                                     "decode_step_over_floor", "ttft_seconds", "ttft_over_stream_floor",
                                     "effective_gbps", "percent_of_h2d", "speedup_over_accelerate")},
            "resident_layers": run["resident_layers"],
            "streamed_layers": run["streamed_layers"],
            "streamed_bytes": run["layer_bytes"],
            "stream_floor_seconds": run["layer_bytes"] / (limit * 1e9) if limit else None,
            "batch": run["batch"],
            "batch_decode_step_seconds": batch_step,
            "batch_tokens_per_s": run["batch"] / batch_step,
            "device_peak_bytes": run["device_peak_bytes"],
            "budget_bytes": run["budget_bytes"],
            # checks: every chunk size streams the same computation; the GEMM paths pick alike
            "tokens_equal_across_chunks": all(r["decode_tokens"] == run["decode_tokens"] for r in group),
            "token_agreement_with_dequantize": None if dequantized is None or run["fp8_matmul"] != "scaled_mm"
            else _agreement(run["decode_tokens"], dequantized["decode_tokens"]),
        })
    summary: dict[str, Any] = {"h2d_gbps": limit, "h2d_kind": h2d["kind"], "chunks": chunks, "best": best}
    if accelerate_step is not None:
        summary["accelerate"] = {
            "decode_step_seconds": accelerate_step,
            "effective_gbps": _gbps(baseline["bytes_per_step"], accelerate_step),
            "device_peak_bytes": baseline["device_peak_bytes"],
        }
    return summary


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Bandwidth against chunk size per budget, with the copy limit and accelerate as lines;
    None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summary = report["summary"]
    first_matmul = report["config"]["fp8_matmuls"][0] if report["config"]["weight_dtype"] != "auto" else None
    fig, ax = plt.subplots(figsize=(6, 4))
    for budget in report["config"]["budgets_gib"]:
        chunks = [c for c in summary["chunks"] if c["budget_gib"] == budget and c["fp8_matmul"] == first_matmul]
        ax.plot([c["chunk_mb"] for c in chunks], [c["effective_gbps"] for c in chunks], "o-",
                label=f"djinn ringbuffer, {budget:g} GiB budget")
    ax.axhline(summary["h2d_gbps"], color="black", linestyle="--", label=f"{summary['h2d_kind']} limit")
    if "accelerate" in summary:
        accelerate_gbps = summary["accelerate"]["effective_gbps"]
        ax.axhline(accelerate_gbps, color="tab:red", linestyle=":", label="accelerate cpu_offload")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk size (MiB)")
    ax.set_ylabel("effective streaming bandwidth (GB/s)")
    weights = report["config"]["dtype"] if report["config"]["weight_dtype"] == "auto" else report["config"]["weight_dtype"]
    ax.set_title(f"{report['config']['model']} ({weights})")
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


def run(settings: Exp2Settings, out: Path, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure everything ``settings`` asks for; write the JSON report (and the plot) to ``out``.

    The report is rewritten after every budget (and fp8 GEMM path), so a run stopped part way
    keeps what it measured; a GEMM path after the first that fails is recorded with its error
    and the run goes on.
    """
    started = time.perf_counter()
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    print(f"copy limit ({settings.h2d_bytes / MIB:.0f} MiB x {settings.h2d_repeats}) ...", file=sys.stderr)
    h2d = measure_h2d(settings.h2d_bytes, settings.h2d_repeats, device)
    runs: list[dict[str, Any]] = []
    builds: list[dict[str, Any]] = []
    state: dict[str, Any] = {"model_bytes": 0, "baseline": {"skipped_because": "--no-accelerate"}}

    def write() -> dict[str, Any]:
        config = {
            **attrs.asdict(settings),
            "device": str(device),
            "model_weight_bytes": state["model_bytes"],
            "layers": model_config(settings.model).num_hidden_layers,
            "host_memory_bytes": host_memory_bytes(),
            "decode_attention": "masked",
            "reuse": False,
        }
        report = {
            **result_header("exp2_virtualization", "eval.exp2_virtualization.run", WEIGHTS_NOTE, config, argv),
            "versions": versions(),
            "h2d": h2d,
            "builds": builds,
            "ringbuffer": runs,
            "accelerate": state["baseline"],
            "summary": summarize(h2d, runs, state["baseline"]),
            "total_seconds": time.perf_counter() - started,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        return report

    if settings.weight_dtype == "auto":
        loaded, homes = build_random_model(settings.model, settings.dtype, settings.seed)
        state["model_bytes"] = weight_bytes(loaded.model)
        for budget in settings.budgets_gib:
            try:
                runs += measure_budget(loaded, budget, "dequantize", settings.chunks_mb, settings, device)
            finally:
                _send_home(homes)
            write()
        if settings.accelerate:
            print("accelerate cpu_offload ...", file=sys.stderr)
            state["baseline"] = measure_accelerate(loaded, homes, settings, device)
    else:
        for budget in settings.budgets_gib:
            chunks = settings.chunks_mb
            for fp8_matmul in settings.fp8_matmuls:
                _fresh_device(device)
                build_s, loaded = _timed(device, lambda: load_model(
                    settings.model, dtype=settings.dtype, device="cpu", seed=settings.seed,
                    weight_dtype=settings.weight_dtype, build_device=device, progress=True,
                ))
                state["model_bytes"] = weight_bytes(loaded.model)
                build = {"budget_gib": budget, "fp8_matmul": fp8_matmul, "build_seconds": build_s}
                builds.append(build)
                try:
                    measured = measure_budget(loaded, budget, fp8_matmul, chunks, settings, device)
                except (RuntimeError, ModelError) as exc:
                    if fp8_matmul == settings.fp8_matmuls[0]:
                        raise
                    build["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"{fp8_matmul} failed: {build['error']}", file=sys.stderr)
                    measured = []
                runs += measured
                chunks = tuple(r["chunk_mb"] for r in measured if "batch" in r) or chunks
                del loaded, measured
                write()
        if settings.accelerate:
            state["baseline"] = {"skipped_because": "accelerate's cpu_offload runs weights in the model dtype, "
                                                    "not fp8; the same shape's bf16 run has the baseline"}
    report = write()
    report["plot"] = str(plot(report, out.with_suffix(".png")))
    return report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    """The summary as a short table on stdout."""
    summary, config = report["summary"], report["config"]
    weights = config["dtype"] if config["weight_dtype"] == "auto" else config["weight_dtype"]
    print(f"{summary['h2d_kind']} limit: {summary['h2d_gbps']:.2f} GB/s   ({config['model']}, {weights})")
    print(f"{'budget':>7} {'fp8 GEMM':>10} {'chunk MiB':>10} {'GB/s':>7} {'% H2D':>6} {'step s':>8} "
          f"{'step/floor':>10} {'TTFT s':>8} {'TTFT/floor':>10} {'HBM GiB':>8} {'x accel':>8}")
    for c in summary["chunks"]:
        hbm = None if c["device_peak_bytes"] is None else c["device_peak_bytes"] / GIB
        print(f"{c['budget_gib']:>7g} {c['fp8_matmul'] or '-':>10} {c['chunk_mb']:>10g} {c['effective_gbps']:>7.2f} "
              f"{c['percent_of_h2d']:>6.1f} {c['decode_step_seconds']:>8.3f} "
              f"{_fmt(c['decode_step_over_floor'], '.2f'):>10} {c['ttft_seconds']:>8.3f} "
              f"{_fmt(c['ttft_over_stream_floor'], '.2f'):>10} {_fmt(hbm, '.2f'):>8} "
              f"{_fmt(c['speedup_over_accelerate'], '.2f'):>8}")
    for b in summary["best"]:
        print(f"{b['budget_gib']:g} GiB{', ' + b['fp8_matmul'] if b['fp8_matmul'] else ''}: "
              f"{b['resident_layers']} layers resident, {b['streamed_layers']} streamed "
              f"({b['streamed_bytes'] / 1e9:.2f} GB a pass); batch {b['batch']}: "
              f"{b['batch_tokens_per_s']:.1f} tokens/s ({b['batch_decode_step_seconds']:.3f} s a step); "
              f"tokens equal across chunk sizes: {b['tokens_equal_across_chunks']}"
              + ("" if b["token_agreement_with_dequantize"] is None
                 else f"; greedy tokens as dequantize's: {b['token_agreement_with_dequantize']:.0%}"))
    if "accelerate" in summary:
        acc = summary["accelerate"]
        print(f"accelerate: {acc['effective_gbps']:.2f} GB/s, {acc['decode_step_seconds']:.3f} s a step")
    else:
        print(f"accelerate: {report['accelerate'].get('skipped_because')}")
    print(f"total {report['total_seconds']:.1f} s")


def _number_list(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run, print the table; returns the report."""
    defaults = Exp2Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, finishes in seconds")
    parser.add_argument("--model", default=None, help=f"model spec (default {defaults.model})")
    parser.add_argument("--dtype", default=None, help=f"compute dtype (default {defaults.dtype})")
    parser.add_argument("--weight-dtype", default=None, choices=("auto", "fp8_e4m3"),
                        help="how the decoder layers' weights are stored (default auto: the compute dtype)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--budget-gb", type=_number_list, default=None,
                        help="GPU budgets in GiB, as [memory] gpu_memory_budget_gb: 22,11 (default 22)")
    parser.add_argument("--kv-reserve-gb", type=float, default=None,
                        help=f"the streamer's KV reserve in GiB (default {defaults.kv_reserve_gib})")
    parser.add_argument("--chunks", type=_number_list, default=None, help="chunk sizes in MiB: 16,64")
    parser.add_argument("--prefetch-layers", type=int, default=None, help="layers copied ahead (default 2)")
    parser.add_argument("--fp8-matmul", type=_name_list, default=None,
                        help="fp8 GEMM paths: dequantize,scaled_mm (the first is swept over the chunk sizes)")
    parser.add_argument("--decode-steps", type=int, default=None, help="timed batch-1 decode steps per chunk size")
    parser.add_argument("--batch", type=int, default=None, help=f"sessions of the batched steps (default {defaults.batch})")
    parser.add_argument("--no-accelerate", action="store_true", help="skip the accelerate baseline")
    parser.add_argument("--out", type=Path, default=Path("eval/results/exp2.json"), help="JSON report path")
    args = parser.parse_args(argv)

    settings = SMOKE if args.smoke else defaults
    overrides = {
        "model": args.model,
        "dtype": args.dtype,
        "weight_dtype": args.weight_dtype,
        "device": args.device,
        "budgets_gib": args.budget_gb,
        "kv_reserve_gib": args.kv_reserve_gb,
        "chunks_mb": args.chunks,
        "prefetch_layers": args.prefetch_layers,
        "fp8_matmuls": args.fp8_matmul,
        "decode_steps": args.decode_steps,
        "batch": args.batch,
    }
    settings = attrs.evolve(settings, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_accelerate:
        settings = attrs.evolve(settings, accelerate=False)
    report = run(settings, args.out, sys.argv[1:] if argv is None else argv)
    print(f"\nwrote {args.out} and {report['plot']}")
    print_table(report)
    return report


if __name__ == "__main__":
    main()
