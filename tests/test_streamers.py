"""The ``resident`` and ``ringbuffer`` streamers, driven layer by layer as the model runner does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from djinn.config import parse_config
from djinn.kernel.errors import ConfigError, ModelError
from djinn.kernel.plugins import StrategyRegistry
from djinn.plugins.streamers import resident, ringbuffer
from djinn.plugins.streamers.resident import ResidentSettings, ResidentStreamer, module_nbytes
from djinn.plugins.streamers.ringbuffer import ALIGN, RingbufferSettings, RingbufferStreamer

MIB = 1 << 20
CPU = torch.device("cpu")


def mib(nbytes: float) -> float:
    """``nbytes`` as the ``ring_mb`` that yields exactly that many bytes."""
    return (nbytes + 0.5) / MIB


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


class LlamaStack:
    """Decoder layers of a tiny Llama, with the model's rotary embedding to drive them."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.layers = list(model.model.layers)
        self.rotary = model.model.rotary_emb

    def forward_kwargs(self, hidden: torch.Tensor) -> dict:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # [1, T]
        return {
            "attention_mask": None,
            "position_ids": positions,
            "position_embeddings": self.rotary(hidden, positions),  # cos, sin: [1, T, D]
        }


def pair_of_stacks() -> tuple[LlamaStack, LlamaStack]:
    """Two stacks with identical weights: one for the streamer under test, one for resident."""
    model = tiny_llama()
    return LlamaStack(model), LlamaStack(copy.deepcopy(model))


def run_layers(streamer, layers, hidden, kwargs, indices, *, begin=True, end=True, inside=None):
    """Run ``layers[i]`` for ``i`` in ``indices`` between the streamer's calls, as the runner does."""
    with torch.inference_mode():
        if begin:
            streamer.begin_pass()
        for i in indices:
            streamer.before_layer(i)
            if inside is not None:
                inside(i)
            hidden = layers[i](hidden, **kwargs)
            streamer.after_layer(i)
        if end:
            streamer.end_pass()
    return hidden


def full_pass(streamer, stack: LlamaStack, hidden: torch.Tensor, inside=None) -> torch.Tensor:
    kwargs = stack.forward_kwargs(hidden)
    return run_layers(streamer, stack.layers, hidden, kwargs, range(len(stack.layers)), inside=inside)


def prepared(stack: LlamaStack, budget: int | None = None, **settings) -> RingbufferStreamer:
    streamer = RingbufferStreamer(RingbufferSettings(**settings))
    streamer.prepare(stack.layers, CPU, budget)
    return streamer


def prepared_resident(stack: LlamaStack) -> ResidentStreamer:
    streamer = ResidentStreamer(ResidentSettings())
    streamer.prepare(stack.layers, CPU, None)
    return streamer


LAYER_BYTES = module_nbytes(tiny_llama().model.layers[0])


