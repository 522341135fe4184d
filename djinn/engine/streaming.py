"""The weight-streaming contract: how a decoder layer's weights reach the compute device before
the runner (``djinn.engine.runner``) runs the layer. Streamer plugins implement it; a plugin offers
a factory for the ``streamer`` slot in ``djinn_register_strategies``. Required methods are
abstract; optional ones default to doing nothing.

Importing this module does not import torch (plugins load at discovery, and the CLI starts
without it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    import torch


@attrs.frozen
class StreamerStats:
    """A streamer's figures for metrics. A resident streamer fills only ``device_bytes``."""
    #: device memory held for layer weights: the ring plus the layers kept resident
    device_bytes: int = 0
    #: the device ring weights stream through (0: nothing streams), and the host arena they stream from
    ring_bytes: int = 0
    arena_bytes: int = 0
    layers: int = 0
    passes: int = 0
    bytes_streamed: int = 0
    #: bytes a pass found in the ring already and did not copy again
    bytes_reused: int = 0
    #: time inside passes, copying, and compute waiting for copies
    seconds: float = 0.0
    copy_seconds: float = 0.0
    stall_seconds: float = 0.0
    #: bytes streamed per second of pass, and per second of copying
    effective_gbps: float = 0.0
    copy_gbps: float = 0.0


class Streamer(ABC):
    """Brings each decoder layer's weights onto the compute device before the layer runs. The
    runner calls ``before_layer``/``after_layer`` for every layer of every pass (plain calls, no
    hooks); ``prepare`` runs once when the model is loaded."""

    #: True when weights move while passes run (a ring on the device): the engine then loads the model
    #: on the host, and the runner replays no CUDA graphs (they would freeze the weights' addresses)
    streams_weights: bool = False

    @abstractmethod
    def prepare(self, layers: Sequence[torch.nn.Module], device: torch.device, budget_bytes: int | None) -> None:
        """Take ownership of ``layers`` (on CPU) and place or stage them for ``device``.

        ``budget_bytes`` is the device memory left for the decoder layers: the GPU budget less what
        the runner keeps on the device besides them (embeddings, final norm, head) and, on CUDA,
        the workspace; None: no limit. What the streamer does not take (``device_bytes``) goes to
        the KV cache, so it may keep part free on purpose. Raise ``ModelError`` here (not at run
        time) when the layers cannot be served within ``budget_bytes``."""

    def begin_pass(self) -> None:
        """A forward pass over all layers starts (prefetch the first layers)."""

    def before_layer(self, index: int) -> None:
        """Return once layer ``index`` may run on the compute stream."""

    def after_layer(self, index: int) -> None:
        """Layer ``index`` has been enqueued; its weights may be recycled once it finishes."""

    def end_pass(self) -> None:
        """The forward pass is over."""

    def device_bytes(self) -> int:
        """Device memory this streamer holds for weights (resident layers, its ring, or both)."""
        return 0

    def stats(self) -> StreamerStats:
        """Figures for metrics (bytes streamed, stalls, ...)."""
        return StreamerStats(device_bytes=self.device_bytes())
