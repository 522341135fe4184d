"""Where a density point's latency came from, read from its report (``--trace`` runs give more).

    python -m eval.exp1_density.explain eval/results/exp1_h200_semantic_160.json [--json]

For every point: the iteration latency split into the server's parts (queue, restore, first
token, decode) at P50 and P99, for first turns (the C-token prompt) and resumes apart; the
slowest 1 % of iterations and of resumes' wakes split the same way, with the server's handler
outside those parts and the time outside the server (the wire and the two processes' event
loops), and how late the agents' own loop ran meanwhile; the KV moves and the tier's refusals;
when the first tier filled and when a later one was first used; and, with a trace, the longest
event-loop stalls and engine steps, the engine's prefill rate, the median decode step and the
steps the slowest iterations decoded in. The verdict names what dominated the P99 iterations.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import statistics
from pathlib import Path
from typing import Any

from eval.exp1_density.agents import LoopWatch
from eval.exp1_density.run import percentile

GiB = 1 << 30
PARTS = ("queue_s", "restore_s", "first_token_s", "decode_s")
#: the server's parts of a wake (an iteration's latency less its decode)
WAKE_PARTS = ("queue_s", "restore_s", "first_token_s")
#: the most tokens of a pass of one chunk counted as short (an agent's turn after its context)
SHORT_PASS_TOKENS = 256


def _split(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """P50/P99 of the latency and of each server-side part, over ``samples``."""
    if not samples:
        return {"iterations": 0}
    out: dict[str, Any] = {"iterations": len(samples)}
    for key in ("latency_s", "wake_s", *PARTS, "admission_s"):
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:  # reports before admission_s have none
            out[key] = {"p50": percentile(values, 50), "p99": percentile(values, 99)}
    return out


def _slowest(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The slowest 1 % of iterations (at least one)."""
    return sorted(samples, key=lambda s: -s["latency_s"])[: max(1, len(samples) // 100)]


def _tail_cause(slowest: list[dict[str, Any]], parts: tuple[str, ...] = PARTS, total: str = "latency_s",
                ) -> dict[str, float]:
    """Mean seconds per part over ``slowest``, which add up to their mean ``total``: the server's
    ``parts``, the rest of its handler's time (``handler_s``, from ``server_s``; absent from
    reports without it) and the time outside the server (``outside_s``: the wire and both
    processes' event loops; with no ``server_s``, all that the parts leave)."""
    means = {key: statistics.fmean(s[key] or 0.0 for s in slowest) for key in parts}
    rest = statistics.fmean(s[total] for s in slowest) - sum(means.values())
    if all(s.get("server_s") is not None and not math.isnan(s["server_s"]) for s in slowest):
        means["outside_s"] = statistics.fmean(s["latency_s"] - s["server_s"] for s in slowest)
        means["handler_s"] = rest - means["outside_s"]
    else:
        means["outside_s"] = rest
    return means


def _slowest_wakes(resumes: list[dict[str, Any]], loop: dict[str, Any] | None) -> dict[str, Any]:
    """The slowest 1 % of resumes by wake (COMPUTE to first token, ``wake_s``): their mean wake
    split as ``_tail_cause`` splits a latency, and, where the report has the agents' own
    loop timeline, how long that loop was late or collecting garbage during those iterations."""
    if not resumes:
        return {}
    slowest = sorted(resumes, key=lambda s: -s["wake_s"])[: max(1, len(resumes) // 100)]
    out: dict[str, Any] = {"wake_s": statistics.fmean(s["wake_s"] for s in slowest),
                           "parts": _tail_cause(slowest, WAKE_PARTS, "wake_s")}
    if loop:
        out["agents_loop"] = _late_during(slowest, loop)
    return out


def _late_during(samples: list[dict[str, Any]], loop: dict[str, Any]) -> dict[str, float]:
    """Mean seconds per iteration of ``samples`` (from its start to its reply) that its agent's
    process's loop was late (``late_s``) or collecting garbage (``collecting_s``); with several
    processes (``merge_timelines``), agent ``i``'s is process ``i % processes``."""
    processes = loop.get("processes", 1)
    stalls = [dict(zip(loop["loop_stall_columns"], row)) for row in loop["loop_stalls"]]
    collections = [dict(zip(loop["collection_columns"], row)) for row in loop["collections"]]

    def held(sample: dict[str, Any], intervals: list[tuple[int, float, float, float]]) -> float:
        begin, end = sample["started_s"], sample["started_s"] + sample["latency_s"]
        process = sample["agent"] % processes
        return sum(min(seconds, max(0.0, min(end, stop) - max(begin, start)))
                   for k, start, stop, seconds in intervals if k == process)

    # a probe that woke late_s late was held for late_s somewhere between its sleep and its wake
    late = [(s.get("process", 0), s["t_s"], s["t_s"] + LoopWatch.PROBE_S + s["late_s"], s["late_s"]) for s in stalls]
    collecting = [(c.get("process", 0), c["t_s"], c["t_s"] + c["seconds"], c["seconds"]) for c in collections]
    return {"late_s": statistics.fmean(held(s, late) for s in samples),
            "collecting_s": statistics.fmean(held(s, collecting) for s in samples)}


def _agents_loop(loop: dict[str, Any]) -> dict[str, Any]:
    """The agents' processes' loops over the whole point: their stalls in all (summed over the
    processes), the longest, and their garbage collections by generation."""
    stalls = sorted((dict(zip(loop["loop_stall_columns"], row)) for row in loop["loop_stalls"]),
                    key=lambda s: -s["late_s"])
    return {"loop_stall_s": sum(s["late_s"] for s in stalls), "longest_loop_stalls": stalls[:5], **_collections(loop)}


def _tail_admission(slowest: list[dict[str, Any]]) -> float | None:
    """Of ``slowest``'s queue time, the mean wait for memory; None for reports without it."""
    waits = [s["admission_s"] for s in slowest if s.get("admission_s") is not None]
    return statistics.fmean(waits) if waits else None


def _memory_milestones(memory: list[dict[str, Any]], capacities: dict[str, float]) -> dict[str, Any]:
    """When each tier was first used, and when the first reached 95 % of its capacity."""
    out: dict[str, Any] = {}
    for sample in memory:
        for name, nbytes in sample.get("tiers", {}).items():
            if nbytes and f"{name}_first_used_s" not in out:
                out[f"{name}_first_used_s"] = sample["t_s"]
            capacity = capacities.get(name)
            if capacity and nbytes >= 0.95 * capacity and f"{name}_full_s" not in out:
                out[f"{name}_full_s"] = sample["t_s"]
    return out


def _trace_figures(trace: dict[str, Any], slowest: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [dict(zip(trace["step_columns"], row)) for row in trace["steps"]]
    stalls = sorted((dict(zip(trace["loop_stall_columns"], row)) for row in trace["loop_stalls"]),
                    key=lambda s: -s["late_s"])
    # the prefill rate of passes apart: a mixed pass's time holds its decode rows' too
    prefill = [s for s in steps if s["prefill_tokens"] and not s.get("mixed")]
    mixed = [s for s in steps if s.get("mixed")]
    decode_only = [s["decode_s"] for s in steps if s["decode_rows"] and not s["prefill_tokens"]]
    moves = [dict(zip(trace["move_columns"], row)) for row in trace["moves"]]
    return {
        "longest_loop_stalls": stalls[:5],
        "loop_stall_s": sum(s["late_s"] for s in stalls),
        "longest_steps": sorted(steps, key=lambda s: -(s["prefill_s"] + s["decode_s"]))[:5],
        "prefill_tokens_per_s": (sum(s["prefill_tokens"] for s in prefill) / sum(s["prefill_s"] for s in prefill)
                                 if prefill else None),
        "median_decode_step_s": statistics.median(decode_only) if decode_only else None,
        "mixed_steps": len(mixed),
        "median_mixed_step_s": statistics.median(s["prefill_s"] + s["decode_s"] for s in mixed) if mixed else None,
        "longest_restores": sorted((m for m in moves if m["kind"] == "restore"), key=lambda m: -m["seconds"])[:5],
        "stall_stacks": trace.get("stall_stacks", [])[:5],
        **_collections(trace),
        **_short_passes(steps),
        "steps_beside_moves": _steps_beside_moves(steps, moves),
        "slowest_1pct_decode_steps": _steps_while_decoding(slowest, steps),
    }


def _collections(trace: dict[str, Any]) -> dict[str, Any]:
    """The garbage collections' pauses by generation: how many, their total and their longest."""
    if "collections" not in trace:
        return {}
    by_generation: dict[int, list[float]] = {}
    for row in trace["collections"]:
        collection = dict(zip(trace.get("collection_columns", LoopWatch.COLLECTION_COLUMNS), row))
        by_generation.setdefault(collection["generation"], []).append(collection["seconds"])
    return {"collections": {g: {"count": len(s), "total_s": sum(s), "max_s": max(s)}
                            for g, s in sorted(by_generation.items())}}


def _short_passes(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Passes of one chunk of at most ``SHORT_PASS_TOKENS`` tokens (an agent's turn after its
    context): their median wall time and, where the trace has it, the median time until the pass
    was queued (what the host spent launching it)."""
    short = [s for s in steps if s["prefill_chunks"] == 1 and 0 < s["prefill_tokens"] <= SHORT_PASS_TOKENS]
    if not short:
        return {"short_passes": 0}
    out = {"short_passes": len(short), "short_pass_median_s": statistics.median(s["prefill_s"] for s in short)}
    if "prefill_launch_s" in short[0]:
        out["short_pass_launch_median_s"] = statistics.median(s["prefill_launch_s"] for s in short)
    return out


def _steps_beside_moves(steps: list[dict[str, Any]], moves: list[dict[str, Any]]) -> dict[str, Any]:
    """What a KV move in flight (write-back, eviction or restore) costs the engine's steps: each
    step that overlaps one over the median of the steps of its shape (decode rows in 4s, prefill
    tokens in 128s) that overlap none. Per kind (decode-only, or also prefilling): the median of
    those ratios, and how many steps overlapped a move."""
    merged: list[list[float]] = []
    for start, end in sorted((m["t_end_s"] - m["seconds"], m["t_end_s"]) for m in moves):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    starts = [m[0] for m in merged]

    def overlaps(step: dict[str, Any]) -> bool:
        end = step["t_s"] + step["prefill_s"] + step["decode_s"]
        i = bisect.bisect_left(starts, end) - 1  # the last move starting before the step ends
        return i >= 0 and merged[i][1] > step["t_s"]

    beside: dict[tuple[int, int], list[float]] = {}
    without: dict[tuple[int, int], list[float]] = {}
    for step in steps:
        if step["decode_rows"]:
            group = (-(-step["prefill_tokens"] // 128), -(-step["decode_rows"] // 4))
            (beside if overlaps(step) else without).setdefault(group, []).append(step["prefill_s"] + step["decode_s"])
    medians = {group: statistics.median(times) for group, times in without.items()}
    out: dict[str, Any] = {}
    for kind, prefilling in (("decode_only", False), ("with_prefill", True)):
        ratios = [seconds / medians[group]
                  for group, times in beside.items() if bool(group[0]) is prefilling and group in medians
                  for seconds in times]
        out[kind] = {"steps_beside_moves": len(ratios), "median_ratio": statistics.median(ratios) if ratios else None}
    return out


def _steps_while_decoding(slowest: list[dict[str, Any]], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The engine steps that began while ``slowest``'s iterations decoded (from ``decode_s``
    before each iteration ended, as the agent saw it: the transport's few milliseconds off):
    how many, their median length, mean decode rows, the share that also ran a prefill pass and
    the mean prefill tokens of those. A step two iterations share counts once."""
    starts = [s["t_s"] for s in steps]
    seen: set[int] = set()
    for sample in slowest:
        end = sample["started_s"] + sample["latency_s"]
        seen.update(range(bisect.bisect_left(starts, end - sample["decode_s"]), bisect.bisect_left(starts, end)))
    chosen = [steps[i] for i in sorted(seen)]
    if not chosen:
        return {"steps": 0}
    prefilling = [s for s in chosen if s["prefill_tokens"]]
    return {
        "steps": len(chosen),
        "median_step_s": statistics.median(s["prefill_s"] + s["decode_s"] for s in chosen),
        "mean_decode_rows": statistics.fmean(s["decode_rows"] for s in chosen),
        "prefill_share": len(prefilling) / len(chosen),
        "mean_prefill_tokens": statistics.fmean(s["prefill_tokens"] for s in prefilling) if prefilling else 0.0,
    }


def explain_point(point: dict[str, Any], capacities: dict[str, float]) -> dict[str, Any]:
    """What one point's report says about its latency."""
    summary = point["summary"]
    done = [s for s in point["samples"] if s["ok"]]
    slowest = _slowest(done)
    tail = _tail_cause(slowest) if slowest else {}
    cause = max(tail, key=tail.get) if tail else None
    resumes = [s for s in done if s["iteration"] > 0]
    loop = point.get("load_generator_loop")
    counters = point["counters"]
    out = {
        "scheduler": summary["scheduler"], "agents": summary["agents"], "meets_limit": summary["meets_limit"],
        "p99_latency_s": summary["p99_latency_s"], "failures": summary["failures"],
        "first_turns": _split([s for s in done if s["iteration"] == 0]),
        "resumes": _split(resumes),
        "slowest_1pct_mean_s": tail, "dominated_by": cause,
        "slowest_1pct_admission_s": _tail_admission(slowest),
        "slowest_1pct_wakes": _slowest_wakes(resumes, loop),
        "moves": {k: counters.get(k, 0) for k in (
            "evictions", "restores", "restores_on_critical_path", "write_backs", "write_back_skips", "reclaims",
            "demotions", "promotions", "evict_failures", "admission_waits", "drops", "recomputes")},
        "memory": _memory_milestones(point["memory"], capacities),
        # graphs captured and compiled while the point ran (absent from reports made before they were counted)
        "engine_first_uses": {k: summary[k] for k in ("engine_graph_captures", "engine_compiles") if k in summary},
    }
    if loop:
        out["agents_loop"] = {**_agents_loop(loop), "slowest_1pct": _late_during(slowest, loop)}
    if "trace" in point:
        out["trace"] = _trace_figures(point["trace"], slowest)
    return out


def explain(report: dict[str, Any]) -> list[dict[str, Any]]:
    """``explain_point`` for every point of a report."""
    memory = report["config"]["memory"]
    capacities = {"pinned_host": memory.get("pinned_host_capacity_gb", 0) * GiB,
                  "disk": memory.get("disk_capacity_gb", 0) * GiB}
    return [explain_point(p, capacities) for p in report["points"]]


def _print(points: list[dict[str, Any]]) -> None:
    for p in points:
        print(f"{p['scheduler']} N={p['agents']}: P99 {p['p99_latency_s']:.3f} s, failures {p['failures']}, "
              f"{'within' if p['meets_limit'] else 'over'} the limit; the slowest 1 % spent most in {p['dominated_by']}")
        for name in ("first_turns", "resumes"):
            part = p[name]
            if part["iterations"]:
                print(f"  {name:<11} n={part['iterations']:<5} " + "  ".join(
                    f"{k.removesuffix('_s')} {part[k]['p50']:.3f}/{part[k]['p99']:.3f}" for k in ("latency_s", "wake_s", *PARTS, "admission_s") if k in part))
        admission = p["slowest_1pct_admission_s"]
        print("  slowest 1 %: " + "  ".join(f"{k.removesuffix('_s')} {v:.3f} s" for k, v in p["slowest_1pct_mean_s"].items())
              + (f" (of the queue, {admission:.3f} s waiting for memory)" if admission is not None else ""))
        wakes = p["slowest_1pct_wakes"]
        if wakes:
            held = wakes.get("agents_loop")
            print(f"  slowest 1 % of resumes' wakes, {wakes['wake_s']:.3f} s: " + "  ".join(
                f"{k.removesuffix('_s')} {v:.3f} s" for k, v in wakes["parts"].items())
                + (f" (the agents' loop late {held['late_s']:.3f} s, collecting {held['collecting_s']:.3f} s)"
                   if held else ""))
        agents = p.get("agents_loop")
        if agents:
            longest = ", ".join(f"{s['late_s']:.2f} s at {s['t_s']:.0f} s" for s in agents["longest_loop_stalls"][:3])
            print(f"  the agents' loop: late {agents['loop_stall_s']:.2f} s in all, longest {longest or 'none'}; "
                  f"during the slowest 1 %: late {agents['slowest_1pct']['late_s']:.3f} s, "
                  f"collecting {agents['slowest_1pct']['collecting_s']:.3f} s")
        print("  moves: " + ", ".join(f"{k} {v:g}" for k, v in p["moves"].items() if v))
        if p["engine_first_uses"]:
            print("  while serving: " + ", ".join(f"{k.removeprefix('engine_')} {v:g}" for k, v in p["engine_first_uses"].items()))
        if p["memory"]:
            print("  tiers: " + ", ".join(f"{k} {v:.1f} s" for k, v in p["memory"].items()))
        trace = p.get("trace")
        if trace:
            stalls = ", ".join(f"{s['late_s']:.2f} s at {s['t_s']:.0f} s" for s in trace["longest_loop_stalls"][:3])
            steps = ", ".join(f"{s['prefill_s'] + s['decode_s']:.2f} s at {s['t_s']:.0f} s" for s in trace["longest_steps"][:3])
            rate = trace["prefill_tokens_per_s"]
            print(f"  loop stalls: {trace['loop_stall_s']:.2f} s in all; longest {stalls or 'none'}")
            print(f"  longest engine steps: {steps}; prefill apart {rate or 0:,.0f} tokens/s; "
                  f"median decode-only step {1e3 * (trace['median_decode_step_s'] or 0):.2f} ms")
            if trace.get("mixed_steps"):
                print(f"  mixed steps (prefill chunks and decode rows in one pass): {trace['mixed_steps']}, "
                      f"median {1e3 * trace['median_mixed_step_s']:.2f} ms")
            if trace.get("collections"):
                print("  garbage collections: " + ", ".join(
                    f"gen {g} {c['count']} x, {c['total_s']:.2f} s, longest {1e3 * c['max_s']:.0f} ms"
                    for g, c in trace["collections"].items()))
            for count, stack in trace["stall_stacks"]:
                print(f"  stalled loop, {count} samples: {stack}")
            beside = [f"{kind.replace('_', '-')} {v['median_ratio']:.2f} x ({v['steps_beside_moves']} steps)"
                      for kind, v in trace["steps_beside_moves"].items() if v["median_ratio"] is not None]
            if beside:
                print("  steps while a KV move runs, over those of their shape while none does: " + ", ".join(beside))
            during = trace["slowest_1pct_decode_steps"]
            if during["steps"]:
                print(f"  steps while the slowest 1 % decoded: {during['steps']}, median {1e3 * during['median_step_s']:.1f} ms, "
                      f"{during['mean_decode_rows']:.1f} decode rows, {100 * during['prefill_share']:.0f} % with a prefill "
                      f"pass of {during['mean_prefill_tokens']:.0f} tokens on average")
            if trace["short_passes"]:
                launch = trace.get("short_pass_launch_median_s")
                queued = f", {1e3 * launch:.1f} ms of it until queued" if launch is not None else ""
                print(f"  passes of one chunk <= {SHORT_PASS_TOKENS} tokens: {trace['short_passes']}, "
                      f"median {1e3 * trace['short_pass_median_s']:.1f} ms{queued}")


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="an exp1 JSON report")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    points = explain(json.loads(args.report.read_text()))
    if args.json:
        print(json.dumps(points, indent=1))
    else:
        _print(points)


if __name__ == "__main__":
    main()
