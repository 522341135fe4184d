"""Experiment 1, agent density: how many tool-calling agents one GPU serves within a latency limit.

    python -m eval.exp1_density.run --config eval/exp1_density/configs/hero.toml \
        --schedulers static,lru,semantic --agents 8,16,32 --out eval/results/exp1_<tag>.json

For each scheduler, one server (kernel + TCP listener on a background thread, in this process)
serves every agent count N in ascending order, its agents' clients running in a process of their
own (``agents.py``); it is empty (every session closed) at the start
of each point, and each point reports its own share of the server's counters. Agents arrive by a
Poisson process (or all N within ``arrival_window_s``) and each runs K iterations: [COMPUTE ->] append a tool result (T random tokens;
the first iteration sends the C-token prompt instead) -> generate G tokens -> IO_WAIT with
``expected_s`` = the drawn think time -> sleep U(a, b) s. An iteration slower than
``request_timeout_s`` or one that errors is a failure (the agent then disconnects). The sweep of
a scheduler stops at the first N with a failure or a P99 iteration latency above the limit.

Faults: with ``fault_fraction`` > 0 that share of the agents drops its connection once, at a
drawn iteration, either mid-generate (a while after sending GENERATE) or mid-restore (right after
COMPUTE and GENERATE at an iteration after a tool call, while its KV may be coming back from a
tier). Their dropped iterations are not failures; every other agent's are. After every point the
server's books (KV bytes, tier bytes and allocations, pool blocks) are read once every session
has closed: what they hold then is leaked.

Per iteration: latency (COMPUTE signal sent -> reply with the last token), wake latency
(COMPUTE -> first token), the server's queue and restore time. Wake latency is the latency less
the server's decode time after the first token: what remains is the client-observed queueing
and transport, the server's queue and restore wait, KV growth and the prefill that yields the
first token (``first_token_s``). Every 0.5 s the kernel's memory accounting (device and host
tier bytes), the CUDA allocator's bytes and the process RSS are sampled. Writes JSON (hardware,
versions, configuration, raw samples, a summary per point) and three plots beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import math
import os
import statistics
import sys
import threading
import time
import tomllib
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from djinn.config import DjinnConfig, MemorySettings, ModelSettings, ServerSettings
from djinn.kernel.config import PluginSelection, build_settings
from djinn.kernel.errors import ConfigError
from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import BackgroundServer
from eval.bench_transport import hardware
from eval.exp1_density.agents import (
    IterationSample,
    LoopWatch,
    WorkloadSpec,
    _non_negative,
    _positive,
    arrival_delays,
    plan_faults,
    run_agents,
)
from eval.reliability.run import idle_books
from eval.report import library_versions, source_commit

SCHEDULERS = ("static", "lru", "recompute", "semantic")
GiB = 1 << 30
#: a report's ``load_generator``: the agents ran in a process of their own (``agents.py``)
LOAD_GENERATOR = "own process"


def load_generator(processes: int) -> str:
    """A report's ``load_generator`` for agents spread over ``processes`` processes of their own."""
    return LOAD_GENERATOR if processes == 1 else f"{processes} processes of their own"


# --------------------------------------------------------------------------- configuration


def _agent_counts(_inst: Any, attribute: attrs.Attribute, value: Sequence[int]) -> None:
    if not value or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value):
        raise ValueError(f"{attribute.name} must be a non-empty list of integers > 0, not {value!r}")


@attrs.frozen
class ModelSpec:
    """``[model]``: the served model."""

    name: str = "random:tiny-llama"
    dtype: str = attrs.field(default="float32", validator=attrs.validators.in_(("float32", "bfloat16", "float16")))


@attrs.frozen
class MemorySpec:
    """``[memory]``: the GPU budget (0 = the device's free memory), the pinned host tier's size,
    the workspace the kernel sets aside in the budget on CUDA (the server's default unless given)
    and how the KV pool stores keys and values (``kv_dtype``, as the server's)."""

    gpu_memory_budget_gb: float = attrs.field(default=0.0, validator=_non_negative)
    pinned_host_capacity_gb: float = attrs.field(default=4.0, validator=_positive)
    workspace_gb: float = attrs.field(default=MemorySettings().workspace_gb, validator=_non_negative)
    kv_dtype: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "fp8_e4m3")))
    #: a disk tier below the pinned one (0: none); a full pinned tier demotes its coldest sessions there
    disk_capacity_gb: float = attrs.field(default=0.0, validator=_non_negative)
    #: the disk tier's file (empty: a new file in the system's temporary directory)
    disk_path: str = ""


