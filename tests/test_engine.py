"""Continuous batching: batched decoding equals one-session decoding, however sessions come and go."""

from __future__ import annotations

import pytest
import torch

from djinn.client import connect
from djinn.engine.batch import BatchEngine, EngineRequest, run_to_completion
from djinn.kernel.errors import ModelError
from djinn.engine.models import LoadedModel, load_model
from djinn.engine.kvpool import SCRATCH_BLOCK
from djinn.engine.runner import (
    BATCH_BUCKETS, DECODE_ATTENTION, PREFILL_GRAPH_CHUNKS, ModelRunner, _PrefillInputs, batch_bucket, greedy_generate,
    sample_generate, slot_bucket,
)
from tests.serving import serving_config, start_server, tiny_qwen2

TINY = ["random:tiny-llama", "random:tiny-mistral", "random:tiny-gpt2"]
#: lengths on both sides of tiny-mistral's 16-token window and of a 64-token block
PROMPT_LENGTHS = [3, 9, 15, 30, 70]


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    loaded = {spec: load_model(spec) for spec in TINY}
    loaded["tiny-qwen2"] = tiny_qwen2()
    return loaded


def _prompts(count: int = len(PROMPT_LENGTHS), seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in range(count)]
    return [torch.randint(0, 512, (n,), generator=generator).tolist() for n in lengths]


def _alone(runner: ModelRunner, prompt: list[int], new_tokens: int) -> list[int]:
    return greedy_generate(runner, runner.new_kv(), runner.ids_tensor(prompt), new_tokens)


@pytest.mark.parametrize("attention", DECODE_ATTENTION)
@pytest.mark.parametrize("spec", [*TINY, "tiny-qwen2"])
def test_batched_greedy_tokens_equal_single_session_tokens(models, spec: str, attention: str) -> None:
    runner = ModelRunner(models[spec], decode_attention=attention)
    prompts = _prompts()
    expected = [_alone(runner, p, 20) for p in prompts]
    engine = BatchEngine(runner)
    requests = [EngineRequest(runner.new_kv(), p, 20) for p in prompts]
    run_to_completion(engine, requests)
    assert [r.tokens for r in requests] == expected
    assert all(r.error is None for r in requests)
    assert engine.batch_rows / engine.steps > 3  # they really decoded together


def test_sessions_joining_and_leaving_mid_generation_keep_their_outputs(models) -> None:
    runner = ModelRunner(models["random:tiny-mistral"])
    prompts = _prompts(8, seed=1)
    lengths = [5, 25, 12, 1, 30, 8, 17, 22]
    expected = [_alone(runner, p, n) for p, n in zip(prompts, lengths)]
    engine = BatchEngine(runner, prefill_chunk_tokens=16)
    requests = [EngineRequest(runner.new_kv(), p, n) for p, n in zip(prompts, lengths)]
    for request in requests:  # one joins every other step, while earlier ones are leaving
        engine.submit(request)
        engine.step()
        engine.step()
    while not all(r.done for r in requests):
        engine.step()
    assert [r.tokens for r in requests] == expected


def test_a_second_turn_continues_the_same_kv(models) -> None:
    runner = ModelRunner(models["random:tiny-llama"])
    first, second = _prompts(2, seed=2)
    kv = runner.new_kv()
    turn1 = greedy_generate(runner, kv, runner.ids_tensor(first), 6)
    turn2 = greedy_generate(runner, kv, runner.ids_tensor([turn1[-1], *second]), 6)

    engine = BatchEngine(runner)
    batched_kv, other = runner.new_kv(), runner.new_kv()
    a = EngineRequest(batched_kv, first, 6)
    noise = EngineRequest(other, second, 30)
    run_to_completion(engine, [a, noise])
    b = EngineRequest(batched_kv, [a.tokens[-1], *second], 6)
    run_to_completion(engine, [b, EngineRequest(other, [noise.tokens[-1]], 10)])
    assert (a.tokens, b.tokens) == (turn1, turn2)
    assert batched_kv.length == kv.length


@pytest.mark.parametrize("chunk", [1, 5, 64, 4096])
def test_prefill_chunking_does_not_change_outputs(models, chunk: int) -> None:
    runner = ModelRunner(models["random:tiny-gpt2"])
    prompts = _prompts(seed=3)
    expected = [_alone(runner, p, 8) for p in prompts]
    requests = [EngineRequest(runner.new_kv(), p, 8) for p in prompts]
    run_to_completion(BatchEngine(runner, prefill_chunk_tokens=chunk), requests)
    assert [r.tokens for r in requests] == expected


