"""The kernel through a real server: hook order over one lifecycle, scheduler behaviour, admission."""

from __future__ import annotations

import time

import attrs
import pytest

from djinn.client import connect
from djinn.kernel.errors import AdmissionError, PluginError
from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import BackgroundServer
from djinn.kernel.strategies import Residency
from eval.reliability.run import kv_budget_gb
from tests.serving import serving_config


class Recorder:
    """An extension plugin recording every event hook it sees, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def djinn_configure(self, config):
        self.calls.append("djinn_configure")

    @hookimpl
    def djinn_startup(self, kernel):
        self.calls.append("djinn_startup")

    @hookimpl
    def djinn_shutdown(self, kernel):
        self.calls.append("djinn_shutdown")

    @hookimpl
    def djinn_connection_opened(self, peer, transport):
        self.calls.append("djinn_connection_opened")

    @hookimpl
    def djinn_connection_closed(self, peer, transport, reason):
        self.calls.append("djinn_connection_closed")

    @hookimpl
    def djinn_session_created(self, session):
        self.calls.append("djinn_session_created")

    @hookimpl
    def djinn_session_closed(self, session, reason):
        self.calls.append("djinn_session_closed")

    @hookimpl
    def djinn_phase_changed(self, session, old, new):
        self.calls.append(f"djinn_phase_changed:{new.value}")

    @hookimpl
    def djinn_session_evicted(self, session, tier, nbytes, seconds):
        self.calls.append("djinn_session_evicted")

    @hookimpl
    def djinn_session_restored(self, session, tier, nbytes, seconds, on_critical_path):
        self.calls.append("djinn_session_restored")

    @hookimpl
    def djinn_admission_blocked(self, need_bytes, free_bytes, queued):
        self.calls.append("djinn_admission_blocked")

    @hookimpl
    def djinn_request_failed(self, op, session_id, error):
        self.calls.append(f"djinn_request_failed:{op}")

    @hookimpl
    def djinn_metrics(self, kernel):
        self.calls.append("djinn_metrics")
        return {"recorder": {"calls": len(self.calls)}}

    @hookimpl
    def djinn_breakpoint_hit(self, session, layer, step, phase):
        self.calls.append(f"djinn_breakpoint_hit:{layer}:{phase}")

    @hookimpl
    def djinn_breakpoint_resumed(self, session, layer, edited, waited_s):
        self.calls.append(f"djinn_breakpoint_resumed:{layer}:{edited}")

    @hookimpl
    def djinn_stream_plan(self, model, layers, layer_bytes, ring_bytes):
        self.calls.append("djinn_stream_plan")

    @hookimpl
    def djinn_stream_pass(self, model, bytes_streamed, seconds, stall_seconds):
        self.calls.append("djinn_stream_pass")


def serve_with(config, names, **plugins_by_name):
    plugins = get_plugin_manager(config, names + list(plugins_by_name), extra_plugins=plugins_by_name)
    return BackgroundServer(config, plugins).start()


def wait_for(predicate, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_hook_order_through_one_lifecycle():
    recorder = Recorder()
    # evict at IO_WAIT (write-back would keep the blocks and call no eviction hook)
    config = serving_config(settings={"semantic": {"write_back": False}})
    server = serve_with(config, ["semantic", "tcp"], recorder=recorder)
    kernel = server.kernel
    with connect(server.url("tcp")) as client:
        session = client.model().session()
        session.generate([1, 2, 3], max_new_tokens=2)
        session.signal_phase("IO_WAIT")
        assert wait_for(lambda: "djinn_session_evicted" in recorder.calls)
        session.signal_phase("COMPUTE")
        assert wait_for(lambda: "djinn_session_restored" in recorder.calls)
        assert client.status()["plugins"]["recorder"]["calls"] > 0
        session.close()
    assert wait_for(lambda: "djinn_connection_closed" in recorder.calls)
    server.stop()
    assert kernel.started is False
    assert recorder.calls == [
        "djinn_configure", "djinn_startup", "djinn_connection_opened", "djinn_session_created",
        "djinn_session_evicted", "djinn_phase_changed:IO_WAIT",
        "djinn_session_restored", "djinn_phase_changed:COMPUTE",
        "djinn_metrics", "djinn_session_closed", "djinn_connection_closed", "djinn_shutdown",
    ] or recorder.calls == [
        # the eviction copy may finish after the phase hook when it runs on a copy stream
        "djinn_configure", "djinn_startup", "djinn_connection_opened", "djinn_session_created",
        "djinn_phase_changed:IO_WAIT", "djinn_session_evicted",
        "djinn_phase_changed:COMPUTE", "djinn_session_restored",
        "djinn_metrics", "djinn_session_closed", "djinn_connection_closed", "djinn_shutdown",
    ], recorder.calls


def test_streamed_model_announces_its_plan_and_each_request():
    recorder = Recorder()
    config = serving_config(settings={"ringbuffer": {"ring_mb": 0.5, "chunk_mb": 0.0625}})
    server = serve_with(config, ["ringbuffer", "tcp"], recorder=recorder)
    try:
        with connect(server.url("tcp")) as client, client.model().session() as session:
            session.generate([1, 2, 3], max_new_tokens=3)
        assert recorder.calls.count("djinn_stream_plan") == 1
        assert recorder.calls.count("djinn_stream_pass") == 1
    finally:
        server.stop()


def _resident_count(server):
    return server.call(lambda: sum(
        s.info.residency is Residency.RESIDENT for s in server.kernel.sessions.values()))


@pytest.mark.parametrize("scheduler", ["lru", "semantic", "static"])
def test_memory_pressure(scheduler):
    """Room for two sessions' KV: lru and semantic free GPU blocks to admit a third (semantic's
    were written back at IO_WAIT, so it frees them with no copy); static makes it wait."""
    config = serving_config(budget_gb=kv_budget_gb("random:tiny-llama", 2, 5))  # 3 prompt + 2 new tokens each
    config = attrs.evolve(config, memory=attrs.evolve(config.memory, admission_queue=0))
    server = serve_with(config, [scheduler, "tcp"])
    try:
        with connect(server.url("tcp")) as client:
            sessions = [client.model().session() for _ in range(3)]
            for s in sessions[:2]:
                s.generate([1, 2, 3], max_new_tokens=2)
                s.signal_phase("IO_WAIT", expected_s=30)
            if scheduler == "semantic":  # copied to the tier, GPU blocks kept while there is room
                assert wait_for(lambda: server.call(lambda: server.kernel.counters["write_backs"]) == 2)
            else:
                time.sleep(0.1)
            assert _resident_count(server) == 3  # nothing leaves the GPU without pressure
            if scheduler == "static":
                with pytest.raises(AdmissionError):
                    sessions[2].generate([4, 5, 6], max_new_tokens=2)
            else:
                assert len(sessions[2].generate([4, 5, 6], max_new_tokens=2).tokens) == 2
            used = server.call(lambda: server.kernel.memory.snapshot())
            assert used["device_used_bytes"] <= used["budget_bytes"]
            counters = server.call(lambda: dict(server.kernel.counters))
            assert (counters["evictions"] == 0) == (scheduler == "static")
            if scheduler == "semantic":
                assert counters["reclaims"] == counters["evictions"]  # no copy on the request's path
    finally:
        server.stop()


def _local_turns(server: BackgroundServer, turns: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens of consecutive turns of one never-evicted session on ``server``'s device, each
    turn fed the last token."""
    from djinn.engine.models import load_model
    from djinn.engine.runner import ModelRunner, greedy_generate

    runner = ModelRunner(load_model("random:tiny-llama", device=server.model.device.type))
    kv, out, last = runner.new_kv(), [], []
    for turn in turns:
        out.append(greedy_generate(runner, kv, runner.ids_tensor(last + turn), new_tokens))
        last = out[-1][-1:]
    return out


