"""The layer-by-layer runner: token-exact against ``generate``, chunking, breakpoints, paged KV."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, Qwen2Config

from djinn.kernel.errors import BreakpointError, ModelError
from djinn.engine.models import LoadedModel, kv_bytes_per_token, load_model
from djinn.engine.runner import ModelRunner, greedy_generate, sample_generate
from djinn.engine.streaming import Streamer

TINY = ["random:tiny-llama", "random:tiny-mistral", "random:tiny-gpt2"]
#: 5 tokens, 14 (crosses tiny-mistral's 16-token window while decoding), 23 (beyond it at once)
PROMPT_LENGTHS = [5, 14, 23]


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    return {spec: load_model(spec) for spec in TINY}


def _prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(seed))  # [1, T]


def _reference(loaded: LoadedModel, ids: torch.Tensor, new_tokens: int = 16) -> list[int]:
    out = loaded.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, ids.shape[1] :].tolist()


def _stored(kv) -> torch.Tensor:
    """The session's KV in host layout ``[L, 2, capacity, H_kv, D]`` (what eviction writes)."""
    host = torch.empty(kv.host_shape(), dtype=kv.pool.dtype)
    kv.copy_out(host)
    return host


def _tiny_qwen2(attn_implementation: str = "sdpa") -> LoadedModel:
    config = Qwen2Config(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=512, use_sliding_window=True, sliding_window=8,
        max_window_layers=2, initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
    return LoadedModel(
        name="tiny-qwen2", model=model, config=model.config, family="qwen2",
        dtype=torch.float32, device=torch.device("cpu"),
    )


@pytest.mark.parametrize("length", PROMPT_LENGTHS)
@pytest.mark.parametrize("spec", TINY)
def test_greedy_tokens_equal_generate(models, spec: str, length: int) -> None:
    loaded = models[spec]
    runner = ModelRunner(loaded)
    ids = _prompt(length, seed=length)
    assert greedy_generate(runner, runner.new_kv(), ids, 16) == _reference(loaded, ids)


@pytest.mark.parametrize("spec", TINY)
def test_eager_attention_equals_generate(spec: str) -> None:
    loaded = load_model(spec, attn_implementation="eager")
    runner = ModelRunner(loaded)
    ids = _prompt(20, seed=1)
    assert greedy_generate(runner, runner.new_kv(), ids, 12) == _reference(loaded, ids, 12)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_qwen2_with_sliding_layers_equals_generate(attn_implementation: str) -> None:
    loaded = _tiny_qwen2(attn_implementation)
    runner = ModelRunner(loaded)
    for length in (4, 12):
        ids = _prompt(length, seed=length)
        assert greedy_generate(runner, runner.new_kv(), ids, 12) == _reference(loaded, ids, 12)


def test_the_sliding_window_changes_what_is_attended(models) -> None:
    # tiny-llama and tiny-mistral have the same weights (same seed and shapes); only the window differs
    llama, mistral = (ModelRunner(models[s]) for s in ("random:tiny-llama", "random:tiny-mistral"))
    short, long = _prompt(16), _prompt(24)
    assert torch.equal(
        llama.begin(llama.new_kv(), short).finish(), mistral.begin(mistral.new_kv(), short).finish()
    )
    assert not torch.allclose(
        llama.begin(llama.new_kv(), long).finish(), mistral.begin(mistral.new_kv(), long).finish()
    )


@pytest.mark.parametrize("split", [1, 9, 20])
@pytest.mark.parametrize("spec", TINY)
def test_a_prompt_in_two_chunks_equals_one_prefill(models, spec: str, split: int) -> None:
    runner = ModelRunner(models[spec])
    ids = _prompt(24, seed=2)
    whole = runner.new_kv()
    expected = runner.begin(whole, ids).finish()
    chunked = runner.new_kv()
    runner.begin(chunked, ids[:, :split]).finish()
    assert chunked.length == split
    logits = runner.begin(chunked, ids[:, split:]).finish()
    assert chunked.length == whole.length == 24
    torch.testing.assert_close(logits, expected)
    assert logits.argmax() == expected.argmax()
    torch.testing.assert_close(_stored(chunked)[:, :, :24], _stored(whole)[:, :, :24])


@pytest.mark.parametrize("spec", TINY)
def test_stopping_at_a_layer_then_continuing_is_bitwise_equal(models, spec: str) -> None:
    runner = ModelRunner(models[spec])
    ids = _prompt(7)
    kv_straight, kv_paused = runner.new_kv(), runner.new_kv()
    straight = [runner.begin(kv_straight, ids).finish()]
    cursor = runner.begin(kv_paused, ids)
    cursor.run(until=2)
    assert cursor.layer == 2 and cursor.num_layers == 4
    assert cursor.hidden.shape == (1, 7, 64)
    assert cursor.positions.tolist() == [list(range(7))]
    cursor.run(until=2)  # nothing to run
    cursor.run(until=3)
    paused = [cursor.finish()]
    for step in range(3):  # and during decode steps
        token = torch.tensor([[straight[-1].argmax().item()]])
        straight.append(runner.begin(kv_straight, token).finish())
        cursor = runner.begin(kv_paused, token)
        assert cursor.positions.tolist() == [[7 + step]]
        cursor.run(until=1)
        paused.append(cursor.finish())
    assert all(torch.equal(a, b) for a, b in zip(straight, paused))
    assert torch.equal(_stored(kv_straight)[:, :, :10], _stored(kv_paused)[:, :, :10])


def test_editing_the_hidden_state_changes_the_logits(models) -> None:
    runner = ModelRunner(models["random:tiny-llama"])
    ids = _prompt(6)
    expected = runner.begin(runner.new_kv(), ids).finish()

    cursor = runner.begin(runner.new_kv(), ids)
    cursor.run(until=2)
    cursor.hidden = cursor.hidden.clone()  # an unchanged copy resumes token-exact
    assert torch.equal(cursor.finish(), expected)

    cursor = runner.begin(runner.new_kv(), ids)
    cursor.run(until=2)
    with torch.inference_mode():
        cursor.hidden.mul_(3.0)
    scaled = cursor.finish()
    assert not torch.allclose(scaled, expected)

    cursor = runner.begin(runner.new_kv(), ids)
    cursor.run(until=2)
    cursor.hidden = cursor.hidden * 3.0
    assert torch.equal(cursor.finish(), scaled)


def test_bad_breakpoint_requests_are_refused(models) -> None:
    runner = ModelRunner(models["random:tiny-llama"])
    cursor = runner.begin(runner.new_kv(), _prompt(3))
    cursor.run(until=2)
    with pytest.raises(BreakpointError):
        cursor.run(until=1)  # backwards
    with pytest.raises(BreakpointError):
        cursor.run(until=5)
    with pytest.raises(BreakpointError, match="shape"):
        cursor.hidden = torch.zeros(1, 4, 64)
    cursor.finish()
    with pytest.raises(BreakpointError):
        cursor.finish()
    with pytest.raises(ValueError):
        runner.begin(runner.new_kv(), torch.zeros(1, 0, dtype=torch.long))


def test_kv_capacity_grows_in_blocks_and_keeps_results(models) -> None:
    loaded = models["random:tiny-mistral"]
    roomy_runner, small_runner = ModelRunner(loaded), ModelRunner(loaded, block_tokens=4)
    ids = _prompt(10)
    roomy = roomy_runner.new_kv(capacity_tokens=64)
    small = small_runner.new_kv()
    assert small.capacity == 0 and roomy.capacity == 64
    expected = greedy_generate(roomy_runner, roomy, ids, 12)
    assert greedy_generate(small_runner, small, ids, 12) == expected
    assert small.length == roomy.length == 21
    assert small.capacity == 24  # 21 tokens in blocks of 4
    assert small.nbytes == small_runner.kv_bytes(21) == 24 * small_runner.kv_bytes_per_token
    assert torch.equal(_stored(small)[:, :, :21], _stored(roomy)[:, :, :21])


def test_kv_bytes_and_pool_layout(models) -> None:
    loaded = models["random:tiny-gpt2"]
    runner = ModelRunner(loaded)
    kv = runner.new_kv(capacity_tokens=300)
    pool = runner.pool
    assert pool.tensor.shape[:2] == (4, 2) and pool.tensor.shape[3:] == (4, 16)  # [L, 2, slots, H_kv, D]
    assert not pool.tensor.is_inference()  # tiers may copy into it outside inference mode
    assert kv.length == 0 and kv.capacity == 320 and len(kv.blocks) == 5
    assert 0 not in kv.blocks  # the scratch block is never handed out
    assert kv.nbytes == runner.kv_bytes(300) == 320 * kv_bytes_per_token(loaded.config, loaded.dtype)
    assert runner.kv_bytes(0) == 0
    assert runner.kv_growth_bytes(kv, 320) == 0
    assert runner.kv_growth_bytes(kv, 321) == 64 * runner.kv_bytes_per_token
    kv.ensure_capacity(321)
    assert kv.capacity == 384
    assert list(kv.slot_runs()) == [(64, 0, 384)]  # lowest blocks first: one contiguous run
    used = pool.used_blocks
    kv.release()
    assert pool.used_blocks == used - 6 and not kv.resident


def test_an_evicted_session_holds_no_blocks(models) -> None:
    runner = ModelRunner(models["random:tiny-llama"])
    kv = runner.new_kv(capacity_tokens=8)
    runner.begin(kv, _prompt(5)).finish()
    host = _stored(kv)
    kv.release(keep_capacity=True)
    assert kv.capacity == 64 and kv.length == 5 and kv.blocks == []
    with pytest.raises(RuntimeError, match="evicted"):
        kv.ensure_capacity(10)
    kv.adopt(runner.pool.allocate(1))
    kv.copy_in(host)
    assert torch.equal(_stored(kv), host)


@pytest.mark.parametrize("staging_layers", [1, 3, 8])
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn])
def test_a_session_in_scattered_blocks_moves_out_and_back_exactly(models, monkeypatch, staging_layers, kv_dtype):
    """A move gathers all of a session's slots per group of layers, however its blocks lie in the
    pool; the host copy holds its tokens in order and comes back bit for bit into other blocks."""
    runner = ModelRunner(models["random:tiny-llama"], kv_dtype=kv_dtype)
    pool = runner.pool
    layer_bytes = 2 * pool.kv_heads * pool.head_dim * pool.dtype.itemsize
    filler, kv = runner.new_kv(), runner.new_kv()
    for _ in range(3):  # interleave the two sessions' blocks: kv's blocks are not consecutive
        filler.ensure_capacity(filler.capacity + 1)
        kv.ensure_capacity(kv.capacity + 1)
    assert len(list(kv.slot_runs())) == 3
    runner.begin(kv, _prompt(150)).finish()
    monkeypatch.setattr("djinn.engine.kvpool.MOVE_STAGING_BYTES", staging_layers * layer_bytes * kv.capacity)
    host = _stored(kv)
    slots = kv.slots(0, kv.capacity).cpu()
    as_bytes = (lambda t: t.view(torch.uint8)) if kv_dtype else (lambda t: t)
    assert torch.equal(as_bytes(host), as_bytes(pool.tensor[:, :, slots]))  # tokens in order, layer by layer
    kv.release(keep_capacity=True)
    filler.release()
    runner.new_kv(64)  # the blocks come back elsewhere
    kv.adopt(pool.allocate(3))
    kv.copy_in(host)
    assert torch.equal(as_bytes(_stored(kv)), as_bytes(host))
    assert torch.equal(as_bytes(pool.tensor[:, :, kv.slots(0, kv.capacity).cpu()]), as_bytes(host))