def test_more_sessions_than_max_batch_all_finish_exactly(models) -> None:
    runner = ModelRunner(models["random:tiny-llama"])
    prompts = _prompts(7, seed=4)
    expected = [_alone(runner, p, 9) for p in prompts]
    engine = BatchEngine(runner, max_batch=3)
    requests = [EngineRequest(runner.new_kv(), p, 9) for p in prompts]
    run_to_completion(engine, requests)
    assert [r.tokens for r in requests] == expected
    assert engine.batch_rows / engine.steps <= 3


def test_sampled_rows_follow_their_own_seeds(models) -> None:
    runner = ModelRunner(models["random:tiny-llama"])
    prompts = _prompts(3, seed=5)
    expected = [
        sample_generate(runner, runner.new_kv(), runner.ids_tensor(p), 10, temperature=0.8, top_k=20, seed=i)
        for i, p in enumerate(prompts)
    ]
    requests = [
        EngineRequest(runner.new_kv(), p, 10, picker=runner.token_picker(0.8, 20, i))
        for i, p in enumerate(prompts)
    ]
    greedy = EngineRequest(runner.new_kv(), prompts[0], 10)
    run_to_completion(BatchEngine(runner), [*requests, greedy])
    assert [r.tokens for r in requests] == expected
    assert greedy.tokens == _alone(runner, prompts[0], 10)


def test_a_cancelled_request_leaves_without_touching_its_kv_again(models) -> None:
    runner = ModelRunner(models["random:tiny-llama"])
    prompts = _prompts(2, seed=6)
    engine = BatchEngine(runner)
    keep = EngineRequest(runner.new_kv(), prompts[0], 12)
    drop = EngineRequest(runner.new_kv(), prompts[1], 12)
    for request in (keep, drop):
        engine.submit(request)
    engine.step()
    engine.step()
    drop.cancelled = True
    length = drop.kv.length
    ended = engine.step()
    assert drop in ended and drop.done and drop.kv.length == length
    drop.kv.release()  # what closing the session does; the engine must not use the blocks again
    while not keep.done:
        engine.step()
    assert keep.tokens == _alone(runner, prompts[0], 12)


def test_a_failing_request_fails_alone(models) -> None:
    runner = ModelRunner(models["random:tiny-gpt2"])  # 1024 positions
    engine = BatchEngine(runner)
    good = EngineRequest(runner.new_kv(), [1, 2, 3], 5)
    too_long = EngineRequest(runner.new_kv(), [1] * 1100, 5)
    run_to_completion(engine, [too_long, good])
    assert too_long.error is not None and "positions" in str(too_long.error)
    assert good.error is None and good.tokens == _alone(runner, [1, 2, 3], 5)


def test_a_picker_that_raises_fails_only_its_request(models) -> None:
    """A sampling failure (here NaN probabilities from a vanishing temperature) ends that request
    with its error, in prefill or in decode; the step goes on for every other request."""
    runner = ModelRunner(models["random:tiny-llama"])
    prompts = _prompts(3, seed=7)
    calls = 0

    def fails_on_fourth(logits: torch.Tensor) -> int:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("sampling failed")
        return int(logits.argmax())

    at_prefill = EngineRequest(runner.new_kv(), prompts[0], 8, picker=runner.token_picker(1e-300, 0, 0))
    at_decode = EngineRequest(runner.new_kv(), prompts[1], 8, picker=fails_on_fourth)
    greedy = EngineRequest(runner.new_kv(), prompts[2], 8)
    requests = [at_prefill, at_decode, greedy]
    engine = BatchEngine(runner)
    for request in requests:
        engine.submit(request)
    ended: list[EngineRequest] = []
    while engine.has_work():
        ended += engine.step()  # no step raises
    assert sorted(map(id, ended)) == sorted(map(id, requests))  # each ended exactly once
    assert at_prefill.done and at_prefill.tokens == [] and "nan" in str(at_prefill.error)
    assert at_decode.done and len(at_decode.tokens) == 3 and "sampling failed" in str(at_decode.error)
    assert greedy.error is None and greedy.tokens == _alone(runner, prompts[2], 8)


def test_a_request_reaching_the_models_positions_fails_alone_in_decode(models) -> None:
    runner = ModelRunner(models["random:tiny-gpt2"])  # 1024 positions
    prompts = _prompts(2, seed=8)
    long_prompt = (prompts[0] * 400)[:1020]
    too_long = EngineRequest(runner.new_kv(), long_prompt, 10)  # passes 1024 after 4 new tokens
    good = EngineRequest(runner.new_kv(), prompts[1], 12)
    run_to_completion(BatchEngine(runner), [too_long, good])
    assert "positions" in str(too_long.error) and len(too_long.tokens) == 1024 - 1020 + 1
    assert good.error is None and good.tokens == _alone(runner, prompts[1], 12)


