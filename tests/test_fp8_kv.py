"""fp8 KV (``[memory] kv_dtype = "fp8_e4m3"``): the pool stores keys and values as one byte each.

The pool holds the model's keys and values rounded to e4m3, every pass reads them back from it
(so a token attends to the rounded keys of its own chunk too), the bytes survive eviction and
restore unchanged, and logits stay near those of a full-precision pool (within the tolerance
below; these tiny random models' keys and values sit near e4m3's smallest normal numbers, where
its rounding is coarsest).
"""

from __future__ import annotations

import attrs
import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from djinn.client import connect
from djinn.config import parse_config
from djinn.engine.families import pool_attention
from djinn.engine.models import load_model
from djinn.engine.runner import DECODE_ATTENTION, KV_FP8_DTYPES, ModelRunner
from djinn.kernel.errors import ConfigError, ModelError
from djinn.kernel.strategies import Residency
from tests.serving import serving_config
from tests.test_kernel import serve_with, wait_for
from tests.test_tier_disk import _device_kv, _tier_bytes

FP8 = KV_FP8_DTYPES[0]
PROMPT = [(7 * i + 3) % 500 for i in range(70)]  # past a 64-token block
#: largest relative error of the logits (norm of the difference over the norm) against a
#: full-precision pool, over a prefill and 6 decode steps; measured up to 0.24 on these models
LOGIT_TOLERANCE = 0.35


@pytest.mark.parametrize("spec", ["random:tiny-llama", "random:tiny-mistral", "random:tiny-gpt2"])
def test_the_pool_holds_the_rounded_keys_in_a_quarter_of_the_float32_bytes(spec):
    loaded = load_model(spec)
    full, fp8 = ModelRunner(loaded), ModelRunner(loaded, kv_dtype=FP8)
    assert fp8.pool.tensor.dtype == FP8 and fp8.kv_bytes_per_token * 4 == full.kv_bytes_per_token
    a, b = full.new_kv(), fp8.new_kv()
    full.prefill([a], [PROMPT])
    fp8.prefill([b], [PROMPT])
    # layer 0's keys and values come from the embeddings alone: the same in both, then rounded
    expected = full.pool.tensor[0][:, a.slots(0, len(PROMPT))].to(FP8)
    stored = fp8.pool.tensor[0][:, b.slots(0, len(PROMPT))]
    assert torch.equal(stored.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("attention", DECODE_ATTENTION)
@pytest.mark.parametrize("spec", ["random:tiny-llama", "random:tiny-mistral", "random:tiny-gpt2"])
def test_logits_stay_near_a_full_precision_pool(spec, attention):
    loaded = load_model(spec)
    full, fp8 = ModelRunner(loaded, decode_attention=attention), ModelRunner(loaded, decode_attention=attention, kv_dtype=FP8)
    a, b = full.new_kv(), fp8.new_kv()
    pairs = [(full.prefill([a], [PROMPT])[0], fp8.prefill([b], [PROMPT])[0])]
    for _ in range(6):
        token = int(pairs[-1][0].argmax())
        pairs.append((full.decode([a], [token])[0], fp8.decode([b], [token])[0]))
    errors = [float((x - y).norm() / x.norm()) for x, y in pairs]
    assert 0 < max(errors) < LOGIT_TOLERANCE
    # a breakpoint's one-session pass reads the same rounded keys as the batched step
    c = fp8.new_kv()
    assert torch.equal(fp8.begin(c, fp8.ids_tensor(PROMPT)).finish(), pairs[0][1])


def test_deterministic_mode_over_an_fp8_pool_is_still_batch_invariant():
    runner = ModelRunner(load_model("random:tiny-llama"), deterministic=True, kv_dtype=FP8)
    prompts = [PROMPT[: 20 + 13 * i] for i in range(4)]

    def decode(indices):
        kvs = [runner.new_kv() for _ in indices]
        logits = runner.prefill(kvs, [prompts[i] for i in indices])
        out = [logits]
        for _ in range(4):
            logits = runner.decode(kvs, [int(row.argmax()) for row in logits])
            out.append(logits)
        return out

    alone = [torch.cat(rows) for rows in zip(*(decode([i]) for i in range(4)))]
    assert all(torch.equal(a, b) for a, b in zip(decode(range(4)), alone))


def test_an_fp8_session_leaves_and_comes_back_bitwise_and_continues_as_if_it_never_left():
    config = serving_config(settings={"semantic": {"write_back": False}})
    config = attrs.evolve(config, memory=attrs.evolve(config.memory, kv_dtype="fp8_e4m3"))
    server = serve_with(config, ["semantic", "tcp"])
    kernel = server.kernel
    try:
        assert server.model.runner.pool.tensor.dtype == FP8
        with connect(server.url("tcp")) as client:
            # the reference: a session of the same server that never leaves (the same device,
            # dtype and kernels as the one that does)
            stays = client.model().session()
            first = stays.generate(PROMPT, max_new_tokens=6).tokens
            second = stays.generate([5, 6], max_new_tokens=6).tokens
            stays.close()
            session = client.model().session()
            assert session.generate(PROMPT, max_new_tokens=6).tokens == first
            on_gpu = _device_kv(server, session.id)
            session.signal_phase("IO_WAIT", expected_s=60)
            assert wait_for(lambda: server.call(lambda: kernel.get(session.id).info.residency) is Residency.EVICTED)
            _tier, in_host = _tier_bytes(server, session.id)
            assert torch.equal(in_host[: on_gpu.numel()], on_gpu)
            session.signal_phase("COMPUTE")
            assert wait_for(lambda: server.call(lambda: kernel.get(session.id).info.residency) is Residency.RESIDENT)
            assert torch.equal(_device_kv(server, session.id), on_gpu)
            assert session.generate([5, 6], max_new_tokens=6).tokens == second
    finally:
        server.stop()


def test_a_bfloat16_query_attends_an_fp8_pool_in_float16_and_returns_bfloat16():
    torch.manual_seed(0)
    query = torch.randn(1, 4, 1, 16, dtype=torch.bfloat16)
    keys, values = (torch.randn(1, 4, 64, 16).to(FP8) for _ in range(2))
    seen = []

    def attend(q, k, v, **kwargs):
        seen.append(q.dtype)
        return flex_attention(q, k, v, **kwargs)

    out = pool_attention(attend, query, keys, values, scale=0.25)
    reference = flex_attention(query.float(), keys.float(), values.float(), scale=0.25)
    assert seen == [torch.float16] and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=2e-2, rtol=1e-2)
    # over a pool in the query's own dtype, or a float32 query, the query goes in as it is
    pool_attention(attend, query, keys.bfloat16(), values.bfloat16())
    pool_attention(attend, query.float(), keys, values)
    assert seen[1:] == [torch.bfloat16, torch.float32]