@attrs.frozen
class EngineSpec:
    """``[engine]``: the server's step composition (its ``[server]`` keys of the same names)."""

    #: prompt tokens per engine step while decode rows wait (0: a whole prefill chunk)
    prefill_tokens_while_decoding: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    #: a step's prefill chunks and decode rows run as one pass (false: two passes)
    mixed_steps: bool = True


@attrs.frozen
class SweepSpec:
    """``[sweep]``: what is swept and when a point fails."""

    schedulers: tuple[str, ...] = attrs.field(
        default=SCHEDULERS, converter=tuple, validator=attrs.validators.deep_iterable(attrs.validators.in_(SCHEDULERS))
    )
    #: agent counts N
    agents: tuple[int, ...] = attrs.field(default=(8,), converter=tuple, validator=_agent_counts)
    p99_limit_s: float = attrs.field(default=2.0, validator=_positive)
    sample_every_s: float = attrs.field(default=0.5, validator=_positive)
    #: how many processes the agents run in (agent ``i`` in process ``i % agent_processes``), so
    #: that one client loop's lag does not count in the server's latency
    agent_processes: int = attrs.field(
        default=1, validator=[attrs.validators.instance_of(int), attrs.validators.ge(1)])


_TABLES = {"model": ModelSpec, "memory": MemorySpec, "engine": EngineSpec, "workload": WorkloadSpec,
           "sweep": SweepSpec}


