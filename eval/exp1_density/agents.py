"""Experiment 1's agents: the load generator, in processes of its own.

The agents run apart from the server they measure, as real clients do, so their event loops and
their interpreter locks are not the server's: what an iteration waits for is the server and the
wire, not the benchmark. ``run_agents`` starts ``python -m eval.exp1_density.agents`` once per
process asked for (agent ``i`` runs in process ``i % processes``) and talks to each in JSON
lines: the child says it is ready once imported, gets its job (the server's URL, the workload,
its agents' arrivals and planned faults, and the point's time zero), writes a line per finished
iteration and a last line with every sample, dropped connection and stall of its own event loop
(``LoopWatch``). Time zero is a ``time.perf_counter()`` reading of the parent's: on Linux every
process reads one monotonic clock, so the samples' ``started_s`` line up with the server's trace.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from djinn.kernel.errors import DjinnError


def _positive(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


def _non_negative(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, not {value!r}")


@attrs.frozen
class WorkloadSpec:
    """``[workload]``: what every agent does (C, G, T, K and the think time U(a, b))."""

    context_tokens: int = attrs.field(default=64, validator=_positive)  # C
    generate_tokens: int = attrs.field(default=8, validator=_positive)  # G
    tool_tokens: int = attrs.field(default=16, validator=_positive)  # T
    iterations: int = attrs.field(default=2, validator=_positive)  # K
    think_min_s: float = attrs.field(default=0.05, validator=_non_negative)
    think_max_s: float = attrs.field(default=0.2, validator=_non_negative)
    #: agents arriving per second (Poisson)
    arrival_rate: float = attrs.field(default=20.0, validator=_positive)
    #: > 0: all N agents arrive within this many seconds (N uniform draws, so a Poisson process
    #: conditioned on N arrivals), whatever N, and ``arrival_rate`` is not used
    arrival_window_s: float = attrs.field(default=0.0, validator=_non_negative)
    #: the share of agents that drop their connection once, mid-generate or mid-restore
    fault_fraction: float = attrs.field(default=0.0, validator=attrs.validators.and_(
        attrs.validators.ge(0.0), attrs.validators.lt(1.0)))
    #: an iteration slower than this is a failure
    request_timeout_s: float = attrs.field(default=5.0, validator=_positive)
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.think_max_s < self.think_min_s:
            raise ValueError(f"think_max_s ({self.think_max_s}) < think_min_s ({self.think_min_s})")


@attrs.define
class IterationSample:
    """One agent iteration as the client saw it, with the server's timings."""

    agent: int
    iteration: int
    ok: bool
    latency_s: float
    wake_s: float = math.nan
    queue_s: float = math.nan
    #: of ``queue_s``, the wait for memory (admission and KV growth) before the engine's queue
    admission_s: float = math.nan
    restore_s: float = math.nan
    first_token_s: float = math.nan
    decode_s: float = math.nan
    #: the server's time in the request's handler (its parts above, and building the reply);
    #: what ``latency_s`` has beyond it is the wire and the two processes' event loops
    server_s: float = math.nan
    error: str | None = None
    #: when the iteration began, in seconds from the start of the point
    started_s: float = math.nan


@attrs.frozen
class Fault:
    """An agent's planned disconnect: at ``iteration``, mid-generate or mid-restore."""

    iteration: int
    mode: str  # "generate" or "restore"
    #: mid-generate: how long after sending GENERATE the connection drops
    after_s: float = 0.0


def plan_faults(workload: WorkloadSpec, agents: int) -> dict[int, Fault]:
    """Which agents drop their connection, when and how: round(N x ``fault_fraction``) agents,
    drawn from the workload's seed, alternately mid-generate and mid-restore (mid-restore needs
    an earlier tool call, so with one iteration every fault is mid-generate)."""
    rng = random.Random(workload.seed * 7919 + agents)
    chosen = sorted(rng.sample(range(agents), round(agents * workload.fault_fraction)))
    faults = {}
    for k, agent in enumerate(chosen):
        if k % 2 and workload.iterations > 1:
            faults[agent] = Fault(rng.randrange(1, workload.iterations), "restore")
        else:
            faults[agent] = Fault(rng.randrange(workload.iterations), "generate", rng.uniform(0.01, 0.2))
    return faults


async def _drop_during(session: Any, ids: list[int], workload: WorkloadSpec, fault: Fault) -> bool:
    """Send GENERATE (after COMPUTE for a restore) and leave before it ends; whether the request
    was still running when the connection dropped (a mid-generate drop asks for 4 x G tokens, so
    it almost always is)."""
    if fault.mode == "restore":
        await session.signal_phase("COMPUTE")  # the restore of a session whose KV left starts now
    new_tokens = workload.generate_tokens * (4 if fault.mode == "generate" else 1)
    request = asyncio.ensure_future(session.generate(ids, new_tokens))
    await asyncio.sleep(fault.after_s)
    in_flight = not request.done()
    request.cancel()
    await asyncio.gather(request, return_exceptions=True)
    return in_flight