def inputs(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    return [torch.randn(1, 3 + 2 * k, 64, generator=generator) for k in range(count)]  # [B, T, H]


# --------------------------------------------------------------------------- ringbuffer == resident


@pytest.mark.parametrize(
    "ring_layers, prefetch, reuse",
    [(1, 2, True), (2.5, 2, True), (3.5, 1, True), (3.5, 2, False), (2, 0, True), (3, 8, False)],
)
def test_streamed_through_a_small_ring_matches_resident_bitwise(ring_layers, prefetch, reuse):
    mine, reference = pair_of_stacks()
    streamer = prepared(
        mine, ring_mb=mib(ring_layers * LAYER_BYTES), chunk_mb=mib(10_000),
        prefetch_layers=prefetch, reuse=reuse,
    )
    baseline = prepared_resident(reference)
    assert LAYER_BYTES <= streamer.device_bytes() < 4 * LAYER_BYTES
    streamed = 0
    for hidden in inputs(3):
        out = full_pass(streamer, mine, hidden)
        expected = full_pass(baseline, reference, hidden)
        assert torch.equal(out, expected)
        assert [p.layer for p in streamer.placements] == [0, 1, 2, 3]
        streamed += sum(p.nbytes for p in streamer.placements if p.copied)
    stats = streamer.stats()
    assert stats.passes == 3
    assert stats.bytes_streamed == streamed > 0
    assert stats.bytes_streamed + stats.bytes_reused == 3 * 4 * LAYER_BYTES
    assert stats.copy_seconds > 0 and stats.stall_seconds == stats.copy_seconds


def test_reuse_skips_only_layers_still_in_their_place():
    mine, reference = pair_of_stacks()
    # places: 0 at 0, 1 at 1x, 2 at 2x, 3 back at 0 (overwriting layer 0's place)
    streamer = prepared(mine, ring_mb=mib(3.5 * LAYER_BYTES))
    baseline = prepared_resident(reference)
    copied_per_pass = []
    for hidden in inputs(3):
        assert torch.equal(full_pass(streamer, mine, hidden), full_pass(baseline, reference, hidden))
        copied_per_pass.append([p.copied for p in streamer.placements])
    assert copied_per_pass[0] == [True] * 4
    assert copied_per_pass[1] == copied_per_pass[2] == [True, False, False, True]
    assert streamer.stats().bytes_reused == 4 * LAYER_BYTES


def test_parameters_live_in_the_arena_and_visit_the_ring_only_during_their_layer():
    mine, _ = pair_of_stacks()
    streamer = prepared(mine, ring_mb=mib(2.5 * LAYER_BYTES), chunk_mb=mib(4096))
    ring, arena = streamer.ring, streamer.arena
    ring_ptr, arena_ptr = ring.data_ptr(), arena.data_ptr()

    def within(tensor: torch.Tensor, flat: torch.Tensor) -> bool:
        start = tensor.data_ptr() - flat.data_ptr()
        return 0 <= start and start + tensor.numel() * tensor.element_size() <= flat.numel()

    def tensors(layer: nn.Module) -> list[torch.Tensor]:
        return [*layer.parameters(), *layer.buffers()]

    # packed once: host memory holds the weights only in the arena
    assert all(within(t, arena) for layer in mine.layers for t in tensors(layer))
    assert arena.numel() == 4 * LAYER_BYTES

    seen = []

    def inside(i: int) -> None:
        assert all(within(t, ring) for t in tensors(mine.layers[i]))
        others = [t for j, layer in enumerate(mine.layers) if j != i for t in tensors(layer)]
        assert all(within(t, arena) for t in others)
        seen.append(i)

    for hidden in inputs(3):
        full_pass(streamer, mine, hidden, inside=inside)
        assert streamer.ring is ring and streamer.arena is arena
        assert (ring.data_ptr(), arena.data_ptr()) == (ring_ptr, arena_ptr)
        assert all(within(t, arena) for layer in mine.layers for t in tensors(layer))
    assert seen == [0, 1, 2, 3] * 3


class Block(nn.Module):
    """A residual MLP block whose size depends on ``width``."""

    def __init__(self, width: int, hidden: int = 16) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, width)
        self.down = nn.Linear(width, hidden)
        self.register_buffer("scale", torch.rand(hidden))

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x))) * self.scale