def test_recompute_drops_under_pressure_and_prefills_again_token_exact():
    """Room for two sessions' KV: recompute frees the least recently used one without a tier copy;
    that session's next turn prefills its tokens again and picks the never-dropped session's tokens."""
    config = serving_config(budget_gb=kv_budget_gb("random:tiny-llama", 2, 64))
    server = serve_with(config, ["recompute", "tcp"])
    turns = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33]]
    expected = _local_turns(server, turns, 8)
    try:
        with connect(server.url("tcp")) as client:
            model = client.model()
            first, second, third = (model.session() for _ in range(3))
            got = [first.generate(turns[0], max_new_tokens=8).tokens]
            second.generate([1, 2, 3], max_new_tokens=8)
            third.generate([4, 5, 6], max_new_tokens=8)  # needs room: first (least recent) is dropped
            counters = server.call(lambda: dict(server.kernel.counters))
            assert counters["drops"] >= 1 and counters["evictions"] == 0
            assert server.call(lambda: server.kernel.get(first.id).dropped)
            assert server.call(lambda: server.kernel.memory.tier_bytes("pinned_host")) == 0
            got.append(first.generate(turns[1], max_new_tokens=8).tokens)
            got.append(first.generate(turns[2], max_new_tokens=8).tokens)
            assert got == expected
            assert server.call(lambda: server.kernel.counters["recomputes"]) >= 1
            snapshot = server.call(lambda: server.kernel.memory.snapshot())
            assert snapshot["device_used_bytes"] <= snapshot["budget_bytes"]
    finally:
        server.stop()