def test_runner_facts(models) -> None:
    loaded = models["random:tiny-gpt2"]
    runner = ModelRunner(loaded, device="cpu")
    assert (runner.num_layers, runner.hidden_size, runner.vocab_size) == (4, 64, 512)
    assert runner.ids_tensor([3, 4]).tolist() == [[3, 4]] and runner.ids_tensor([3]).dtype == torch.long
    # GPT-2's head is tied to its token embedding: counted once
    assert runner.device_weight_bytes() == sum(p.numel() * 4 for p in loaded.model.parameters())


def test_moving_the_kv_out_and_back_between_decode_steps_is_exact(models) -> None:
    runner = ModelRunner(models["random:tiny-gpt2"])
    ids = _prompt(9)
    kv_kept, kv_moved = runner.new_kv(), runner.new_kv()
    token = torch.tensor([[runner.begin(kv_kept, ids).finish().argmax().item()]])
    runner.begin(kv_moved, ids).finish()

    def move(kv) -> None:
        """What eviction and restore do: out to host, blocks freed and poisoned, back into new blocks."""
        host = _stored(kv)
        old = kv.release(keep_capacity=True)
        runner.pool.tensor[:, :, old[0] * 64 : (old[-1] + 1) * 64] = float("nan")
        runner.new_kv(64)  # someone else takes the freed block
        kv.adopt(runner.pool.allocate(len(old)))
        kv.copy_in(host)

    move(kv_moved)
    assert torch.equal(runner.begin(kv_kept, token).finish(), runner.begin(kv_moved, token).finish())

    # also while a pass is paused at a breakpoint
    cursor_kept, cursor_moved = runner.begin(kv_kept, token), runner.begin(kv_moved, token)
    cursor_moved.run(until=2)
    move(kv_moved)
    assert torch.equal(cursor_kept.finish(), cursor_moved.finish())