@attrs.frozen
class ExperimentConfig:
    """The whole experiment configuration."""

    source: str = "<defaults>"
    model: ModelSpec = ModelSpec()
    memory: MemorySpec = MemorySpec()
    engine: EngineSpec = EngineSpec()
    workload: WorkloadSpec = WorkloadSpec()
    sweep: SweepSpec = SweepSpec()
    #: ``[settings.NAME]``: a plugin's settings, as in ``plugins.toml`` (the tiers' capacities come
    #: from ``[memory]``)
    settings: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready tables."""
        return {"source": self.source, **{name: attrs.asdict(getattr(self, name)) for name in _TABLES},
                "settings": self.settings}


#: plugin settings ``[memory]`` sets, so a ``[settings.NAME]`` table may not
_MEMORY_SETTINGS = {"pinned_host": ("capacity_gb",), "disk": ("capacity_gb", "path")}


def load_experiment(path: str | os.PathLike[str]) -> ExperimentConfig:
    """Read and validate a TOML experiment file; errors name the file, table and key."""
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    tables: dict[str, Any] = {}
    settings = data.pop("settings", {})
    for name, table in data.items():
        if name not in _TABLES or not isinstance(table, dict):
            raise ConfigError(f"{source}: unknown table [{name}]; allowed tables: {', '.join([*_TABLES, 'settings'])}")
        tables[name] = build_settings(_TABLES[name], table, source=source, where=name)
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
        raise ConfigError(f"{source}: [settings] must hold one table per plugin, e.g. [settings.semantic]")
    for name, keys in _MEMORY_SETTINGS.items():
        if clash := sorted(set(keys) & set(settings.get(name, {}))):
            raise ConfigError(f"{source}: [settings.{name}] {', '.join(clash)}: set by [memory], not here")
    experiment = ExperimentConfig(source=source, settings=settings, **tables)
    for scheduler in experiment.sweep.schedulers:  # a plugin's settings are checked as a server checks them
        get_plugin_manager(djinn_config(experiment, scheduler))
    return experiment


def djinn_config(experiment: ExperimentConfig, scheduler: str) -> DjinnConfig:
    """The server configuration of one point: TCP only, ephemeral port, no metrics endpoint."""
    memory = experiment.memory
    settings = {name: dict(table) for name, table in experiment.settings.items()}
    tiers = ("pinned_host",)
    settings.setdefault("pinned_host", {})["capacity_gb"] = memory.pinned_host_capacity_gb
    if memory.disk_capacity_gb:
        tiers += ("disk",)
        settings.setdefault("disk", {}).update(capacity_gb=memory.disk_capacity_gb, path=memory.disk_path)
    return DjinnConfig(
        source=experiment.source,
        plugins=PluginSelection(scheduler=scheduler, tiers=tiers, streamer="resident", transports=("tcp",)),
        server=ServerSettings(port=0, metrics_port=0, **attrs.asdict(experiment.engine)),
        model=ModelSettings(name=experiment.model.name, dtype=experiment.model.dtype),
        memory=MemorySettings(gpu_memory_budget_gb=memory.gpu_memory_budget_gb,
                              workspace_gb=memory.workspace_gb, kv_dtype=memory.kv_dtype),
        settings=settings,
    )


# --------------------------------------------------------------------------- one point


@attrs.define
class PointResult:
    """Everything measured at one (scheduler, N)."""

    scheduler: str
    agents: int
    samples: list[IterationSample]
    memory: list[dict[str, float]]
    counters: dict[str, float]
    duration_s: float
    trace: dict[str, Any] | None = None
    #: the dropped connections: agent, iteration, mode ("generate" or "restore"), when (s)
    faults: list[dict[str, Any]] = attrs.Factory(list)
    #: the server's books once every session of the point has closed (``idle_books``)
    books_after: dict[str, int] = attrs.Factory(dict)
    #: the agents' process's own event-loop stalls and collections (``LoopWatch.timeline``)
    load_generator_loop: dict[str, Any] = attrs.Factory(dict)

    def summary(self, p99_limit_s: float, iterations: int) -> dict[str, Any]:
        """P50/P99 latency, P99 wake, failures, faults and leaks, and the server's counters."""
        done = [s for s in self.samples if s.ok]
        # an agent that drops its connection runs the iterations before its fault
        planned = self.agents * iterations - sum(iterations - f["iteration"] for f in self.faults)
        failures = sum(not s.ok for s in self.samples) + (planned - len(self.samples))
        latency = [s.latency_s for s in done]
        wake = [s.wake_s for s in done]
        p99 = percentile(latency, 99)
        return {
            "scheduler": self.scheduler, "agents": self.agents, "iterations": len(done), "failures": failures,
            "p50_latency_s": percentile(latency, 50), "p99_latency_s": p99,
            "p50_wake_s": percentile(wake, 50), "p99_wake_s": percentile(wake, 99),
            "mean_restore_s": statistics.fmean(s.restore_s for s in done) if done else math.nan,
            "peak_device_bytes": max((m["device_used_bytes"] for m in self.memory), default=0),
            "peak_tier_bytes": max((m["tier_bytes"] for m in self.memory), default=0),
            "peak_tier_bytes_by_tier": {name: max(m["tiers"].get(name, 0) for m in self.memory)
                                        for name in {n for m in self.memory for n in m["tiers"]}},
            "peak_sessions": max((m["sessions"] for m in self.memory), default=0),
            "faults": len(self.faults),
            "faults_in_flight": sum(f["in_flight"] for f in self.faults),
            "leaked_bytes": self.books_after.get("kv_bytes", 0) + self.books_after.get("tier_used_bytes", 0),
            "leaked_pool_blocks": self.books_after.get("pool_used_blocks", 0),
            "leaked_tier_allocations": self.books_after.get("tier_allocations", 0),
            "meets_limit": failures == 0 and bool(done) and p99 <= p99_limit_s,
            "duration_s": self.duration_s,
            # decode throughput the run got, beside what the workload asked of it
            "tokens_per_s": self.counters.get("tokens", 0) / self.duration_s if self.duration_s else math.nan,
            **{k: self.counters.get(k, 0) for k in (
                "evictions", "restores", "restores_on_critical_path", "evict_failures", "write_backs", "write_back_skips",
                "admission_waits", "admission_refusals", "drops", "recomputes",
                "engine_steps", "engine_mean_batch", "engine_prefill_tokens",
                # graphs captured and compiled during the point: each made every session wait
                "engine_graph_captures", "engine_compiles")},
            # the share of the run the engine spent in prefill chunks and in decode steps
            "engine_prefill_share": self.counters.get("engine_prefill_seconds", 0) / self.duration_s,
            "engine_decode_share": self.counters.get("engine_decode_seconds", 0) / self.duration_s,
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _memory_sample(vmu: dict[str, Any], started: float) -> dict[str, float]:
    import torch

    memory = vmu["memory"]
    return {
        "t_s": time.perf_counter() - started,
        "device_used_bytes": memory["device_used_bytes"],
        "kv_bytes": memory["device"].get("kv", 0),
        "tier_bytes": sum(memory["tiers"].values()),
        "tiers": dict(memory["tiers"]),
        "sessions": vmu["sessions"]["total"],
        "cuda_allocated_bytes": torch.cuda.memory_allocated() if torch.cuda.is_available() else 0,
        "cuda_reserved_bytes": torch.cuda.memory_reserved() if torch.cuda.is_available() else 0,
        # cudaMalloc calls that failed, so the allocator freed its cache (synchronising the device) and retried
        "cuda_alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0,
        "rss_bytes": _rss_bytes(),
    }


async def _drive(server: BackgroundServer, experiment: ExperimentConfig, agents: int,
                 on_iteration: Callable[[], None], trace: Trace | None = None,
                 ) -> tuple[list[IterationSample], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], float]:
    """The point's agents in their own process (``run_agents``), the server's memory sampled
    here meanwhile; samples, memory samples, dropped connections, the agents' process's loop
    timeline and the point's time zero."""
    workload = experiment.workload
    memory: list[dict[str, float]] = []
    sampler: asyncio.Task[None] | None = None
    started = time.perf_counter()

    async def sample_memory() -> None:
        while True:
            memory.append(_memory_sample(await asyncio.to_thread(server.vmu), started))
            await asyncio.sleep(experiment.sweep.sample_every_s)

    def on_start(origin: float) -> None:
        nonlocal started, sampler
        started = origin
        if trace is not None:
            trace.start(origin)
        sampler = asyncio.create_task(sample_memory())

    try:
        samples, faults, loop = await run_agents(server.url("tcp"), workload, server.model.runner.vocab_size,
                                                 arrival_delays(workload, agents), plan_faults(workload, agents),
                                                 on_start, on_iteration,
                                                 processes=experiment.sweep.agent_processes)
    finally:
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    memory.append(_memory_sample(await asyncio.to_thread(server.vmu), started))
    return samples, memory, faults, loop, started


