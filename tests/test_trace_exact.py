"""A breakpoint request is the same computation as the request without breakpoints.

A trace stopping at every layer, with no edit, gives bit-identical logits (so tokens and
log-probabilities) to a lone plain generate through the batch engine, for every supported family
and both decode attentions: at the runner (``begin_decode`` against ``decode``), in the service,
and through a real server. An edit at a decode step's breakpoint reaches that step's computation.
On the CPU the one-session pass (``begin``) and the batched decode step already differ in the last
bits, so these tests tell the two computations apart here too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from djinn.client import connect
from djinn.engine import service as service_module
from djinn.engine.batch import BatchEngine, EngineRequest, run_to_completion
from djinn.engine.models import LoadedModel, load_model
from djinn.engine.runner import DECODE_ATTENTION, ModelRunner
from djinn.engine.service import SamplingParams
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import build_runtime
from tests.serving import serving_config, start_server, tiny_qwen2

QWEN2 = "tiny-qwen2"
SPECS = ["random:tiny-llama", "random:tiny-mistral", "random:tiny-gpt2", QWEN2]
#: past tiny-mistral's 16-token window and tiny-qwen2's 8, and across a 64-token block while decoding
PROMPT = [(7 * i + 3) % 512 for i in range(58)]
NEW_TOKENS = 10
#: a prompt of several chunks: the trace must prefill it in the engine's chunks
CHUNK_TOKENS = 24
LOGPROBS = 3


def load(spec: str) -> LoadedModel:
    return tiny_qwen2(QWEN2) if spec == QWEN2 else load_model(spec)


@contextmanager
def served_model(spec: str) -> Iterator[None]:
    """While open, a service configured with ``spec`` loads it (``tiny-qwen2`` has no ``random:`` shape)."""
    with pytest.MonkeyPatch.context() as patch:
        if spec == QWEN2:
            patch.setattr(service_module, "load_model", lambda *args, **kwargs: tiny_qwen2(QWEN2))
        yield


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    return {spec: load(spec) for spec in SPECS}


# ---------------------------------------------------------------------------- runner


@pytest.mark.parametrize("attention", DECODE_ATTENTION)
@pytest.mark.parametrize("spec", SPECS)
def test_a_decode_cursor_stopping_at_every_layer_is_the_batched_decode_step(models, spec, attention):
    runner = ModelRunner(models[spec], decode_attention=attention)
    plain, traced = runner.new_kv(), runner.new_kv()
    for kv in (plain, traced):
        # room for every token first: a masked step attends over the pool's high-water slots, so
        # a pool grown by one session's step between the two would give the other a longer span,
        # and the CPU's SDPA sums a longer span's (masked) keys in other blocks: other low bits
        kv.ensure_capacity(len(PROMPT) + NEW_TOKENS)
    token = int(runner.prefill([plain], [PROMPT])[0].argmax())
    assert int(runner.prefill([traced], [PROMPT])[0].argmax()) == token
    for _ in range(NEW_TOKENS):
        expected = runner.decode([plain], [token])[0]
        cursor = runner.begin_decode(traced, token)
        for layer in range(runner.num_layers):
            cursor.run(layer + 1)
            assert tuple(cursor.hidden.shape) == (1, 1, runner.hidden_size)
        logits = cursor.finish()
        assert logits.shape == expected.shape == (runner.vocab_size,)
        assert torch.equal(logits, expected)
        token = int(expected.argmax())
    assert plain.length == traced.length == len(PROMPT) + NEW_TOKENS
    layers = runner.pool.tensor  # [L, 2, slots, H_kv, D]: the KV each pass wrote is the same too
    assert torch.equal(layers[:, :, plain.slots(0, plain.length)], layers[:, :, traced.slots(0, traced.length)])


def test_an_edit_at_a_decode_cursor_reaches_its_logits_and_the_kv(models):
    runner = ModelRunner(models["random:tiny-llama"])
    plain, edited = runner.new_kv(), runner.new_kv()
    token = int(runner.prefill([plain], [PROMPT])[0].argmax())
    runner.prefill([edited], [PROMPT])
    expected = runner.decode([plain], [token])[0]
    cursor = runner.begin_decode(edited, token)
    cursor.run(2)
    with torch.inference_mode():
        cursor.hidden.mul_(0.25)
    assert not torch.equal(cursor.finish(), expected)
    last = runner.pool.tensor[2:, :, edited.slots(len(PROMPT), len(PROMPT) + 1)]  # layers after the edit
    assert not torch.equal(last, runner.pool.tensor[2:, :, plain.slots(len(PROMPT), len(PROMPT) + 1)])


# ---------------------------------------------------------------------------- service


def _config(spec: str, attention: str):
    return serving_config(spec, decode_attention=attention, prefill_chunk_tokens=CHUNK_TOKENS)


@contextmanager
def runtime(spec: str, attention: str):
    config = _config(spec, attention)
    with served_model(spec):
        rt = build_runtime(config, get_plugin_manager(config))
    try:
        yield rt
    finally:
        rt.kernel.stop()


def _generate(rt, params: SamplingParams, breakpoints=(), on_break=None):
    async def go():
        session = rt.kernel.open_session()
        return await rt.model.generate(session, PROMPT, params, breakpoints, on_break)

    return asyncio.run(go())


@pytest.mark.parametrize("attention", DECODE_ATTENTION)
@pytest.mark.parametrize("spec", SPECS)
def test_a_trace_without_edits_equals_plain_generate_in_the_service(spec, attention):
    with runtime(spec, attention) as rt:
        num_layers = rt.model.runner.num_layers
        params = SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=LOGPROBS, ignore_eos=True)
        hits: list[tuple[str, int, int, str, tuple[int, ...]]] = []

        async def on_break(session, cursor, layer, step, phase, at):
            hits.append((phase, step, layer, at, tuple(cursor.hidden.shape)))

        # every layer's output, and inside each layer where the decode steps run the model's own layers
        sites = ("output",) if rt.model.runner.fused_decode else ("attention", "mlp", "output")
        plain = _generate(rt, params)
        traced = _generate(rt, params, [(layer, at) for layer in range(num_layers) for at in sites], on_break)
        # the batch engine, driven alone, computes what the served plain request did
        runner = rt.model.runner
        request = EngineRequest(runner.new_kv(), PROMPT, NEW_TOKENS, logprobs=LOGPROBS)
        run_to_completion(BatchEngine(runner, prefill_chunk_tokens=CHUNK_TOKENS), [request])
    assert traced.tokens == plain.tokens == request.tokens
    assert traced.logprobs == plain.logprobs == request.token_logprobs  # bit-identical logits
    hidden = rt.model.runner.hidden_size
    chunks = [len(PROMPT[i : i + CHUNK_TOKENS]) for i in range(0, len(PROMPT), CHUNK_TOKENS)]
    expected = [("prefill", 0, layer, at, (1, n, hidden)) for n in chunks for layer in range(num_layers) for at in sites]
    expected += [("decode", step, layer, at, (1, 1, hidden))
                 for step in range(1, NEW_TOKENS) for layer in range(num_layers) for at in sites]
    assert hits == expected


@pytest.mark.parametrize("spec", ["random:tiny-llama", "random:tiny-gpt2"])
def test_an_edit_in_a_decode_step_changes_the_tokens_after_it(spec):
    edit_step = 3
    with runtime(spec, "masked") as rt:
        async def on_break(session, cursor, layer, step, phase, at):
            if phase == "decode" and step == edit_step:
                with torch.inference_mode():
                    cursor.hidden.neg_()

        params = SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=0, ignore_eos=True)
        plain = _generate(rt, params)
        edited = _generate(rt, params, [1], on_break)
    assert edited.tokens[:edit_step] == plain.tokens[:edit_step]
    assert edited.logprobs[:edit_step] == plain.logprobs[:edit_step]
    assert edited.tokens[edit_step] != plain.tokens[edit_step]


# ---------------------------------------------------------------------------- server


@pytest.mark.parametrize("attention", DECODE_ATTENTION)
@pytest.mark.parametrize("spec", SPECS)
def test_a_served_trace_without_edits_equals_a_served_generate(spec, attention):
    with served_model(spec):
        server = start_server(_config(spec, attention))
    try:
        assert server.model.loaded.name == spec
        with connect(server.url("tcp")) as client:
            num_layers = client.info["num_layers"]
            trace = client.model().session().trace(
                PROMPT, NEW_TOKENS, ignore_eos=True, logprobs=LOGPROBS, breakpoints=list(range(num_layers)),
            )
            hits = [(hit.phase, hit.step) for hit in trace]
            plain = client.model().session().generate(PROMPT, NEW_TOKENS, ignore_eos=True, logprobs=LOGPROBS)
    finally:
        server.stop()
    chunks = -(-len(PROMPT) // CHUNK_TOKENS)
    assert hits == [("prefill", 0)] * (chunks * num_layers) + [
        ("decode", step) for step in range(1, NEW_TOKENS) for _ in range(num_layers)
    ]
    assert trace.result.tokens == plain.tokens
    assert trace.result.logprobs == plain.logprobs