async def _agent(
    url: str, index: int, delay_s: float, workload: WorkloadSpec, vocab: int,
    samples: list[IterationSample], on_iteration: Callable[[], None], origin: float,
    fault: Fault | None = None, faults: list[dict[str, Any]] | None = None, token: str | None = None,
) -> None:
    from djinn.client import connect_async

    rng = random.Random(workload.seed * 1_000_003 + index)
    await asyncio.sleep(delay_s)
    client = await connect_async(url, token)
    try:
        session = await (await client.model()).session()
        ids = [rng.randrange(vocab) for _ in range(workload.context_tokens)]
        for iteration in range(workload.iterations):
            started = time.perf_counter()
            if fault is not None and fault.iteration == iteration:
                in_flight = await _drop_during(session, ids, workload, fault)
                if faults is not None:
                    faults.append({"agent": index, "iteration": iteration, "mode": fault.mode,
                                   "t_s": started - origin, "in_flight": in_flight})
                return  # the connection closes below, mid-request
            try:
                if iteration:
                    await session.signal_phase("COMPUTE")
                out = await asyncio.wait_for(
                    session.generate(ids, workload.generate_tokens), workload.request_timeout_s
                )
            except (TimeoutError, DjinnError) as exc:
                samples.append(IterationSample(index, iteration, False, time.perf_counter() - started,
                                               error=f"{type(exc).__name__}: {exc}", started_s=started - origin))
                on_iteration()
                return  # the connection closes below, which frees the session on the server
            latency = time.perf_counter() - started
            t = out.timings
            samples.append(IterationSample(
                index, iteration, True, latency,
                wake_s=latency - t["decode_s"], queue_s=t["queue_s"], admission_s=t["admission_s"],
                restore_s=t["restore_s"],
                first_token_s=t["first_token_s"], decode_s=t["decode_s"], server_s=t["server_s"],
                started_s=started - origin,
            ))
            on_iteration()
            if iteration + 1 < workload.iterations:
                think = rng.uniform(workload.think_min_s, workload.think_max_s)
                await session.signal_phase("IO_WAIT", expected_s=think)
                await asyncio.sleep(think)  # the tool call
                ids = [rng.randrange(vocab) for _ in range(workload.tool_tokens)]
    finally:
        await client.close()


class LoopWatch:
    """How late an event loop ran and when the interpreter collected garbage, in seconds from
    ``origin``: a probe sleeps ``PROBE_S`` at a time and records each wake more than ``STALL_S``
    late (``watch``, run as a task on the loop); between the two calls of ``time_collections`` every
    garbage collection is timed (one holds every thread of the process)."""

    PROBE_S = 0.01
    STALL_S = 0.005
    STALL_COLUMNS = ("t_s", "late_s")
    COLLECTION_COLUMNS = ("t_s", "generation", "seconds")

    def __init__(self, origin: float) -> None:
        self.origin = origin
        self.stalls: list[tuple[float, float]] = []
        self.collections: list[tuple[float, int, float]] = []
        #: when the probe last went to sleep or woke; a reader on another thread sees a stall here
        self.beat = time.perf_counter()
        self._collecting_since = 0.0

    async def watch(self) -> None:
        """Probe the running loop until cancelled."""
        while True:
            before = self.beat = time.perf_counter()
            await asyncio.sleep(self.PROBE_S)
            now = self.beat = time.perf_counter()
            if now - before - self.PROBE_S > self.STALL_S:
                self.stalls.append((before - self.origin, now - before - self.PROBE_S))

    def on_collection(self, phase: str, info: dict[str, int]) -> None:
        """``gc.callbacks`` entry: time each collection."""
        now = time.perf_counter()
        if phase == "start":
            self._collecting_since = now
        else:
            self.collections.append((self._collecting_since - self.origin, info["generation"],
                                     now - self._collecting_since))

    def time_collections(self, on: bool = True) -> None:
        """Start (or, ``on`` false, stop) timing this process's garbage collections."""
        if on:
            gc.callbacks.append(self.on_collection)
        else:
            gc.callbacks.remove(self.on_collection)

    def timeline(self) -> dict[str, Any]:
        """The stalls and collections as column-named rows (JSON-ready)."""
        return {"loop_stall_columns": list(self.STALL_COLUMNS), "loop_stalls": [list(s) for s in self.stalls],
                "collection_columns": list(self.COLLECTION_COLUMNS),
                "collections": [list(c) for c in self.collections]}


def merge_timelines(timelines: list[dict[str, Any]]) -> dict[str, Any]:
    """One timeline from the agents' processes' ``LoopWatch.timeline``s, in process order: each
    row gains a ``process`` column, and ``processes`` says how many there were (agent ``i`` ran
    in process ``i % processes``)."""
    first = timelines[0]
    merged: dict[str, Any] = {"processes": len(timelines),
                              "loop_stall_columns": [*first["loop_stall_columns"], "process"],
                              "collection_columns": [*first["collection_columns"], "process"]}
    for rows in ("loop_stalls", "collections"):
        merged[rows] = sorted(([*row, k] for k, timeline in enumerate(timelines) for row in timeline[rows]),
                              key=lambda row: row[0])
    return merged