def test_unknown_kv_dtypes_are_refused_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match="fp8_e4m3"):
        parse_config({"memory": {"kv_dtype": "int4"}}, source="test")
    with pytest.raises(ModelError, match="float8_e4m3fn"):
        ModelRunner(load_model("random:tiny-llama"), kv_dtype=torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled paged kernel and CUDA graphs need CUDA")
def test_on_cuda_graph_steps_over_an_fp8_pool_stay_near_a_bfloat16_pool():
    loaded = load_model("random:tiny-llama", dtype="bfloat16", device="cuda")
    full, fp8 = ModelRunner(loaded, device="cuda"), ModelRunner(loaded, device="cuda", kv_dtype=FP8)
    assert fp8.decode_attention == "paged" and fp8.pool.tensor.dtype == FP8
    a, b = full.new_kv(), fp8.new_kv()
    pairs = [(full.prefill([a], [PROMPT])[0].float(), fp8.prefill([b], [PROMPT])[0].float())]
    for _ in range(6):
        token = int(pairs[-1][0].argmax())
        pairs.append((full.decode([a], [token])[0].float(), fp8.decode([b], [token])[0].float()))
    errors = [float((x - y).norm() / x.norm()) for x, y in pairs]
    assert 0 < max(errors) < LOGIT_TOLERANCE, errors
    assert fp8.captures > 0  # the decode steps replayed captured graphs over the fp8 pool
