"""What a KV move running beside the engine costs its passes, and which part of the move it is.

    python -m eval.bench_move_interference --out eval/results/move_interference_<tag>.json

In the density runs a step that overlaps a KV move (write-back, eviction or restore) takes
1.07-1.10 x a step of the same shape that overlaps none (``eval.exp1_density.explain``). This
separates the move's parts on the bare device, without the server: a pass shaped like the
engine's (``--layers`` layers of a Llama-7B-shaped block's GEMMs over ``--tokens`` tokens,
captured in one CUDA graph; 512 tokens is a prefill pass, 48 a decode step's weight read) is
replayed while a thread moves KV the way ``SessionKV`` does, on a stream of its own:

- ``none``: nothing beside the pass;
- ``dma``: a contiguous device buffer of one move's size copied to pinned host memory;
- ``gather``: the move's gather alone (``index_select`` of a session's scattered slots, per
  group of layers of at most 64 MiB, from an fp8 pool ``[L, 2, slots, H_kv, D]`` read in the
  engine's words, ``move_rows``), back to back;
- ``move``: the gather and the copy of each group to pinned host memory, as a write-back does;
- ``gather_bytes``, ``move_bytes``: the same over one-byte words, as moves were made before
  ``move_rows``.

Each arm replays the pass ``--passes`` times; every replay is timed by CUDA events. The report
gives each arm's median pass and its ratio to ``none``'s, and the mover's rate.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import click
import torch

from djinn.engine.kvpool import MOVE_STAGING_BYTES, move_rows
from eval.cuda_timing import replay_seconds
from eval.report import result_header

ARMS = ("none", "dma", "gather", "move", "gather_bytes", "move_bytes")


def block_weights(hidden: int, intermediate: int, device: torch.device) -> list[torch.Tensor]:
    """One Llama-shaped block's GEMM weights ``[in, out]`` in bf16: qkv, o, gate+up, down."""
    shapes = [(hidden, 3 * hidden), (hidden, hidden), (hidden, 2 * intermediate), (intermediate, hidden)]
    return [torch.randn(i, o, dtype=torch.bfloat16, device=device) / i**0.5 for i, o in shapes]


def captured_pass(x: torch.Tensor, blocks: list[list[torch.Tensor]], layers: int) -> torch.cuda.CUDAGraph:
    """A graph of ``layers`` blocks' GEMMs over ``x`` ``[T, hidden]``, cycling through ``blocks``
    (each larger than the L2 cache, so every layer reads its weights from memory)."""

    def forward() -> None:
        h = x
        for i in range(layers):
            qkv, o, gate_up, down = blocks[i % len(blocks)]
            h = h + (h @ qkv)[:, : h.shape[1]] @ o
            up = h @ gate_up
            h = h + (torch.nn.functional.silu(up[:, : down.shape[0]]) * up[:, down.shape[0]:]) @ down

    forward()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return graph