async def _warm_up(url: str, workload: WorkloadSpec, vocab: int, token: str | None = None) -> None:
    """One generate of the workload's shape, so first-call costs stay out of the samples."""
    from djinn.client import connect_async

    async with await connect_async(url, token) as client:
        session = await (await client.model()).session()
        await session.generate(list(range(min(workload.context_tokens, vocab))), workload.generate_tokens)
        await session.close()


def run_point(server: BackgroundServer, experiment: ExperimentConfig, agents: int,
              on_iteration: Callable[[], None] = lambda: None, trace: bool = False) -> PointResult:
    """Run ``agents`` agents through their iterations against a running ``server``.

    One generate first keeps first-call costs out of the point. The server's counters are
    cumulative; the point keeps what changed while its agents ran. ``trace``
    also records every engine step, KV move and server event-loop stall (``Trace``). Once every
    session has closed, the server's books say what is left (``books_after``: nothing, unless
    something leaked).
    """
    asyncio.run(_warm_up(server.url("tcp"), experiment.workload, server.model.runner.vocab_size))
    before = _counters(server.vmu())
    recorder = Trace(server) if trace else None
    try:
        samples, memory, faults, loop, started = asyncio.run(
            _drive(server, experiment, agents, on_iteration, recorder))
    finally:
        timeline = recorder.stop() if recorder is not None else None
    duration = time.perf_counter() - started
    after = _counters(server.vmu())
    counters = {k: v - before.get(k, 0) for k, v in after.items()}
    counters["engine_mean_batch"] = counters.pop("engine_rows") / max(1, counters["engine_steps"])
    return PointResult(server.config.plugins.scheduler, agents,
                       sorted(samples, key=lambda s: (s.agent, s.iteration)), memory, counters, duration,
                       timeline, sorted(faults, key=lambda f: f["agent"]), idle_books(server), loop)


