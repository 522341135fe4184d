"""Deterministic mode: a session's values do not depend on what shares its passes.

With ``deterministic`` the runner computes every row with fixed shapes (``djinn.engine.invariant``),
so a session's logits are bitwise the same alone or packed and decoded beside others, prefilled
in one pass or in chunks, moved out of the pool and back into other blocks, and traced with a
breakpoint at every layer. Default mode makes no such promise (its kernels follow the batch).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from djinn.engine.invariant import BatchInvariantMode, flex_kernel_options
from djinn.engine.models import LoadedModel, load_model
from djinn.engine.runner import ModelRunner
from djinn.engine.service import SamplingParams
from djinn.kernel.errors import ModelError
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import build_runtime
from eval.bench_deterministic import move, prefill
from tests.serving import serving_config, tiny_qwen2

QWEN2 = "tiny-qwen2"
SPECS = ["random:tiny-llama", "random:tiny-mistral", "random:tiny-gpt2", QWEN2]
#: lengths past tiny-mistral's 16-token window and tiny-qwen2's 8, across 64-token blocks
PROMPTS = [[(7 * i + 5 * j + 3) % 500 + 1 for j in range(11 + 29 * i)] for i in range(5)]
STEPS = 8
CHUNK = 16


def load(spec: str, dtype: str) -> LoadedModel:
    if spec == QWEN2:
        loaded = tiny_qwen2(QWEN2)
        if dtype == "bfloat16":
            loaded.model.to(torch.bfloat16)
        return loaded
    return load_model(spec, dtype=dtype)


def run(runner: ModelRunner, together: bool, chunk: int | None = None, move_at: int | None = None):
    """Each prompt's logits at every step: all sessions sharing passes, or each alone."""
    groups = [list(range(len(PROMPTS)))] if together else [[i] for i in range(len(PROMPTS))]
    steps: list[list[torch.Tensor | None]] = [[None] * len(PROMPTS) for _ in range(STEPS)]
    for group in groups:
        kvs = [runner.new_kv() for _ in group]
        logits = prefill(runner, kvs, [PROMPTS[i] for i in group], chunk)
        for step in range(STEPS):
            for k, i in enumerate(group):
                steps[step][i] = logits[k]
            if step == move_at:
                kvs = [move(runner, kv) for kv in kvs]
            logits = runner.decode(kvs, [int(row.argmax()) for row in logits])
        for kv in kvs:
            kv.release()
    return [torch.stack(rows) for rows in steps]


