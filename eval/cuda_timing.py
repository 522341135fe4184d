"""Device time of captured work, for the benchmarks that replay CUDA graphs."""

from __future__ import annotations

import torch


def replay_seconds(graph: torch.cuda.CUDAGraph, replays: int) -> list[float]:
    """Seconds of each of ``replays`` replays of ``graph``, by CUDA events on the current stream."""
    samples = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / 1e3)
    return samples