def test_decode_refuses_a_session_twice_and_mismatched_rows(models) -> None:
    runner = ModelRunner(models["random:tiny-llama"])
    kv = runner.new_kv()
    runner.begin(kv, runner.ids_tensor([1, 2])).finish()
    with pytest.raises(ValueError, match="once"):
        runner.decode([kv, kv], [3, 4])
    with pytest.raises(ValueError, match="one token per session"):
        runner.decode([kv], [3, 4])


@pytest.mark.parametrize("spec", [*TINY, "tiny-qwen2"])
def test_packed_prefill_equals_one_pass_per_session(models, spec: str) -> None:
    """Chunks of several sessions in one pass, some after a context of their own (past the
    sliding windows too), give each session the logits and the KV of a pass of its own."""
    runner = ModelRunner(models[spec])
    prompts = _prompts(5, seed=11)
    packed, alone = ([runner.new_kv() for _ in prompts] for _ in range(2))
    for kvs in (packed, alone):
        for kv, context in zip(kvs[:3], prompts[2:]):
            runner.prefill([kv], [context])
    logits = runner.prefill(packed, prompts)  # [5, vocab]
    expected = torch.stack([runner.prefill([kv], [p])[0] for kv, p in zip(alone, prompts)])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert [kv.length for kv in packed] == [kv.length for kv in alone]
    tokens = expected.argmax(-1).tolist()
    torch.testing.assert_close(runner.decode(packed, tokens), runner.decode(alone, tokens), rtol=1e-4, atol=1e-4)


def test_a_bad_request_in_a_packed_prefill_fails_alone(models) -> None:
    runner = ModelRunner(models["random:tiny-gpt2"])
    limit = runner.max_positions
    good = [EngineRequest(runner.new_kv(), p, 4) for p in _prompts(3, seed=2)]
    too_long = EngineRequest(runner.new_kv(), [1] * (limit + 1), 4)
    engine = BatchEngine(runner, prefill_chunk_tokens=4 * limit)
    run_to_completion(engine, [good[0], too_long, *good[1:]])
    assert isinstance(too_long.error, ModelError)
    assert all(r.error is None for r in good)
    assert [r.tokens for r in good] == [_alone(runner, r.prompt, 4) for r in good]


