"""The cluster: placement rules, a session's hand-off between two servers, and a local Ray cluster
of tiny-model servers behind the router (affinity, placement by memory, a migration under memory
pressure that keeps greedy tokens identical, a killed server failing only its own sessions).

The Ray tests share one cluster (Ray's start is slow) and skip when Ray is not installed
(``pip install 'djinn[cluster]'``); the rest needs no Ray. Each test closes the sessions it opens.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import attrs
import pytest

from djinn.client import connect
from djinn.cluster import placement
from djinn.cluster.handoff import SessionState
from djinn.cluster.node import DjinnNode
from djinn.kernel.errors import SessionError
from djinn.wire.frames import Op
from eval.reliability.run import kv_budget_gb
from tests.serving import serving_config

MODEL = "random:tiny-llama"
BLOCK = 64 * 1024  # one 64-token KV block of tiny-llama at float32
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed: pip install 'djinn[cluster]'")


# --------------------------------------------------------------------------- placement rules


def load(name: str, *, free: int, budget: int = 16 * BLOCK, tier: int = 16 * BLOCK, tier_free: int | None = None,
         queue: int = 0, reclaimable: int = 0, sessions: tuple = ()) -> placement.ServerLoad:
    return placement.ServerLoad(name, budget, free, reclaimable, 0, tier, tier if tier_free is None else tier_free,
                                queue, sessions)


def test_a_new_session_goes_where_admission_is_cheapest():
    # requests waiting for memory outweigh any number of free bytes
    assert placement.pick_server({"a": load("a", free=BLOCK, queue=0), "b": load("b", free=8 * BLOCK, queue=1)}) == "a"
    # device room first, reclaimable bytes counted in; then tier room; then fewer sessions; then name
    assert placement.pick_server({"a": load("a", free=2 * BLOCK), "b": load("b", free=BLOCK, reclaimable=2 * BLOCK)}) == "b"
    assert placement.pick_server({"a": load("a", free=BLOCK, tier_free=0), "b": load("b", free=BLOCK)}) == "b"
    one = (placement.SessionLoad(1, 0, "COMPUTE", "RESIDENT", False, False),)
    assert placement.pick_server({"a": load("a", free=BLOCK, sessions=one), "b": load("b", free=BLOCK)}) == "b"
    assert placement.pick_server({"b": load("b", free=BLOCK), "a": load("a", free=BLOCK)}) == "a"


def test_sessions_placed_since_the_last_reading_are_charged_their_servers_mean_size():
    sized = tuple(placement.SessionLoad(i, 2 * BLOCK, "COMPUTE", "RESIDENT", False, False) for i in range(2))
    loads = {"a": load("a", free=5 * BLOCK, sessions=sized), "b": load("b", free=4 * BLOCK, sessions=sized)}
    assert placement.pick_server(loads) == "a"
    assert placement.pick_server(loads, {"a": 1}) == "b"  # a's room, less one mean session, is 3 blocks


def test_pressure_targets_and_the_order_sessions_leave_in():
    full = load("a", free=0, tier_free=BLOCK)  # 1 of 32 blocks free: under 10 %
    assert placement.under_pressure(full, 0.1)
    assert placement.under_pressure(load("a", free=8 * BLOCK, queue=1), 0.1)
    assert not placement.under_pressure(load("a", free=4 * BLOCK), 0.1)
    loads = {"a": full, "b": load("b", free=10 * BLOCK, tier_free=0), "c": load("c", free=2 * BLOCK, tier_free=2 * BLOCK)}
    # b keeps 8 of its 32 blocks (>= 20 %) after taking 2, but 6 after taking 4; c would keep 2
    assert placement.pick_target(loads, "a", 2 * BLOCK, 0.1) == "b"
    assert placement.pick_target(loads, "a", 4 * BLOCK, 0.1) is None
    order = placement.coldest_first([("soon", 5.0, BLOCK), ("late", 50.0, BLOCK), ("nohint", None, BLOCK),
                                     ("late-big", 50.0, 4 * BLOCK)], now=0.0)
    assert order == ["late-big", "late", "nohint", "soon"]


def test_a_load_report_parses_and_refuses_a_missing_figure():
    report = {"name": "a", "device_budget_bytes": 10, "device_free_bytes": 4, "reclaimable_bytes": 1,
              "weights_bytes": 2, "tier_capacity_bytes": 8, "tier_free_bytes": 8, "admission_queue": 0,
              "sessions": [{"id": 3, "kv_bytes": 5, "phase": "IO_WAIT", "residency": "RESIDENT", "busy": False,
                            "backed": True, "tokens": 7}], "extra": "ignored"}
    parsed = placement.ServerLoad.from_report(report)
    assert (parsed.device_room, parsed.room, parsed.capacity) == (5, 13, 16)
    assert parsed.session(3).tokens == 7 and parsed.session(4) is None
    with pytest.raises(KeyError):
        placement.ServerLoad.from_report({k: v for k, v in report.items() if k != "tier_free_bytes"})


# --------------------------------------------------------------------------- hand-off between two servers


@pytest.fixture(scope="module")
def two_nodes():
    """Two in-process servers of the same tiny model; IO_WAIT evicts at once (no write-back)."""
    config = serving_config(MODEL, budget_gb=0.0, settings={"semantic": {"write_back": False}})
    nodes = [DjinnNode(config, ["semantic", "tcp"], name=f"n{i}") for i in range(2)]
    yield nodes
    for node in nodes:
        node.stop()


def _session_load(node: DjinnNode, session_id: int) -> dict:
    return next(s for s in node.load()["sessions"] if s["id"] == session_id)


def _wait(predicate, timeout: float = 10.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.parametrize("evicted", [False, True], ids=["resident", "evicted"])
def test_a_session_handed_to_another_server_continues_token_exact(two_nodes, evicted):
    source, target = two_nodes
    prompt = list(range(3, 103))
    with connect(source.describe()["urls"][0]) as a, connect(target.describe()["urls"][0]) as b:
        with a.model().session() as reference:
            expected = [reference.generate(prompt, 12).tokens, reference.generate([5, 6], 12).tokens]
        moving = a.model().session()
        first = moving.generate(prompt, 12).tokens
        if evicted:
            moving.signal_phase("IO_WAIT", expected_s=30)
            _wait(lambda: _session_load(source, moving.id)["residency"] == "EVICTED", what="the eviction")
        state, kv = source.export_session(moving.id)
        assert _session_load(source, moving.id)["tokens"] == len(prompt) + 12  # the source is left as it was
        assert len(state["history"]) == len(prompt) + 11 and len(state["pending"]) == 1
        assert state["phase"] == ("IO_WAIT" if evicted else "COMPUTE") and kv.nbytes == state["nbytes"] > 0
        arrived = b.model().session()
        target.import_session(arrived.id, state, kv)
        moving.close()
        # the pending token goes first, as the source would have fed it
        second = arrived.generate([*state["pending"], 5, 6], 12).tokens
        assert [first, second] == expected
        assert _session_load(target, arrived.id)["phase"] == ("IO_WAIT" if evicted else "COMPUTE")
        arrived.close()


def test_an_import_refuses_a_foreign_layout_a_used_session_and_wrong_bytes(two_nodes):
    source, target = two_nodes
    with connect(source.describe()["urls"][0]) as a, connect(target.describe()["urls"][0]) as b:
        with a.model().session() as session:
            session.generate(list(range(3, 40)), 4)
            state, kv = source.export_session(session.id)
        with pytest.raises(SessionError, match="no open session"):
            source.export_session(10_000)
        with b.model().session() as used:
            used.generate([1, 2, 3], 2)
            with pytest.raises(SessionError, match="not empty"):
                target.import_session(used.id, state, kv)
        with b.model().session() as empty:
            foreign = {**state, "layout": {**state["layout"], "head_dim": 999}}
            with pytest.raises(SessionError, match="head_dim"):
                target.import_session(empty.id, foreign, kv)
            with pytest.raises(SessionError, match="uint8"):
                target.import_session(empty.id, state, kv[:-1])
            with pytest.raises(SessionError, match="missing"):
                target.import_session(empty.id, state, None)
            with pytest.raises(TypeError):
                target.import_session(empty.id, {**state, "unknown": 1}, kv)
            target.import_session(empty.id, state, kv)  # what was refused left the session empty
            assert _session_load(target, empty.id)["tokens"] == len(state["history"])
    assert attrs.fields_dict(SessionState).keys() == state.keys()


# --------------------------------------------------------------------------- a Ray cluster


#: each server's device holds 8 KV blocks beside the weights and its host tier 8 more
TIER_GB = 8 * BLOCK / 2**30


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    from djinn.cluster import RouterSettings, start_cluster

    config = serving_config(MODEL, budget_gb=kv_budget_gb(MODEL, 2, 256), tier_gb=TIER_GB)
    started = start_cluster(
        config, ["semantic", "tcp"], servers=2, http_port=0,
        settings=RouterSettings(poll_s=0.05, load_max_age_s=0.0, call_timeout_s=60.0),
        ray_init={"num_cpus": 4, "object_store_memory": 100 << 20, "log_to_driver": False},
    )
    yield started
    started.stop()


def _router(cluster):
    return cluster.router.router


def _owner(cluster, session) -> str:
    return _router(cluster).sessions[session.id].backend.name


def _loads(cluster) -> dict[str, placement.ServerLoad]:
    router = _router(cluster)
    cluster.router.call(router.refresh_loads())
    return {name: b.load for name, b in router.backends.items() if b.alive}


def _prompt(index: int, length: int = 200) -> list[int]:
    return [(index * 37 + t) % 500 + 1 for t in range(length)]


@needs_ray
def test_every_turn_and_phase_signal_of_a_session_reaches_the_server_holding_it(cluster):
    with connect(cluster.url) as client:
        model = client.model()
        sessions = [model.session() for _ in range(4)]
        owners = {s.id: _owner(cluster, s) for s in sessions}
        assert len(set(owners.values())) == 2  # spread over both
        context = dict.fromkeys(owners, 0)
        for turn in range(3):
            for s in sessions:
                ids = [10 + s.id, 11 + turn, 12]
                context[s.id] += len(ids) + len(s.generate(ids, 4, timeout=30).tokens)
                s.signal_phase("IO_WAIT", expected_s=20)
            for s in sessions:
                s.signal_phase("COMPUTE")
        sessions[0].signal_phase("IO_WAIT", expected_s=20)
        router = _router(cluster)

        def all_seen() -> bool:
            loads = _loads(cluster)
            for s in sessions:
                held = loads[owners[s.id]].session(router.sessions[s.id].upstream_id)
                want = "IO_WAIT" if s is sessions[0] else "COMPUTE"
                if held is None or held.tokens != context[s.id] or held.phase != want:
                    return False
            return True

        _wait(all_seen, what="every session's context and phase on its own server")
        assert {s.id: _owner(cluster, s) for s in sessions} == owners  # never moved
        for name, held in _loads(cluster).items():  # no server holds a session it does not own
            assert {x.id for x in held.sessions} == {router.sessions[i].upstream_id for i in owners if owners[i] == name}
        assert client.status()["servers"].keys() == set(router.backends)
        for s in sessions:
            s.close()


@needs_ray
def test_new_sessions_go_to_the_server_with_the_most_room(cluster):
    with connect(cluster.url) as client:
        model = client.model()
        big = model.session()
        big.generate(_prompt(1), 40, timeout=30)  # 4 of one server's 16 blocks
        crowded = _owner(cluster, big)
        fresh = [model.session() for _ in range(3)]
        assert {_owner(cluster, s) for s in fresh} == set(_router(cluster).backends) - {crowded}
        for s in [big, *fresh]:
            s.close()


@needs_ray
def test_a_server_out_of_memory_moves_an_idle_session_away_and_it_continues_token_exact(cluster):
    router = _router(cluster)
    moves_before = len(router.migrations)
    with connect(cluster.url) as client:
        model = client.model()
        expected = {}
        for i in range(5):  # one at a time, each alone on a server: the unmigrated reference
            with model.session() as reference:
                expected[i] = [reference.generate(_prompt(i), 40, timeout=30).tokens,
                               reference.generate([7, 8], 8, timeout=30).tokens]
        opened, crowded = [], []
        while len(crowded) < 5:  # five sessions of one server (placement spreads them)
            opened.append(model.session())
            if _owner(cluster, opened[-1]) == _owner(cluster, opened[0]):
                crowded.append(opened[-1])
        full = _owner(cluster, crowded[0])
        got = {}
        for i, s in enumerate(crowded):
            # 4 blocks each: by the fourth, device and tier are full; the coldest (longest wait) leaves
            got[i] = [s.generate(_prompt(i), 40, timeout=30).tokens]
            s.signal_phase("IO_WAIT", expected_s=120 if i == 0 else 60)
        moves = router.migrations[moves_before:]
        assert moves and all(m.source == full and m.target != full and m.nbytes == 4 * BLOCK for m in moves)
        assert moves[0].session_id == crowded[0].id
        for i, s in enumerate(crowded):
            s.signal_phase("COMPUTE")
            got[i].append(s.generate([7, 8], 8, timeout=30).tokens)
        assert got == expected
        assert _owner(cluster, crowded[0]) != full
        for s in opened:
            s.close()


def _http(url: str, body: dict | None = None, method: str = "POST") -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            text = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        text, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@needs_ray
def test_the_openai_api_sends_each_session_to_the_server_that_holds_it(cluster):
    base, http = cluster.router.http_url, cluster.router.http
    prompt = _prompt(3, 60)
    first = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "djinn": {"session_id": "agent-a"}}
    status, reply = _http(base + "/completions", first)
    assert status == 200 and reply["usage"]["completion_tokens"] == 4
    owner = http.sessions["agent-a"]
    status, _ = _http(base + "/completions", {**first, "djinn": {"session_id": "agent-b"}})
    assert status == 200 and http.sessions["agent-b"] is not owner  # placed where there was more room
    # the conversation again, longer: the KV of its prompt is reused, so it ran where that KV is
    status, again = _http(base + "/completions", {**first, "prompt": [*prompt, 9, 10]})
    assert status == 200 and again["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt)
    status, streamed = _http(base + "/completions", {**first, "prompt": [*prompt, 9, 10, 11], "stream": True})
    assert status == 200 and streamed.count("data: ") >= 2 and streamed.rstrip().endswith("data: [DONE]")
    status, info = _http(base + "/djinn/sessions/agent-a", method="GET")
    assert status == 200 and info["session_id"] == "agent-a"
    assert _http(base + "/models", method="GET")[1]["data"][0]["id"] == MODEL
    for name in ("agent-a", "agent-b"):
        assert _http(base + f"/djinn/sessions/{name}", method="DELETE")[0] == 200
    assert _http(base + "/djinn/sessions/agent-a", method="GET")[0] == 404 and not http.sessions


@needs_ray
def test_a_killed_server_fails_only_its_own_sessions(cluster):
    cluster.add_server("djinn-extra")
    router = _router(cluster)
    with connect(cluster.url) as client:
        model = client.model()
        sessions = [model.session() for _ in range(6)]
        by_owner: dict[str, list] = {}
        for s in sessions:
            by_owner.setdefault(_owner(cluster, s), []).append(s)
        assert {name: len(group) for name, group in by_owner.items()} == {"djinn-0": 2, "djinn-1": 2, "djinn-extra": 2}
        for s in sessions:
            s.generate([20 + s.id, 21], 4, timeout=30)
        doomed, idle = by_owner["djinn-extra"]
        http = cluster.router.http
        http.sessions["over-http"] = router.backends["djinn-extra"]  # as if placed there
        request = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2, "djinn": {"session_id": "over-http"}}
        assert _http(cluster.router.http_url + "/completions", request)[0] == 200
        paused = doomed.trace([5], 4, breakpoints=[1])
        assert next(paused).layer == 1  # the request is in flight, paused on the server
        cluster.kill("djinn-extra")
        with pytest.raises(SessionError) as failure:
            next(paused)
        assert "djinn-extra is gone" in str(failure.value) and f"session {doomed.id}" in str(failure.value)
        with pytest.raises(SessionError, match="djinn-extra is gone"):
            idle.generate([1], 2, timeout=30)
        status, refusal = _http(cluster.router.http_url + "/completions", request)
        assert status == 503 and "djinn-extra is gone" in refusal["error"]["message"]
        assert "over-http" in refusal["error"]["message"]
        for name in ("djinn-0", "djinn-1"):
            for s in by_owner[name]:
                assert len(s.generate([9], 4, timeout=30).tokens) == 4
                assert _owner(cluster, s) == name
        _wait(lambda: not router.backends["djinn-extra"].alive, what="the router to see the server gone")
        assert not client.status()["servers"]["djinn-extra"]["alive"]
        later = [model.session() for _ in range(2)]
        assert {_owner(cluster, s) for s in later} <= {"djinn-0", "djinn-1"}
        for s in [*sessions, *later]:
            s.close()  # a lost session closes without an error: nothing is left to free
    assert not router.sessions  # every session closed, the lost ones too


@needs_ray
def test_the_router_answers_bad_requests_as_a_server_would(cluster):
    with connect(cluster.url) as client:
        session = client.model().session()
        with pytest.raises(SessionError, match="token ids"):
            session.generate([10**9], 2, timeout=30)  # the server's own check, passed through
        with pytest.raises(SessionError, match="no open session 12345"):
            client._loop.run(client._async.request(Op.GENERATE, session_id=12345, timeout=30))
        assert len(session.generate([3, 4], 2, timeout=30).tokens) == 2  # the session is fine
        session.close()


def test_the_cluster_benchmark_runs_its_arms_and_times_a_migration(tmp_path, capsys):
    from eval import bench_cluster

    out = tmp_path / "cluster.json"
    bench_cluster.main(["--agents", "2", "--iterations", "2", "--think-s", "0.01", "0.02", "--arms", "two",
                        "--migrate-tokens", "100", "--migrate-repeats", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    two = report["arms"]["two"]
    assert two["summary"]["iterations"] == 4 and two["summary"]["failures"] == 0
    assert [m["nbytes"] for m in two["migrations"]] == [2 * BLOCK, 2 * BLOCK]  # 101 tokens: two blocks
    assert {m["source"] for m in two["migrations"]} == {"djinn-0", "djinn-1"}  # there and back
    assert report["comparison"]["migration"][0]["tokens"] == 100
    assert "move    100 tokens" in capsys.readouterr().out


@needs_ray
def test_the_cluster_benchmark_runs_its_servers_as_ray_actors(tmp_path, capsys, cluster):
    """``--servers-in ray``: each arm's servers are actors of their own (here, of the module's
    Ray), a client bypassing the router presents their secret, and a migration's bytes cross
    between two actors."""
    from eval import bench_cluster

    out = tmp_path / "cluster.json"
    workload = ["--agents", "2", "--iterations", "2", "--think-s", "0.01", "0.02", "--out", str(out)]
    bench_cluster.main([*workload, "--servers-in", "ray", "--arms", "one,two", "--migrate-tokens", "100",
                        "--migrate-repeats", "1"])
    report = json.loads(out.read_text())
    assert report["config"]["servers_in"] == "ray" and "Ray actor" in report["note"]
    for arm in ("one", "two"):
        assert report["arms"][arm]["summary"]["iterations"] == 4 and report["arms"][arm]["summary"]["failures"] == 0
    assert "router" not in report["arms"]["one"]  # its agents spoke to the server itself
    two = report["arms"]["two"]
    assert [m["nbytes"] for m in two["migrations"]] == [2 * BLOCK]
    assert sum(h["exports"] for h in two["handoffs"]) == sum(h["imports"] for h in two["handoffs"]) == 1
    with pytest.raises(SystemExit):  # an arm measured in one process does not join Ray's
        bench_cluster.main([*workload, "--arms", "routed", "--append"])
    assert "--servers-in" in capsys.readouterr().err


@needs_ray
def test_the_cluster_benchmark_scales_its_servers_over_gpus_and_finds_the_largest_passing_n(tmp_path, capsys, cluster):
    """The ``gpus`` arm: one point per (GPU count, agents), appended; ``scaling`` takes the
    largest N within the P99 limit for each count. Here (no GPU) its servers run on the CPU."""
    from eval import bench_cluster

    out = tmp_path / "scaling.json"
    common = ["--iterations", "1", "--think-s", "0.01", "0.02", "--servers-in", "ray", "--arms", "gpus",
              "--out", str(out), "--append"]
    for gpus, agents in ((1, 2), (1, 4), (2, 4)):
        bench_cluster.main([*common, "--gpus", str(gpus), "--agents", str(agents)])
    report = json.loads(out.read_text())
    assert sorted(report["arms"]) == ["gpus1_2", "gpus1_4", "gpus2_4"]
    two = report["arms"]["gpus2_4"]
    assert two["servers"] == 2 and two["agents"] == 4 and two["summary"]["failures"] == 0
    rows = {r["gpus"]: r for r in report["comparison"]["scaling"]}
    assert rows[1]["agents_run"] == [2, 4] and rows[1]["largest_agents"] == 4
    assert rows[2]["largest_agents"] == 4 and rows[2]["per_gpu_vs_one"] == 0.5
    assert "2 GPU(s): largest N within the P99 limit 4" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_cluster.main(["--arms", "gpus", "--out", str(tmp_path / "other.json")])
    assert "--servers-in ray" in capsys.readouterr().err


def test_scaling_takes_the_largest_passing_n_per_gpu_count():
    from eval.bench_cluster import scaling

    def point(gpus, agents, p99, failures=0):
        return {"arm": "gpus", "servers": gpus, "agents": agents,
                "summary": {"p99_latency_s": p99, "failures": failures}}

    rows = scaling([point(1, 352, 1.5), point(1, 416, 2.5), point(2, 704, 1.6), point(2, 832, 1.9, failures=1),
                    point(4, 1664, 3.0)], p99_limit_s=2.0)
    assert rows == [
        {"gpus": 1, "agents_run": [352, 416], "largest_agents": 352, "per_gpu_vs_one": 1.0},
        {"gpus": 2, "agents_run": [704, 832], "largest_agents": 704, "per_gpu_vs_one": 1.0},
        {"gpus": 4, "agents_run": [1664], "largest_agents": None, "per_gpu_vs_one": None},
    ]


@needs_ray
def test_a_stopped_cluster_returns_once_its_servers_processes_have_ended(cluster):
    """``Cluster.stop`` waits for its servers' processes to end, so a next cluster on the same
    GPU finds the memory they held free: each server's port refuses connections once it returns."""
    from djinn.cluster import start_cluster

    config = serving_config(MODEL, budget_gb=kv_budget_gb(MODEL, 1, 256), tier_gb=TIER_GB)
    other = start_cluster(config, ["semantic", "tcp"], servers=2)  # on the module's Ray
    addresses = [urlsplit(b.url) for b in other.router.router.backends.values()]
    for address in addresses:
        socket.create_connection((address.hostname, address.port), timeout=5).close()  # serving
    other.stop()
    for address in addresses:
        with pytest.raises(OSError):
            socket.create_connection((address.hostname, address.port), timeout=5)
    import ray

    assert ray.is_initialized()  # the module's Ray, which this cluster did not start, runs on
