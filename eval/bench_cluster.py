"""The router's cost and a migration's speed on one GPU: one server with all the memory, the same
server behind the router, and two servers sharing the GPU with half the memory each.

    python -m eval.bench_cluster --config eval/exp1_density/configs/hero.toml --agents 64 \\
        --iterations 3 --think-s 5 10 --budget-gb 120 --arms one --out /tmp/cluster_h200.json
    ... --arms routed --append ...
    ... --arms two --append --migrate-tokens 1024,2048,4032 ...

(one arm per process: each arm's servers start afresh, and a run stays within a time limit;
``--arms one,routed,two`` runs them all in one.)

Arms (each starts its servers afresh, runs the workload, stops them):

- ``one``: one server with the whole GPU budget and host tier; agents connect to it directly.
- ``routed``: the same server behind the router: the router's cost alone.
- ``two``: two servers, each with half the budget and half the host tier (each holds its own
  copy of the weights), behind the router. After the workload, idle sessions of each
  ``--migrate-tokens`` size move between the two servers, timed (export, import, total).
- ``gpus`` (``--servers-in ray``, on a host with ``--gpus`` GPUs): ``--gpus`` servers behind
  the router, each with a GPU of its own, the whole ``--budget-gb`` and a host tier of
  ``--tier-gb-each`` (default: the experiment's); recorded as ``gpus{G}_{N}``. Run it for a few
  ``--agents`` counts per GPU count (one process each, ``--append``): the report's ``scaling``
  gives the largest N within the experiment's P99 limit and no failure for each GPU count, and
  that N per GPU against one GPU's (the goal: at least 0.9).

    python -m eval.bench_cluster --config eval/exp1_density/configs/h200_fp8_short_chunks.toml \\
        --servers-in ray --arms gpus --gpus 2 --agents 832 --budget-gb 120 --out /tmp/cluster_scaling.json

Every arm runs experiment 1's agent workload (``eval.exp1_density``: same seed, so the same
arrivals, prompts and think times) from exp1's load generator, a process of its own
(``eval.exp1_density.agents``), so the agents never share an interpreter lock with the servers
or the router. Where the servers run is ``--servers-in``:

- ``process`` (the default; no Ray needed): the servers and the router in this process
  (``LocalNode``), so the router competes with the servers for one interpreter lock and its
  measured cost is an upper bound of what it costs in a process of its own.
- ``ray``: each server a Ray actor in a process of its own (``start_cluster``, as ``djinn
  cluster`` runs them; two servers take half the GPU each), the router alone in this one: the
  router's cost as a cluster pays it. A migration's bytes travel through Ray's object store.

The report gives each arm's P50 and P99 iteration latency and the ratios to ``one`` (the goal:
``routed`` within 5 % on P99), and the part of each iteration outside the server's own timings
(queue, restore, first token, decode): the transport and, behind the router, the router's
forwarding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from djinn.cluster.launch import BackgroundRouter, LocalNode, build_router, start_cluster
from djinn.cluster.node import DjinnNode
from djinn.cluster.router import Backend, RouterSettings
from djinn.config import DjinnConfig
from eval.exp1_density.agents import arrival_delays, run_agents
from eval.exp1_density.run import (
    ExperimentConfig,
    _json_safe,
    _release_device,
    _warm_up,
    djinn_config,
    load_experiment,
    percentile,
)
from eval.report import result_header

ARMS = ("one", "routed", "two", "gpus")
#: where an arm's servers run (see the module's docstring)
SERVERS_IN = ("process", "ray")
GiB = 1 << 30


def experiment_from(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment file (or exp1's defaults) with this run's overrides."""
    experiment = load_experiment(args.config) if args.config else ExperimentConfig()
    workload = experiment.workload
    changes = {k: v for k, v in (("iterations", args.iterations), ("seed", args.seed)) if v is not None}
    if args.think_s is not None:
        changes["think_min_s"], changes["think_max_s"] = args.think_s
    return attrs.evolve(experiment, workload=attrs.evolve(workload, **changes))