class RecordingStreamer(Streamer):
    """Records every call the runner makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def prepare(
        self, layers: Sequence[torch.nn.Module], device: torch.device, budget_bytes: int | None
    ) -> None:
        self.calls.append(("prepare", (len(layers), device.type, budget_bytes)))

    def begin_pass(self) -> None:
        self.calls.append(("begin_pass", None))

    def before_layer(self, index: int) -> None:
        self.calls.append(("before_layer", index))

    def after_layer(self, index: int) -> None:
        self.calls.append(("after_layer", index))

    def end_pass(self) -> None:
        self.calls.append(("end_pass", None))


def test_the_streamer_sees_every_layer_in_order(models) -> None:
    streamer = RecordingStreamer()
    runner = ModelRunner(models["random:tiny-llama"], streamer=streamer, budget_bytes=1 << 20)
    one_pass = (
        [("begin_pass", None)]
        + [call for i in range(4) for call in (("before_layer", i), ("after_layer", i))]
        + [("end_pass", None)]
    )
    kv = runner.new_kv()
    runner.begin(kv, _prompt(5)).finish()
    cursor = runner.begin(kv, torch.tensor([[1]]))  # a decode step, paused twice
    cursor.run(until=0)
    cursor.run(until=1)
    cursor.run(until=3)
    cursor.finish()
    assert streamer.calls == [("prepare", (4, "cpu", 1 << 20))] + one_pass + one_pass


def test_sampling_is_seeded(models) -> None:
    runner = ModelRunner(models["random:tiny-llama"])
    ids = _prompt(5)
    first = sample_generate(runner, runner.new_kv(), ids, 10, temperature=0.8, top_k=20, seed=1)
    assert first == sample_generate(runner, runner.new_kv(), ids, 10, temperature=0.8, top_k=20, seed=1)
    assert all(0 <= t < 512 for t in first) and len(first) == 10
    greedy = greedy_generate(runner, runner.new_kv(), ids, 10)
    assert sample_generate(runner, runner.new_kv(), ids, 10, top_k=1, seed=5) == greedy
    assert sample_generate(runner, runner.new_kv(), ids, 10, temperature=0.0) == greedy
    with pytest.raises(ValueError):
        sample_generate(runner, runner.new_kv(), ids, 1, temperature=-1.0)
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0])
    picks = {runner.token_picker(1.0, 2, seed)(logits) for seed in range(40)}
    assert picks == {1, 2}  # only the top 2 are ever drawn, and both are


def test_gpt2_context_limit_is_an_error(models) -> None:
    runner = ModelRunner(models["random:tiny-gpt2"])
    with pytest.raises(ModelError, match="1024 positions"):
        runner.begin(runner.new_kv(), torch.zeros(1, 1025, dtype=torch.long))


def test_unsupported_families_are_refused(tmp_path) -> None:
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        vocab_size=100, is_decoder=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.family == "bert"
    with pytest.raises(ModelError, match="llama, mistral, qwen2, gpt2"):
        ModelRunner(loaded)


def test_the_pool_grows_only_up_to_what_32_bit_offsets_index(models, monkeypatch) -> None:
    from djinn.engine import kvpool
    from djinn.kernel.errors import AdmissionError

    # tiny-llama: 2 KV heads x head dim 16 = 32 elements per token; 15 blocks of 64 tokens fit
    monkeypatch.setattr(kvpool, "MAX_LAYER_VIEW_ELEMENTS", 15 * 64 * 32 + 63)
    runner = ModelRunner(models["random:tiny-llama"])
    pool = runner.pool
    assert pool.max_blocks == 15
    kv = runner.new_kv()  # the scratch block and this one
    runner.begin(kv, _prompt(5)).finish()
    stored = _stored(kv)
    held = pool.allocate(8)
    assert pool.num_blocks == 10
    held += pool.allocate(2)  # doubling would make 20 blocks: the pool stops at 15
    assert pool.num_blocks == 15 and pool.free_blocks == 3
    assert torch.equal(_stored(kv), stored)  # growing kept the session's KV
    with pytest.raises(AdmissionError, match="at most 15 blocks"):
        pool.allocate(4)
    assert pool.free_blocks == 3  # the refused request took nothing
    pool.free(held)
    assert len(pool.allocate(13)) == 13 and pool.num_blocks == 15


def test_prefill_attention_is_checked_and_varlen_is_refused_where_it_cannot_run(models) -> None:
    loaded = models["random:tiny-llama"]
    assert ModelRunner(loaded).prefill_attention == "masked"  # float32 on the CPU: no flash kernel
    with pytest.raises(ModelError, match="must be one of varlen, masked"):
        ModelRunner(loaded, prefill_attention="dense")
    with pytest.raises(ModelError, match="varlen prefill attention needs CUDA"):
        ModelRunner(loaded, prefill_attention="varlen")
