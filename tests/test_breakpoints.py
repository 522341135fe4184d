"""Breakpoints end to end: real server, real clients over TCP, tiny models on the CPU.

Covers token-exact unmodified resume, server-side edits, inspection, isolation of a paused
session from other sessions, abandoned pauses, disconnects while paused, bad requests, and the
hot-path rule (no per-layer hook call while no breakpoint is armed).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest
import torch

from djinn.client import connect
from djinn.kernel.errors import BreakpointError, SessionError
from djinn.engine.models import load_model
from djinn.kernel.hookspecs import hookimpl
from djinn.kernel.plugins import get_plugin_manager
from djinn.engine.runner import ModelRunner, greedy_generate
from djinn.engine.service import SamplingParams
from djinn.server.launch import build_runtime
from djinn.wire.frames import Op
from tests.serving import start_server, serving_config

PROMPT = [5, 17, 300, 42, 9, 88]
NEW_TOKENS = 4
LAYERS = [0, 2, 3]
#: bounds the waits on server-side state so a broken server fails the test instead of hanging it
WAIT_LIMIT_S = 20.0


def local_tokens(spec: str, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from an in-process runner on the device the server picks (``auto``)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runner = ModelRunner(load_model(spec, device=device))
    return greedy_generate(runner, runner.new_kv(), runner.ids_tensor(prompt), n)


def wait_until(predicate, what: str) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` if it never becomes true."""
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)


def kv_bytes(server) -> int:
    """Device bytes the kernel accounts to KV (read on the server's loop)."""
    return server.call(lambda: server.kernel.memory.device_bytes("kv"))


def session_busy(server, session_id: int) -> bool:
    """Whether the server still runs a request of this session."""
    return server.call(lambda: server.kernel.get(session_id).info.busy)


@pytest.fixture(scope="module", params=["random:tiny-llama", "random:tiny-gpt2"])
def server(request):
    """One server per tiny model for the module."""
    srv = start_server(serving_config(request.param))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def llama_server():
    """One tiny-llama server for the tests that need a single model."""
    srv = start_server(serving_config("random:tiny-llama"))
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    """A connection to the module's server."""
    with connect(server.url("tcp")) as c:
        yield c


def test_unmodified_resume_is_token_exact_and_hits_every_armed_layer(server, client):
    session = client.model().session()
    trace = session.trace(PROMPT, NEW_TOKENS, breakpoints=LAYERS)
    hits = [(hit.phase, hit.step, hit.layer, hit.shape) for hit in trace]
    hidden = client.info["hidden_size"]
    expected_hits = [
        ("prefill" if step == 0 else "decode", step, layer, (1, len(PROMPT) if step == 0 else 1, hidden))
        for step in range(NEW_TOKENS) for layer in LAYERS
    ]
    assert hits == expected_hits
    plain = client.model().session().generate(PROMPT, NEW_TOKENS).tokens
    assert trace.result.tokens == plain == local_tokens(server.config.model.name, PROMPT, NEW_TOKENS)


def test_context_after_a_breakpoint_request_continues_exactly(server, client):
    spec = server.config.model.name
    runner = ModelRunner(load_model(spec, device=server.model.device.type))
    kv = runner.new_kv()
    first = greedy_generate(runner, kv, runner.ids_tensor(PROMPT), 3)
    second = greedy_generate(runner, kv, runner.ids_tensor([first[-1], 7]), 3)
    session = client.model().session()
    assert session.generate(PROMPT, 3, breakpoints=[1], on_break=lambda hit: None).tokens == first
    assert session.generate([7], 3, breakpoints=[0, 3], on_break=lambda hit: None).tokens == second


@pytest.mark.parametrize("edit", ["scale", "add", "set_zero"])
def test_edits_change_the_output(server, client, edit):
    # not a constant vector: LayerNorm subtracts the mean, so GPT-2 would never see one
    vector = torch.linspace(-8.0, 8.0, client.info["hidden_size"])

    def on_break(hit):
        if edit == "scale":
            hit.scale(0.5)
        elif edit == "add":
            hit.add(vector)
        else:
            hit.set(hit.fetch() * 0)

    plain = client.model().session().generate(PROMPT, 6).tokens
    edited = client.model().session().generate(PROMPT, 6, breakpoints=[0], on_break=on_break).tokens
    assert len(edited) == len(plain)
    assert edited != plain