def test_layers_of_unequal_size_never_cross_the_end_of_the_ring():
    torch.manual_seed(3)
    widths = [8, 96, 24, 160, 40, 8, 120, 64]
    mine = [Block(w) for w in widths]
    reference = copy.deepcopy(mine)
    largest = max(module_nbytes(block) for block in mine)
    streamer = RingbufferStreamer(RingbufferSettings(ring_mb=mib(1.7 * largest), chunk_mb=mib(1024)))
    streamer.prepare(mine, CPU, None)
    baseline = ResidentStreamer()
    baseline.prepare(reference, CPU, None)
    ring_bytes = streamer.device_bytes()
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        hidden = torch.randn(4, 16, generator=generator)  # [B, H]
        out = run_layers(streamer, mine, hidden, {}, range(len(mine)))
        assert torch.equal(out, run_layers(baseline, reference, hidden, {}, range(len(mine))))
        placements = streamer.placements
        assert all(p.offset % ALIGN == 0 and p.offset + p.nbytes <= ring_bytes for p in placements)
        end = 0
        for p in placements:
            fits_in_tail = end + -(-p.nbytes // ALIGN) * ALIGN <= ring_bytes
            assert p.offset == (end if fits_in_tail else 0)
            end = p.offset + -(-p.nbytes // ALIGN) * ALIGN
        assert any(p.offset == 0 for p in placements[1:]), "no layer had to start over at 0"


@pytest.mark.parametrize(
    "budget_layers, settings",
    [
        (None, {"ring_mb": mib(2 * LAYER_BYTES), "prefetch_layers": 2}),
        (3.9, {"kv_reserve_fraction": 0.0, "prefetch_layers": 2}),  # layer 0 resident
        (3.05, {"kv_reserve_fraction": 0.0, "prefetch_layers": 0}),  # layers 0-1 resident
    ],
)
def test_a_pass_cut_short_or_interleaved_with_another_stays_exact(budget_layers, settings):
    mine, reference = pair_of_stacks()
    budget = None if budget_layers is None else int(budget_layers * LAYER_BYTES)
    streamer = prepared(mine, budget, **settings)
    baseline = prepared_resident(reference)
    first, second = inputs(2)
    kw_first, kw_second = mine.forward_kwargs(first), mine.forward_kwargs(second)

    def both(indices, hidden_pair, kwargs, **flags):
        return tuple(
            run_layers(s, stack.layers, h, kwargs, indices, **flags)
            for s, stack, h in zip((streamer, baseline), (mine, reference), hidden_pair)
        )

    # a paused pass: layers 0-1 of the first input, no end_pass
    paused = both([0, 1], (first, first), kw_first, end=False)
    # another whole pass runs meanwhile
    other = both(range(4), (second, second), kw_second)
    assert torch.equal(*other)
    # the paused pass resumes at layer 2 without a new begin_pass
    resumed = both([2, 3], paused, kw_first, begin=False)
    assert torch.equal(*resumed)
    assert [p.layer for p in streamer.placements] == [2, 3], "restaged from layer 0"
    # a pass abandoned after one layer, then a full one
    both([0], (second, second), kw_second, end=False)
    assert torch.equal(*both(range(4), (first, first), kw_first))


# --------------------------------------------------------------------------- refusals at prepare


def test_a_layer_larger_than_the_ring_is_refused_at_prepare():
    mine, _ = pair_of_stacks()
    before = [p.data_ptr() for p in mine.layers[0].parameters()]
    ring = int(0.6 * LAYER_BYTES) // ALIGN * ALIGN
    streamer = RingbufferStreamer(RingbufferSettings(ring_mb=mib(ring)))
    with pytest.raises(ModelError) as refused:
        streamer.prepare(mine.layers, CPU, None)
    message = str(refused.value)
    assert "LlamaDecoderLayer" in message and str(LAYER_BYTES) in message and str(ring) in message
    assert [p.data_ptr() for p in mine.layers[0].parameters()] == before, "layers were touched"
    assert streamer.device_bytes() == 0


def test_the_ring_comes_from_the_budget_unless_set():
    mine, _ = pair_of_stacks()
    budget = int(2.5 * LAYER_BYTES)
    # no layer fits beside a double-buffering ring: the ring takes the budget less the KV reserve
    streamer = prepared(mine, budget, kv_reserve_fraction=0.0)
    assert streamer.resident_layers == 0
    assert streamer.device_bytes() == streamer.stats().ring_bytes == budget // ALIGN * ALIGN

    mine, _ = pair_of_stacks()
    whole = prepared(mine, None)
    assert whole.device_bytes() == 4 * LAYER_BYTES and whole.resident_layers == 0
    for hidden in inputs(2):
        full_pass(whole, mine, hidden)
    assert whole.stats().bytes_streamed == 4 * LAYER_BYTES  # later passes reuse everything

    mine, _ = pair_of_stacks()
    with pytest.raises(ModelError, match="budget"):
        prepared(mine, budget, ring_mb=mib(3 * LAYER_BYTES))
    mine, _ = pair_of_stacks()
    with pytest.raises(ModelError, match="kv_reserve_fraction=0.25"):
        prepared(mine, budget, ring_mb=mib(2.2 * LAYER_BYTES))  # fits the budget, not beside the reserve


# --------------------------------------------------------------------------- resident layers and ring


def in_storage_of(tensor: torch.Tensor, flat: torch.Tensor) -> bool:
    start = tensor.data_ptr() - flat.data_ptr()
    return 0 <= start and start + tensor.numel() * tensor.element_size() <= flat.numel()


@pytest.mark.parametrize(
    "budget_layers, settings, resident_count, ring_layers",
    [
        # 1 resident + a ring of 2 fit 3.9 layers, 2 resident + 2 do not: the rest grows the ring
        (3.9, {"kv_reserve_fraction": 0.0}, 1, 2.9),
        # without prefetch a ring of one layer is enough: more layers stay resident
        (3.05, {"kv_reserve_fraction": 0.0, "prefetch_layers": 0}, 2, 1),
        # the default reserve keeps a quarter of 5.2 layers for KV: 3.9 left
        (5.2, {}, 1, 2.9),
        # a fixed reserve instead of the fraction
        (4.9, {"kv_reserve_gb": LAYER_BYTES / (1 << 30)}, 1, 2.9),
        # resident_layers caps the resident part; the ring then holds every streamed layer
        (8.0, {"kv_reserve_fraction": 0.0, "resident_layers": 1}, 1, 3),
    ],
)
def test_resident_layers_fit_beside_the_ring_and_are_never_streamed(budget_layers, settings, resident_count, ring_layers):
    mine, reference = pair_of_stacks()
    budget = int(budget_layers * LAYER_BYTES)
    streamer = prepared(mine, budget, reuse=False, **settings)
    baseline = prepared_resident(reference)
    assert streamer.resident_layers == resident_count
    ring_bytes = streamer.stats().ring_bytes
    assert ring_bytes == int(ring_layers * LAYER_BYTES) // ALIGN * ALIGN or (
        ring_layers == int(ring_layers) and ring_bytes == ring_layers * LAYER_BYTES
    )
    assert streamer.device_bytes() == ring_bytes + resident_count * LAYER_BYTES
    assert streamer.device_bytes() <= budget - streamer.kv_reserve_bytes(budget)
    assert streamer.arena.numel() == (4 - resident_count) * LAYER_BYTES
    streamed_layers = list(range(resident_count, 4))
    assert streamer.pass_bytes == len(streamed_layers) * LAYER_BYTES

    def inside(i: int) -> None:
        for layer in mine.layers[:resident_count]:  # resident: their own storage, never the ring
            assert not any(in_storage_of(t, streamer.ring) or in_storage_of(t, streamer.arena)
                           for t in layer.parameters())

    for hidden in inputs(3):
        assert torch.equal(full_pass(streamer, mine, hidden, inside=inside), full_pass(baseline, reference, hidden))
        assert [p.layer for p in streamer.placements] == streamed_layers
    stats = streamer.stats()
    assert stats.passes == 3 and stats.layers == 4
    assert stats.bytes_streamed == 3 * streamer.pass_bytes  # reuse=False: streamed layers only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resident_layers_and_the_ring_on_cuda_match_resident_bitwise():
    mine, reference = pair_of_stacks()
    cuda = torch.device("cuda")
    streamer = RingbufferStreamer(RingbufferSettings(kv_reserve_fraction=0.0, chunk_mb=mib(4096)))
    streamer.prepare(mine.layers, cuda, int(3.9 * LAYER_BYTES))
    baseline = ResidentStreamer()
    baseline.prepare(reference.layers, cuda, None)
    mine.rotary.to(cuda)
    reference.rotary.to(cuda)
    assert streamer.resident_layers == 1
    for hidden in inputs(4):
        hidden = hidden.to(cuda)
        assert torch.equal(full_pass(streamer, mine, hidden), full_pass(baseline, reference, hidden))
    torch.cuda.synchronize()
    stats = streamer.stats()
    assert stats.passes == 4 and stats.bytes_streamed + stats.bytes_reused == 4 * streamer.pass_bytes


def test_everything_resident_when_the_budget_holds_every_layer():
    mine, reference = pair_of_stacks()
    streamer = prepared(mine, int(4.5 * LAYER_BYTES), kv_reserve_fraction=0.0)
    baseline = prepared_resident(reference)
    assert streamer.resident_layers == 4 and streamer.stats().ring_bytes == 0
    assert streamer.device_bytes() == 4 * LAYER_BYTES
    for hidden in inputs(2):
        assert torch.equal(full_pass(streamer, mine, hidden), full_pass(baseline, reference, hidden))
    assert streamer.placements == [] and streamer.stats().bytes_streamed == 0


def test_a_budget_that_holds_no_layer_beside_the_reserve_is_refused_naming_the_sizes():
    mine, _ = pair_of_stacks()
    before = [p.data_ptr() for p in mine.layers[0].parameters()]
    budget = int(1.2 * LAYER_BYTES)
    streamer = RingbufferStreamer(RingbufferSettings(kv_reserve_fraction=0.25))
    with pytest.raises(ModelError) as refused:
        streamer.prepare(mine.layers, CPU, budget)
    message = str(refused.value)
    reserve = int(budget * 0.25)
    assert "LlamaDecoderLayer" in message and str(LAYER_BYTES) in message
    assert str(budget) in message and str(reserve) in message and str(budget - reserve) in message
    assert "kv_reserve_fraction=0.25" in message and "gpu_memory_budget_gb" in message
    assert [p.data_ptr() for p in mine.layers[0].parameters()] == before, "layers were touched"
    assert streamer.device_bytes() == 0
    # without the reserve one layer fits: it streams through a ring of one layer
    assert prepared(mine, budget, kv_reserve_fraction=0.0).stats().ring_bytes >= LAYER_BYTES


def test_progress_is_shown_only_when_asked_or_on_a_terminal(capsys):
    mine, _ = pair_of_stacks()
    prepared(mine, None)
    assert capsys.readouterr().err == ""  # pytest's stderr is no terminal
    mine, _ = pair_of_stacks()
    prepared(mine, None, progress=True)
    assert "ringbuffer: 0 layers resident" in capsys.readouterr().err


def test_layers_sharing_a_tensor_are_refused():
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    with pytest.raises(ModelError, match="shared by layers 0 and 1"):
        RingbufferStreamer().prepare([first, second], CPU, None)


def test_resident_moves_layers_and_reports_their_bytes():
    stack, _ = pair_of_stacks()
    streamer = ResidentStreamer()
    streamer.prepare(stack.layers, CPU, 4 * LAYER_BYTES)
    assert streamer.device_bytes() == 4 * LAYER_BYTES == streamer.stats().device_bytes
    full_pass(streamer, stack, inputs(1)[0])


def test_resident_over_budget_is_refused_naming_the_ringbuffer():
    stack, _ = pair_of_stacks()
    budget = 3 * LAYER_BYTES
    with pytest.raises(ModelError) as refused:
        ResidentStreamer().prepare(stack.layers, CPU, budget)
    message = str(refused.value)
    assert str(4 * LAYER_BYTES) in message and str(budget) in message
    assert "--plugins ringbuffer" in message


# --------------------------------------------------------------------------- settings and plugins


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"chunk_mb": 0}, ValueError),
        ({"chunk_mb": -64}, ValueError),
        ({"chunk_mb": float("inf")}, ValueError),
        ({"chunk_mb": "64"}, TypeError),
        ({"ring_mb": 0}, ValueError),
        ({"ring_mb": float("nan")}, ValueError),
        ({"ring_mb": True}, TypeError),
        ({"prefetch_layers": -1}, ValueError),
        ({"prefetch_layers": 1.5}, TypeError),
        ({"prefetch_layers": True}, TypeError),
        ({"reuse": 1}, TypeError),
        ({"resident_layers": -1}, ValueError),
        ({"resident_layers": 1.0}, TypeError),
        ({"kv_reserve_fraction": 1.0}, ValueError),
        ({"kv_reserve_fraction": -0.1}, ValueError),
        ({"kv_reserve_fraction": "0.1"}, TypeError),
        ({"kv_reserve_gb": -1}, ValueError),
        ({"kv_reserve_gb": float("inf")}, ValueError),
        ({"progress": 1}, TypeError),
        ({"fp8_matmul": "int8"}, ValueError),
    ],
)
def test_ringbuffer_settings_reject_bad_values(kwargs, error):
    with pytest.raises(error):
        RingbufferSettings(**kwargs)