def server_config(experiment: ExperimentConfig, budget_gb: float, tier_gb: float) -> DjinnConfig:
    """One server's configuration: exp1's (semantic scheduler, TCP) with this budget and tier."""
    config = djinn_config(experiment, "semantic")
    return attrs.evolve(config, memory=attrs.evolve(config.memory, gpu_memory_budget_gb=budget_gb),
                        settings={**config.settings, "pinned_host": {"capacity_gb": tier_gb}})


def device_budget_gb(asked: float) -> float:
    """The whole budget ``one`` gets: ``asked``, or (0) 90 % of the GPU's free memory; 0 on CPU."""
    import torch

    if asked or not torch.cuda.is_available():
        return asked
    free, _total = torch.cuda.mem_get_info()
    return round(free * 0.9 / GiB, 1)


# --------------------------------------------------------------------------- the agents, in a child process


def drive_agents(url: str, experiment: ExperimentConfig, agents: int, vocab: int,
                 token: str | None = None) -> tuple[list[dict[str, Any]], float]:
    """One warm-up generate, then the workload's agents against ``url`` from a process of their
    own (exp1's load generator); their samples, and the seconds from the first arrival to the
    last reply."""
    workload = experiment.workload
    asyncio.run(_warm_up(url, workload, vocab, token))
    began: list[float] = []
    samples, _faults, _loop = asyncio.run(run_agents(url, workload, vocab, arrival_delays(workload, agents), {},
                                                     began.append, lambda: None, token))
    return [attrs.asdict(s) for s in samples], time.perf_counter() - began[0]


def summary(samples: list[dict[str, Any]], agents: int, iterations: int, duration_s: float) -> dict[str, Any]:
    """P50/P99 latency and wake, failures, iterations, in the samples of one arm."""
    done = [s for s in samples if s["ok"]]
    latency = [s["latency_s"] for s in done]
    wake = [s["wake_s"] for s in done]
    # what the server's own timings leave out: the transport, the router, the server's loop
    outside = [s["latency_s"] - s["queue_s"] - s["restore_s"] - s["first_token_s"] - s["decode_s"] for s in done]
    return {
        "agents": agents, "iterations": len(done),
        "failures": sum(not s["ok"] for s in samples) + agents * iterations - len(samples),
        "p50_latency_s": percentile(latency, 50), "p99_latency_s": percentile(latency, 99),
        "p50_wake_s": percentile(wake, 50), "p99_wake_s": percentile(wake, 99),
        "p50_outside_server_s": percentile(outside, 50), "p99_outside_server_s": percentile(outside, 99),
        "mean_queue_s": statistics.fmean(s["queue_s"] for s in done) if done else math.nan,
        "duration_s": duration_s,
    }


# --------------------------------------------------------------------------- arms


@attrs.define
class ArmServers:
    """An arm's running servers: where its agents connect, and how to read and stop them."""

    url: str
    #: what a client connecting to ``url`` presents (a Ray cluster's servers ask for a secret)
    token: str | None
    vocab: int
    router: BackgroundRouter | None
    #: each server's migration counters (``DjinnNode.load()["handoffs"]``)
    handoffs: Callable[[], list[dict[str, Any]]]
    stop: Callable[[], None]


def start_in_process(configs: list[DjinnConfig], routed: bool) -> ArmServers:
    """The servers (and the router, when ``routed``) in this process."""
    nodes = [DjinnNode(config, name=f"djinn-{i}") for i, config in enumerate(configs)]
    router = None
    if routed:
        backends = [Backend(n.name, n.describe()["urls"][0], LocalNode(n)) for n in nodes]
        router = BackgroundRouter(build_router(configs[0], [], backends, token=None, server_token=None,
                                               settings=RouterSettings(migrate=True)), ["tcp://127.0.0.1:0"])
        router.start()

    def stop() -> None:
        if router is not None:
            router.stop()
        for node in nodes:
            node.stop()
        nodes.clear()
        _release_device()
        import torch

        if torch.cuda.is_available():
            # each KV pool size compiles its own decode kernels; past dynamo's recompile limit a
            # later arm's servers in this process would run them eagerly, which a CUDA graph
            # cannot capture
            torch._dynamo.reset()

    return ArmServers(router.url() if router is not None else nodes[0].describe()["urls"][0], None,
                      nodes[0].server.model.runner.vocab_size, router,
                      lambda: [n.load()["handoffs"] for n in nodes], stop)


