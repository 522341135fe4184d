"""flex_attention's decoding kernel over the engine's paged KV pool: which kernel options read it fastest.

    python -m eval.tune_flex_decode --out eval/results/tune_flex_decode_<tag>.json
    python -m eval.tune_flex_decode --kv-dtype fp8_e4m3 --out eval/results/tune_flex_decode_fp8_<tag>.json
    python -m eval.tune_flex_decode --kv-dtype fp8_e4m3 --query-dtype float16 --out eval/results/tune_flex_decode_fp8_f16q_<tag>.json

The paged decode step (``djinn.engine.runner``) attends ``B`` one-token rows over one layer's pool
view ``[1, H_kv, S, D]`` (strided out of ``[2, S, H_kv, D]``), each row reading only its session's
blocks through a ``BlockMask`` built as the runner builds it (the pool in bf16, or in fp8 as
``kv_dtype = "fp8_e4m3"`` stores it, with bf16 or ``--query-dtype float16`` queries; one row's
blocks scattered over the pool, the runner's ``mask_mod``). For each batch size the compiled kernel runs with inductor's
default options and with other ``kernel_options`` (``num_stages``/``num_warps`` first, then
``SPLIT_KV`` at the best of those, then the key tile ``BLOCK_N``); every variant is captured in a CUDA graph of ``--calls``
calls, so its time is the device's, and checked against the default's output. The KV bytes read
per call over its time give the rate, beside the device's read rate measured in the same run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import click
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from djinn.engine.runner import _FLEX_QUERY_BLOCK, _NO_Q_BLOCKS
from eval.cuda_timing import replay_seconds
from eval.report import result_header

#: (num_stages, num_warps) tried at inductor's split; then these SPLIT_KV at the best pair
PIPELINES = ((1, 2), (2, 2), (3, 2), (2, 4), (3, 4), (4, 4), (3, 8), (4, 8))
#: the pool's dtype by ``--kv-dtype`` (the engine's ``kv_dtype`` names)
KV_DTYPES = {"bfloat16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}
#: the queries' dtype by ``--query-dtype``
QUERY_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SPLITS = (1, 2, 4, 8, 16, 32)
#: then these key tiles at the best so far (at most ``--block-tokens``: a tile lies in one block)
BLOCK_NS = (16, 32, 64, 128)


def read_rate(device: torch.device, nbytes: int = 4 << 30) -> float:
    """Bytes per second of a large on-device sum (every byte read once)."""
    data = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    data.sum()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        data.sum()
    stop.record()
    torch.cuda.synchronize()
    return nbytes * 10 / (start.elapsed_time(stop) / 1e3)


def paged_mask(batch: int, context: int, block_tokens: int, pool_blocks: int, device: torch.device) -> BlockMask:
    """Each row's ``context`` tokens in blocks scattered over the pool; the runner's mask_mod."""
    per_row = context // block_tokens
    order = torch.randperm(pool_blocks - 1, device=device)[: batch * per_row] + 1  # block 0: scratch
    blocks = order.view(batch, per_row)
    owner = torch.full((pool_blocks,), -1, dtype=torch.int64, device=device)
    rank = torch.zeros(pool_blocks, dtype=torch.int64, device=device)
    owner[blocks.flatten()] = torch.arange(batch, device=device).repeat_interleave(per_row)
    rank[blocks.flatten()] = torch.arange(per_row, device=device).repeat(batch)
    positions = torch.full((batch,), context - 1, dtype=torch.int64, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        block = kv_idx // block_tokens
        return (owner[block] == b) & (rank[block] * block_tokens + kv_idx % block_tokens <= positions[b])

    counts = torch.full((batch, 1, 1), per_row, dtype=torch.int32, device=device)
    return BlockMask.from_kv_blocks(
        counts, blocks[:, None, None, :].to(torch.int32), BLOCK_SIZE=(_FLEX_QUERY_BLOCK, block_tokens),
        mask_mod=mask_mod, seq_lengths=(1, pool_blocks * block_tokens), **_NO_Q_BLOCKS,
    )


def time_variant(q, keys, values, mask, options: dict[str, Any] | None, calls: int, repeats: int):
    """Median seconds per call of the compiled kernel with ``options`` (a CUDA graph of ``calls``
    calls, replayed ``repeats`` times), and its output."""
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    run = lambda: flex(q, keys, values, block_mask=mask, kernel_options=options)  # noqa: E731
    out = run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            run()
    graph.replay()
    torch.cuda.synchronize()
    samples = [seconds / calls for seconds in replay_seconds(graph, repeats)]
    return statistics.median(samples), samples, out


@click.command()
@click.option("--batches", default="1,4,16,64,128")
@click.option("--context", default=1024)
@click.option("--kv-heads", default=32)
@click.option("--head-dim", default=128)
@click.option("--block-tokens", default=64)
@click.option("--pool-tokens", default=262144, help="slots in the pool (the H200 7B server holds about 230k)")
@click.option("--kv-dtype", type=click.Choice(sorted(KV_DTYPES)), default="bfloat16", help="the pool's dtype")
@click.option("--query-dtype", type=click.Choice(sorted(QUERY_DTYPES)), default="bfloat16", help="the queries' dtype")
@click.option("--calls", default=20, help="kernel calls per captured graph")
@click.option("--repeats", default=10)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(batches: str, context: int, kv_heads: int, head_dim: int, block_tokens: int, pool_tokens: int,
         kv_dtype: str, query_dtype: str, calls: int, repeats: int, out: Path) -> None:
    """Time every variant per batch size; write one JSON file (after each batch) and print a table."""
    if not torch.cuda.is_available():
        raise click.ClickException("tuning the CUDA decoding kernel needs a CUDA device")
    device = torch.device("cuda")
    torch.manual_seed(0)
    pool = torch.randn(2, pool_tokens, kv_heads, head_dim, dtype=torch.bfloat16, device=device).to(KV_DTYPES[kv_dtype])
    keys, values = (pool[i].transpose(0, 1)[None] for i in range(2))  # [1, H_kv, S, D], strided as the engine's
    report: dict[str, Any] = {
        **result_header(
            "tune_flex_decode", "eval.tune_flex_decode",
            f"compiled flex_attention decoding kernel, {query_dtype} queries over a {kv_dtype} paged pool; "
            "device time from CUDA graphs",
            dict(batches=batches, context=context, kv_heads=kv_heads, head_dim=head_dim, kv_dtype=kv_dtype,
                 query_dtype=query_dtype,
                 block_tokens=block_tokens, pool_tokens=pool_tokens, calls=calls, repeats=repeats),
        ),
        "read_rate_bytes_per_s": read_rate(device),
        "points": [],
    }
    click.echo(f"device read rate {report['read_rate_bytes_per_s'] / 1e12:.2f} TB/s")
    for batch in (int(b) for b in batches.split(",")):
        q = torch.randn(batch, kv_heads, 1, head_dim, dtype=torch.bfloat16, device=device).to(QUERY_DTYPES[query_dtype])
        mask = paged_mask(batch, context, block_tokens, pool_tokens // block_tokens, device)
        kv_bytes = 2 * batch * context * kv_heads * head_dim * pool.element_size()
        base_s, base_samples, reference = time_variant(q, keys, values, mask, None, calls, repeats)
        variants = [{"options": None, "seconds": base_s, "samples": base_samples, "max_abs_diff": 0.0}]

        def attempt(options: dict[str, Any]) -> dict[str, Any]:
            try:
                seconds, samples, out_ = time_variant(q, keys, values, mask, options, calls, repeats)
            except Exception as exc:  # an option set inductor refuses: recorded, the sweep goes on
                entry = {"options": options, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            else:
                entry = {"options": options, "seconds": seconds, "samples": samples,
                         "max_abs_diff": (out_.float() - reference.float()).abs().max().item()}
            variants.append(entry)
            return entry

        def best() -> dict[str, Any]:  # the fastest options tried so far ({}: none ran)
            timed = [v for v in variants if "seconds" in v and v["options"]]
            return min(timed, key=lambda v: v["seconds"])["options"] if timed else {}

        for stages, warps in PIPELINES:
            attempt({"num_stages": stages, "num_warps": warps})
        base = best()
        for split in SPLITS:
            attempt({**base, "SPLIT_KV": split})
        base = best()
        for block_n in (n for n in BLOCK_NS if n <= block_tokens):
            attempt({**base, "BLOCK_N": block_n})
        fastest = min((v for v in variants if "seconds" in v), key=lambda v: v["seconds"])
        point = {"batch": batch, "kv_bytes": kv_bytes, "default_s": base_s, "best": fastest["options"],
                 "best_s": fastest["seconds"], "speedup": base_s / fastest["seconds"],
                 "default_rate": kv_bytes / base_s, "best_rate": kv_bytes / fastest["seconds"], "variants": variants}
        report["points"].append(point)
        click.echo(f"B={batch:4d} default {base_s * 1e6:8.1f} us ({point['default_rate'] / 1e12:.2f} TB/s)  best "
                   f"{fastest['seconds'] * 1e6:8.1f} us ({point['best_rate'] / 1e12:.2f} TB/s) {fastest['options']}")
        for v in variants:
            shown = f"{v['seconds'] * 1e6:8.1f} us diff {v['max_abs_diff']:.2e}" if "seconds" in v else v["error"][:80]
            click.echo(f"     {json.dumps(v['options']):60s} {shown}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