def arrival_delays(workload: WorkloadSpec, agents: int) -> list[float]:
    """When each agent arrives, in seconds from the start: a Poisson process at ``arrival_rate``,
    or N uniform draws within ``arrival_window_s`` when it is set."""
    rng = random.Random(workload.seed)
    if workload.arrival_window_s:
        return sorted(rng.uniform(0.0, workload.arrival_window_s) for _ in range(agents))
    delays, at = [], 0.0
    for _ in range(agents):
        delays.append(at)
        at += rng.expovariate(workload.arrival_rate)
    return delays


# --------------------------------------------------------------------------- the agents' process

#: one job's report is a single line: every sample of a point (about 250 bytes each)
_REPORT_LIMIT = 1 << 28


async def run_agents(url: str, workload: WorkloadSpec, vocab: int, delays: list[float],
                     planned: dict[int, Fault], on_start: Callable[[float], None],
                     on_iteration: Callable[[], None], token: str | None = None, processes: int = 1,
                     ) -> tuple[list[IterationSample], list[dict[str, Any]], dict[str, Any]]:
    """Run every agent in ``processes`` child processes against the server at ``url``
    (presenting ``token``, if it asks for one); their samples, dropped connections, and the
    children's own event-loop stalls and garbage collections (``merge_timelines``: a late load
    generator delays what it measures). ``on_start`` gets the point's time zero once every child
    is ready, just before the agents start; ``on_iteration`` is called once per finished
    iteration."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, not {processes}")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": ""}  # a client needs no GPU
    children: list[asyncio.subprocess.Process] = []
    try:
        for _ in range(processes):
            children.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "eval.exp1_density.agents", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, env=env, limit=_REPORT_LIMIT))
        await asyncio.gather(*(_expect(child, "ready") for child in children))
        origin = time.perf_counter()
        on_start(origin)

        async def serve(k: int, child: asyncio.subprocess.Process) -> dict[str, Any]:
            mine = range(k, len(delays), processes)
            job = {"url": url, "workload": attrs.asdict(workload), "vocab": vocab,
                   "agents": [[i, delays[i]] for i in mine],
                   "faults": {str(i): attrs.asdict(planned[i]) for i in mine if i in planned}, "origin": origin,
                   "token": token}
            child.stdin.write(json.dumps(job).encode() + b"\n")
            await child.stdin.drain()
            while (message := await _expect(child, "iteration", "report"))["kind"] == "iteration":
                on_iteration()
            return message

        reports = await asyncio.gather(*(serve(k, child) for k, child in enumerate(children)))
        samples = [IterationSample(**s) for report in reports for s in report["samples"]]
        faults = [f for report in reports for f in report["faults"]]
        return samples, faults, merge_timelines([report["loop"] for report in reports])
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
            await child.wait()


async def _expect(child: asyncio.subprocess.Process, *kinds: str) -> dict[str, Any]:
    line = await child.stdout.readline()
    if not line:
        raise RuntimeError(f"the agents' process ended (exit code {await child.wait()}) before it sent "
                           f"{' or '.join(kinds)}; its error is on stderr above")
    message = json.loads(line)
    if message.get("kind") == "error":
        raise RuntimeError(f"the agents' process failed:\n{message['traceback']}")
    if message.get("kind") not in kinds:
        raise RuntimeError(f"the agents' process sent {message.get('kind')!r}, expected {' or '.join(kinds)}")
    return message


def _serve_job(out: Any) -> None:
    """The child's side: read one job from stdin, run its agents, write the report to ``out``."""
    def send(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    send({"kind": "ready"})
    job = json.loads(sys.stdin.readline())
    workload = WorkloadSpec(**job["workload"])
    samples: list[IterationSample] = []
    faults: list[dict[str, Any]] = []

    watch = LoopWatch(job["origin"])

    async def every_agent() -> None:
        probe = asyncio.create_task(watch.watch())
        try:
            await asyncio.gather(*(
                _agent(job["url"], i, delay, workload, job["vocab"], samples, lambda: send({"kind": "iteration"}),
                       job["origin"], _fault(job["faults"].get(str(i))), faults, job["token"])
                for i, delay in job["agents"]
            ))
        finally:
            probe.cancel()

    watch.time_collections()
    try:
        asyncio.run(every_agent())
    finally:
        watch.time_collections(False)
    send({"kind": "report", "samples": [attrs.asdict(s) for s in samples], "faults": faults,
          "loop": watch.timeline()})


def _fault(fields: dict[str, Any] | None) -> Fault | None:
    return Fault(**fields) if fields is not None else None


def main() -> None:
    """The child's entry point. Its protocol has stdout to itself; what else prints goes to stderr."""
    import traceback

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        _serve_job(out)
    except BaseException:
        out.write(json.dumps({"kind": "error", "traceback": traceback.format_exc()}) + "\n")
        out.flush()
        raise


if __name__ == "__main__":
    main()