def start_on_ray(config: DjinnConfig, servers: int, gpus_each: float, routed: bool,
                 args: argparse.Namespace) -> ArmServers:
    """Each server a Ray actor with ``gpus_each`` GPUs (a local Ray this starts, given every GPU
    of this host), the router in this process; agents connect to the router when ``routed``,
    else to the first server."""
    import torch

    cpus = max(1, (os.cpu_count() or 2) // 2 // servers)
    cluster = start_cluster(
        config, servers=servers, gpus_per_server=gpus_each, cpus_per_server=cpus,
        settings=RouterSettings(migrate=True),
        ray_init={"num_cpus": max(os.cpu_count() or 1, cpus * servers), "num_gpus": torch.cuda.device_count(),
                  "object_store_memory": int(args.object_store_gb * GiB)},
    )
    ray, actors = cluster.ray, list(cluster.actors.values())
    first = ray.get(actors[0].describe.remote())
    url = cluster.url if routed else first["urls"][0]
    return ArmServers(url, None if routed else cluster.server_token, first["vocab_size"],
                      cluster.router if routed else None,
                      lambda: [h["handoffs"] for h in ray.get([a.load.remote() for a in actors])], cluster.stop)


def migrations(router: BackgroundRouter, sizes: list[int], repeats: int, vocab: int) -> list[dict[str, Any]]:
    """Move an idle session of each size in ``sizes`` (tokens) ``repeats`` times between the
    two servers; every move's bytes and seconds."""
    from djinn.client import connect

    rng = random.Random(0)
    moves = []
    with connect(router.url()) as client:
        model = client.model()
        for tokens in sizes:
            session = model.session()
            session.generate([rng.randrange(vocab) for _ in range(tokens)], 1)
            session.signal_phase("IO_WAIT", expected_s=60)
            time.sleep(0.5)  # the scheduler's write-back of an IO_WAIT session, as an idle agent's KV would be
            for _ in range(repeats):
                move = router.call(router.router.migrate(session.id))
                moves.append({"tokens": tokens, **attrs.asdict(move),
                              "gib_per_s": move.nbytes / GiB / move.total_s if move.total_s else math.nan})
            session.close()
    return moves


def arm_key(arm: str, args: argparse.Namespace) -> str:
    """The arm's name in the report: a ``gpus`` arm's names its GPUs and agents."""
    return f"gpus{args.gpus}_{args.agents}" if arm == "gpus" else arm


def arm_layout(arm: str, args: argparse.Namespace, budget_gb: float, tier_gb: float) -> tuple[int, float, float, float]:
    """An arm's servers, and each one's GPU budget, host tier and share of GPUs (0 on a machine
    without CUDA)."""
    import torch

    gpu = 1.0 if torch.cuda.is_available() else 0.0
    if arm == "gpus":
        return args.gpus, budget_gb, args.tier_gb_each or tier_gb, gpu
    servers = 2 if arm == "two" else 1
    return servers, budget_gb / servers, tier_gb / servers, gpu / servers


def run_arm(arm: str, experiment: ExperimentConfig, args: argparse.Namespace, budget_gb: float) -> dict[str, Any]:
    servers, budget_each, tier_each, gpus_each = arm_layout(arm, args, budget_gb,
                                                            experiment.memory.pinned_host_capacity_gb)
    config = server_config(experiment, budget_each, tier_each)
    started = time.perf_counter()
    if args.servers_in == "ray":
        arm_servers = start_on_ray(config, servers, gpus_each, routed=arm != "one", args=args)
    else:
        arm_servers = start_in_process([config] * servers, routed=arm != "one")
    try:
        start_s = time.perf_counter() - started
        samples, duration_s = drive_agents(arm_servers.url, experiment, args.agents, arm_servers.vocab,
                                           arm_servers.token)
        result = {"arm": arm, "servers": servers, "agents": args.agents, "budget_gb_each": budget_each,
                  "tier_gb_each": tier_each, "gpus_each": gpus_each, "start_s": start_s,
                  "summary": summary(samples, args.agents, experiment.workload.iterations, duration_s),
                  "samples": samples}
        router = arm_servers.router
        if router is not None:
            result["router"] = router.router.status()
        if arm == "two" and args.migrate_tokens:
            result["migrations"] = migrations(router, args.migrate_tokens, args.migrate_repeats, arm_servers.vocab)
        result["handoffs"] = arm_servers.handoffs()  # the workload's moves and the timed ones
        return result
    finally:
        arm_servers.stop()


def compare(arms: dict[str, dict[str, Any]], p99_limit_s: float) -> dict[str, Any]:
    """Each arm's P50/P99 beside ``one``'s, the migration rate by size, and how the ``gpus``
    arms' largest N within ``p99_limit_s`` scales with their GPUs."""
    base = arms.get("one", {}).get("summary")
    out: dict[str, Any] = {}
    for name, arm in arms.items():
        s = arm["summary"]
        row = {k: s[k] for k in ("p50_latency_s", "p99_latency_s", "p50_outside_server_s", "p99_outside_server_s",
                                 "failures", "iterations")}
        if base is not None and arm["arm"] in ("routed", "two") and base["p99_latency_s"]:
            row["p99_vs_one"] = s["p99_latency_s"] / base["p99_latency_s"] - 1
            row["p50_vs_one"] = s["p50_latency_s"] / base["p50_latency_s"] - 1
        out[name] = row
    moves = arms.get("two", {}).get("migrations") or []
    by_size: dict[int, list[dict[str, Any]]] = {}
    for move in moves:
        by_size.setdefault(move["tokens"], []).append(move)
    out["migration"] = [
        {"tokens": tokens, "gib": group[0]["nbytes"] / GiB,
         "median_total_s": statistics.median(m["total_s"] for m in group),
         "median_export_s": statistics.median(m["export_s"] for m in group),
         "median_import_s": statistics.median(m["import_s"] for m in group),
         "median_s_per_gib": statistics.median(m["total_s"] / (m["nbytes"] / GiB) for m in group)}
        for tokens, group in sorted(by_size.items())
    ]
    out["scaling"] = scaling([a for a in arms.values() if a["arm"] == "gpus"], p99_limit_s)
    return out


def scaling(points: list[dict[str, Any]], p99_limit_s: float) -> list[dict[str, Any]]:
    """For each GPU count of the ``gpus`` arms: the agent counts run, the largest within
    ``p99_limit_s`` with no failure (None: none passed), and that N per GPU against one GPU's."""
    by_gpus: dict[int, list[dict[str, Any]]] = {}
    for point in points:
        by_gpus.setdefault(point["servers"], []).append(point)
    rows = []
    for gpus, group in sorted(by_gpus.items()):
        passed = [p["agents"] for p in group
                  if p["summary"]["failures"] == 0 and p["summary"]["p99_latency_s"] <= p99_limit_s]
        rows.append({"gpus": gpus, "agents_run": sorted(p["agents"] for p in group),
                     "largest_agents": max(passed, default=None)})
    one = next((r["largest_agents"] for r in rows if r["gpus"] == 1), None)
    for row in rows:
        row["per_gpu_vs_one"] = (row["largest_agents"] / (row["gpus"] * one)
                                 if one and row["largest_agents"] is not None else None)
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m eval.bench_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="an exp1 experiment file (default: exp1's small defaults)")
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=None, help="override [workload] iterations")
    parser.add_argument("--think-s", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="override [workload] think_min_s and think_max_s")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--budget-gb", type=float, default=0.0,
                        help="the whole GPU budget (two servers get half each); 0: 90 %% of the free GPU memory")
    parser.add_argument("--migrate-tokens", default="", help="comma-separated session sizes to move, in tokens")
    parser.add_argument("--migrate-repeats", type=int, default=3)
    parser.add_argument("--servers-in", choices=SERVERS_IN, default="process",
                        help="process: servers and router in this process; ray: each server a Ray actor")
    parser.add_argument("--object-store-gb", type=float, default=8.0,
                        help="with --servers-in ray: the size of Ray's object store (a migration's bytes)")
    parser.add_argument("--gpus", type=int, default=1, help="the gpus arm's servers, a GPU each")
    parser.add_argument("--tier-gb-each", type=float, default=0.0,
                        help="the gpus arm's host tier per server (0: the experiment's pinned_host_capacity_gb)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--append", action="store_true",
                        help="keep the arms already in --out (a run split into one command per arm)")
    parser.add_argument("--note", default="", help="what the result file should say about this run")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or args.agents < 1 or args.gpus < 1:
        parser.error(f"unknown arms {unknown}; arms are {', '.join(ARMS)}" if unknown
                     else "--agents and --gpus must be >= 1")
    if "gpus" in arms and args.servers_in != "ray":
        parser.error("the gpus arm runs each server on a GPU of its own: give --servers-in ray")
    args.migrate_tokens = [int(t) for t in args.migrate_tokens.split(",") if t]
    experiment = experiment_from(args)
    budget_gb = device_budget_gb(args.budget_gb)
    where = {"process": "servers and router in one process (LocalNode)",
             "ray": "each server a Ray actor, the router in the benchmark's process"}[args.servers_in]
    report: dict[str, Any] = {
        **result_header("bench_cluster", "eval.bench_cluster", args.note or f"random-weight model of the named "
                        f"shape; {where}", {"experiment": experiment.to_dict(), "arms": arms, "budget_gb": budget_gb,
                                            "agents": args.agents, "migrate_tokens": args.migrate_tokens,
                                            "servers_in": args.servers_in}, argv),
        "arms": {},
    }
    if args.append and args.out.exists():
        earlier = json.loads(args.out.read_text())
        workload = json.loads(json.dumps(_json_safe(report["config"]["experiment"])))
        if (earlier["config"]["experiment"] != workload or earlier["config"]["budget_gb"] != budget_gb
                or earlier["config"].get("servers_in", "process") != args.servers_in):
            parser.error(f"{args.out} was measured with another workload, budget or --servers-in; "
                         "write to another file")
        # an arm measured by an earlier run keeps that run's commit
        keys = {arm_key(arm, args) for arm in arms}
        report["arms"] = {name: {"commit": earlier["commit"], **arm}
                          for name, arm in earlier["arms"].items() if name not in keys}
        report["runs"] = [*earlier.get("runs", [earlier["command"]]), report["command"]]
    for arm in arms:
        key = arm_key(arm, args)
        report["arms"][key] = {"commit": report["commit"], **run_arm(arm, experiment, args, budget_gb)}
        report["comparison"] = compare(report["arms"], experiment.sweep.p99_limit_s)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_json_safe(report), indent=1))  # what a run cut short measured
        s = report["arms"][key]["summary"]
        print(f"{key:>6}: p50 {s['p50_latency_s']:.3f} s  p99 {s['p99_latency_s']:.3f} s  "
              f"outside the server p50 {s['p50_outside_server_s'] * 1000:.1f} ms p99 "
              f"{s['p99_outside_server_s'] * 1000:.1f} ms  failures {s['failures']}  ({s['duration_s']:.1f} s)",
              flush=True)
    for name, row in report["comparison"].items():
        if name == "scaling":
            for r in row:
                per_gpu = "" if r["per_gpu_vs_one"] is None else f", {r['per_gpu_vs_one']:.2f} x one GPU's per GPU"
                print(f"{r['gpus']} GPU(s): largest N within the P99 limit {r['largest_agents']} "
                      f"(ran {', '.join(map(str, r['agents_run']))}){per_gpu}")
        elif name == "migration":
            for m in row:
                print(f"move {m['tokens']:>6} tokens ({m['gib']:.3f} GiB): {m['median_total_s'] * 1000:.1f} ms "
                      f"({m['median_s_per_gib']:.3f} s/GiB; export {m['median_export_s'] * 1000:.1f} ms, "
                      f"import {m['median_import_s'] * 1000:.1f} ms)")
        elif "p99_vs_one" in row:
            print(f"{name:>6}: P99 {row['p99_vs_one']:+.1%} vs one, P50 {row['p50_vs_one']:+.1%}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