def test_an_edit_in_a_decode_step_changes_the_tokens_from_that_step_on(server, client):
    edit_step = 3

    def on_break(hit):
        if hit.phase == "decode" and hit.step == edit_step:
            hit.scale(-1.0)  # a flipped residual stream changes the step's token on any model here

    plain = client.model().session().generate(PROMPT, 8, ignore_eos=True).tokens
    edited = client.model().session().generate(PROMPT, 8, ignore_eos=True, breakpoints=[1], on_break=on_break).tokens
    assert edited[:edit_step] == plain[:edit_step]
    assert edited[edit_step] != plain[edit_step]


def test_stats_match_the_fetched_activation(server, client):
    session = client.model().session()
    for hit in session.trace(PROMPT, 2, breakpoints=[1]):
        stats, activation = hit.stats(), hit.fetch()
        assert tuple(activation.shape) == hit.shape == tuple(stats["shape"])
        h = activation.float()
        expected = {"mean": h.mean(), "std": h.std(), "min": h.min(), "max": h.max(), "norm": h.norm()}
        for key, value in expected.items():
            assert stats[key] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key


def test_a_fetched_activation_is_a_copy(server, client):
    session = client.model().session()
    plain = client.model().session().generate(PROMPT, 3).tokens

    def on_break(hit):
        hit.fetch().mul_(0)  # must not reach the server's activation

    assert session.generate(PROMPT, 3, breakpoints=[1], on_break=on_break).tokens == plain


def test_another_session_generates_while_one_is_paused(llama_server):
    server = llama_server
    expected = local_tokens("random:tiny-llama", PROMPT, NEW_TOKENS)
    with connect(server.url("tcp")) as first, connect(server.url("tcp")) as second:
        paused = first.model().session()
        trace = paused.trace(PROMPT, NEW_TOKENS, breakpoints=[1])
        hit = next(trace)
        assert (hit.phase, hit.layer) == ("prefill", 1)
        other: dict[str, list[int]] = {}
        worker = threading.Thread(
            target=lambda: other.update(tokens=second.model().session().generate(PROMPT, NEW_TOKENS).tokens)
        )
        worker.start()
        worker.join(WAIT_LIMIT_S)
        assert not worker.is_alive(), "a paused session stalled another connection's generate"
        assert other["tokens"] == expected
        assert session_busy(server, paused.id)  # still paused: the other request did not need a resume
        for _ in trace:
            pass
        assert trace.result.tokens == expected


def test_an_abandoned_pause_ends_the_request_and_the_session_generates_again():
    server = start_server(serving_config("random:tiny-llama", pause_timeout_s=0.5))
    try:
        with connect(server.url("tcp")) as client:
            session = client.model().session()
            trace = session.trace(PROMPT, NEW_TOKENS, breakpoints=[2])
            next(trace)
            wait_until(lambda: not session_busy(server, session.id), "the abandoned pause to end its request")
            with pytest.raises(BreakpointError, match="abandoned"):
                for _ in trace:
                    pass
            expected = local_tokens("random:tiny-llama", PROMPT, NEW_TOKENS)
            assert session.generate(PROMPT, NEW_TOKENS).tokens == expected
    finally:
        server.stop()


def test_disconnect_while_paused_frees_the_session(llama_server):
    server = llama_server
    before = kv_bytes(server)
    client = connect(server.url("tcp"))
    session = client.model().session()
    trace = session.trace(PROMPT, NEW_TOKENS, breakpoints=[1])
    next(trace)
    assert kv_bytes(server) > before
    client.close()
    wait_until(lambda: kv_bytes(server) == before, "the disconnected session's KV to be released")
    assert server.call(lambda: session.id not in server.kernel.sessions)