class Trace:
    """A point's timeline, for finding where latency comes from: every engine step (``StepRecord``),
    every KV move as its hook reports it, and every stall of the server's event loop and garbage
    collection in its process (``LoopWatch``), with where the stalled loop was. Times are seconds
    from the start of the point."""

    STEP_COLUMNS = ("t_s", "prefill_s", "decode_s", "prefill_chunks", "prefill_tokens", "prefill_keys",
                    "decode_rows", "prefill_launch_s", "mixed")
    MOVE_COLUMNS = ("t_end_s", "kind", "nbytes", "seconds", "on_critical_path")

    #: a stalled loop's stack is sampled this often while the stall lasts, innermost frames kept
    STACK_SAMPLE_S = 0.01
    STACK_FRAMES = 8

    def __init__(self, server: BackgroundServer) -> None:
        self.server = server
        self.origin = time.perf_counter()
        self.moves: list[tuple[float, str, int, float, bool]] = []
        self.watch = LoopWatch(self.origin)
        self.stall_stacks: collections.Counter[str] = collections.Counter()
        self._probe: Any = None
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self, origin: float) -> None:
        """Begin recording; ``origin`` is the point's time zero."""
        self.origin = origin
        self.watch = LoopWatch(origin)
        self.server.call(lambda: setattr(self.server.model.engine, "step_log", []))
        self.server.plugins.pm.register(self, name="exp1-trace")
        self._probe = self.server.spawn(self.watch.watch())
        self._sampling.set()
        self.watch.time_collections()
        loop_thread = self.server.call(threading.get_ident)
        self._sampler = threading.Thread(target=self._sample_stalls, args=(loop_thread,),
                                         name="exp1-stall-sampler", daemon=True)
        self._sampler.start()

    def _sample_stalls(self, loop_thread: int) -> None:
        """While the loop is late, count where its thread is, one sample per ``STACK_SAMPLE_S``: a
        stack that runs Python holds the loop; one inside a C call holds it or waits for the
        interpreter lock there."""
        late = LoopWatch.PROBE_S + LoopWatch.STALL_S
        while self._sampling.is_set():
            time.sleep(self.STACK_SAMPLE_S)
            if time.perf_counter() - self.watch.beat < late:
                continue
            frame = sys._current_frames().get(loop_thread)
            if frame is not None:
                stack = traceback.extract_stack(frame)[-self.STACK_FRAMES:]
                self.stall_stacks[" < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                             for f in reversed(stack))] += 1

    @hookimpl
    def djinn_session_evicted(self, session: Any, tier: str, nbytes: int, seconds: float) -> None:
        """Record an eviction (or a drop) as it completes."""
        self.moves.append((time.perf_counter() - self.origin, "evict", nbytes, seconds, False))

    @hookimpl
    def djinn_session_written_back(self, session: Any, tier: str, nbytes: int, seconds: float) -> None:
        """Record a write-back (a copy that keeps the GPU blocks) as it completes."""
        self.moves.append((time.perf_counter() - self.origin, "write_back", nbytes, seconds, False))

    @hookimpl
    def djinn_session_restored(self, session: Any, tier: str, nbytes: int, seconds: float,
                               on_critical_path: bool) -> None:
        """Record a restore (or a recompute) as it completes."""
        self.moves.append((time.perf_counter() - self.origin, "restore", nbytes, seconds, on_critical_path))

    def stop(self) -> dict[str, Any] | None:
        """Stop recording; the timeline, or None when recording never started."""
        if self._probe is None:
            return None
        self._probe.cancel()
        self._sampling.clear()
        self._sampler.join()  # it counts stacks until here; read them once it is gone
        self.watch.time_collections(False)
        self.server.plugins.pm.unregister(self)
        engine = self.server.model.engine

        def take() -> list[Any]:
            log, engine.step_log = engine.step_log or [], None
            return log

        log = self.server.call(take)
        return {
            "step_columns": list(self.STEP_COLUMNS),
            "steps": [[s.started - self.origin, s.prefill_s, s.decode_s, s.prefill_chunks, s.prefill_tokens,
                       s.prefill_keys, s.decode_rows, s.prefill_launch_s, s.mixed] for s in log],
            "move_columns": list(self.MOVE_COLUMNS), "moves": [list(m) for m in self.moves],
            **self.watch.timeline(),
            "stall_sample_s": self.STACK_SAMPLE_S,
            "stall_stacks": [[count, stack] for stack, count in self.stall_stacks.most_common(40)],
        }


def _counters(vmu: dict[str, Any]) -> dict[str, float]:
    engine = vmu["engine"]
    return {**vmu["counters"], "engine_steps": engine["steps"], "engine_rows": engine["decode_rows"],
            "engine_graph_captures": engine["graph_captures_after_start"],
            "engine_compiles": engine["compiles_after_start"],
            **{f"engine_{k}": engine[k] for k in ("prefill_tokens", "prefill_seconds", "decode_seconds")}}


def _wait_until_idle(server: BackgroundServer, timeout_s: float = 30.0) -> None:
    """Wait until the server has closed every session of the last point (clients closing is
    asynchronous), so the next point starts from an empty server."""
    deadline = time.monotonic() + timeout_s
    while server.vmu()["sessions"]["total"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"sessions still open {timeout_s:.0f} s after every agent disconnected")
        time.sleep(0.1)


def _release_device() -> None:
    """Free the stopped server's model now: the next point sizes its GPU budget from free memory."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- sweep and report


def sweep(experiment: ExperimentConfig, schedulers: Sequence[str], agent_counts: Sequence[int],
          on_iteration: Callable[[], None] = lambda: None,
          on_point: Callable[[dict[str, Any]], None] = lambda _r: None, trace: bool = False) -> dict[str, Any]:
    """Every scheduler over ascending N until a point fails; the JSON-ready report.

    One server per scheduler serves all its points (the model is loaded and compiled once).
    ``on_point`` gets the report as it stands after each point, so a sweep cut short keeps what
    it measured.
    """
    limit, iterations = experiment.sweep.p99_limit_s, experiment.workload.iterations
    points: list[dict[str, Any]] = []
    max_agents: dict[str, int] = {}
    report = {
        "experiment": "exp1_density",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hardware": hardware(),
        "versions": library_versions(),
        "commit": source_commit(),
        "command": "python -m eval.exp1_density.run " + " ".join(sys.argv[1:]),
        "config": experiment.to_dict(),
        # where the agents' clients ran; reports without this key ran them in the server's process
        "load_generator": load_generator(experiment.sweep.agent_processes),
        "schedulers": list(schedulers),
        "agent_counts": sorted(agent_counts),
        "points": points,
        "summary": {"points": [], "max_agents_within_limit": max_agents},
    }
    for scheduler in schedulers:
        max_agents[scheduler] = 0
        config = djinn_config(experiment, scheduler)
        with BackgroundServer(config, get_plugin_manager(config)) as server:
            for n in sorted(agent_counts):
                _wait_until_idle(server)
                result = run_point(server, experiment, n, on_iteration, trace)
                summary = result.summary(limit, iterations)
                points.append({"summary": summary, "samples": [attrs.asdict(s) for s in result.samples],
                               "memory": result.memory, "counters": result.counters, "faults": result.faults,
                               "books_after": result.books_after, "load_generator_loop": result.load_generator_loop,
                               **({"trace": result.trace} if result.trace is not None else {})})
                report["summary"]["points"].append(summary)
                if summary["meets_limit"]:
                    max_agents[scheduler] = n
                on_point(report)
                if not summary["meets_limit"]:
                    break
        del server
        _release_device()
    return report


def plot(report: dict[str, Any], stem: Path) -> list[Path]:
    """Latency CDF at the largest N that the most schedulers ran, memory over time, the N sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
    by_scheduler: dict[str, dict[int, dict[str, Any]]] = {}
    for p in points:
        by_scheduler.setdefault(p["summary"]["scheduler"], {})[p["summary"]["agents"]] = p
    # the CDF compares schedulers at one N: the largest N that the most schedulers ran
    shared: dict[int, int] = {}
    for runs in by_scheduler.values():
        for n in runs:
            shared[n] = shared.get(n, 0) + 1
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    if shared:
        n = max(shared, key=lambda k: (shared[k], k))
        for scheduler, runs in by_scheduler.items():
            if n not in runs:
                continue
            latency = sorted(s["latency_s"] for s in runs[n]["samples"] if s["ok"])
            ax.step(latency, [(i + 1) / len(latency) for i in range(len(latency))], where="post", label=scheduler)
        ax.set_title(f"iteration latency, N = {n}")
    ax.axvline(report["config"]["sweep"]["p99_limit_s"], color="grey", linestyle=":")
    ax.set(xlabel="latency (s)", ylabel="CDF")
    ax.legend()
    written.append(_save(fig, stem, "cdf"))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for scheduler, runs in by_scheduler.items():
        memory = runs[max(runs)]["memory"]
        t = [m["t_s"] for m in memory]
        top.plot(t, [m["device_used_bytes"] / GiB for m in memory], label=f"{scheduler} N={max(runs)}")
        bottom.plot(t, [m["tier_bytes"] / GiB for m in memory], label=scheduler)
    top.set(ylabel="GPU bytes in use (GiB)")
    bottom.set(xlabel="time (s)", ylabel="pinned host KV (GiB)")
    top.legend()
    written.append(_save(fig, stem, "memory"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for scheduler, runs in by_scheduler.items():
        ns = sorted(runs)
        ax.plot(ns, [runs[n]["summary"]["p99_latency_s"] for n in ns], marker="o", label=scheduler)
    ax.axhline(report["config"]["sweep"]["p99_limit_s"], color="grey", linestyle=":")
    # log latency: a scheduler past its limit can be ten times over it, and the limit must stay readable
    ax.set(xlabel="agents N", ylabel="P99 iteration latency (s)", xscale="log", yscale="log",
           title="agent density sweep")
    ax.legend()
    written.append(_save(fig, stem, "sweep"))
    return written


def _save(fig: Any, stem: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = stem.with_name(f"{stem.name}_{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _json_safe(value: Any) -> Any:
    """NaN becomes null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write the report as JSON (NaN as null); return what was written."""
    safe = _json_safe(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(safe, indent=1))
    return safe


def run(experiment: ExperimentConfig, out: Path, *, schedulers: Sequence[str] | None = None,
        agent_counts: Sequence[int] | None = None, plots: bool = True, progress: bool = True,
        trace: bool = False) -> dict[str, Any]:
    """Sweep, write the JSON report to ``out`` (and the plots beside it), return the report."""
    from rich.console import Console
    from rich.progress import Progress

    schedulers = tuple(schedulers or experiment.sweep.schedulers)
    agent_counts = tuple(agent_counts or experiment.sweep.agents)
    console = Console(quiet=not progress)
    total = len(schedulers) * sum(agent_counts) * experiment.workload.iterations
    with Progress(console=console, disable=not progress) as bar:
        task = bar.add_task("iterations", total=total)

        def on_point(partial: dict[str, Any]) -> None:
            s = partial["summary"]["points"][-1]
            bar.print(f"{s['scheduler']:>8} N={s['agents']:<4} p50 {s['p50_latency_s']:.3f} s  "
                      f"p99 {s['p99_latency_s']:.3f} s  wake p99 {s['p99_wake_s']:.3f} s  failures {s['failures']}  "
                      f"evictions {int(s['evictions'])}  restores {int(s['restores'])} "
                      f"(critical {int(s['restores_on_critical_path'])})")
            _write(partial, out)

        report = sweep(experiment, schedulers, agent_counts, lambda: bar.advance(task), on_point, trace)
    report = _write(report, out)
    if plots:
        report["plots"] = [str(p) for p in plot(report, out.with_suffix(""))]
        out.write_text(json.dumps(report, indent=1))
    console.print(f"max N within the limit: {report['summary']['max_agents_within_limit']}; wrote {out}")
    return report


def merge(reports: Sequence[dict[str, Any]], sources: Sequence[str]) -> dict[str, Any]:
    """One report from the reports of separate runs of one configuration (say, one process per
    scheduler): their points side by side, the largest N within the limit per scheduler. Point
    traces (``--trace``) stay in the reports they came from."""
    if not reports:
        raise ValueError("nothing to merge")
    config = reports[0]["config"]
    for report, source in zip(reports, sources):
        if report["config"]["workload"] != config["workload"] or report["config"]["model"] != config["model"]:
            raise ValueError(f"{source}: another model or workload than {sources[0]}; only one experiment merges")
        if _load_generator(report) != _load_generator(reports[0]):
            raise ValueError(f"{source}: its agents ran in the {_load_generator(report)}, those of {sources[0]} "
                             f"in the {_load_generator(reports[0])}; such reports do not merge")
    points = [{k: v for k, v in p.items() if k != "trace"} for report in reports for p in report["points"]]
    max_agents: dict[str, int] = {}
    for p in points:
        s = p["summary"]
        best = max_agents.setdefault(s["scheduler"], 0)
        if s["meets_limit"]:
            max_agents[s["scheduler"]] = max(best, s["agents"])
    commits = {source: report.get("commit") for report, source in zip(reports, sources)}
    return {
        **{k: reports[0][k] for k in ("experiment", "hardware", "versions", "config")},
        "load_generator": _load_generator(reports[0]),
        # one commit when every run measured the same code, else each source's
        "commit": next(iter(commits.values())) if len(set(commits.values())) == 1 else commits,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "merged_from": list(sources),
        "schedulers": list(max_agents),
        "agent_counts": sorted({p["summary"]["agents"] for p in points}),
        "points": points,
        "summary": {"points": [p["summary"] for p in points], "max_agents_within_limit": max_agents},
    }


def _load_generator(report: dict[str, Any]) -> str:
    return report.get("load_generator", "server's process")


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="experiment TOML (configs/smoke.toml, hero.toml)")
    parser.add_argument("--schedulers", help="comma-separated subset of static,lru,semantic (default: the config's)")
    parser.add_argument("--agents", help="comma-separated agent counts N (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("eval/results/exp1_density.json"), help="JSON report path")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    parser.add_argument("--trace", action="store_true",
                        help="also record every engine step, KV move and server event-loop stall per point")
    parser.add_argument("--agent-processes", type=int, metavar="P",
                        help="run the agents in P processes of their own (default: the config's [sweep] agent_processes)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="REPORT",
                        help="run nothing: merge these reports of one configuration into --out, with plots")
    args = parser.parse_args(argv)
    if args.merge:
        report = merge([json.loads(path.read_text()) for path in args.merge], [str(path) for path in args.merge])
        report = _write(report, args.out)
        if not args.no_plots:
            report["plots"] = [str(p) for p in plot(report, args.out.with_suffix(""))]
            _write(report, args.out)
        print(f"max N within the limit: {report['summary']['max_agents_within_limit']}; wrote {args.out}")
        return
    if args.config is None:
        parser.error("--config is required (or --merge)")
    experiment = load_experiment(args.config)
    if args.agent_processes is not None:
        try:
            experiment = attrs.evolve(experiment, sweep=attrs.evolve(experiment.sweep,
                                                                     agent_processes=args.agent_processes))
        except ValueError as exc:
            parser.error(f"--agent-processes: {exc}")
    schedulers = [s.strip() for s in args.schedulers.split(",")] if args.schedulers else None
    for name in schedulers or ():
        if name not in SCHEDULERS:
            parser.error(f"unknown scheduler {name!r}; one of {', '.join(SCHEDULERS)}")
    agents = [int(n) for n in args.agents.split(",")] if args.agents else None
    run(experiment, args.out, schedulers=schedulers, agent_counts=agents, plots=not args.no_plots, trace=args.trace)


if __name__ == "__main__":
    main()