def test_recompute_never_drops_a_session_that_ran_a_breakpoint():
    config = serving_config(budget_gb=kv_budget_gb("random:tiny-llama", 1, 64))
    config = attrs.evolve(config, memory=attrs.evolve(config.memory, admission_queue=0))
    server = serve_with(config, ["recompute", "tcp"])
    try:
        with connect(server.url("tcp")) as client:
            model = client.model()
            traced, other = model.session(), model.session()
            for _hit in traced.trace([1, 2, 3], max_new_tokens=2, breakpoints=[1]):
                pass  # each hit resumes unmodified when the loop moves on
            with pytest.raises(AdmissionError):
                other.generate([4, 5, 6], max_new_tokens=2)
            assert server.call(lambda: server.kernel.counters["drops"]) == 0
    finally:
        server.stop()


def test_a_plugin_that_raises_fails_only_its_request():
    class Faulty:
        @hookimpl
        def djinn_session_created(self, session):
            raise RuntimeError("kaboom")

    recorder = Recorder()
    server = serve_with(serving_config(), ["tcp"], faulty=Faulty(), recorder=recorder)
    try:
        with connect(server.url("tcp")) as client:
            with pytest.raises(PluginError, match="faulty .*kaboom"):
                client.model().session()
            assert "djinn_request_failed:OPEN_SESSION" in recorder.calls
            assert client.status()["sessions"]["total"] >= 0  # still serving
    finally:
        server.stop()


def test_non_loopback_bind_requires_a_token():
    from djinn.kernel.errors import ConfigError

    config = serving_config(host="0.0.0.0")
    with pytest.raises(ConfigError, match="requires a token"):
        serve_with(config, ["tcp"])


def test_token_is_checked_before_any_model_work():
    from djinn.wire.errors import AuthError

    config = serving_config()
    plugins = get_plugin_manager(config, ["tcp"])
    server = BackgroundServer(config, plugins, token="s3cret").start()
    try:
        with pytest.raises(AuthError):
            connect(server.url("tcp"), token="wrong")
        with pytest.raises(AuthError):
            connect(server.url("tcp"))
        with connect(server.url("tcp"), token="s3cret") as client:
            assert client.info["num_layers"] == 4
    finally:
        server.stop()


def test_breakpoint_hooks_announce_hits_and_resumes():
    recorder = Recorder()
    server = serve_with(serving_config(), ["tcp"], recorder=recorder)
    try:
        with connect(server.url("tcp")) as client, client.model().session() as session:
            for hit in session.trace([1, 2, 3], max_new_tokens=2, breakpoints=[1]):
                if hit.step == 1:
                    hit.scale(1.0)
        bp = [c for c in recorder.calls if c.startswith("djinn_breakpoint")]
        assert bp == [
            "djinn_breakpoint_hit:1:prefill", "djinn_breakpoint_resumed:1:False",
            "djinn_breakpoint_hit:1:decode", "djinn_breakpoint_resumed:1:True",
        ]
    finally:
        server.stop()


def test_a_kv_pool_capped_below_the_budget_shrinks_the_budget_to_what_it_holds(monkeypatch):
    """The pool is sized once from the budget (on CUDA); where 32-bit offsets cap it lower, KV
    admission, which counts bytes, must not admit more than the pool holds."""
    from djinn.engine import kvpool
    from djinn.server.launch import build_runtime

    monkeypatch.setattr(kvpool, "MAX_LAYER_VIEW_ELEMENTS", 10 * 64 * 32)  # tiny-llama: 10 blocks
    config = serving_config(budget_gb=2.0)  # 0.5 GiB after the 1.5 GiB workspace: far more than 10 blocks
    runtime = build_runtime(config, get_plugin_manager(config))
    try:
        model = runtime.model
        if not model.use_cuda:  # on CUDA, start has sized it
            model._size_kv_pool()
        pool = model.runner.pool
        assert pool.num_blocks == pool.max_blocks == 10 and pool.fixed
        assert runtime.kernel.memory.free_bytes() // pool.block_bytes == 10 - 1  # every block but the scratch one
    finally:
        runtime.kernel.stop()