def test_edits_travel_with_the_resume_in_one_frame_and_apply_in_order(server, client, monkeypatch):
    vector = torch.linspace(-8.0, 8.0, client.info["hidden_size"])
    sent, request = [], client._async.request

    async def recording(op, **kwargs):
        sent.append((op, tuple(e["op"] for e in (kwargs.get("meta") or {}).get("edits", []))))
        return await request(op, **kwargs)

    def batched(hit):
        hit.scale(0.5)
        hit.add(vector)
        hit.resume()

    def one_at_a_time(hit):  # each edit read back before the next
        before = hit.fetch()
        hit.scale(0.5)
        assert torch.equal(hit.fetch(), before * 0.5)
        hit.add(vector)
        hit.fetch()

    expected = client.model().session().generate(PROMPT, 4, breakpoints=[1], on_break=one_at_a_time).tokens
    monkeypatch.setattr(client._async, "request", recording)
    assert client.model().session().generate(PROMPT, 4, breakpoints=[1], on_break=batched).tokens == expected
    paused = [entry for entry in sent if entry[0] in (Op.INSPECT, Op.EDIT, Op.RESUME)]
    assert len(paused) == 4 and set(paused) == {(Op.RESUME, ("scale", "add"))}  # one round trip a pause


def test_the_server_checks_edits_that_bypass_the_client(server, client):
    session = client.model().session()
    hidden_size = client.info["hidden_size"]

    def raw(op, meta, tensors=()):
        return client._loop.run(client._async.request(op, session_id=session.id, meta=meta, tensors=tensors))

    def on_break(hit):
        if hit.phase != "prefill":
            return
        refused = [
            ({"edits": [{"op": "set", "tensor": 0}]}, (torch.zeros(3),), BreakpointError, "does not match"),
            ({"edits": [{"op": "add", "tensor": 0}]}, (torch.zeros(hidden_size, dtype=torch.int64),),
             BreakpointError, "floating-point"),
            ({"edits": [{"op": "add", "tensor": 1}]}, (torch.zeros(hidden_size),), BreakpointError, "needs one tensor"),
            ({"edits": [{"op": "scale", "factor": "2"}]}, (), SessionError, "factor must be a number"),
            ({"edits": [{"op": "scale", "factor": 0.0}, {"op": "shift"}]}, (), BreakpointError, "one of: set, scale, add"),
            ({"edits": "scale"}, (), BreakpointError, "list of objects"),
        ]
        before = raw(Op.INSPECT, {"what": "fetch"}).tensors[0].clone()
        for meta, tensors, error, match in refused:
            for op in (Op.INSPECT, Op.RESUME):
                with pytest.raises(error, match=match):
                    raw(op, meta, tensors)
        assert torch.equal(raw(Op.INSPECT, {"what": "fetch"}).tensors[0], before)  # nothing refused was applied
        raw(Op.EDIT, {"op": "scale", "factor": 1.0})  # a one-edit EDIT frame, applied before the next read
        raw(Op.EDIT, {"op": "add"}, (torch.zeros(hidden_size),))
        assert torch.equal(raw(Op.INSPECT, {"what": "fetch"}).tensors[0], before)

    expected = local_tokens(server.config.model.name, PROMPT, 3)
    assert session.generate(PROMPT, 3, breakpoints=[1], on_break=on_break).tokens == expected


def test_a_pass_pauses_inside_a_layer_and_edits_there_reach_the_output(server, client):
    hidden_size = client.info["hidden_size"]
    seen = []

    def look(hit):
        seen.append((hit.phase, hit.layer, hit.at, hit.shape))

    points = [(1, "attention"), (1, "mlp"), 1, (2, "mlp")]
    plain = client.model().session().generate(PROMPT, 3, ignore_eos=True).tokens
    traced = client.model().session().generate(PROMPT, 3, ignore_eos=True, breakpoints=points, on_break=look)
    assert traced.tokens == plain
    order = [(1, "attention"), (1, "mlp"), (1, "output"), (2, "mlp")]
    assert seen == [("prefill", layer, at, (1, len(PROMPT), hidden_size)) for layer, at in order] + [
        ("decode", layer, at, (1, 1, hidden_size)) for _ in range(2) for layer, at in order]

    def silence_the_mlp(hit):
        hit.set(torch.zeros(hit.shape))

    edited = client.model().session().generate(PROMPT, 3, ignore_eos=True, breakpoints=[(0, "mlp")],
                                               on_break=silence_the_mlp).tokens
    assert edited != plain
    session = client.model().session()
    for points, match in (([(1, "inside")], "one of attention, mlp, output"),
                          ([{"layer": 1}], r"layer indices or \(layer, at\) pairs")):
        with pytest.raises(SessionError, match=match):
            session.generate(PROMPT, 2, breakpoints=points, on_break=lambda hit: None)
    for raw in ([{"layer": 1, "at": 3}], [{"layer": True}], [{"layer": 1, "where": "mlp"}], "1"):
        with pytest.raises(SessionError, match="breakpoints must be"):
            client._loop.run(client._async.request(Op.GENERATE, session_id=session.id,
                                                   meta={"breakpoints": raw}, tensors=(torch.tensor(PROMPT),)))
    assert client.model().session().generate(PROMPT, 3, ignore_eos=True).tokens == plain


