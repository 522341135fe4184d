"""Reliability and security through a real server: fuzzed frames, disconnect storms, exhaustion,
faulty plugins, authentication and a soak. ``eval/reliability/run.py`` runs the same functions
at full size."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import threading
import time

import attrs
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from djinn.client import connect
from djinn.server import loop as server_module
from djinn.kernel.errors import AdmissionError, ConfigError, PluginError
from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import BackgroundServer
from djinn.server.loop import is_loopback
from djinn.engine.service import SamplingParams
from djinn.kernel.strategies import Phase, Residency
from djinn.wire.errors import AuthError, FrameError
from djinn.wire.frames import Frame, Op, decode_frame, raise_for_error
from eval.reliability.run import (
    _CONNECTION_KINDS,
    _FRAME_KINDS,
    PROMPT,
    SERIALIZER,
    RawClient,
    _frame_level,
    books,
    burst,
    disconnect_storm,
    frame_bytes,
    fuzz_server,
    idle_books,
    kv_budget_gb,
    kv_sizes,
    leaks,
    malformed_frame,
    must_refuse,
    no_unpickling,
    pickle_exploits,
    server_config,
    soak,
    start_server,
    unpickling_code_paths,
)
from eval.reliability.run import main as reliability_main
from tests.serving import default_budget_gb
from tests.test_kernel import wait_for

NO_LEAKS = {"kv_bytes": 0, "tier_bytes": 0, "tier_used_bytes": 0, "tier_allocations": 0,
            "pool_used_blocks": 0, "sessions": 0, "admission_waiting": 0, "leaked_bytes": 0}


@pytest.fixture(scope="module")
def server():
    srv = start_server(server_config(budget_gb=default_budget_gb()), ["semantic", "tcp"])
    yield srv
    srv.stop()


# =========================================================================== fuzzing


def test_fuzzing_a_live_server_gets_an_error_or_a_close_for_every_frame(server):
    report = fuzz_server(server, 3000, seed=1)
    assert report["error_replies"] + report["closed_connections"] == 3000
    assert report["other_outcomes"] == {} and report["failures"] == []
    assert set(report["by_kind"]) == set(_FRAME_KINDS) | set(_CONNECTION_KINDS)
    assert report["closed_connections"] >= report["by_kind"]["truncated-stream"] > 0
    assert report["unpickle_calls"] == {}
    assert report["crashes"] == 0
    assert report["healthy_client"].get("correct", 0) >= 1
    assert set(report["healthy_client"]) == {"correct"}
    assert report["leaks"] == NO_LEAKS


@pytest.fixture
def fuzz_connection(server):
    state = {}

    def connection():
        if "client" not in state:
            state["client"] = RawClient(server.url("tcp"), timeout=10)
            state["owned"] = state["client"].open_session()
        return state["client"], state["owned"]

    yield connection
    if "client" in state:
        state["client"].close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(_FRAME_KINDS), rng=st.randoms(use_true_random=False))
def test_hypothesis_frames_over_tcp_are_refused(server, fuzz_connection, kind, rng):
    client, owned = fuzz_connection()
    runner = server.model.runner
    data = _frame_level(kind, rng, owned, runner.vocab_size, runner.num_layers)
    # a mutation can land on a valid request (say, an OPEN_SESSION): only frames that must be refused count
    assume(kind == "bad-request" or must_refuse(data, owned))
    client.send_bytes(data)
    reply = client.recv()
    assert reply is not None, f"{kind}: the server closed a connection over a frame it can answer"
    assert reply.op is Op.ERROR, f"{kind} was answered with {reply.op.name}: {data[:96].hex()}"
    assert reply.meta["code"] != "internal", reply.meta
    assert client.request(Frame(Op.PING)).op is Op.OK


@settings(max_examples=500, deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_the_generator_makes_only_frames_the_decoder_refuses_or_a_server_must(rng):
    kind, data = malformed_frame(rng, owned=7, vocab=32000, layers=4, connection_share=0.0)
    try:
        frame = decode_frame(memoryview(data), SERIALIZER)
    except FrameError:
        return
    # decodable: a request on a session this connection does not own, or a bad request on its own
    assert frame.op not in (Op.PING, Op.STATUS, Op.OPEN_SESSION)
    assert frame.session_id != 7 or kind == "bad-request"


def test_nothing_in_djinn_can_unpickle_or_evaluate(tmp_path):
    assert unpickling_code_paths() == []
    planted = tmp_path / "djinn"
    planted.mkdir()
    (planted / "bad.py").write_text(
        "import pickle\nfrom marshal import loads\nimport torch\n"
        "def f(b):\n    eval(b)\n    exec(b)\n    return torch.load(b)\n"
    )
    found = unpickling_code_paths(planted)
    assert len(found) == 5, found


def test_pickle_payloads_are_real_exploits_and_never_unpickled(server, tmp_path):
    proof = tmp_path / "proof"
    for exploit in pickle_exploits(proof):
        pickle.loads(exploit).close()  # the payloads work against pickle: they create the file
        assert proof.exists()
        proof.unlink()
    marker = tmp_path / "unpickled"
    with no_unpickling() as calls:
        with pytest.raises(RuntimeError):
            pickle.loads(pickle_exploits(marker)[0])
        client = RawClient(server.url("tcp"))
        owned = client.open_session()
        for exploit in pickle_exploits(marker):
            for op in (Op.GENERATE, Op.EDIT, Op.RESULT):
                client.send_bytes(frame_bytes(Frame(op, owned)) + exploit)  # a pickle as the payload
                assert client.recv().op is Op.ERROR
            client.send_bytes(exploit)  # a pickle as the whole frame
            assert client.recv().op is Op.ERROR
        client.close()
    assert calls == {"pickle.loads": 1}  # the call above, and none from the server
    assert not marker.exists()


def test_while_frames_are_fuzzed_only_torchs_compiler_may_unpickle():
    """On CUDA, inductor may read a compile worker's pickled result during the fuzzing: that call
    passes; the same call from anywhere else is refused and counted."""
    data = pickle.dumps({"kernel": 1})
    compiler = {"__name__": "torch._inductor.compile_worker.subproc_pool", "pickle": pickle, "data": data}
    with no_unpickling() as calls:
        exec("loaded = pickle.loads(data)", compiler)  # a call made from a module named like torch's compiler
        with pytest.raises(RuntimeError):
            pickle.loads(data)
    assert compiler["loaded"] == {"kernel": 1}
    assert calls == {"pickle.loads": 1}


# =========================================================================== disconnects


def test_a_disconnect_storm_leaks_nothing(server):
    report = disconnect_storm(server, 150, concurrency=16, seed=0)
    assert report["client_errors"] == {}
    assert report["leaks"] == NO_LEAKS
    assert report["served_after"]
    assert report["evictions"] > 0


async def _cancel_mid_pool_work(kernel, model, while_: str) -> None:
    """A generate cancelled while the model thread frees its session's blocks (an eviction it
    waits for) or allocates new ones (its KV growing), then the session closed."""
    session = kernel.open_session()
    await model.generate(session, PROMPT, SamplingParams(max_new_tokens=2))
    pool = model.runner.pool
    name = "free" if while_ == "evicting" else "allocate"
    real = getattr(pool, name)

    def slow(*args):
        time.sleep(0.3)
        return real(*args)

    setattr(pool, name, slow)
    try:
        if while_ == "evicting":
            await kernel.signal_phase(session, Phase.IO_WAIT, None)
            await asyncio.sleep(0.05)
        ids = [7] if while_ == "evicting" else list(range(1, 101))  # 100 tokens need a second block
        request = asyncio.create_task(model.generate(session, ids, SamplingParams(max_new_tokens=2)))
        await asyncio.sleep(0.1)
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        await kernel.close_session(session)
    finally:
        setattr(pool, name, real)


@pytest.mark.parametrize("while_", ["evicting", "growing"])
def test_a_request_cancelled_during_pool_work_leaks_nothing(server, while_):
    baseline = idle_books(server)
    asyncio.run_coroutine_threadsafe(_cancel_mid_pool_work(server.kernel, server.model, while_), server._loop).result(30)
    assert leaks(server, baseline, timeout=5) == NO_LEAKS


# =========================================================================== exhaustion


def test_a_full_host_tier_is_a_clear_error_never_a_crash():
    """GPU room for one session, host tier room for one session: the third session is refused
    with an AdmissionError (its victim cannot move), the others keep working."""
    _weights, kv = kv_sizes("random:tiny-llama", 64)
    srv = start_server(server_config(budget_gb=kv_budget_gb("random:tiny-llama", 1, 64), tier_gb=kv * 1.5 / 2**30,
                                     admission_queue=0), ["semantic", "tcp"])
    try:
        with connect(srv.url("tcp")) as client:
            model = client.model()
            a, b, c = model.session(), model.session(), model.session()
            expected = a.generate(PROMPT, max_new_tokens=2).tokens
            a.signal_phase("IO_WAIT")
            assert wait_for(lambda: srv.call(lambda: srv.kernel.get(a.id).info.residency) is Residency.EVICTED)
            assert b.generate(PROMPT, max_new_tokens=2).tokens == expected
            b.signal_phase("IO_WAIT")
            assert wait_for(lambda: srv.call(lambda: srv.kernel.counters["evict_failures"]) >= 1)
            assert srv.call(lambda: srv.kernel.get(b.id).info.residency) is Residency.RESIDENT
            with pytest.raises(AdmissionError, match="queue is full"):
                c.generate(PROMPT, max_new_tokens=2)
            with pytest.raises(AdmissionError):
                a.generate([expected[-1]], max_new_tokens=1)  # its restore finds no room either
            b.close()
            assert c.generate(PROMPT, max_new_tokens=2).tokens == expected
            assert client.status()["sessions"]["total"] == 2
        assert leaks(srv, {k: 0 for k in books(srv)}) == NO_LEAKS
    finally:
        srv.stop()


def test_a_full_gpu_budget_makes_admission_wait_in_a_bounded_queue():
    config = server_config(budget_gb=kv_budget_gb("random:tiny-llama", 1, 64), admission_queue=1)
    srv = start_server(config, ["static", "tcp"])
    try:
        with connect(srv.url("tcp")) as client:
            model = client.model()
            holder, waiter, refused = model.session(), model.session(), model.session()
            expected = holder.generate(PROMPT, max_new_tokens=2).tokens
            got = {}
            thread = threading.Thread(target=lambda: got.update(t=waiter.generate(PROMPT, max_new_tokens=2).tokens))
            thread.start()
            assert wait_for(lambda: srv.call(lambda: srv.kernel._waiting) == 1)
            with pytest.raises(AdmissionError, match="queue is full"):
                refused.generate(PROMPT, max_new_tokens=2)
            assert thread.is_alive()  # still waiting, not refused
            holder.close()
            thread.join(timeout=10)
            assert got["t"] == expected
            counters = srv.call(lambda: dict(srv.kernel.counters))
            assert counters["admission_waits"] == 1 and counters["admission_refusals"] == 1
    finally:
        srv.stop()


def test_a_burst_of_ten_times_the_admissible_sessions_is_each_served_or_refused():
    config = server_config(budget_gb=kv_budget_gb("random:tiny-llama", 3, 64), admission_queue=3)
    srv = start_server(config, ["static", "tcp"])
    try:
        report = burst(srv, 30, timeout=60)
    finally:
        srv.stop()
    assert report["other"] == {}
    assert report["served"] + report["refused"] == 30
    assert report["served"] >= 3 and report["refused"] >= 1
    assert report["refused"] == report["admission_refusals"]
    assert report["leaks"] == NO_LEAKS


# =========================================================================== plugin faults


def _faulty(hook_name: str, armed: threading.Event):
    """A hooks-only plugin raising in ``hook_name`` while ``armed`` is set."""
    plugin = type("Faulty", (), {})()

    def raiser():
        if armed.is_set():
            raise RuntimeError("kaboom")

    signatures = {
        "djinn_session_created": lambda session: raiser(),
        "djinn_phase_changed": lambda session, old, new: raiser(),
        "djinn_breakpoint_hit": lambda session, layer, step, phase: raiser(),
        "djinn_session_closed": lambda session, reason: raiser(),
    }
    setattr(plugin, hook_name, hookimpl(specname=hook_name)(signatures[hook_name]))
    return plugin


def _faulty_request(hook_name: str, client: RawClient) -> Frame:
    """The request that runs ``hook_name`` on the server; its reply."""
    if hook_name == "djinn_session_created":
        return client.request(Frame(Op.OPEN_SESSION))
    session = client.open_session()
    if hook_name == "djinn_phase_changed":
        return client.request(Frame(Op.SIGNAL_PHASE, session, meta={"phase": "IO_WAIT"}))
    if hook_name == "djinn_breakpoint_hit":
        client.generate(session, PROMPT, 1, breakpoints=[1])
        return client.recv()
    return client.request(Frame(Op.CLOSE_SESSION, session))


@pytest.mark.parametrize("hook_name", ["djinn_session_created", "djinn_phase_changed",
                                       "djinn_breakpoint_hit", "djinn_session_closed"])
def test_a_plugin_raising_in_a_hook_fails_its_request_is_named_and_the_server_serves_on(hook_name, caplog):
    armed = threading.Event()
    srv = start_server(server_config(budget_gb=default_budget_gb()), ["semantic", "tcp"], faulty=_faulty(hook_name, armed))
    named = srv.plugins.catalog["faulty"].describe()  # name (distribution version)
    assert "local" in named
    try:
        with connect(srv.url("tcp")) as bystander:
            with bystander.model().session() as healthy:
                expected = healthy.generate(PROMPT, max_new_tokens=3).tokens
            with caplog.at_level(logging.ERROR, logger="djinn"):
                client = RawClient(srv.url("tcp"))
                armed.set()
                reply = _faulty_request(hook_name, client)
                armed.clear()
                with pytest.raises(PluginError, match="kaboom") as failure:
                    raise_for_error(reply)
                assert named in str(failure.value)
                assert client.request(Frame(Op.PING)).op is Op.OK  # the connection serves on
                client.close()
            with bystander.model().session() as healthy:
                assert healthy.generate(PROMPT, max_new_tokens=3).tokens == expected
            assert any(named in record.getMessage() for record in caplog.records), caplog.text
        assert leaks(srv, {k: 0 for k in books(srv)}) == NO_LEAKS
    finally:
        srv.stop()


def test_a_hook_failing_on_disconnect_still_frees_every_session_of_the_client():
    armed = threading.Event()
    armed.set()
    srv = start_server(server_config(budget_gb=default_budget_gb()), ["semantic", "tcp"], faulty=_faulty("djinn_session_closed", armed))
    try:
        client = RawClient(srv.url("tcp"))
        for _ in range(3):
            session = client.open_session()
            client.generate(session, PROMPT, 2)
            assert client.recv().op is Op.RESULT
        assert books(srv)["sessions"] == 3
        client.abort()
        assert leaks(srv, {k: 0 for k in books(srv)}, timeout=5) == NO_LEAKS
        armed.clear()
        with connect(srv.url("tcp")) as other, other.model().session() as session:
            assert len(session.generate(PROMPT, max_new_tokens=2).tokens) == 2
    finally:
        srv.stop()


# =========================================================================== authentication


def test_a_wrong_or_missing_token_is_refused_before_any_model_work(monkeypatch):
    compared = []
    real = server_module.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(server_module.hmac, "compare_digest", spy)
    config = server_config(budget_gb=default_budget_gb())
    srv = BackgroundServer(config, get_plugin_manager(config, ["tcp"]),
                           token="s3cret").start()
    try:
        before = srv.call(lambda: (dict(srv.kernel.counters), srv.model.engine.steps))
        for hello in (Frame(Op.HELLO, meta={"token": "wrong"}), Frame(Op.HELLO), Frame(Op.HELLO, meta={"token": 123}),
                      Frame(Op.HELLO, meta={"token": "s3cret "}), Frame(Op.OPEN_SESSION, meta={"token": "s3cret"})):
            client = RawClient(srv.url("tcp"), hello=False)
            # the requests behind the refused HELLO arrive together with it and must never run
            client.sock.sendall(b"".join(
                len(raw).to_bytes(8, "little") + raw for raw in map(frame_bytes, (
                    hello, Frame(Op.OPEN_SESSION, request_id=2),
                    Frame(Op.GENERATE, 1, 3, {"max_new_tokens": 4}, ())))))
            reply = client.recv()
            assert reply.op is Op.ERROR and reply.meta["code"] == "auth", reply
            assert client.recv() is None  # then the connection is closed
            client.close()
        assert srv.call(lambda: (dict(srv.kernel.counters), srv.model.engine.steps)) == before
        assert books(srv)["sessions"] == 0
        assert (b"s3cret", b"s3cret") not in compared and (b"wrong", b"s3cret") in compared
        with connect(srv.url("tcp"), token="s3cret") as client, client.model().session() as session:
            assert len(session.generate(PROMPT, max_new_tokens=2).tokens) == 2
        assert (b"s3cret", b"s3cret") in compared
    finally:
        srv.stop()


def test_non_loopback_binds_need_a_token_and_listen_with_one():
    config = server_config(budget_gb=default_budget_gb())
    wide = attrs.evolve(config, server=attrs.evolve(config.server, host="0.0.0.0"))
    with pytest.raises(ConfigError, match="requires a token"):
        start_server(wide, ["tcp"])
    srv = BackgroundServer(wide, get_plugin_manager(wide, ["tcp"]), token="t").start()
    try:
        port = int(srv.url("tcp").rsplit(":", 1)[1])
        with pytest.raises(AuthError):
            connect(f"tcp://127.0.0.1:{port}")
        with connect(f"tcp://127.0.0.1:{port}", token="t") as client:
            assert client.info["num_layers"] == 4
    finally:
        srv.stop()
    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.3.2.1"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3"))


# =========================================================================== soak


def test_a_soak_keeps_memory_flat_and_the_books_balanced(server):
    report = soak(server, 120, concurrency=2)
    assert report["other"] == {}
    assert report["correct"] == 120
    assert report["evictions"] >= 120 and report["restores"] >= 120
    assert report["leaks"] == NO_LEAKS
    assert report["rss_end_bytes"] - report["rss_mid_bytes"] < 64 << 20, report


def test_a_soak_with_write_back_balances_the_books():
    """Write-back at every IO_WAIT (whatever the free memory): each copies the KV to the tier and
    keeps the GPU blocks; the next turn frees the copy. 40 lives leave no byte behind."""
    settings = {"semantic": {"write_back": True, "write_back_headroom": 1.0}}
    srv = start_server(server_config(budget_gb=default_budget_gb(), settings=settings),
                       ["semantic", "tcp"])
    try:
        report = soak(srv, 40, concurrency=2)
        assert report["other"] == {} and report["correct"] == 40
        assert report["write_backs"] >= 40
        assert report["leaks"] == NO_LEAKS
    finally:
        srv.stop()


def test_the_full_run_writes_its_report_at_a_small_size(tmp_path):
    from click.testing import CliRunner

    out = tmp_path / "reliability.json"
    result = CliRunner().invoke(reliability_main, [
        "--frames", "200", "--disconnects", "12", "--admissible", "2", "--sessions", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert report["benchmark"] == "reliability" and report["hardware"]["cores"] >= 1
    assert summary["frames_fuzzed"] == 200 == summary["error_replies"] + summary["closed_connections"]
    assert summary["crashes"] == 0 and summary["leaked_bytes"] == 0 and summary["unpickle_calls"] == 0
    assert summary["disconnects"] == 12 and summary["soak_correct"] == 8
    assert summary["burst_served"] + summary["burst_refused"] == 20
    assert 0 < summary["soak_rss_start_mb"] <= summary["soak_rss_peak_mb"]