def bitwise(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("spec", SPECS)
def test_logits_do_not_depend_on_the_batch_the_chunking_or_a_move(spec, dtype):
    runner = ModelRunner(load(spec, dtype), deterministic=True)
    alone = run(runner, together=False)
    assert bitwise(run(runner, together=True), alone)
    assert bitwise(run(runner, together=True, chunk=CHUNK), alone)
    assert bitwise(run(runner, together=False, move_at=3), alone)


@pytest.mark.parametrize("spec", SPECS)
def test_a_decode_cursor_at_every_layer_is_the_deterministic_step(spec):
    runner = ModelRunner(load(spec, "float32"), deterministic=True)
    plain, traced, other = runner.new_kv(), runner.new_kv(), runner.new_kv()
    token = int(runner.prefill([plain, other], [PROMPTS[1], PROMPTS[3]])[0].argmax())
    cursor = runner.begin(traced, runner.ids_tensor(PROMPTS[1]))
    for layer in range(runner.num_layers):
        cursor.run(layer + 1)
    assert int(cursor.finish().argmax()) == token
    for _ in range(STEPS):
        expected = runner.decode([other, plain], [7, token])[1]  # beside another session
        cursor = runner.begin_decode(traced, token)
        for layer in range(runner.num_layers):
            cursor.run(layer + 1)
        assert torch.equal(cursor.finish(), expected)
        token = int(expected.argmax())


def test_deterministic_mode_refuses_an_fp8_gemm_it_cannot_make_batch_invariant():
    a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    one = torch.ones((), dtype=torch.float32)
    with BatchInvariantMode(), pytest.raises(ModelError, match="fp8_matmul = 'dequantize'"):
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def test_deterministic_mode_refuses_a_decode_attention_or_the_fused_layer():
    loaded = load_model("random:tiny-llama")
    with pytest.raises(ModelError, match="deterministic"):
        ModelRunner(loaded, deterministic=True, decode_attention="masked")
    with pytest.raises(ModelError, match="deterministic"):
        ModelRunner(loaded, deterministic=True, fused_decode=True)


def test_the_fixed_cuda_attention_kernel_takes_whole_blocks_of_keys():
    assert flex_kernel_options(64) == {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": 16, "BLOCK_N": 64,
                                       "num_warps": 4, "num_stages": 2}
    assert [flex_kernel_options(bt)["BLOCK_N"] for bt in (16, 32, 48, 128, 256)] == [16, 32, 16, 64, 64]
    with pytest.raises(ModelError, match="multiple of 16"):
        flex_kernel_options(8)
    # off CUDA the tiled attention runs, and the layers carry no kernel options
    runner = ModelRunner(load_model("random:tiny-llama"), deterministic=True)
    assert runner.decode_attention == "invariant" and not runner.fused_decode
    assert runner.layers[0].self_attn.config.djinn_flex_options is None


def test_a_served_session_gets_the_same_tokens_alone_beside_others_and_traced():
    config = serving_config(deterministic=True, prefill_chunk_tokens=24)
    rt = build_runtime(config, get_plugin_manager(config))
    params = SamplingParams(max_new_tokens=STEPS, logprobs=2, ignore_eos=True)
    try:
        async def generate(prompts, breakpoints=()):
            sessions = [rt.kernel.open_session() for _ in prompts]
            return await asyncio.gather(*(rt.model.generate(s, p, params, breakpoints, None)
                                          for s, p in zip(sessions, prompts)))

        alone = [asyncio.run(generate([p]))[0] for p in PROMPTS]
        together = asyncio.run(generate(PROMPTS))
        points = [(layer, at) for layer in range(rt.model.runner.num_layers) for at in ("attention", "mlp", "output")]
        traced = asyncio.run(generate(PROMPTS[:2], breakpoints=points))
    finally:
        rt.kernel.stop()
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.logprobs for r in together] == [r.logprobs for r in alone]  # bit-identical logits
    assert [r.logprobs for r in traced] == [r.logprobs for r in alone[:2]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_session_alone_equals_it_beside_127_others_in_bfloat16():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=8, vocab_size=8192, initializer_range=0.05)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to("cuda", torch.bfloat16).eval()
    loaded = LoadedModel(name="llama-mid", model=model, config=model.config, family="llama",
                         dtype=torch.bfloat16, device=torch.device("cuda"))
    runner = ModelRunner(loaded, deterministic=True)
    assert runner.decode_attention == "paged"  # the fixed flex kernel, graphs captured
    prompts = [[(13 * i + 7 * j) % 8000 + 1 for j in range(40 + 9 * i)] for i in range(128)]
    # sized once, as the server does: a pool that grows recompiles the attention kernel for its new length
    runner.pool.grow(sum(-(-(len(p) + STEPS) // runner.pool.block_tokens) + 1 for p in prompts) + 16)

    def decode(indices, chunk=None, move_at=None):
        kvs = [runner.new_kv() for _ in indices]
        logits = prefill(runner, kvs, [prompts[i] for i in indices], chunk)
        out = []
        for step in range(STEPS):
            out.append(logits[:4].clone())  # a replayed graph writes its next logits over these
            if step == move_at:
                kvs = [move(runner, kv) for kv in kvs]
            logits = runner.decode(kvs, [int(row.argmax()) for row in logits])
        for kv in kvs:
            kv.release()
        return out

    alone = [torch.cat(rows) for rows in zip(*(decode([i]) for i in range(4)))]
    assert bitwise(decode(list(range(128))), alone)
    assert bitwise(decode(list(range(32)), chunk=CHUNK), alone)
    assert bitwise(decode(list(range(4)), move_at=3), alone)