def test_pauses_inside_a_layer_are_refused_where_decode_runs_the_fused_layer():
    config = serving_config("random:tiny-llama", decode_attention="paged", fused_decode=True)
    runtime = build_runtime(config, get_plugin_manager(config))
    try:
        assert runtime.model.runner.fused_decode

        async def generate(points):
            session = runtime.kernel.open_session()
            return await runtime.model.generate(session, PROMPT, SamplingParams(max_new_tokens=2), points, None)

        with pytest.raises(SessionError, match="fused_decode = false or deterministic = true"):
            asyncio.run(generate([(1, "attention")]))
        assert len(asyncio.run(generate([1])).tokens) == 2  # after a layer: as ever
    finally:
        runtime.kernel.stop()


def test_bad_breakpoint_requests_get_clear_errors_and_the_server_keeps_serving(server, client):
    num_layers = client.info["num_layers"]
    session = client.model().session()
    for layers in ([num_layers], [-1]):
        with pytest.raises(SessionError, match="breakpoint layers must be in"):
            session.generate(PROMPT, 2, breakpoints=layers, on_break=lambda hit: None)
    with pytest.raises(BreakpointError, match="not paused"):
        client._loop.run(client._async.request(Op.RESUME, session_id=session.id))

    def bad_edits(hit):
        with pytest.raises(BreakpointError, match="does not match"):
            hit.set(torch.zeros(3))
        with pytest.raises(BreakpointError, match="does not match"):
            hit.add(torch.zeros(client.info["hidden_size"] + 1))
        with pytest.raises(BreakpointError, match="floating-point"):
            hit.add(torch.zeros(client.info["hidden_size"], dtype=torch.int64))

    # the refused edits left the activation as it was
    expected = local_tokens(server.config.model.name, PROMPT, 2)
    assert session.generate(PROMPT, 2, breakpoints=[1], on_break=bad_edits).tokens == expected
    assert client.model().session().generate(PROMPT, 2).tokens == expected


class HitRecorder:
    """Records ``djinn_breakpoint_hit`` calls."""

    def __init__(self) -> None:
        self.hits: list[tuple[int, int, str]] = []

    @hookimpl
    def djinn_breakpoint_hit(self, session, layer, step, phase):
        self.hits.append((layer, step, phase))


def test_no_hook_runs_per_layer_without_armed_breakpoints():
    config = serving_config("random:tiny-llama")
    plugins = get_plugin_manager(config)
    recorder = HitRecorder()
    plugins.pm.register(recorder, name="hit-recorder")
    calls: Counter[str] = Counter()
    undo = plugins.pm.add_hookcall_monitoring(lambda name, impls, kwargs: calls.update([name]), lambda *a: None)
    runtime = build_runtime(config, plugins)
    kernel, model = runtime.kernel, runtime.model
    try:
        num_layers, steps = model.runner.num_layers, 3

        async def generate(breakpoints):
            async def on_break(*_args):
                return None

            session = kernel.open_session()
            calls.clear()
            await model.generate(session, PROMPT, SamplingParams(max_new_tokens=steps), breakpoints, on_break)
            return Counter(calls)

        plain = asyncio.run(generate(()))
        assert recorder.hits == []
        assert all(n < num_layers for n in plain.values()), plain
        armed = asyncio.run(generate(range(num_layers)))
        assert armed["djinn_breakpoint_hit"] == num_layers * steps
        assert len(recorder.hits) == num_layers * steps
    finally:
        undo()
        kernel.stop()