def test_batch_buckets_are_few_and_slot_spans_pad_little() -> None:
    assert [batch_bucket(n) for n in (1, 3, 9, 33, 128, 129, 600)] == [1, 4, 16, 64, 128, 256, 768]
    for slots in (1, 100, 1100, 5000, 40000, 130000):
        padded = slot_bucket(slots)
        assert slots <= padded < slots + max(256, 0.05 * slots)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_captured_decode_steps_equal_eager_steps_on_cuda() -> None:
    loaded = load_model("random:tiny-llama", device="cuda")
    captured = ModelRunner(loaded, device="cuda")
    eager = ModelRunner(loaded, device="cuda", cuda_graphs=False)
    prompts = _prompts(6, seed=7)
    results = []
    for runner in (captured, eager):
        requests = [EngineRequest(runner.new_kv(), p, 24) for p in prompts]
        run_to_completion(BatchEngine(runner), requests)
        assert all(r.error is None for r in requests)
        results.append([r.tokens for r in requests])
    assert captured.captures > 0 and eager.captures == 0
    assert results[0] == results[1]
    assert results[0] == [_alone(eager, p, 24) for p in prompts]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_steps_are_captured_again_after_the_pool_grows_on_cuda() -> None:
    """Growing the pool drops the graphs (they hold its old address); new captures work and agree."""
    loaded = load_model("random:tiny-llama", device="cuda")
    runner = ModelRunner(loaded, device="cuda")
    prompts = _prompts(4, seed=9)
    first = [EngineRequest(runner.new_kv(), p, 12) for p in prompts]
    run_to_completion(BatchEngine(runner), first)
    captured, generation = runner.captures, runner.pool.generation
    runner.pool.grow(runner.pool.num_blocks * 2)
    assert runner.pool.generation != generation
    second = [EngineRequest(runner.new_kv(), p, 12) for p in prompts]
    run_to_completion(BatchEngine(runner), second)
    assert runner.captures > captured > 0
    assert [r.tokens for r in second] == [r.tokens for r in first]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_warm_up_captures_every_bucket_so_serving_captures_nothing_on_cuda() -> None:
    loaded = load_model("random:tiny-llama", device="cuda")
    runner = ModelRunner(loaded, device="cuda")
    runner.pool.grow(256)  # room for every session below: the pool never moves, so no graph is dropped
    runner.pool.fixed = True
    runner.warm_up(max_batch=16)
    assert runner.captures == len([b for b in BATCH_BUCKETS if b <= 16]) == 3
    requests = [EngineRequest(runner.new_kv(), p, 10) for p in _prompts(11, seed=5)]
    run_to_completion(BatchEngine(runner), requests)
    assert all(r.error is None for r in requests) and runner.captures == 3
    assert [r.tokens for r in requests] == [_alone(ModelRunner(loaded, device="cuda", cuda_graphs=False), p, 10)
                                            for p in _prompts(11, seed=5)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled paged kernel needs a CUDA device")
@pytest.mark.parametrize("spec", ["random:tiny-llama", "random:tiny-mistral"])
def test_paged_decode_on_cuda_equals_masked_decode(spec: str) -> None:
    """The compiled flex_attention kernel over block tables picks the tokens the masked SDPA step
    picks, with sliding windows too (float32, so no rounding ties)."""
    loaded = load_model(spec, device="cuda")
    results = []
    for attention in ("paged", "masked"):
        runner = ModelRunner(loaded, device="cuda", decode_attention=attention)
        requests = [EngineRequest(runner.new_kv(), p, 24) for p in _prompts(6, seed=3)]
        run_to_completion(BatchEngine(runner), requests)
        assert all(r.error is None for r in requests)
        results.append([r.tokens for r in requests])
    assert results[0] == results[1]


@pytest.mark.parametrize("spec", ["random:tiny-llama", "random:tiny-mistral", "tiny-qwen2"])
def test_the_fused_decode_layer_computes_what_the_models_layers_compute(models, spec: str) -> None:
    """Paged decode steps through ``Family.decode_layer`` give the logits of the same steps
    through the model's own layers (float32; compiled on CUDA, run as written here)."""
    prompts = _prompts(4, seed=7)
    logits = []
    for fused in (True, False):
        runner = ModelRunner(models[spec], decode_attention="paged", fused_decode=fused)
        assert runner.fused_decode is fused
        kvs = [runner.new_kv() for _ in prompts]
        runner.prefill(kvs, prompts)
        steps = [runner.decode(kvs, [p[-1] for p in prompts]) for _ in range(3)]
        logits.append(torch.stack(steps))  # [3, B, vocab]
        for kv in kvs:
            kv.release()
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def _prefill_results(runner: ModelRunner, first: list[list[int]], second: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a packed pass of first chunks, a packed pass of chunks after them and a
    one-session chunk, and every stored key and value (float32)."""
    kvs = [runner.new_kv() for _ in first]
    logits = [runner.prefill(kvs, first), runner.prefill(kvs, second), runner.prefill(kvs[:1], [second[2]])]
    stored = torch.cat([runner.pool.tensor[:, :, kv.slots(0, kv.length)].float() for kv in kvs], dim=2)
    for kv in kvs:
        kv.release()
    return torch.cat(logits).float(), stored


@pytest.mark.parametrize("spec", ["random:tiny-llama", "random:tiny-mistral", "tiny-qwen2"])
def test_the_fused_prefill_layer_computes_what_the_models_layers_compute(models, spec: str) -> None:
    """Prefill passes through ``Family.prefill_parts`` (first chunks, chunks after a context,
    across the sliding window, packed and alone) give the logits and the stored KV of the same
    passes through the model's own layers (float32; compiled on CUDA, run as written here)."""
    first, second = _prompts(3, seed=11), _prompts(3, seed=12)
    results = []
    for fused in (True, False):
        runner = ModelRunner(models[spec], fused_prefill=fused)
        assert runner.fused_prefill is fused
        results.append(_prefill_results(runner, first, second))
    (got, got_kv), (want, want_kv) = results
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_kv, want_kv, rtol=1e-4, atol=1e-4)


def test_a_pass_paused_inside_the_fused_prefill_layer_resumes_to_the_same_bits(models) -> None:
    """A pause at each site of a fused prefill layer, unedited, changes nothing; an edit there
    changes the pass as the same edit in the model's own layer does."""
    prompt = _prompts(1, seed=13)[0] * 3
    results = {}
    for fused in (True, False):
        runner = ModelRunner(models["random:tiny-llama"], fused_prefill=fused)
        kv = runner.new_kv()
        plain = runner.begin(kv, runner.ids_tensor(prompt)).finish()
        kv.length = 0
        cursor = runner.begin(kv, runner.ids_tensor(prompt))
        cursor.run_to(1, "attention")
        cursor.run_to(1, "mlp")
        assert torch.equal(cursor.finish(), plain)
        kv.length = 0
        cursor = runner.begin(kv, runner.ids_tensor(prompt))
        cursor.run_to(1, "mlp")
        cursor.hidden = cursor.hidden * 0.5
        results[fused] = (plain, cursor.finish())
        kv.release()
    assert not torch.equal(results[True][0], results[True][1])
    torch.testing.assert_close(results[True], results[False], rtol=1e-4, atol=1e-4)


def test_a_padded_prefill_pass_gives_each_chunk_its_own_queries_and_keys(models) -> None:
    """The inputs of a pass padded to a captured shape: the chunks' tokens at their positions,
    written to their sessions' slots; each chunk's keys its session's context and chunk; the
    padding one chunk of its own over the scratch slot; the unused chunks empty."""
    runner = ModelRunner(models["random:tiny-llama"])
    first, second = runner.new_kv(), runner.new_kv()
    runner.prefill([first], [list(range(70))])
    chunks = [[5, 6, 7], [8] * 10]
    starts, ends = [70, 0], [73, 10]
    second.ensure_capacity(10)
    first.ensure_capacity(73)
    inputs = _PrefillInputs.empty(16, 1024, runner.pool.block_tokens, runner.device)
    runner._fill_prefill(inputs, [first, second], chunks, starts, ends)
    scratch = SCRATCH_BLOCK * runner.pool.block_tokens
    assert inputs.ids.tolist() == [5, 6, 7] + [8] * 10 + [0] * 3
    assert inputs.positions.tolist() == [70, 71, 72, *range(10), 0, 0, 0]
    assert inputs.write.tolist() == first.slots(70, 73).tolist() + second.slots(0, 10).tolist() + [scratch] * 3
    assert inputs.read.tolist() == first.slots(0, 73).tolist() + second.slots(0, 10).tolist() + [scratch] * (1024 - 83)
    assert inputs.cu_q.tolist() == [0, 3, 13, 16] + [16] * (PREFILL_GRAPH_CHUNKS - 2)
    assert inputs.cu_k.tolist() == [0, 73, 83, 1024] + [1024] * (PREFILL_GRAPH_CHUNKS - 2)
    assert inputs.last.tolist() == [2, 12] + [0] * (PREFILL_GRAPH_CHUNKS - 2)
    first.release()
    second.release()


def test_a_decode_steps_inputs_are_expanded_on_the_device_from_one_packed_copy(models) -> None:
    """A step's host writes one packed tensor; on the device each row gets its token, position,
    write slot and block table, each owned block its row and rank, padding rows the scratch
    block, and entries a larger earlier step left past the rows' blocks are ignored."""
    runner = ModelRunner(models["random:tiny-llama"])
    bt = runner.pool.block_tokens
    long_, short, other = runner.new_kv(), runner.new_kv(), runner.new_kv()
    for kv, capacity, length in [(long_, 4 * bt, 2 * bt + 5), (short, bt, 3), (other, 3 * bt, 2 * bt)]:
        kv.ensure_capacity(capacity)
        kv.length = length
    inputs = runner._step_inputs(4, runner.pool.num_blocks * bt)
    inputs.pack([other, long_, short], [11, 12, 13])  # an earlier step: more blocks
    inputs.pack([long_, short], [7, 8])
    inputs.expand()
    scratch = SCRATCH_BLOCK * bt
    width = inputs.blocks.shape[1]
    assert inputs.ids.tolist() == [7, 8, 0, 0]
    assert inputs.positions.tolist() == [2 * bt + 5, 3, 0, 0]
    assert inputs.write.tolist() == [long_.blocks[2] * bt + 5, short.blocks[0] * bt + 3, scratch, scratch]
    assert inputs.pad.tolist() == [False, False, True, True]
    assert inputs.block_count.tolist() == [3, 1, 1, 1]
    assert inputs.blocks.tolist() == [
        long_.blocks[:3] + [SCRATCH_BLOCK] * (width - 3), short.blocks[:1] + [SCRATCH_BLOCK] * (width - 1),
        [SCRATCH_BLOCK] * width, [SCRATCH_BLOCK] * width,
    ]
    owner = [-1] * width
    rank = [0] * width
    for row, kv in enumerate([long_, short]):
        for i, block in enumerate(kv.blocks[: kv.length // bt + 1]):
            owner[block], rank[block] = row, i
    assert inputs.block_owner.tolist() == owner
    assert [r for r, o in zip(inputs.block_rank.tolist(), owner) if o >= 0] == [r for r, o in zip(rank, owner) if o >= 0]
    for kv in (long_, short, other):
        kv.release()


def test_the_fused_prefill_layer_is_refused_where_it_does_not_apply(models) -> None:
    with pytest.raises(ModelError, match="fused prefill"):
        ModelRunner(models["random:tiny-gpt2"], fused_prefill=True)
    with pytest.raises(ModelError, match="fused prefill"):
        ModelRunner(models["random:tiny-llama"], fused_prefill=True, deterministic=True)
    assert ModelRunner(models["random:tiny-llama"]).fused_prefill is False  # on by default on CUDA only


def test_fused_decode_is_refused_where_it_does_not_apply(models) -> None:
    with pytest.raises(ModelError, match="fused decode"):
        ModelRunner(models["random:tiny-gpt2"], decode_attention="paged", fused_decode=True)
    with pytest.raises(ModelError, match="fused decode"):
        ModelRunner(models["random:tiny-llama"], decode_attention="masked", fused_decode=True)
    assert ModelRunner(models["random:tiny-gpt2"], decode_attention="paged").fused_decode is False


def test_an_unknown_decode_attention_is_refused(models) -> None:
    with pytest.raises(ModelError, match="decode_attention"):
        ModelRunner(models["random:tiny-llama"], decode_attention="dense")


@pytest.mark.parametrize("attention", DECODE_ATTENTION)
def test_the_server_setting_chooses_the_decode_attention(attention: str) -> None:
    """``[server] decode_attention`` reaches the runner, and both serve the same greedy tokens."""
    server = start_server(serving_config("random:tiny-llama", decode_attention=attention))
    try:
        assert server.model.runner.decode_attention == attention
        with connect(server.url("tcp")) as client:
            tokens = [client.model().session().generate([3, 1, 4, 1, 5], 6).tokens for _ in range(2)]
        # random weights are drawn where they load, and CUDA's generator draws other numbers
        loaded = load_model("random:tiny-llama", device=server.model.device.type)
        assert tokens[0] == tokens[1] == _alone(ModelRunner(loaded), [3, 1, 4, 1, 5], 6)
    finally:
        server.stop()


def test_prefill_warm_up_runs_every_size_and_leaves_the_pool_as_it_was() -> None:
    runner = ModelRunner(load_model("random:tiny-llama"), block_tokens=16)
    runner.pool.grow(64)
    free = runner.pool.free_blocks
    # sizes 16, 32, 64 and 100 (the cap): four passes each
    assert runner.warm_up_prefill(100) == 16
    assert runner.pool.free_blocks == free and runner.pool.used_blocks == 0
    # a pool too small for a size skips it rather than failing
    small = ModelRunner(load_model("random:tiny-llama"), block_tokens=16)
    small.pool.grow(14)  # 13 free blocks: size 64 needs 13, size 128 needs 25
    small.pool.fixed = True
    assert small.warm_up_prefill(128) == 4 * 3  # 16, 32 and 64 fit; 128 does not
    assert small.pool.used_blocks == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="variable-length flash attention needs CUDA")
@pytest.mark.parametrize("spec", ["random:tiny-llama", "random:tiny-mistral", "random:tiny-gpt2"])
def test_varlen_prefill_on_cuda_computes_what_the_masked_prefill_computes(spec: str) -> None:
    """Packed chunks, first chunks and chunks after a context (across the sliding window too)
    give the logits and the stored keys of the dense-mask prefill, within bf16 rounding."""
    loaded = load_model(spec, dtype="bfloat16", device="cuda")
    varlen = ModelRunner(loaded, device="cuda")
    masked = ModelRunner(loaded, device="cuda", prefill_attention="masked")
    assert (varlen.prefill_attention, masked.prefill_attention) == ("varlen", "masked")
    first, second = _prompts(3, seed=11), _prompts(3, seed=12)
    (got, got_kv), (want, want_kv) = (_prefill_results(runner, first, second) for runner in (varlen, masked))
    assert float((got - want).norm() / want.norm()) < 0.03
    assert float((got_kv - want_kv).norm() / want_kv.norm()) < 0.03


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled fused prefill layer needs a CUDA device")
@pytest.mark.parametrize("spec", ["random:tiny-llama", "random:tiny-mistral"])
def test_the_compiled_fused_prefill_layer_on_cuda_computes_what_the_models_layers_compute(spec: str) -> None:
    """Compiled (dynamic token count), the fused prefill layer gives the logits and stored KV of
    the model's own layers within bf16 rounding, and after the warm-up passes of every size
    nothing more is compiled, one-token chunks included."""
    from djinn.engine.service import compiled_graphs

    loaded = load_model(spec, dtype="bfloat16", device="cuda")
    fused = ModelRunner(loaded, device="cuda")
    plain = ModelRunner(loaded, device="cuda", fused_prefill=False)
    assert fused.fused_prefill and not plain.fused_prefill
    fused.warm_up(max_batch=4, prefill_tokens=256)
    compiled = compiled_graphs()
    first, second = _prompts(3, seed=11), _prompts(3, seed=12)
    (got, got_kv), (want, want_kv) = (_prefill_results(runner, first, second) for runner in (fused, plain))
    assert float((got - want).norm() / want.norm()) < 0.03
    assert float((got_kv - want_kv).norm() / want_kv.norm()) < 0.03
    kv = fused.new_kv()
    for chunk in ([5], [1, 2, 3], list(range(100)), [7]):
        fused.prefill([kv], [chunk])
    kv.release()
    assert compiled_graphs() == compiled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captured prefill passes need a CUDA device")
@pytest.mark.parametrize("spec", ["random:tiny-llama", "random:tiny-mistral"])
def test_captured_prefill_passes_on_cuda_equal_their_eager_passes(spec: str) -> None:
    """Short passes replayed from the graphs captured at warm-up give the bits of the same padded
    pass run eagerly (a cursor's), the logits of unpadded passes within bf16 rounding, and no
    capture or compile happens after the warm-up."""
    from djinn.engine.service import compiled_graphs

    loaded = load_model(spec, dtype="bfloat16", device="cuda")
    graphed = ModelRunner(loaded, device="cuda")
    plain = ModelRunner(loaded, device="cuda", cuda_graphs=False)
    assert graphed.graphed_prefill and not plain.graphed_prefill
    graphed.pool.grow(64)
    graphed.warm_up(max_batch=4, prefill_tokens=256)
    captures, compiled = graphed.captures, compiled_graphs()
    assert captures >= 8
    first, second = _prompts(3, seed=11), _prompts(3, seed=12)
    (got, got_kv), (want, want_kv) = (_prefill_results(runner, first, second) for runner in (graphed, plain))
    assert float((got - want).norm() / want.norm()) < 0.03
    assert float((got_kv - want_kv).norm() / want_kv.norm()) < 0.03
    prompt = _prompts(1, seed=14)[0] * 4
    kv = graphed.new_kv()
    replayed = graphed.prefill([kv], [prompt])[0]
    kv.length = 0
    cursor = graphed.begin(kv, graphed.ids_tensor(prompt))
    cursor.run_to(1, "attention")
    assert torch.equal(cursor.finish(), replayed)
    for chunk in ([5], [1, 2, 3], list(range(100)), [7]):
        graphed.prefill([kv], [chunk])
    kv.release()
    assert (graphed.captures, compiled_graphs()) == (captures, compiled)


def _mixed_runner(loaded: LoadedModel) -> ModelRunner:
    """A runner whose steps prefill and decode in one pass (off CUDA only when asked for)."""
    runner = ModelRunner(loaded, decode_attention="paged", fused_decode=True, fused_prefill=True, mixed_steps=True)
    assert runner.mixed_steps
    return runner


def _sessions_after(runner: ModelRunner, prompts: list[list[int]]) -> list:
    kvs = [runner.new_kv() for _ in prompts]
    for kv, prompt in zip(kvs, prompts):
        if prompt:
            runner.prefill([kv], [prompt])
    return kvs


@pytest.mark.parametrize("spec", ["random:tiny-llama", "random:tiny-mistral", "tiny-qwen2"])
def test_a_mixed_step_computes_what_a_prefill_pass_and_a_decode_step_compute(models, spec: str) -> None:
    """One pass of prefill chunks (a first one, one after a context) and decode rows (on both sides
    of the sliding window and of a block) gives both passes' logits, commits both, and leaves the
    KV the next step reads as the two passes apart leave it (float32)."""
    runner = _mixed_runner(models[spec])
    contexts = _prompts(5, seed=21)  # 3, 9, 15, 30 and 70 tokens
    chunks = [contexts[4][:40], contexts[1]]
    tokens = [5, 6, 7]
    sessions = []
    for _ in range(2):
        prefilling = _sessions_after(runner, [[], contexts[3]])
        decoding = _sessions_after(runner, [contexts[0], contexts[2], contexts[4]])
        sessions.append((prefilling, decoding))
    (mixed_prefill, mixed_decode), (apart_prefill, apart_decode) = sessions
    got = runner.mixed_step(mixed_prefill, chunks, mixed_decode, tokens)
    assert got is not None
    want = runner.prefill(apart_prefill, chunks), runner.decode(apart_decode, tokens)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert [kv.length for kv in mixed_prefill + mixed_decode] == [kv.length for kv in apart_prefill + apart_decode]
    following = [1, 2, 3, 4, 5]
    torch.testing.assert_close(runner.decode(mixed_prefill + mixed_decode, following),
                               runner.decode(apart_prefill + apart_decode, following), rtol=1e-4, atol=1e-4)


def test_a_mixed_step_without_a_padded_shape_is_left_to_the_passes_apart(models) -> None:
    runner = _mixed_runner(models["random:tiny-llama"])
    decoding = _sessions_after(runner, [[1, 2, 3]])
    many = [runner.new_kv() for _ in range(PREFILL_GRAPH_CHUNKS + 1)]
    assert runner.mixed_step(many, [[1]] * len(many), decoding, [4]) is None
    assert [kv.length for kv in many] == [0] * len(many) and decoding[0].length == 3  # nothing committed
    with pytest.raises(ValueError, match="only once"):
        runner.mixed_step(decoding, [[1]], decoding, [4])
    off = ModelRunner(models["random:tiny-llama"], decode_attention="paged", fused_decode=True, fused_prefill=True,
                      mixed_steps=False)
    assert off.mixed_step(many[:1], [[1]], decoding, [4]) is None


def test_mixed_steps_are_refused_without_both_fused_layers(models) -> None:
    with pytest.raises(ModelError, match="mixed steps"):
        ModelRunner(models["random:tiny-llama"], mixed_steps=True)  # neither fused layer on the CPU by default
    with pytest.raises(ModelError, match="mixed steps"):
        ModelRunner(models["random:tiny-gpt2"], mixed_steps=True)
    assert ModelRunner(models["random:tiny-llama"]).mixed_steps is False


def test_the_engine_runs_prompts_and_decode_rows_in_mixed_steps_and_keeps_each_sessions_tokens(models) -> None:
    runner = _mixed_runner(models["random:tiny-mistral"])
    prompts = _prompts(8, seed=22)
    lengths = [5, 25, 12, 1, 30, 8, 17, 22]
    expected = [_alone(runner, p, n) for p, n in zip(prompts, lengths)]
    engine = BatchEngine(runner, prefill_chunk_tokens=16)
    engine.step_log = []
    requests = [EngineRequest(runner.new_kv(), p, n) for p, n in zip(prompts, lengths)]
    for request in requests[:3]:
        engine.submit(request)
    for _ in range(4):
        engine.step()
    for request in requests[3:]:  # they arrive while the first ones decode
        engine.submit(request)
    while not all(r.done for r in requests):
        engine.step()
    assert [r.tokens for r in requests] == expected
    mixed = [s for s in engine.step_log if s.mixed]
    assert mixed and all(s.prefill_tokens and s.decode_rows for s in mixed)
    assert engine.prefill_tokens == sum(map(len, prompts))


def test_a_request_that_fails_in_a_mixed_step_fails_alone(models) -> None:
    """A chunk whose pass raises (a token past the vocabulary) fails its mixed step; the step runs
    again as the passes apart, where that request fails alone and the others keep their tokens."""
    runner = _mixed_runner(models["random:tiny-llama"])
    good = [EngineRequest(runner.new_kv(), p, 6) for p in _prompts(3, seed=23)]
    bad = EngineRequest(runner.new_kv(), [1, runner.vocab_size + 5], 4)
    engine = BatchEngine(runner)
    engine.step_log = []
    for arriving in ([good[0]], [bad, good[1]], [good[2]]):  # each while the ones before decode
        for request in arriving:
            engine.submit(request)
        engine.step()
    while not all(r.done for r in good):
        engine.step()
    assert bad.done and bad.error is not None and bad.kv.length == 0
    assert all(r.error is None for r in good)
    assert [r.tokens for r in good] == [_alone(runner, r.prompt, 6) for r in good]
    assert [s.mixed for s in engine.step_log[:3]] == [False, False, True]  # the failed one ran apart
