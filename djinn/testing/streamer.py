"""``StreamerContract``: what every ``Streamer`` promises, as tests a plugin's package reuses.

    from djinn.testing import StreamerContract

    class TestMyStreamer(StreamerContract):
        plugin = "my_streamer"

Runs on the CPU: layers are tiny residual MLP blocks of unequal sizes, prepared for the CPU
device, and their outputs are compared bit for bit with the same layers run plainly.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from djinn.kernel.errors import ModelError
from djinn.engine.streaming import Streamer, StreamerStats
from djinn.testing._plugins import build_strategy

if TYPE_CHECKING:
    import torch

HIDDEN = 16
WIDTHS = (8, 96, 24, 160, 40)  # unequal layer sizes


def tiny_layers(seed: int = 0) -> list[torch.nn.Module]:
    """Residual MLP blocks ``x + down(relu(up(x))) * scale`` with a buffer each; ``x``: [B, T, HIDDEN]."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.up = nn.Linear(HIDDEN, width)
            self.down = nn.Linear(width, HIDDEN)
            self.register_buffer("scale", torch.rand(HIDDEN))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.relu(self.up(x))) * self.scale

    torch.manual_seed(seed)
    return [Block(width) for width in WIDTHS]


def layer_bytes(layers: Sequence[torch.nn.Module]) -> int:
    """Bytes of all parameters and buffers of ``layers``."""
    return sum(t.numel() * t.element_size() for layer in layers for t in (*layer.parameters(), *layer.buffers()))


def streamed_pass(streamer: Streamer, layers: Sequence[torch.nn.Module], hidden: torch.Tensor) -> torch.Tensor:
    """One forward pass the way the model runner drives it."""
    import torch

    with torch.inference_mode():
        streamer.begin_pass()
        for index, layer in enumerate(layers):
            streamer.before_layer(index)
            hidden = layer(hidden)
            streamer.after_layer(index)
        streamer.end_pass()
    return hidden


def plain_pass(layers: Sequence[torch.nn.Module], hidden: torch.Tensor) -> torch.Tensor:
    """The same pass without a streamer."""
    import torch

    with torch.inference_mode():
        for layer in layers:
            hidden = layer(hidden)
    return hidden


class StreamerContract:
    """Tests every streamer passes on the CPU. Subclass with ``plugin = "NAME"``; ``settings``
    is its ``[settings.NAME]`` table."""

    plugin: ClassVar[str]
    settings: ClassVar[Mapping[str, Any]] = {}

    def build(self) -> Streamer:
        """A new streamer, built through a fresh plugin manager by its entry-point name."""
        return build_strategy(self.plugin, "streamer", self.settings)

    @pytest.fixture
    def streamer(self) -> Streamer:
        """The streamer, not prepared yet."""
        return self.build()

    def test_it_is_a_streamer(self, streamer: Streamer) -> None:
        """The built strategy is a ``Streamer`` that says whether it streams."""
        assert isinstance(streamer, Streamer)
        assert isinstance(streamer.streams_weights, bool)

    @pytest.mark.parametrize("budget", ["none", "exact"])
    def test_streamed_passes_match_plain_layers_bitwise(self, streamer: Streamer, budget: str) -> None:
        """Passes through prepared layers give exactly the outputs of the same layers run plainly,
        pass after pass, with no budget and with a budget of exactly the layers' bytes."""
        import torch

        layers = tiny_layers()
        reference = copy.deepcopy(layers)
        total = layer_bytes(layers)
        streamer.prepare(layers, torch.device("cpu"), None if budget == "none" else total)
        generator = torch.Generator().manual_seed(5)
        for tokens in (1, 3, 7, 1):
            hidden = torch.randn(2, tokens, HIDDEN, generator=generator)  # [B, T, HIDDEN]
            assert torch.equal(streamed_pass(streamer, layers, hidden), plain_pass(reference, hidden))

    def test_stats_and_device_bytes_agree(self, streamer: Streamer) -> None:
        """``stats()`` is a ``StreamerStats`` whose ``device_bytes`` is ``device_bytes()``; after
        ``prepare`` within a budget the streamer holds device memory, within that budget."""
        import torch

        layers = tiny_layers()
        budget = layer_bytes(layers)
        streamer.prepare(layers, torch.device("cpu"), budget)
        streamed_pass(streamer, layers, torch.zeros(1, 2, HIDDEN))
        stats = streamer.stats()
        assert isinstance(stats, StreamerStats)
        assert stats.device_bytes == streamer.device_bytes()
        assert 0 < streamer.device_bytes() <= budget
        if streamer.streams_weights:
            assert 0 < stats.ring_bytes <= budget
        else:
            assert stats.ring_bytes == 0

    def test_a_budget_too_small_for_any_layer_is_refused_at_prepare(self, streamer: Streamer) -> None:
        """``prepare`` raises ``ModelError`` when no layer fits the device budget."""
        import torch

        layers = tiny_layers()
        smallest = min(layer_bytes([layer]) for layer in layers)
        with pytest.raises(ModelError):
            streamer.prepare(layers, torch.device("cpu"), smallest // 2)