def test_ringbuffer_settings_defaults():
    settings = RingbufferSettings()
    assert (settings.chunk_mb, settings.ring_mb, settings.prefetch_layers, settings.reuse) == (
        64.0, None, 2, True,
    )
    assert (settings.resident_layers, settings.kv_reserve_fraction, settings.kv_reserve_gb) == (None, 0.25, None)
    assert settings.progress is None and settings.fp8_matmul == "dequantize"
    assert RingbufferStreamer(settings).chunk_bytes == 64 * MIB


def test_both_streamers_register_themselves():
    registry = StrategyRegistry()
    resident.djinn_register_strategies(registry)
    ringbuffer.djinn_register_strategies(registry)
    assert registry.specs["resident"].slot == registry.specs["ringbuffer"].slot == "streamer"
    assert isinstance(registry.specs["ringbuffer"].factory(RingbufferSettings()), RingbufferStreamer)
    assert isinstance(registry.specs["resident"].factory(ResidentSettings()), ResidentStreamer)


def test_ringbuffer_is_built_from_its_settings_table(make_plugins):
    config = parse_config(
        {"settings": {"ringbuffer": {"chunk_mb": 8, "prefetch_layers": 1}}}, source="plugins.toml"
    )
    streamer = make_plugins(config, ["ringbuffer"]).build("ringbuffer")
    assert isinstance(streamer, RingbufferStreamer)
    assert streamer.chunk_bytes == 8 * MIB and streamer.settings.prefetch_layers == 1
    bad = parse_config({"settings": {"ringbuffer": {"ring_mb": -1}}}, source="plugins.toml")
    with pytest.raises(ConfigError, match="ring_mb"):
        make_plugins(bad, ["ringbuffer"])