class Mover(threading.Thread):
    """Moves KV in a loop on a stream of its own until stopped, as the engine's copy thread does
    (queue the copies, then wait on an event). ``arm`` picks the parts of the move."""

    def __init__(self, arm: str, pool: torch.Tensor, slots: torch.Tensor, host: torch.Tensor,
                 contiguous: torch.Tensor) -> None:
        super().__init__(daemon=True)
        self.arm, self.slots, self.contiguous, self.host_bytes = arm, slots, contiguous, host
        if arm.endswith("_bytes"):
            self.pool, self.host = pool.view(*pool.shape[:-2], -1), host.view(*host.shape[:-2], -1)
        else:
            self.pool, self.host = move_rows(pool, host)
        self.stream = torch.cuda.Stream()
        self.halt = threading.Event()
        self.moves = 0
        self.seconds = 0.0

    def run(self) -> None:
        layer_bytes = self.pool[0, :, 0].numel() * self.pool.element_size() * self.slots.numel()
        group = max(1, MOVE_STAGING_BYTES // layer_bytes)
        started = time.perf_counter()
        while not self.halt.is_set():
            with torch.cuda.stream(self.stream):
                if self.arm == "dma":
                    self.host_bytes.view(-1).copy_(self.contiguous, non_blocking=True)
                else:
                    for first in range(0, self.pool.shape[0], group):
                        layers = slice(first, first + group)
                        gathered = self.pool[layers].index_select(2, self.slots)
                        if self.arm.startswith("move"):
                            self.host[layers].copy_(gathered, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
            done.synchronize()
            self.moves += 1
        self.seconds = time.perf_counter() - started


@click.command()
@click.option("--tokens", default="512,48", help="tokens per pass, one pass shape each")
@click.option("--layers", default=32)
@click.option("--hidden", default=4096)
@click.option("--intermediate", default=11008)
@click.option("--move-tokens", default=1100, help="one session's tokens (its KV is one move)")
@click.option("--pool-slots", default=131072, help="slots in the pool the gather reads from")
@click.option("--kv-row-bytes", default=4096, help="one layer's K (or V) bytes per slot: H_kv * D in fp8 (a multiple of 128)")
@click.option("--passes", default=200)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(tokens: str, layers: int, hidden: int, intermediate: int, move_tokens: int, pool_slots: int,
         kv_row_bytes: int, passes: int, out: Path) -> None:
    """Time each pass shape under every arm; write one JSON file (after each shape) and print a table."""
    if not torch.cuda.is_available():
        raise click.ClickException("this measures CUDA streams beside a CUDA graph: it needs a CUDA device")
    device = torch.device("cuda")
    torch.manual_seed(0)
    blocks = [block_weights(hidden, intermediate, device) for _ in range(4)]
    # [L, 2, slots, H_kv, D] with D = 128 one-byte values, as an fp8 pool is stored
    pool = torch.empty(layers, 2, pool_slots, kv_row_bytes // 128, 128, dtype=torch.uint8, device=device)
    block = 64
    chosen = torch.randperm(pool_slots // block, device=device)[: -(-move_tokens // block)]
    slots = (chosen[:, None] * block + torch.arange(block, device=device)).reshape(-1)[:move_tokens]
    host = torch.empty(layers, 2, move_tokens, kv_row_bytes // 128, 128, dtype=torch.uint8, pin_memory=True)
    contiguous = torch.empty(host.numel(), dtype=torch.uint8, device=device)
    move_bytes = host.numel()
    report: dict[str, Any] = {
        **result_header("bench_move_interference", "eval.bench_move_interference",
                        "GEMM passes of a Llama-7B-shaped block replayed from a CUDA graph, beside a KV mover thread",
                        dict(tokens=tokens, layers=layers, hidden=hidden, intermediate=intermediate,
                             move_tokens=move_tokens, pool_slots=pool_slots, kv_row_bytes=kv_row_bytes,
                             passes=passes, move_bytes=move_bytes)),
        "shapes": [],
    }
    for count in (int(t) for t in tokens.split(",")):
        x = torch.randn(count, hidden, dtype=torch.bfloat16, device=device)
        graph = captured_pass(x, blocks, layers)
        replay_seconds(graph, 10)
        shape: dict[str, Any] = {"tokens": count, "arms": {}}
        for arm in ARMS:
            mover = None if arm == "none" else Mover(arm, pool, slots, host, contiguous)
            if mover is not None:
                mover.start()
                time.sleep(0.05)
            samples = replay_seconds(graph, passes)
            if mover is not None:
                mover.halt.set()
                mover.join()
            entry: dict[str, Any] = {"median_s": statistics.median(samples), "samples": samples}
            if mover is not None:
                entry["moves"] = mover.moves
                entry["mover_bytes_per_s"] = mover.moves * move_bytes / mover.seconds
            shape["arms"][arm] = entry
        base = shape["arms"]["none"]["median_s"]
        for arm, entry in shape["arms"].items():
            entry["ratio_to_none"] = entry["median_s"] / base
            rate = entry.get("mover_bytes_per_s")
            click.echo(f"T={count:5d} {arm:>6}: {entry['median_s'] * 1e3:8.2f} ms  {entry['ratio_to_none']:.3f} x"
                       + (f"  mover {rate / 1e9:6.1f} GB/s ({entry['moves']} moves)" if rate else ""))
        report["shapes"].append(shape)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
