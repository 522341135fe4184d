"""The agent-density runner (eval/exp1_density) end to end on the smoke configuration."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from pathlib import Path

import attrs
import pytest

from djinn.kernel.errors import ConfigError
from eval.exp1_density import run as run_module
from eval.exp1_density.agents import LoopWatch
from eval.exp1_density.explain import _late_during, _steps_beside_moves, _steps_while_decoding, explain
from eval.exp1_density.run import load_experiment, percentile, run

SMOKE = Path(__file__).resolve().parents[1] / "eval" / "exp1_density" / "configs" / "smoke.toml"


def test_exp1_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smoke = load_experiment(SMOKE)
    # generous limits: on a loaded 2-core machine a tiny-model iteration can take seconds, and
    # this test checks the report, not the latency
    # semantic writes back at every IO_WAIT (its default waits until memory runs short), so each
    # point's write-backs can be counted against its agents below
    semantic = {**smoke.settings.get("semantic", {}), "write_back_headroom": 1.0}
    experiment = attrs.evolve(
        smoke, workload=attrs.evolve(smoke.workload, request_timeout_s=120.0),
        sweep=attrs.evolve(smoke.sweep, p99_limit_s=120.0), settings={**smoke.settings, "semantic": semantic},
    )
    out = tmp_path / "exp1.json"
    written: list[int] = []
    real_write = run_module._write

    def write(report, path):
        written.append(len(report["points"]))
        return real_write(report, path)

    monkeypatch.setattr(run_module, "_write", write)
    run(experiment, out, schedulers=("semantic", "static", "recompute"), agent_counts=(2, 4), progress=False,
        trace=True)

    # the report is on disk after every point, not only at the end
    assert written[:6] == [1, 2, 3, 4, 5, 6]
    report = json.loads(out.read_text())
    assert report["load_generator"] == run_module.LOAD_GENERATOR
    for key in ("hardware", "versions", "config", "points", "summary", "plots"):
        assert key in report
    assert report["config"]["workload"]["iterations"] == 2
    assert [(p["summary"]["scheduler"], p["summary"]["agents"]) for p in report["points"]] == [
        (s, n) for s in ("semantic", "static", "recompute") for n in (2, 4)
    ]
    # one server serves both points of a scheduler; each point counts only its own moves (those
    # its own trace saw): semantic writes the KV back at every IO_WAIT, one per agent here (K = 2),
    # unless memory pressure has freed its GPU blocks first (a reclaim or an eviction)
    for point in report["points"][:2]:
        moves = [dict(zip(point["trace"]["move_columns"], row)) for row in point["trace"]["moves"]]
        assert point["counters"]["evictions"] == sum(m["kind"] == "evict" for m in moves)
        assert point["counters"]["write_backs"] + point["counters"]["evictions"] >= point["summary"]["agents"]
    by_scheduler = {p["summary"]["scheduler"]: p for p in report["points"] if p["summary"]["agents"] == 4}
    for point in by_scheduler.values():
        summary = point["summary"]
        assert summary["agents"] == 4 and summary["failures"] == 0
        assert summary["iterations"] == 4 * 2 == len(point["samples"])
        assert summary["engine_steps"] > 0 and 0 < summary["engine_mean_batch"] <= 4
        assert summary["engine_graph_captures"] == summary["engine_compiles"] == 0  # nothing while serving
        assert 0 < summary["p50_latency_s"] <= summary["p99_latency_s"]
        assert 0 < summary["p99_wake_s"] <= summary["p99_latency_s"]
        assert all(s["ok"] and s["wake_s"] <= s["latency_s"] for s in point["samples"])
        assert point["memory"] and {"t_s", "device_used_bytes", "tier_bytes", "rss_bytes"} <= set(point["memory"][0])
    # semantic copies KV to the tier at every IO_WAIT; all 4 agents hold KV at once (their think
    # time outlasts the arrivals) and 2 fit, so it frees GPU blocks too
    assert by_scheduler["semantic"]["counters"]["write_backs"] > 0
    assert by_scheduler["semantic"]["counters"]["evictions"] > 0
    assert by_scheduler["static"]["counters"]["evictions"] == 0
    # 4 agents, room for 2 sessions' KV: recompute drops some and prefills them again
    assert by_scheduler["recompute"]["counters"]["drops"] > 0
    assert by_scheduler["recompute"]["counters"]["recomputes"] > 0
    assert by_scheduler["recompute"]["counters"]["evictions"] == 0
    assert report["summary"]["max_agents_within_limit"] == {"semantic": 4, "static": 4, "recompute": 4}
    assert all(Path(p).is_file() for p in report["plots"])


def test_exp1_trace_records_steps_moves_and_iteration_starts(tmp_path: Path) -> None:
    smoke = load_experiment(SMOKE)
    # the agents in two processes of their own: agents 0 and 2 in the first, 1 in the second
    experiment = attrs.evolve(smoke, workload=attrs.evolve(smoke.workload, request_timeout_s=120.0),
                              sweep=attrs.evolve(smoke.sweep, agent_processes=2))
    out = tmp_path / "trace.json"
    run(experiment, out, schedulers=("semantic",), agent_counts=(3,), plots=False, progress=False, trace=True)
    report = json.loads(out.read_text())
    assert report["load_generator"] == "2 processes of their own"
    point = report["points"][0]
    trace, counters = point["trace"], point["counters"]
    steps = [dict(zip(trace["step_columns"], row)) for row in trace["steps"]]
    assert len(steps) == counters["engine_steps"]
    rows = sum(s["decode_rows"] for s in steps)  # the mean batch is a float: rows / steps
    assert rows == pytest.approx(counters["engine_mean_batch"] * counters["engine_steps"], abs=1e-6)
    assert sum(s["prefill_tokens"] for s in steps) == counters["engine_prefill_tokens"]
    assert all(s["prefill_keys"] >= s["prefill_tokens"] and s["prefill_s"] >= 0 for s in steps)
    assert [s["t_s"] for s in steps] == sorted(s["t_s"] for s in steps)
    moves = [dict(zip(trace["move_columns"], row)) for row in trace["moves"]]
    # a write-back at every IO_WAIT (3 agents, K = 2) unless memory pressure freed the blocks first;
    # GPU blocks leave (evictions, reclaims included) only under pressure, each reported by its hook
    assert counters["write_backs"] + counters["evictions"] >= 3
    assert sum(m["kind"] == "evict" for m in moves) == counters["evictions"]
    assert sum(m["kind"] == "restore" for m in moves) == counters["restores"]
    assert sum(m["kind"] == "write_back" for m in moves) == counters["write_backs"]
    assert all(0 <= s["prefill_launch_s"] <= s["prefill_s"] for s in steps)
    assert all(s["prefill_launch_s"] > 0 for s in steps if s["prefill_tokens"])
    assert trace["loop_stall_columns"] == ["t_s", "late_s"]
    # the server's wait for memory is a part of its queue time, reported with every result; its
    # handler's time holds every part it reports and lies within what the agent saw
    done = [s for s in point["samples"] if s["ok"]]
    assert all(0 <= s["admission_s"] <= s["queue_s"] for s in done)
    assert all(s["queue_s"] + s["restore_s"] + s["first_token_s"] + s["decode_s"] <= s["server_s"] + 1e-6
               and s["server_s"] <= s["latency_s"] for s in done)
    # each agents' process watched its own loop: stalls and collections, as the server's trace
    # has them, each row naming its process
    loop = point["load_generator_loop"]
    assert loop["processes"] == 2
    assert loop["loop_stall_columns"] == ["t_s", "late_s", "process"]
    assert loop["collection_columns"] == ["t_s", "generation", "seconds", "process"]
    assert all(late > 0 and process in (0, 1) for _t, late, process in loop["loop_stalls"])
    assert sorted({s["agent"] for s in point["samples"]}) == [0, 1, 2]
    starts = {(s["agent"], s["iteration"]): s["started_s"] for s in point["samples"]}
    assert all(starts[(a, 0)] < starts[(a, 1)] for a in range(3))
    # what the trace hooked into is gone after the point
    assert "trace" not in json.loads(out.read_text())["points"][0]["summary"]
    # the explainer reads the same point: both kinds of turn, the tail's parts, the trace's figures
    explained = explain(json.loads(out.read_text()))[0]
    assert explained["first_turns"]["iterations"] == 3 and explained["resumes"]["iterations"] == 3
    parts = explained["slowest_1pct_mean_s"]
    assert 0 <= explained["slowest_1pct_admission_s"] <= parts["queue_s"] + 1e-9
    assert explained["dominated_by"] == max(parts, key=parts.get)
    slowest = max(point["samples"], key=lambda s: s["latency_s"])
    assert sum(parts.values()) == pytest.approx(slowest["latency_s"])
    assert parts["outside_s"] == pytest.approx(slowest["latency_s"] - slowest["server_s"])
    assert parts["handler_s"] >= -1e-6
    # the slowest resume's wake, split the same way, with how late the agents' loop ran meanwhile
    wakes = explained["slowest_1pct_wakes"]
    woke = max((s for s in done if s["iteration"] > 0), key=lambda s: s["wake_s"])
    assert wakes["wake_s"] == pytest.approx(woke["wake_s"])
    assert sum(wakes["parts"].values()) == pytest.approx(woke["wake_s"])
    assert set(wakes["parts"]) == {"queue_s", "restore_s", "first_token_s", "handler_s", "outside_s"}
    assert wakes["agents_loop"]["late_s"] >= 0 and wakes["agents_loop"]["collecting_s"] >= 0
    assert explained["agents_loop"]["loop_stall_s"] == pytest.approx(sum(late for _t, late, _process in loop["loop_stalls"]))
    assert explained["trace"]["prefill_tokens_per_s"] > 0 and explained["moves"]["write_backs"] == counters["write_backs"]
    assert explained["engine_first_uses"] == {"engine_graph_captures": 0, "engine_compiles": 0}
    assert set(explained["trace"]["steps_beside_moves"]) == {"decode_only", "with_prefill"}
    assert explained["trace"]["slowest_1pct_decode_steps"]["steps"] > 0


def test_steps_beside_a_move_are_compared_with_steps_of_their_shape_beside_none() -> None:
    def step(t_s: float, seconds: float, rows: int, prefill_tokens: int = 0) -> dict:
        return {"t_s": t_s, "prefill_s": 0.0, "decode_s": seconds, "decode_rows": rows, "prefill_tokens": prefill_tokens}

    moves = [{"t_end_s": 11.0, "seconds": 2.0}, {"t_end_s": 10.5, "seconds": 0.2},  # merged: 9-11 s
             {"t_end_s": 30.0, "seconds": 1.0}]
    steps = [
        step(1.0, 0.010, 8), step(2.0, 0.010, 8), step(3.0, 0.030, 40),  # no move runs
        step(9.5, 0.012, 8), step(10.9, 0.015, 7), step(29.5, 0.036, 40),  # overlap a move
        step(8.99, 0.005, 8),  # ends at 8.995 s, before the first move
        step(4.0, 0.020, 8, 512), step(29.0, 0.030, 8, 500),  # with a prefill, beside none / one
        step(29.9, 0.040, 60),  # beside a move, but no step of its shape beside none
    ]
    assert _steps_beside_moves(steps, moves) == {
        "decode_only": {"steps_beside_moves": 3, "median_ratio": pytest.approx(1.2)},  # 1.2, 1.5 and 1.2
        "with_prefill": {"steps_beside_moves": 1, "median_ratio": pytest.approx(1.5)},
    }


def test_the_engine_table_reaches_the_server(tmp_path: Path) -> None:
    config = tmp_path / "engine.toml"
    config.write_text("[engine]\nprefill_tokens_while_decoding = 512\n")
    experiment = load_experiment(config)
    assert run_module.djinn_config(experiment, "lru").server.prefill_tokens_while_decoding == 512
    assert run_module.djinn_config(load_experiment(SMOKE), "lru").server.prefill_tokens_while_decoding == 0
    config.write_text("[engine]\nmax_batch = 4\n")
    with pytest.raises(ConfigError, match="max_batch"):
        load_experiment(config)


def test_plugin_settings_reach_the_server_and_bad_ones_are_refused_at_load(tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text('[memory]\npinned_host_capacity_gb = 2.0\n[settings.semantic]\narrival_latency_s = 0.25\n')
    experiment = load_experiment(config)
    assert experiment.to_dict()["settings"] == {"semantic": {"arrival_latency_s": 0.25}}
    server = run_module.djinn_config(experiment, "semantic")
    assert server.settings["semantic"] == {"arrival_latency_s": 0.25}
    assert server.settings["pinned_host"] == {"capacity_gb": 2.0}
    for text, message in [
        ("[settings.semantic]\narrival_latency = 0.25\n", "arrival_latency"),  # a misspelt key
        ("[settings.semantic]\narrival_latency_s = -1.0\n", "arrival_latency_s"),
        ("[settings.fifo]\nx = 1\n", "names no installed plugin"),
        ("[settings.pinned_host]\ncapacity_gb = 4.0\n", "set by \\[memory\\]"),
        ("[settings]\nsemantic = 1\n", "one table per plugin"),
    ]:
        config.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_experiment(config)


def test_exp1_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[workload]\ncontext_tokens = 0\n")
    with pytest.raises(ConfigError, match="context_tokens"):
        load_experiment(bad)
    bad.write_text('[sweep]\nschedulers = ["fifo"]\n')
    with pytest.raises(ConfigError, match="schedulers"):
        load_experiment(bad)
    for processes in ("0", "1.5"):
        bad.write_text(f"[sweep]\nagent_processes = {processes}\n")
        with pytest.raises(ConfigError, match="agent_processes"):
            load_experiment(bad)


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0


def _report(scheduler: str, points: list[tuple[int, bool]], workload: dict | None = None) -> dict:
    return {
        "experiment": "exp1_density", "hardware": {}, "versions": {},
        "config": {"model": {"name": "m"}, "workload": workload or {"iterations": 5}},
        "points": [{"summary": {"scheduler": scheduler, "agents": n, "meets_limit": ok}} for n, ok in points],
    }


def test_merge_puts_separate_runs_side_by_side() -> None:
    merged = run_module.merge(
        [_report("lru", [(48, True), (64, True)]), _report("lru", [(96, True)]),
         _report("semantic", [(48, True), (64, False)]), _report("static", [(64, False)])],
        ["a", "b", "c", "d"],
    )
    assert merged["summary"]["max_agents_within_limit"] == {"lru": 96, "semantic": 48, "static": 0}
    assert merged["agent_counts"] == [48, 64, 96] and len(merged["points"]) == 6
    assert merged["merged_from"] == ["a", "b", "c", "d"]
    assert merged["commit"] is None  # the test reports name none
    same = [{**_report("lru", [(8, True)]), "commit": "abc"}, {**_report("lru", [(16, True)]), "commit": "abc"}]
    assert run_module.merge(same, ["x", "y"])["commit"] == "abc"
    same[1]["commit"] = "def"
    assert run_module.merge(same, ["x", "y"])["commit"] == {"x": "abc", "y": "def"}
    traced = _report("lru", [(8, True)])
    traced["points"][0]["trace"] = {"steps": []}
    assert "trace" not in run_module.merge([traced], ["t"])["points"][0]
    with pytest.raises(ValueError, match="another model or workload"):
        run_module.merge([_report("lru", [(8, True)]), _report("lru", [(8, True)], {"iterations": 2})], ["a", "b"])
    # agents in the server's process (reports without the key) and in their own do not merge
    own = {**_report("lru", [(8, True)]), "load_generator": run_module.LOAD_GENERATOR}
    assert run_module.merge([own, own], ["a", "b"])["load_generator"] == run_module.LOAD_GENERATOR
    with pytest.raises(ValueError, match="do not merge"):
        run_module.merge([own, _report("lru", [(8, True)])], ["a", "b"])


def test_every_shipped_config_loads_and_reaches_the_server_config() -> None:
    configs = sorted(SMOKE.parent.glob("*.toml"))
    assert {p.name for p in configs} >= {"smoke.toml", "hero.toml", "hero_fp8.toml"}
    for path in configs:
        experiment = load_experiment(path)
        server = run_module.djinn_config(experiment, experiment.sweep.schedulers[0])
        assert server.memory.kv_dtype == ("fp8_e4m3" if "fp8" in path.name else "auto")
        assert server.model.name == experiment.model.name
        assert server.plugins.tiers == (("pinned_host", "disk") if experiment.memory.disk_capacity_gb else ("pinned_host",))


def test_arrivals_within_a_window_and_planned_faults() -> None:
    workload = attrs.evolve(load_experiment(SMOKE).workload, arrival_window_s=3.0, fault_fraction=0.05, iterations=5)
    delays = run_module.arrival_delays(workload, 400)
    assert delays == sorted(delays) and 0 <= delays[0] and delays[-1] <= 3.0 and delays[-1] > 2.5
    poisson = run_module.arrival_delays(attrs.evolve(workload, arrival_window_s=0.0, arrival_rate=100.0), 400)
    assert poisson[0] == 0.0 and 2.0 < poisson[-1] < 6.0  # 400 arrivals at 100 per second
    faults = run_module.plan_faults(workload, 400)
    assert len(faults) == 20 and faults == run_module.plan_faults(workload, 400)
    assert {f.mode for f in faults.values()} == {"generate", "restore"}
    assert all(f.iteration >= 1 for f in faults.values() if f.mode == "restore")
    assert all(0 <= f.iteration < 5 for f in faults.values())
    one_turn = attrs.evolve(workload, iterations=1)
    assert {f.mode for f in run_module.plan_faults(one_turn, 400).values()} == {"generate"}


def test_agents_dropping_mid_request_fail_no_one_and_leak_nothing(tmp_path: Path) -> None:
    smoke = load_experiment(SMOKE)
    experiment = attrs.evolve(
        smoke,
        # a pinned tier of about one session (128 KiB), so the disk tier below it takes the rest
        memory=attrs.evolve(smoke.memory, pinned_host_capacity_gb=0.0002, disk_capacity_gb=0.0625,
                            disk_path=str(tmp_path / "kv.bin")),
        workload=attrs.evolve(smoke.workload, request_timeout_s=120.0, arrival_window_s=0.3, fault_fraction=0.25,
                              iterations=3),
        sweep=attrs.evolve(smoke.sweep, p99_limit_s=120.0, sample_every_s=0.02),
    )
    out = tmp_path / "faults.json"
    run(experiment, out, schedulers=("semantic",), agent_counts=(8,), plots=False, progress=False)
    point = json.loads(out.read_text())["points"][0]
    summary = point["summary"]
    assert [f["mode"] for f in point["faults"]] == ["generate", "restore"] and summary["faults"] == 2
    dropped = {f["agent"]: f["iteration"] for f in point["faults"]}
    # the six others ran every iteration, the dropped ones those before their fault
    assert summary["failures"] == 0
    assert summary["iterations"] == 6 * 3 + sum(dropped.values()) == len(point["samples"])
    assert all(s["iteration"] < dropped.get(s["agent"], 3) for s in point["samples"])
    assert summary["leaked_bytes"] == 0 and summary["leaked_pool_blocks"] == 0
    assert summary["leaked_tier_allocations"] == 0 and point["books_after"]["sessions"] == 0
    assert summary["peak_sessions"] >= 2
    assert summary["peak_tier_bytes_by_tier"].get("disk", 0) > 0
    assert {m["sessions"] for m in point["memory"]} and "tiers" in point["memory"][0]


def test_trace_samples_where_a_stalled_loop_is_and_every_collection() -> None:
    from tests.serving import serving_config, start_server

    def hold_the_loop() -> None:
        time.sleep(0.3)

    server = start_server(serving_config())
    try:
        recorder = run_module.Trace(server)
        recorder.start(time.perf_counter())
        time.sleep(0.1)
        server.call(hold_the_loop)
        gc.collect()
        timeline = recorder.stop()
    finally:
        server.stop()
    assert any(late >= 0.2 for _t, late in timeline["loop_stalls"])
    held = sum(count for count, stack in timeline["stall_stacks"] if stack.split(" < ")[0].endswith("hold_the_loop"))
    # about one sample per STACK_SAMPLE_S while it slept (less the stall threshold); a loaded
    # machine schedules the sampler late, so only several are required
    assert held >= 5
    assert any(generation == 2 and seconds > 0 for _t, generation, seconds in timeline["collections"])
    assert gc.callbacks.count(recorder.watch.on_collection) == 0


def test_the_agents_loop_counts_only_what_held_it_during_each_iteration() -> None:
    probe = LoopWatch.PROBE_S
    loop = {"loop_stall_columns": ["t_s", "late_s"], "loop_stalls": [[1.0, 0.2], [5.0, 0.5], [9.0, 0.1]],
            "collection_columns": ["t_s", "generation", "seconds"], "collections": [[2.0, 2, 0.05], [8.95, 0, 0.04]]}
    # 0.5-3 s holds the stall at 1 s and the collection at 2 s; 8.97-9.02 s catches the last
    # 0.02 s of the collection at 8.95 s and the first 0.02 s of the probe's sleep at 9 s (the
    # loop may have been held anywhere in it, so at most that much counts)
    first, second = {"agent": 0, "started_s": 0.5, "latency_s": 2.5}, {"agent": 0, "started_s": 8.97, "latency_s": 0.05}
    assert _late_during([first], loop) == {"late_s": pytest.approx(0.2), "collecting_s": pytest.approx(0.05)}
    assert _late_during([second], loop) == {"late_s": pytest.approx(0.02), "collecting_s": pytest.approx(0.02)}
    assert _late_during([first, second], loop)["late_s"] == pytest.approx(0.11)
    # a stall that began just before an iteration counts from where the iteration began
    assert _late_during([{"agent": 0, "started_s": 5.0 + probe, "latency_s": 1.0}], loop)["late_s"] == pytest.approx(0.5)
    # with two processes, an agent's iteration counts only its own process's stalls (agent 3 ran
    # in process 1, which stalled at 5 s; process 0 collected at 2 s)
    two = {"processes": 2, "loop_stall_columns": ["t_s", "late_s", "process"], "loop_stalls": [[1.0, 0.2, 0], [5.0, 0.5, 1]],
           "collection_columns": ["t_s", "generation", "seconds", "process"], "collections": [[2.0, 2, 0.05, 0]]}
    span = {"started_s": 0.5, "latency_s": 6.0}
    assert _late_during([{"agent": 3, **span}], two) == {"late_s": pytest.approx(0.5), "collecting_s": 0.0}
    assert _late_during([{"agent": 2, **span}], two) == {"late_s": pytest.approx(0.2), "collecting_s": pytest.approx(0.05)}


def test_a_watched_loop_records_its_stalls_and_collections() -> None:
    watch = LoopWatch(time.perf_counter())

    async def stalled() -> None:
        probe = asyncio.create_task(watch.watch())
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # holds the loop
        gc.collect()
        await asyncio.sleep(0.05)
        probe.cancel()

    watch.time_collections()
    try:
        asyncio.run(stalled())
    finally:
        watch.time_collections(False)
    assert watch.on_collection not in gc.callbacks
    timeline = watch.timeline()
    assert any(late >= 0.15 for _t, late in timeline["loop_stalls"])
    assert any(generation == 2 and seconds > 0 for _t, generation, seconds in timeline["collections"])


def test_the_steps_the_slowest_iterations_decoded_in_are_counted_once_each() -> None:
    def step(t_s: float, seconds: float, rows: int, prefill_tokens: int = 0) -> dict:
        return {"t_s": t_s, "prefill_s": 0.0, "decode_s": seconds, "decode_rows": rows, "prefill_tokens": prefill_tokens}

    steps = [step(0.5, 0.010, 2), step(1.0, 0.030, 40, 512), step(1.5, 0.040, 50, 256), step(2.0, 0.020, 30),
             step(3.5, 0.010, 4)]
    # decoding 1.0-2.0 s and 1.4-2.4 s: the steps at 1.0, 1.5 and 2.0 s, the one at 1.5 s shared
    slowest = [{"started_s": 0.2, "latency_s": 1.8, "decode_s": 1.0}, {"started_s": 0.9, "latency_s": 1.5, "decode_s": 1.0}]
    assert _steps_while_decoding(slowest, steps) == {
        "steps": 3, "median_step_s": pytest.approx(0.030), "mean_decode_rows": pytest.approx(40.0),
        "prefill_share": pytest.approx(2 / 3), "mean_prefill_tokens": pytest.approx(384.0),
    }
    assert _steps_while_decoding([{"started_s": 5.0, "latency_s": 1.0, "decode_s": 0.5}], steps) == {"steps": 0}


def test_a_failing_agents_process_says_why() -> None:
    from eval.exp1_density.agents import run_agents

    started: list[float] = []
    # nothing listens on port 1: the agent's connection is refused in the child process
    with pytest.raises(RuntimeError, match="(?s)agents' process failed.*Connect"):
        asyncio.run(run_agents("tcp://127.0.0.1:1", load_experiment(SMOKE).workload, 32, [0.0], {},
                               started.append, lambda: None))
    assert len(started) == 1 and started[0] <= time.perf_counter()
